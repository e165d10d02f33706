"""Summarise a profiler trace written by ``train.py --profile`` or ``bench/throughput.py --profile``.

``python bench/trace_summary.py TRACE`` (a Chrome trace-event JSON file, ``.json`` or ``.json.gz``,
or a folder holding one: ``trace.json`` or TensorBoard's ``*.pt.trace.json``) prints

1. the share of step time spent in each labelled range (``data``, ``forward``, ``loss``,
   ``backward``, ``optimizer``; ``record_function`` ranges, category ``user_annotation``), where
   step time is the sum of the profiler's ``ProfilerStep#N`` ranges;
2. the top operators by self time (CPU ``cpu_op`` events, minus their nested operators on the
   same thread), and the top GPU kernels by time when the trace has any;
3. a verdict line: **input-bound** when ``data`` (waiting for the next batch) takes at least
   ``--threshold`` (default 10%) of step time (a loader that never stalls would save at least
   that share), else **compute-bound**; the line names the deciding figure.

Trace format: Chrome trace-event JSON, ``{"traceEvents": [{"ph": "X", "cat", "name", "ts", "dur",
"pid", "tid"}, ...]}`` with times in microseconds (torch.profiler ``export_chrome_trace``).
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

LABELS = ("data", "forward", "loss", "backward", "optimizer")
COMPUTE = ("forward", "loss", "backward", "optimizer")
DEFAULT_THRESHOLD = 0.10


def find_trace(path: str | Path) -> Path:
    """``path`` itself if a file; in a folder, ``trace.json`` or else the newest ``*.pt.trace.json[.gz]``
    (searched recursively).

    Raises:
        FileNotFoundError: no trace there.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "trace.json").is_file():
            return path / "trace.json"
        found = sorted(list(path.rglob("*.pt.trace.json")) + list(path.rglob("*.pt.trace.json.gz")),
                       key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise FileNotFoundError(f"no profiler trace at {path} (want a .json/.json.gz trace or a folder holding one)")


def load_events(path: str | Path) -> list[dict]:
    """The complete (``ph == "X"``) events of a Chrome trace file or folder (see :func:`find_trace`).

    Raises:
        FileNotFoundError: no trace; ValueError: not a Chrome trace-event JSON.
    """
    path = find_trace(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON ({exc}); is the trace complete?") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path} has no traceEvents list: not a Chrome trace")
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X" and "dur" in e]


def _merged_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def range_shares(events: list[dict], labels=LABELS) -> dict:
    """Share of step time in each labelled ``record_function`` range.

    Returns:
        ``{"steps": n, "step_us": total step time (µs), "step_ms_mean": ..., "shares": {label: share},
        "range_ms": {label: ms}, "gpu_busy": share or None}``. Step time is the sum of
        ``ProfilerStep#N`` durations; without them, the span of the labelled ranges. A range's time
        is the union of its occurrences (CPU side, ``user_annotation``). ``gpu_busy`` is the union
        of GPU kernel time over step time (None without kernels).
    """
    steps = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")]
    ann = [e for e in events if e.get("cat") in ("user_annotation", None, "") and e.get("name") in labels]
    if steps:
        step_us = sum(float(e["dur"]) for e in steps)
    elif ann:
        step_us = max(float(e["ts"]) + float(e["dur"]) for e in ann) - min(float(e["ts"]) for e in ann)
    else:
        step_us = 0.0
    per: dict[str, list] = defaultdict(list)
    for e in ann:
        per[e["name"]].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    range_us = {k: _merged_us(per[k]) for k in labels}
    kernels = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events if e.get("cat") == "kernel"]
    return {"steps": len(steps), "step_us": step_us,
            "step_ms_mean": step_us / len(steps) / 1000 if steps else None,
            "shares": {k: (v / step_us if step_us else 0.0) for k, v in range_us.items()},
            "range_ms": {k: v / 1000 for k, v in range_us.items()},
            "gpu_busy": (_merged_us(kernels) / step_us if kernels and step_us else None)}


