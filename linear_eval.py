"""Linear evaluation of a frozen backbone: the paper's protocol, top to bottom.

``python linear_eval.py runs/<run>/checkpoint.pth --data DIR`` (or ``backbone_<arch>.pth``) trains a
linear classifier on the frozen backbone's pooled features and reports val top-1 / top-5 per epoch.
Option names follow the official ``main_lincls.py`` (facebookresearch/simsiam); defaults follow the
paper's appendix A, "Linear classification": LARS, batch 4096, base lr 0.02 (lr = 0.02 × batch / 256),
weight decay 0, momentum 0.9, 90 epochs, cosine decay per epoch; ``--optimizer sgd`` is the
MoCo baseline the paper also tried (base lr 30, batch 256; "~1% lower accuracy than LARS").
The classifier's weights start from N(0, 0.01), its bias at 0 (official code). The backbone stays
in eval mode without gradients, and a sanity check after every epoch proves that none of its
tensors (BN statistics included) changed.

Train split: RandomResizedCrop (area 0.08-1, torchvision's default as in the official code) +
horizontal flip, through ``--loader torch|dali|ffcv`` (each loader's first view of a two-view batch
whose recipe has colour jitter, grey and blur switched off). Val split: resize + centre crop at the
training view size, features extracted once (the backbone is frozen). ``--cache-features`` also
extracts the train features once, unaugmented, and trains the classifier on them: seconds instead
of minutes, the fast path on small data.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from knn_eval import DEFAULT_DATA, FEATURE_BATCH, num_classes, open_splits, view_size
from model.checkpoint import CheckpointError, load_checkpoint, save_atomic
from model.distributed import DistContext, destroy, init_from_env, wrap_ddp
from model.evaluate import extract_features, topk_correct
from model.frozen import check_unchanged, load_pretrained
from model.lars import LARS
from model.precision import AMP_MODES, Precision
from pipeline import AugmentConfig, build_loader, recipe
from pipeline.eval_data import EvalImages
from pipeline.sampling import check_batch_size, epoch_seed
from pipeline.workers import StopSignal, stop_signals_raise

OPTIMIZERS = {  # optimizer: (base lr, batch); paper appendix A
    "lars": (0.02, 4096),
    "sgd": (30.0, 256),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pretrained", metavar="CKPT_OR_BACKBONE", help="checkpoint.pth or backbone_<arch>.pth written by train.py")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"ImageFolder root with train/ and val/ (default {DEFAULT_DATA}), or shards (the writer's "
                        f"folder, an index, a pattern with --num-samples)")
    p.add_argument("--val-data", default=None, help="the val split when --data holds none (e.g. a shard pattern)")
    p.add_argument("--num-samples", type=int, default=None, help="shards given as a pattern: their total sample count")
    p.add_argument("--shard-url", default=None, help="shards: where the index's relative names go ('{}' = the name)")
    p.add_argument("--loader", choices=("torch", "dali", "ffcv"), default="torch", help="train-split pipeline (default torch)")
    p.add_argument("-j", "--workers", type=int, default=2, help="loader workers / threads (default 2)")
    p.add_argument("--image-size", type=int, default=None, help="view side (default: the training run's)")
    p.add_argument("--cache-features", action="store_true",
                   help="extract unaugmented train features once and train on them (fast path for small data)")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="lars",
                   help="lars (paper) or sgd (MoCo baseline); default lars")
    p.add_argument("--lars", dest="optimizer", action="store_const", const="lars", help="same as --optimizer lars (official flag)")
    p.add_argument("--epochs", type=int, default=90, help="default 90")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="global batch (default 4096 for lars, 256 for sgd)")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=None,
                   help="base lr, used as lr × batch / 256 (default 0.02 for lars, 30 for sgd)")
    p.add_argument("--momentum", type=float, default=0.9, help="default 0.9")
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=0.0, help="default 0")
    p.add_argument("--resume", default=None, help="linear_checkpoint.pth to continue from")
    p.add_argument("-e", "--evaluate", action="store_true", help="only evaluate the classifier of --resume on val")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs of this invocation")
    p.add_argument("--seed", type=int, default=0, help="order of the train split and the classifier's init")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--amp", choices=AMP_MODES, default="off", help="autocast for the backbone's forward (default off)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--out", default=None, help="output folder (default: linear_eval[_cached]/ beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    args = p.parse_args(argv)
    base_lr, batch = OPTIMIZERS[args.optimizer]
    args.lr = base_lr if args.lr is None else args.lr
    args.batch_size = batch if args.batch_size is None else args.batch_size
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite positive number, got {args.lr}")
    for name in ("momentum", "weight_decay"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            p.error(f"--{name.replace('_', '-')} must be a finite non-negative number, got {getattr(args, name)}")
    if args.epochs < 1 or args.batch_size < 1:
        p.error(f"--epochs and --batch-size must be >= 1, got {args.epochs} and {args.batch_size}")
    if args.evaluate and not args.resume:
        p.error("--evaluate needs --resume (the classifier to evaluate)")
    return args


def linear_recipe(size: int) -> AugmentConfig:
    """The official linear-classification train augmentation as the loaders' recipe:
    RandomResizedCrop(size) with torchvision's default area (0.08, 1) and aspect (3/4, 4/3), horizontal
    flip p = 0.5, ImageNet normalisation; no colour jitter, grey or blur."""
    return AugmentConfig(size=size, crop_scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def cosine_lr(init_lr: float, epoch: int, epochs: int) -> float:
    """The official ``adjust_learning_rate``: ``init_lr · ½(1 + cos(π · epoch / epochs))``, per epoch."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def linear_head(feat_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """The classifier: ``Linear(feat_dim, num_classes)``, weights N(0, 0.01), bias 0 (official code)."""
    head = nn.Linear(feat_dim, num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        head.bias.zero_()
    return head


def make_optimizer(params, args) -> torch.optim.Optimizer:
    """LARS (trust coefficient 0.001, every parameter adapted: the official ``--lars``) or SGD,
    both with lr = base lr × batch / 256."""
    init_lr = args.lr * args.batch_size / 256
    if args.optimizer == "lars":
        return LARS(params, lr=init_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=init_lr, momentum=args.momentum, weight_decay=args.weight_decay)


def features_of(backbone: nn.Module, feat_dim: int, images, aug, ctx: DistContext, precision: Precision,
                channels_last: bool, workers: int, gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Unaugmented features of ``images`` (an ImageList): resize + centre crop to ``aug.size``.

    Each rank extracts its slice (``ctx.shard_range``); with ``gather`` every rank gets all ``(N, D)``
    float32 features and ``(N,)`` int64 labels in order, else only its slice; on ``ctx.device``.
    """
    part = images.part(ctx.rank, ctx.world_size)
    if len(part):
        data = EvalImages(part, aug, workers=workers)
        feats, labels = extract_features(backbone, data.batches(FEATURE_BATCH, ctx.device, channels_last),
                                         precision.autocast)
    else:  # more ranks than images
        feats, labels = torch.empty(0, feat_dim), torch.empty(0, dtype=torch.long)
    feats, labels = feats.to(ctx.device), labels.to(ctx.device)
    return (ctx.gather_rows(feats), ctx.gather_rows(labels)) if gather else (feats, labels)


