"""CIFAR data: the files on disk (:mod:`.cifar`), the batches that feed training (:mod:`.loaders`), a
synthetic data set in the same format (:mod:`.synthetic`) and ``python -m pipeline.data`` (:mod:`.__main__`)."""
