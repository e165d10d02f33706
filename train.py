"""SimSiam pre-training, the recipe top to bottom: args → data → model → optimiser → loop.

Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021; option names follow the
official ``main_simsiam.py``. ``python train.py`` with no arguments prepares Fashion-MNIST (Debian
``dataset-fashion-mnist``) if needed and runs the CPU default described in README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from bench.profiling import DEFAULT_SCHEDULE, StepProfiler, labelled, parse_schedule
from model.backbones import ARCHS, backbone_state_dict
from model.checkpoint import CheckpointError, load_checkpoint, save_atomic
from model.evaluate import extract_features, knn_top1, linear_probe_top1
from model.loss import SIMILARITIES, SimSiamLoss, collapse_threshold
from model.norm import convert_sync_bn
from model.precision import AMP_MODES, Precision
from model.simsiam import PREDICTORS, SimSiam
from model.step import train_step
from pipeline import LOADERS, build_loader, recipe
from pipeline.datasets import prepare_fashion_mnist
from pipeline.device import resolve_device
from pipeline.eval_data import EvalImages
from pipeline.imagefolder import scan_image_folder

DEFAULT_DATA = "data/fashion-mnist"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default=DEFAULT_DATA,
                   help="ImageFolder root with train/ and val/ splits; the default is prepared from Fashion-MNIST when missing")
    d.add_argument("--loader", choices=LOADERS, default="torch", help="data pipeline backend")
    d.add_argument("-j", "--workers", type=int, default=2, help="loader worker processes / threads")
    d.add_argument("--image-size", type=int, default=32, help="view side in pixels")
    d.add_argument("--min-crop-scale", type=float, default=0.2, help="RandomResizedCrop minimum area (paper: 0.2)")
    d.add_argument("--subset", type=int, default=None, help="train on a random subset of this many images")
    d.add_argument("--dali-cpu-decode", action="store_true",
                   help="--loader dali on a GPU: decode JPEGs on the CPU, augment on the GPU")
    d.add_argument("--dali-prefetch", type=int, default=2, help="--loader dali: batches DALI prepares ahead")
    d.add_argument("--synthetic-size", type=int, default=60000, help="images per epoch of --loader synthetic")
    d.add_argument("--ffcv-beton", default=None,
                   help="--loader ffcv: .beton to read (default: written once next to the split, under .ffcv/)")
    d.add_argument("--ffcv-order", choices=("random", "quasi_random", "sequential"), default="random",
                   help="--loader ffcv: sample order (quasi_random for data larger than RAM)")
    d.add_argument("--ffcv-os-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="--loader ffcv: let the OS page cache hold the .beton")
    d.add_argument("--ffcv-max-resolution", type=int, default=None, help="--loader ffcv: longest stored side when writing")
    d.add_argument("--ffcv-write-mode", choices=("raw", "jpg", "smart", "proportion"), default="raw",
                   help="--loader ffcv: how images are stored when writing")
    m = p.add_argument_group("model")
    m.add_argument("-a", "--arch", choices=ARCHS, default="resnet18")
    m.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=False,
                   help="3x3 stride-1 stem without max-pool, for inputs of 64 px or less (paper's CIFAR setting); "
                        "4x the compute of the standard stem at the same size")
    m.add_argument("--dim", type=int, default=2048, help="projector width")
    m.add_argument("--pred-dim", type=int, default=512, help="predictor bottleneck width")
    m.add_argument("--proj-layers", type=int, choices=(2, 3), default=3, help="projector depth (paper CIFAR appendix: 2)")
    o = p.add_argument_group("optimisation (official recipe)")
    o.add_argument("--epochs", type=int, default=3)
    o.add_argument("-b", "--batch-size", type=int, default=256, help="images per step (each gives two views)")
    o.add_argument("--lr", type=float, default=0.05, help="base lr; the lr used is lr * batch / 256")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=1e-4)
    o.add_argument("--fix-pred-lr", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the predictor lr constant (paper §4.4)")
    o.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear lr warm-up; default 10 epochs for batch >= 1024 (paper Tab. 2), capped at half the run, else 0")
    a = p.add_argument_group("ablations (paper §4)")
    a.add_argument("--stop-grad", action=argparse.BooleanOptionalAction, default=True, help="stop-gradient on z")
    a.add_argument("--predictor", choices=PREDICTORS, default="learned")
    a.add_argument("--similarity", choices=SIMILARITIES, default="cosine")
    a.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True)
    f = p.add_argument_group("performance")
    f.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    f.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    f.add_argument("--amp", choices=AMP_MODES, default="off")
    f.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (apex when importable, else torch)")
    f.add_argument("--compile", action="store_true", help="torch.compile the model")
    f.add_argument("--profile", action="store_true",
                   help="torch.profiler trace of a few steps: <out>/profile/tb (TensorBoard) and <out>/profile/trace.json "
                        "(Perfetto); summarise with bench/trace_summary.py")
    f.add_argument("--profile-schedule", default=",".join(map(str, DEFAULT_SCHEDULE)), type=parse_schedule,
                   help="profiler wait,warmup,active steps")
    e = p.add_argument_group("monitoring, checkpoints")
    e.add_argument("--knn", action=argparse.BooleanOptionalAction, default=True, help="kNN monitor + linear probe each epoch")
    e.add_argument("--knn-k", type=int, default=200)
    e.add_argument("--knn-t", type=float, default=0.1)
    e.add_argument("--knn-bank", type=int, default=10000, help="train images in the kNN bank (None: all)")
    e.add_argument("--knn-queries", type=int, default=None, help="val images classified (default: all)")
    e.add_argument("--out", default=None, help="run folder for checkpoints and logs (default runs/<time>)")
    e.add_argument("--resume", default=None, help="checkpoint to resume from")
    e.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs of this invocation")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-progress", action="store_true", help="no progress bar (logs every epoch instead)")
    args = p.parse_args(argv)
    for name in ("lr", "wd", "momentum", "knn_t"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name in ("lr", "knn_t") and value == 0):
            p.error(f"--{name.replace('_', '-')} must be a finite {'positive' if name in ('lr', 'knn_t') else 'non-negative'} "
                    f"number, got {value}")
    if args.epochs < 0:
        p.error(f"--epochs must be >= 0, got {args.epochs}")
    if args.warmup_epochs is None:
        args.warmup_epochs = min(10.0, args.epochs / 2) if args.batch_size >= 1024 else 0.0
    return args


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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def scores(fb, lb, fq, lq, args) -> dict:
    """kNN top-1 and linear-probe top-1 (percent) of query features ``fq`` against bank ``fb``."""
    return {"knn_top1": knn_top1(fb, lb, fq, lq, args.knn_k, args.knn_t),
            "probe_top1": linear_probe_top1(fb, lb, fq, lq)}


def evaluate(model, bank: EvalImages | None, queries: EvalImages | None, args, device, precision) -> dict:
    """:func:`scores` of the frozen backbone's features on the val split."""
    if bank is None:
        return {}
    batch = 512
    fb, lb = extract_features(model.backbone, bank.batches(batch, device, args.channels_last), precision.autocast)
    fq, lq = extract_features(model.backbone, queries.batches(batch, device, args.channels_last), precision.autocast)
    return scores(fb, lb, fq, lq, args)


