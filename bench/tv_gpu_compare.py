"""``--loader torchvision-gpu`` vs the torch loader, and how its crop stage should lay out canvases.

Two measurements, both in one run so that their ratios see the same machine load:

1. **loaders** — loader-only images/s of ``torchvision-gpu`` and ``torch`` on the same real JPEGs
   (the 20 ImageNet JPEGs of the foolbox wheel, 512×512 and one 1024×683, copied round-robin to
   ``--images`` files), two recipes: ``full`` (the SimSiam recipe) and ``decode_crop`` (jitter,
   grey and blur off). Runs are interleaved (``--repeats``); the best run per row is printed with
   the 1-minute load, then the ratios (of the best runs, and the median of same-round pairs).
2. **canvas** — the crop stage alone (:func:`pipeline.backends.tv_gpu.roi_crop.crop_resize`, both views of a
   batch) on decoded photos of mixed sizes, for several ``max_pad`` values (0: one canvas per
   distinct size; inf: one canvas for the batch) and for one ``roi_align`` call per image. The
   sizes are the foolbox photos resized to a seeded mix of long sides 333-500 px and aspects
   1:1, 4:3, 3:4, 3:2, 2:3 (an assumed mix of web-photo shapes, not a measured data set's).
   Reports ms per batch (median of ``--repeats``), groups, and canvas pixels / real pixels; then
   again with one photo of the batch enlarged to 2048×1366 (an outlier, as large photos are in
   web-scraped data sets), where a single canvas would pad every image to the outlier's size.

    .venv/bin/python bench/tv_gpu_compare.py --images 384 --size 224 --batch-size 64 --batches 5 --repeats 3
    .venv/bin/python bench/tv_gpu_compare.py --device cuda --parts canvas --batch-size 256   # on a GPU

Each line is one JSON object; ``images_per_s`` counts images (each gives two views).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.photos import photo_folder, rate  # noqa: E402
from pipeline import build_loader  # noqa: E402
from pipeline.augment import recipe  # noqa: E402
from pipeline.backends.tv_gpu.crop_boxes import random_resized_crop_boxes  # noqa: E402
from pipeline.backends.tv_gpu.roi_crop import crop_resize, plan_groups  # noqa: E402
from pipeline.sources.imagefolder import scan_image_folder  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402

ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3)


def emit(**row) -> None:
    print(json.dumps({**row, "loadavg_1m": round(os.getloadavg()[0], 2)}), flush=True)


def compare_loaders(a) -> None:

    images = scan_image_folder(photo_folder(Path(a.work), a.images))
    recipes = {"full": recipe(a.size), "decode_crop": recipe(a.size).replace(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)}
    for rec in a.recipes.split(","):
        runs: dict[str, list[float]] = {"torch": [], "torchvision-gpu": []}
        for _ in range(a.repeats):  # interleaved, so each pair of runs sees similar load
            for name in runs:
                kw = dict(batch_size=a.batch_size, workers=a.workers, device=a.device, seed=0)
                loader = (build_loader("torch", images, recipes[rec], **kw) if name == "torch"
                          else build_loader("torchvision-gpu", images, recipes[rec], max_pad=a.max_pad, **kw))
                runs[name].append(rate(loader, a.batches, a.warmup)[1])
                del loader
        for name, r in runs.items():
            emit(part="loaders", loader=name, recipe=rec, images_per_s=round(max(r), 1), runs=[round(x, 1) for x in r],
                 size=a.size, batch=a.batch_size, workers=a.workers, device=a.device)
        paired = sorted(t / b for t, b in zip(runs["torchvision-gpu"], runs["torch"]))
        emit(part="loaders", recipe=rec, ratio_best=round(max(runs["torchvision-gpu"]) / max(runs["torch"]), 2),
             ratio_paired_median=round(paired[len(paired) // 2], 2))


def mixed_batch(n: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """``n`` decoded foolbox photos resized to a seeded mix of web-photo shapes, uint8 on ``device``."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        sys.exit("needs the foolbox wheel's photos: pip install --no-deps foolbox")
    src = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        long = int(rng.integers(333, 501))
        aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
        w, h = (long, round(long / aspect)) if aspect >= 1 else (round(long * aspect), long)
        with Image.open(src[i % len(src)]) as im:
            arr = np.array(im.convert("RGB").resize((w, h)))
        out.append(torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(device))
    return out


def compare_canvases(a, outlier: bool) -> None:
    device = torch.device(a.device)
    images = mixed_batch(a.batch_size, device)
    if outlier:
        big = torch.nn.functional.interpolate(images[-1][None].float(), size=(1366, 2048), mode="bilinear")
        images[-1] = big[0].round().clamp(0, 255).to(torch.uint8)
    shapes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    h, w = np.array(shapes).T
    rng = np.random.default_rng(1)
    boxes = np.stack([random_resized_crop_boxes(h, w, (0.2, 1.0), (3 / 4, 4 / 3), rng) for _ in range(2)])
    real = float((h * w).sum())

    def per_image():
        return torch.cat([roi_align(images[i][None].float(),
                                    torch.tensor([[0, *boxes[v, i]]], dtype=torch.float32, device=device),
                                    a.size, 1.0, 0, True) for v in range(2) for i in range(len(images))])

    cases = [(f"max_pad={p:g}", p) for p in (0.0, 0.1, 0.25, 0.5, 1.0, math.inf)] + [("per_image", None)]
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(a.repeats + 1):  # the first round warms up (allocator, threads)
        for name, p in cases:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            per_image() if p is None else crop_resize(images, boxes, a.size, p)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    for name, p in cases:
        groups = len(images) if p is None else len(plan_groups(shapes, p))
        canvas = real if p is None else sum(len(g) * max(shapes[i][0] for i in g) * max(shapes[i][1] for i in g)
                                            for g in plan_groups(shapes, p))
        emit(part="canvas", case=name, ms_per_batch=round(1e3 * statistics.median(times[name][1:]), 1),
             groups=groups, canvas_over_real_pixels=round(canvas / real, 2), distinct_sizes=len(set(shapes)),
             outlier=outlier,
             batch=a.batch_size, size=a.size, device=a.device, threads=torch.get_num_threads())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="loaders,canvas")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=5, help="timed batches per loader measurement (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes / reading threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--recipes", default="full,decode_crop")
    p.add_argument("--max-pad", type=float, default=None, help="torchvision-gpu canvas padding (default: the loader's)")
    p.add_argument("--work", default="/tmp/tv_gpu_compare")
    a = p.parse_args(argv)
    if a.max_pad is None:
        from pipeline.backends.tv_gpu.loader import DEFAULT_MAX_PAD
        a.max_pad = DEFAULT_MAX_PAD
    parts = a.parts.split(",")
    if "canvas" in parts:
        compare_canvases(a, outlier=False)
        compare_canvases(a, outlier=True)
    if "loaders" in parts:
        compare_loaders(a)


if __name__ == "__main__":
    main()
