"""SimSiam pre-training, the recipe top to bottom: args → processes → data → model → optimiser → loop.

Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021; option names follow the
official ``main_simsiam.py``. ``python train.py`` with no arguments prepares Fashion-MNIST (Debian
``dataset-fashion-mnist``) if needed and runs the CPU default described in README.md;
``torchrun --nproc-per-node=N train.py ...`` runs the same recipe on N processes (DDP).

``--recipe`` picks a named set of constants (:data:`RECIPES`): the paper's two recipes, ``imagenet``
and ``cifar``, and ``fmnist``, the measured CPU default. Every option a recipe sets still takes an
explicit flag, which wins; ``--help`` prints each recipe's values.
"""
from __future__ import annotations

import os

# Before torch starts OpenMP: waiting OpenMP threads sleep instead of spinning. The loader's workers
# share the cores with the training threads, and spinning threads on oversubscribed cores made a CPU
# step 10-50x slower here (bench/README: 2-10 s against 0.19 s); setting it yourself wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import json
import math
import random
import re
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from model.backbones import ARCHS, backbone_state_dict
from model.checkpoint import CheckpointError, load_checkpoint, load_latest, save_atomic, save_checkpoint
from model.distributed import DistContext, HostVote, destroy, init_from_env
from model.evaluate import extract_features, knn_top1, linear_probe_top1
from model.host_memory import keep_freed_memory
from model.interrupt import GracefulStop, TrainingInterrupted
from model.collapse import CollapseDetector
from model.loss import SIMILARITIES, SimSiamLoss
from model.precision import AMP_MODES, Precision
from model.plots import plot_run
from model.profiling import DEFAULT_SCHEDULE, StepProfiler, parse_schedule
from model.run_log import RunLog, TensorBoard
from model.simsiam import PREDICTORS
from model.step import StatsReadback, train_step
from model.training import build_simsiam, recipe_sgd
from pipeline import LOADERS, AugmentConfig, build_loader, pick_loader
from pipeline.datasets import prepare_fashion_mnist
from pipeline.eval_data import EvalImages
from pipeline.sources import ImageList, ShardSource, open_splits
from pipeline.sources.imagefolder import write_skip_list
from pipeline.workers import StopSignal, stop_signals_raise
from pipeline.writes import atomic_write_text, write_failed

DEFAULT_DATA = "data/fashion-mnist"
RUN_DIR: Path | None = None  # where error.log goes once the run folder is known

# The options a recipe sets (argparse dest names), by kind. Each is None after parsing unless given
# on the command line; apply_recipe() fills the rest from the chosen recipe, so an explicit flag wins.
RECIPE_KEYS = {
    "stem": ("small_stem",),
    "head": ("proj_layers", "dim", "pred_dim"),
    "optimiser": ("batch_size", "lr", "wd", "momentum"),  # lr: base lr, used as lr x batch / 256
    "augmentation": ("min_crop_scale", "jitter_p", "jitter", "grayscale_p", "blur_p"),
}
_MOCO_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue (MoCo v2 / official main_simsiam.py)
RECIPES: dict[str, dict] = {
    # The measured CPU default for grey 28 px Fashion-MNIST on 2 cores in <= 15 min (the search and
    # its table: bench/results/2026-12-03-default-search/README.md). The cifar recipe's 2-layer
    # projector and wd 5e-4 with smaller heads, batch 128 (lightly's CIFAR-10 benchmark: 128 ahead
    # of 512), the standard stem (4x cheaper at 28 px), crop area 0.5-1 (20% of a 28 px garment is
    # a 12 px patch), and no grayscale / saturation / hue, which do nothing to grey images.
    "fmnist": dict(small_stem=False, proj_layers=2, dim=512, pred_dim=128,
                   batch_size=128, lr=0.2, wd=5e-4, momentum=0.9,
                   min_crop_scale=0.5, jitter_p=0.8, jitter=(0.4, 0.4, 0.0, 0.0), grayscale_p=0.0, blur_p=0.0),
    # Paper §4 "Implementation details" and appendix A + the official main_simsiam.py / builder.py:
    # ResNet-50 (give -a resnet50 for the paper's network), 3-layer 2048-d projector, 512-d predictor
    # bottleneck, SGD base lr 0.05 x B/256, wd 1e-4, momentum 0.9, batch 512; MoCo v2 augmentation:
    # crop area 0.2-1, jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, Gaussian blur p 0.5.
    "imagenet": dict(small_stem=False, proj_layers=3, dim=2048, pred_dim=512,
                     batch_size=512, lr=0.05, wd=1e-4, momentum=0.9,
                     min_crop_scale=0.2, jitter_p=0.8, jitter=_MOCO_JITTER, grayscale_p=0.2, blur_p=0.5),
    # Paper appendix D (CIFAR-10): the CIFAR ResNet-18 variant (3x3 stride-1 stem, no max-pool), a
    # 2-layer projector with 2048-d output, SGD base lr 0.03 x B/256, wd 5e-4, momentum 0.9, batch
    # 512; the ImageNet augmentation without the blur.
    "cifar": dict(small_stem=True, proj_layers=2, dim=2048, pred_dim=512,
                  batch_size=512, lr=0.03, wd=5e-4, momentum=0.9,
                  min_crop_scale=0.2, jitter_p=0.8, jitter=_MOCO_JITTER, grayscale_p=0.2, blur_p=0.0),
}
DEFAULT_RECIPE = "fmnist"
RECIPE_SOURCES = {
    "imagenet": "paper §4 + appendix A, official main_simsiam.py",
    "cifar": "paper appendix D (CIFAR-10)",
    "fmnist": "measured: bench/results/2026-12-03-default-search/",
}


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


