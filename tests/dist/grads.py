"""Run under ``torchrun --nproc-per-node=2``: DDP gradients equal the mean of single-process ones.

argv: DATA_SPLIT OUT_JSON. Each rank reads its shard of one global batch (torch loader, 2 ranks);
rank 0 also computes, without DDP, the gradient of each half-batch (both ranks' micro-batches) and
compares the DDP gradient (after its all-reduce) with their mean. Checked twice: plain steps, and
``accum=2`` (two micro-batches per rank, ``no_sync`` on the first).
"""
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's modules, not an installed copy's

from model.distributed import init_from_env, destroy
from model.loss import SimSiamLoss
from model.precision import Precision
from model.step import train_step
from model.training import build_simsiam
from pipeline import build_loader, recipe
from pipeline.sources.imagefolder import scan_image_folder


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main():
    split, out = sys.argv[1], sys.argv[2]
    ctx = init_from_env("cpu")
    images = scan_image_folder(split)
    result = {}
    for accum in (1, 2):
        torch.manual_seed(0)
        built = build_simsiam(ctx, "resnet18", 64, 16, small_stem=True)
        reference = copy.deepcopy(built.model)  # same initial weights on every rank (same seed)
        crit, prec = SimSiamLoss(), Precision("off", ctx.device)
        opt = torch.optim.SGD(built.model.parameters(), lr=0.0)
        kw = dict(source=images, aug=recipe(8), batch_size=8, workers=0, world_size=ctx.world_size)
        loader = build_loader("torch", rank=ctx.rank, **kw)
        loader.set_epoch(0)
        train_step(built.step_model, crit, iter(loader), opt, prec, accum)
        ddp = grads(built.model)
        if ctx.is_main:
            per_batch = []
            for r in range(ctx.world_size):
                it = iter(build_loader("torch", rank=r, **kw))
                for _ in range(accum):
                    m = copy.deepcopy(reference)
                    b = next(it)
                    crit(*m(b.view1, b.view2)).backward()
                    per_batch.append(grads(m))
            mean = {k: sum(g[k] for g in per_batch) / len(per_batch) for k in per_batch[0]}
            result[f"accum{accum}"] = {"max_abs_diff": max_diff(ddp, mean), "params": len(mean),
                                       "one_batch_diff": max_diff(ddp, per_batch[0])}
    if ctx.is_main:
        with open(out, "w") as f:
            json.dump(result, f)
    destroy(ctx)


if __name__ == "__main__":
    main()
