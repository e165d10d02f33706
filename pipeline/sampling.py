"""Epoch order and sharding shared by the loaders: a pure function of (seed, epoch, rank).

Every epoch's order is ``torch.randperm`` under a generator seeded with ``seed`` and ``epoch``,
so a run resumed at epoch ``e`` sees exactly the order an uninterrupted run sees, never epoch 0's
again. For ``world_size > 1`` the permutation is cut to a multiple of the world size (like
``DistributedSampler(drop_last=True)``) and rank ``r`` takes every ``world_size``-th index from
``r``, so shards are disjoint and equal in size. Every loader (torch, DALI, FFCV) reads exactly
this order, and a mid-epoch resume (``set_epoch(epoch, start)``) skips its first ``start`` whole
batches (:func:`check_start`).
"""
from __future__ import annotations

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """A well-mixed 63-bit seed from ``(seed, epoch, *more)`` (numpy ``SeedSequence``)."""
    return int(np.random.SeedSequence([seed, epoch, *more]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def shard_size(num_samples: int, rank: int = 0, world_size: int = 1) -> int:
    """Images each rank reads per epoch: ``num_samples // world_size`` (the same on every rank).

    Raises:
        ValueError: ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be an integer >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r} outside world size {world_size} (ranks are 0..{world_size - 1})")
    return num_samples // world_size


def shard_order(num_samples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                shuffle: bool = True) -> list[int]:
    """Indices this rank reads in ``epoch``: ``shard_size(num_samples, rank, world_size)`` of them.

    Raises:
        ValueError: bad ``rank`` / ``world_size`` (see :func:`shard_size`).
    """
    shard_size(num_samples, rank, world_size)
    if shuffle:
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order = torch.randperm(num_samples, generator=g).tolist()
    else:
        order = list(range(num_samples))
    usable = num_samples - num_samples % world_size
    return order[:usable][rank::world_size]


def check_start(start: int, num_batches: int) -> int:
    """``start`` (batches of an epoch to skip when resuming mid-epoch), checked against the epoch.

    Raises:
        ValueError: ``start`` is not an integer in ``0..num_batches``.
    """
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= num_batches:
        raise ValueError(f"start batch {start!r} outside this epoch's 0..{num_batches} batches")
    return start


def check_batch_size(batch_size: int, shard_size: int, what: str) -> int:
    """Batches per epoch (last partial batch dropped).

    Raises:
        ValueError: ``batch_size < 1`` or larger than the shard, which would give no batch at all.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if batch_size > shard_size:
        raise ValueError(f"batch size {batch_size} is larger than the {shard_size} images of {what}; "
                         f"lower -b/--batch-size or add data")
    return shard_size // batch_size
