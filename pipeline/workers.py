"""Who a stop signal is for: the training process, never the helper processes a loader starts.

A cluster stops a job by signalling every process of it: Slurm's ``scancel``, a preemption or a
time limit sends SIGTERM to every process of the job step, torchrun's agent sends SIGTERM to each
worker's whole process group (``os.killpg``), ``kill -TERM -PGID`` does the same, and Ctrl-C sends
SIGINT to the terminal's foreground group. A DataLoader worker that dies of that signal makes the
training process fail with "DataLoader worker (pid ...) is killed by signal" before it can write
its checkpoint. So helper processes let SIGTERM and SIGINT pass them by, and the training process
decides: it finishes its step, writes its checkpoint, shuts its helpers down and exits.

The policy, for every process a loader starts:

- :func:`ignore_stop_signals` is the first thing the helper runs (``DataLoader(worker_init_fn=...)``,
  or the target wrapper of a ``multiprocessing.Process``). SIGINT is ignored. SIGTERM is held
  (blocked) and taken by a small thread of the helper (``sigwaitinfo``), which looks at the sender:
  a SIGTERM from the helper's parent, or one that arrives after the parent is gone, ends the
  helper (``Process.terminate()`` is how torch's DataLoader and Python's exit stop daemonic
  workers: a helper that ignored it would leave its parent waiting forever in ``join``); any other
  sender's (a group signal, a scheduler's) is dropped. A program the helper starts (a ``pipe:``
  reader, a decoder) inherits SIGINT ignored and SIGTERM blocked, so a group signal passes it by
  too, and it ends when the helper's clean-up ends it.
- :func:`stop_signals_deferred` surrounds the start of helpers: SIGTERM and SIGINT are blocked in
  the starting thread, so a child inherits them blocked and a signal that reaches it before it
  runs :func:`ignore_stop_signals` waits and is then judged by its sender (torch's DataLoader
  worker installs a SIGTERM handler of its own before ``worker_init_fn`` runs: without the block,
  a group signal in that window kills the worker). The parent receives its own pending signal
  when the block ends.
- Whoever starts helpers stops them: torch's DataLoader shuts its workers down (and they exit on
  their own when their parent is gone: their watchdog polls every 5 s), and
  :func:`stop_signals_raise` lets code that waits for helpers it cannot otherwise stop (the FFCV
  writer) turn a signal into :class:`StopSignal` and kill them in its clean-up.
"""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""The signals a scheduler, a launcher or a terminal sends to ask a job to stop."""


class StopSignal(BaseException):
    """A stop signal arrived while :func:`stop_signals_raise` was active.

    A ``BaseException`` (as ``KeyboardInterrupt``), so that ``except Exception`` clauses do not
    swallow it. ``signum`` is the signal; ``code`` the conventional exit status ``128 + signum``
    (143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.code = 128 + signum


def _take_sigterm(parent: int) -> None:
    """The helper's SIGTERM thread: exit on the parent's SIGTERM (or any once the parent is gone)."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(0)  # what torch's own worker handler does on its parent's SIGTERM


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Make this (helper) process leave stop signals to its parent (see the module docstring):
    SIGINT ignored; SIGTERM blocked and taken by a thread that ends the process when the sender is
    its parent (``Process.terminate()``) or the parent is gone, and drops it otherwise.

    Usable as ``DataLoader(worker_init_fn=ignore_stop_signals)`` (``worker_id`` is accepted and
    unused) and as the first call of any helper process. Must run in the process's main thread
    before it starts threads of its own (it does, in a DataLoader worker and in a
    ``multiprocessing.Process`` target): threads started later inherit the block.
    """
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=_take_sigterm, args=(parent,), name="sigterm", daemon=True).start()


@contextlib.contextmanager
def stop_signals_deferred():
    """Block SIGTERM and SIGINT in the calling thread while the block runs: wrap the start of
    helper processes (``iter(dataloader)`` of a DataLoader with workers, ``Process.start()``).

    Children started inside inherit the block (see the module docstring); a signal sent to this
    process meanwhile is delivered when the block ends, to whatever handler is then installed.

    It first collects this process's garbage: an unreachable object whose finaliser needs threads
    of this process would otherwise be copied into a forked child and finalised there, where those
    threads do not exist. Seen: a DataLoader worker forked after a DALI pipeline had been dropped
    (a reference cycle, not yet collected) hung for good in ``Pipeline._shutdown``, called by the
    child's garbage collector in the middle of its first batch.
    """
    gc.collect()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def stop_signals_raise():
    """While the block runs, SIGTERM / SIGINT to this process raise :class:`StopSignal` in it.

    For a stage that waits on helpers which ignore those signals (see the module docstring): the
    stage's clean-up (``finally``) then stops them. The handlers are restored when the block ends;
    a child forked inside the block inherits them and ignores the signal until it installs its own
    policy. Outside the main thread (where Python cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() == owner:  # a forked child that has not yet run ignore_stop_signals: ignore
            raise StopSignal(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler set outside Python
