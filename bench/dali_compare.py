"""Loader-only images/s: DALI (``pipeline.backends.dali.loader``) vs the torch loader on the same real JPEGs.

Both loaders deliver two views per image on the CPU with the same number of threads
(``--workers``: DataLoader worker processes for torch, DALI ``num_threads``). Two recipes:

- ``full``: the SimSiam recipe (crop, p=0.8 colour jitter, p=0.2 grey, p=0.5 blur, flip, normalise);
- ``decode_crop``: decode + random resized crop + flip + normalise (jitter, grey, blur off), to
  show what the colour / blur stage costs on the CPU.

The first ``--warmup`` batches of every loader (pipeline build, worker start) are not timed.
Data: the 20 ImageNet JPEGs of the foolbox wheel (512×512, one 1024×683), copied round-robin to
``--images`` files in two classes under ``--work``.

    .venv/bin/python bench/dali_compare.py --images 384 --size 224 --batch-size 64 --batches 5 --repeats 2
    .venv/bin/python bench/dali_compare.py --data data/fashion-mnist/train --images 8192 --size 28 \
        --batch-size 128 --batches 20 --loaders torch,dali,torchvision-gpu --recipes full   # pipeline.CPU_COST_MS

Prints one JSON line per loader and recipe (``images_per_s`` counts images, each giving two
views: the best of ``--repeats`` runs; the loaders' runs are interleaved because other jobs
share the cores, and ``loadavg_1m`` is printed with each line), then the DALI/torch ratios:
of the best runs, the median of the paired (same-round) runs, and the ratio of CPU milliseconds per
image (this process and its workers, ``psutil``): the comparison a shared, loaded machine distorts
least, since a loader's CPU work per image does not depend on how many other jobs share the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: see bench/trust.py

from pipeline import build_loader  # noqa: E402
from pipeline.augment import recipe  # noqa: E402
from bench.photos import measure_loader, photo_folder  # noqa: E402
from pipeline.sources.imagefolder import scan_image_folder  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=5, help="timed batches per measurement (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes / DALI threads")
    p.add_argument("--repeats", type=int, default=2, help="measurements per row; the best is kept")
    p.add_argument("--loaders", default="torch,dali")
    p.add_argument("--recipes", default="full,decode_crop")
    p.add_argument("--work", default="/tmp/dali_compare")
    p.add_argument("--data", default=None,
                   help="an ImageFolder split to read instead of the photos (--images of its files, drawn with seed 0), "
                        "e.g. data/fashion-mnist/train")
    a = p.parse_args(argv)

    if a.data:
        images = scan_image_folder(Path(a.data)).subset(a.images, 0)
    else:
        images = scan_image_folder(photo_folder(Path(a.work), a.images))
    recipes = {"full": recipe(a.size),
               "decode_crop": recipe(a.size).replace(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)}
    loaders = a.loaders.split(",")
    rows = []
    for rec in a.recipes.split(","):
        runs = {name: [] for name in loaders}
        cpu = {name: [] for name in loaders}
        for _ in range(a.repeats):  # loaders interleaved, so each pair of runs sees similar load
            for name in loaders:
                loader = build_loader(name, images, recipes[rec], batch_size=a.batch_size, workers=a.workers, device="cpu", seed=0)
                m = measure_loader(loader, a.batches, a.warmup)
                runs[name].append(m.images_per_s)
                cpu[name].append(m.cpu_ms_per_image)
                del loader
        for name in loaders:
            print(json.dumps({"loader": name, "recipe": rec, "images_per_s": round(max(runs[name]), 1),
                              "runs": [round(r, 1) for r in runs[name]],
                              "cpu_ms_per_image": round(min(cpu[name]), 2), "size": a.size, "batch": a.batch_size,
                              "workers": a.workers, "loadavg_1m": round(os.getloadavg()[0], 2)}), flush=True)
        if {"dali", "torch"} <= set(loaders):
            paired = sorted(d / t for d, t in zip(runs["dali"], runs["torch"]))
            rows.append({"recipe": rec, "ratio_dali_over_torch_best": round(max(runs["dali"]) / max(runs["torch"]), 2),
                         "ratio_paired_median": round(paired[len(paired) // 2], 2),
                         "cpu_cost_ratio_torch_over_dali": round(min(cpu["torch"]) / min(cpu["dali"]), 2)})
    for row in rows:
        print(json.dumps(row))

if __name__ == "__main__":
    main()
