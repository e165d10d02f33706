"""ImageFolder split → FFCV ``.beton`` (``RGBImageField`` image + ``IntField`` label).

Command line (one command per split)::

    python -m pipeline.ffcv_write data/fashion-mnist/train data/fashion-mnist/train.beton
    python -m pipeline.ffcv_write IMAGENET/train train.beton --max-resolution 256 --write-mode jpg --jpeg-quality 90

The images are the split's :class:`~pipeline.imagefolder.ImageList`, so labels and the bad-file
policy are the torch loader's: files PIL cannot decode (corrupt, truncated, not an image) are
skipped, counted and named by :func:`~pipeline.imagefolder.scan_image_folder`; grey, palette,
CMYK and RGBA images are converted to RGB as the torch loader does (``PIL.Image.convert('RGB')``;
alpha is dropped). Every sample reaches FFCV as a ``(H, W, 3)`` uint8 array: FFCV's encoder
raises inside its worker process on a 2-D grey array, and its writer then waits forever.

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
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .imagefolder import ImageList, scan_image_folder, to_rgb

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


def _fit(im: Image.Image, max_resolution: int | None) -> Image.Image:
    """8-bit RGB copy of ``im`` (:func:`~pipeline.imagefolder.to_rgb`) whose longer side is at most
    ``max_resolution`` pixels and whose raw RGB size fits one FFCV page (:data:`MAX_RGB_PIXELS`).

    JPEGs are decoded at a reduced DCT scale first (``Image.draft``), so a huge photo never
    materialises at full size; the final resize is PIL's antialiased ``reduce`` + bilinear.
    """
    scale = min(1.0, (MAX_RGB_PIXELS / (im.width * im.height)) ** 0.5)
    if max_resolution:
        scale = min(scale, max_resolution / max(im.size))
    target = (max(1, int(im.width * scale)), max(1, int(im.height * scale)))
    if scale < 1 and im.format == "JPEG":
        im.draft("RGB", target)
    im = to_rgb(im)
    if im.width > target[0] or im.height > target[1]:
        im = im.resize(target, Image.BILINEAR, reducing_gap=2.0)
    return im


class _RGBSamples:
    """Indexable ``(image (H, W, 3) uint8, label int)`` for FFCV's ``from_indexed_dataset``.

    Never raises inside FFCV's worker processes (that would hang the writer): a file that fails
    to decode now (changed since the scan) is written as a 1×1 black pixel and its index is put
    in ``failed``, a fork-shared integer the parent checks before it renames the file into place.
    """

    def __init__(self, images: ImageList, max_resolution: int | None):
        self.samples, self.max_resolution = images.samples, max_resolution
        self.failed = mp.Value("q", -1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                arr = np.asarray(_fit(im, self.max_resolution), dtype=np.uint8)
            if arr.ndim != 3 or arr.shape[2] != 3:  # convert('RGB') guarantees this; belt and braces
                raise ValueError(f"decoded to shape {arr.shape}")
        except Exception:  # any failure must not escape into FFCV's worker
            self.failed.value = index
            arr = np.zeros((1, 1, 3), np.uint8)
        return np.ascontiguousarray(arr), int(label)


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
        max_resolution: longest image side stored, in pixels (None: full size). FFCV's
            ImageNet example uses 256–512; the decoder crops from what is stored.
        jpeg_quality: 0–100, used by the ``jpg``/``smart``/``proportion`` modes (FFCV default 90).
        write_mode: one of :data:`WRITE_MODES`.
        smart_threshold: bytes above which ``smart`` stores JPEG.
        compress_probability: share stored as JPEG by ``proportion``.
        num_workers: writer processes (-1: all cores).
        chunksize: samples per work item of a writer process.
        overwrite: replace an existing ``out``; otherwise it is refused.
        progress: FFCV's tqdm bar (always shown by FFCV; ``False`` only silences our lines).

    Returns:
        ``Path(out)``.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        ValueError: unknown ``write_mode``, ``jpeg_quality`` outside 0–100, ``max_resolution < 1``.
        RuntimeError: a file that decoded during the scan failed while writing (nothing is left
            at ``out``).
        FileNotFoundError, RuntimeError: from :func:`~pipeline.imagefolder.scan_image_folder`.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

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
        print(f"writing {len(images)} images of {images.root} to {out} "
              f"({len(images.skipped)} undecodable file(s) skipped; {write_mode}, max side {max_resolution})",
              file=sys.stderr, flush=True)
    dataset = _RGBSamples(images, max_resolution)
    writer = DatasetWriter(str(tmp), {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                               smart_threshold=smart_threshold, compress_probability=compress_probability),
        "label": IntField(),
    }, num_workers=num_workers)
    t0 = time.time()
    try:
        writer.from_indexed_dataset(dataset, chunksize=chunksize)
        if dataset.failed.value >= 0:
            bad = images.samples[dataset.failed.value][0]
            raise RuntimeError(f"{bad} no longer decodes (it changed after the scan); nothing written to {out}")
        meta = {"version": FORMAT_VERSION, "root": images.root, "classes": images.classes,
                "num_samples": len(images), "labels_sha1": hashlib.sha1(np.asarray(images.labels, np.int64).tobytes()).hexdigest(),
                "fingerprint": file_list_fingerprint(images), "skipped": images.skipped, **options}
        sidecar_path(out).write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if progress:
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.1f} s",
              file=sys.stderr, flush=True)
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
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise BetonError(f"FFCV file {path} does not exist; write it with python -m pipeline.ffcv_write SPLIT {path}")
    size = path.stat().st_size
    try:
        reader = Reader(str(path))
    except Exception as exc:  # FFCV raises AssertionError/IndexError/ValueError on garbage
        raise BetonError(f"{path} is not a readable FFCV .beton ({type(exc).__name__}: {exc}); "
                         f"rewrite it with python -m pipeline.ffcv_write --overwrite") from exc
    table = reader.alloc_table
    if (int(reader.header["alloc_table_ptr"]) > size or len(reader.metadata) != reader.num_samples
            or len(np.unique(table["sample_id"])) != reader.num_samples  # every image has its bytes
            or (len(table) and int((table["ptr"] + table["size"]).max()) > size)):
        raise BetonError(f"{path} is truncated ({size} bytes; it holds less than its header and allocation "
                         f"table describe); rewrite it with python -m pipeline.ffcv_write --overwrite")
    for name, kind in ((image_field, RGBImageField), (label_field, IntField)):
        if not isinstance(reader.handlers.get(name), kind):
            found = {k: type(v).__name__ for k, v in reader.handlers.items()}
            raise BetonError(f"{path} has fields {found}; expected {image_field!r}: RGBImageField and "
                             f"{label_field!r}: IntField (write it with python -m pipeline.ffcv_write)")
    return reader


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write an ImageFolder split as an FFCV .beton (image + label).")
    p.add_argument("split", help="ImageFolder split: <split>/<class>/<image>")
    p.add_argument("out", help="output .beton path")
    p.add_argument("--max-resolution", type=int, default=None, help="longest stored side in pixels (default: full size)")
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
    except (FileExistsError, FileNotFoundError, NotADirectoryError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
