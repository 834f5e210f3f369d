"""What runs inside a job: the stages (train, prune, quantize, measure), the training loop, checkpoints
and the set-up they share, and the runner that takes a run folder through them. Imports torch, except
:mod:`.runner`, :mod:`.logs` and :mod:`.distributed`, which the login node imports to hand the job to
submitit."""
