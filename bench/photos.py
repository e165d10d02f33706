"""Shared pieces of the loader comparison scripts (``dali_compare.py``, ``ffcv_compare.py``)."""
from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple


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


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process (all threads) and its live child
    processes (DataLoader workers): load-robust where wall-clock rates are not (psutil)."""
    import psutil
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


class LoaderRate(NamedTuple):
    """One measurement of a loader: warm-up seconds, images/s (wall clock) and CPU milliseconds per
    image (this process and its workers; on a shared machine the fairer comparison of two loaders)."""

    warm_s: float
    images_per_s: float
    cpu_ms_per_image: float


def measure_loader(loader, batches: int, warmup: int) -> LoaderRate:
    """Time ``batches`` batches of ``loader`` after ``warmup`` untimed ones (pipeline build, worker
    start, FFCV's numba compile; ``warmup`` >= 1); iteration continues across epochs (``set_epoch``)
    as needed. Images/s counts images; each gives two views. The window ends when the last batch
    arrives (before the loader is torn down)."""
    seen, t0, epoch, t_start = 0, time.time(), 0, time.time()
    warm_s, done, c0 = 0.0, 0, cpu_seconds()
    wall = cpu = 0.0
    while done < warmup + batches:
        loader.set_epoch(epoch)
        for b in loader:
            done += 1
            if done == warmup:
                warm_s = time.time() - t_start
                t0, c0 = time.time(), cpu_seconds()
            elif done > warmup:
                seen += b.view1.shape[0]
            if done >= warmup + batches:
                # read the clocks as the last batch arrives, not after the loop: leaving the loop
                # tears the loader down (DALI finishes its prefetched batches, DataLoader workers
                # finish theirs and exit), which is no part of delivering these batches
                wall, cpu = time.time() - t0, cpu_seconds() - c0
                break
        epoch += 1
    return LoaderRate(warm_s, seen / wall, 1000.0 * cpu / seen)


def rate(loader, batches: int, warmup: int) -> tuple[float, float]:
    """``(seconds spent on the warm-up batches, images/s over the next batches)``: see :func:`measure_loader`."""
    m = measure_loader(loader, batches, warmup)
    return m.warm_s, m.images_per_s
