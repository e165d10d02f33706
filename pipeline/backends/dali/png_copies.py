"""Lossless PNG copies of the files DALI does not decode as PIL does (:mod:`pipeline.sources.formats`)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ...sources.formats import DALI_KINDS, file_kinds
from ...sources.imagefolder import ImageList, cache_dir, cache_unwritable, load_rgb
from ...writes import remove_quietly


def png_copy(path: str, folder: str | os.PathLike | None = None) -> Path:
    """A lossless PNG of ``load_rgb(path)`` (upright, 8-bit RGB), made once and reused.

    Named by the source's path, size and mtime under ``folder`` (default
    ``<cache_dir()>/dali-png``), written to a temporary name and renamed into place, so
    concurrent ranks and interrupted runs never leave a partial copy.

    Raises:
        OSError: the source cannot be read or the copy cannot be written (in the default folder:
            :func:`pipeline.sources.imagefolder.cache_unwritable`'s one line, with the way out).
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
