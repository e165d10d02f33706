"""Count host reads of tensor values: each one makes the CPU wait for the GPU to drain.

``with count_host_reads() as counts: ...`` patches ``Tensor.item``, ``tolist``, ``nonzero``,
``__bool__`` and ``cpu`` (plus ``torch.nonzero``) for the duration of the block and counts calls
per name in ``counts`` (a ``collections.Counter``). Used by the tests that require zero host reads
in the steady state of the training step and the on-device colour stage.
"""
from __future__ import annotations

import collections
import contextlib

import torch

METHODS = ("item", "tolist", "nonzero", "__bool__", "cpu")


@contextlib.contextmanager
def count_host_reads():
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in METHODS}
    original_nonzero = torch.nonzero

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counting(name, fn))
    torch.nonzero = counting("nonzero", original_nonzero)
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = original_nonzero
