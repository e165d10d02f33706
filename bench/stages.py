"""One benchmark point: a stage (loader-only, model-only, end-to-end) at one batch size.

- ``loader``: iterate a loader (two views per image, on the training device); no model.
- ``model``: forward + loss + backward + optimiser step on ``synthetic`` views already on the
  device (``pipeline.backends.synthetic``): the ceiling the input pipeline is compared against.
- ``e2e``: loader → model, the training loop of ``train.py`` (same :func:`model.step.train_step`).

Each point: build the loader, run ``warmup`` discarded steps, then ``repeats`` timed windows
(:mod:`bench.timing`), under a :class:`bench.memory.PeakMemory` guard. An out-of-memory point is
recorded with status ``oom`` (any other failure, e.g. a loader that breaks while iterating, with
status ``error`` and its traceback on stderr) and memory is released so the sweep goes on.
"""
from __future__ import annotations

import gc
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.profiler import record_function

from model.distributed import DistContext
from model.loss import SimSiamLoss
from model.precision import Precision
from model.step import train_step
from model.training import build_simsiam, recipe_sgd
from pipeline import AugmentConfig, build_loader, recipe
from pipeline.sources.imagefolder import ImageList

from .memory import PeakMemory, is_oom, release_memory
from .timing import cycle_epochs, measure, steps_for, summarize

STAGES = ("loader", "model", "e2e")
STAGE_NAMES = {"loader": "loader-only", "model": "model-only", "e2e": "end-to-end"}


@dataclass
class Settings:
    """Everything one benchmark run holds fixed (recorded with every result)."""

    device: torch.device
    arch: str = "resnet18"
    image_size: int = 32
    small_stem: bool = False
    dim: int = 2048
    pred_dim: int = 512
    proj_layers: int = 3
    amp: str = "off"
    channels_last: bool = False
    sync_bn: bool = False
    compile: bool = False
    workers: int = 2
    warmup: int = 2
    repeats: int = 3
    min_images: int = 256
    min_steps: int = 2
    loader_min_steps: int = 10
    accum: int = 1
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    memory_ceiling_mb: float | None = None
    budget_s: float | None = None
    images: ImageList | None = None
    sources: dict = field(default_factory=dict)  # other sources named by a loader spec's data=PATH
    clock: Callable[[], float] = time.perf_counter
    sync_bn_kind: str = field(default="none")
    threads: int = field(default_factory=torch.get_num_threads)
    aug: AugmentConfig | None = None  # the loaders' view augmentation; None: pipeline.recipe(image_size)

    @property
    def view_dtype(self) -> torch.dtype:
        """Dtype loaders deliver (float16 under fp16 AMP halves the copy, as train.py does)."""
        return torch.float16 if self.amp == "fp16" else torch.float32

    def sync(self) -> Callable[[], None] | None:
        """``torch.cuda.synchronize`` on a CUDA device, else None."""
        return torch.cuda.synchronize if self.device.type == "cuda" else None


class Trainer:
    """The model side of a run, built as ``train.py`` builds it (:mod:`model.training`) and stepped by the
    same :func:`model.step.train_step` (with ``--accum``): built once and reused by every point.

    Args:
        s: the run's settings; ``s.sync_bn_kind`` is set to the SyncBN kind actually used.
        ctx: this process's place among its peers (default: one process on ``s.device``).
    """

    def __init__(self, s: Settings, ctx: DistContext | None = None):
        ctx = ctx or DistContext(device=s.device)
        built = build_simsiam(ctx, s.arch, s.dim, s.pred_dim, s.small_stem, s.proj_layers, sync_bn=s.sync_bn,
                              channels_last=s.channels_last, compile=s.compile)
        s.sync_bn_kind = built.sync_bn
        self.model, self.step_model = built.model.train(), built.step_model
        self.criterion = SimSiamLoss()
        self.optimizer = recipe_sgd(self.model, lr=0.05)
        self.precision = Precision(s.amp, s.device)

    def step(self, batches, accum: int = 1) -> int:
        """One optimiser step over ``accum`` batches from iterator ``batches``; returns images used.
        Nothing is read back to the host: the caller synchronises around its timed windows."""
        return train_step(self.step_model, self.criterion, batches, self.optimizer, self.precision, accum).images


class TimedIter:
    """Iterator wrapper adding the time spent in ``next`` to ``wait_s`` (seconds, ``clock`` units)."""

    def __init__(self, it, clock: Callable[[], float]):
        self.it, self.clock, self.wait_s = it, clock, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = self.clock()
        try:
            return next(self.it)
        finally:
            self.wait_s += self.clock() - t0


