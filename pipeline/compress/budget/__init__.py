"""Compression to an accuracy budget: the smallest model within a stated drop of validation top-1.

- :mod:`.search`: the decisions, as pure functions of the attempts so far (no torch): which attempt comes
  next, which one is chosen, whether a drop is within budget. A job killed mid-search reloads its finished
  attempts and continues exactly.
- :mod:`.int8`: post-training int8 that leaves the costliest layers in fp32, one at a time, until the
  validation drop is within ``max_drop`` points.
- :mod:`.prune`: the sensitivity pass, per-group structured ratios, and the searches (structured per-group
  ratios, structured uniform ratio, unstructured global sparsity) that fine-tune one attempt at a time.

Every function takes callables for validation scoring and fine-tuning, so a stage passes the run's loaders
and training loop and a test passes tiny ones. Drops are in points of top-1 (1.0 = one percentage point).
This package imports nothing heavy at import time: ``search`` is safe on the login node.
"""
