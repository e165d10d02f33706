"""ImageFolder split → FFCV ``.beton`` (``RGBImageField`` image + ``IntField`` label).

Command line (one command per split)::

    python -m pipeline.backends.ffcv.write data/fashion-mnist/train data/fashion-mnist/train.beton
    python -m pipeline.backends.ffcv.write IMAGENET/train train.beton --max-resolution 256 --write-mode jpg --jpeg-quality 90

The images are the split's :class:`~pipeline.sources.imagefolder.ImageList`, so labels and the bad-file
policy are the torch loader's: files PIL cannot decode (corrupt, truncated, not an image) are
skipped, counted and named by :func:`~pipeline.sources.imagefolder.scan_image_folder`; every image is
decoded as the torch loader decodes it (:func:`~pipeline.sources.imagefolder.load_rgb`'s rules): upright
by its EXIF orientation, grey, palette, CMYK and RGBA converted to 8-bit RGB (alpha dropped),
16-bit scaled. Every sample reaches FFCV as a ``(H, W, 3)`` uint8 array: FFCV's encoder raises
inside its worker process on a 2-D grey array, and its writer then waits forever.

What is stored: each image at full size, except that an image larger than
:data:`MAX_RGB_PIXELS` (about 2.8 Mpixel, e.g. 1665×1665: its raw RGB bytes must fit one 8 MiB
FFCV page) or longer than ``max_resolution`` is shrunk, aspect kept, to fit. The writer prints
how many were shrunk and the largest change, and the sidecar records both rules and the count.
The page is not raised instead: FFCV's crop decoder allocates, per batch slot, room for the
largest stored image (``RandomResizedCropRGBImageDecoder.declare_state_and_memory``), so one
huge image would cost ``batch size × its size`` of memory in every loader.

The write is idempotent and atomic: an existing output is refused unless ``overwrite=True``;
the file is written as ``<out>.tmp-<pid>`` and renamed into place only when complete, with a
``<out>.json`` sidecar (classes, count, fingerprint of the file list, write options) written
first, so an interrupted write leaves no ``.beton`` that a later run would load.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ...sources.imagefolder import ORIENTATION, ImageList, oriented, scan_image_folder, to_rgb
from ...workers import StopSignal, ignore_stop_signals, stop_signals_deferred, stop_signals_raise
from ...writes import WriteFailed, atomic_write_text, describe, fsync_path, remove_quietly, write_failed
from .runtime import import_ffcv, torch_threads_kept

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
"""FFCV ``RGBImageField`` write modes (docs.ffcv.io, "Writing a dataset"): ``raw`` stores pixels,
``jpg`` re-encodes as JPEG, ``smart`` stores JPEG only for images larger than ``smart_threshold``
bytes, ``proportion`` stores a random ``compress_probability`` share as JPEG."""

FORMAT_VERSION = 1


class BetonError(ValueError):
    """A ``.beton`` file that cannot be used: missing, truncated, or without the expected fields."""


# FFCV's DatasetWriter stores each sample inside one page (``page_size`` default 4 × 2 MiB,
# ffcv/writer.py); a larger raw image makes its worker raise and the writer wait forever. Images
# are therefore downscaled so that their raw RGB bytes fit with room to spare.
PAGE_BYTES = 4 * (1 << 21)
MAX_RGB_PIXELS = (PAGE_BYTES - (1 << 16)) // 3
"""Largest image stored at full size, in pixels (2,774,186: e.g. 1665×1665); larger ones are shrunk."""


def stored_size(width: int, height: int, max_resolution: int | None = None) -> tuple[int, int]:
    """``(width, height)`` an upright ``width × height`` image is stored at (see :data:`MAX_RGB_PIXELS`)."""
    scale = min(1.0, (MAX_RGB_PIXELS / (width * height)) ** 0.5)
    if max_resolution:
        scale = min(scale, max_resolution / max(width, height))
    if scale >= 1:
        return width, height
    return max(1, int(width * scale)), max(1, int(height * scale))


def _fit(im: Image.Image, max_resolution: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """Upright 8-bit RGB copy of ``im`` (:func:`~pipeline.sources.imagefolder.oriented`,
    :func:`~pipeline.sources.imagefolder.to_rgb`) at :func:`stored_size`, and ``im``'s upright size.

    JPEGs are decoded at a reduced DCT scale first (``Image.draft``), so a huge photo never
    materialises at full size; the final resize is PIL's antialiased ``reduce`` + bilinear.
    """
    full, target = im.size, stored_size(im.width, im.height, max_resolution)
    if target != im.size and im.format == "JPEG":
        im.draft("RGB", target)
    if im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):  # these orientations swap width and height
        full, target = full[::-1], target[::-1]
    im = to_rgb(oriented(im))
    if im.size != target:
        im = im.resize(target, Image.BILINEAR, reducing_gap=2.0)
    return im, full


class _RGBSamples:
    """Indexable ``(image (H, W, 3) uint8, label int)`` for FFCV's ``from_indexed_dataset``.

    Never raises inside FFCV's worker processes (that would hang the writer): a file that fails
    to decode now (changed since the scan) is written as a 1×1 black pixel and its index is put
    in ``failed``, a shared integer the parent checks before it renames the file into place.
    ``sizes`` (shared, ``(N, 4)`` int32 once read with :meth:`size_table`) receives each image's
    upright width and height and the width and height stored.
    """

    def __init__(self, images: ImageList, max_resolution: int | None):
        self.samples, self.max_resolution = images.samples, max_resolution
        self.failed = mp.Value("q", -1)
        self.sizes = mp.RawArray("i", 4 * len(self.samples))

    def size_table(self) -> np.ndarray:
        return np.frombuffer(self.sizes, dtype=np.int32).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                fitted, full = _fit(im, self.max_resolution)
            arr = np.asarray(fitted, dtype=np.uint8)
            if arr.ndim != 3 or arr.shape[2] != 3:  # convert('RGB') guarantees this; belt and braces
                raise ValueError(f"decoded to shape {arr.shape}")
            self.sizes[4 * index:4 * index + 4] = [*full, arr.shape[1], arr.shape[0]]
        except Exception:  # any failure must not escape into FFCV's worker
            self.failed.value = index
            arr = np.zeros((1, 1, 3), np.uint8)
        return np.ascontiguousarray(arr), int(label)


def _downscaled(images: ImageList, sizes: np.ndarray) -> dict:
    """The sidecar's record of shrunk images: their count and the five largest, largest first."""
    shrunk = np.flatnonzero((sizes[:, :2] != sizes[:, 2:]).any(1))
    largest = shrunk[np.argsort(-sizes[shrunk, 0].astype(np.int64) * sizes[shrunk, 1], kind="stable")[:5]]
    return {"count": int(len(shrunk)),
            "largest": [{"file": images.samples[i][0], "size": sizes[i, :2].tolist(), "stored": sizes[i, 2:].tolist()}
                        for i in largest]}


