"""Where DALI's CPU time goes: cost per operator of the SimSiam graph, by difference.

DALI reports no per-operator times on the CPU, so this script times graphs that differ by one
operator (read → + decode → + crop/resize → + normalise → + the colour ops, ...) on the same real
JPEGs, all in one process, interleaved over ``--repeats`` rounds so that load drifting on a shared
machine hits every variant alike, and prints each variant's images/s, its CPU milliseconds per image
(every thread of the process, ``time.process_time``: what a step costs whatever else shares the
cores) and its share of the full recipe's. The same images decoded with PIL and cropped
with torchvision v2 (the torch loader's decode + crop, one process) are timed alongside for scale.

    python bench/dali_ops.py --images 192 --size 224 --batch-size 64 --batches 3 --repeats 3 --threads 2

``--threads`` is DALI's ``num_threads``. The load average (``os.getloadavg``) is printed with
every round: compare variants within one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: see bench/trust.py

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from bench.photos import photo_folder  # noqa: E402
from pipeline.augment import recipe  # noqa: E402
from pipeline.backends.dali.graph import one_view  # noqa: E402
from pipeline.sources.imagefolder import scan_image_folder  # noqa: E402


def _crop(images, aug, antialias=True):
    return fn.random_resized_crop(images, size=[aug.size, aug.size], random_area=list(aug.crop_scale),
                                  random_aspect_ratio=list(aug.crop_ratio), num_attempts=10, antialias=antialias)


def _normalise(v, aug):
    return fn.crop_mirror_normalize(v, mirror=fn.random.coin_flip(probability=aug.flip_p), dtype=types.FLOAT,
                                    output_layout="CHW", mean=[m * 255 for m in aug.mean], std=[s * 255 for s in aug.std])


def variants(aug) -> dict:
    """name → graph function ``(encoded) -> outputs``; each adds one step to the one before it."""
    no_colour = aug.replace(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    no_blur = aug.replace(blur_p=0.0)

    def dec(e, **kw):
        return fn.decoders.image(e, device="cpu", output_type=types.RGB, **kw)
    return {
        "read": lambda e: e,
        "decode": lambda e: dec(e),
        "decode_fast_idct": lambda e: dec(e, use_fast_idct=True),
        "decode+2crops": lambda e: (lambda im: (_crop(im, aug), _crop(im, aug)))(dec(e)),
        "decode+2crops_no_antialias": lambda e: (lambda im: (_crop(im, aug, False), _crop(im, aug, False)))(dec(e)),
        "decode+2crops+normalise": lambda e: (lambda im: (_normalise(_crop(im, aug), aug),
                                                          _normalise(_crop(im, aug), aug)))(dec(e)),
        "recipe_no_colour": lambda e: (lambda im: (one_view(im, no_colour, "CHW", "float32"),
                                                   one_view(im, no_colour, "CHW", "float32")))(dec(e)),
        "recipe_no_blur": lambda e: (lambda im: (one_view(im, no_blur, "CHW", "float32"),
                                                 one_view(im, no_blur, "CHW", "float32")))(dec(e)),
        "recipe_full": lambda e: (lambda im: (one_view(im, aug, "CHW", "float32"),
                                              one_view(im, aug, "CHW", "float32")))(dec(e)),
    }


def dali_rate(graph, files, batch, threads, batches, seed=0) -> tuple[float, float]:
    """``(images/s, CPU ms per image)`` of ``graph`` over ``files`` (one warm-up batch untimed; CPU
    time of every thread of this process, ``time.process_time``)."""
    @pipeline_def(enable_conditionals=True)
    def pipe():
        encoded, _ = fn.readers.file(files=files, random_shuffle=False)
        out = graph(encoded)
        return out if isinstance(out, tuple) else (out,)
    p = pipe(batch_size=batch, num_threads=threads, device_id=None, seed=seed, prefetch_queue_depth=2)
    p.build()
    p.run()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        p.run()
    n = batch * batches
    rate, cpu_ms = n / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / n
    del p
    return rate, cpu_ms


def pil_rate(files, aug, n) -> tuple[float, float]:
    """``(images/s, CPU ms per image)`` of PIL decode + two torchvision v2 RandomResizedCrops (the torch
    loader's decode + crop), in this process, one thread."""
    import torch
    from torchvision.transforms import v2

    from pipeline.sources.imagefolder import load_rgb
    crop = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(aug.size, scale=aug.crop_scale, ratio=aug.crop_ratio,
                                                         antialias=True)])
    torch.set_num_threads(1)  # as in a DataLoader worker
    t0, c0 = time.perf_counter(), time.process_time()
    for f in files[:n]:
        im = load_rgb(f)
        crop(im), crop(im)
    return n / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=2, help="timed batches per measurement (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="DALI num_threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=None, help="comma list of variants")
    p.add_argument("--work", default="/tmp/dali_compare")
    a = p.parse_args(argv)
    images = scan_image_folder(photo_folder(Path(a.work), a.images))
    files = [s for s, _ in images.samples]
    aug = recipe(a.size)
    graphs = variants(aug)
    names = a.only.split(",") if a.only else list(graphs)
    runs = {n: [] for n in names + ["pil_decode+2crops"]}
    cpu = {n: [] for n in runs}
    for r in range(a.repeats):
        for n in names:
            ips, ms = dali_rate(graphs[n], files, a.batch_size, a.threads, a.batches, seed=r)
            runs[n].append(ips)
            cpu[n].append(ms)
        ips, ms = pil_rate(files, aug, a.batch_size)
        runs["pil_decode+2crops"].append(ips)
        cpu["pil_decode+2crops"].append(ms)
        print(json.dumps({"round": r, "loadavg_1m": round(os.getloadavg()[0], 2),
                          **{n: round(v[-1], 1) for n, v in runs.items()}}), flush=True)
    med = {n: statistics.median(v) for n, v in runs.items()}
    cpu_ms = {n: min(v) for n, v in cpu.items()}  # CPU work per image: the least is the least disturbed
    full = cpu_ms.get("recipe_full")
    print(f"{'variant':<28}{'images/s':>10}{'CPU ms/image':>14}{'share of full':>15}")
    for n in runs:
        share = f"{cpu_ms[n] / full:>14.0%}" if full else ""
        print(f"{n:<28}{med[n]:>10.1f}{cpu_ms[n]:>14.2f} {share}")
    print(json.dumps({"threads": a.threads, "batch": a.batch_size, "size": a.size, "images": a.images,
                      "loadavg_1m": round(os.getloadavg()[0], 2),
                      "median_images_per_s": {n: round(v, 1) for n, v in med.items()},
                      "cpu_ms_per_image": {n: round(v, 2) for n, v in cpu_ms.items()}}))


if __name__ == "__main__":
    main()
