"""Which image kinds each backend decodes as PIL does (the PNG copies DALI reads for the others:
:mod:`pipeline.backends.dali.png_copies`).

A file's *kind* is PIL's ``"<format>/<mode>"`` of its bytes (``"JPEG/RGB"``, ``"PNG/P"``,
``"GIF/P"``), recorded by :func:`pipeline.sources.imagefolder.scan_image_folder`. The scan keeps only files
PIL decodes, and every backend trains on all of them:

- ``torch`` and ``ffcv`` decode with PIL (the FFCV writer stores PIL's pixels), so every kind.
- ``dali`` decodes with nvImageCodec (DALI 2.4 ``fn.decoders.image``; documented formats: JPEG,
  JPEG 2000, TIFF, PNG, BMP, PNM, WebP). :data:`DALI_KINDS` lists the kinds that were decoded here
  by DALI's CPU decoder to the same pixels as :func:`pipeline.sources.imagefolder.load_rgb` (EXIF
  orientation included); ``tests/test_formats.py`` decodes each again. Every other kind is
  **converted**, not skipped: DALI reads a lossless PNG copy of PIL's pixels
  (:func:`pipeline.backends.dali.png_copies.dali_sources`), so ``--loader dali`` trains on the same images as the others. Found
  outside the table here: GIF, ICO, TGA, PCX, SGI, DDS, QOI, XBM, IM (DALI cannot decode them),
  1-bit and 32-bit integer TIFF (DALI fails on some), and 16-bit PGM (PIL's mode does not say its
  bit depth, so DALI's scaling need not match).
  On a GPU (``mixed``), nvImageCodec decodes JPEG on the device and falls back to its CPU codecs
  for the rest; only the CPU decoder was checked here.
"""
from __future__ import annotations

from PIL import Image

DALI_KINDS = frozenset({
    "JPEG/RGB", "JPEG/L", "JPEG/CMYK", "MPO/RGB",
    "PNG/RGB", "PNG/RGBA", "PNG/L", "PNG/LA", "PNG/P", "PNG/1", "PNG/I;16",
    "BMP/RGB", "BMP/L", "BMP/P",
    "TIFF/RGB", "TIFF/RGBA", "TIFF/L", "TIFF/P", "TIFF/CMYK", "TIFF/I;16", "TIFF/F",
    "PPM/RGB", "PPM/L",
    "WEBP/RGB", "WEBP/RGBA",
    "JPEG2000/RGB",
})
"""Kinds DALI 2.4's CPU decoder turns into the pixels of :func:`~pipeline.sources.imagefolder.load_rgb`
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