class _Failure:
    """What went wrong in a writer process, shared with the parent: an errno and one line."""

    def __init__(self):
        self.errno = mp.Value("i", 0)
        self.text = mp.Array("c", 400)

    def record(self, exc: BaseException) -> None:
        self.errno.value = getattr(exc, "errno", None) or 0 if isinstance(exc, OSError) else 0
        self.text.value = describe(exc).encode(errors="replace")[:399]

    def error(self, process) -> OSError:
        text = self.text.value.decode(errors="replace")
        if not text:
            code = process.exitcode
            text = (f"a writer process was killed by {signal_name(-code)}" if code and code < 0
                    else f"a writer process exited with status {code}")
        return OSError(self.errno.value or None, text)


def signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _writer_job(work_fn, failure: _Failure, *args) -> None:
    """One FFCV writer process: stop signals are the parent's (:mod:`pipeline.workers`), and a failure
    (a full disk while it writes its pages) is reported to the parent in one line, not a traceback."""
    ignore_stop_signals()
    try:
        work_fn(*args)
    except BaseException as exc:
        failure.record(exc)
        sys.stderr.flush()
        os._exit(1)


def _watched_writer(show_bar: bool):
    """FFCV 1.0.2's ``DatasetWriter`` whose ``_write_common`` watches its writer processes.

    FFCV's own waits until the processes have counted every sample: a process that dies (a full
    disk in its page write, the OOM killer) makes it wait forever, and the others spin waiting for
    the dead one's page turn. This copy of its logic (same queues, allocator, progress bar and
    ``finalize``; its tqdm bar only when ``show_bar``, so a log file gets lines, not refreshes) starts the processes through :func:`_writer_job`, collects their allocation
    lists as they arrive, and when one exits with an error kills all of them and raises its
    ``OSError``; a :class:`pipeline.workers.StopSignal` in the parent does the same. The metadata
    shared memory is released in every case.
    """
    import ctypes

    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    class WatchedWriter(DatasetWriter):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            try:
                self.prepare()
                work, allocations_queue = mp.Queue(), mp.Queue()
                for todo in queue_content:
                    work.put(todo)
                for _ in range(self.num_workers):
                    work.put(None)
                done = mp.Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                failure = _Failure()
                args = (work_fn, failure, work, self.metadata_sm, self.metadata_type, self.fields, allocator, done,
                        allocations_queue, *extra_worker_args)
                processes = [mp.Process(target=_writer_job, args=args) for _ in range(self.num_workers)]
                allocations, progress = [], None
                try:
                    with stop_signals_deferred():  # the children ignore stop signals from their first instant
                        for p in processes:
                            p.start()
                    progress, shown, received = tqdm(total=num_samples, disable=not show_bar), 0, 0
                    while received < len(processes):
                        try:
                            allocations.extend(allocations_queue.get(timeout=0.1))
                            received += 1
                        except queue.Empty:
                            pass
                        progress.update(done.value - shown)
                        shown = done.value
                        for p in processes:
                            if p.exitcode not in (None, 0):
                                raise failure.error(p)
                finally:
                    if progress is not None:
                        progress.close()
                    if received < len(processes):  # stopped early: nobody reads the queues any more
                        for p in processes:
                            if p.is_alive():
                                p.kill()  # SIGKILL: they ignore SIGTERM
                        for q in (work, allocations_queue):
                            q.cancel_join_thread()  # else exiting waits for their unread items to be sent
                    for p in processes:
                        if p.pid is not None:
                            p.join(timeout=30)
                self.finalize(allocations)
            finally:
                sm = getattr(self, "metadata_sm", None)
                if isinstance(sm, mp.shared_memory.SharedMemory):
                    sm.close()
                    sm.unlink()

    return WatchedWriter


