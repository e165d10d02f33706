"""SimSiam pre-training, the recipe top to bottom: args → processes → data → model → optimiser → loop.

Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021; option names follow the
official ``main_simsiam.py``. ``python train.py`` with no arguments prepares Fashion-MNIST (Debian
``dataset-fashion-mnist``) if needed and runs the CPU default described in README.md;
``torchrun --nproc-per-node=N train.py ...`` runs the same recipe on N processes (DDP).
"""
from __future__ import annotations

import os

# Before torch starts OpenMP: waiting OpenMP threads sleep instead of spinning. The loader's workers
# share the cores with the training threads, and spinning threads on oversubscribed cores made a CPU
# step 10-50x slower here (bench/README: 2-10 s against 0.19 s); setting it yourself wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import random
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from model.backbones import ARCHS, backbone_state_dict
from model.checkpoint import CheckpointError, load_checkpoint, load_latest, save_atomic, save_checkpoint
from model.distributed import DistContext, destroy, init_from_env
from model.evaluate import extract_features, knn_top1, linear_probe_top1
from model.interrupt import GracefulStop, TrainingInterrupted
from model.collapse import CollapseDetector
from model.loss import SIMILARITIES, SimSiamLoss
from model.precision import AMP_MODES, Precision
from model.plots import plot_run
from model.profiling import DEFAULT_SCHEDULE, StepProfiler, parse_schedule
from model.run_log import RunLog
from model.simsiam import PREDICTORS
from model.step import StatsReadback, train_step
from model.training import build_simsiam, recipe_sgd
from pipeline import LOADERS, build_loader, recipe
from pipeline.datasets import prepare_fashion_mnist
from pipeline.eval_data import EvalImages
from pipeline.sources import ImageList, ShardSource, open_splits
from pipeline.sources.imagefolder import write_skip_list

DEFAULT_DATA = "data/fashion-mnist"
RUN_DIR: Path | None = None  # where error.log goes once the run folder is known


