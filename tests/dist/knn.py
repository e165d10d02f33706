"""Run under ``torchrun --nproc-per-node=2``: the kNN monitor's score under DDP equals one process's.

argv: DATA_ROOT OUT_JSON. Every rank extracts features for its slice of the bank and queries
(train.eval_slice / train.evaluate, gathered); rank 0 also scores the whole sets alone.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's modules, not an installed copy's

import train
from model.distributed import DistContext, destroy, init_from_env
from model.precision import Precision
from model.simsiam import SimSiam
from pipeline import recipe
from pipeline.eval_data import EvalImages
from pipeline.sources.imagefolder import scan_image_folder


def main():
    root, out = Path(sys.argv[1]), sys.argv[2]
    ctx = init_from_env("cpu")
    args = train.parse_args(["--image-size", "8", "--knn-k", "20", "--knn-bank", "250"])
    torch.manual_seed(0)
    model = SimSiam("resnet18", 64, 16, small_image=True)
    aug, prec = recipe(8), Precision("off", ctx.device)
    tr, va = scan_image_folder(root / "train"), scan_image_folder(root / "val")

    def sets(c):
        return (EvalImages(train.eval_slice(tr, args.knn_bank, 0, c), aug, None, 0, 0),
                EvalImages(train.eval_slice(va, args.knn_queries, 0, c), aug, None, 0, 0))
    bank, queries = sets(ctx)
    ddp = train.evaluate(model, bank, queries, args, ctx, prec)
    pixels = train.pixel_baseline(bank, queries, args, ctx)
    if ctx.is_main:
        alone = DistContext()
        single = train.evaluate(model, *sets(alone), args, alone, prec)
        single_pixels = train.pixel_baseline(*sets(alone), args, alone)
        with open(out, "w") as f:
            json.dump({"ddp": ddp, "single": single, "ddp_pixels": pixels, "single_pixels": single_pixels,
                       "slice": len(bank), "whole": len(tr.subset(args.knn_bank, 0))}, f)
    destroy(ctx)


if __name__ == "__main__":
    main()
