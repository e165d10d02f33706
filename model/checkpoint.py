"""Checkpoints: atomic writes, safe loads, and the backbone exported alone.

Writes go to a temporary file in the same folder, are flushed to disk, and are renamed over the
target (``os.replace`` is atomic on POSIX), so an interrupted save never leaves a half file.
Loads use ``torch.load(weights_only=True)`` (torch docs: only tensors and plain containers are
unpickled), so a checkpoint can hold tensors, numbers, strings, lists, tuples and dicts only.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or not one this trainer wrote."""


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ("model", "optimizer", "epoch")) -> dict:
    """Load a training checkpoint on the CPU with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, damaged/truncated, or lacks ``required`` keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, pickled code...
        # torch's own message can run to many lines and suggest weights_only=False (unsafe): keep its first line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        if first.startswith("Weights only load failed"):
            first = "it holds objects other than tensors and plain containers"
        raise CheckpointError(f"checkpoint {path} is damaged or not a trainer checkpoint "
                              f"({type(exc).__name__}{': ' + first if first else ''})") from exc
    if not isinstance(state, dict) or any(k not in state for k in required):
        missing = [k for k in required if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not written by this trainer")
    return state
