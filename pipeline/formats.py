"""Which image kinds each backend decodes as PIL does, and PNG copies for the ones DALI does not.

A file's *kind* is PIL's ``"<format>/<mode>"`` of its bytes (``"JPEG/RGB"``, ``"PNG/P"``,
``"GIF/P"``), recorded by :func:`pipeline.imagefolder.scan_image_folder`. The scan keeps only files
PIL decodes, and every backend trains on all of them:

- ``torch`` and ``ffcv`` decode with PIL (the FFCV writer stores PIL's pixels), so every kind.
- ``dali`` decodes with nvImageCodec (DALI 2.4 ``fn.decoders.image``; documented formats: JPEG,
  JPEG 2000, TIFF, PNG, BMP, PNM, WebP). :data:`DALI_KINDS` lists the kinds that were decoded here
  by DALI's CPU decoder to the same pixels as :func:`pipeline.imagefolder.load_rgb` (EXIF
  orientation included); ``tests/test_formats.py`` decodes each again. Every other kind is
  **converted**, not skipped: DALI reads a lossless PNG copy of PIL's pixels
  (:func:`dali_sources`), so ``--loader dali`` trains on the same images as the others. Found
  outside the table here: GIF, ICO, TGA, PCX, SGI, DDS, QOI, XBM, IM (DALI cannot decode them),
  1-bit and 32-bit integer TIFF (DALI fails on some), and 16-bit PGM (PIL's mode does not say its
  bit depth, so DALI's scaling need not match).
  On a GPU (``mixed``), nvImageCodec decodes JPEG on the device and falls back to its CPU codecs
  for the rest; only the CPU decoder was checked here.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image

from .imagefolder import ImageList, cache_dir, cache_unwritable, load_rgb
from .writes import remove_quietly

DALI_KINDS = frozenset({
    "JPEG/RGB", "JPEG/L", "JPEG/CMYK", "MPO/RGB",
    "PNG/RGB", "PNG/RGBA", "PNG/L", "PNG/LA", "PNG/P", "PNG/1", "PNG/I;16",
    "BMP/RGB", "BMP/L", "BMP/P",
    "TIFF/RGB", "TIFF/RGBA", "TIFF/L", "TIFF/P", "TIFF/CMYK", "TIFF/I;16", "TIFF/F",
    "PPM/RGB", "PPM/L",
    "WEBP/RGB", "WEBP/RGBA",
    "JPEG2000/RGB",
})
"""Kinds DALI 2.4's CPU decoder turns into the pixels of :func:`~pipeline.imagefolder.load_rgb`
(mean absolute difference below 1 grey level; identical for all but palette TIFF)."""


def file_kinds(paths: list[str]) -> list[str | None]:
    """PIL's ``"<format>/<mode>"`` of each file, read from its header only (no decode); None for
    a file PIL cannot open (for an :class:`ImageList` built by hand, without the scan)."""
    out: list[str | None] = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(f"{im.format}/{im.mode}")
        except Exception:  # PIL raises many types; DALI then reads the file and names it if it fails
            out.append(None)
    return out


def png_copy(path: str, folder: str | os.PathLike | None = None) -> Path:
    """A lossless PNG of ``load_rgb(path)`` (upright, 8-bit RGB), made once and reused.

    Named by the source's path, size and mtime under ``folder`` (default
    ``<cache_dir()>/dali-png``), written to a temporary name and renamed into place, so
    concurrent ranks and interrupted runs never leave a partial copy.

    Raises:
        OSError: the source cannot be read or the copy cannot be written (in the default folder:
            :func:`pipeline.imagefolder.cache_unwritable`'s one line, with the way out).
    """
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = folder is None
    folder = Path(folder) if folder is not None else cache_dir() / "dali-png"
    out = folder / f"{key}.png"
    if not out.exists():
        image = load_rgb(path)  # an unreadable source is not a cache problem
        tmp = folder / f"{key}.tmp{os.getpid()}.png"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            image.save(tmp, compress_level=1)
            os.replace(tmp, out)
        except OSError as exc:
            if not cached:
                raise
            raise cache_unwritable("dali", f"PNG copies of files DALI does not decode (such as {path})", folder,
                                   exc) from exc
        finally:
            remove_quietly(tmp)
    return out


def dali_sources(images: ImageList, folder: str | os.PathLike | None = None
                 ) -> tuple[list[str], list[tuple[str, str]]]:
    """The file DALI reads for each sample of ``images``: the sample itself when its kind is in
    :data:`DALI_KINDS` (or unknown: a hand-built list's file PIL cannot open), else its
    :func:`png_copy`.

    Returns:
        ``(paths, converted)``: ``paths[i]`` for ``images.samples[i]``; ``converted`` lists
        ``(original path, kind)`` of every sample read from a copy.
    """
    kinds = images.kinds if images.kinds is not None else file_kinds([p for p, _ in images.samples])
    paths, converted = [], []
    for (path, _), kind in zip(images.samples, kinds):
        if kind is None or kind in DALI_KINDS:
            paths.append(path)
        else:
            paths.append(str(png_copy(path, folder)))
            converted.append((path, kind))
    return paths, converted
