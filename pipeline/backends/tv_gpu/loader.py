"""``--loader torchvision-gpu``: decode and augment on the training device with torchvision alone.

Per batch (one background thread, on its own CUDA stream on a GPU):

1. **read** — ``workers`` threads read the files' bytes (into pinned memory on CUDA) and parse
   each JPEG header on the host (:mod:`pipeline.backends.tv_gpu.jpeg_header`: format, components, EXIF
   orientation). Files ``decode_jpeg`` cannot decode to RGB on every device (PNG, GIF, BMP, WebP,
   CMYK / 12-bit / lossless / arithmetic JPEGs) are decoded there by PIL
   (:func:`pipeline.sources.imagefolder.load_rgb`, the torch loader's decoder) and counted in
   ``cpu_decoded``: a fallback, not a skip, so every file the shared scan accepts is delivered.
2. **decode** once per image with ``torchvision.io.decode_jpeg``: on CUDA one call for the batch's
   list (nvJPEG; the hardware decoder where the GPU has one); on the CPU the reading threads call
   it per file (libjpeg-turbo; it releases the GIL, so decode runs on ``workers`` threads).
3. **two views** — RandomResizedCrop boxes for both views drawn on the host with torchvision's
   rule (:mod:`pipeline.backends.tv_gpu.crop_boxes`), mapped through each photo's EXIF orientation, then cropped
   and resized by ``roi_align`` over size-grouped canvases (:mod:`pipeline.backends.tv_gpu.roi_crop`); the
   orientation's transpose / flips applied to the square crops by mask.
4. **colour stage** on both views at once (:class:`pipeline.gpu_augment.GpuAugment`: jitter,
   grey, blur, flip, normalise; masks, no host reads), then dtype and channels_last.

Everything random is a function of ``(seed, epoch, rank, batch index)``: boxes from a numpy
generator and colour draws from a device generator, both reseeded per batch with
:func:`pipeline.sampling.epoch_seed`; the order is :func:`pipeline.sampling.shard_order`'s. So
``set_epoch(e, start=k)`` replays batches ``k..`` of epoch ``e`` exactly, and ranks draw different
augmentations. The steady state reads nothing back from the device: image sizes are tensor
metadata, and boxes, canvas layout and labels go to the device as non-blocking copies.

``torchvision.io.decode_jpeg`` is marked deprecated in torchvision 0.29 (in favour of TorchCodec);
it is the decoder named by the issue and available on every torchvision this project supports.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from ...augment import AugmentConfig
from ...batch import TwoViewBatch
from ...device import to_training_layout
from ...feed import Feed
from ...gpu_augment import GpuAugment
from ...sampling import check_batch_size, epoch_seed
from ...sources.imagefolder import decode_rgb, load_rgb
from ..base import Backend, image_list
from .crop_boxes import ORIENTATION_FLAGS, random_resized_crop_boxes, shown_size, to_stored_frame
from .jpeg_header import read_jpeg_header
from .roi_crop import crop_resize, to_device_async

DEFAULT_MAX_PAD = 1.0  # canvases at most 2x their pixels: see the README (--loader torchvision-gpu) for why


@dataclass
class _File:
    """One image after the reading thread: encoded JPEG bytes, or an already decoded image."""

    path: str  # the file; for a shard sample "<shard>#<key>" (messages only)
    pixels: torch.Tensor  # (N,) uint8 encoded bytes, or (3, H, W) uint8 decoded
    decoded: bool
    orientation: int = 1  # EXIF orientation still to apply (1 for PIL decodes: load_rgb's business)
    by_pil: bool = False
    encoded: bytes | None = None  # a shard sample's bytes, for PIL (a file is read again from its path)
    label: int = -1  # a shard sample's class (a file's is in the ImageList)
    origin: object = None  # a shard sample's TarSample


def _pil_decode(path: str, pin: bool, encoded: bytes | None = None) -> torch.Tensor:
    """``(3, H, W)`` uint8 from PIL (the torch loader's decoder), from ``encoded`` when given, else the file.

    Raises:
        OSError: PIL cannot decode the image (a file that changed after the shared scan, a bad
            shard sample), naming it.
    """
    try:
        rgb = np.array(load_rgb(path) if encoded is None else decode_rgb(encoded))
    except Exception as exc:  # PIL raises many types for a bad file
        why = "" if encoded is not None else " (it decoded when the folder was scanned; changed since?)"
        raise OSError(f"cannot decode {path}{why}: {type(exc).__name__}: {exc}") from exc
    img = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    return img.pin_memory() if pin else img


def prepare(path: str, data: torch.Tensor, pin: bool, decode_here: bool, encoded: bytes | None = None) -> _File:
    """Route one encoded image (``data``: ``(N,)`` uint8, pinned on CUDA) by its header: JPEGs
    ``decode_jpeg`` reads stay encoded for the device (or are decoded here when ``decode_here``,
    the CPU device); the rest go to PIL (:func:`_pil_decode`, from ``encoded`` or the file).

    Raises:
        OSError: PIL cannot decode what was given to it.
    """
    header = read_jpeg_header(memoryview(data.numpy()))
    if header is None or not header.fast:
        return _File(path, _pil_decode(path, pin, encoded), True, by_pil=True, encoded=encoded)
    if decode_here:
        try:
            return _File(path, decode_jpeg(data, mode=ImageReadMode.RGB), True, header.orientation, encoded=encoded)
        except RuntimeError:  # libjpeg-turbo refused what PIL accepted in the scan
            return _File(path, _pil_decode(path, pin, encoded), True, by_pil=True, encoded=encoded)
    return _File(path, data, False, header.orientation, encoded=encoded)


def _read(path: str, pin: bool, decode_here: bool) -> _File:
    """Read one file; decode it too when ``decode_here`` (CPU device) or when it is not for nvJPEG."""
    with open(path, "rb") as f:
        data = torch.empty(os.fstat(f.fileno()).st_size, dtype=torch.uint8, pin_memory=pin)
        f.readinto(memoryview(data.numpy()))
    return prepare(path, data, pin, decode_here)


class TorchvisionGpuLoader(Backend):
    """Two-view batches decoded and augmented on the training device by torchvision ops.

    Args:
        source: an ImageFolder split (:class:`~pipeline.sources.imagefolder.ImageList`).
        aug: augmentation parameters (the SimSiam recipe).
        feed: batch size per rank; training ``device`` (batches are built there; CUDA: nvJPEG
            decode, own stream); ``workers`` reading threads (on the CPU they also decode; 0
            reads in the batch thread); layout; dtype; seed, rank and world size (order, shards
            and augmentation draws, :mod:`pipeline.sampling`); ``prefetch`` batches prepared
            ahead of the consumer, and batches of files read ahead (default 2).
        max_pad: padding a ``roi_align`` canvas may add, as a fraction of its images' pixels
            (:func:`pipeline.backends.tv_gpu.roi_crop.plan_groups`; 0 groups equal sizes only).

    Attributes:
        batch_size, num_samples (this rank's images per epoch), images (:class:`ImageList`),
        cpu_decoded (files decoded by PIL so far: not JPEG, or a JPEG torchvision refused).

    Raises:
        ValueError: batch size larger than this rank's shard; a source that is not a split.
    """

    name = "torchvision-gpu"

    def __init__(self, source, aug: AugmentConfig, feed: Feed, max_pad: float = DEFAULT_MAX_PAD):
        super().__init__(image_list(source, self.name), aug, feed)
        self.images = self.source
        self.num_samples = len(self.images) // self.world_size
        self._len = check_batch_size(self.batch_size, self.num_samples, f"shard {self.rank} of {self.images.root}")
        self._device_side(feed, max_pad)
        workers = feed.workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tv-gpu-read") if workers else None

    def _device_side(self, feed: Feed, max_pad: float) -> None:
        """What any source shares: the device with its index, prefetch, canvases' padding, colour stage."""
        if self.device.type == "cuda" and self.device.index is None:  # the batch thread needs the index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch, self.max_pad = feed.prefetch_or(2), max_pad
        self.colour = GpuAugment(aug=self.aug, flip=True, normalize=True)
        self.cpu_decoded = 0

    # ------------------------------------------------------------------ host side

    def _submit(self, paths: list[str]):
        """Start reading ``paths``; returns a callable giving their :class:`_File` s in order."""
        pin, here = self.device.type == "cuda", self.device.type != "cuda"
        if self._pool is None:
            return lambda: [_read(p, pin, here) for p in paths]
        futures = [self._pool.submit(_read, p, pin, here) for p in paths]
        return lambda: [f.result() for f in futures]

    def _decode(self, files: list[_File]) -> list[torch.Tensor]:
        """``(3, H, W)`` uint8 images on the device, in batch order."""
        out: list[torch.Tensor | None] = [None] * len(files)
        todo = [i for i, f in enumerate(files) if not f.decoded]
        if todo:
            try:
                done = decode_jpeg([files[i].pixels for i in todo], mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # nvJPEG refused one: find it, give it to PIL (not the steady state)
                done = [self._decode_one(files[i]) for i in todo]
            for i, img in zip(todo, done):
                out[i] = img
        for i, f in enumerate(files):
            if f.decoded:
                out[i] = f.pixels.to(self.device, non_blocking=True)
        return out  # type: ignore[return-value]

    def _decode_one(self, f: _File) -> torch.Tensor:
        try:
            return decode_jpeg(f.pixels, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            f.by_pil, f.orientation = True, 1
            return _pil_decode(f.path, False, f.encoded).to(self.device)

    # ------------------------------------------------------------------ one batch

    def _device_images(self, item) -> tuple[list[torch.Tensor], list[_File], list[int]]:
        """One batch from :meth:`_host_batches` decoded on the device: ``(images, files, labels)``."""
        files, labels = item
        return self._decode(files), files, labels

    def _batch(self, epoch: int, index: int, images: list[torch.Tensor], files: list[_File], labels: list[int],
               generator: torch.Generator) -> TwoViewBatch:
        self.cpu_decoded += sum(f.by_pil for f in files)
        orient = np.array([f.orientation for f in files])
        shown = np.array([shown_size(int(im.shape[1]), int(im.shape[2]), o) for im, o in zip(images, orient)])
        rng = np.random.default_rng(epoch_seed(self.seed, epoch, self.rank, index))
        a = self.aug
        boxes = np.stack([to_stored_frame(random_resized_crop_boxes(shown[:, 0], shown[:, 1], a.crop_scale,
                                                                    a.crop_ratio, rng), shown[:, 0], shown[:, 1], orient)
                          for _ in range(2)])
        crops = crop_resize(images, boxes, a.size, self.max_pad)  # (2B, 3, S, S), 0-255
        if (orient != 1).any():
            crops = self._orient(crops, np.concatenate([orient, orient]))
        generator.manual_seed(epoch_seed(self.seed, epoch, self.rank, index))
        views = self.colour.apply(crops.div_(255), self.colour.sample_params(len(crops), self.device, generator))
        views = to_training_layout(views, self.device, self.channels_last, self.dtype)
        n = len(files)
        label = to_device_async(np.asarray(labels, np.int64), self.device)
        return TwoViewBatch(views[:n], views[n:], label)

    def _orient(self, crops: torch.Tensor, orientation: np.ndarray) -> torch.Tensor:
        """Apply each crop's EXIF transpose / flips (masks; crops are square)."""
        flags = to_device_async(ORIENTATION_FLAGS[orientation].T.copy(), self.device)  # (3, n) bool
        t, fx, fy = (f.view(-1, 1, 1, 1) for f in flags)
        crops = torch.where(t, crops.transpose(-1, -2), crops)
        crops = torch.where(fx, crops.flip(-1), crops)
        return torch.where(fy, crops.flip(-2), crops)

    # ------------------------------------------------------------------ iteration

    def _host_batches(self, epoch: int, start: int, stop: threading.Event):
        """``(files, labels)`` of batches ``start..len-1`` of ``epoch``, read ``prefetch + 1`` batches
        ahead by the reading threads (runs in the batch thread; ``stop``: the consumer has gone)."""
        order = self.images.epoch_indices(self.seed, epoch, self.rank, self.world_size)
        samples, b = self.images.samples, self.batch_size
        batches = [order[k * b:(k + 1) * b] for k in range(start, self._len)]
        pending = []
        for k, idx in enumerate(batches):
            while len(pending) < min(self.prefetch + 1, len(batches) - k):
                pending.append(self._submit([samples[i][0] for i in batches[k + len(pending)]]))
            yield pending.pop(0)(), [samples[i][1] for i in idx]

    def __iter__(self):
        epoch, start = self.epoch, self.start
        count = self._len - start
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def produce() -> None:
            host = None
            try:
                if cuda:
                    torch.cuda.set_device(self.device.index)  # this thread's current device: the training GPU
                generator = torch.Generator(device=self.device)
                host = self._host_batches(epoch, start, stop)
                for k in range(count):
                    item = next(host)
                    with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                        images, files, labels = self._device_images(item)
                        batch = self._batch(epoch, start + k, images, files, labels, generator)
                        event = torch.cuda.Event() if cuda else None
                        if cuda:
                            event.record(stream)
                    if not _put(ready, (batch, event), stop):
                        return
            except BaseException as exc:  # handed to the consumer, which raises it
                _put(ready, exc, stop)
            finally:
                if host is not None:
                    host.close()  # stops what the host side started (the shard readers)

        worker = threading.Thread(target=produce, name="tv-gpu-batches", daemon=True)
        worker.start()
        try:
            for _ in range(count):
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if cuda:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in batch:
                        t.record_stream(current)
                yield batch
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            worker.join()

    def __del__(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; True when it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False

