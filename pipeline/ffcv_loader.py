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
``ToDevice('cuda')`` without a GPU is a driver error, so it is only added for CUDA devices;
``import ffcv`` and every FFCV epoch call ``torch.set_num_threads(num_workers)``, so the caller's
thread count is restored. FFCV compiles its pipeline with numba on the first batch of each
loader (40–50 s on this 2-core machine); the loader says so once.

Determinism: the sample order is FFCV's, a function of ``(seed, epoch)`` (``RANDOM``: numpy
``default_rng(seed + epoch)``; distributed: torch ``DistributedSampler(seed)``); the on-device
colour stage draws from a generator seeded with ``(seed, epoch, rank)``. FFCV's crop and flip use
numba's per-thread RNG, which FFCV does not seed: they are not reproducible across runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from .augment import AugmentConfig
from .batch import TwoViewBatch
from .device import to_training_layout
from .gpu_augment import GpuAugment
from .imagefolder import ImageList, scan_image_folder
from .sampling import check_batch_size, epoch_seed

ORDERS = ("random", "quasi_random", "sequential")


def import_ffcv():
    """Import ``ffcv`` and restore ``torch.get_num_threads()`` (FFCV sets it to 1 on import)."""
    n = torch.get_num_threads()
    import ffcv  # noqa: F401
    import ffcv.loader  # noqa: F401
    torch.set_num_threads(n)
    return ffcv


