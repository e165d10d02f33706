"""When a benchmark point can be believed: load, spread between repeats, end-to-end vs model-only.

A point is *flagged* (its row's ``flags`` list) when

- ``load``: the 1-minute load average at its start or end exceeded the CPU cores this process may
  use: other work competed for the cores, so its images/s are not this code's alone;
- ``spread``: its repeats disagree, ``(max - min) / median`` of images/s above ``max_spread_pct``,
  after :func:`bench.throughput.run` re-measured it (the attempt with the smaller spread is kept);
- ``e2e>model``: end to end (loader → model) ran faster than model-only (synthetic views already on
  the device) at the same effective batch by more than ``tolerance``, after re-measuring. In a
  steady state that is impossible (end to end does the model's work plus the loader's), so one of
  the two figures is wrong and the stall share of the pair is not computed.

The table marks flagged points; the JSON keeps the flags and every attempt's images/s.

On the CPU, load hurts most through OpenMP: by default its idle threads spin, waiting for the other
threads of a parallel region, and when other processes hold the cores each region waits for
descheduled threads. Measured on 2 cores at load 8 (resnet18 SimSiam step, batch 16, 32 px):
2-10 s a step with 2 threads spinning, 0.19 s with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep), 0.22 s
with one thread. The benchmark scripts therefore set ``OMP_WAIT_POLICY=PASSIVE`` before torch starts
OpenMP unless the caller set it (recorded in the environment).
"""
from __future__ import annotations

import os

MAX_SPREAD_PCT = 15.0   # repeats of a steady point on a quiet machine agree within a few percent
E2E_TOLERANCE = 0.05    # end to end may beat model-only by this fraction before it counts as impossible


def usable_cores() -> int:
    """CPU cores this process may run on (``sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_warning(load: float | None, cores: int) -> str | None:
    """A one-line warning when the load average ``load`` exceeds ``cores``, else None."""
    if load is None or load <= cores:
        return None
    return (f"warning: load average {load:.1f} exceeds the {cores} usable CPU cores: other work competes for "
            f"them, so images/s below are lower and noisier than this code's own (points flagged 'load'; "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")


def add_flag(row: dict, flag: str) -> None:
    """Append ``flag`` to ``row["flags"]`` once."""
    flags = row.setdefault("flags", [])
    if flag not in flags:
        flags.append(flag)


def flag_load(row: dict, cores: int) -> None:
    """Flag ``load`` when the row's ``load_start`` or ``load_end`` exceeds ``cores``."""
    if any(row.get(k) is not None and row[k] > cores for k in ("load_start", "load_end")):
        add_flag(row, "load")


def too_spread(row: dict, max_spread_pct: float = MAX_SPREAD_PCT) -> bool:
    """True for an ``ok`` row whose repeats disagree by more than ``max_spread_pct`` percent."""
    return row.get("status") == "ok" and row.get("spread_pct") is not None and row["spread_pct"] > max_spread_pct


def keep_better(first: dict, second: dict) -> dict:
    """Of two measurements of one point, the ``ok`` one with the smaller spread; the kept row lists
    every attempt's images/s in ``attempts`` (measurement order) and notes the re-measure."""
    attempts = first.get("attempts") or [first.get("images_per_s")]
    attempts = attempts + [second.get("images_per_s")]
    candidates = [r for r in (first, second) if r.get("status") == "ok"] or [second]
    best = min(candidates, key=lambda r: r.get("spread_pct", float("inf")))
    best = dict(best, attempts=attempts)
    note = [x for x in (best.get("note") or "").split("; ") if x and not x.startswith("re-measured")]
    best["note"] = "; ".join(note + [f"re-measured ({len(attempts)} attempts)"])
    return best


def beats_model(e2e: dict, model: dict, tolerance: float = E2E_TOLERANCE) -> bool:
    """True when ``ok`` end-to-end row ``e2e`` is faster than ``ok`` model-only row ``model`` by more than
    ``tolerance`` (a fraction): impossible in a steady state."""
    if e2e.get("status") != "ok" or model.get("status") != "ok":
        return False
    return e2e["images_per_s"] > model["images_per_s"] * (1 + tolerance)
