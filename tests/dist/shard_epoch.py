"""Run under ``torchrun --nproc-per-node=R``: one epoch of the torch loader over tar shards per rank.

argv: INDEX WORKERS BATCH OUT_DIR. Every batch is followed by an all-reduce on the gloo group, as a
DDP step is: a rank with fewer batches than the others would leave them waiting there (the test's
timeout catches it). Each rank writes ``OUT_DIR/rank<r>.json``: its batch count, ``len(loader)``
and the ``"<shard>#<key>"`` of every sample it delivered.
"""
import json
import sys
from pathlib import Path

import torch

from model.distributed import destroy, init_from_env
from pipeline import build_loader, recipe


def main():
    index, workers, batch, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    ctx = init_from_env("cpu")
    try:
        loader = build_loader("torch", index, recipe(8), batch_size=batch, workers=workers, rank=ctx.rank,
                              world_size=ctx.world_size, record_keys=True)
        loader.set_epoch(3)
        n = 0
        for b in loader:
            ctx.all_reduce(torch.tensor([float(b.view1.shape[0])]))
            n += 1
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{ctx.rank}.json").write_text(json.dumps({"batches": n, "len": len(loader), "keys": loader.keys}))
    finally:
        destroy(ctx)


if __name__ == "__main__":
    main()
