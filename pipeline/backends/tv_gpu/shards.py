"""``--loader torchvision-gpu`` over tar shards: tar bytes straight into ``decode_jpeg`` on the
training device, with the torch shard loader's plan, order and bad-sample policy.

The host side is ``W = max(1, workers)`` reader threads, one per *reader* of the epoch's plan
(:meth:`pipeline.sources.shards.ShardSource.plan`, the readers the torch loader's ``W`` DataLoader
workers are): each takes its samples from :func:`pipeline.sources.tar_samples.reader_stream` (its
pieces or, resampled, its drawn shards, through the same seeded shuffle buffer), copies each
sample's bytes into a tensor (pinned on CUDA) and reads the JPEG header
(:func:`pipeline.backends.tv_gpu.loader.prepare`); on the CPU it also decodes there
(``decode_jpeg``, libjpeg-turbo, which releases the GIL). Batch ``p`` of the epoch is taken from
reader ``p mod W``, as the DataLoader's round-robin takes it: **the same samples in the same
batches as** ``--loader torch`` **with the same** ``-j`` (tested). The device side is the file
loader's: one ``decode_jpeg`` call per batch on CUDA (nvJPEG), ``roi_align`` crops, the colour
stage, draws seeded per ``(seed, epoch, rank, batch)``.

Bad samples are skipped and counted as the torch loader does
(:class:`~pipeline.backends.bad_samples.BadSampleLog`: ``skip_log``, ``max_bad_fraction``): a
sample without its image or ``.cls`` or a shard cut short (met by the reader), an image that neither
``decode_jpeg`` nor PIL decodes (on the CPU in the reader; on CUDA when the batch's decode fails,
each image is decoded alone, PIL is tried, and one that still fails is replaced by its reader's next
sample). PNG samples and JPEGs ``decode_jpeg`` does not read go to PIL (``cpu_decoded``).

Mid-epoch resume (``set_epoch(epoch, start)``): each reader drops the samples of its batches before
``start`` from its stream before decoding them, as the torch loader's workers do.
"""
from __future__ import annotations

import queue
import threading
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from ...augment import AugmentConfig
from ...feed import Feed
from ...sampling import check_batch_size
from ...sources.shards import ReaderPlan, ShardSource
from ...sources.tar_samples import BadSample, TarSample, reader_stream
from ..bad_samples import BadSampleLog
from ..base import Backend
from .loader import DEFAULT_MAX_PAD, TorchvisionGpuLoader, _File, _put, prepare

POLL_S = 0.05  # how often a blocked reader or batch thread looks whether it should stop


class _Reader(threading.Thread):
    """One reader of the plan in a thread: its samples, prepared (:func:`prepare`), into ``items`` in
    stream order, each run of bad samples as a list before the sample after it; an exception ends
    the stream. Stops when ``halt`` is set."""

    def __init__(self, loader: "TorchvisionGpuShardLoader", plan: ReaderPlan, epoch: int, halt: threading.Event):
        super().__init__(name=f"tv-gpu-shard-reader-{plan.reader}", daemon=True)
        self.loader, self.plan, self.epoch, self.halt = loader, plan, epoch, halt
        self.items: queue.Queue = queue.Queue(maxsize=(loader.prefetch + 1) * loader.batch_size)

    def run(self) -> None:
        lo, bad = self.loader, []
        stream = reader_stream(lo.source, self.plan, lo.seed, self.epoch, lo.rank, lo.shuffle_buffer, bad)
        try:
            for sample in islice(stream, self.plan.skip_batches * lo.batch_size, None):
                if bad:
                    if not _put(self.items, bad.copy(), self.halt):
                        return
                    bad.clear()
                try:
                    item = lo.prepare_sample(sample)
                except OSError as exc:  # neither decode_jpeg nor PIL decodes it
                    item = [] if sample.replay else [BadSample(sample.url, sample.key, f"cannot decode .{sample.ext}: "
                                                                                       f"{exc.__cause__ or exc}")]
                if not _put(self.items, item, self.halt):
                    return
        except BaseException as exc:  # handed to the batch thread, which raises it
            _put(self.items, exc, self.halt)
        finally:
            stream.close()

    def take(self) -> _File:
        """The reader's next usable sample; the bad ones before it are noted in the loader's log.

        Raises:
            BadShardData: too many bad samples (the log), or none usable (the reader).
            RuntimeError: the batch thread is told to stop while waiting.
        """
        while True:
            try:
                item = self.items.get(timeout=POLL_S)
            except queue.Empty:
                if self.halt.is_set():
                    raise RuntimeError("reader stopped") from None
                continue
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, list):
                self.loader.bad_log.note(item)
                continue
            return item


