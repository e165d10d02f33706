"""How a backend delivers batches: the settings every backend shares, in one value.

A *source* says what the samples are and how an epoch is ordered and split
(:mod:`pipeline.sources`); a *backend* turns a source into :class:`~pipeline.batch.TwoViewBatch` es
(:mod:`pipeline.backends`). :class:`Feed` is what the training loop asks of any backend — batch
size, device, layout, dtype, seed, this rank's place, worker count — so a backend's constructor is
``(source, aug, feed, **its own options)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .sampling import shard_size


@dataclass(frozen=True)
class Feed:
    """What every backend is asked for.

    Attributes:
        batch_size: images per batch on this rank (each image gives two views).
        device: the training device; batches arrive there.
        workers: loader worker processes or threads (each backend says which; 0 = the caller's
            process / thread where the backend allows it).
        channels_last: deliver views in ``torch.channels_last`` memory format.
        dtype: dtype of the delivered views (float32; float16 / bfloat16 halve the copy).
        prefetch: batches prepared ahead (None: the backend's own default).
        seed: seed of the order and the augmentation draws.
        rank, world_size: this process's place among the ranks (torchrun's RANK, WORLD_SIZE).

    Raises:
        ValueError: ``batch_size < 1``, ``workers < 0``, ``prefetch < 1``, or a rank outside
            ``[0, world_size)`` (see :func:`pipeline.sampling.shard_size`).
    """

    batch_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: int = 2
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    prefetch: int | None = None
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be an integer >= 1, got {self.batch_size!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.prefetch is not None and self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 batch, got {self.prefetch}")
        shard_size(0, self.rank, self.world_size)  # checks rank and world size

    def prefetch_or(self, default: int) -> int:
        """``prefetch``, or the backend's ``default`` when it was not given."""
        return default if self.prefetch is None else self.prefetch

    @classmethod
    def split(cls, options: dict) -> tuple["Feed", dict]:
        """``(Feed of the options it names, the remaining options)`` — :func:`pipeline.build_loader`'s
        keyword arguments into the shared settings and the backend's own.

        Raises:
            TypeError: ``batch_size`` is missing.
        """
        names = {f.name for f in fields(cls)}
        mine = {k: v for k, v in options.items() if k in names}
        if "batch_size" not in mine:
            raise TypeError("a loader needs batch_size=")
        return cls(**mine), {k: v for k, v in options.items() if k not in names}
