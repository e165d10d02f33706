"""Keep freed host memory in the process between training steps (glibc's ``malloc`` on Linux).

A CPU training step allocates and frees the same activation buffers every step (tens of MB at
32 px, batch 256). glibc returns the top of its heap to the kernel once more than
``M_TRIM_THRESHOLD`` is free there, and serves blocks above ``M_MMAP_THRESHOLD`` with ``mmap``,
unmapped again on free; both thresholds start at 128 KiB and move with the program (``mallopt(3)``).
Each returned page is faulted in and zeroed again on the next step: measured here at batch 128,
resnet18, 32 px, about 62,000 minor page faults per step (about 240 MiB) and 5–10% more CPU time
per step than with the memory kept (``python -m model.host_memory`` prints the two counts). Fixing
both thresholds keeps the step's buffers in the heap after the first step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
TRIM_THRESHOLD = 1 << 30
"""Free memory kept at the heap's top before any is returned: 1 GiB."""
MMAP_THRESHOLD = 32 << 20
"""Blocks at least this large get their own mapping: 32 MiB, glibc's largest (``DEFAULT_MMAP_THRESHOLD_MAX``
on 64-bit), so a step's activations up to that size come from the heap."""


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds for this process (see the module's docstring).

    Returns:
        True when they were set; False elsewhere (not Linux, not glibc, ``mallopt`` refused).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def step_faults(steps: int = 5, buffers: int = 12, mb: int = 16) -> int:
    """Minor page faults of the last of ``steps`` rounds that allocate and fill ``buffers`` float32
    tensors of ``mb`` MiB, then free them all (a training step's pattern without the model)."""
    import resource

    import torch

    faults = 0
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        held = [torch.ones(mb << 18) for _ in range(buffers)]
        del held
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults


if __name__ == "__main__":
    print(f"minor page faults per step, glibc defaults: {step_faults()}")
    print(f"kept: {keep_freed_memory()}; minor page faults per step after: {step_faults()}")