def parse_every(text: str) -> tuple[str, float]:
    """``--save-every``: ``"500"`` or ``"500steps"`` → ``("steps", 500)``; ``"10min"`` / ``"10m"`` →
    ``("seconds", 600)``; ``"90s"`` → ``("seconds", 90)``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(steps?|min|m|s)?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"want N steps (500, 500steps) or a time (10min, 90s), got {text!r}")
    value, unit = float(m.group(1)), m.group(2) or "steps"
    if unit.startswith("step"):
        return "steps", int(value)
    return "seconds", value * (60 if unit in ("min", "m") else 1)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default shown once (help texts that name theirs keep that one)."""

    def _get_help_string(self, action):
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default=DEFAULT_DATA,
                   help="ImageFolder root with train/ and val/ splits (the default is prepared from Fashion-MNIST when "
                        "missing), or tar shards: the folder of python -m pipeline.shards write (train.json, val.json), "
                        "an index .json, or a pattern (train-{000000..000127}.tar, pipe:CMD) with --num-samples")
    d.add_argument("--val-data", default=None,
                   help="the val split for the kNN monitor when --data does not hold one (a split folder or shards)")
    d.add_argument("--num-samples", type=int, default=None,
                   help="shards given as a pattern: their total sample count (an index knows it)")
    d.add_argument("--shard-url", default=None,
                   help="shards: where the index's relative names go, '{}' for the name, e.g. "
                        "'pipe:aws s3 cp s3://bucket/shards/{} -' (default: beside the index)")
    d.add_argument("--shards-resampled", action="store_true",
                   help="shards: each loader worker draws shards with replacement (seeded by seed, epoch, rank, worker); "
                        "an epoch is --epoch-samples samples, not a pass over the data")
    d.add_argument("--epoch-samples", type=int, default=None,
                   help="--shards-resampled: samples per epoch over all ranks (default: the shards' sample count)")
    d.add_argument("--shuffle-buffer", type=int, default=1000,
                   help="shards, --loader torch / torchvision-gpu: samples each loader worker shuffles through")
    d.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="shards, --loader torch / torchvision-gpu: stop once more than this share of an epoch's samples "
                        "were bad (listed in <out>/skipped.txt; --loader dali stops on the first)")
    d.add_argument("--record-keys", default=None, help=argparse.SUPPRESS)  # shards: write each rank's sample keys here
    d.add_argument("--loader", choices=LOADERS, default="torch", help="data pipeline backend")
    d.add_argument("-j", "--workers", type=int, default=2, help="loader worker processes / threads per rank")
    d.add_argument("--image-size", type=int, default=32, help="view side in pixels")
    d.add_argument("--min-crop-scale", type=float, default=0.2, help="RandomResizedCrop minimum area (paper: 0.2)")
    d.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                   help="a file that cannot be decoded: skip it (listed in <out>/skipped.txt) or stop before the first step")
    d.add_argument("--subset", type=int, default=None, help="train on a seeded random subset of this many images (default: all)")
    d.add_argument("--dali-cpu-decode", action="store_true",
                   help="--loader dali on a GPU: decode JPEGs on the CPU, augment on the GPU")
    d.add_argument("--dali-prefetch", type=int, default=2, help="--loader dali: batches DALI prepares ahead")
    d.add_argument("--dali-hw-decoder-load", type=float, default=None,
                   help="--loader dali on a GPU: share of JPEGs sent to the hardware decoder (default: DALI's 0.65)")
    d.add_argument("--dali-no-mmap", action="store_true",
                   help="--loader dali from shards: read the tars with plain reads, not mapped (network filesystems)")
    d.add_argument("--synthetic-size", type=int, default=60000, help="images per epoch of --loader synthetic")
    d.add_argument("--ffcv-beton", default=None,
                   help="--loader ffcv: .beton to read (default: written once next to the split, under .ffcv/)")
    d.add_argument("--ffcv-order", choices=("random", "quasi_random", "sequential"), default="random",
                   help="--loader ffcv: sample order (quasi_random for data larger than RAM)")
    d.add_argument("--ffcv-os-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="--loader ffcv: let the OS page cache hold the .beton")
    d.add_argument("--ffcv-max-resolution", type=int, default=None,
                   help="--loader ffcv: longest stored side when writing (default: full size, within FFCV's page)")
    d.add_argument("--ffcv-write-mode", choices=("raw", "jpg", "smart", "proportion"), default="raw",
                   help="--loader ffcv: how images are stored when writing")
    m = p.add_argument_group("model")
    m.add_argument("-a", "--arch", choices=ARCHS, default="resnet18", help="torchvision ResNet backbone")
    m.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=False,
                   help="3x3 stride-1 stem without max-pool, for inputs of 64 px or less (paper's CIFAR setting); "
                        "4x the compute of the standard stem at the same size")
    m.add_argument("--dim", type=int, default=2048, help="projector width")
    m.add_argument("--pred-dim", type=int, default=512, help="predictor bottleneck width")
    m.add_argument("--proj-layers", type=int, choices=(2, 3), default=3, help="projector depth (paper CIFAR appendix: 2)")
    o = p.add_argument_group("optimisation (official recipe)")
    o.add_argument("--epochs", type=int, default=3, help="epochs to train")
    o.add_argument("-b", "--batch-size", type=int, default=256,
                   help="global batch: images per optimiser step over all ranks and --accum micro-batches "
                        "(each image gives two views)")
    o.add_argument("--accum", type=int, default=1,
                   help="micro-batches per optimiser step (gradient accumulation); per-rank micro-batch = "
                        "batch / (world size x accum)")
    o.add_argument("--lr", type=float, default=0.05, help="base lr; the lr used is lr x batch / 256")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=1e-4, help="SGD weight decay")
    o.add_argument("--fix-pred-lr", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the predictor lr constant (paper §4.2, Tab. 1c)")
    o.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear lr warm-up (default: 10 epochs for batch >= 1024 (paper Tab. 2), capped at half the run; else 0)")
    a = p.add_argument_group("ablations (paper §4)")
    a.add_argument("--stop-grad", action=argparse.BooleanOptionalAction, default=True, help="stop-gradient on z")
    a.add_argument("--predictor", choices=PREDICTORS, default="learned", help="predictor MLP (Tab. 1)")
    a.add_argument("--similarity", choices=SIMILARITIES, default="cosine", help="similarity in the loss (§4.5, Tab. 4)")
    a.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True, help="symmetrised loss (§4.6, Tab. 5)")
    f = p.add_argument_group("performance")
    f.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    f.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels_last (NHWC) model and views")
    f.add_argument("--amp", choices=AMP_MODES, default="off", help="mixed precision")
    f.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm across ranks (apex when importable, else torch; plain BN on the CPU)")
    f.add_argument("--compile", action="store_true", help="torch.compile the model")
    f.add_argument("--profile", action="store_true",
                   help="torch.profiler trace of a few steps: <out>/profile/tb (TensorBoard) and <out>/profile/trace.json "
                        "(Perfetto); summarise with bench/trace_summary.py")
    f.add_argument("--profile-schedule", default=",".join(map(str, DEFAULT_SCHEDULE)), type=parse_schedule,
                   help="profiler wait,warmup,active steps")
    e = p.add_argument_group("monitoring, checkpoints")
    e.add_argument("--knn", action=argparse.BooleanOptionalAction, default=True, help="kNN monitor + linear probe each epoch")
    e.add_argument("--knn-k", type=int, default=200, help="kNN neighbours (InstDisc)")
    e.add_argument("--knn-t", type=float, default=0.1, help="kNN temperature (InstDisc)")
    e.add_argument("--knn-bank", type=int, default=10000, help="train images in the kNN bank (0: all)")
    e.add_argument("--knn-queries", type=int, default=0, help="val images classified (0: all)")
    e.add_argument("--log-every", type=int, default=20,
                   help="steps between read-backs of loss and z-std (the only host syncs of the loop)")
    e.add_argument("--out", default=None, help="run folder for checkpoints and logs (default: runs/<time>)")
    e.add_argument("--resume", default=None,
                   help="checkpoint to resume from, or 'auto': the newest valid one in --out (fresh start if none)")
    e.add_argument("--save-every", type=parse_every, default=None,
                   help="also checkpoint mid-epoch every N steps (500, 500steps) or minutes (10min); default: epoch ends")
    e.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs of this invocation")
    e.add_argument("--seed", type=int, default=0, help="seed of the order, augmentations and initialisation")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown on a terminal only; otherwise one line per epoch)")
    args = p.parse_args(argv)
    for name in ("lr", "wd", "momentum", "knn_t"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name in ("lr", "knn_t") and value == 0):
            p.error(f"--{name.replace('_', '-')} must be a finite {'positive' if name in ('lr', 'knn_t') else 'non-negative'} "
                    f"number, got {value}")
    if args.num_samples is not None and args.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.epoch_samples is not None and not args.shards_resampled:
        p.error("--epoch-samples sets the length of a resampled epoch: add --shards-resampled")
    if args.epoch_samples is not None and args.epoch_samples < 1:
        p.error(f"--epoch-samples must be >= 1, got {args.epoch_samples}")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        p.error(f"--max-bad-fraction must be a share in [0, 1], got {args.max_bad_fraction}")
    if args.shuffle_buffer < 1:
        p.error(f"--shuffle-buffer must be >= 1, got {args.shuffle_buffer}")
    for name in ("epochs", "knn_bank", "knn_queries"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("accum", "log_every", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.resume == "auto" and args.out is None:
        p.error("--resume auto looks for checkpoints in --out: give --out DIR")
    if args.warmup_epochs is None:
        args.warmup_epochs = min(10.0, args.epochs / 2) if args.batch_size >= 1024 else 0.0
    return args


def per_rank_batch(global_batch: int, world_size: int, accum: int) -> int:
    """Images per micro-batch on one rank: ``global_batch / (world_size × accum)``.

    Raises:
        ValueError: it does not divide (one line, with the nearest batches that do).
    """
    parts = world_size * accum
    if global_batch % parts:
        lo, hi = global_batch // parts * parts, (global_batch // parts + 1) * parts
        raise ValueError(f"-b/--batch-size {global_batch} is the global batch and must divide by world size "
                         f"{world_size} x --accum {accum} = {parts}; use {lo or hi} or {hi}")
    return global_batch // parts


def lr_lambdas(groups: list[dict], total_steps: int, warmup_steps: int):
    """Per-group lr factor by iteration: linear warm-up, then cosine decay to 0 (SGDR, Loshchilov &
    Hutter 2017, without restarts); groups tagged ``fix_lr`` stay at 1 after warm-up."""
    def cosine(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    def fixed(step):
        return (step + 1) / warmup_steps if step < warmup_steps else 1.0
    return [fixed if g["fix_lr"] else cosine for g in groups]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def scores(fb, lb, fq, lq, args) -> dict:
    """kNN top-1 and linear-probe top-1 (percent) of query features ``fq`` against bank ``fb``."""
    return {"knn_top1": knn_top1(fb, lb, fq, lq, args.knn_k, args.knn_t),
            "probe_top1": linear_probe_top1(fb, lb, fq, lq)}


def eval_slice(images, limit: int, seed: int, ctx: DistContext):
    """This rank's contiguous slice of the seeded evaluation subset (``limit`` 0: all images)."""
    return images.subset(limit or None, seed).part(ctx.rank, ctx.world_size)


def evaluate(model, bank: EvalImages | None, queries: EvalImages | None, args, ctx: DistContext, precision) -> dict:
    """:func:`scores` of the frozen backbone's features on the val split. Each rank extracts its
    slice of the bank and queries; rank 0 scores the gathered features and shares the result."""
    if bank is None:
        return {}
    batch = 512
    fb, lb = extract_features(model.backbone, bank.batches(batch, ctx.device, args.channels_last), precision.autocast)
    fq, lq = extract_features(model.backbone, queries.batches(batch, ctx.device, args.channels_last), precision.autocast)
    fb, lb, fq, lq = (ctx.gather_rows(t) for t in (fb, lb, fq, lq))
    return ctx.broadcast_object(scores(fb, lb, fq, lq, args) if ctx.is_main else None)


def pixel_baseline(bank: EvalImages, queries: EvalImages, args, ctx: DistContext) -> dict:
    """:func:`scores` of the raw normalised pixels: the bar a learned representation should clear."""
    cpu = torch.device("cpu")
    fb, fq = (ctx.gather_rows(torch.cat([x.flatten(1) for x, _ in e.batches(4096, cpu)])) for e in (bank, queries))
    lb, lq = ctx.gather_rows(bank.labels), ctx.gather_rows(queries.labels)
    return ctx.broadcast_object(scores(fb, lb, fq, lq, args) if ctx.is_main else None)


def main(argv=None) -> dict:
    """Parse ``argv``, join the process group (under torchrun), train, leave the group."""
    args = parse_args(argv)
    ctx = init_from_env(args.device)
    try:
        return train(args, ctx)
    finally:
        destroy(ctx)


def train(args: argparse.Namespace, ctx: DistContext) -> dict:
    global RUN_DIR
    RUN_DIR = None
    started = time.time()
    say = print if ctx.is_main else (lambda *a, **k: None)
    if not ctx.is_main:
        warnings.filterwarnings("ignore")  # rank 0 speaks

    # 1. Device, precision, seed, batch per rank.
    device = ctx.device
    precision = Precision(args.amp, device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    micro = per_rank_batch(args.batch_size, ctx.world_size, args.accum)
    out = Path(args.out) if args.out else (Path(args.resume).parent if args.resume else None)
    if out is None:
        out = Path("runs") / ctx.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume or not (out / "skipped.txt").exists():
            (out / "skipped.txt").write_text("")  # its presence says the check ran; bad shard samples are appended
    ctx.barrier()

    # 2. Data: prepare the default data set, open the splits (an ImageFolder is scanned once per node;
    #    shards are named by an index or a pattern, nothing is read), build the two-view loader.
    aug = recipe(args.image_size, args.min_crop_scale)
    train_images = val_images = None
    view_dtype = torch.float16 if args.amp == "fp16" else torch.float32
    common = dict(batch_size=micro, device=device, channels_last=args.channels_last, seed=args.seed, dtype=view_dtype,
                  rank=ctx.rank, world_size=ctx.world_size)
    with ctx.local_main_first():
        if args.loader != "synthetic":
            data = Path(args.data)
            if args.data == DEFAULT_DATA and not (data / "train").exists():
                say(f"preparing Fashion-MNIST as JPEG files under {data} (once)")
                prepare_fashion_mnist(data, progress=ctx.is_main)
            train_images, val_images = open_splits(args.data, args.on_bad_image, args.num_samples, args.shard_url,
                                                   args.val_data)
            train_images = train_images.subset(args.subset, args.seed)
            if args.shards_resampled:
                if not isinstance(train_images, ShardSource):
                    raise ValueError(f"--shards-resampled draws tar shards; --data {args.data} is not shards "
                                     f"(write them with python -m pipeline.shards write)")
                train_images = train_images.resample(args.epoch_samples)
        if args.loader == "synthetic":
            loader = build_loader("synthetic", num_samples=args.synthetic_size // ctx.world_size,
                                  size=args.image_size, **common)
        else:
            extra = {}
            if args.loader == "ffcv":
                extra = dict(beton=args.ffcv_beton, order=args.ffcv_order, os_cache=args.ffcv_os_cache,
                             max_resolution=args.ffcv_max_resolution, write_mode=args.ffcv_write_mode)
            elif args.loader == "dali":
                extra = dict(cpu_decode=args.dali_cpu_decode, prefetch=args.dali_prefetch)
                if args.dali_hw_decoder_load is not None:
                    extra["hw_decoder_load"] = args.dali_hw_decoder_load
            if isinstance(train_images, ShardSource) and args.loader != "ffcv":
                # what applies to each shard backend: DALI cannot skip a bad sample (it stops on the first
                # and names it in the skip log) and reads in its own order (no shuffle buffer)
                extra.update(skip_log=out / ("skipped.txt" if ctx.is_main else f"skipped.rank{ctx.rank}.txt"),
                             record_keys=args.record_keys is not None)
                if args.loader == "dali":
                    extra["dont_use_mmap"] = args.dali_no_mmap
                else:
                    extra.update(shuffle_buffer=args.shuffle_buffer, max_bad_fraction=args.max_bad_fraction)
            loader = build_loader(args.loader, source=train_images, aug=aug, workers=args.workers, **common, **extra)
    steps_per_epoch = len(loader) // args.accum
    if steps_per_epoch < 1:
        raise ValueError(f"--accum {args.accum} needs {args.accum} batches per epoch, but each rank has {len(loader)}")

    # 3. Model: SimSiam encoder + predictor; SyncBN, channels_last, DDP, compile.
    built = build_simsiam(ctx, args.arch, args.dim, args.pred_dim, args.small_stem, args.proj_layers, args.predictor,
                          sync_bn=args.sync_bn, channels_last=args.channels_last, compile=args.compile)
    model = built.model

    # 4. Loss, optimiser (lr = base lr × global batch / 256), per-iteration schedule.
    criterion = SimSiamLoss(args.stop_grad, args.similarity, args.symmetric)
    optimizer = recipe_sgd(model, args.lr * args.batch_size / 256, args.momentum, args.wd, args.fix_pred_lr)
    groups = model.param_groups(args.fix_pred_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambdas(groups, args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)))

    # 5. Resume (a file, or 'auto': the newest valid checkpoint in --out), or start a new run folder.
    if ctx.is_main:
        RUN_DIR = out
        lists = [i for i in (train_images, val_images) if isinstance(i, ImageList)]
        if lists:
            write_skip_list(lists, out / "skipped.txt")
    state = None
    if args.resume == "auto":
        found = load_latest(out)
        if found is not None:
            resume_path, state = found
        else:
            say(f"--resume auto: no checkpoint in {out} yet; starting fresh")
    elif args.resume:
        resume_path, state = Path(args.resume), load_checkpoint(args.resume)
    start_epoch, start_step, history, curve, partial = 0, 0, [], [], {}
    if state is not None:
        saved = state.get("args", {})
        for key in ("arch", "dim", "pred_dim", "proj_layers", "small_stem", "predictor"):
            if key in saved and saved[key] != getattr(args, key):
                raise CheckpointError(f"checkpoint {resume_path} was written with --{key.replace('_', '-')} "
                                      f"{saved[key]}, this run asks for {getattr(args, key)}; use the same model options")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state.get("scaler", {}))
        set_rng_state(state["rng"])
        start_epoch, start_step = state["epoch"], state.get("step", 0)
        history, curve, partial = state.get("history", []), state.get("curve", []), state.get("partial", {})
        if saved.get("world_size", ctx.world_size) != ctx.world_size:
            say(f"note: checkpoint written by {saved['world_size']} process(es), resumed by {ctx.world_size}: "
                f"the rest of the epoch's order differs from the original run's")
        say(f"resumed from {resume_path} at epoch {start_epoch + 1}, step {start_step}/{steps_per_epoch}"
            if start_step else f"resumed from {resume_path} after epoch {start_epoch}")
    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))

    # 6. kNN monitor on the val split (each rank decodes its slice), first on the randomly initialised model.
    bank = queries = None
    if args.knn and val_images is not None:
        bank = EvalImages(eval_slice(train_images, args.knn_bank, args.seed, ctx), aug, None, args.seed, args.workers)
        queries = EvalImages(eval_slice(val_images, args.knn_queries, args.seed, ctx), aug, None, args.seed, args.workers)
    if bank is not None and start_epoch == 0 and start_step == 0:
        init = evaluate(model, bank, queries, args, ctx, precision)
        pixels = pixel_baseline(bank, queries, args, ctx)
        history.append({"epoch": 0, **init, **{f"pixels_{k}": v for k, v in pixels.items()}})
        say(f"random init: kNN top-1 {init['knn_top1']:.2f}%  linear probe {init['probe_top1']:.2f}%")
        say(f"raw pixels:  kNN top-1 {pixels['knn_top1']:.2f}%  linear probe {pixels['probe_top1']:.2f}%")
        if writer:
            for k, v in init.items():
                writer.add_scalar(f"eval/{k}", v, 0)

    def checkpoint(epoch: int, step: int, totals: dict) -> Path:
        """Rank 0: the position 'next: step ``step`` of epoch ``epoch``' with everything to resume it."""
        return save_checkpoint({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": precision.state_dict(), "epoch": epoch, "step": step, "partial": totals if step else {},
            "rng": rng_state(), "history": history, "curve": curve,
            "args": {**vars(args), "world_size": ctx.world_size}}, out)

    # 7. Train: read scalars back every --log-every steps; stop cleanly on SIGTERM/SIGINT.
    log = RunLog(curve, CollapseDetector(args.dim, args.similarity), writer,
                 tqdm.write if ctx.is_main else (lambda *a, **k: None))
    save_unit, save_every = args.save_every or (None, None)
    last_save_time, last_save_step = time.time(), scheduler.last_epoch
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    show_bar = ctx.is_main and not args.no_progress and sys.stderr.isatty()
    readback = StatsReadback(ctx)
    model.train()
    profiler = StepProfiler(out / "profile", args.profile_schedule, device, enabled=args.profile and ctx.is_main)
    with GracefulStop(announce=ctx.is_main) as stop:
        for epoch in range(start_epoch, last_epoch):
            first = start_step if epoch == start_epoch else 0
            log.start_epoch(partial if first else None)
            loader.set_epoch(epoch, start=first * args.accum)
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
                       disable=not show_bar, dynamic_ncols=True)
            batches = iter(loader)
            t0, seen, halted = time.time(), 0, False
            try:
                for step in range(first, steps_per_epoch):
                    stats = train_step(built.step_model, criterion, batches, optimizer, precision, args.accum)
                    scheduler.step()
                    profiler.step()
                    bar.update(1)
                    readback.add(scheduler.last_epoch, stats)
                    seen += stats.images * ctx.world_size
                    last = step == steps_per_epoch - 1
                    halt = stop.requested and not ctx.distributed  # one process: stop at once
                    if not (len(readback) >= args.log_every or last or halt):
                        continue
                    rows, (agreed_stop,) = readback.read((stop.requested,))  # the loop's one host sync
                    halt = halt or agreed_stop
                    now = time.time()
                    ips = seen / max(now - t0, 1e-9)
                    log.add(rows, optimizer.param_groups[0]["lr"], ips)
                    if rows and not math.isnan(rows[-1][1]):
                        bar.set_postfix(loss=f"{rows[-1][1]:.3f}", z_std=f"{rows[-1][2]:.4f}", img_s=f"{ips:.0f}")
                    due = save_unit is not None and (
                        (save_unit == "steps" and scheduler.last_epoch - last_save_step >= save_every)
                        or (save_unit == "seconds" and now - last_save_time >= save_every))
                    if (halt or due) and not last:
                        if ctx.is_main:
                            path = checkpoint(epoch, step + 1, log.snapshot(seen, now - t0))
                            if not halt:
                                bar.write(f"checkpoint: {path} (epoch {epoch + 1}, step {step + 1})")
                        last_save_time, last_save_step = now, scheduler.last_epoch
                    if halt:
                        halted = True
                        break
            finally:
                bar.close()
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
            seconds = time.time() - t0
            if args.record_keys:  # hidden, for tests: the samples this rank trained on this epoch
                Path(args.record_keys).mkdir(parents=True, exist_ok=True)
                (Path(args.record_keys) / f"epoch{epoch + 1}-rank{ctx.rank}.txt").write_text(
                    "".join(k + "\n" for k in getattr(loader, "keys", [])))
            resume_hint = f"resume: the same command with --resume auto --out {out} (or --resume {out / 'checkpoint.pth'})"
            if halted and step < steps_per_epoch - 1:
                raise TrainingInterrupted(f"stopped by {stop.name} at epoch {epoch + 1}, step {step + 1}/"
                                          f"{steps_per_epoch}; checkpoint written; {resume_hint}", 128 + stop.signum)
            record = log.record(epoch + 1, seen, seconds)
            record.update(evaluate(model, bank, queries, args, ctx, precision))
            history.append(record)
            say(epoch_line(record, args, time.time() - started))
            # 8. Checkpoint (verified, previous kept) and the backbone alone, after every epoch: rank 0 writes.
            if ctx.is_main:
                for k, v in record.items():
                    if k != "epoch":
                        writer.add_scalar(f"epoch/{k}", v, epoch + 1)
                checkpoint(epoch + 1, 0, {})
                save_atomic(backbone_state_dict(model.backbone), out / f"backbone_{args.arch}.pth")
            last_save_time, last_save_step = time.time(), scheduler.last_epoch
            if halted:  # the signal came during the epoch's last step: the epoch is complete and saved
                raise TrainingInterrupted(f"stopped by {stop.name} at the end of epoch {epoch + 1}; checkpoint "
                                          f"written; {resume_hint}", 128 + stop.signum)
    for trace in profiler.stop():
        say(f"profiler trace: {trace} (Perfetto / chrome://tracing; python bench/trace_summary.py {trace})")
    summary = {"out": str(out), "history": history, "curve": curve, "minutes": (time.time() - started) / 60,
               "skipped_steps": sum(h.get("skipped_steps", 0) for h in history), "world_size": ctx.world_size}
    if ctx.is_main:
        writer.close()
        (out / "history.json").write_text(json.dumps(history, indent=1))
        plot_run(history, curve, out / "curves.png", args.dim, steps_per_epoch, log.detector.fired_at)
        print_summary(summary, args)
    return summary


