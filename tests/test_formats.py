"""What DALI decodes as PIL does (pipeline/sources/formats.py), checked by decoding with DALI's CPU decoder.

Every kind in ``DALI_KINDS`` is written from a real photo and decoded by DALI to the pixels of
``load_rgb`` (EXIF orientation included); the kinds left out are shown to fail or differ in DALI,
and their PNG copies to decode exactly. This is the evidence behind the table: a DALI upgrade that
changes either side makes these tests fail and the table is revisited.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from pipeline.backends.dali.png_copies import dali_sources  # noqa: E402
from pipeline.sources.formats import DALI_KINDS, file_kinds  # noqa: E402
from pipeline.sources.imagefolder import ImageList, load_rgb  # noqa: E402


@pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_pipelined=False, exec_async=False,
              prefetch_queue_depth=1)
def _decode(path: str):
    encoded, _ = fn.readers.file(files=[path])
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


def dali_pixels(path) -> np.ndarray:
    """``(H, W, 3)`` uint8 as DALI's CPU decoder returns the file (raises RuntimeError if it cannot)."""
    pipe = _decode(str(path))
    pipe.build()
    (out,) = pipe.run()
    return np.asarray(out.as_tensor())[0]


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _grey16(rgb: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)


def _rgba(rgb: Image.Image) -> Image.Image:
    im = rgb.convert("RGBA")
    im.putalpha(Image.linear_gradient("L").resize(rgb.size))
    return im


# kind -> (file name, writer of a real photo in that kind)
INSIDE = {
    "JPEG/RGB": ("a.jpg", lambda im, p: im.save(p, quality=92)),
    "JPEG/L": ("grey.jpg", lambda im, p: im.convert("L").save(p)),
    "JPEG/CMYK": ("cmyk.jpg", lambda im, p: im.convert("CMYK").save(p)),
    "MPO/RGB": ("mpo.jpg", lambda im, p: im.save(p, format="MPO", save_all=True, append_images=[im.rotate(90)])),
    "PNG/RGB": ("a.png", lambda im, p: im.save(p)),
    "PNG/RGBA": ("rgba.png", lambda im, p: _rgba(im).save(p)),
    "PNG/L": ("grey.png", lambda im, p: im.convert("L").save(p)),
    "PNG/LA": ("la.png", lambda im, p: _rgba(im).convert("LA").save(p)),
    "PNG/P": ("palette.png", lambda im, p: im.convert("P", palette=Image.Palette.ADAPTIVE).save(p)),
    "PNG/1": ("bits.png", lambda im, p: im.convert("1").save(p)),
    "PNG/I;16": ("grey16.png", lambda im, p: _grey16(im).save(p)),
    "BMP/RGB": ("a.bmp", lambda im, p: im.save(p)),
    "BMP/L": ("grey.bmp", lambda im, p: im.convert("L").save(p)),
    "BMP/P": ("palette.bmp", lambda im, p: im.convert("P", palette=Image.Palette.ADAPTIVE).save(p)),
    "TIFF/RGB": ("lzw.tif", lambda im, p: im.save(p, compression="tiff_lzw")),
    "TIFF/RGBA": ("rgba.tif", lambda im, p: _rgba(im).save(p)),
    "TIFF/L": ("grey.tif", lambda im, p: im.convert("L").save(p, compression="tiff_adobe_deflate")),
    "TIFF/P": ("palette.tif", lambda im, p: im.convert("P", palette=Image.Palette.ADAPTIVE).save(p)),
    "TIFF/CMYK": ("cmyk.tif", lambda im, p: im.convert("CMYK").save(p)),
    "TIFF/I;16": ("grey16.tif", lambda im, p: _grey16(im).save(p)),
    "TIFF/F": ("float.tif", lambda im, p: Image.fromarray(np.asarray(im.convert("L"), np.float32) / 255).save(p)),
    "PPM/RGB": ("a.ppm", lambda im, p: im.save(p)),
    "PPM/L": ("a.pgm", lambda im, p: im.convert("L").save(p)),
    "WEBP/RGB": ("lossy.webp", lambda im, p: im.save(p, quality=90)),
    "WEBP/RGBA": ("rgba.webp", lambda im, p: _rgba(im).save(p, lossless=True)),
    "JPEG2000/RGB": ("a.jp2", lambda im, p: im.save(p)),
}
OUTSIDE = {
    "GIF/P": ("gif_named.jpg", lambda im, p: im.save(p, format="GIF")),
    "ICO/RGB": ("ico_named.jpg", lambda im, p: im.resize((48, 48)).save(p, format="ICO")),
    "TGA/RGB": ("tga_named.png", lambda im, p: im.save(p, format="TGA")),
    "TIFF/1": ("bits.tif", lambda im, p: im.convert("1").save(p)),
    "TIFF/I": ("int32.tif", lambda im, p: Image.fromarray(np.asarray(im.convert("L"), np.int32) * 200).save(p)),
    "PPM/I": ("grey16.pgm", lambda im, p: _grey16(im).save(p)),
}
# Decoded alike here (maxval 65535) but kept out: PIL's mode "I" does not say a PGM's bit depth
# (maxval), and DALI and PIL need not scale a 12-bit one alike.
CONVERTED_TO_BE_SAFE = {"PPM/I"}