LOADER_OPTIONS = {
    "torch": {"data": str, "workers": int},
    "torchvision-gpu": {"data": str, "workers": int},
    "dali": {"cpu_decode": bool, "prefetch": int, "hw_decoder_load": float, "data": str, "dont_use_mmap": bool,
             "workers": int, "overlap": bool},
    "ffcv": {"os_cache": bool, "order": str, "write_mode": str, "prefetch": int, "max_resolution": int, "data": str,
             "workers": int},
}
"""Options a loader spec may carry. ``data=PATH`` reads another source than ``--data`` (e.g. the same
images as tar shards: ``torch:data=data/fashion-mnist-shards``, ``dali:data=...``,
``torchvision-gpu:data=...``), opened like ``--data``; ``dont_use_mmap`` is DALI's, for shards;
``workers=N`` overrides ``-j`` for that series (worker processes for torch, DALI's CPU threads, ...), so
two thread counts can be compared in one run (``dali,dali:workers=1``)."""


def _option_value(kind: type, text: str):
    if kind is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"want a boolean (1/0, true/false), got {text!r}")
        return text.lower() in ("1", "true", "yes", "on")
    return kind(text)


def parse_loader_spec(spec: str) -> tuple[str, dict]:
    """``"ffcv:os_cache=0:order=quasi_random"`` → ``("ffcv", {"os_cache": False, "order": "quasi_random"})``.

    A loader spec is a loader name, optionally followed by ``:key=value`` options that go to the
    loader's constructor (the keys of :data:`LOADER_OPTIONS`; values typed accordingly). The whole
    spec names the series in the table, JSON and plots, so variants of one loader sit side by side.

    Raises:
        ValueError: an option this harness does not pass to that loader, or a malformed value.
    """
    name, *pairs = spec.split(":")
    allowed = LOADER_OPTIONS.get(name, {})
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in allowed:
            choices = ", ".join(f"{k}=..." for k in allowed) or "none"
            raise ValueError(f"loader spec {spec!r}: unknown option {pair!r} for {name} (options: {choices})")
        try:
            options[key] = _option_value(allowed[key], value)
        except ValueError as exc:
            raise ValueError(f"loader spec {spec!r}: option {key}: {exc}") from None
    return name, options


def make_loader(spec: str, batch: int, s: Settings):
    """Build the loader of ``spec`` (see :func:`parse_loader_spec`) for ``batch`` images per batch over
    ``s.images`` (``synthetic``: random views on the device).

    Raises whatever :func:`pipeline.build_loader` raises (ImportError when not installed).
    """
    name, options = parse_loader_spec(spec)
    common = dict(batch_size=batch, device=s.device, channels_last=s.channels_last, seed=s.seed, dtype=s.view_dtype)
    if name == "synthetic":
        return build_loader("synthetic", num_samples=batch * 1_000_000, size=s.image_size, pool=1, **common)
    source = s.sources[options.pop("data")] if "data" in options else s.images
    workers = options.pop("workers", s.workers)
    return build_loader(name, source=source, aug=s.aug or recipe(s.image_size), workers=workers, rank=s.rank,
                        world_size=s.world_size, **common, **options)


def sum_over_ranks(rows: list[dict]) -> dict:
    """One row for a point measured by every rank at once (``rows`` in rank order).

    Throughputs (images/s, views/s, their min and max) are summed over ranks; the step time, the
    spread and the peak memory are the largest rank's; the status is the first that is not ``ok``.
    Every rank gets the same row, so every rank takes the same decisions afterwards.
    """
    if len(rows) == 1:
        return rows[0]
    bad = next((r for r in rows if r["status"] != "ok"), None)
    row = dict(bad if bad is not None else rows[0], ranks=len(rows))
    if bad is not None:
        return row
    for k in ("images_per_s", "images_per_s_min", "images_per_s_max", "views_per_s"):
        if rows[0].get(k) is not None:
            row[k] = sum(r[k] for r in rows)
    for k in ("step_s", "spread_pct", "peak_mem_mb", "first_step_s", "timed_s"):
        if rows[0].get(k) is not None:
            row[k] = max(r[k] for r in rows)
    return row


