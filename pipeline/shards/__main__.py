"""``python -m pipeline.shards write SRC OUT``: an ImageFolder's splits as WebDataset tar shards.

Example (Fashion-MNIST as prepared by ``make train``)::

    python -m pipeline.shards write data/fashion-mnist data/fashion-mnist-shards --shard-size 1000
    python train.py --data data/fashion-mnist-shards
"""
from __future__ import annotations

import argparse
import sys

import torch

from .write import ShardWriteError, shard_count_warning, write_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write SRC's train/ and val/ splits as shards under OUT",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    w.add_argument("src", help="ImageFolder root with train/ (and val/)")
    w.add_argument("out", help="folder for the shards and their indexes (train.json, val.json)")
    w.add_argument("--shard-size", default="1000", help="samples (1000) or bytes (64MB, 1GB) per shard, about")
    w.add_argument("--seed", type=int, default=0, help="seed of the shuffle before writing")
    w.add_argument("-j", "--jobs", type=int, default=None, help="shards written at once (default: CPU count)")
    w.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                   help="a file PIL cannot decode: leave it out (listed in the index) or stop")
    w.add_argument("--ranks", type=int, default=max(1, torch.cuda.device_count()),
                   help="ranks the shards will feed (for the shard-count advice; default: GPUs here, or 1)")
    w.add_argument("--workers", type=int, default=2, help="loader workers per rank (for the shard-count advice)")
    w.add_argument("--overwrite", action="store_true", help="write a split again although its index exists")
    p.epilog = w.format_help()  # the whole manual in one --help
    args = p.parse_args(argv)
    try:
        reports = write_shards(args.src, args.out, args.shard_size, args.seed, args.jobs, args.on_bad_image,
                               args.overwrite)
    except (OSError, ValueError, ShardWriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for r in reports:
        enc = f"{r.original} original JPEG(s)"
        if r.reencoded:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(r.reencoded_kinds.items()))
            enc += f", {r.reencoded} re-encoded losslessly as PNG ({kinds})"
        print(f"{r.split}: {r.samples} samples in {r.shards} shards ({r.bytes / 2**20:.1f} MiB; {enc}); "
              f"{len(r.skipped)} file(s) left out -> {r.index}")
        advice = shard_count_warning(r, args.ranks, args.workers)
        if advice:
            print(f"warning: {advice}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