def top_self_time(events: list[dict], n: int = 15, cat: str = "cpu_op") -> list[dict]:
    """Operators of category ``cat`` by total self time (µs): duration minus nested ``cat`` events
    on the same thread. Returns ``[{"name", "self_ms", "calls", "share"}]`` (share of all self time)."""
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("cat") == cat:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    self_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[list] = []  # [end, name, child_us]
        def close(item):
            self_us[item[1]] += item[3] - item[2]
        for e in evs:
            ts, dur = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][0] <= ts:
                close(stack.pop())
            if stack:
                stack[-1][2] += dur
            stack.append([ts + dur, e["name"], 0.0, dur])
            calls[e["name"]] += 1
        while stack:
            close(stack.pop())
    total = sum(self_us.values()) or 1.0
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:n]
    return [{"name": k, "self_ms": v / 1000, "calls": calls[k], "share": v / total} for k, v in top]


def verdict(shares: dict[str, float], threshold: float = DEFAULT_THRESHOLD, gpu_busy: float | None = None) -> str:
    """The one-line verdict: input-bound when ``shares["data"] >= threshold``, else compute-bound."""
    data = shares.get("data", 0.0)
    compute = sum(shares.get(k, 0.0) for k in COMPUTE)
    gpu = f"; GPU kernels busy {100 * gpu_busy:.1f}% of step time" if gpu_busy is not None else ""
    if data >= threshold:
        return (f"verdict: INPUT-BOUND - waiting for the next batch ('data') takes {100 * data:.1f}% of step time "
                f"(>= {100 * threshold:.0f}% threshold; forward+loss+backward+optimizer {100 * compute:.1f}%){gpu}")
    return (f"verdict: COMPUTE-BOUND - 'data' takes only {100 * data:.1f}% of step time (< {100 * threshold:.0f}% "
            f"threshold); forward+loss+backward+optimizer take {100 * compute:.1f}%{gpu}")


def summarize_trace(path: str | Path, top: int = 15, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Everything :func:`main` prints, as a dict: ``trace``, ``steps``, ``step_ms_mean``, ``shares``,
    ``range_ms``, ``gpu_busy``, ``top_ops``, ``top_kernels``, ``verdict``."""
    trace = find_trace(path)
    events = load_events(trace)
    r = range_shares(events)
    if not r["steps"] and not any(r["range_ms"].values()):
        raise ValueError(f"{trace} holds no profiled step and no labelled range (data, forward, ...): "
                         f"not a trace of train.py --profile or bench/throughput.py --profile")
    return {"trace": str(trace), **r, "top_ops": top_self_time(events, top),
            "top_kernels": top_self_time(events, top, cat="kernel"),
            "verdict": verdict(r["shares"], threshold, r["gpu_busy"])}


def format_summary(s: dict) -> str:
    """The human-readable report of :func:`summarize_trace`'s dict."""
    lines = [f"trace: {s['trace']}"]
    mean = f", {s['step_ms_mean']:.1f} ms/step" if s["step_ms_mean"] else ""
    lines.append(f"profiled steps: {s['steps']}, step time {s['step_us'] / 1000:.1f} ms{mean}")
    lines.append("share of step time per labelled range:")
    for k, v in s["shares"].items():
        lines.append(f"  {k:<10}{100 * v:6.1f}%  {s['range_ms'][k]:10.1f} ms  {'#' * round(40 * v)}")
    other = max(0.0, 1 - sum(s["shares"].values()))
    lines.append(f"  {'(other)':<10}{100 * other:6.1f}%")
    for key, title in (("top_ops", "top CPU operators by self time"), ("top_kernels", "top GPU kernels by time")):
        if s[key]:
            lines.append(f"{title}:")
            for o in s[key]:
                lines.append(f"  {o['self_ms']:10.1f} ms {100 * o['share']:5.1f}% {o['calls']:6d}x  {o['name'][:90]}")
    lines.append(s["verdict"])
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Entry point: print :func:`format_summary` (or JSON) of the trace named in ``argv``; returns the dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="trace .json/.json.gz, or a folder holding one (a run's profile/ folder)")
    p.add_argument("--top", type=int, default=15, help="operators listed")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="'data' share of step time from which the run is called input-bound")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead")
    args = p.parse_args(argv)
    s = summarize_trace(args.trace, args.top, args.threshold)
    print(json.dumps(s, indent=1) if args.json else format_summary(s))
    return s


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