def file_list_fingerprint(images: ImageList) -> str:
    """SHA-1 over every ``(path, label, size, mtime_ns)`` of ``images`` (hex, 40 characters)."""
    h = hashlib.sha1()
    for path, label in images.samples:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def sidecar_path(beton: str | os.PathLike) -> Path:
    """``<beton>.json``: what was written (classes, count, fingerprint, options)."""
    return Path(str(beton) + ".json")


def write_beton(images: ImageList | str | os.PathLike, out: str | os.PathLike, *,
                max_resolution: int | None = None, jpeg_quality: int = 90, write_mode: str = "raw",
                smart_threshold: int | None = None, compress_probability: float = 0.5,
                num_workers: int = -1, chunksize: int = 100, overwrite: bool = False,
                progress: bool = True) -> Path:
    """Write one ImageFolder split as an FFCV ``.beton``.

    Args:
        images: an :class:`ImageList` or a split folder (scanned with the project's bad-file policy).
        out: output path (``.beton``). Parent folders are created.
        max_resolution: longest image side stored, in pixels (None: full size, up to
            :data:`MAX_RGB_PIXELS` per image). FFCV's ImageNet example uses 256–512; the decoder
            crops from what is stored. Shrunk images are counted (printed, and in the sidecar).
        jpeg_quality: 0–100, used by the ``jpg``/``smart``/``proportion`` modes (FFCV default 90).
        write_mode: one of :data:`WRITE_MODES`.
        smart_threshold: bytes above which ``smart`` stores JPEG.
        compress_probability: share stored as JPEG by ``proportion``.
        num_workers: writer processes (-1: all cores).
        chunksize: samples per work item of a writer process.
        overwrite: replace an existing ``out``; otherwise it is refused.
        progress: report on stderr: a line before and after the write, and FFCV's tqdm bar
            when stderr is a terminal (in a log file the bar's refreshes are left out).

    Returns:
        ``Path(out)``.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        pipeline.writes.WriteFailed: (an ``OSError``) the file could not be written: a full disk,
            an I/O error, a writer process that died; one line names ``out`` and the cause, no
            temporary file is left and an existing ``out`` is untouched.
        pipeline.workers.StopSignal: SIGTERM / SIGINT arrived while writing; the writer processes
            (which ignore those signals) were killed and nothing is left at ``out``.
        ValueError: unknown ``write_mode``, ``jpeg_quality`` outside 0–100, ``max_resolution < 1``.
        ValueError: a file that decoded during the scan failed while writing (nothing is left
            at ``out``).
        FileNotFoundError, ValueError: from :func:`~pipeline.sources.imagefolder.scan_image_folder`.

    Leaves ``torch.get_num_threads()`` as it found it (see :mod:`pipeline.backends.ffcv.runtime`).
    """
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField

    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode {write_mode!r} is not one of {', '.join(WRITE_MODES)}")
    if not 0 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 0..100, got {jpeg_quality}")
    if max_resolution is not None and max_resolution < 1:
        raise ValueError(f"max_resolution must be >= 1 pixel, got {max_resolution}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not isinstance(images, ImageList):
        images = scan_image_folder(images)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    options = {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "write_mode": write_mode,
               "smart_threshold": smart_threshold, "compress_probability": compress_probability}
    if progress:
        print(f"writing {len(images)} images of {images.root} to {out} ({len(images.skipped)} undecodable "
              f"file(s) skipped; {write_mode}; longest side {max_resolution or 'as in the file'}, at most "
              f"{MAX_RGB_PIXELS / 1e6:.2f} Mpixel per image)", file=sys.stderr, flush=True)
    dataset = _RGBSamples(images, max_resolution)
    writer = _watched_writer(progress and sys.stderr.isatty())(str(tmp), {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                               smart_threshold=smart_threshold, compress_probability=compress_probability),
        "label": IntField(),
    }, num_workers=num_workers)
    t0 = time.time()
    try:
        with torch_threads_kept(), stop_signals_raise():  # a stop signal ends the write here, its helpers killed
            writer.from_indexed_dataset(dataset, chunksize=chunksize)
            fsync_path(tmp)
        if dataset.failed.value >= 0:
            bad = images.samples[dataset.failed.value][0]
            raise ValueError(f"{bad} no longer decodes (it changed after the scan); nothing written to {out}")
        downscaled = _downscaled(images, dataset.size_table())
        meta = {"version": FORMAT_VERSION, "root": images.root, "classes": images.classes,
                "num_samples": len(images), "labels_sha1": hashlib.sha1(np.asarray(images.labels, np.int64).tobytes()).hexdigest(),
                "fingerprint": file_list_fingerprint(images), "skipped": images.skipped, **options,
                "max_pixels": MAX_RGB_PIXELS, "downscaled": downscaled}
        atomic_write_text(sidecar_path(out), json.dumps(meta, indent=1), "FFCV sidecar")
        os.replace(tmp, out)
    except OSError as exc:
        written = tmp.stat().st_size if tmp.exists() else None
        remove_quietly(tmp)
        raise (exc if isinstance(exc, WriteFailed) else
               write_failed(out, exc, "FFCV file", kept=out if out.exists() else None, written=written)) from exc
    finally:
        remove_quietly(tmp)
    if progress:
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.1f} s",
              file=sys.stderr, flush=True)
        if downscaled["count"]:
            top = downscaled["largest"][0]
            print(f"stored {downscaled['count']} of {len(images)} image(s) smaller than in their files "
                  f"(longest side {max_resolution or 'unlimited'}, at most {MAX_RGB_PIXELS} pixels): largest "
                  f"{top['file']} {'x'.join(map(str, top['size']))} -> {'x'.join(map(str, top['stored']))}; "
                  f"listed in {sidecar_path(out)}", file=sys.stderr, flush=True)
    return out