def default_beton_path(images: ImageList, write_options: dict, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the ``.beton`` of ``images`` is cached: ``<split>/../.ffcv/<split>-<n>-<key>.beton``.

    ``key`` (12 hex digits) hashes every file's path, label, size and mtime plus the write
    options, so a different subset, changed files or other options give another file. When the
    split's parent folder is not writable, or ``cache_dir`` is given, the file goes there instead
    (default fallback ``$XDG_CACHE_HOME/simsiam-fast/ffcv``).
    """
    from .ffcv_write import file_list_fingerprint

    key = hashlib.sha1((file_list_fingerprint(images) + json.dumps(write_options, sort_keys=True)).encode())
    root = Path(images.root)
    name = f"{root.name}-{len(images)}-{key.hexdigest()[:12]}.beton"
    if cache_dir is None:
        folder = root.parent / ".ffcv"
        if os.access(root.parent, os.W_OK):
            return folder / name
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "simsiam-fast" / "ffcv"
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


def _process_group(distributed: bool, rank: int, world_size: int) -> tuple[int, int]:
    if not distributed:
        if world_size != 1 or rank != 0:
            raise ValueError(f"FfcvLoader shards only with distributed=True (got rank {rank}, world size "
                             f"{world_size}); FFCV takes rank and world size from torch.distributed")
        return 0, 1
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FfcvLoader(distributed=True) needs an initialised torch.distributed process group "
                           "(launch with torchrun and call torch.distributed.init_process_group first); "
                           "for one process, use distributed=False")
    return dist.get_rank(), dist.get_world_size()


class FfcvLoader:
    """Two-view batches from an FFCV ``.beton`` (written on demand from an ImageFolder split).

    Args:
        data_dir: a ``.beton`` file, an ImageFolder split folder, or an :class:`ImageList`. A
            split is written once to :func:`default_beton_path` (with progress) and reused.
        aug: augmentation parameters (view size, crop, flip; the colour stage's parameters).
        batch_size: images per batch per rank (each image gives two views).
        device: training device; views, labels arrive there. CUDA adds FFCV's ``ToDevice``.
        workers: FFCV decoding threads (numba; < 1: all cores).
        channels_last: deliver views in ``torch.channels_last`` memory format.
        seed: order seed (FFCV) and colour-stage seed.
        rank, world_size: must be 0 and 1 unless ``distributed`` (then the process group's).
        dtype: dtype of the delivered views.
        prefetch: FFCV ``batches_ahead``.
        beton: explicit ``.beton`` path (overrides the cache path for a split / ImageList).
        order: ``random`` (default), ``quasi_random`` (data larger than RAM, with
            ``os_cache=False``; not under ``distributed``, libffcv/ffcv#92) or ``sequential``.
        os_cache: let the OS page cache hold the file (FFCV default); False: FFCV's own cache.
        distributed: shard with the global rank/world size of the torch.distributed group.
        cache_dir: folder for written ``.beton`` files (default next to the split).
        max_resolution, jpeg_quality, write_mode: writer options when a split must be written
            (see :func:`pipeline.ffcv_write.write_beton`).

    Attributes:
        batch_size, num_samples (images this rank reads per epoch), beton (path), images (the
        :class:`ImageList` when built from a split), colour (the :class:`GpuAugment` stage),
        colour_threads (torch threads the colour stage runs with on a CPU device, see
        :func:`colour_threads_for`; None on a GPU).

    Raises:
        ValueError: unknown ``order``; ``quasi_random`` with ``distributed``; sharding without
            ``distributed``; batch larger than the shard.
        RuntimeError: ``distributed=True`` without an initialised process group.
        pipeline.ffcv_write.BetonError: missing, truncated or wrongly-fielded ``.beton``.
    """

    def __init__(self, data_dir=None, aug: AugmentConfig | None = None, batch_size: int = 256,
                 device: torch.device | str = "cpu", workers: int = 2, channels_last: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32,
                 prefetch: int = 3, beton: str | os.PathLike | None = None, order: str = "random",
                 os_cache: bool = True, distributed: bool = False, cache_dir: str | os.PathLike | None = None,
                 max_resolution: int | None = None, jpeg_quality: int = 90, write_mode: str = "raw"):
        import_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        from .ffcv_write import check_beton, write_beton

        if order not in ORDERS:
            raise ValueError(f"order {order!r} is not one of {', '.join(ORDERS)}")
        if distributed and order == "quasi_random":
            raise ValueError("order='quasi_random' is not supported by FFCV under distributed training "
                             "(libffcv/ffcv#92); use order='random'")
        self.rank, self.world_size = _process_group(distributed, rank, world_size)
        self.aug = aug or AugmentConfig()
        self.device, self.channels_last, self.dtype = torch.device(device), channels_last, dtype
        self.batch_size, self.seed, self._epoch = batch_size, seed, 0
        self.images: ImageList | None = None

        if beton is None and isinstance(data_dir, (str, os.PathLike)) and str(data_dir).endswith(".beton"):
            beton = data_dir
        elif data_dir is not None and not (isinstance(data_dir, (str, os.PathLike)) and str(data_dir).endswith(".beton")):
            self.images = data_dir if isinstance(data_dir, ImageList) else scan_image_folder(data_dir)
        if beton is None and self.images is None:
            raise ValueError("FfcvLoader needs data_dir (a split folder, an ImageList or a .beton) or beton=")
        if self.images is not None:
            opts = {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "write_mode": write_mode}
            beton = Path(beton) if beton is not None else default_beton_path(self.images, opts, cache_dir)
            if not beton.exists():
                write_beton(self.images, beton, **opts)
        self.beton = Path(beton)
        reader = check_beton(self.beton)
        stored_labels = reader.metadata[f"f{reader.field_names.index('label')}"].tolist()
        if self.images is not None and stored_labels != self.images.labels:
            raise ValueError(f"{self.beton} holds {reader.num_samples} images whose labels differ from the "
                             f"{len(self.images)} of {self.images.root}; delete it or rewrite it with "
                             f"python -m pipeline.ffcv_write --overwrite")

        s = self.aug.size

        def view_ops() -> list:  # fresh instances per view: FFCV ops hold per-pipeline state
            ops = [RandomResizedCropRGBImageDecoder((s, s), scale=self.aug.crop_scale, ratio=self.aug.crop_ratio),
                   RandomHorizontalFlip(self.aug.flip_p), ToTensor()]
            if self.device.type == "cuda":
                ops.append(ToDevice(self.device, non_blocking=True))
            return ops + [ToTorchImage(channels_last=True)]

        threads = torch.get_num_threads()
        order_opt = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM,
                     "sequential": OrderOption.SEQUENTIAL}[order]
        self.loader = Loader(
            str(self.beton), batch_size=batch_size, num_workers=workers, os_cache=os_cache, order=order_opt,
            distributed=distributed, seed=seed, drop_last=True, batches_ahead=prefetch,
            pipelines={"image": view_ops(), "label": [IntDecoder(), ToTensor()],
                       "image2": PipelineSpec("image", transforms=view_ops())},
        )
        torch.set_num_threads(threads)
        self.num_samples = len(self.loader.first_traversal_order)
        self._len = check_batch_size(batch_size, self.num_samples, f"rank {self.rank}'s shard of {self.beton}")
        self.colour = GpuAugment(self.aug, flip=False, normalize=True)
        self.colour_threads = colour_threads_for(self.device, self.loader.num_workers)
        self._compiled = False

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order (FFCV ``next_epoch``) and colour draws; resume-safe."""
        self._epoch = epoch
        self.loader.next_epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        threads = torch.get_num_threads()
        epoch = self._epoch
        g = torch.Generator(device=self.device).manual_seed(epoch_seed(self.seed, epoch, self.rank))
        if not self._compiled:
            print(f"compiling FFCV pipeline ({self.beton.name}, numba: 20-50 s on the first batch, once per loader)...",
                  file=sys.stderr, flush=True)
            t0 = time.time()
        it = iter(self.loader)
        try:
            for image, label, image2 in it:
                torch.set_num_threads(threads)  # FFCV's epoch thread set it to num_workers
                if not self._compiled:
                    self._compiled = True
                    print(f"FFCV pipeline compiled in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
                views = []
                for v in (image, image2):
                    if self.colour_threads is not None:  # CPU: leave FFCV's decoding threads their cores
                        torch.set_num_threads(self.colour_threads)
                    v = self.colour(v.to(self.device, non_blocking=True), generator=g)  # new tensor: FFCV reuses its buffers
                    torch.set_num_threads(threads)
                    views.append(to_training_layout(v, self.device, self.channels_last, self.dtype))
                # labels: a host copy first (FFCV reuses its pinned buffer), then a non-blocking upload
                # from pageable memory, which CUDA stages at once without waiting for the device
                label = label.reshape(-1).to(torch.int64, copy=True).to(self.device, non_blocking=True)
                yield TwoViewBatch(views[0], views[1], label)
        finally:
            it.close()
            torch.set_num_threads(threads)
            self._epoch = epoch + 1
