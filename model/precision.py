"""Mixed precision in one place: autocast dtype and the fp16 GradScaler.

``off``: float32. ``bf16``: ``torch.autocast(dtype=torch.bfloat16)`` on CPU or CUDA, no scaler
(bf16 has float32's exponent range). ``fp16``: CUDA only, with ``torch.amp.GradScaler('cuda')``
(torch AMP docs, "Typical Mixed Precision Training"); refused on the CPU with a clear message.
NVIDIA apex's ``amp`` is deprecated in favour of ``torch.amp`` (apex README) and is not used.
"""
from __future__ import annotations

import contextlib

import torch

AMP_MODES = ("off", "bf16", "fp16")


class Precision:
    """Autocast and loss scaling for one training device.

    Args:
        mode: ``off``, ``bf16`` or ``fp16``.
        device: the training device.

    Raises:
        ValueError: unknown mode, or ``fp16`` on a device that is not CUDA.
    """

    def __init__(self, mode: str, device: torch.device):
        if mode not in AMP_MODES:
            raise ValueError(f"unknown --amp mode {mode!r}; choose one of {', '.join(AMP_MODES)}")
        if mode == "fp16" and device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA GPU (float16 loss scaling is a GPU feature here); "
                             "use --amp bf16 or --amp off on the CPU")
        self.mode, self.device = mode, device
        self.dtype = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        self.scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None

    def autocast(self):
        """Context manager: autocast to ``self.dtype`` (a no-op when mode is ``off``)."""
        if self.mode == "off":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
