"""Outputs of a benchmark run: terminal table, ``throughput.json``, ``throughput.csv`` and PNG plots.

Row columns (one row per stage × loader × batch size):

=================  ==============================================================================
stage              ``loader`` (loader-only), ``model`` (model-only), ``e2e`` (end-to-end)
loader             ``torch``, ``dali``, ``ffcv`` or ``synthetic`` (model-only)
batch, accum       images per batch; batches per optimiser step (gradient accumulation)
status             ``ok``, ``oom``, ``skipped`` (over the time budget or batch > images), ``error``
images_per_s       median over repeats of images (view pairs) per second; ``_min``/``_max``
spread_pct         ``100 (max - min) / median`` of images/s over repeats
window_images_per_s  images/s of each timed window, in order (JSON only)
views_per_s        2 × images_per_s
step_s             median seconds per optimiser step (per batch for loader-only)
data_wait_share    end-to-end: share of the timed time spent waiting for the next batch
stall_share        end-to-end: ``1 - e2e images/s / model-only images/s`` at the same batch
peak_mem_mb        CUDA max allocated (GPU) or sampled process RSS (CPU), MiB
start_mem_mb       the same reading when the point started (model and libraries already loaded)
load_start/_end    1-minute load average when the point started / ended
flags              ``load``, ``spread``, ``e2e>model`` (see :mod:`bench.trust`); ``attempts``: images/s
                   of every measurement of a re-measured point
=================  ==============================================================================
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .stages import STAGE_NAMES

CSV_COLUMNS = ["stage", "loader", "batch", "accum", "effective_batch", "status", "images_per_s",
               "images_per_s_min", "images_per_s_max", "spread_pct", "views_per_s", "step_s",
               "data_wait_share", "stall_share", "peak_mem_mb", "start_mem_mb", "mem_kind", "torch_threads", "first_step_s", "steps",
               "repeats", "warmup", "load_start", "load_end", "flags", "note"]
CONFIG_COLUMNS = ["device", "arch", "image_size", "amp", "channels_last", "sync_bn", "compile", "workers"]


def _fmt(v, spec: str, missing: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, spec)


def table(rows: list[dict]) -> str:
    """A fixed-width text table of the rows (the terminal output, printed once at the end of a run).

    ``stall%`` is ``?`` for a pair flagged ``e2e>model``; the ``flags`` column lists a point's flags
    (:mod:`bench.trust`); ``load`` is the 1-minute load average when the point started.
    """
    width = max([10] + [len(r["loader"]) + 2 for r in rows])
    fw = max([6] + [len(",".join(r.get("flags", []))) + 2 for r in rows])
    head = (f"{'stage':<12}{'loader':<{width}}{'batch':>6}{'accum':>6}  {'status':<8}{'images/s':>10}{'±%':>6}"
            f"{'views/s':>10}{'s/step':>9}{'wait%':>7}{'stall%':>7}{'peak MiB':>10}{'load':>6}  {'flags':<{fw}}note")
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = r["status"] == "ok"
        pct = lambda k: _fmt(100 * r[k], ".0f") if ok and r.get(k) is not None else "-"  # noqa: E731
        stall = "?" if ok and "e2e>model" in r.get("flags", []) else pct("stall_share")
        lines.append(
            f"{STAGE_NAMES.get(r['stage'], r['stage']):<12}{r['loader']:<{width}}{r['batch']:>6}{r.get('accum', 1):>6}  "
            f"{r['status']:<8}{_fmt(r.get('images_per_s'), '.1f'):>10}{_fmt(r.get('spread_pct'), '.0f'):>6}"
            f"{_fmt(r.get('views_per_s'), '.1f'):>10}{_fmt(r.get('step_s'), '.3f'):>9}{pct('data_wait_share'):>7}"
            f"{stall:>7}{_fmt(r.get('peak_mem_mb'), '.0f'):>10}{_fmt(r.get('load_start'), '.1f'):>6}  "
            f"{','.join(r.get('flags', [])):<{fw}}{r.get('note', '')}")
    return "\n".join(lines)


def write_json(path: Path, env: dict, config: dict, rows: list[dict], extra: dict | None = None) -> Path:
    """Write ``{"env", "config", "results", ...extra}`` as indented JSON (NaN written as null)."""
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    path.write_text(json.dumps({"env": env, "config": config, "results": clean, **(extra or {})}, indent=1,
                               default=str))
    return path


def write_csv(path: Path, config: dict, rows: list[dict]) -> Path:
    """Write one CSV line per row: :data:`CONFIG_COLUMNS` then :data:`CSV_COLUMNS`."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CONFIG_COLUMNS + CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**{k: config.get(k) for k in CONFIG_COLUMNS}, **r, "flags": " ".join(r.get("flags", []))})
    return path


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            name = STAGE_NAMES.get(r["stage"], r["stage"]) + ("" if r["loader"] == "synthetic" else f" {r['loader']}")
            out.setdefault(name, []).append(r)
    return out


def plot_throughput(path: Path, rows: list[dict], title: str) -> Path | None:
    """Images/s vs batch size, one line per stage and loader, log-2 x axis, log y (matplotlib, Agg).

    Returns None (no file) when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in sorted(_series(rows).items()):
        rs = sorted(rs, key=lambda r: r["effective_batch"])
        x = [r["effective_batch"] for r in rs]
        y = [r["images_per_s"] for r in rs]
        err = [[r["images_per_s"] - r["images_per_s_min"] for r in rs], [r["images_per_s_max"] - r["images_per_s"] for r in rs]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    for r in rows:
        if r["status"] == "oom":
            ax.axvline(r["effective_batch"], color="red", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # loader-only and model-only differ by orders of magnitude on a CPU
    ax.set_xlabel("batch size (images; red dotted: OOM)")
    ax.set_ylabel("images/s (median, min-max bars; log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_step_time(path: Path, rows: list[dict], title: str) -> Path | None:
    """Stacked seconds per step for each end-to-end point: compute (model-only step at the same
    batch) + input (the rest of the end-to-end step). Pairs flagged ``e2e>model`` are left out (the
    title says how many). None without matplotlib or e2e points."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    model = {r["effective_batch"]: r for r in rows if r["stage"] == "model" and r["status"] == "ok"}
    pairs = [r for r in rows if r["stage"] == "e2e" and r["status"] == "ok" and r["effective_batch"] in model]
    bars = [r for r in pairs if "e2e>model" not in r.get("flags", [])]  # one of the pair's figures is wrong
    if not bars:
        return None
    if len(bars) < len(pairs):
        title += f"\n({len(pairs) - len(bars)} point(s) flagged e2e>model omitted)"
    labels = [f"{r['loader']}\n{r['effective_batch']}" for r in bars]
    compute = [model[r["effective_batch"]]["step_s"] for r in bars]
    stall = [max(0.0, r["step_s"] - c) for r, c in zip(bars, compute)]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(bars) + 2), 4.5))
    ax.bar(labels, compute, label="compute (model-only step)")
    ax.bar(labels, stall, bottom=compute, label="input stall (end-to-end - model-only)")
    ax.set_ylabel("seconds per step")
    ax.set_xlabel("loader / batch size")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