def parse_jitter(text: str) -> tuple[float, float, float, float]:
    """``--jitter``: ``"0.4,0.4,0.4,0.1"`` → brightness, contrast, saturation, hue strengths
    (torchvision ``ColorJitter``: factors from ``[1 - s, 1 + s]``; hue a shift in ``[-h, h]`` turns)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) and v >= 0 for v in values) or values[3] > 0.5:
        raise argparse.ArgumentTypeError(f"want four non-negative numbers B,C,S,H (hue <= 0.5), got {text!r}")
    return values  # type: ignore[return-value]


def recipe_help(key: str) -> str:
    """``(default: from --recipe: fmnist X, imagenet Y, cifar Z)`` for an option a recipe sets."""
    def show(v):
        if isinstance(v, bool):
            return "on" if v else "off"
        if isinstance(v, tuple):
            return ",".join(f"{x:g}" for x in v)
        return f"{v:g}" if isinstance(v, float) else str(v)
    return "(default: from --recipe: " + ", ".join(f"{name} {show(r[key])}" for name, r in RECIPES.items()) + ")"


def apply_recipe(args: argparse.Namespace) -> list[str]:
    """Fill every recipe option left unset (``None``) from ``RECIPES[args.recipe]``, in place.

    Returns:
        the recipe options given explicitly with another value than the recipe's (they win), as
        argparse names, e.g. ``["lr", "wd"]``.
    """
    overrides = []
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        elif getattr(args, key) != value:
            overrides.append(key)
    return overrides


def recipe_line(args: argparse.Namespace) -> str:
    """``recipe fmnist`` or ``recipe cifar; explicit: --lr 0.1, --small-stem off``: what the run starts with."""
    def flag(key):
        v = getattr(args, key)
        shown = ("on" if v else "off") if isinstance(v, bool) else ",".join(map(str, v)) if isinstance(v, tuple) else v
        return f"--{key.replace('_', '-')} {shown}"
    extra = ", ".join(flag(k) for k in args.recipe_overrides)
    return f"recipe {args.recipe} ({RECIPE_SOURCES[args.recipe]})" + (f"; explicit: {extra}" if extra else "")


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    """The view augmentation of a parsed command line (recipe applied): size, crop area, jitter,
    grayscale and blur from the options; crop ratio, flip and normalisation as :class:`AugmentConfig`."""
    brightness, contrast, saturation, hue = args.jitter
    return AugmentConfig(size=args.image_size, crop_scale=(args.min_crop_scale, 1.0), jitter_p=args.jitter_p,
                         brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                         grayscale_p=args.grayscale_p, blur_p=args.blur_p)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default shown once (help texts that name theirs keep that one)."""

    def _get_help_string(self, action):
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    r = p.add_argument_group("recipe")
    r.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULT_RECIPE,
                   help="named constants for the "
                        + ", ".join(f"{kind} ({', '.join('--' + k.replace('_', '-') for k in keys)})"
                                    for kind, keys in RECIPE_KEYS.items())
                        + "; an explicit flag wins. "
                        + "; ".join(f"{name}: {RECIPE_SOURCES[name]}" for name in RECIPES)
                        + f" (default: {DEFAULT_RECIPE})")
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
    d.add_argument("--loader", choices=("auto", *LOADERS), default="auto",
                   help="data pipeline backend; auto: the cheapest installed (dali when installed, else torch on "
                        "the CPU, torchvision-gpu on a GPU; torch for shards), announced at the start")
    d.add_argument("-j", "--workers", type=int, default=2, help="loader worker processes / threads per rank")
    d.add_argument("--image-size", type=int, default=28, help="view side in pixels (Fashion-MNIST's own 28)")
    a = p.add_argument_group("augmentation (set by --recipe)")
    a.add_argument("--min-crop-scale", type=float, default=None,
                   help="RandomResizedCrop minimum area fraction " + recipe_help("min_crop_scale"))
    a.add_argument("--jitter-p", type=float, default=None,
                   help="probability of the colour jitter " + recipe_help("jitter_p"))
    a.add_argument("--jitter", type=parse_jitter, default=None, metavar="B,C,S,H",
                   help="colour jitter strengths: brightness, contrast, saturation, hue; on grey images only "
                        "brightness and contrast act " + recipe_help("jitter"))
    a.add_argument("--grayscale-p", type=float, default=None,
                   help="probability of converting a view to grey " + recipe_help("grayscale_p"))
    a.add_argument("--blur-p", type=float, default=None,
                   help="probability of a Gaussian blur (sigma 0.1-2 px) " + recipe_help("blur_p"))
    d.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                   help="a file that cannot be decoded: skip it (listed in <out>/skipped.txt) or stop before the first step")
    d.add_argument("--subset", type=int, default=None, help="train on a seeded random subset of this many images (default: all)")
    d.add_argument("--dali-cpu-decode", action="store_true",
                   help="--loader dali on a GPU: decode JPEGs on the CPU, augment on the GPU")
    d.add_argument("--dali-prefetch", type=int, default=2, help="--loader dali: batches DALI prepares ahead")
    d.add_argument("--dali-overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="--loader dali: prepare batches beside the training step (pipelined, --dali-prefetch deep; "
                        "the default: DALI's own) or serially, inside the step's wait for its batch")
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
    m.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 stem without max-pool, for inputs of 64 px or less (paper's CIFAR setting); "
                        "the residual stages see 16x the positions of the standard stem's at the same size "
                        + recipe_help("small_stem"))
    m.add_argument("--dim", type=int, default=None, help="projector width (hidden and output) " + recipe_help("dim"))
    m.add_argument("--pred-dim", type=int, default=None, help="predictor bottleneck width " + recipe_help("pred_dim"))
    m.add_argument("--proj-layers", type=int, choices=(2, 3), default=None,
                   help="projector depth " + recipe_help("proj_layers"))
    o = p.add_argument_group("optimisation (-b, --lr, --wd, --momentum set by --recipe)")
    o.add_argument("--epochs", type=int, default=3, help="epochs to train")
    o.add_argument("-b", "--batch-size", type=int, default=None,
                   help="global batch: images per optimiser step over all ranks and --accum micro-batches "
                        "(each image gives two views) " + recipe_help("batch_size"))
    o.add_argument("--accum", type=int, default=1,
                   help="micro-batches per optimiser step (gradient accumulation); per-rank micro-batch = "
                        "batch / (world size x accum)")
    o.add_argument("--lr", type=float, default=None, help="base lr; the lr used is lr x batch / 256 " + recipe_help("lr"))
    o.add_argument("--momentum", type=float, default=None, help="SGD momentum " + recipe_help("momentum"))
    o.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=None,
                   help="SGD weight decay " + recipe_help("wd"))
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
    args.recipe_overrides = apply_recipe(args)
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
    for name in ("accum", "log_every", "batch_size", "dim", "pred_dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("jitter_p", "grayscale_p", "blur_p"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be a probability in [0, 1], got {getattr(args, name)}")
    if not 0 < args.min_crop_scale <= 1:
        p.error(f"--min-crop-scale must be in (0, 1], got {args.min_crop_scale}")
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


