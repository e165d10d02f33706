"""Write an ImageFolder's splits as WebDataset tar shards, with an index per split.

For each split (``train/``, and ``val/`` when present) of the source folder:

1. **validate once** with the policy every loader shares
   (:func:`pipeline.sources.imagefolder.scan_image_folder`: each file fully decoded by PIL once —
   the verdict is cached —, its real format read from its bytes, bad files skipped and listed
   with their reason);
2. **shuffle** the samples with ``seed`` (numpy ``default_rng``), so no shard holds one class and
   readers that take whole shards still see a mixed stream;
3. **encode** each sample as ``<key>.jpg`` + ``<key>.cls`` (the class index as text). The image is
   the file's **original bytes** when it is a JPEG that every backend decodes as the torch loader
   does (:data:`ORIGINAL_KINDS`: DALI's decoder gives PIL's pixels for them,
   :data:`pipeline.sources.formats.DALI_KINDS`; torchvision-gpu decodes them or hands them to PIL;
   EXIF orientation stays in the bytes and every loader applies it); anything else (PNG, GIF,
   BMP, TIFF, WebP, ...) is **re-encoded losslessly** as ``<key>.png`` from PIL's upright RGB
   pixels (:func:`~pipeline.sources.imagefolder.load_rgb`). The writer says how many of each;
4. **cut** the shuffled samples into shards of about ``shard_size`` samples (``1000``) or bytes
   (``64MB``), named ``<split>-000000.tar`` …, and write them in parallel threads, each to a
   temporary name renamed into place when complete (a shard is never half there); beside each,
   DALI's ``<split>-000000.idx`` (``fn.readers.webdataset``'s ``index_paths``; format v1.2 of
   DALI's ``wds2idx``: a ``v1.2 <samples>`` line, then per sample ``ext offset size name`` per
   component, offsets of the data in bytes);
5. write ``<split>.json`` last: the ``wids`` index (``__kind__``, ``wids_version``, ``name``,
   ``shardlist: [{url, nsamples, filesize}]``) plus ``classes``, ``seed``, ``skipped`` and
   ``encoded`` (counts of original and re-encoded images), and ``<split>-keys.tsv`` (key → source
   file, for people: no loader reads it).

An index's presence means its split is complete; writing over one needs ``overwrite=True``.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from webdataset import TarWriter

from ..sources.formats import DALI_KINDS
from ..sources.imagefolder import ImageList, load_rgb, scan_image_folder
from ..sources.shards import INDEX_KIND

ORIGINAL_KINDS = frozenset(k for k in DALI_KINDS if k.split("/")[0] in ("JPEG", "MPO"))
"""Kinds stored as their original bytes: the JPEG kinds DALI decodes to PIL's pixels."""

SPLITS = ("train", "val")


class ShardWriteError(ValueError):
    """The writer was asked for something it refuses (an existing index, a bad size): one line."""


def parse_shard_size(text: str) -> tuple[str, int]:
    """``"1000"`` → ``("samples", 1000)``; ``"64MB"`` / ``"1.5GB"`` / ``"512KB"`` → ``("bytes", n)``.

    Raises:
        ValueError: anything else, or a size < 1.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(|samples?|[KMG]i?B)\s*", text, flags=re.I)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--shard-size wants a sample count (1000) or a size (64MB, 1GB), got {text!r}")
    unit = m.group(2).upper()
    if unit in ("", "SAMPLE", "SAMPLES"):
        return "samples", int(float(m.group(1)))
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}[unit[0]]
    return "bytes", int(float(m.group(1)) * scale)


@dataclass
class SplitReport:
    """What the writer did with one split."""

    split: str
    index: Path
    samples: int
    shards: int
    bytes: int
    original: int
    reencoded: int
    reencoded_kinds: dict[str, int]
    skipped: list[tuple[str, str]]


def _encoded(path: str, kind: str) -> tuple[str, bytes]:
    """``(ext, bytes)`` of one sample's image: its original bytes or a lossless PNG."""
    if kind in ORIGINAL_KINDS:
        return "jpg", Path(path).read_bytes()
    buf = io.BytesIO()
    load_rgb(path).save(buf, format="PNG", compress_level=6)
    return "png", buf.getvalue()


def dali_index_lines(tar_path: Path) -> list[str]:
    """DALI's v1.2 index of a tar written here: one line per sample (``ext offset size name`` per
    component, in tar order), after the ``v1.2 <samples>`` header line."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isreg():
                continue
            base = m.name.rsplit("/", 1)[-1]
            key, ext = base.split(".", 1)
            if key != last:
                samples.append([])
                last = key
            samples[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    return [f"v1.2 {len(samples)}"] + [" ".join(parts) for parts in samples]


def _write_shard(path: Path, samples: list[tuple[str, str, int, str]]) -> tuple[int, dict[str, int]]:
    """Write one shard atomically (temporary name, then rename) and its DALI index.

    Args:
        samples: ``(key, file, label, kind)`` in shard order.

    Returns:
        ``(bytes written, {kind: count} of re-encoded images)``.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    idx, idx_tmp = path.with_suffix(".idx"), path.with_name(f".{path.stem}.idx.tmp{os.getpid()}")
    reencoded: dict[str, int] = {}
    try:
        with open(tmp, "wb") as f:
            with TarWriter(f) as sink:
                for key, file, label, kind in samples:
                    ext, data = _encoded(file, kind)
                    if ext != "jpg":
                        reencoded[kind] = reencoded.get(kind, 0) + 1
                    sink.write({"__key__": key, ext: data, "cls": str(label)})
            f.flush()
            os.fsync(f.fileno())
        idx_tmp.write_text("\n".join(dali_index_lines(tmp)) + "\n")
        os.replace(tmp, path)
        os.replace(idx_tmp, idx)
    finally:
        tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)
    return path.stat().st_size, reencoded


