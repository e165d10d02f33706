"""FFCV loader: two SimSiam views of one stored ``image`` field, in one ``ffcv.loader.Loader``.

Per view, FFCV decodes the stored image with ``RandomResizedCropRGBImageDecoder`` (area
``aug.crop_scale``, aspect ``aug.crop_ratio``: FFCV's decoder implements torchvision's 10-try
RandomResizedCrop) and flips it (``RandomHorizontalFlip(aug.flip_p)``), then hands a uint8 batch
to torch (``ToTensor`` → [``ToDevice`` on CUDA] → ``ToTorchImage``). The second view is a
``PipelineSpec('image', transforms=...)`` with fresh op instances, so FFCV decodes the JPEG again
with its own crop and flip; batches come out as ``(image, label, image2)`` (libffcv/ffcv#77 asks
for this; it works in 1.0.2). Colour jitter, grayscale, blur and normalisation then run batched
on the training device (:class:`pipeline.gpu_augment.GpuAugment`).

On a GPU (FFCV docs, "Making an FFCV dataloader" and its ImageNet example): FFCV decodes into
page-locked (pinned) host buffers it allocates per batch slot, and ``ToDevice(device,
non_blocking=True)`` copies each view's uint8 batch to the GPU on a CUDA stream of FFCV's own; the
iterator makes the training stream wait for that copy (an event, no host synchronisation). Only
uint8 crosses the bus (a quarter of float32); the colour stage, normalisation and the float cast
run on the GPU, and allocate new tensors, so FFCV may reuse its buffers for the next batches.

Pitfalls this module avoids (see ``shared/DESIGN.md``): ``NormalizeImage`` after ``ToTensor``
makes ``Loader()`` loop forever on CPU (libffcv/ffcv#396), so FFCV never normalises here;
``ToDevice('cuda')`` without a GPU is a driver error, so it is only added for CUDA devices; FFCV
changes the caller's torch thread count on import and every epoch, and corrupts numba's type
registry, both undone by :mod:`pipeline.backends.ffcv.runtime`. FFCV compiles its pipeline with numba on
the first batch of each loader (20–50 s on this 2-core machine); the loader says so once.

Order and shards: the sample order is ours, not FFCV's: a traversal order handed to FFCV's
``Loader`` reads exactly :func:`pipeline.sampling.shard_order` ``(n, seed, epoch, rank,
world_size)`` each epoch, the indices and order of the torch and DALI loaders (``sequential``:
the same shards unshuffled). ``rank`` / ``world_size`` are plain integers; no process group is
needed, and shards are disjoint and equal (FFCV's own ``distributed=True`` pads them with
``DistributedSampler(drop_last=False)``, so an image can be on two ranks). ``quasi_random`` is
FFCV's page-wise shuffle (for data larger than RAM with ``os_cache=False``): an order of its own,
a function of ``(seed, epoch)`` here, for one process only.

Determinism and resume: ``set_epoch(epoch, start)`` reads batches ``start..len-1`` of that
epoch's order, and the on-device colour stage draws each batch's parameters from a generator
reseeded (on the host, no GPU sync) with ``epoch_seed(seed, epoch, rank, batch index)``, so a
resumed epoch gets the same images in the same order with the same colour draws, and ranks draw
differently. FFCV's crop and flip use numba's per-thread RNG, which FFCV does not seed: they are
not reproducible across runs.

Iteration ends cleanly however it ends: breaking out of the loop stops FFCV's epoch thread and
releases its batch buffers (FFCV's thread would otherwise wait forever to put its end-of-epoch
marker into a full queue: one thread and its buffers lost per early break).
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ...augment import AugmentConfig
from ...batch import TwoViewBatch
from ...device import to_training_layout
from ...feed import Feed
from ...gpu_augment import GpuAugment
from ...sampling import check_batch_size, epoch_seed, shard_order, shard_size
from ...sources.imagefolder import ImageList, cache_unwritable
from ...sources.imagefolder import cache_dir as project_cache_dir
from ..base import Backend, image_list
from .runtime import import_ffcv, torch_threads_kept

ORDERS = ("random", "quasi_random", "sequential")


def default_beton_path(images: ImageList, write_options: dict, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the ``.beton`` of ``images`` is cached: ``<split>/../.ffcv/<split>-<n>-<key>.beton``.

    ``key`` (12 hex digits) hashes every file's path, label, size and mtime plus the write
    options, so a different subset, changed files or other options give another file. When the
    split's parent folder is not writable, or ``cache_dir`` is given, the file goes there instead
    (default fallback ``$XDG_CACHE_HOME/simsiam-fast/ffcv``).
    """
    from .write import file_list_fingerprint

    key = hashlib.sha1((file_list_fingerprint(images) + json.dumps(write_options, sort_keys=True)).encode())
    root = Path(images.root)
    name = f"{root.name}-{len(images)}-{key.hexdigest()[:12]}.beton"
    if cache_dir is None:
        folder = root.parent / ".ffcv"
        if os.access(root.parent, os.W_OK):
            return folder / name
        cache_dir = project_cache_dir() / "ffcv"
    return Path(cache_dir) / name


