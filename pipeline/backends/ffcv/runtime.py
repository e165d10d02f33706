"""FFCV without side effects on the caller: the thread count and numba's types are left alone.

1. **Threads.** FFCV 1.0.2 calls ``torch.set_num_threads`` in three places
   (``ffcv/pipeline/compiler.py``: ``Compiler.set_num_threads``, which also sets numba's count):
   once at import (to 1), in ``Loader.__init__`` and ``Loader.__iter__`` (to ``num_workers``). A
   notebook, the benchmark or any script that writes a ``.beton`` or iterates FFCV would otherwise
   run its own torch ops on one core afterwards. Every FFCV entry point of this project imports
   FFCV through :func:`import_ffcv` and runs FFCV calls inside :func:`torch_threads_kept`.
2. **numba's type registry.** ``OSCacheManager.compile_reader`` (``ffcv/memory_managers/os_cache.py``,
   via its ``state_type``) makes a read-only array type by setting ``mutable = False`` on the
   object numba returns for ``uint8[::1]``. numba interns its types and hashes them by a key that
   includes ``mutable`` (``numba/core/types/npytypes.py``, ``Array.key``), so every dictionary that
   already holds that shared object, such as a dispatcher's ``overloads``, is corrupted: when the
   compiled pipeline is garbage-collected, numba's dispatcher finaliser raises ``KeyError`` while
   iterating ``overloads.values()`` (printed as two ``PytestUnraisableExceptionWarning``
   tracebacks at the end of the test run). :func:`import_ffcv` replaces that one method with an
   equivalent that asks numba for a read-only type (``Array(..., readonly=True)``) instead of
   mutating the shared one; the compiled reader has the same signature as FFCV's.
3. **The writer's progress bar.** ``DatasetWriter`` always draws a tqdm bar, refreshed every
   0.1 s; in a log file (stderr not a terminal) each refresh is one more carriage-return line.
   :mod:`pipeline.backends.ffcv.write` runs FFCV's writing loop itself and draws the bar only on a
   terminal.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def torch_threads_kept():
    """Restore ``torch.get_num_threads()`` when the block ends (normally or by an exception)."""
    n = torch.get_num_threads()
    try:
        yield n
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _os_cache_reader(self):
    """``OSCacheManager.compile_reader`` of FFCV 1.0.2 with its read-only types made, not mutated.

    Compiles ``read(address, state) -> bytes of the sample at address`` where ``state`` is
    ``(file memory map: read-only uint8[::1], sample pointers: uint64[::1], sizes: uint64[::1])``.
    """
    import numba as nb
    import numpy as np
    from ffcv.pipeline.compiler import Compiler

    file_bytes = nb.types.Array(nb.uint8, 1, "C", readonly=True)
    state = nb.types.Tuple([file_bytes, nb.uint64[::1], nb.uint64[::1]])

    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address:address + size]

    return Compiler.compile(read, file_bytes(nb.uint64, state))


def _patch_numba_types() -> None:
    from ffcv.memory_managers.os_cache import OSCacheManager

    OSCacheManager.compile_reader = _os_cache_reader


def import_ffcv():
    """Import ``ffcv`` (its loader, writer and fields) with the caller's torch thread count kept
    and FFCV's reader compiled without touching numba's shared types (see the module docstring).

    Raises:
        ImportError: FFCV is not installed.
    """
    with torch_threads_kept():
        import ffcv
        import ffcv.fields  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.writer  # noqa: F401
    _patch_numba_types()
    return ffcv
