"""Search sweeps: a sweep file's ``search:`` section run as an Optuna study by a fixed number of workers.

- :mod:`pipeline.search.spec`: the section parsed and checked against the schema (no optuna, no torch).
- :mod:`pipeline.search.figures`: the figures a run records that an objective may name, and where each
  is read from in a run folder.
- :mod:`pipeline.search.journal`: the journal file checked before Optuna reads it (a cut last record
  dropped and said, a garbled one named).
- :mod:`pipeline.search.study`: the study on its storage (journal file or database URL), its sampler and
  pruner, and the configs a dry run shows.
- :mod:`pipeline.search.worker`: what one worker (one Slurm array task) runs: claim a trial (resume,
  adopt or ask), run it, tell its outcome, until the study has its trials.

Nothing here imports torch; only ``study`` and ``worker`` import optuna (about 0.2 s).
"""
