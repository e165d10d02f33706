"""Data pipelines: a *source* says what the samples are and how an epoch is ordered and split
(:mod:`pipeline.sources`: an ImageFolder split, tar shards); a *backend* turns a source into
:class:`TwoViewBatch` es on the training device (:mod:`pipeline.backends`: torch, dali, ffcv,
torchvision-gpu, synthetic), with the shared settings of a :class:`~pipeline.feed.Feed`.

:func:`build_loader` is the one place that maps ``--loader`` to a backend. Backends with optional
dependencies (DALI, FFCV) are imported only when chosen.
"""
from __future__ import annotations

import importlib.util
import os

from .augment import AugmentConfig, recipe
from .batch import TwoViewBatch
from .feed import Feed
from .sources import open_source

LOADERS = ("torch", "dali", "ffcv", "torchvision-gpu", "synthetic")

CPU_COST_MS = {"torch": 3.7, "torchvision-gpu": 0.51, "dali": 0.19}
"""Core-milliseconds an image costs each loader on the CPU (two views, Fashion-MNIST at 28 px, batch
128, 2 workers; 2026-12-03 on the project's 2-core AMD EPYC, AVX2; docs/loaders.md has the command).
For scale: the default model's step costs about 6.7 core-ms an image there, so the torch loader
takes a third of the cores from it and DALI 3%."""


def _installed(module: str) -> bool:
    """Whether ``module`` can be found (its parent packages are imported to look; a broken parent
    counts as not installed)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def pick_loader(source, device) -> tuple[str, str]:
    """``--loader auto``: the cheapest loader this install has for ``source`` on ``device``.

    Returns:
        ``(name, reason)``: ``dali`` when NVIDIA DALI is importable (its CPU graph costs the least
        per image, :data:`CPU_COST_MS`; on a GPU it decodes with nvJPEG) and the source is an
        ImageFolder split; else ``torchvision-gpu`` on a GPU and ``torch`` on the CPU. Tar shards get
        ``torch``: it skips and counts a bad sample where DALI's reader stops the run (NVIDIA/DALI#3913);
        ``--loader dali`` reads the writer's validated shards faster.
    """
    if getattr(source, "kind", None) == "shards":
        return "torch", "for tar shards: it skips and counts bad samples; --loader dali reads them faster"
    if _installed("nvidia.dali"):
        where = "nvJPEG on the GPU" if getattr(device, "type", str(device)) == "cuda" else \
            f"{CPU_COST_MS['dali']} core-ms an image on the CPU against torch's {CPU_COST_MS['torch']}"
        return "dali", f"installed, the cheapest: {where}"
    if getattr(device, "type", str(device)) == "cuda":
        return "torchvision-gpu", "DALI is not installed; decodes with nvJPEG on the GPU"
    return "torch", "DALI is not installed (pip install -e '.[dali]' makes the CPU loader about 20x cheaper)"


def backend_class(name: str, source=None) -> type:
    """The backend class of ``--loader name`` for ``source``: tar shards have their own torch, dali
    and torchvision-gpu backends (``backends/<name>/shards.py``); ffcv reads no shards.

    Raises:
        ValueError: unknown ``name``.
        ImportError: the backend's package is not installed (the message names the pip extra).
    """
    shards = getattr(source, "kind", None) == "shards"
    if name == "torch":
        from .backends.torch import TorchLoader, TorchShardLoader
        return TorchShardLoader if shards else TorchLoader
    if name == "torchvision-gpu":
        if shards:
            from .backends.tv_gpu.shards import TorchvisionGpuShardLoader
            return TorchvisionGpuShardLoader
        from .backends.tv_gpu.loader import TorchvisionGpuLoader
        return TorchvisionGpuLoader
    if name == "synthetic":
        from .backends.synthetic import SyntheticLoader
        return SyntheticLoader
    if name == "dali":
        try:
            from .backends.dali.loader import DaliLoader
            from .backends.dali.shards import DaliShardLoader
        except ImportError as exc:
            raise ImportError(f"--loader dali needs NVIDIA DALI: pip install -e '.[dali]' ({exc})") from exc
        return DaliShardLoader if shards else DaliLoader
    if name == "ffcv":
        try:
            from .backends.ffcv.loader import FfcvLoader
        except ImportError as exc:
            raise ImportError(f"--loader ffcv needs FFCV: pip install -e '.[ffcv]' ({exc})") from exc
        return FfcvLoader
    raise ValueError(f"unknown loader {name!r}; choose one of {', '.join(LOADERS)}")


def build_loader(name: str, source=None, aug: AugmentConfig | None = None, **options):
    """Build the loader called ``name`` (one of :data:`LOADERS`) over ``source``.

    Every loader offers ``__iter__`` (yields :class:`TwoViewBatch`), ``__len__`` (batches per
    epoch, last partial batch dropped), ``set_epoch(epoch, start=0)`` (``start`` batches skipped: a
    mid-epoch resume), ``batch_size`` and ``num_samples``.

    Args:
        name: the backend.
        source: a source object (:class:`~pipeline.sources.imagefolder.ImageList`,
            :class:`~pipeline.sources.shards.ShardSource`), or a path / URL opened with
            :func:`pipeline.sources.open_source`; None for ``synthetic``.
        aug: augmentation parameters (None for ``synthetic``).
        options: the :class:`~pipeline.feed.Feed` fields (``batch_size``, ``device``, ``workers``,
            ``channels_last``, ``dtype``, ``prefetch``, ``seed``, ``rank``, ``world_size``) and the
            backend's own options (see each backend class).

    Raises:
        ValueError: unknown ``name``; a source the backend does not read; bad feed settings.
        ImportError: the backend's package is not installed (the message names the pip extra).
        TypeError: an option the backend does not take.
    """
    if isinstance(source, (str, os.PathLike)):
        source = open_source(source)
    cls = backend_class(name, source)
    feed, own = Feed.split(options)
    return cls(source, aug, feed, **own)


__all__ = ["AugmentConfig", "CPU_COST_MS", "Feed", "LOADERS", "TwoViewBatch", "backend_class", "build_loader",
           "open_source", "pick_loader", "recipe"]