@pytest.fixture(scope="module")
def photo(photo_dir) -> Image.Image:
    with Image.open(sorted(photo_dir.glob("imagenet_*.jpg"))[3]) as im:
        return im.convert("RGB").resize((120, 80))  # not square: a missed rotation changes the shape


def write(kinds: dict, photo: Image.Image, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind, (name, save) in kinds.items():
        save(photo, folder / name)
        out[kind] = folder / name
    return out


def test_table_is_what_was_checked():
    assert set(INSIDE) == DALI_KINDS and not set(OUTSIDE) & DALI_KINDS


def test_dali_decodes_every_listed_kind_as_pil(photo, tmp_path):
    files = write(INSIDE, photo, tmp_path)
    assert file_kinds([str(f) for f in files.values()]) == list(files)  # each file really is its kind
    for kind, path in files.items():
        ref, got = np.asarray(load_rgb(str(path))), dali_pixels(path)
        assert got.shape == ref.shape, kind
        assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1.0, kind


@pytest.mark.parametrize("kind", ["JPEG/RGB", "PNG/RGB", "TIFF/RGB", "WEBP/RGB"])
@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_dali_applies_exif_orientation_as_pil(photo, tmp_path, kind, orientation):
    """DALI's ``adjust_orientation`` (its default) and PIL's ``exif_transpose`` agree."""
    name = {"JPEG/RGB": "o.jpg", "PNG/RGB": "o.png", "TIFF/RGB": "o.tif", "WEBP/RGB": "o.webp"}[kind]
    path = tmp_path / name
    extra = {"quality": 95} if kind in ("JPEG/RGB", "WEBP/RGB") else {}
    photo.save(path, exif=_exif(orientation), **extra)
    ref = np.asarray(load_rgb(str(path)))
    assert ref.shape[:2] == ((120, 80) if orientation >= 5 else (80, 120))  # PIL did turn it
    got = dali_pixels(path)
    assert got.shape == ref.shape and np.abs(got.astype(int) - ref.astype(int)).mean() < 1.0


def test_unlisted_kinds_fail_or_differ_in_dali_and_their_copies_do_not(photo, tmp_path):
    files = write(OUTSIDE, photo, tmp_path / "odd")
    assert file_kinds([str(f) for f in files.values()]) == list(files)
    for kind, path in files.items():
        ref = np.asarray(load_rgb(str(path)))
        try:
            got = dali_pixels(path)
        except RuntimeError:
            continue  # DALI cannot decode it
        if kind in CONVERTED_TO_BE_SAFE:
            continue
        assert got.shape != ref.shape or np.abs(got.astype(int) - ref.astype(int)).mean() > 5, kind
    images = ImageList(str(tmp_path), ["x"], [(str(p), 0) for p in files.values()], kinds=list(files))
    paths, converted = dali_sources(images, tmp_path / "copies")
    assert [k for _, k in converted] == list(files) and all(p.endswith(".png") for p in paths)
    for path, (original, _) in zip(paths, images.samples):
        np.testing.assert_array_equal(dali_pixels(path), np.asarray(load_rgb(original)))
    stamps = [Path(p).stat().st_mtime_ns for p in paths]
    assert dali_sources(images, tmp_path / "copies")[0] == paths  # made once, then reused
    assert [Path(p).stat().st_mtime_ns for p in paths] == stamps