class TorchvisionGpuShardLoader(TorchvisionGpuLoader):
    """Two-view batches from tar shards, decoded and augmented on the training device by torchvision ops.

    Args:
        source: the shards (:class:`~pipeline.sources.shards.ShardSource`; resampled or not; any URL
            webdataset opens, ``pipe:`` included).
        aug: augmentation parameters (the SimSiam recipe).
        feed: as :class:`~pipeline.backends.tv_gpu.loader.TorchvisionGpuLoader`; ``workers`` reader
            threads = readers of the plan (0 is one reader).
        max_pad: as :class:`~pipeline.backends.tv_gpu.loader.TorchvisionGpuLoader`.
        shuffle_buffer, max_bad_fraction, skip_log, record_keys: as
            :class:`~pipeline.backends.torch.shards.TorchShardLoader`.

    Attributes:
        num_samples: images this rank reads per epoch (``len(self) * batch_size``).
        bad: bad samples met in the current epoch.
        keys: with ``record_keys``, ``"<shard>#<key>"`` of the samples delivered since ``set_epoch``.
        cpu_decoded: samples decoded by PIL so far (PNG, or JPEGs ``decode_jpeg`` does not read).

    Raises:
        pipeline.sources.shards.ShardPlanError: fewer shards than ranks × readers, or no batch per rank.
        ValueError: ``max_bad_fraction`` outside [0, 1]; ``shuffle_buffer < 1``.
        BadShardData: (while iterating) too many bad samples.
    """

    def __init__(self, source: ShardSource, aug: AugmentConfig, feed: Feed, max_pad: float = DEFAULT_MAX_PAD,
                 shuffle_buffer: int = 1000, max_bad_fraction: float = 0.01, skip_log: str | Path | None = None,
                 record_keys: bool = False):
        Backend.__init__(self, source, aug, feed)  # not the file loader's: no ImageList here
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 sample, got {shuffle_buffer}")
        self.readers = max(1, feed.workers)
        source.plan(self.seed, 0, self.rank, self.world_size, self.readers, self.batch_size)  # refuses bad splits now
        self._len = check_batch_size(self.batch_size, source.batches_per_rank(self.batch_size, self.world_size)
                                     * self.batch_size, f"rank {self.rank}'s part of {source}")
        self.num_samples = self._len * self.batch_size
        self._device_side(feed, max_pad)
        self._pool = None
        self.shuffle_buffer, self.skip_log, self.record_keys = shuffle_buffer, skip_log, record_keys
        self.bad_log = BadSampleLog(max_bad_fraction, skip_log, self.num_samples, self.rank)
        self.keys: list[str] = []

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch ``epoch`` and skip its first ``start`` batches (see the module's docstring).

        Raises:
            ValueError: ``start`` outside ``0..len(self)``.
        """
        super().set_epoch(epoch, start)
        self.bad_log.new_epoch(epoch)
        self.keys = []

    @property
    def bad(self) -> int:
        """Bad samples met in the current epoch."""
        return self.bad_log.count

    def prepare_sample(self, sample: TarSample) -> _File:
        """A sample's bytes as the file loader's reading threads leave a file (decoded on the CPU device).

        Raises:
            OSError: neither ``decode_jpeg`` nor PIL decodes it.
        """
        cuda = self.device.type == "cuda"
        data = np.frombuffer(sample.image, dtype=np.uint8)
        if cuda:
            tensor = torch.empty(len(data), dtype=torch.uint8, pin_memory=True)
            tensor.numpy()[:] = data
        else:
            tensor = torch.from_numpy(data.copy())
        f = prepare(f"{sample.url}#{sample.key}", tensor, cuda, not cuda, sample.image)
        f.label, f.origin = sample.label, sample
        return f

    def _host_batches(self, epoch: int, start: int, stop: threading.Event):
        """``(files, labels, reader)`` of batches ``start..len-1`` of ``epoch``: batch ``p`` from
        reader ``p mod W`` (see the module's docstring). Closing the generator stops the readers."""
        plans = self.source.plan(self.seed, epoch, self.rank, self.world_size, self.readers, self.batch_size, start)
        halt = threading.Event()
        readers = [_Reader(self, plan, epoch, halt) for plan in plans]
        for r in readers:
            r.start()
        try:
            for k in range(self._len - start):
                reader = readers[k % len(readers)]
                files = []
                while len(files) < self.batch_size:
                    if stop.is_set():
                        return
                    files.append(reader.take())
                yield files, [f.label for f in files], reader
        finally:
            halt.set()
            for r in readers:
                r.join(timeout=30)

    def _device_images(self, item) -> tuple[list[torch.Tensor], list[_File], list[int]]:
        """Decode a batch on the device. When the batch's ``decode_jpeg`` call fails (CUDA: the CPU
        readers decoded already), each image is decoded alone, then by PIL; one that still fails is
        counted and replaced by its reader's next sample."""
        files, _, reader = item
        images: list[torch.Tensor | None] = [None] * len(files)
        todo = [i for i, f in enumerate(files) if not f.decoded]
        if todo:
            try:
                for i, img in zip(todo, decode_jpeg([files[i].pixels for i in todo], mode=ImageReadMode.RGB,
                                                    device=self.device)):
                    images[i] = img
            except RuntimeError:  # one failed: find it (not the steady state)
                for i in todo:
                    images[i] = self._one_or_replace(files, i, reader)
        for i, f in enumerate(files):
            if images[i] is None:
                images[i] = f.pixels.to(self.device, non_blocking=True)
        if self.record_keys:
            self.keys.extend(f.path for f in files)
        return images, files, [f.label for f in files]  # type: ignore[return-value]

    def _one_or_replace(self, files: list[_File], i: int, reader: _Reader) -> torch.Tensor:
        while True:
            f = files[i]
            if f.decoded:
                return f.pixels.to(self.device, non_blocking=True)
            try:
                return self._decode_one(f)
            except OSError as exc:
                if not f.origin.replay:
                    self.bad_log.note([BadSample(f.origin.url, f.origin.key, f"cannot decode .{f.origin.ext}: "
                                                                             f"{exc.__cause__ or exc}")])
                files[i] = reader.take()