def epoch_line(record: dict, args, elapsed_s: float) -> str:
    """One readable line per epoch (what a log file shows when there is no progress bar)."""
    parts = [f"epoch {record['epoch']}/{args.epochs}", f"loss {record['loss']:+.4f}", f"z-std {record['z_std']:.4f}",
             f"{record['images_per_s']:.0f} images/s"]
    if "knn_top1" in record:
        parts.append(f"kNN top-1 {record['knn_top1']:.2f}%  probe {record['probe_top1']:.2f}%")
    if record.get("skipped_steps"):
        parts.append(f"{record['skipped_steps']} non-finite step(s) skipped")
    parts.append(f"({elapsed_s / 60:.1f} min)")
    return "  ".join(parts)


def print_summary(summary: dict, args) -> None:
    history, out = summary["history"], summary["out"]
    print(f"\n== SimSiam {args.arch}, {args.image_size} px, batch {args.batch_size}, loader {args.loader}: "
          f"{summary['minutes']:.1f} min ==")
    for h in history:
        parts = [f"epoch {h['epoch']:>3}"]
        if "loss" in h:
            parts.append(f"loss {h['loss']:+.4f}  z-std {h['z_std']:.4f}  {h['images_per_s']:.0f} images/s")
        if "knn_top1" in h:
            parts.append(f"kNN top-1 {h['knn_top1']:.2f}%  probe {h['probe_top1']:.2f}%")
        print("  ".join(parts))
    evals = [h for h in history if "knn_top1" in h]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        print(f"kNN top-1: epoch {first['epoch']} {first['knn_top1']:.2f}% → epoch {last['epoch']} {last['knn_top1']:.2f}% "
              f"({last['knn_top1'] - first['knn_top1']:+.2f}); linear probe {first['probe_top1']:.2f}% → "
              f"{last['probe_top1']:.2f}% ({last['probe_top1'] - first['probe_top1']:+.2f})")
        if "pixels_knn_top1" in first:
            print(f"raw pixels for reference: kNN top-1 {first['pixels_knn_top1']:.2f}%, "
                  f"linear probe {first['pixels_probe_top1']:.2f}%")
    if (Path(out) / "checkpoint.pth").exists():
        print(f"checkpoint: {out}/checkpoint.pth   backbone: {out}/backbone_{args.arch}.pth")
    print(f"TensorBoard: tensorboard --logdir {out}/tb   history: {out}/history.json   plot: {out}/curves.png")


USER_ERRORS = (OSError, ValueError, ImportError, CheckpointError)
"""A user's mistake: a bad path, option, file or checkpoint, a missing extra, a full disk. Printed as
one line; anything else is a bug and keeps its traceback."""


def log_error() -> Path | None:
    """Append the current exception's traceback to ``<run>/error.log`` (once the run folder exists)."""
    if RUN_DIR is None:
        return None
    path = RUN_DIR / "error.log"
    try:
        with open(path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n{traceback.format_exc()}\n")
    except OSError:
        return None
    return path


def cli(argv=None) -> int:
    """Command-line entry: exit status 0, 1 for an error, 128 + signal after a clean stop."""
    try:
        main(argv)
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except USER_ERRORS as exc:
        log_error()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (second signal): the last checkpoint.pth in the run folder resumes with --resume",
              file=sys.stderr)
        return 130
    except Exception:
        where = log_error()
        traceback.print_exc()
        if where is not None:
            print(f"the traceback is also in {where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