class FeatureBatches:
    """Batches of cached ``(features (b, D), labels (b,))``: a fresh order each epoch from
    ``(seed, epoch)``; rank ``r`` takes rows ``[r·b, (r+1)·b)`` of every global batch
    (``b = batch_size / world_size``); the last partial batch is dropped, as the loaders do.

    Raises:
        ValueError: the batch is larger than the cached split.
    """

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, ctx: DistContext):
        self.feats, self.labels, self.seed, self.ctx = feats, labels, seed, ctx
        self.per_rank = batch_size // ctx.world_size
        self._len = check_batch_size(batch_size, len(feats), "the cached train features")
        self.batch_size, self.epoch = batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.feats), generator=g).to(self.feats.device)
        for i in range(self._len):
            idx = order[i * self.batch_size + self.ctx.rank * self.per_rank:][:self.per_rank]
            yield self.feats[idx], self.labels[idx]


class ViewBatches:
    """``(view1, label)`` of a two-view loader: single-view batches without touching the loaders."""

    def __init__(self, loader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch.view1, batch.label


def train_epoch(backbone, head, batches, optimizer, precision, from_images: bool) -> torch.Tensor:
    """One pass of the classifier over ``batches``; the backbone runs frozen (no grad, eval mode).

    Returns:
        ``(3,)`` float32 sums on the device: loss × images, top-1 hits, images (no host read).
    """
    sums = None
    for x, y in batches:
        if from_images:
            with torch.no_grad(), precision.autocast():
                x = backbone(x)
        logits = head(x.float())
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = torch.full((1,), float(len(y)), device=logits.device)  # a fill, not a host-to-device copy
        step = torch.cat([loss.detach().view(1) * n, topk_correct(logits.detach(), y, (1,)), n])
        sums = step if sums is None else sums + step
    return sums


@torch.no_grad()
def evaluate(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, ctx: DistContext) -> tuple[float, float]:
    """Val top-1 and top-5 (percent) over every rank's slice of the cached val features."""
    counts = torch.cat([topk_correct(head(feats), labels, (1, 5)), torch.full((1,), float(len(labels)), device=feats.device)])
    top1, top5, n = ctx.all_reduce(counts).tolist()
    return 100.0 * top1 / n, 100.0 * top5 / n


def main(argv=None) -> dict:
    """Run linear evaluation (under torchrun: one process per device, gathered accuracy).

    Returns:
        ``{"out", "history": [{"epoch", "lr", "train_loss", "train_top1", "val_top1", "val_top5",
        "seconds"}, ...], "top1", "top5", "best_top1", "minutes", "pretrained": {...}}``.
    """
    args = parse_args(argv)
    ctx = init_from_env(args.device)
    try:
        return run(args, ctx)
    finally:
        destroy(ctx)


def run(args: argparse.Namespace, ctx: DistContext) -> dict:
    started = time.time()
    torch.manual_seed(args.seed)
    precision = Precision(args.amp, ctx.device)
    say = print if ctx.is_main else (lambda *a, **k: None)
    if args.batch_size % ctx.world_size:
        raise ValueError(f"batch size {args.batch_size} is not a multiple of the world size {ctx.world_size}")

    # 1. The frozen backbone (eval mode, no gradients) and its view size.
    pretrained = load_pretrained(args.pretrained)
    size = view_size(pretrained, args.image_size)
    backbone = pretrained.backbone.to(ctx.device,
                                      memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    info = {"path": str(pretrained.path), "kind": pretrained.kind, "arch": pretrained.arch,
            "small_stem": pretrained.small_stem, "image_size": size}

    # 2. Data: val features once; train through a loader (augmented) or cached features.
    with ctx.local_main_first():
        train_images, val_images = open_splits(args.data, args.val_data, args.shard_url, args.num_samples)
    eval_aug = recipe(size)
    val_feats, val_labels = features_of(backbone, pretrained.feat_dim, val_images, eval_aug, ctx, precision, args.channels_last,
                                        args.workers, gather=False)
    if args.cache_features:
        t0 = time.time()
        feats, labels = features_of(backbone, pretrained.feat_dim, train_images, eval_aug, ctx, precision, args.channels_last,
                                    args.workers, gather=True)
        say(f"cached {len(feats)} train features ({feats.shape[1]}-d) in {time.time() - t0:.1f} s")
        batches = FeatureBatches(feats, labels, args.batch_size, args.seed, ctx)
    else:
        batches = ViewBatches(build_loader(
            args.loader, source=train_images, aug=linear_recipe(size), batch_size=args.batch_size // ctx.world_size,
            device=ctx.device, workers=args.workers, channels_last=args.channels_last, seed=args.seed,
            rank=ctx.rank, world_size=ctx.world_size, dtype=torch.float16 if args.amp == "fp16" else torch.float32))

    # 3. The linear classifier (DDP under torchrun) and its optimiser.
    head = linear_head(pretrained.feat_dim, num_classes(train_images, ctx.gather_rows(val_labels)), args.seed).to(ctx.device)
    model = wrap_ddp(head, ctx)
    optimizer = make_optimizer(head.parameters(), args)
    init_lr = args.lr * args.batch_size / 256

    # 4. Resume, or a new output folder.
    start_epoch, history, best = 0, [], 0.0
    if args.resume:
        state = load_checkpoint(args.resume, required=("head", "optimizer", "epoch"))
        saved = state.get("pretrained", {})
        if saved.get("arch") != pretrained.arch or tuple(state["head"]["weight"].shape) != tuple(head.weight.shape):
            raise ValueError(f"{args.resume} holds a classifier for a {saved.get('arch')} on "
                             f"{saved.get('path')}, not for this {pretrained.arch} and data set")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history, best = state["epoch"], state.get("history", []), state.get("best_top1", 0.0)
        say(f"resumed {args.resume} at epoch {start_epoch}")
    if args.evaluate:
        top1, top5 = evaluate(head, val_feats, val_labels, ctx)
        say(f"val top-1 {top1:.2f}%  top-5 {top5:.2f}%")
        return {"out": None, "history": history, "top1": top1, "top5": top5, "best_top1": best, "minutes": 0.0,
                "pretrained": info}
    default_out = Path(args.pretrained).parent / ("linear_eval_cached" if args.cache_features else "linear_eval")
    out = Path(args.out) if args.out else (Path(args.resume).parent if args.resume else default_out)
    writer = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(out / "tb"))
    say(f"linear evaluation of {pretrained.path} ({pretrained.arch}{', small stem' if pretrained.small_stem else ''}, "
        f"{size} px, {pretrained.feat_dim}-d features): {args.optimizer}, batch {args.batch_size}, lr {init_lr:g}, "
        f"{args.epochs} epochs, {'cached features' if args.cache_features else f'--loader {args.loader}'}")

    # 5. Train, evaluate, check the backbone, checkpoint: every epoch.
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    show_bar = ctx.is_main and not args.no_progress and sys.stderr.isatty()
    for epoch in range(start_epoch, last_epoch):
        t0 = time.time()
        lr = cosine_lr(init_lr, epoch, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches.set_epoch(epoch)
        bar = tqdm(batches, total=len(batches), desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                   disable=not show_bar, leave=False, dynamic_ncols=True)
        sums = ctx.all_reduce(train_epoch(backbone, model, bar, optimizer, precision, not args.cache_features))
        loss_sum, hits, seen = sums.tolist()  # one host read per epoch
        top1, top5 = evaluate(head, val_feats, val_labels, ctx)
        check_unchanged(backbone, pretrained.reference)  # the official sanity check, every epoch
        best = max(best, top1)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_top1": 100.0 * hits / seen,
                  "val_top1": top1, "val_top5": top5, "seconds": time.time() - t0}
        history.append(record)
        say(f"epoch {epoch + 1}/{args.epochs}  lr {lr:.4g}  loss {record['train_loss']:.4f}  "
            f"train top-1 {record['train_top1']:.2f}%  val top-1 {top1:.2f}%  top-5 {top5:.2f}%  ({record['seconds']:.1f} s)")
        if ctx.is_main:
            for key in ("lr", "train_loss", "train_top1", "val_top1", "val_top5"):
                writer.add_scalar(f"linear/{key}", record[key], epoch + 1)
            save_atomic({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                         "best_top1": best, "history": history, "args": vars(args), "pretrained": info},
                        out / "linear_checkpoint.pth")
    summary = {"out": str(out), "history": history, "top1": history[-1]["val_top1"] if history else None,
               "top5": history[-1]["val_top5"] if history else None, "best_top1": best,
               "minutes": (time.time() - started) / 60, "pretrained": info}
    if ctx.is_main:
        writer.close()
        (out / "linear_eval.json").write_text(json.dumps(summary, indent=1))
        if history:
            say(f"linear evaluation: val top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}% after "
                f"{history[-1]['epoch']} epochs (best top-1 {best:.2f}%); {summary['minutes']:.1f} min; "
                f"{out}/linear_eval.json, {out}/linear_checkpoint.pth, TensorBoard {out}/tb")
    return summary


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
            print(f"stopped by {getattr(exc, 'name', 'SIGINT')} (linear_checkpoint.pth in the output folder resumes with --resume)", file=sys.stderr)
        sys.exit(code)
