"""kNN evaluation of any checkpoint: the monitor's weighted kNN on the whole train split.

``python knn_eval.py runs/<run>/checkpoint.pth`` (or ``backbone_<arch>.pth``) scores the frozen
backbone with the same k (200), temperature (0.1) and vote weighting (InstDisc, Wu et al. 2018,
§3.4; :func:`model.evaluate.knn_top1`) as the monitor in ``train.py``; the bank is the whole train
split by default, the queries the whole val split. ``--knn-bank N`` (with the run's ``--seed`` and
``--subset``) draws the bank exactly as the monitor does, so the score equals the monitor's last
one. ``--probe`` adds the L-BFGS linear probe and ``--pixels`` scores the raw pixels the same way.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from model.checkpoint import CheckpointError
from model.evaluate import extract_features, knn_top1, linear_probe_top1
from model.frozen import Pretrained, load_pretrained
from model.precision import AMP_MODES, Precision
from pipeline import recipe, sources
from pipeline.device import resolve_device
from pipeline.eval_data import EvalImages
from pipeline.workers import StopSignal, stop_signals_raise

DEFAULT_DATA = "data/fashion-mnist"
FEATURE_BATCH = 512  # the monitor's batch (train.py evaluate), so features match it bit for bit


def open_splits(data: str | Path, val_data: str | None = None, url_template: str | None = None,
                num_samples: int | None = None):
    """The train and val splits of ``data`` (an ImageFolder root, or shards: see
    :func:`pipeline.sources.open_splits`), with the loaders' scan and bad-file policy.

    Raises:
        FileNotFoundError: ``data`` or its train split is missing, or it has no val split (and no
            ``val_data``).
        ValueError: the two splits have different classes; from the openers.
    """
    train, val = sources.open_splits(data, num_samples=num_samples, url_template=url_template, val_data=val_data)
    if val is None:
        raise FileNotFoundError(f"{data} has no val split: evaluation needs {data}/train/<class>/<images> and "
                                f"{data}/val/<class>/<images>, the shards' val.json, or --val-data")
    return train, val


def num_classes(train, val_labels: torch.Tensor) -> int:
    """Classes of the data set: the train split's class list, or (shards without an index) the
    largest val label + 1."""
    classes = getattr(train, "classes", None)
    return len(classes) if classes is not None else int(val_labels.max()) + 1


def view_size(pretrained: Pretrained, image_size: int | None) -> int:
    """The evaluation view side: ``image_size`` if given, else the one the training run recorded.

    Raises:
        ValueError: neither is known (a bare backbone without its run's ``checkpoint.pth``).
    """
    size = image_size or pretrained.image_size
    if not size:
        raise ValueError(f"{pretrained.path} records no view size (no checkpoint.pth beside it): pass --image-size")
    return size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pretrained", metavar="CKPT_OR_BACKBONE", help="checkpoint.pth or backbone_<arch>.pth written by train.py")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="ImageFolder root with train/ and val/, or shards (the writer's folder, an index, a pattern)")
    p.add_argument("--val-data", default=None, help="the val split when --data holds none (e.g. a shard pattern)")
    p.add_argument("--shard-url", default=None, help="shards: where the index's relative names go ('{}' = the name)")
    p.add_argument("--image-size", type=int, default=None, help="view side (default: the training run's)")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1)
    p.add_argument("--knn-bank", type=int, default=None, help="train images in the bank (default: all)")
    p.add_argument("--knn-queries", type=int, default=None, help="val images classified (default: all)")
    p.add_argument("--subset", type=int, default=None, help="draw the bank from this seeded subset, as train.py --subset")
    p.add_argument("--seed", type=int, default=None, help="subset seed (default: the training run's, else 0)")
    p.add_argument("--probe", action="store_true", help="also the L-BFGS linear probe on the same features")
    p.add_argument("--pixels", action="store_true", help="also score the raw normalised pixels the same way")
    p.add_argument("--amp", choices=AMP_MODES, default="off", help="autocast for the feature pass (match the run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("-j", "--workers", type=int, default=2)
    args = p.parse_args(argv)
    if args.knn_k < 1 or not (math.isfinite(args.knn_t) and args.knn_t > 0):
        p.error(f"--knn-k must be >= 1 and --knn-t a finite positive number, got {args.knn_k} and {args.knn_t}")
    return args


def main(argv=None) -> dict:
    """Score the backbone; returns ``{"knn_top1", ["probe_top1"], ["pixels_knn_top1", ...], "bank", "queries"}``."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    precision = Precision(args.amp, device)
    pretrained = load_pretrained(args.pretrained)
    size = view_size(pretrained, args.image_size)
    seed = args.seed if args.seed is not None else int(pretrained.train_args.get("seed", 0))
    train, val = open_splits(args.data, args.val_data, args.shard_url)
    aug = recipe(size)
    bank = EvalImages(train.subset(args.subset, seed), aug, args.knn_bank, seed, args.workers)
    queries = EvalImages(val, aug, args.knn_queries, seed, args.workers)
    backbone = pretrained.backbone.to(device)
    fb, lb = extract_features(backbone, bank.batches(FEATURE_BATCH, device), precision.autocast)
    fq, lq = extract_features(backbone, queries.batches(FEATURE_BATCH, device), precision.autocast)
    result = {"knn_top1": knn_top1(fb, lb, fq, lq, args.knn_k, args.knn_t), "bank": len(bank), "queries": len(queries)}
    if args.probe:
        result["probe_top1"] = linear_probe_top1(fb, lb, fq, lq)
    if args.pixels:
        cpu = torch.device("cpu")
        pb, pq = (torch.cat([x.flatten(1) for x, _ in e.batches(4096, cpu)]) for e in (bank, queries))
        result["pixels_knn_top1"] = knn_top1(pb, lb, pq, lq, args.knn_k, args.knn_t)
        if args.probe:
            result["pixels_probe_top1"] = linear_probe_top1(pb, lb, pq, lq)
    print(f"{pretrained.path} ({pretrained.arch}{', small stem' if pretrained.small_stem else ''}, {size} px): "
          f"kNN top-1 {result['knn_top1']:.2f}% (k={args.knn_k}, t={args.knn_t}, bank {len(bank)} train images, "
          f"{len(queries)} val queries)")
    if args.probe:
        print(f"linear probe (L-BFGS) top-1 {result['probe_top1']:.2f}%")
    if args.pixels:
        print("raw pixels: kNN top-1 {:.2f}%{}".format(result["pixels_knn_top1"], f", probe {result['pixels_probe_top1']:.2f}%"
                                                       if args.probe else ""))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return result


if __name__ == "__main__":
    speaks = os.environ.get("LOCAL_RANK", "0") == "0"  # under torchrun: once per node, not once per rank
    try:
        with stop_signals_raise():  # its loader workers ignore SIGTERM / SIGINT (pipeline.workers): it stops them
            main()
    except (OSError, CheckpointError, ValueError, ImportError) as exc:
        sys.exit(f"error: {exc}" if speaks else 1)
    except (StopSignal, KeyboardInterrupt) as exc:
        code = exc.code if isinstance(exc, StopSignal) else 130
        if speaks:
            print(f"stopped by {getattr(exc, 'name', 'SIGINT')}", file=sys.stderr)
        sys.exit(code)
