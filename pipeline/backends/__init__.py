"""Backends: each turns a source into :class:`~pipeline.batch.TwoViewBatch` es on the training
device. One sub-package per backend, its helpers beside it; :func:`pipeline.build_loader` chooses."""