def check_beton(path: str | os.PathLike, image_field: str = "image", label_field: str = "label"):
    """Open ``path`` with FFCV's ``Reader`` and check it is complete and has the expected fields.

    Returns:
        the ``ffcv.reader.Reader``.

    Raises:
        BetonError: missing file, not a ``.beton`` (bad header or version), truncated (the header
            or allocation table points past the end of the file), or ``image_field`` is not an
            ``RGBImageField`` / ``label_field`` not an ``IntField``.
    """
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise BetonError(f"FFCV file {path} does not exist; write it with python -m pipeline.backends.ffcv.write SPLIT {path}")
    size = path.stat().st_size
    try:
        reader = Reader(str(path))
    except Exception as exc:  # FFCV raises AssertionError/IndexError/ValueError on garbage
        raise BetonError(f"{path} is not a readable FFCV .beton ({type(exc).__name__}: {exc}); "
                         f"rewrite it with python -m pipeline.backends.ffcv.write --overwrite") from exc
    table = reader.alloc_table
    if (int(reader.header["alloc_table_ptr"]) > size or len(reader.metadata) != reader.num_samples
            or len(np.unique(table["sample_id"])) != reader.num_samples  # every image has its bytes
            or (len(table) and int((table["ptr"] + table["size"]).max()) > size)):
        raise BetonError(f"{path} is truncated ({size} bytes; it holds less than its header and allocation "
                         f"table describe); rewrite it with python -m pipeline.backends.ffcv.write --overwrite")
    for name, kind in ((image_field, RGBImageField), (label_field, IntField)):
        if not isinstance(reader.handlers.get(name), kind):
            found = {k: type(v).__name__ for k, v in reader.handlers.items()}
            raise BetonError(f"{path} has fields {found}; expected {image_field!r}: RGBImageField and "
                             f"{label_field!r}: IntField (write it with python -m pipeline.backends.ffcv.write)")
    return reader


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Write an ImageFolder split as an FFCV .beton (image + label). Files PIL cannot decode "
                    "are skipped and named; images are stored upright (EXIF orientation) as 8-bit RGB.")
    p.add_argument("split", help="ImageFolder split: <split>/<class>/<image>")
    p.add_argument("out", help="output .beton path")
    p.add_argument("--max-resolution", type=int, default=None,
                   help=f"longest stored side in pixels (default: as in the file). Either way an image over "
                        f"{MAX_RGB_PIXELS} pixels (about {int(MAX_RGB_PIXELS ** 0.5)}x{int(MAX_RGB_PIXELS ** 0.5)}) "
                        f"is shrunk to that size, aspect kept, to fit one {PAGE_BYTES >> 20} MiB FFCV page; "
                        f"the writer prints how many were shrunk and the sidecar <out>.json records them")
    p.add_argument("--write-mode", choices=WRITE_MODES, default="raw")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--smart-threshold", type=int, default=None, help="bytes above which --write-mode smart stores JPEG")
    p.add_argument("--compress-probability", type=float, default=0.5, help="JPEG share of --write-mode proportion")
    p.add_argument("-j", "--workers", type=int, default=-1, help="writer processes (-1: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    a = p.parse_args(argv)
    try:
        write_beton(a.split, a.out, max_resolution=a.max_resolution, jpeg_quality=a.jpeg_quality,
                    write_mode=a.write_mode, smart_threshold=a.smart_threshold,
                    compress_probability=a.compress_probability, num_workers=a.workers, overwrite=a.overwrite)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StopSignal as exc:
        print(f"{exc}: nothing written to {a.out}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
