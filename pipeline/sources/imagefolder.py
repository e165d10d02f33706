"""Scan an ImageFolder once, check every image decodes, and cache the verdict.

Every loader (torch, DALI, the FFCV writer) reads the same :class:`ImageList`, so labels and the
bad-file policy are identical across backends: a file is judged by its bytes, never by its name.

Bad-file policy (``on_bad="skip"``, the default): a file with an image extension that PIL cannot
fully decode (corrupt, truncated, zero bytes, not an image, unreadable, not a regular file, over
PIL's decompression-bomb limit) is **skipped and counted** before the first step; the first few
are named in a warning, all of them are listed in ``ImageList.skipped`` with their reason, and
:func:`write_skip_list` writes that list to a file. ``on_bad="error"`` refuses such a folder with
a ValueError naming the first bad files instead. What PIL decodes, every backend trains on: the
scan also records each file's real format and mode (``ImageList.kinds``, e.g. ``"GIF/P"`` for a
GIF saved as ``.jpg``), from which :mod:`pipeline.sources.formats` decides what DALI reads directly and
what it reads as a PNG copy.

Pixels: :func:`load_rgb` applies the EXIF orientation (as DALI's decoder does, its
``adjust_orientation=True`` default) and converts to 8-bit RGB (:func:`to_rgb`); every PIL path
(torch loader, FFCV writer, kNN/eval images, DALI's PNG copies) goes through it.

The check decodes every file once; its result is cached under ``$XDG_CACHE_HOME/simsiam-fast/``
(default ``~/.cache``), keyed by the folder's path and every file's name, size and mtime, so later
runs pay only a ``stat`` per file. Failures that come from the operating system (permission
denied, a dangling link: an ``OSError`` with an errno) are not cached: they are checked again on
the next scan. Files without an image extension are ignored, as torchvision's ImageFolder does.
Structural problems are refused up front with a message naming the path: a missing or empty
folder, no class sub-folders, a class folder with no images, or no decodable image at all.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..sampling import shard_order

log = logging.getLogger(__name__)

_CACHE_VERSION = 2
ON_BAD = ("skip", "error")
ORIENTATION = 0x0112  # EXIF tag 274 (TIFF/EP, EXIF 2.3 §4.6.4): 1 = upright, 2-8 = flips/rotations
_RECHECK, _BAD = -1, -2  # cached kind codes: check again next time / undecodable (reason in "bad")


@dataclass
class ImageList:
    """The decodable images of an ImageFolder split.

    Attributes:
        root: the split folder (``.../train``), absolute.
        classes: sorted class-folder names; ``class_to_idx[c]`` is ``classes.index(c)``
            (torchvision ImageFolder's convention).
        samples: ``(absolute path, class index)`` pairs, sorted by path.
        skipped: ``(absolute path, reason)`` for every file that failed to decode.
        kinds: per sample, PIL's ``"<format>/<mode>"`` of the file's bytes (``"JPEG/RGB"``,
            ``"GIF/P"``, ...), or None when the list was built by hand (then read from the
            files' headers when a backend needs it, see :func:`pipeline.sources.formats.file_kinds`).
    """

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kinds: list[str] | None = None

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def epoch_indices(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                      shuffle: bool = True) -> list[int]:
        """Indices into ``samples`` that rank ``rank`` reads in ``epoch``, in order: the shared
        order of :func:`pipeline.sampling.shard_order`, ``len(self) // world_size`` of them.

        Raises:
            ValueError: ``rank`` outside ``[0, world_size)``.
        """
        return shard_order(len(self.samples), seed, epoch, rank, world_size, shuffle)

    def slice(self, start: int, stop: int) -> "ImageList":
        """Samples ``[start, stop)`` as a list of their own (a rank's part of an evaluation set)."""
        kinds = None if self.kinds is None else self.kinds[start:stop]
        return ImageList(self.root, self.classes, self.samples[start:stop], self.skipped, kinds)

    def part(self, rank: int, world_size: int) -> "ImageList":
        """This rank's contiguous part ``[n·rank/world, n·(rank+1)/world)`` of an evaluation set
        (``DistContext.shard_range``'s slice, so gathering the parts in rank order restores the list)."""
        n = len(self.samples)
        return self.slice(n * rank // world_size, n * (rank + 1) // world_size)

    def subset(self, n: int | None, seed: int) -> "ImageList":
        """At most ``n`` samples drawn at random with ``seed``, kept in path order (``None``: all)."""
        if n is None or n >= len(self.samples):
            return self
        import torch

        keep = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(seed))[:n]
        keep = keep.sort().values.tolist()
        kinds = None if self.kinds is None else [self.kinds[i] for i in keep]
        return ImageList(self.root, self.classes, [self.samples[i] for i in keep], self.skipped, kinds)


def oriented(im: Image.Image) -> Image.Image:
    """``im`` turned upright by its EXIF orientation tag (values 2-8), else ``im`` itself.

    Same rule as DALI's ``fn.decoders.image(adjust_orientation=True)`` (its default; checked
    against DALI 2.4's CPU decoder for JPEG, PNG, TIFF and WebP in ``tests/test_formats.py``).
    """
    if im.getexif().get(ORIENTATION, 1) in range(2, 9):
        return ImageOps.exif_transpose(im)
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a PIL image (grey, CMYK, palette and RGBA converted by PIL).

    Wide grey modes are scaled rather than clipped (PIL's own conversion to RGB clips them to
    white): 16-bit (``I;16*``, and ``I``, which PIL uses for 16-bit PGM/TIFF) keep their top 8
    bits of 0-65535; 32-bit float (``F``) is read as 0.0-1.0.
    """
    if im.mode.startswith("I"):
        arr = np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        arr = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float32)), 0.0, 1.0) * 255
        return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image file with PIL into an upright (EXIF orientation) 8-bit RGB image."""
    with Image.open(path) as im:
        return to_rgb(oriented(im))


def decode_rgb(data: bytes) -> Image.Image:
    """Decode an encoded image (a shard's ``.jpg`` / ``.png`` bytes) as :func:`load_rgb` decodes a
    file: upright by its EXIF orientation, 8-bit RGB.

    Raises:
        OSError, ValueError, ...: whatever PIL raises for bytes it cannot decode.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_rgb(oriented(im))


def _inspect(path: str) -> tuple[str | None, str | None, bool]:
    """Fully decode one file: ``(kind, None, False)`` when it decodes, else ``(None, reason,
    recheck)``; ``recheck`` marks failures of the operating system (an errno), not of the bytes."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file", False
        if st.st_size == 0:
            return None, "empty file (0 bytes)", False
        with Image.open(path) as im:
            kind = f"{im.format}/{im.mode}"
            im.load()
            if im.width < 1 or im.height < 1:
                return None, "empty image (0 pixels)", False
        return kind, None, False
    except OSError as exc:  # PIL's own errors (truncated, unidentified) are OSErrors without errno
        return None, f"{type(exc).__name__}: {exc}", exc.errno is not None
    except Exception as exc:  # PIL raises many other types for bad bytes; each one means "skip"
        return None, f"{type(exc).__name__}: {exc}", False


def cache_dir() -> Path:
    """The project's cache folder: ``$XDG_CACHE_HOME/simsiam-fast`` (default ``~/.cache/simsiam-fast``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "simsiam-fast"


def cache_unwritable(loader: str, what: str, folder: str | os.PathLike, exc: BaseException,
                     way_out: str = "") -> OSError:
    """The one line every loader says when it must cache something and cannot (an ``OSError``):

    ``--loader L must cache WHAT in FOLDER, which cannot be written (CAUSE); set XDG_CACHE_HOME to
    a writable folder[WAY_OUT]``. Loaders with nothing to cache never say it (the scan's cache is
    optional: it only warns).
    """
    from ..writes import WriteFailed, describe

    return WriteFailed(f"--loader {loader} must cache {what} in {folder}, which cannot be written ({describe(exc)}); "
                       f"set XDG_CACHE_HOME to a writable folder{way_out}", getattr(exc, "errno", None), str(folder))


def _cache_path(root: Path) -> Path:
    return cache_dir() / f"scan-{hashlib.sha1(str(root).encode()).hexdigest()[:16]}.json"


def _fingerprint(files: list[str]) -> str:
    h = hashlib.sha1()
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # a dangling link: judged (and not cached) by _inspect
            h.update(f"{f}\0missing\n".encode())
    return h.hexdigest()


def _list_classes(root: Path) -> list[tuple[str, list[str]]]:
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data folder {root} is not a folder")
    class_dirs = [e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    if not class_dirs:
        raise FileNotFoundError(
            f"data folder {root} has no class sub-folders: expected {root}/<class name>/<image files>"
        )
    out = []
    for entry in sorted(class_dirs, key=lambda e: e.name):
        files = sorted(
            os.path.join(dirpath, name)
            for dirpath, _, names in os.walk(entry.path, followlinks=True)
            for name in names
            if name.lower().endswith(IMG_EXTENSIONS)
        )
        if not files:
            raise FileNotFoundError(
                f"class folder {entry.path} holds no image files "
                f"(extensions {', '.join(IMG_EXTENSIONS)}); remove it or add images"
            )
        out.append((entry.name, files))
    return out


def _read_cache(cache: Path, fp: str, n: int) -> tuple[list[str], list[int], dict[str, str]] | None:
    try:
        saved = json.loads(cache.read_text())
        if saved.get("version") == _CACHE_VERSION and saved.get("fingerprint") == fp and len(saved["kind"]) == n:
            return saved["kinds"], saved["kind"], saved["bad"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _check_all(paths: list[str], codes: list[int], table: list[str], bad: dict[str, str],
               workers: int | None) -> int:
    """Decode the files whose code is ``_RECHECK``, fill in their codes / reasons in place, and
    return how many were decoded."""
    todo = [i for i, c in enumerate(codes) if c == _RECHECK]
    if not todo:
        return 0
    log.info("checking that %d images decode (once; cached)", len(todo))
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = list(pool.map(_inspect, [paths[i] for i in todo], chunksize=256))
    for i, (kind, reason, recheck) in zip(todo, results):
        bad.pop(paths[i], None)
        if kind is not None:
            if kind not in table:
                table.append(kind)
            codes[i] = table.index(kind)
        else:
            bad[paths[i]] = reason
            codes[i] = _RECHECK if recheck else _BAD
    return len(todo)


def scan_image_folder(root: str | os.PathLike, verify: bool = True, workers: int | None = None,
                      on_bad: str = "skip") -> ImageList:
    """List and check the images of one ImageFolder split.

    Args:
        root: folder with one sub-folder per class.
        verify: fully decode each file once (cached) and skip the ones that fail. Without it,
            nothing is decoded and ``kinds`` is None.
        workers: threads for the decode check (default: CPU count).
        on_bad: ``"skip"`` (skip, count and warn) or ``"error"`` (raise) for undecodable files.

    Returns:
        :class:`ImageList` with labels as torchvision's ImageFolder would give them.

    Raises:
        FileNotFoundError / NotADirectoryError: missing folder, no class folders, a class
            folder without image files.
        ValueError: unknown ``on_bad``; ``on_bad="error"`` and a file does not decode (the first
            five are named); no file of the split decodes.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {', '.join(ON_BAD)}, got {on_bad!r}")
    root = Path(root).resolve()
    per_class = _list_classes(root)
    classes = [c for c, _ in per_class]
    all_files = [(f, i) for i, (_, files) in enumerate(per_class) for f in files]
    if not verify:
        return ImageList(root=str(root), classes=classes, samples=all_files)
    paths = [f for f, _ in all_files]
    fp = _fingerprint(paths)
    cache = _cache_path(root)
    cached = _read_cache(cache, fp, len(paths))
    table, codes, bad = cached or ([], [_RECHECK] * len(paths), {})
    if _check_all(paths, codes, table, bad, workers) or cached is None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"version": _CACHE_VERSION, "fingerprint": fp, "kinds": table,
                                       "kind": codes, "bad": bad}))
            os.replace(tmp, cache)
        except OSError as exc:  # a read-only home only costs a re-check next time
            log.warning("could not cache the image check at %s: %s", cache, exc)
    skipped = sorted(bad.items())
    if skipped:
        names = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        if on_bad == "error":
            raise ValueError(f"{len(skipped)} file(s) under {root} do not decode: {names}{more}; "
                             f"remove or re-encode them, or skip them (on_bad='skip', --on-bad-image skip)")
        warnings.warn(f"skipping {len(skipped)} undecodable file(s) under {root}: {names}{more}", stacklevel=2)
    keep = [i for i, c in enumerate(codes) if c >= 0]
    if not keep:
        raise ValueError(f"no decodable image under {root} ({len(skipped)} file(s) failed to decode)")
    return ImageList(root=str(root), classes=classes, samples=[all_files[i] for i in keep], skipped=skipped,
                     kinds=[table[codes[i]] for i in keep])


def write_skip_list(images: ImageList | Iterable[ImageList], path: str | os.PathLike) -> Path:
    """Write every skipped file of one or more splits to ``path``: one ``<file>\\t<reason>`` line each.

    The file is written even when nothing was skipped (then it is empty), so its presence says
    the check ran. Returns ``Path(path)``; raises ``OSError`` when it cannot be written.
    """
    lists = [images] if isinstance(images, ImageList) else list(images)
    lines = [f"{p}\t{' '.join(r.split())}\n" for im in lists for p, r in im.skipped]
    path = Path(path)
    path.write_text("".join(lines))
    return path
