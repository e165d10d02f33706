"""Training-device choice, in one place, with one clear sentence when a GPU is asked for and absent."""
from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; ``cuda[:N]`` is checked.

    Raises:
        ValueError: a CUDA device was asked for and none is visible (a user's option, not a bug).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but no CUDA GPU is visible to torch; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def to_training_layout(x: torch.Tensor, device: torch.device, channels_last: bool,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """Move a ``(B, C, H, W)`` batch to ``device`` (non-blocking), cast, and set channels_last if asked."""
    x = x.to(device, dtype=dtype, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