def colour_threads_for(device: torch.device, ffcv_workers: int) -> int | None:
    """Torch threads for the colour stage on a CPU device: the cores FFCV's decoding threads leave
    free, at least 1 (None on a GPU: the stage runs there). FFCV decodes the next batches while the
    colour stage runs; with both at full width the cores are oversubscribed, and OpenMP's waiting
    threads then spin: measured here, the colour stage of a 64-image 224 px batch took 2.7x longer
    with 2 threads than with 1 on 2 busy cores (24.4 vs 9.1 ms wall a view)."""
    if device.type != "cpu":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores - max(1, ffcv_workers)))


def _shard_traversal(loader: "FfcvLoader"):
    """An FFCV traversal order (``ffcv.traversal_order.base.TraversalOrder``) whose epoch order
    is ``loader.epoch_order(epoch, loader.start)``.

    FFCV 1.0.2's ``Loader`` accepts a custom order only as an *instance* it then calls with itself
    (``isinstance(order, TraversalOrder)`` → ``order(self)``), so the instance is callable.
    """
    from ffcv.traversal_order.base import TraversalOrder

    class ShardTraversal(TraversalOrder):
        def __init__(self):  # TraversalOrder.__init__ needs FFCV's Loader: see __call__
            pass

        def __call__(self, ffcv_loader):
            super().__init__(ffcv_loader)
            loader._ffcv_attached(ffcv_loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return loader.epoch_order(epoch, loader.start)

    return ShardTraversal()


def _stop(it) -> None:
    """Stop an FFCV ``EpochIterator`` thread and release its buffers, wherever it is.

    Its thread puts batches with a timeout and checks ``terminate_event`` between tries, but puts
    its end-of-epoch marker with a plain blocking ``put``: after an early break with a full queue it
    would wait forever. Setting the event and draining the queue until the thread ends covers both.
    """
    it.terminate_event.set()
    while it.is_alive():
        try:
            it.output_queue.get(timeout=0.05)
        except queue.Empty:
            pass
    it.join()
    it.close()


class FfcvLoader(Backend):
    """Two-view batches from an FFCV ``.beton`` (written on demand from an ImageFolder split).

    Args:
        source: an ImageFolder split (:class:`ImageList`; written once to
            :func:`default_beton_path` with progress, then reused) or the path of a ``.beton``.
        aug: augmentation parameters (view size, crop, flip; the colour stage's parameters).
        feed: batch size per rank; training ``device`` (views and labels arrive there; CUDA adds
            FFCV's ``ToDevice``); ``workers`` FFCV decoding threads (numba; < 1: all cores);
            layout; dtype; seed of the order and the colour stage; rank and world size (this
            process's shard, see :mod:`pipeline.sampling`; plain integers, e.g. torchrun's RANK and
            WORLD_SIZE); ``prefetch``, FFCV's ``batches_ahead`` (default 3).
        beton: explicit ``.beton`` path (overrides the cache path for a split / ImageList).
        order: ``random`` (default: :func:`~pipeline.sampling.shard_order`, as every loader),
            ``sequential`` (the same shards in file order) or ``quasi_random`` (FFCV's page-wise
            shuffle for data larger than RAM, with ``os_cache=False``; one process only).
        os_cache: let the OS page cache hold the file (FFCV default); False: FFCV's own cache.
        cache_dir: folder for written ``.beton`` files (default next to the split).
        max_resolution, jpeg_quality, write_mode: writer options when a split must be written
            (see :func:`pipeline.backends.ffcv.write.write_beton`).

    Attributes:
        batch_size, num_samples (images this rank reads per epoch), beton (path), images (the
        :class:`ImageList` when built from a split), colour (the :class:`GpuAugment` stage),
        rank, world_size, epoch, start (see :meth:`set_epoch`), colour_threads (torch threads the
        colour stage runs with on a CPU device, see :func:`colour_threads_for`; None on a GPU).

    Raises:
        ValueError: unknown ``order``; ``quasi_random`` with ``world_size > 1``; bad rank /
            world size; batch larger than the shard (all before anything is compiled).
        pipeline.backends.ffcv.write.BetonError: missing, truncated or wrongly-fielded ``.beton``.
        OSError: the ``.beton`` could not be written (one line naming it; where this loader chose
            the place, :func:`pipeline.sources.imagefolder.cache_unwritable`'s line with the way out).
        pipeline.workers.StopSignal: SIGTERM / SIGINT while the ``.beton`` was written.
    """

    name = "ffcv"

    def __init__(self, source, aug: AugmentConfig, feed: Feed, beton: str | os.PathLike | None = None,
                 order: str = "random", os_cache: bool = True, cache_dir: str | os.PathLike | None = None,
                 max_resolution: int | None = None, jpeg_quality: int = 90, write_mode: str = "raw"):
        import_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        from .write import check_beton, write_beton

        if order not in ORDERS:
            raise ValueError(f"order {order!r} is not one of {', '.join(ORDERS)}")
        if feed.world_size > 1 and order == "quasi_random":
            raise ValueError("order='quasi_random' is FFCV's own order for one process; with world size "
                             f"{feed.world_size} use order='random' (the shared sharded order)")
        is_beton = isinstance(source, (str, os.PathLike)) and str(source).endswith(".beton")
        super().__init__(source if is_beton else image_list(source, self.name), aug, feed)
        self.order = order
        self.images: ImageList | None = None if is_beton else self.source
        if is_beton and beton is None:
            beton = source
        if self.images is not None:
            opts = {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "write_mode": write_mode}
            chosen = beton is None  # where the .beton is cached: a choice of ours, not the caller's
            beton = Path(beton) if beton is not None else default_beton_path(self.images, opts, cache_dir)
            if not beton.exists():
                try:
                    write_beton(self.images, beton, **opts)
                except OSError as exc:
                    if not chosen:
                        raise
                    raise cache_unwritable("ffcv", f"a .beton of {self.images.root}", beton.parent, exc,
                                           ", or give --ffcv-beton PATH (a .beton to read, or where to write "
                                           "one)") from exc
        self.beton = Path(beton)
        reader = check_beton(self.beton)
        stored_labels = reader.metadata[f"f{reader.field_names.index('label')}"].tolist()
        if self.images is not None and stored_labels != self.images.labels:
            raise ValueError(f"{self.beton} holds {reader.num_samples} images whose labels differ from the "
                             f"{len(self.images)} of {self.images.root}; delete it or rewrite it with "
                             f"python -m pipeline.backends.ffcv.write --overwrite")
        self.num_stored = reader.num_samples
        self.num_samples = shard_size(self.num_stored, self.rank, self.world_size)
        self._len = check_batch_size(self.batch_size, self.num_samples, f"rank {self.rank}'s shard of {self.beton}")
        batch_size, workers, seed = self.batch_size, feed.workers, self.seed

        s = self.aug.size

        def view_ops() -> list:  # fresh instances per view: FFCV ops hold per-pipeline state
            ops = [RandomResizedCropRGBImageDecoder((s, s), scale=self.aug.crop_scale, ratio=self.aug.crop_ratio),
                   RandomHorizontalFlip(self.aug.flip_p), ToTensor()]
            if self.device.type == "cuda":
                ops.append(ToDevice(self.device, non_blocking=True))
            return ops + [ToTorchImage(channels_last=True)]

        self._quasi = None
        with torch_threads_kept():
            self.loader = Loader(
                str(self.beton), batch_size=batch_size, num_workers=workers, os_cache=os_cache,
                order=_shard_traversal(self), seed=seed, drop_last=True, batches_ahead=feed.prefetch_or(3),
                pipelines={"image": view_ops(), "label": [IntDecoder(), ToTensor()],
                           "image2": PipelineSpec("image", transforms=view_ops())},
            )
        self.colour = GpuAugment(self.aug, flip=False, normalize=True)
        self.colour_threads = colour_threads_for(self.device, self.loader.num_workers)
        self._compiled = False

    def _ffcv_attached(self, ffcv_loader) -> None:
        """Called by the traversal order once FFCV's ``Loader`` exists (before its first order)."""
        if self.order == "quasi_random":
            from ffcv.traversal_order import QuasiRandom

            self._quasi = QuasiRandom(ffcv_loader)

    def epoch_order(self, epoch: int, start: int = 0) -> np.ndarray:
        """Indices into the ``.beton`` of batches ``start..len(self)-1`` of ``epoch`` on this rank:
        ``(len(self) - start) * batch_size`` of them, uint64 as FFCV's own orders.

        ``random`` / ``sequential``: :func:`pipeline.sampling.shard_order` (shuffled / not).
        ``quasi_random``: FFCV's ``QuasiRandom`` order, from a pristine copy of its page table
        each time (FFCV shuffles that table in place, which makes an epoch's order depend on the
        epochs drawn before it), so it too is a function of ``(seed, epoch)``.
        """
        if self._quasi is not None:
            pristine = self._quasi.page_to_samples_array
            self._quasi.page_to_samples_array = pristine.copy()
            try:
                ids = np.asarray(self._quasi.sample_order(epoch))
            finally:
                self._quasi.page_to_samples_array = pristine
        else:
            ids = np.asarray(shard_order(self.num_stored, self.seed, epoch, self.rank, self.world_size,
                                         shuffle=self.order == "random"), dtype=np.int64)
        return ids[start * self.batch_size:self._len * self.batch_size].astype(np.uint64)

    def __iter__(self):
        epoch, start = self.epoch, self.start
        if start == self._len:  # resumed after the epoch's last batch
            return
        g = torch.Generator(device=self.device)
        if not self._compiled:
            print(f"compiling FFCV pipeline ({self.beton.name}, numba: 20-50 s on the first batch, once per loader)...",
                  file=sys.stderr, flush=True)
            t0 = time.time()
        with torch_threads_kept() as threads:
            self.loader.next_epoch = epoch
            it = iter(self.loader)
        try:
            for index, (image, label, image2) in enumerate(it, start):
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)  # FFCV's epoch thread set it to num_workers
                if not self._compiled:
                    self._compiled = True
                    print(f"FFCV pipeline compiled in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
                g.manual_seed(epoch_seed(self.seed, epoch, self.rank, index))  # host-side: no GPU sync
                if self.colour_threads is not None:  # CPU: leave FFCV's decoding threads their cores
                    torch.set_num_threads(self.colour_threads)
                # the colour stage returns new tensors: FFCV reuses its buffers
                views = [self.colour(v.to(self.device, non_blocking=True), generator=g) for v in (image, image2)]
                if self.colour_threads is not None:
                    torch.set_num_threads(threads)
                views = [to_training_layout(v, self.device, self.channels_last, self.dtype) for v in views]
                # labels: a host copy first (FFCV reuses its pinned buffer), then a non-blocking upload
                # from pageable memory, which CUDA stages at once without waiting for the device
                label = label.reshape(-1).to(torch.int64, copy=True).to(self.device, non_blocking=True)
                yield TwoViewBatch(views[0], views[1], label)
        finally:
            _stop(it)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
