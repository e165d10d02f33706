"""Write an ImageFolder of photo-sized JPEGs for ``bench/gpu_check.sh`` on a machine without data sets.

The lent GPU machine has torch but no data set and no registry access, and only 64 MiB travels to
it, so the check writes its own images: ``N`` JPEGs (quality 90) of 500×375 px, the typical
ImageNet photo size, in two classes. Content is smooth random colour fields plus fine noise, so the
files (~40-70 KB) decode at a cost close to natural photos; they are not natural images, so only
throughput, never accuracy, may be read from runs on them. Uses numpy and Pillow only.

``python bench/gpu_data.py OUT [--n 2048]``; does nothing when ``OUT`` already holds ``N`` files.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 500, 375


def one(args: tuple[str, int]) -> None:
    """Write image number ``i`` to ``path`` (deterministic in ``i``)."""
    path, i = args
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((W, H), Image.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, 12, (H, W, 3))
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def write(out: str | Path, n: int = 2048, workers: int = 8) -> Path:
    """Write ``n`` JPEGs as ``out/class_{0,1}/{i:05d}.jpg``; returns ``out``."""
    out = Path(out)
    jobs = []
    for i in range(n):
        d = out / f"class_{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:05d}.jpg"
        if not p.exists():
            jobs.append((str(p), i))
    if jobs:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(one, jobs, chunksize=32))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=8)
    a = ap.parse_args()
    print(write(a.out, a.n, a.workers))