def probe_loader(spec: str, s: Settings, batch: int) -> str | None:
    """None when the loader of ``spec`` can be built here, else the reason (missing package, an option
    this version of the loader does not take, no GPU, ...)."""
    try:
        loader = make_loader(spec, batch, s)
    except (ImportError, ModuleNotFoundError, TypeError, NotImplementedError, RuntimeError, ValueError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    del loader
    gc.collect()
    return None


def loadavg_1m() -> float | None:
    """The 1-minute load average (runnable processes, ``os.getloadavg``), None where unsupported."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def point_steps(stage: str, effective_batch: int, s: Settings) -> int:
    """Steps per timed window: at least ``s.min_images`` images and ``s.min_steps`` steps; loader-only
    windows also at least ``s.loader_min_steps`` batches, so batches prefetched during warm-up (a
    loader's queue: workers × prefetch for torch) are a small part of the window."""
    least = max(s.min_steps, s.loader_min_steps) if stage == "loader" else s.min_steps
    return steps_for(effective_batch, s.min_images, least)


def base_row(stage: str, loader: str, batch: int, s: Settings) -> dict:
    """The identifying columns of a result row."""
    accum = 1 if stage == "loader" else s.accum
    return {"stage": stage, "loader": loader, "batch": batch, "accum": accum,
            "effective_batch": batch * accum, "status": "ok", "note": ""}


def run_point(stage: str, loader_name: str, batch: int, s: Settings, trainer: Trainer | None,
              projection_s: float | None = None, profiler=None) -> dict:
    """Measure one point and return its row (see ``bench/report.py`` for the columns).

    Args:
        stage: ``loader``, ``model`` or ``e2e``.
        loader_name: the loader spec (``synthetic`` for ``model``; see :func:`parse_loader_spec`).
        trainer: the model side (None for ``loader``).
        projection_s: projected cost of the point from the previous batch size; above
            ``s.budget_s`` the point is skipped (status ``skipped``).
        profiler: a :class:`model.profiling.StepProfiler` stepped once per step (optional).
    """
    row = base_row(stage, loader_name, batch, s)
    steps = point_steps(stage, row["effective_batch"], s)
    row.update(steps=steps, repeats=s.repeats, warmup=s.warmup, load_start=loadavg_1m())
    if s.budget_s is not None and projection_s is not None and projection_s > s.budget_s:
        row.update(status="skipped", note=f"projected {projection_s:.0f} s > budget {s.budget_s:.0f} s")
        return row
    guard = PeakMemory(s.device, s.memory_ceiling_mb if s.device.type == "cpu" else None)
    first: list[float] = []
    batches = loader = None
    try:
        with guard:
            loader = make_loader(loader_name, batch, s)
            batches = cycle_epochs(loader)
            if stage == "loader":
                def step():
                    with record_function("data"):
                        b = next(batches)
                    if profiler is not None:
                        profiler.step()
                    return b.view1.shape[0]
            else:
                timed = TimedIter(batches, s.clock)

                def step():
                    before = timed.wait_s
                    n = trainer.step(timed, s.accum)
                    if profiler is not None:
                        profiler.step()
                    return n, timed.wait_s - before
            windows = measure(step, s.warmup, steps, s.repeats, s.clock, s.sync(), on_first=first.append)
    except KeyboardInterrupt:
        if not guard.tripped:
            raise
        row.update(status="oom", note=f"RSS crossed the memory ceiling {s.memory_ceiling_mb:.0f} MiB")
    except Exception as exc:  # noqa: BLE001 - a failing point is a result; the sweep goes on
        if is_oom(exc):
            row.update(status="oom", note=str(exc).splitlines()[0][:160])
        else:  # e.g. a loader that builds but fails while iterating: recorded, traceback on stderr
            traceback.print_exc()
            msg = " ".join(str(exc).split())[:160]
            row.update(status="error", note=f"{type(exc).__name__}: {msg}")
    finally:
        if batches is not None:
            batches.close()
        del batches, loader
        if trainer is not None:
            trainer.optimizer.zero_grad(set_to_none=True)
        release_memory(s.device)
    row.update(peak_mem_mb=round(guard.peak_mb, 1), start_mem_mb=round(guard.start_mb, 1), mem_kind=guard.kind,
               torch_threads=torch.get_num_threads(), load_end=loadavg_1m())
    if first:
        row["first_step_s"] = round(first[0], 4)
    if row["status"] != "ok":
        return row
    ips = summarize([w.images_per_s for w in windows])
    step_s = summarize([w.step_s for w in windows])
    total = sum(w.seconds for w in windows)
    row.update(images_per_s=ips.median, images_per_s_min=ips.min, images_per_s_max=ips.max,
               spread_pct=ips.spread_pct, views_per_s=2 * ips.median, step_s=step_s.median,
               data_wait_share=(sum(w.data_s for w in windows) / total) if stage == "e2e" else None,
               timed_s=total, window_images_per_s=[round(w.images_per_s, 2) for w in windows])
    return row
