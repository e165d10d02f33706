"""Loader-only images/s: FFCV (``pipeline.backends.ffcv.loader``) vs the torch loader on the same real JPEGs.

Both loaders deliver the full SimSiam recipe, two views per image, on the CPU: torch applies
torchvision v2 per image in DataLoader workers; FFCV decodes + crops + flips in numba threads and
runs colour jitter / grayscale / blur / normalise batched (``pipeline.gpu_augment``). FFCV's
numba compilation (first batch) is timed separately and kept out of the rate; so are the first
``--warmup`` batches of each loader. Extra FFCV rows, from the same compiled loader: the colour
stage at the caller's full torch thread count (instead of the cores FFCV's threads leave,
``pipeline.backends.ffcv.loader.colour_threads_for``), and without the colour stage (decode + crop + flip
alone).

Data: the 20 ImageNet JPEGs of the foolbox wheel (512×512, one 1024×683), copied to ``--images``
files in two classes under ``--work``.

    .venv/bin/python bench/ffcv_compare.py --images 320 --size 224 --batch-size 64 --batches 12

Prints one JSON line per measurement (images/s counts images, each giving two views) and the
ratio; note the machine's load (``os.getloadavg``) printed with each line: other jobs share the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: see bench/trust.py

import torch  # noqa: E402

from pipeline import build_loader  # noqa: E402
from pipeline.augment import recipe  # noqa: E402
from bench.photos import measure_loader, photo_folder  # noqa: E402
from pipeline.sources.imagefolder import scan_image_folder  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=12, help="timed batches per loader (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (FFCV: includes compilation)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes / FFCV threads")
    p.add_argument("--write-mode", default="jpg", choices=("jpg", "raw"), help="how FFCV stores the photos")
    p.add_argument("--work", default="/tmp/ffcv_compare")
    p.add_argument("--skip-torch", action="store_true")
    a = p.parse_args(argv)

    threads = torch.get_num_threads()
    work = Path(a.work)
    images = scan_image_folder(photo_folder(work, a.images))
    aug = recipe(a.size)
    common = dict(aug=aug, batch_size=a.batch_size, workers=a.workers, device="cpu", seed=0)
    results = {}

    cpu = {}

    def report(name: str, m, **extra) -> None:
        results[name], ips = m.images_per_s, m.images_per_s
        cpu[name] = m.cpu_ms_per_image
        print(json.dumps({"loader": name, "images_per_s": round(ips, 1), "views_per_s": round(2 * ips, 1),
                          "cpu_ms_per_image": round(m.cpu_ms_per_image, 2),
                          "size": a.size, "batch": a.batch_size, "workers": a.workers,
                          "loadavg_1m": round(os.getloadavg()[0], 2), **extra}), flush=True)

    if not a.skip_torch:
        m = measure_loader(build_loader("torch", images, **common), a.batches, a.warmup)
        report("torch", m, warmup_s=round(m.warm_s, 1))

    from pipeline.gpu_augment import GpuAugment
    torch.set_num_threads(threads)
    beton = work / f"photos-{a.images}-{a.write_mode}.beton"
    ffcv = build_loader("ffcv", images, beton=beton, write_mode=a.write_mode, jpeg_quality=90, **common)
    m = measure_loader(ffcv, a.batches, a.warmup)
    report("ffcv", m, warmup_incl_compile_s=round(m.warm_s, 1), write_mode=a.write_mode,
           colour_threads=ffcv.colour_threads)
    colour_threads = ffcv.colour_threads
    ffcv.colour_threads = None  # the colour stage at the caller's full thread count, as before colour_threads_for
    report("ffcv_colour_all_threads", measure_loader(ffcv, a.batches, 1), write_mode=a.write_mode,
           colour_threads=torch.get_num_threads())
    ffcv.colour_threads = colour_threads
    ffcv.colour = GpuAugment(aug.replace(jitter_p=0, grayscale_p=0, blur_p=0))  # normalise only
    report("ffcv_decode_crop_flip_only", measure_loader(ffcv, a.batches, 1), write_mode=a.write_mode)
    if "torch" in results:
        print(json.dumps({"ratio_ffcv_over_torch": round(results["ffcv"] / results["torch"], 2),
                          "cpu_cost_ratio_torch_over_ffcv": round(cpu["torch"] / cpu["ffcv"], 2)}))


if __name__ == "__main__":
    main()
