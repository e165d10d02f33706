"""Scan an ImageFolder once, check every image decodes, and cache the verdict.

Every loader (torch, DALI, the FFCV writer) reads the same :class:`ImageList`, so labels and the
bad-file policy are identical across backends.

Bad-file policy: a file with an image extension that PIL cannot fully decode (corrupt, truncated,
not an image, over PIL's decompression-bomb limit) is **skipped and counted**; the first few are
named in a warning and all of them are listed in ``ImageList.skipped``. The check decodes every
file once; its result is cached under ``$XDG_CACHE_HOME/simsiam-fast/`` (default ``~/.cache``),
keyed by the folder's path and every file's name, size and mtime, so later runs pay only a
``stat`` per file. Files without an image extension are ignored, as torchvision's ImageFolder
does. Structural problems are refused up front with a message naming the path: a missing or
empty folder, no class sub-folders, a class folder with no images, or no decodable image at all.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)

_CACHE_VERSION = 1


@dataclass
class ImageList:
    """The decodable images of an ImageFolder split.

    Attributes:
        root: the split folder (``.../train``), absolute.
        classes: sorted class-folder names; ``class_to_idx[c]`` is ``classes.index(c)``
            (torchvision ImageFolder's convention).
        samples: ``(absolute path, class index)`` pairs, sorted by path.
        skipped: ``(absolute path, reason)`` for every file that failed to decode.
    """

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, n: int | None, seed: int) -> "ImageList":
        """At most ``n`` samples drawn at random with ``seed``, kept in path order (``None``: all)."""
        if n is None or n >= len(self.samples):
            return self
        import torch

        keep = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageList(self.root, self.classes, [self.samples[i] for i in keep.sort().values.tolist()],
                         self.skipped)


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a PIL image (grey, CMYK, palette and RGBA converted by PIL).

    16-bit grey images (modes ``I;16*``) are scaled to 8 bits first: PIL's own conversion to RGB
    clips them to white.
    """
    if im.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image file with PIL into an 8-bit RGB image (see :func:`to_rgb`)."""
    with Image.open(path) as im:
        return to_rgb(im)


def _check_image(path: str) -> str | None:
    """Fully decode one file; return None when it decodes, else the reason it does not."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "empty image"
    except Exception as exc:  # PIL raises many types for bad files; each one means "skip"
        return f"{type(exc).__name__}: {exc}"
    return None


def _cache_path(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "simsiam-fast"
    return base / f"scan-{hashlib.sha1(str(root).encode()).hexdigest()[:16]}.json"


def _fingerprint(files: list[str]) -> str:
    h = hashlib.sha1()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
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


def scan_image_folder(root: str | os.PathLike, verify: bool = True, workers: int | None = None) -> ImageList:
    """List and check the images of one ImageFolder split.

    Args:
        root: folder with one sub-folder per class.
        verify: fully decode each file once (cached) and skip the ones that fail.
        workers: threads for the decode check (default: CPU count).

    Returns:
        :class:`ImageList` with labels as torchvision's ImageFolder would give them.

    Raises:
        FileNotFoundError / NotADirectoryError: missing folder, no class folders, a class
            folder without image files.
        RuntimeError: no file of the split decodes.
    """
    root = Path(root).resolve()
    per_class = _list_classes(root)
    classes = [c for c, _ in per_class]
    all_files = [(f, i) for i, (_, files) in enumerate(per_class) for f in files]
    skipped: list[tuple[str, str]] = []
    if verify:
        paths = [f for f, _ in all_files]
        fp = _fingerprint(paths)
        cache = _cache_path(root)
        bad: dict[str, str] | None = None
        try:
            saved = json.loads(cache.read_text())
            if saved.get("version") == _CACHE_VERSION and saved.get("fingerprint") == fp:
                bad = saved["bad"]
        except (OSError, ValueError, KeyError):
            pass
        if bad is None:
            log.info("checking that %d images under %s decode (once; cached)", len(paths), root)
            with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
                reasons = list(pool.map(_check_image, paths, chunksize=256))
            bad = {p: r for p, r in zip(paths, reasons) if r is not None}
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({"version": _CACHE_VERSION, "fingerprint": fp, "bad": bad}))
                os.replace(tmp, cache)
            except OSError as exc:  # a read-only home only costs a re-check next time
                log.warning("could not cache the image check at %s: %s", cache, exc)
        skipped = sorted(bad.items())
        all_files = [(f, i) for f, i in all_files if f not in bad]
    if skipped:
        names = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(f"skipping {len(skipped)} undecodable file(s) under {root}: {names}{more}", stacklevel=2)
    if not all_files:
        raise RuntimeError(f"no decodable image under {root} ({len(skipped)} file(s) failed to decode)")
    return ImageList(root=str(root), classes=classes, samples=all_files, skipped=skipped)
