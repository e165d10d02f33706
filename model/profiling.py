"""``--profile`` for ``train.py`` and ``bench/throughput.py``: one torch.profiler schedule, two trace formats.

It lives beside the training step (not in ``bench/``) because the trainer and the benchmark both use it.

The profiler follows a ``wait, warmup, active`` schedule (torch.profiler docs, "Using profiler to
analyze long-running jobs"), records shapes and memory, and when the active window closes writes

- ``<dir>/tb/<worker>.<time>.pt.trace.json`` with :func:`torch.profiler.tensorboard_trace_handler`,
  for TensorBoard's torch-tb-profiler plugin (``tensorboard --logdir <dir>/tb``); the plugin is
  no longer maintained (pytorch/kineto#857), so also
- ``<dir>/trace.json``, the same trace as Chrome trace-event JSON (``export_chrome_trace``), which
  opens without any plugin at https://ui.perfetto.dev or chrome://tracing, and which
  ``bench/trace_summary.py`` reads.

The step is labelled with :func:`torch.profiler.record_function` ranges ``data`` (waiting for the
next batch), ``forward``, ``loss``, ``backward`` and ``optimizer`` (:func:`model.step.train_step`).
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

DEFAULT_SCHEDULE = (1, 2, 5)  # wait, warmup, active steps


def parse_schedule(text: str) -> tuple[int, int, int]:
    """``"wait,warmup,active"`` → three ints (wait, warmup >= 0; active >= 1).

    Raises:
        ValueError: not three integers, or out of range.
    """
    try:
        wait, warmup, active = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--profile-schedule wants WAIT,WARMUP,ACTIVE step counts, got {text!r}") from None
    if wait < 0 or warmup < 0 or active < 1:
        raise ValueError(f"--profile-schedule needs wait >= 0, warmup >= 0, active >= 1, got {text!r}")
    return wait, warmup, active


class StepProfiler:
    """A scheduled torch.profiler writing TensorBoard and Chrome/Perfetto traces into ``out_dir``.

    Call :meth:`step` once per training step and :meth:`stop` at the end (both are no-ops when
    ``enabled`` is False, so a loop can call them unconditionally). ``traces`` lists the Chrome
    JSON files written.

    Args:
        out_dir: folder for ``tb/`` and ``trace.json``.
        schedule: ``(wait, warmup, active)`` steps; one cycle is recorded.
        device: adds CUDA activity when it is a CUDA device.
        enabled: False makes every method a no-op.
    """

    def __init__(self, out_dir: str | Path, schedule: tuple[int, int, int] = DEFAULT_SCHEDULE,
                 device: torch.device | str = "cpu", enabled: bool = True):
        self.out_dir, self.schedule, self.enabled = Path(out_dir), schedule, enabled
        self.traces: list[Path] = []
        self.steps = 0
        self.short_message: str | None = None
        self._prof = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if torch.device(device).type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        wait, warmup, active = schedule
        self._tb = torch.profiler.tensorboard_trace_handler(str(self.out_dir / "tb"))
        self._prof = torch.profiler.profile(
            activities=activities, schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=self._ready, record_shapes=True, profile_memory=True)
        self._prof.start()

    def _ready(self, prof) -> None:
        # A kineto result can be saved once: let the TensorBoard handler write it, then copy that
        # file (already Chrome trace-event JSON) to a stable name for Perfetto and trace_summary.
        tb = self.out_dir / "tb"
        before = set(tb.glob("*.pt.trace.json*")) if tb.exists() else set()
        self._tb(prof)
        new = sorted(set(tb.glob("*.pt.trace.json*")) - before, key=lambda p: p.stat().st_mtime)
        path = self.out_dir / ("trace.json" if not self.traces else f"trace_{len(self.traces)}.json")
        if new:
            shutil.copyfile(new[-1], path)
        else:  # handler wrote nothing we can find: export directly
            prof.export_chrome_trace(str(path))
        self.traces.append(path)

    def step(self) -> None:
        """Mark the end of one training step (advances the schedule)."""
        if self._prof is not None:
            self.steps += 1
            self._prof.step()

    def stop(self) -> list[Path]:
        """Stop profiling and return the Chrome JSON paths written.

        A run shorter than the schedule writes no trace; then ``short_message`` says so, with the
        number of steps the schedule needs, and a warning is issued.
        """
        if self._prof is not None:
            self._prof.stop()
            self._prof = None
            if not self.traces:
                wait, warmup, active = self.schedule
                self.short_message = (
                    f"profiler: no trace written: the run made {self.steps} step(s), the schedule "
                    f"{wait},{warmup},{active} (wait,warmup,active) needs {wait + warmup + active}; "
                    f"run longer or pass a shorter --profile-schedule")
                warnings.warn(self.short_message, stacklevel=2)
        return self.traces

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