def pixel_baseline(bank: EvalImages, queries: EvalImages, args) -> dict:
    """:func:`scores` of the raw normalised pixels: the bar a learned representation should clear."""
    cpu = torch.device("cpu")
    fb, fq = (torch.cat([x.flatten(1) for x, _ in e.batches(4096, cpu)]) for e in (bank, queries))
    return scores(fb, bank.labels, fq, queries.labels, args)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()

    # 1. Device and seed.
    device = resolve_device(args.device)
    precision = Precision(args.amp, device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # 2. Data: prepare the default data set, scan the splits once, build the two-view loader.
    data = Path(args.data)
    if args.loader != "synthetic" and args.data == DEFAULT_DATA and not (data / "train").exists():
        print(f"preparing Fashion-MNIST as JPEG files under {data} (once)")
        prepare_fashion_mnist(data)
    aug = recipe(args.image_size, args.min_crop_scale)
    train_images = val_images = None
    if args.loader != "synthetic":
        if not data.is_dir():
            raise FileNotFoundError(f"data folder {data} does not exist")
        if not (data / "train").is_dir():
            raise FileNotFoundError(f"data folder {data} has no train/ folder: expected "
                                    f"{data}/train/<class>/<images> (and optionally {data}/val/)")
        train_images = scan_image_folder(data / "train").subset(args.subset, args.seed)
        val_images = scan_image_folder(data / "val") if (data / "val").exists() else None
    view_dtype = torch.float16 if args.amp == "fp16" else torch.float32
    common = dict(batch_size=args.batch_size, device=device, channels_last=args.channels_last,
                  seed=args.seed, dtype=view_dtype)
    if args.loader == "synthetic":
        loader = build_loader("synthetic", num_samples=args.synthetic_size, size=args.image_size, **common)
    else:
        extra = {}
        if args.loader == "ffcv":
            extra = dict(beton=args.ffcv_beton, order=args.ffcv_order, os_cache=args.ffcv_os_cache,
                         max_resolution=args.ffcv_max_resolution, write_mode=args.ffcv_write_mode)
        elif args.loader == "dali":
            extra = dict(cpu_decode=args.dali_cpu_decode, prefetch=args.dali_prefetch)
        loader = build_loader(args.loader, data_dir=train_images, aug=aug, workers=args.workers, **common, **extra)

    # 3. Model: SimSiam encoder + predictor; SyncBN, channels_last, compile.
    model = SimSiam(args.arch, args.dim, args.pred_dim, args.small_stem, args.proj_layers, args.predictor)
    if args.sync_bn:
        model, _ = convert_sync_bn(model, device)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    step_model = torch.compile(model) if args.compile else model

    # 4. Loss, optimiser (lr = base lr × batch / 256), per-iteration schedule.
    criterion = SimSiamLoss(args.stop_grad, args.similarity, args.symmetric)
    init_lr = args.lr * args.batch_size / 256
    groups = model.param_groups(args.fix_pred_lr)
    optimizer = torch.optim.SGD(groups, lr=init_lr, momentum=args.momentum, weight_decay=args.wd)
    steps_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambdas(groups, args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)))

    # 5. Resume, or start a new run folder.
    start_epoch, history, curve = 0, [], []
    if args.resume:
        state = load_checkpoint(args.resume)
        saved = state.get("args", {})
        for key in ("arch", "dim", "pred_dim", "proj_layers", "small_stem", "predictor"):
            if key in saved and saved[key] != getattr(args, key):
                raise CheckpointError(f"checkpoint {args.resume} was written with --{key.replace('_', '-')} "
                                      f"{saved[key]}, this run asks for {getattr(args, key)}; use the same model options")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state.get("scaler", {}))
        set_rng_state(state["rng"])
        start_epoch, history, curve = state["epoch"], state.get("history", []), state.get("curve", [])
        out = Path(args.out) if args.out else Path(args.resume).parent
        print(f"resumed from {args.resume} at epoch {start_epoch}")
    else:
        out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out / "tb"))

    # 6. kNN monitor on the val split, first on the randomly initialised model.
    bank = queries = None
    if args.knn and val_images is not None:
        bank = EvalImages(train_images, aug, args.knn_bank, args.seed, args.workers)
        queries = EvalImages(val_images, aug, args.knn_queries, args.seed, args.workers)
    if bank is not None and start_epoch == 0:
        init = evaluate(model, bank, queries, args, device, precision)
        history.append({"epoch": 0, **init})
        print(f"random init: kNN top-1 {init['knn_top1']:.2f}%  linear probe {init['probe_top1']:.2f}%")
        for k, v in init.items():
            writer.add_scalar(f"eval/{k}", v, 0)
        pixels = pixel_baseline(bank, queries, args)
        history[-1].update({f"pixels_{k}": v for k, v in pixels.items()})
        print(f"raw pixels:  kNN top-1 {pixels['knn_top1']:.2f}%  linear probe {pixels['probe_top1']:.2f}%")

    # 7. Train.
    threshold = collapse_threshold(args.dim)
    skipped_total = 0
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    model.train()
    profiler = StepProfiler(out / "profile", args.profile_schedule, device, enabled=args.profile)
    for epoch in range(start_epoch, last_epoch):
        loader.set_epoch(epoch)
        losses, stds, seen, t0 = [], [], 0, time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", disable=args.no_progress,
                   dynamic_ncols=True)
        for batch in labelled(bar):  # the 'data' profiler range
            result = train_step(step_model, criterion, batch.view1, batch.view2, optimizer, precision)
            scheduler.step()
            profiler.step()
            seen += batch.view1.shape[0]
            ips = seen / (time.time() - t0)
            global_step = scheduler.last_epoch
            if result.skipped:
                skipped_total += 1
                warnings.warn(f"non-finite loss {result.loss} at step {global_step}: step skipped")
                continue
            losses.append(result.loss)
            stds.append(result.z_std)
            curve.append([global_step, result.loss, result.z_std])
            bar.set_postfix(loss=f"{result.loss:.3f}", z_std=f"{result.z_std:.4f}", img_s=f"{ips:.0f}")
            writer.add_scalar("train/loss", result.loss, global_step)
            writer.add_scalar("train/z_std", result.z_std, global_step)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("train/images_per_s", ips, global_step)
            if result.z_std < threshold:
                bar.write(f"warning: z-std {result.z_std:.5f} < {threshold:.5f} (0.1/sqrt(dim)): the output is collapsing")
        record = {"epoch": epoch + 1, "loss": sum(losses) / max(1, len(losses)),
                  "z_std": sum(stds) / max(1, len(stds)), "images_per_s": seen / (time.time() - t0),
                  "skipped_steps": skipped_total}
        record.update(evaluate(model, bank, queries, args, device, precision))
        history.append(record)
        for k, v in record.items():
            if k != "epoch":
                writer.add_scalar(f"epoch/{k}", v, epoch + 1)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))
        # 8. Checkpoint (atomic) and the backbone alone, after every epoch.
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": precision.state_dict(),
                     "epoch": epoch + 1, "rng": rng_state(), "history": history, "curve": curve,
                     "args": {k: v for k, v in vars(args).items()}}, out / "checkpoint.pth")
        save_atomic(backbone_state_dict(model.backbone), out / f"backbone_{args.arch}.pth")
    for trace in profiler.stop():
        print(f"profiler trace: {trace} (Perfetto / chrome://tracing; python bench/trace_summary.py {trace})")
    writer.close()
    (out / "history.json").write_text(json.dumps(history, indent=1))
    plot_run(history, curve, out / "curves.png")
    summary = {"out": str(out), "history": history, "minutes": (time.time() - started) / 60,
               "skipped_steps": skipped_total}
    print_summary(summary, args)
    return summary


