"""Shared pieces of the loader comparison scripts (``dali_compare.py``, ``ffcv_compare.py``)."""
from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from pathlib import Path


def photo_folder(work: Path, n: int) -> Path:
    """``work/photos/train/{a,b}``: the foolbox wheel's 20 ImageNet JPEGs (512×512, one 1024×683)
    copied round-robin to ``n`` files; reused when it already holds ``n`` files."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        sys.exit("needs the foolbox wheel's photos: pip install --no-deps foolbox")
    src = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))
    root = work / "photos" / "train"
    if root.exists() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return root
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        d = root / ("a" if i % 2 == 0 else "b")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(src[i % len(src)], d / f"{i:05d}_{src[i % len(src)].name}")
    return root


def rate(loader, batches: int, warmup: int) -> tuple[float, float]:
    """``(seconds spent on the warm-up batches, images/s over the next batches)``.

    The first ``warmup`` batches (pipeline build, worker start, FFCV's numba compile) are not timed;
    iteration continues across epochs (``set_epoch``) until ``warmup + batches`` batches were read.
    Images/s counts images; each gives two views.
    """
    seen, t0, epoch, t_start = 0, time.time(), 0, time.time()
    warm_s, done = 0.0, 0
    while done < warmup + batches:
        loader.set_epoch(epoch)
        for b in loader:
            done += 1
            if done == warmup:
                warm_s = time.time() - t_start
                t0 = time.time()
            elif done > warmup:
                seen += b.view1.shape[0]
            if done >= warmup + batches:
                break
        epoch += 1
    return warm_s, seen / (time.time() - t0)