def speaks() -> bool:
    """Whether this process prints what every rank would print alike (a user's mistake, a stop):
    without torchrun always; under torchrun local rank 0 of each node (rank 0 on one node)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def main(argv=None) -> dict:
    """Parse ``argv``, join the process group (under torchrun), train, leave the group.

    Until the training loop starts (and while a ``.beton`` is written, see
    :mod:`pipeline.workers`), SIGTERM / SIGINT raise :class:`pipeline.workers.StopSignal`: nothing
    is trained yet, so the run stops at once; the loop then takes over (:class:`GracefulStop`).
    """
    if speaks():
        args = parse_args(argv)
    else:  # argparse's usage and error lines: once, from local rank 0
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
            args = parse_args(argv)
    keep_freed_memory()  # a CPU step's buffers are not faulted in again every step (model/host_memory.py)
    with stop_signals_raise():
        ctx = init_from_env(args.device)
        try:
            return train(args, ctx)
        finally:
            destroy(ctx)


def build_model(args: argparse.Namespace, ctx: DistContext):
    """The model, loss and SGD optimiser of a parsed command line (recipe applied), on ``ctx.device``.

    Returns:
        ``(built, criterion, optimizer)``: :class:`model.training.Built`, :class:`model.loss.SimSiamLoss`
        and the ``torch.optim.SGD`` of :func:`model.training.recipe_sgd` with lr = ``args.lr`` × batch / 256.
    """
    built = build_simsiam(ctx, args.arch, args.dim, args.pred_dim, args.small_stem, args.proj_layers, args.predictor,
                          sync_bn=args.sync_bn, channels_last=args.channels_last, compile=args.compile)
    criterion = SimSiamLoss(args.stop_grad, args.similarity, args.symmetric)
    optimizer = recipe_sgd(built.model, args.lr * args.batch_size / 256, args.momentum, args.wd, args.fix_pred_lr)
    return built, criterion, optimizer


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

    # 2. Data: prepare the default data set, open the splits (an ImageFolder is scanned once per node;
    #    shards are named by an index or a pattern, nothing is read), build the two-view loader.
    aug = augment_config(args)
    say(recipe_line(args))
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
        if args.loader == "auto":
            args.loader, why = pick_loader(train_images, device)
            say(f"loader: {args.loader} ({why}; --loader NAME to choose)")
        if args.loader == "synthetic":
            loader = build_loader("synthetic", num_samples=args.synthetic_size // ctx.world_size,
                                  size=args.image_size, **common)
        else:
            extra = {}
            if args.loader == "ffcv":
                extra = dict(beton=args.ffcv_beton, order=args.ffcv_order, os_cache=args.ffcv_os_cache,
                             max_resolution=args.ffcv_max_resolution, write_mode=args.ffcv_write_mode)
            elif args.loader == "dali":
                extra = dict(cpu_decode=args.dali_cpu_decode, prefetch=args.dali_prefetch, overlap=args.dali_overlap)
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

    # 3-4. Model (SimSiam encoder + predictor; SyncBN, channels_last, DDP, compile), loss, optimiser
    # (lr = base lr × global batch / 256), per-iteration schedule.
    built, criterion, optimizer = build_model(args, ctx)
    model = built.model
    groups = model.param_groups(args.fix_pred_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambdas(groups, args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)))

    # 5. Resume (a file, or 'auto': the newest valid checkpoint in --out), or start a new run folder.
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        RUN_DIR = out
        lists = [i for i in (train_images, val_images) if isinstance(i, ImageList)]
        if lists or not args.resume or not (out / "skipped.txt").exists():  # shards: bad samples are appended
            try:
                write_skip_list(lists, out / "skipped.txt")
            except OSError as exc:
                raise write_failed(out / "skipped.txt", exc, "skip list") from exc
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
    writer = TensorBoard(out / "tb") if ctx.is_main else None

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

    # 7. Train: read scalars back every --log-every steps, and at every checkpoint; stop cleanly on SIGTERM/SIGINT.
    log = RunLog(curve, CollapseDetector(args.dim, args.similarity), writer,
                 tqdm.write if ctx.is_main else (lambda *a, **k: None))
    save_unit, save_every = args.save_every or (None, None)
    last_save_time, last_save_step = time.time(), scheduler.last_epoch
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    show_bar = ctx.is_main and not args.no_progress and sys.stderr.isatty()
    readback = StatsReadback(ctx)
    vote = HostVote(ctx)  # under DDP: the step at which every rank stops or saves (a CPU exchange, no device sync)
    model.train()
    profiler = StepProfiler(out / "profile", args.profile_schedule, device, enabled=args.profile and ctx.is_main)
    resume_hint = f"resume: the same command with --resume auto --out {out} (or --resume {out / 'checkpoint.pth'})"

    def stopped(signum: float, where: str) -> TrainingInterrupted:
        name = signal.Signals(int(signum)).name
        return TrainingInterrupted(f"stopped by {name} {where}; checkpoint written; {resume_hint}", 128 + int(signum))

    with GracefulStop(announce=ctx.is_main) as stop:
        for epoch in range(start_epoch, last_epoch):
            first = start_step if epoch == start_epoch else 0
            log.start_epoch(partial if first else None)
            loader.set_epoch(epoch, start=first * args.accum)
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
                       disable=not show_bar, dynamic_ncols=True)
            batches = iter(loader)
            t0, seen, halt = time.time(), 0, 0.0
            try:
                for step in range(first, steps_per_epoch):
                    stats = train_step(built.step_model, criterion, batches, optimizer, precision, args.accum)
                    scheduler.step()
                    profiler.step()
                    bar.update(1)
                    done = scheduler.last_epoch  # optimiser steps of the whole run so far
                    readback.add(done, stats)
                    seen += stats.images * ctx.world_size
                    last = step == steps_per_epoch - 1
                    # Host-only checks, every step: a stop signal (its number) and the save clock. Under DDP
                    # the ranks agree on both one step later; alone, at once.
                    clock = save_unit == "seconds" and time.time() - last_save_time >= save_every
                    halt, clock_step = vote.poll(stop.signum or 0, done if clock else 0)
                    due = not last and ((save_unit == "steps" and done - last_save_step >= save_every)
                                        or clock_step > last_save_step)
                    if not (len(readback) >= args.log_every or last or halt or due):
                        continue
                    rows, _ = readback.read()  # the loop's one host sync (also before every checkpoint)
                    now = time.time()
                    ips = seen / max(now - t0, 1e-9)
                    log.add(rows, optimizer.param_groups[0]["lr"], ips)
                    if rows and not math.isnan(rows[-1][1]):
                        bar.set_postfix(loss=f"{rows[-1][1]:.3f}", z_std=f"{rows[-1][2]:.4f}", img_s=f"{ips:.0f}")
                    if (halt or due) and not last:
                        if ctx.is_main:
                            path = checkpoint(epoch, step + 1, log.snapshot(seen, now - t0))
                            if not halt:
                                bar.write(f"checkpoint: {path} (epoch {epoch + 1}, step {step + 1})")
                        last_save_time, last_save_step = now, done
                    if halt:
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
            if halt and step < steps_per_epoch - 1:
                raise stopped(halt, f"at epoch {epoch + 1}, step {step + 1}/{steps_per_epoch}")
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
                save_atomic(backbone_state_dict(model.backbone), out / f"backbone_{args.arch}.pth", "backbone")
            last_save_time, last_save_step = time.time(), scheduler.last_epoch
            # A signal during the epoch's last step, its evaluation or its checkpoint: the epoch is complete and
            # saved, stop here rather than after one more step.
            halt = halt or (vote.now(stop.signum or 0)[0] if epoch + 1 < last_epoch else 0)
            if halt:
                raise stopped(halt, f"at the end of epoch {epoch + 1}")
        vote.close()
        for trace in profiler.stop():
            say(f"profiler trace: {trace} (Perfetto / chrome://tracing; python bench/trace_summary.py {trace})")
        summary = {"out": str(out), "history": history, "curve": curve, "minutes": (time.time() - started) / 60,
                   "skipped_steps": sum(h.get("skipped_steps", 0) for h in history), "world_size": ctx.world_size}
        if ctx.is_main:
            writer.close()
            atomic_write_text(out / "history.json", json.dumps(history, indent=1), "history")
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
    """Command-line entry: exit status 0, 1 for an error, 128 + signal after a clean stop.

    Under torchrun, what every rank would say alike (a user's mistake, a stop) is printed by local
    rank 0 alone (:func:`speaks`); a bug's traceback is printed by every rank that hits it.
    """
    say = speaks()
    try:
        main(argv)
    except StopSignal as exc:  # before the training loop: nothing trained, nothing to save
        if say:
            print(f"stopped by {exc.name} before the first training step: no checkpoint written by this command",
                  file=sys.stderr)
        return exc.code
    except TrainingInterrupted as exc:
        if say:
            print(exc, file=sys.stderr)
        return exc.code
    except USER_ERRORS as exc:
        log_error()
        if say:
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