def plot_run(history: list[dict], curve: list[list[float]], path: Path) -> None:
    """PNG of the run: loss and z-std per step, kNN / probe top-1 per epoch (0 = random init)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    if curve:
        steps, loss, std = zip(*curve)
        axes[0].plot(steps, loss, lw=0.8)
        axes[1].plot(steps, std, lw=0.8)
    axes[0].set(title="loss (−1 = identical directions)", xlabel="step")
    axes[1].set(title="z-std (collapse → 0)", xlabel="step")
    evals = [h for h in history if "knn_top1" in h]
    for key, label in (("knn_top1", "kNN top-1"), ("probe_top1", "linear probe top-1")):
        axes[2].plot([h["epoch"] for h in evals], [h[key] for h in evals], marker="o", label=label)
    if evals and "pixels_knn_top1" in evals[0]:
        axes[2].axhline(evals[0]["pixels_knn_top1"], ls="--", c="C0", lw=0.8, label="kNN on raw pixels")
        axes[2].axhline(evals[0]["pixels_probe_top1"], ls="--", c="C1", lw=0.8, label="probe on raw pixels")
    axes[2].set(title="val accuracy (%)", xlabel="epoch (0 = random init)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, NotADirectoryError, CheckpointError, ValueError, RuntimeError, ImportError) as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the last completed epoch's checkpoint.pth in the run folder resumes with --resume")
