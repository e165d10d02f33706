"""Data pipelines: each turns a source into :class:`TwoViewBatch` es on the training device.

:func:`build_loader` is the one place that maps ``--loader`` to a backend. Backends with optional
dependencies (DALI, FFCV) are imported only when chosen.
"""
from __future__ import annotations

from .augment import AugmentConfig, recipe
from .batch import TwoViewBatch

LOADERS = ("torch", "dali", "ffcv", "torchvision-gpu", "synthetic")


def build_loader(name: str, **kwargs):
    """Build the loader called ``name`` (one of :data:`LOADERS`).

    Every loader offers ``__iter__`` (yields :class:`TwoViewBatch`), ``__len__`` (batches per
    epoch, last partial batch dropped), ``set_epoch(epoch, start=0)`` (``start`` batches skipped: a
    mid-epoch resume), ``batch_size`` and ``num_samples``.
    ``kwargs`` go to the backend's constructor (see each class for its arguments).

    Raises:
        ValueError: unknown ``name``.
        ImportError: the backend's package is not installed (the message names the pip extra).
    """
    if name == "torch":
        from .torch_loader import TorchLoader
        return TorchLoader(**kwargs)
    if name == "torchvision-gpu":
        from .tv_gpu_loader import TorchvisionGpuLoader
        return TorchvisionGpuLoader(**kwargs)
    if name == "synthetic":
        from .synthetic import SyntheticLoader
        return SyntheticLoader(**kwargs)
    if name == "dali":
        try:
            from .dali_loader import DaliLoader
        except ImportError as exc:
            raise ImportError(f"--loader dali needs NVIDIA DALI: pip install -e '.[dali]' ({exc})") from exc
        return DaliLoader(**kwargs)
    if name == "ffcv":
        try:
            from .ffcv_loader import FfcvLoader
        except ImportError as exc:
            raise ImportError(f"--loader ffcv needs FFCV: pip install -e '.[ffcv]' ({exc})") from exc
        return FfcvLoader(**kwargs)
    raise ValueError(f"unknown loader {name!r}; choose one of {', '.join(LOADERS)}")


__all__ = ["AugmentConfig", "LOADERS", "TwoViewBatch", "build_loader", "recipe"]
