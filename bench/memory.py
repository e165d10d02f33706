"""Peak memory per benchmark point, and out-of-memory handling that lets a sweep go on.

- GPU: ``torch.cuda.max_memory_allocated`` (bytes held by tensors, not the caching allocator's
  reserve), reset before each point with ``torch.cuda.reset_peak_memory_stats``; after an OOM the
  cache is released with ``torch.cuda.empty_cache`` so the next point starts clean.
- CPU: the resident set size (RSS) of this process (psutil ``memory_info().rss``; DataLoader
  workers are separate processes and not included), sampled by a watcher thread every
  ``interval`` s. With a ceiling, crossing it interrupts the main thread (``_thread.interrupt_main``,
  delivered between two operators) and the point is recorded as OOM, so an oversized batch never
  drives the shared machine into swap or the kernel's OOM killer.
"""
from __future__ import annotations

import _thread
import ctypes
import gc
import os
import threading

import torch

try:
    import psutil
except ImportError:  # the lent GPU image may lack psutil; CUDA numbers do not need it
    psutil = None

MB = 1024 * 1024


class MemoryCeilingExceeded(MemoryError):
    """The process RSS crossed the ``--memory-ceiling`` on the CPU (recorded as OOM)."""


def rss_mb() -> float:
    """This process's resident set size in MiB (psutil; /proc/self/statm without it)."""
    if psutil is not None:
        return psutil.Process().memory_info().rss / MB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def total_memory_mb() -> float:
    """Physical memory of the machine in MiB."""
    if psutil is not None:
        return psutil.virtual_memory().total / MB
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MB


def default_ceiling_mb() -> float:
    """The CPU default ceiling: current RSS + 80% of the memory available now (MiB; psutil)."""
    avail = psutil.virtual_memory().available / MB if psutil is not None else 0.5 * total_memory_mb()
    return rss_mb() + 0.8 * avail


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors, CPU allocator failures and :class:`MemoryCeilingExceeded`."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def release_memory(device: torch.device) -> None:
    """Free what the last point left: Python garbage, the CUDA cache, glibc's free lists (``malloc_trim``)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    """Context manager measuring one point's peak memory in MiB (``.peak_mb``; ``.start_mb`` at entry),
    optionally guarded.

    Args:
        device: the training device (CUDA: allocator peak; CPU: sampled process RSS).
        ceiling_mb: CPU only; crossing it raises :class:`MemoryCeilingExceeded` in the ``with``
            body (None: no guard).
        interval: RSS sampling period in seconds.
    """

    def __init__(self, device: torch.device, ceiling_mb: float | None = None, interval: float = 0.005):
        self.device, self.ceiling_mb, self.interval = device, ceiling_mb, interval
        self.peak_mb = self.start_mb = 0.0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_rss"
        self._stop = threading.Event()
        self._tripped = False
        self._thread: threading.Thread | None = None

    @property
    def tripped(self) -> bool:
        """True once the ceiling was crossed; a ``KeyboardInterrupt`` seen after that came from the guard."""
        return self._tripped

    def _watch(self) -> None:
        while not self._stop.is_set():
            now = rss_mb()
            self.peak_mb = max(self.peak_mb, now)
            if self.ceiling_mb is not None and now > self.ceiling_mb and not self._tripped:
                self._tripped = True
                _thread.interrupt_main()
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / MB
        else:
            self.peak_mb = self.start_mb = rss_mb()
            self._thread = threading.Thread(target=self._watch, name="rss-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MB
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_mb = max(self.peak_mb, rss_mb())
        if self._tripped and (exc_type is None or issubclass(exc_type, KeyboardInterrupt)):
            raise MemoryCeilingExceeded(
                f"process RSS {self.peak_mb:.0f} MiB crossed the memory ceiling {self.ceiling_mb:.0f} MiB") from None
        return False
