"""Soak one loader: many short epochs in one process, its resources measured after each.

``python tests/soak.py LOADER SPLIT OUT.json [--epochs 40] [--images 96] [--batch 32]`` builds
``LOADER`` (``torch``, ``dali``, ``ffcv``, ``torchvision-gpu``, ``synthetic``) directly, as
``train.py`` does on the CPU, reads every batch of ``--epochs`` epochs (``set_epoch`` each time;
DALI builds a new pipeline per epoch) and writes, per epoch, this process's resident memory
(MiB), threads, open file descriptors and live child processes (DataLoader workers...) to
``OUT.json``. The loader runs directly rather than through ``train.py``: the model's memory would
hide the loader's, and FFCV compiles its pipeline (20-50 s) once per process. For ``ffcv`` the
``.beton`` is written beside ``OUT.json`` first (not in the cache).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's modules, not an installed copy's

from pipeline import build_loader, recipe  # noqa: E402
from pipeline.sources.imagefolder import scan_image_folder  # noqa: E402


def measure(proc: psutil.Process) -> dict:
    return {"rss_mib": proc.memory_info().rss / 2**20, "threads": proc.num_threads(), "fds": proc.num_fds(),
            "children": len(proc.children(recursive=True))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("loader")
    p.add_argument("split")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=96, help="images per epoch (a seeded subset of the split)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=16)
    a = p.parse_args(argv)
    common = dict(batch_size=a.batch, device="cpu", seed=0)
    if a.loader == "synthetic":
        loader = build_loader("synthetic", num_samples=a.images, size=a.size, **common)
    else:
        images = scan_image_folder(a.split).subset(a.images, 0)
        common["aug"] = recipe(a.size)
        extra = {"beton": Path(a.out).with_suffix(".beton")} if a.loader == "ffcv" else {}
        loader = build_loader(a.loader, source=images, workers=a.workers, **common, **extra)
    proc, rows, t0 = psutil.Process(), [], time.time()
    for epoch in range(a.epochs):
        loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += int(batch.view1.shape[0] > 0)
        assert n == len(loader), (n, len(loader))
        del batch
        gc.collect()
        rows.append({"epoch": epoch + 1, "batches": n, "seconds": time.time() - t0, **measure(proc)})
    Path(a.out).write_text(json.dumps({"loader": a.loader, "epochs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
