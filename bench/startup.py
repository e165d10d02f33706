"""Start-up: seconds from launching a process to its first two-view batch, ImageFolder vs tar shards.

For each size N (default 10,000 and 60,000 Fashion-MNIST training images), the same N images as
an ImageFolder (links to the prepared JPEG files) and as shards (``python -m pipeline.shards
write``, 1000 per shard or N/8 for small N; not timed); then, ``--repeats`` times each, a fresh process opens the source, builds the
torch loader and takes one batch, with an empty cache folder (``XDG_CACHE_HOME``: the
ImageFolder's first scan decodes every file; shards read their index). The operating system's
page cache is left as it is (warm for both). Prints one row per point and writes
``<out>/startup.json``::

    python bench/startup.py --sizes 10000,60000 --out bench/results/startup
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.datasets import prepare_fashion_mnist  # noqa: E402
from pipeline.shards.write import write_shards  # noqa: E402

FIRST_BATCH = """
import sys, time
t0 = float(sys.argv[2])
from pipeline import build_loader, recipe
from pipeline.sources import open_source
source = open_source(sys.argv[1])
loader = build_loader("torch", source, recipe(32), batch_size=256, workers=2)
loader.set_epoch(0)
next(iter(loader))
print(time.time() - t0)
"""


def linked_folder(src: Path, dst: Path, n: int) -> Path:
    """An ImageFolder ``dst/train`` of the first ``n`` train files of ``src`` (by class, in turn), as symlinks."""
    per_class = {c.name: sorted(c.iterdir()) for c in sorted((src / "train").iterdir())}
    classes = list(per_class)
    for i in range(n):
        c = classes[i % len(classes)]
        f = per_class[c][i // len(classes)]
        (dst / "train" / c).mkdir(parents=True, exist_ok=True)
        os.symlink(f.resolve(), dst / "train" / c / f.name)
    return dst


def first_batch_s(data: Path, cache: Path) -> float:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", FIRST_BATCH, str(data), repr(t0)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"first batch from {data} failed: {res.stderr.strip()[-1000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,60000", help="images per point, comma list")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per point (the median is reported)")
    p.add_argument("--data", default="data/fashion-mnist", help="prepared Fashion-MNIST (made when missing)")
    p.add_argument("--out", default=None, help="folder for startup.json (default: print only)")
    args = p.parse_args(argv)
    src = prepare_fashion_mnist(Path(args.data), progress=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            folder = linked_folder(src, Path(tmp) / f"folder{n}", n)
            shards = Path(tmp) / f"shards{n}"
            write_shards(folder, shards, str(min(1000, max(1, n // 8))), progress=False)  # >= 8 shards
            for kind, data in (("imagefolder", folder / "train"), ("shards", shards)):
                times = [first_batch_s(data, Path(tempfile.mkdtemp(dir=tmp))) for _ in range(args.repeats)]
                row = {"images": n, "source": kind, "first_batch_s": round(statistics.median(times), 2),
                       "runs_s": [round(t, 2) for t in times], "load": round(os.getloadavg()[0], 2)}
                rows.append(row)
                print(f"{n:>7} images  {kind:<12} first batch after {row['first_batch_s']:6.2f} s "
                      f"(runs {row['runs_s']}, load {row['load']})", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "startup.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
