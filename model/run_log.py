"""What the training loop keeps from each read-back: epoch totals, the per-step curve, TensorBoard
scalars and the collapse warning (:class:`model.collapse.CollapseDetector`).

Rows come from :meth:`model.step.StatsReadback.read` (host floats, every ``--log-every`` steps),
so nothing here touches the device. Every rank keeps the same totals (the rows are already
averaged over ranks); only rank 0 has a TensorBoard writer and prints.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from pipeline.writes import write_failed

from .collapse import CollapseDetector

TOTALS = ("loss_sum", "z_std_sum", "steps", "nonfinite", "images", "seconds")


class RunLog:
    """Epoch totals and the run's curve, fed with read-back rows.

    Args:
        curve: the run's ``[[step, loss, z_std], ...]`` so far (extended in place; resumed runs
            pass the checkpoint's).
        detector: the collapse detector (its warning is printed once, through ``say``).
        writer: a ``SummaryWriter`` (rank 0) or None.
        say: prints a line (rank 0) or does nothing.

    Attributes:
        totals: this epoch's sums (:data:`TOTALS`): loss and z-std of finite steps, their count,
            non-finite (skipped) steps, images (summed over ranks) and seconds of training.
    """

    def __init__(self, curve: list, detector: CollapseDetector, writer=None, say: Callable = print):
        self.curve, self.detector, self.writer, self.say = curve, detector, writer, say
        self.totals: dict[str, float] = {}

    def start_epoch(self, partial: dict | None = None) -> None:
        """Reset the totals, or continue those a mid-epoch checkpoint saved (``partial``)."""
        self.totals = {k: float((partial or {}).get(k, 0.0)) for k in TOTALS}

    def add(self, rows: list[tuple[int, float, float, bool]], lr: float, images_per_s: float) -> str | None:
        """Record read-back rows ``(step, loss, z_std, nonfinite)``; returns the collapse warning the
        first time the detector fires (already printed), else None."""
        t = self.totals
        finite = []
        for step, loss, z, bad in rows:
            if bad:
                t["nonfinite"] += 1
                self.say(f"warning: non-finite loss at step {step}: the update was skipped")
                continue
            t["loss_sum"] += loss
            t["z_std_sum"] += z
            t["steps"] += 1
            finite.append([step, loss, z])
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss, step)
                self.writer.add_scalar("train/z_std", z, step)
        self.curve.extend(finite)
        if rows and self.writer is not None:
            self.writer.add_scalar("train/lr", lr, rows[-1][0])
            self.writer.add_scalar("train/images_per_s", images_per_s, rows[-1][0])
        message = self.detector.update(finite)
        if message is not None:
            self.say(message)
        return message

    def snapshot(self, images: int, seconds: float) -> dict:
        """The totals with this epoch's images and seconds so far: what a mid-epoch checkpoint keeps."""
        return {**self.totals, "images": self.totals["images"] + images, "seconds": self.totals["seconds"] + seconds}

    def record(self, epoch: int, images: int, seconds: float) -> dict:
        """The epoch's history record: mean loss and z-std of its finite steps, images/s, skipped steps."""
        t = self.snapshot(images, seconds)
        return {"epoch": epoch, "loss": t["loss_sum"] / max(1, t["steps"]), "z_std": t["z_std_sum"] / max(1, t["steps"]),
                "images_per_s": t["images"] / max(t["seconds"], 1e-9), "skipped_steps": int(t["nonfinite"])}


_thread_hook = None


def _quiet_event_thread(args) -> None:
    """``threading.excepthook`` that does not print an ``OSError`` of TensorBoard's event-writer
    thread: the writer raises it again in the training thread at its next call, where
    :class:`TensorBoard` turns it into one line."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
        return
    _thread_hook(args)


class TensorBoard:
    """Rank 0's TensorBoard ``SummaryWriter`` whose write failures name the event file.

    TensorBoard appends events from a thread of its own; when a write fails there (a full disk),
    the thread stops and its next ``add_scalar`` / ``flush`` / ``close`` raises the ``OSError``
    without a file name. Here that becomes :class:`pipeline.writes.WriteFailed`, one line naming
    the event file, the cause and the free space; the thread's own traceback is not printed.

    Args:
        logdir: the TensorBoard folder (``<run>/tb``).

    Raises:
        pipeline.writes.WriteFailed: (from the constructor and every method) a write failed.
    """

    def __init__(self, logdir: str | Path):
        global _thread_hook
        from torch.utils.tensorboard import SummaryWriter

        if _thread_hook is None:
            _thread_hook = threading.excepthook
            threading.excepthook = _quiet_event_thread
        self.path: Path | str = Path(logdir)
        self.writer = self._guard(SummaryWriter, str(logdir))
        self.path = getattr(self.writer.file_writer.event_writer, "_file_name", logdir)
        self.failed = False

    def _guard(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            self.failed = True
            raise write_failed(self.path, exc, "TensorBoard log") from exc

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """``SummaryWriter.add_scalar``."""
        self._guard(self.writer.add_scalar, tag, value, step)

    def flush(self) -> None:
        """Write pending events."""
        self._guard(self.writer.flush)

    def close(self) -> None:
        """Write pending events and close the file (nothing more is tried after a failure)."""
        if not self.failed:
            self._guard(self.writer.close)
