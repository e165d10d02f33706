"""Data for ``bench/gpu_check.sh`` on a machine without data sets: generated photos, Fashion-MNIST.

The lent GPU machine has torch but no data set and no registry access, and only 64 MiB travels to
it per call, so the check makes its data there:

- ``photos``: ``N`` JPEGs (quality 90) of ``--width`` × ``--height`` px (default 500×375, the
  typical ImageNet photo size), in two classes. Content is smooth random colour fields plus fine
  noise, so the files (~40-70 KB at 500×375) decode at a cost close to natural photos; they are not
  natural images, so only throughput, never accuracy, may be read from runs on them.
- ``fmnist``: Fashion-MNIST's IDX files (the 31 MB of ``.gz`` files of Debian's
  ``dataset-fashion-mnist``, carried to the machine) written as the ImageFolder of
  :mod:`pipeline.datasets` (same folders, names and JPEG quality), in parallel processes, optionally
  only the first ``--limit`` images of each split.

Uses numpy and Pillow only.

    python bench/gpu_data.py OUT [--n 2048]                       # photos (the old form)
    python bench/gpu_data.py photos OUT [--n 2048] [--width 500 --height 375]
    python bench/gpu_data.py fmnist OUT --src DIR [--limit N]

Both do nothing for files that already exist.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

W, H = 500, 375


def one(args: tuple) -> None:
    """Write generated photo number ``i`` to ``path`` (deterministic in ``i``), ``w`` × ``h`` px."""
    path, i, w, h = args if len(args) == 4 else (*args, W, H)
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, 12, (h, w, 3))
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def write(out: str | Path, n: int = 2048, workers: int = 8, width: int = W, height: int = H) -> Path:
    """Write ``n`` generated photos as ``out/class_{0,1}/{i:05d}.jpg``; returns ``out``."""
    out = Path(out)
    jobs = []
    for i in range(n):
        d = out / f"class_{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:05d}.jpg"
        if not p.exists():
            jobs.append((str(p), i, width, height))
    if jobs:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(one, jobs, chunksize=32))
    return out


def _fmnist_chunk(job: tuple) -> None:
    """Write Fashion-MNIST images ``images[k]`` as ``paths[k]`` (grey → RGB JPEG, ``quality``)."""
    images, paths, quality = job
    for img, path in zip(images, paths):
        Image.fromarray(img, mode="L").convert("RGB").save(path, quality=quality)


def write_fmnist(out: str | Path, src: str | Path, limit: int | None = None, workers: int = 8,
                 quality: int = 95) -> Path:
    """Fashion-MNIST's IDX files in ``src`` → ``out/{train,val}/<k>_<class>/<index>.jpg``, the layout and
    JPEG quality of :func:`pipeline.datasets.prepare_fashion_mnist`, written by ``workers`` processes;
    ``limit``: only the first ``limit`` images of each split. Returns ``out``.

    Raises:
        FileNotFoundError: the IDX files are not in ``src`` (the message names the apt package).
        ValueError: a damaged IDX file.
    """
    from pipeline.datasets import CLASSES, SPLITS, _find, read_idx
    out, src = Path(out), Path(src)
    jobs = []
    for split, stem in SPLITS.items():
        images = read_idx(_find(src, f"{stem}-images-idx3-ubyte"))[:limit]
        labels = read_idx(_find(src, f"{stem}-labels-idx1-ubyte"))[:limit]
        for k, name in enumerate(CLASSES):
            (out / split / f"{k}_{name}").mkdir(parents=True, exist_ok=True)
        paths = [out / split / f"{int(y)}_{CLASSES[int(y)]}" / f"{i:05d}.jpg" for i, y in enumerate(labels)]
        todo = [i for i, p in enumerate(paths) if not p.exists()]
        step = max(1, -(-len(todo) // (4 * workers)))
        for c in range(0, len(todo), step):
            idx = todo[c:c + step]
            jobs.append((images[idx], [paths[i] for i in idx], quality))
    if jobs:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_fmnist_chunk, jobs))
    return out


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("photos", "fmnist", "-h", "--help"):
        argv.insert(0, "photos")  # the old form: gpu_data.py OUT [--n N]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    ph = sub.add_parser("photos", help="generated photo-sized JPEGs in two classes")
    ph.add_argument("out")
    ph.add_argument("--n", type=int, default=2048)
    ph.add_argument("--width", type=int, default=W)
    ph.add_argument("--height", type=int, default=H)
    ph.add_argument("--workers", type=int, default=8)
    fm = sub.add_parser("fmnist", help="Fashion-MNIST IDX files -> ImageFolder of JPEGs")
    fm.add_argument("out")
    fm.add_argument("--src", required=True, help="folder with the IDX (.gz) files")
    fm.add_argument("--limit", type=int, default=None, help="first N images of each split only")
    fm.add_argument("--workers", type=int, default=8)
    a = ap.parse_args(argv)
    try:
        if a.what == "photos":
            print(write(a.out, a.n, a.workers, a.width, a.height))
        else:
            print(write_fmnist(a.out, a.src, a.limit, a.workers))
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
