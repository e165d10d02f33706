"""Stop a run cleanly on SIGTERM / SIGINT: finish the step, checkpoint the position, exit non-zero.

Cluster schedulers send SIGTERM some time before they kill a job (Slurm's ``KillWait``, 30 s by
default; Kubernetes' ``terminationGracePeriodSeconds``), and torchrun's agent forwards SIGTERM to
its workers; Ctrl-C sends SIGINT. :class:`GracefulStop` turns the first such signal into a flag the
training loop reads at step boundaries; a second signal aborts at once (KeyboardInterrupt).
"""
from __future__ import annotations

import signal
import sys
import threading


class TrainingInterrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; ``code`` is the exit status
    (128 + signal number, the shell's convention: 143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class GracefulStop:
    """Catch SIGTERM and SIGINT while the block runs; ``requested`` turns True on the first one.

    Use as a context manager around the training loop (handlers can only be installed from the
    main thread; elsewhere it does nothing). ``announce`` prints one line when a signal arrives.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name} received: stopping after this step and writing a checkpoint "
                  f"(send it again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
