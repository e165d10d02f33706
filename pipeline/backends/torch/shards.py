"""``--loader torch`` over tar shards: DataLoader workers read their part of the epoch's plan
through webdataset, decode with PIL and draw two views with the torch loader's recipe.

Each worker is one *reader* of :meth:`pipeline.sources.shards.ShardSource.plan`: it takes its
samples from :func:`pipeline.sources.tar_samples.reader_stream` (its pieces, or, resampled, its
drawn shards, bad samples dropped, through a buffer shuffle seeded with ``(seed, epoch, rank,
reader)``), decodes, draws the two views under a seed of ``(seed, epoch, shard, position, salt)``
— so a sample's views do not depend on which worker read it — and yields exactly its planned
number of batches, reading its pieces again if bad samples left it short. The DataLoader's
round-robin then gives every rank exactly ``len(loader)`` batches.

Mid-epoch resume (``set_epoch(epoch, start)``): each reader drops the samples of its batches
before ``start`` from its shuffled stream before decoding them; the batches from ``start`` on
are those of the uninterrupted epoch (exactly so when no sample of the epoch was bad: a sample
that fails to decode is only known after decoding, and the batches after it shift by one).

Bad samples (:class:`~pipeline.sources.tar_samples.BadSample`: no image or ``.cls``, bytes PIL
cannot decode, a shard cut short) are skipped and counted; each batch carries the ones its
reader met since its last batch, and the loader's :class:`~pipeline.backends.bad_samples.BadSampleLog`
appends them to ``skip_log`` (one ``shard, key, reason`` line each) and stops with
:class:`BadShardData` once more than ``max_bad_fraction`` of this rank's epoch was bad.
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ...augment import AugmentConfig
from ...batch import TwoViewBatch
from ...device import to_training_layout
from ...feed import Feed
from ...sampling import check_batch_size, epoch_seed
from ...sources.imagefolder import decode_rgb
from ...sources.shards import ShardSource
from ...sources.tar_samples import BadSample, BadShardData, TarSample, reader_stream
from ...workers import ignore_stop_signals, stop_signals_deferred
from ..bad_samples import BadSampleLog, one_line
from ..base import Backend
from .loader import view_transform


class ShardStream(IterableDataset):
    """Batches ``(view1 (b,3,S,S) f32, view2, labels (b,) i64, bad samples, keys or None)`` of one
    reader of this rank's plan for the epoch held in ``state`` (a shared ``[epoch, start]`` tensor,
    so persistent workers see :meth:`TorchShardLoader.set_epoch`)."""

    def __init__(self, source: ShardSource, aug: AugmentConfig, batch_size: int, seed: int, rank: int,
                 world_size: int, buffer: int, state: torch.Tensor, record_keys: bool):
        self.source, self.batch_size, self.seed, self.rank, self.world_size = source, batch_size, seed, rank, world_size
        self.buffer, self.state, self.record_keys = buffer, state, record_keys
        self.transform = view_transform(aug)

    def _views(self, sample: TarSample, epoch: int):
        image = decode_rgb(sample.image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(self.seed, epoch, sample.shard, sample.position, sample.salt))
            return self.transform(image), self.transform(image)

    def __iter__(self):
        info = get_worker_info()
        reader, readers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = (int(v) for v in self.state.tolist())
        plan = self.source.plan(self.seed, epoch, self.rank, self.world_size, readers, self.batch_size, start)[reader]
        bad: list[BadSample] = []
        b = self.batch_size
        stream = islice(reader_stream(self.source, plan, self.seed, epoch, self.rank, self.buffer, bad),
                        plan.skip_batches * b, None)
        for _ in range(plan.batches):
            v1, v2, labels, keys = [], [], [], []
            while len(labels) < b:
                sample = next(stream)
                try:
                    a, c = self._views(sample, epoch)
                except Exception as exc:  # PIL raises many types for bytes it cannot decode
                    if not sample.replay:
                        bad.append(BadSample(sample.url, sample.key, f"cannot decode .{sample.ext}: "
                                                                     f"{type(exc).__name__}: {exc}"))
                    continue
                v1.append(a)
                v2.append(c)
                labels.append(sample.label)
                keys.append(f"{sample.url}#{sample.key}")
            yield (torch.stack(v1), torch.stack(v2), torch.tensor(labels, dtype=torch.int64), bad.copy(),
                   keys if self.record_keys else None)
            bad.clear()


class TorchShardLoader(Backend):
    """Two-view batches from tar shards through webdataset + ``DataLoader`` workers.

    Args:
        source: the shards (:class:`~pipeline.sources.shards.ShardSource`).
        aug: augmentation parameters (the torch loader's recipe).
        feed: batch size per rank, device (pinned memory on CUDA), ``workers`` DataLoader worker
            processes = readers of the plan (0: one reader in this process), layout, dtype, seed,
            rank and world size; ``prefetch`` batches per worker (default 2).
        shuffle_buffer: samples each reader shuffles through (1: no shuffle beyond the shards'
            order; the writer shuffled the samples before writing them).
        max_bad_fraction: stop with :class:`BadShardData` once more bad samples than this share
            of this rank's epoch were met.
        skip_log: file the bad samples are appended to (one ``shard \\t key \\t reason`` line each);
            None: not written.
        record_keys: keep ``"<shard url>#<key>"`` of every delivered sample in ``keys`` (tests, tracing).

    Attributes:
        num_samples: images this rank reads per epoch (``len(self) * batch_size``).
        bad: bad samples met in the current epoch (sum of their counts).
        keys: with ``record_keys``, the keys delivered since the last ``set_epoch``.

    Raises:
        pipeline.sources.shards.ShardPlanError: fewer shards than ranks × readers, or no batch per
            rank (before any shard is opened).
        ValueError: ``max_bad_fraction`` outside [0, 1]; ``shuffle_buffer < 1``.
        BadShardData: (while iterating) too many bad samples.
    """

    name = "torch"

    def __init__(self, source: ShardSource, aug: AugmentConfig, feed: Feed, shuffle_buffer: int = 1000,
                 max_bad_fraction: float = 0.01, skip_log: str | Path | None = None, record_keys: bool = False):
        super().__init__(source, aug, feed)
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 sample, got {shuffle_buffer}")
        readers = max(1, feed.workers)
        source.plan(self.seed, 0, self.rank, self.world_size, readers, self.batch_size)  # refuses bad splits now
        self._len = check_batch_size(self.batch_size, source.batches_per_rank(self.batch_size, self.world_size)
                                     * self.batch_size, f"rank {self.rank}'s part of {source}")
        self.num_samples = self._len * self.batch_size
        self.bad_log = BadSampleLog(max_bad_fraction, skip_log, self.num_samples, self.rank)
        self.skip_log, self.record_keys = skip_log, record_keys
        self.keys = []
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()
        workers = feed.workers
        self.loader = DataLoader(
            ShardStream(source, aug, self.batch_size, self.seed, self.rank, self.world_size, shuffle_buffer,
                        self._state, record_keys),
            batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=feed.prefetch_or(2) if workers > 0 else None,
            worker_init_fn=ignore_stop_signals)  # a stop signal is the training process's (pipeline.workers)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch ``epoch`` and skip its first ``start`` batches (see the module's docstring).

        Raises:
            ValueError: ``start`` outside ``0..len(self)``.
        """
        super().set_epoch(epoch, start)
        self._state.copy_(torch.tensor([epoch, self.start]))
        self.bad_log.new_epoch(epoch)
        self.keys = []

    @property
    def bad(self) -> int:
        """Bad samples met in the current epoch."""
        return self.bad_log.count

    def __iter__(self):
        with stop_signals_deferred():  # the workers start here (first epoch): see pipeline.workers
            batches = iter(self.loader)
        try:
            for v1, v2, label, bad, keys in batches:
                self.bad_log.note(bad)
                if keys is not None:
                    self.keys.extend(keys)
                yield TwoViewBatch(to_training_layout(v1, self.device, self.channels_last, self.dtype),
                                   to_training_layout(v2, self.device, self.channels_last, self.dtype),
                                   label.to(self.device, non_blocking=True))
        except BadShardData as exc:  # from a worker, the DataLoader wraps its traceback into the message
            raise one_line(exc) from None