def plan_shards(images: ImageList, seed: int, unit: str, size: int) -> list[list[tuple[str, str, int, str]]]:
    """The split's samples shuffled with ``seed`` and cut into shards of about ``size`` samples or
    bytes (each shard at least one sample): lists of ``(key, file, label, kind)``. Keys are the
    samples' positions in the shuffled order, nine digits."""
    kinds = images.kinds if images.kinds is not None else ["JPEG/RGB"] * len(images)
    order = np.random.default_rng(seed).permutation(len(images)).tolist()
    shards: list[list[tuple[str, str, int, str]]] = [[]]
    filled = 0
    for pos, i in enumerate(order):
        path, label = images.samples[i]
        weight = 1 if unit == "samples" else os.path.getsize(path)
        if shards[-1] and filled + weight > size:
            shards.append([])
            filled = 0
        shards[-1].append((f"{pos:09d}", path, label, kinds[i]))
        filled += weight
    return shards


def write_split(src: Path, out: Path, split: str, shard_size: str = "1000", seed: int = 0, workers: int | None = None,
                on_bad: str = "skip", overwrite: bool = False, progress: bool | None = None) -> SplitReport:
    """Write one split (see the module's docstring).

    Raises:
        ShardWriteError: ``<out>/<split>.json`` exists and not ``overwrite``.
        ValueError: a bad ``shard_size``; from the scan (``on_bad="error"`` and a bad file, nothing
            decodable).
        FileNotFoundError: the split folder is missing or empty.
        OSError: a shard cannot be written (the message names it); no partial shard is left.
    """
    index = out / f"{split}.json"
    if index.exists() and not overwrite:
        raise ShardWriteError(f"{index} exists: the {split} split is already written (--overwrite to write it again)")
    unit, size = parse_shard_size(shard_size)
    images = scan_image_folder(src / split, on_bad=on_bad)
    shards = plan_shards(images, seed, unit, size)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"{split}-{k:06d}.tar" for k in range(len(shards))]
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(images), desc=f"writing {split} shards", unit="img", disable=not show)
    sizes, kinds_done = [0] * len(shards), {}

    def one(k: int) -> None:
        try:
            sizes[k], reenc = _write_shard(out / names[k], shards[k])
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write shard {out / names[k]}: {exc.strerror or exc}") from exc
        for kind, n in reenc.items():
            kinds_done[kind] = kinds_done.get(kind, 0) + n
        bar.update(len(shards[k]))

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for f in [pool.submit(one, k) for k in range(len(shards))]:
            f.result()
    bar.close()
    reencoded = sum(kinds_done.values())
    spec = {
        "__kind__": INDEX_KIND, "wids_version": 1, "name": split,
        "shardlist": [{"url": n, "nsamples": len(s), "filesize": b} for n, s, b in zip(names, shards, sizes)],
        "classes": images.classes, "seed": seed, "source": str(src / split), "shard_size": shard_size,
        "encoded": {"original_jpeg": len(images) - reencoded, "png": reencoded, "png_kinds": kinds_done},
        "skipped": [list(s) for s in images.skipped],
    }
    keys = out / f"{split}-keys.tsv"
    keys.write_text("".join(f"{key}\t{name}\t{file}\n" for name, s in zip(names, shards) for key, file, _, _ in s))
    tmp = index.with_name(f".{index.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(spec, indent=1))
        os.replace(tmp, index)
    finally:
        tmp.unlink(missing_ok=True)
    return SplitReport(split, index, len(images), len(shards), sum(sizes), len(images) - reencoded, reencoded,
                       kinds_done, images.skipped)


def write_shards(src: str | os.PathLike, out: str | os.PathLike, shard_size: str = "1000", seed: int = 0,
                 workers: int | None = None, on_bad: str = "skip", overwrite: bool = False,
                 progress: bool | None = None) -> list[SplitReport]:
    """Write every split of the ImageFolder ``src`` (``train/``, ``val/`` when present) to ``out``.

    Raises:
        FileNotFoundError: ``src`` has no ``train/`` folder.
        ShardWriteError, ValueError, OSError: see :func:`write_split`.
    """
    src, out = Path(src), Path(out)
    if not (src / "train").is_dir():
        raise FileNotFoundError(f"{src} has no train/ folder: expected an ImageFolder {src}/train/<class>/<images> "
                                f"(and optionally {src}/val/)")
    return [write_split(src, out, split, shard_size, seed, workers, on_bad, overwrite, progress)
            for split in SPLITS if (src / split).is_dir()]


def shard_count_warning(report: SplitReport, ranks: int, workers: int) -> str | None:
    """A warning when the split has fewer than 4 × ranks × workers shards (each reader then gets
    fewer than 4 shards an epoch: a coarse shuffle, and any more readers are refused)."""
    readers = ranks * max(1, workers)
    if report.shards >= 4 * readers:
        return None
    return (f"{report.split}: {report.shards} shard(s) for {ranks} rank(s) x {max(1, workers)} worker(s) = {readers} "
            f"readers; at least {4 * readers} are advised (4 per reader) and {readers} are needed: write smaller "
            f"shards (--shard-size)")
