"""Checkpoints: verified atomic writes that keep the previous one, safe loads, newest-valid lookup.

A training checkpoint is written to a temporary file in the run folder, flushed to disk, read back
and checked (:func:`load_checkpoint`), and only then put in place: the current ``checkpoint.pth``
becomes ``checkpoint.prev.pth`` and the new file is renamed to ``checkpoint.pth`` (``os.replace``
is atomic on POSIX). A crash, a full disk or a failed check at any point leaves the last good
checkpoint readable. Loads use ``torch.load(weights_only=True)`` (torch docs: only tensors and plain
containers are unpickled), so a checkpoint holds tensors, numbers, strings, lists, tuples and dicts.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from pipeline.writes import atomic_write, fsync_dir, remove_quietly, temporary_path, torch_save, write_failed

CHECKPOINT = "checkpoint.pth"
PREVIOUS = "checkpoint.prev.pth"
REQUIRED = ("model", "optimizer", "epoch")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, not one this trainer wrote, or could not be written."""


def _write_synced(obj, tmp: Path) -> int:
    """``torch.save(obj)`` into ``tmp``, flushed to disk; returns the bytes written.

    Raises:
        OSError: a write failed (the real one, not torch's zip-writer ``RuntimeError``).
    """
    with open(tmp, "wb") as f:
        torch_save(obj, f)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def save_atomic(obj, path: str | os.PathLike, what: str = "") -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file and an atomic rename.

    Args:
        what: what the file is (``"backbone"``), for the error message.

    Raises:
        pipeline.writes.WriteFailed: (an ``OSError``) the write failed (disk full, read-only
            folder, I/O error); one line names the file and the cause, ``path`` is untouched and
            no temporary file is left.
    """
    return atomic_write(path, lambda f: torch_save(obj, f), what)


def save_checkpoint(state: dict, folder: str | os.PathLike) -> Path:
    """Write ``state`` as ``folder/checkpoint.pth``, verified, keeping the previous one as
    ``checkpoint.prev.pth``.

    Order: temporary file → fsync → read back → ``checkpoint.pth`` renamed to
    ``checkpoint.prev.pth`` → temporary file renamed to ``checkpoint.pth``. A kill at any moment
    leaves at least one of the two names holding a complete, verified checkpoint
    (:func:`load_latest` takes the newer that loads); temporary files a killed writer left are
    removed by the next save.

    Returns:
        the path written.

    Raises:
        CheckpointError: the write or the read-back check failed (disk full, read-only folder, ...);
            one line names the file and the cause (with the free space on a full disk) and the
            previous checkpoint, which is untouched; no temporary file is left.
    """
    folder = Path(folder)
    path, prev = folder / CHECKPOINT, folder / PREVIOUS
    tmp = temporary_path(path)
    for stale in folder.glob(f".{CHECKPOINT}.tmp*"):  # left by a process killed while writing
        remove_quietly(stale)
    written = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = _write_synced(state, tmp)
        load_checkpoint(tmp)  # read back: a checkpoint that cannot be resumed never replaces a good one
        if path.exists():
            os.replace(path, prev)
        os.replace(tmp, path)
    except (OSError, CheckpointError) as exc:
        if written is None and tmp.exists():
            written = tmp.stat().st_size
        remove_quietly(tmp)
        kept = path if path.exists() else prev if prev.exists() else None
        failure = write_failed(path, exc, "checkpoint", written=written)
        raise CheckpointError(str(failure) + (f"; the previous checkpoint {kept} is intact" if kept
                                               else "; no earlier checkpoint exists")) from exc
    finally:
        remove_quietly(tmp)
    fsync_dir(folder)
    return path


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = REQUIRED) -> dict:
    """Load a training checkpoint on the CPU with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, a directory (the message names the ``checkpoint.pth``
            in it, if any), damaged/truncated, or lacks ``required`` keys.
    """
    path = Path(path)
    if path.is_dir():
        inside = path / CHECKPOINT
        hint = f"; it holds {inside}: give that file" if inside.is_file() else f" and holds no {CHECKPOINT}"
        raise CheckpointError(f"checkpoint {path} is a directory, not a file{hint}")
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


def load_latest(folder: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``folder`` that loads: ``checkpoint.pth``, else ``checkpoint.prev.pth``
    (with a warning naming the damaged one). None when the folder holds neither (a fresh start).

    Raises:
        CheckpointError: checkpoints exist but none of them loads.
    """
    folder = Path(folder)
    candidates = [p for p in (folder / CHECKPOINT, folder / PREVIOUS) if p.exists()]
    errors = []
    for p in candidates:
        try:
            state = load_checkpoint(p)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {p} instead", stacklevel=2)
        return p, state
    if errors:
        raise CheckpointError("; ".join(errors))
    return None
