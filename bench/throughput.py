"""Images/s per loader and stage, batch scaling, input-stall share, peak memory.

``python bench/throughput.py`` measures, side by side in one run:

- loader-only: each of ``torch``, ``dali``, ``ffcv`` that is installed (two views, no model);
- model-only: SimSiam forward + loss + backward + SGD step on synthetic views on the device;
- end-to-end: loader → model, per loader;

for every batch size of ``--batch-sizes`` (64 → 4096 by default), and writes a table, JSON, CSV
and PNG plots into ``--out``. ``--quick`` is a CI-sized run (< 2 min on 2 CPU cores);
``--profile`` also records a profiler trace of the end-to-end loop and prints its verdict.
See ``bench/timing.py`` for the timing rules and ``bench/report.py`` for the columns.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Before torch starts OpenMP: waiting threads sleep instead of spinning (bench/trust.py, OMP_WAIT_POLICY).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.environment import environment  # noqa: E402
from bench.memory import default_ceiling_mb  # noqa: E402
from model.host_memory import keep_freed_memory  # noqa: E402
from model.profiling import DEFAULT_SCHEDULE, StepProfiler, parse_schedule  # noqa: E402
from bench.report import plot_step_time, plot_throughput, table, write_csv, write_json  # noqa: E402
from bench.stages import (STAGE_NAMES, STAGES, Settings, Trainer, parse_loader_spec, point_steps, sum_over_ranks,  # noqa: E402
                          probe_loader, run_point)
from bench.timing import stall_share  # noqa: E402
from bench.trust import (E2E_TOLERANCE, MAX_SPREAD_PCT, add_flag, beats_model, flag_load, keep_better,  # noqa: E402
                         load_warning, too_spread, usable_cores)
from model.backbones import ARCHS  # noqa: E402
from model.precision import AMP_MODES  # noqa: E402
from pipeline import LOADERS, AugmentConfig, recipe  # noqa: E402
import train  # noqa: E402  (the recipes of --recipe, as bench/ablations.py reads them)
from train import RECIPES  # noqa: E402
from model.distributed import DistContext, destroy, init_from_env, launched_by_torchrun  # noqa: E402
from pipeline.sources import open_source  # noqa: E402
from pipeline.sources.imagefolder import scan_image_folder  # noqa: E402
from pipeline.sources.shards import is_shard_spec  # noqa: E402

DEFAULT_DATA = "data/fashion-mnist"
REAL_LOADERS = ("torch", "dali", "ffcv", "torchvision-gpu")
DEFAULT_BATCHES = [64, 128, 256, 512, 1024, 2048, 4096]
QUICK = dict(arch="resnet18", image_size=16, batch_sizes=[8, 16], loaders="torch,dali", num_images=256, dim=512,
             pred_dim=128, warmup=1, repeats=2, min_images=16, min_steps=1, loader_min_steps=6, workers=1)


def int_list(text: str) -> list[int]:
    """``"64,128"`` → ``[64, 128]`` (positive ints)."""
    vals = [int(x) for x in text.split(",") if x.strip()]
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"want a comma list of positive integers, got {text!r}")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; device- and --quick-dependent defaults are left None for :func:`resolve`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI-sized run: resnet18, 16 px, batch 8 and 16, torch (and DALI when installed), 2 repeats")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<time>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (one per GPU): relaunches itself under torchrun --standalone; images/s are "
                        "summed over ranks. Or start it with torchrun yourself")
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of loader, model, e2e")
    p.add_argument("--loaders", default=None,
                   help="comma list of loader specs: a loader name (torch, dali, ffcv, ...) optionally followed by "
                        ":key=value constructor options, e.g. dali:cpu_decode=1 or ffcv:os_cache=0:order=quasi_random "
                        "(bench/stages.py LOADER_OPTIONS); default: every installed one (quick: torch,dali)")
    p.add_argument("--batch-sizes", type=int_list, default=None,
                   help="comma list (default 64,128,...,4096; quick 8,16)")
    p.add_argument("--accum", type=int, default=1, help="batches per optimiser step (gradient accumulation)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="ImageFolder root (its train/ split is used when present) or a split folder; "
                        "the default is prepared from Fashion-MNIST when missing")
    p.add_argument("--num-images", type=int, default=None,
                   help="images every loader reads (a fixed seeded subset, sharded over ranks; default 2 x the "
                        "largest batch x world size)")
    m = p.add_argument_group("matrix")
    m.add_argument("-a", "--arch", choices=ARCHS, default=None, help="default resnet18 (CPU), resnet50 (GPU)")
    m.add_argument("--image-size", type=int, default=None, help="view side in px; default 32 (CPU), 224 (GPU)")
    m.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="the head, batch size and augmentation of train.py --recipe NAME (explicit flags win); "
                        "--recipe fmnist --image-size 28 measures the default run's own settings")
    m.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stem without max-pool (paper's CIFAR setting); off by default, as in train.py")
    m.add_argument("--dim", type=int, default=None, help="projector width (default 2048)")
    m.add_argument("--pred-dim", type=int, default=None, help="predictor bottleneck (default 512)")
    m.add_argument("--proj-layers", type=int, choices=(2, 3), default=None,
                   help="projector depth (train.py --proj-layers; default 3)")
    m.add_argument("--amp", choices=AMP_MODES, default="off")
    m.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last model and views (default: on for CUDA, off for CPU)")
    m.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (plain BN kept, with a warning, "
                                                          "on CPU or without a process group)")
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    m.add_argument("-j", "--workers", type=int, default=None, help="loader workers/threads (default 2)")
    t = p.add_argument_group("timing")
    t.add_argument("--warmup", type=int, default=None, help="discarded steps per point (default 3 GPU, 1 CPU and quick)")
    t.add_argument("--repeats", type=int, default=None, help="timed windows per point (default 3, quick 2)")
    t.add_argument("--min-images", type=int, default=None, help="images per timed window at least (default 1024 GPU, 128 CPU)")
    t.add_argument("--min-steps", type=int, default=None, help="steps per timed window at least (default 3 GPU, 1 CPU)")
    t.add_argument("--loader-min-steps", type=int, default=None,
                   help="batches per loader-only timed window at least (default 10, quick 6)")
    t.add_argument("--budget-s", type=float, default=None,
                   help="skip a point whose projected cost (from the previous batch size) exceeds this many "
                        "seconds; default 60 on CPU, none on GPU; 0 disables")
    t.add_argument("--memory-ceiling", type=float, default=None,
                   help="CPU: process RSS ceiling in MiB; a point crossing it is recorded as OOM "
                        "(default: RSS now + 80%% of available memory; 0 disables)")
    t.add_argument("--time-limit-s", type=float, default=None,
                   help="stop starting points after this many seconds (the rest are recorded as skipped); "
                        "for a section of a timed script such as bench/gpu_check.sh")
    t.add_argument("--max-spread", type=float, default=MAX_SPREAD_PCT,
                   help="re-measure a point whose repeats disagree by more than this many percent "
                        "((max - min) / median), then flag it (default %(default)s)")
    t.add_argument("--remeasure", type=int, default=1,
                   help="re-measurements of a point whose spread is too large or whose end-to-end figure beats "
                        "model-only (default %(default)s; 0: flag only)")
    t.add_argument("--e2e-tolerance", type=float, default=E2E_TOLERANCE,
                   help="end to end may beat model-only by this fraction before the pair is re-measured and "
                        "flagged (default %(default)s)")
    t.add_argument("--reference", default=None,
                   help="throughput.json of an earlier run with the same model settings: its model-only points "
                        "are the ceiling for this run's end-to-end points when this run has no model stage")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed host memory in the process between steps, as train.py does (model/host_memory.py)")
    f = p.add_argument_group("profiling")
    f.add_argument("--profile", action="store_true",
                   help="also profile a few end-to-end steps at the first batch size (TensorBoard + Chrome JSON)")
    f.add_argument("--profile-schedule", default=",".join(map(str, DEFAULT_SCHEDULE)), help="wait,warmup,active steps")
    args = p.parse_args(argv)
    parse_schedule(args.profile_schedule)
    return args


def resolve(args: argparse.Namespace, device: torch.device, world_size: int = 1) -> argparse.Namespace:
    """Fill the defaults that depend on --quick and on the device."""
    gpu = device.type == "cuda"
    if gpu:
        base = dict(arch="resnet50", image_size=224, warmup=3, repeats=3, min_images=1024, min_steps=3)
    else:  # 2-core CPUs do ~30 images/s at 32 px: one warm-up step, >= 128 images per window
        base = dict(arch="resnet18", image_size=32, warmup=1, repeats=3, min_images=128, min_steps=1)
    base.update(batch_sizes=DEFAULT_BATCHES, loaders=",".join(REAL_LOADERS), num_images=None, dim=2048,
                pred_dim=512, proj_layers=3, small_stem=False, loader_min_steps=10, workers=2)
    if args.quick:
        base.update(QUICK)
    if args.recipe is not None:
        r = RECIPES[args.recipe]
        base.update({k: r[k] for k in ("small_stem", "proj_layers", "dim", "pred_dim")}, batch_sizes=[r["batch_size"]])
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.channels_last is None:
        args.channels_last = gpu
    if args.budget_s is None:
        args.budget_s = None if gpu or args.quick else 60.0  # --quick is small enough to run every point
    if args.budget_s == 0:
        args.budget_s = None
    if args.memory_ceiling is None:
        args.memory_ceiling = None if gpu else default_ceiling_mb()
    if args.memory_ceiling == 0:
        args.memory_ceiling = None
    if args.num_images is None:
        args.num_images = 2 * max(args.batch_sizes) * world_size
    return args


def recipe_augmentation(name: str | None, size: int) -> AugmentConfig:
    """The view augmentation of ``train.py --recipe name`` at ``size`` px (``None``: the ImageNet-style
    :func:`pipeline.recipe`, this harness's augmentation before recipes existed)."""
    if name is None:
        return recipe(size)
    keys = train.RECIPE_KEYS["augmentation"]
    return train.augment_config(argparse.Namespace(image_size=size, **{k: RECIPES[name][k] for k in keys}))


def bench_images(data: str, num_images: int, seed: int):
    """The images every loader reads: ``num_images`` of the train split under ``data``.

    ``data`` is an ImageFolder root with ``train/`` (used) or a split folder itself (a seeded
    subset), or tar shards (the writer's folder, an index, a pattern: the first ``num_images``
    samples, which the writer shuffled); the default Fashion-MNIST folder is prepared
    (``pipeline.datasets``) when missing.
    """
    if is_shard_spec(data):
        return open_source(data, "train").subset(num_images, seed)
    root = Path(data)
    if data == DEFAULT_DATA and not (root / "train").exists():
        from pipeline.datasets import prepare_fashion_mnist
        print(f"preparing Fashion-MNIST as JPEG files under {root} (once)")
        prepare_fashion_mnist(root)
    split = root / "train" if (root / "train").is_dir() else root
    return scan_image_folder(split).subset(num_images, seed)


def add_stall_shares(rows: list[dict], reference: list[dict] | None = None) -> None:
    """Set ``stall_share`` on end-to-end rows from the model-only row at the same effective batch
    (this run's, else ``reference``'s). Pairs flagged ``e2e>model`` get none: one figure is wrong."""
    model = {r["effective_batch"]: r for r in (reference or []) if r["stage"] == "model" and r["status"] == "ok"}
    model.update({r["effective_batch"]: r for r in rows if r["stage"] == "model" and r["status"] == "ok"})
    for r in rows:
        if r["stage"] == "e2e" and r["status"] == "ok" and r["effective_batch"] in model:
            if "e2e>model" in r.get("flags", []):
                r["stall_share"] = None
            else:
                r["stall_share"] = stall_share(r["images_per_s"], model[r["effective_batch"]]["images_per_s"])


REFERENCE_KEYS = ("arch", "image_size", "small_stem", "dim", "pred_dim", "proj_layers", "amp", "channels_last", "sync_bn", "compile")


def load_reference(path: str, config: dict) -> list[dict]:
    """Model-only rows of an earlier ``throughput.json`` measured with the same model settings.

    Raises:
        FileNotFoundError: no such file. ValueError: not a throughput.json, or other model settings.
    """
    import json
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--reference {path}: no such file")
    try:
        data = json.loads(p.read_text())
        ref_config, rows = data["config"], data["results"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"--reference {path}: not a throughput.json written by bench/throughput.py") from None
    older = {"proj_layers": 3}  # results written before the option existed used a 3-layer projector
    differ = [k for k in REFERENCE_KEYS if ref_config.get(k, older.get(k)) != config.get(k)]
    if ref_config.get("device", "").split(":")[0] != config["device"].split(":")[0]:
        differ.append("device")
    if differ:
        raise ValueError(f"--reference {path} was measured with other settings ({', '.join(differ)}); "
                         f"its model-only figures cannot be this run's ceiling")
    return [r for r in rows if r.get("stage") == "model"]


class Sweep:
    """The points of one run, measured in order, with the checks of :mod:`bench.trust`.

    ``measure(stage, name, batch)`` runs a point (honouring the time budget, the section time
    limit, and re-measuring a point whose repeats disagree); ``check_batch(batch)`` compares the
    end-to-end points of a batch size with model-only and re-measures or flags them.
    """

    def __init__(self, args, s: Settings, trainer, out: Path, env: dict, config: dict, reference: list[dict],
                 t0: float, ctx: DistContext | None = None):
        self.args, self.s, self.trainer, self.out, self.env, self.config = args, s, trainer, out, env, config
        self.ctx = ctx or DistContext(device=s.device)
        self.reference = reference
        self.rows: list[dict] = []
        self.cores = usable_cores()
        self.t0 = t0  # time.monotonic() when the run started: --time-limit-s counts set-up too
        self.last: dict[tuple[str, str], tuple[int, float, float]] = {}  # (stage, loader) → last ok point's
        # (effective batch, s/step, first step s)
        self.model_skipped: set[int] = set()
        self.total = 0

    def _left_s(self) -> float | None:
        if self.args.time_limit_s is None:
            return None
        return self.args.time_limit_s - (time.monotonic() - self.t0)

    def _projection(self, stage: str, name: str, batch: int) -> float | None:
        if (stage, name) not in self.last:
            return None
        s = self.s
        eb = batch * (1 if stage == "loader" else s.accum)
        prev_eb, prev_step, prev_first = self.last[(stage, name)]
        # the previous point's first step stands for this one's start-up (workers, pipeline build, FFCV's
        # numba compile); the steps scale with the batch
        return prev_first + prev_step * eb / prev_eb * (s.warmup + s.repeats * point_steps(stage, eb, s))

    def _run(self, stage: str, name: str, batch: int) -> dict:
        """Measure one point; under torchrun every rank measures it at once, rank 0 decides whether it is
        skipped, and the ranks' rows are combined (:func:`bench.stages.sum_over_ranks`)."""
        skip = self.ctx.broadcast_object(self._skip(stage, name, batch) if self.ctx.is_main else None)
        if skip is not None:
            return skip
        torch.set_num_threads(self.s.threads)  # a loader library may have changed it (FFCV sets 1 on import)
        row = run_point(stage, name, batch, self.s, self.trainer if stage != "loader" else None,
                        self._projection(stage, name, batch))
        if self.ctx.distributed:
            parts = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(parts, row)
            row = sum_over_ranks(parts)
        flag_load(row, self.cores)
        return row

    def _skip(self, stage: str, name: str, batch: int) -> dict | None:
        """The row of a point that is not run (too large, over the budget or the time limit), else None."""
        s = self.s
        accum = 1 if stage == "loader" else s.accum
        skipped = {"stage": stage, "loader": name, "batch": batch, "accum": accum, "effective_batch": batch * accum,
                   "status": "skipped"}
        if stage != "model" and batch > len(s.images) // s.world_size:
            return dict(skipped, note=f"batch > the {len(s.images) // s.world_size} benchmark images of a rank")
        if stage == "e2e" and batch in self.model_skipped:  # end to end costs at least the model-only step
            return dict(skipped, note="model-only was over the budget at this batch")
        proj = self._projection(stage, name, batch)
        left = self._left_s()
        if left is not None and (left <= 0 or (proj is not None and proj > left)):
            return dict(skipped, note=f"section time limit {self.args.time_limit_s:.0f} s"
                        + (f" (projected {proj:.0f} s, {max(left, 0):.0f} s left)" if proj is not None else ""))
        return None

    def measure(self, stage: str, name: str, batch: int) -> dict:
        """Measure a point (re-measured up to ``--remeasure`` times while its spread is too large);
        append, print one progress line and rewrite the partial JSON. Returns the row."""
        row = self._run(stage, name, batch)
        for _ in range(self.args.remeasure):
            if not too_spread(row, self.args.max_spread):
                break
            again = self._run(stage, name, batch)
            if again["status"] == "skipped":
                break
            row = keep_better(row, again)
        if too_spread(row, self.args.max_spread):
            add_flag(row, "spread")
        if row["status"] == "ok":
            self.last[(stage, name)] = (row["effective_batch"], row["step_s"], row.get("first_step_s", 0.0))
        elif stage == "model" and row["status"] == "skipped":
            self.model_skipped.add(batch)
        self.rows.append(row)
        self._progress(row)
        return row

    def _replace(self, old: dict, new: dict) -> dict:
        new = keep_better(old, new) if new["status"] == "ok" else old
        self.rows[self.rows.index(old)] = new
        self._progress(new, again=True)
        return new

    def check_batch(self, batch: int) -> None:
        """End-to-end faster than model-only at ``batch`` is impossible: re-measure model-only (this
        run's) once, then the offending end-to-end points once; flag what still disagrees."""
        eb = batch * self.s.accum
        model = next((r for r in self.rows if r["stage"] == "model" and r["effective_batch"] == eb), None)
        own_model = model is not None
        if model is None:
            model = next((r for r in self.reference if r["effective_batch"] == eb and r["status"] == "ok"), None)
        if model is None:
            return
        bad = [r for r in self.rows if r["stage"] == "e2e" and r["effective_batch"] == eb and beats_model(r, model, self.args.e2e_tolerance)]
        if bad and self.args.remeasure >= 1:
            if own_model:
                again = self._run("model", "synthetic", batch)
                model = self._replace(model, again)
            for r in [r for r in bad if beats_model(r, model, self.args.e2e_tolerance)]:
                self._replace(r, self._run("e2e", r["loader"], batch))
        for r in self.rows:
            if r["stage"] == "e2e" and r["effective_batch"] == eb and beats_model(r, model, self.args.e2e_tolerance):
                add_flag(r, "e2e>model")
                if own_model:
                    add_flag(model, "e2e>model")

    def _progress(self, row: dict, again: bool = False) -> None:
        ips = row.get("images_per_s")
        what = (f"{ips:.1f} images/s ±{row.get('spread_pct', 0):.0f}%" if row["status"] == "ok"
                else f"{row['status']} ({row.get('note', '')})")
        flags = f" [{', '.join(row['flags'])}]" if row.get("flags") else ""
        load = f" load {row['load_start']}" if row.get("load_start") is not None else ""
        if not self.ctx.is_main:
            return
        n = sum(1 for _ in self.rows)
        print(f"{'  again' if again else f'[{n}/{self.total}]'} {STAGE_NAMES[row['stage']]} {row['loader']} "
              f"batch {row['batch']}x{row['accum']}: {what}{load}{flags}", flush=True)
        write_json(self.out / "throughput.json", self.env, self.config, self.rows, {"partial": True})  # survives a kill


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``args``; returns ``{"out", "rows", "env", "config", ...}``."""
    t_start = time.monotonic()
    if args.keep_freed_memory:
        keep_freed_memory()  # as train.py: no page faults per step from glibc returning the step's buffers
    ctx = init_from_env(args.device)
    try:
        return _run(args, ctx, t_start)
    finally:
        destroy(ctx)


def _run(args: argparse.Namespace, ctx: DistContext, t_start: float) -> dict:
    device = ctx.device
    args = resolve(args, device, ctx.world_size)
    say = print if ctx.is_main else (lambda *a, **k: None)
    stages = [s for s in args.stages.split(",") if s]
    bad = set(stages) - set(STAGES)
    if bad:
        raise ValueError(f"unknown stage(s) {sorted(bad)}; choose from {', '.join(STAGES)}")
    out = Path(args.out) if args.out else Path("bench/results") / ctx.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    s = Settings(device=device, rank=ctx.rank, world_size=ctx.world_size, arch=args.arch, image_size=args.image_size, small_stem=args.small_stem,
                 dim=args.dim, pred_dim=args.pred_dim, proj_layers=args.proj_layers, amp=args.amp, channels_last=args.channels_last,
                 sync_bn=args.sync_bn, compile=args.compile, workers=args.workers, warmup=args.warmup,
                 repeats=args.repeats, min_images=args.min_images, min_steps=args.min_steps,
                 loader_min_steps=args.loader_min_steps, accum=args.accum,
                 seed=args.seed, memory_ceiling_mb=args.memory_ceiling, budget_s=args.budget_s,
                 aug=recipe_augmentation(args.recipe, args.image_size))
    env = environment(device)
    batches = args.batch_sizes
    unavailable: dict[str, str] = {}
    loaders: list[str] = []
    known = set(REAL_LOADERS) | {n for n in LOADERS if n != "synthetic"}
    if "loader" in stages or "e2e" in stages:
        specs = [x for x in args.loaders.split(",") if x]
        for spec in specs:
            name = parse_loader_spec(spec)[0]
            if name not in known:
                raise ValueError(f"unknown loader {name!r}; choose from {', '.join(sorted(known))}")
        s.images = bench_images(args.data, args.num_images, args.seed)
        for spec in specs:
            other = parse_loader_spec(spec)[1].get("data")
            if other is not None and other not in s.sources:
                s.sources[other] = bench_images(other, args.num_images, args.seed)
        for spec in specs:
            why = probe_loader(spec, s, min(batches[0], len(s.images)))
            if why is None:
                loaders.append(spec)
            else:
                unavailable[spec] = why
                say(f"loader {spec}: unavailable ({why})")
    config = {k: getattr(args, k) for k in ("recipe", "arch", "image_size", "small_stem", "dim", "pred_dim", "proj_layers", "amp",
                                            "channels_last", "sync_bn", "compile", "workers", "accum", "warmup",
                                            "repeats", "min_images", "min_steps", "loader_min_steps", "budget_s", "memory_ceiling",
                                            "batch_sizes", "stages", "quick", "seed", "max_spread", "remeasure",
                                            "e2e_tolerance", "time_limit_s", "reference", "keep_freed_memory")}
    config.update(device=str(device), world_size=ctx.world_size, num_images=len(s.images) if s.images is not None else None,
                  data=str(getattr(s.images, "root", s.images)) if s.images is not None else None, loaders=loaders,
                  unavailable=unavailable)
    reference = load_reference(args.reference, config) if args.reference else []
    warnings_ = [w for w in [load_warning(env["loadavg"][0] if env["loadavg"] else None, usable_cores())] if w]
    ranks = f" | {ctx.world_size} ranks ({ctx.backend})" if ctx.distributed else ""
    say(f"device {env['device_name']} | torch {env['torch']} | {args.arch} {args.image_size}px | amp {args.amp} | "
        f"channels_last {args.channels_last} | sync-bn {args.sync_bn} | workers {args.workers} | load {env['loadavg']} "
        f"on {usable_cores()} cores{ranks}", flush=True)
    for w in warnings_:
        say(w, flush=True)
    trainer = Trainer(s, ctx) if ("model" in stages or "e2e" in stages) else None
    config["sync_bn_kind"] = s.sync_bn_kind
    sweep = Sweep(args, s, trainer, out, env, config, reference, t_start, ctx)
    # Loader-only points first; then model-only and end-to-end interleaved batch size by batch size,
    # so drifting machine speed (shared CPUs) affects the two sides of the stall share alike.
    loader_plan = [("loader", n) for n in loaders] if "loader" in stages else []
    compute_plan = [("model", "synthetic")] * ("model" in stages) + [("e2e", n) for n in loaders if "e2e" in stages]
    sweep.total = len(batches) * (len(loader_plan) + len(compute_plan))
    for stage, name in loader_plan:
        for b in batches:
            sweep.measure(stage, name, b)
    for b in batches:
        for stage, name in compute_plan:
            sweep.measure(stage, name, b)
        if "e2e" in stages:
            sweep.check_batch(b)
    rows = sweep.rows
    rank = {(st, n): i for i, (st, n) in enumerate(loader_plan + compute_plan)}
    rows.sort(key=lambda r: rank[(r["stage"], r["loader"])])  # stable: batch order kept within a series
    add_stall_shares(rows, reference)
    extra = {"warnings": warnings_, "cores": usable_cores()}
    if args.profile:
        extra["profile"] = profile_run(args, s, trainer, loaders, out, ctx)
    if not ctx.is_main:
        return {"out": out, "rows": rows, "env": env, "config": config, **extra}
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    end_warning = load_warning(env["loadavg_end"][0], usable_cores())
    if end_warning and not warnings_:
        warnings_.append(end_warning)
    title = (f"{args.arch} {args.image_size}px amp={args.amp} cl={args.channels_last} sync_bn={args.sync_bn} "
             f"on {env['device_name']}")
    files = {"json": out / "throughput.json", "csv": out / "throughput.csv"}
    write_csv(files["csv"], config, rows)
    p1 = plot_throughput(out / "images_per_s.png", rows, title)
    p2 = plot_step_time(out / "step_time.png", rows + [r for r in reference if r["status"] == "ok"], title)
    files.update({k: v for k, v in (("plot_images_per_s", p1), ("plot_step_time", p2)) if v is not None})
    extra["files"] = {k: str(v) for k, v in files.items()}
    write_json(files["json"], env, config, rows, extra)
    print()
    print(table(rows))
    for name, why in unavailable.items():
        print(f"{name}: unavailable ({why})")
    flagged = [r for r in rows if r.get("flags")]
    if flagged:
        print(f"{len(flagged)} flagged point(s): " + "; ".join(FLAG_MEANINGS[f] for f in
                                                               sorted({f for r in flagged for f in r["flags"]})))
    for w in warnings_:
        print(w)
    if "profile" in extra and extra["profile"].get("verdict"):
        print(extra["profile"]["verdict"])
    print(f"results: {', '.join(str(v) for v in files.values())}  (load {env['loadavg']} → {env['loadavg_end']})")
    return {"out": out, "rows": rows, "env": env, "config": config, **extra}


FLAG_MEANINGS = {
    "load": "load: the load average exceeded the usable cores during the point",
    "spread": "spread: repeats disagreed by more than --max-spread % even after re-measuring",
    "e2e>model": "e2e>model: end to end beat model-only at the same batch (impossible in a steady state; no stall share)",
}


def profile_run(args, s: Settings, trainer: Trainer | None, loaders: list[str], out: Path,
                ctx: DistContext | None = None) -> dict:
    """Profile the end-to-end loop (first available loader; model-only without one) at the first
    batch size; writes ``out/profile/{tb/, trace.json}`` (rank 0's) and returns the trace summary."""
    from bench.trace_summary import summarize_trace
    ctx = ctx or DistContext(device=s.device)
    if trainer is None:
        trainer = Trainer(s, ctx)
    wait, warm, active = parse_schedule(args.profile_schedule)
    stage, name = ("e2e", loaders[0]) if loaders else ("model", "synthetic")
    batch = args.batch_sizes[0]
    ps = Settings(**{**s.__dict__, "warmup": 0, "repeats": 1, "min_images": 0, "min_steps": wait + warm + active + 1,
                     "budget_s": None})
    prof = StepProfiler(out / "profile", (wait, warm, active), s.device, enabled=ctx.is_main)
    try:
        row = run_point(stage, name, batch, ps, trainer, profiler=prof)
    finally:
        traces = prof.stop()
    result = {"stage": stage, "loader": name, "batch": batch, "status": row["status"],
              "traces": [str(t) for t in traces], "tensorboard": str(out / "profile" / "tb")}
    if traces:
        summary = summarize_trace(traces[0])
        result.update(verdict=summary["verdict"], shares=summary["shares"])
    return result


def relaunch(args: argparse.Namespace, argv: list[str]) -> dict:
    """Run this benchmark under ``torchrun --standalone --nproc-per-node=args.nproc`` and return rank 0's
    results (read from ``--out``, which is fixed here when not given)."""
    import json
    import subprocess
    out = args.out or str(Path("bench/results") / time.strftime("%Y%m%d-%H%M%S"))
    rest, skip = [], False
    for a in argv:  # the workers run under torchrun already: drop --nproc (torchrun would take it as its own)
        if skip or a == "--nproc" or a.startswith("--nproc="):
            skip = a == "--nproc"
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(Path(__file__).resolve()), *rest, *([] if args.out else ["--out", out])]
    print(" ".join(cmd[1:]), flush=True)
    res = subprocess.run(cmd)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun with {args.nproc} processes failed (exit {res.returncode}); see its output above")
    data = json.loads((Path(out) / "throughput.json").read_text())
    return {"out": Path(out), "rows": data["results"], "env": data["env"], "config": data["config"]}


def main(argv=None) -> dict:
    """Entry point: parse ``argv`` and :func:`run` (repeated warnings shown once); with ``--nproc N``
    outside torchrun, relaunch under torchrun (:func:`relaunch`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and not launched_by_torchrun():
        return relaunch(args, argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("once")
        return run(args)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError, ImportError) as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
