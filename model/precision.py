"""Mixed precision in one place: autocast dtype, and the GradScaler that also skips non-finite steps.

``off``: float32. ``bf16``: ``torch.autocast(dtype=torch.bfloat16)`` on CPU or CUDA (bf16 has
float32's exponent range, so no loss scaling is needed). ``fp16``: CUDA only, dynamic loss scaling
(torch AMP docs, "Typical Mixed Precision Training"); refused on the CPU with a clear message.

Every mode steps through a ``torch.amp.GradScaler``: for ``off``/``bf16`` its scale stays 1
(:meth:`Precision.update` pins it), so it only does what matters here — it finds non-finite
gradients and skips that optimiser step. With an optimiser that supports it (``SGD(fused=True)``:
``_step_supports_amp_scaling``) the check and the skip happen inside the fused kernel, without
reading anything back to the host (torch ``GradScaler.step``), so a NaN step costs no device sync.
NVIDIA apex's ``amp`` is deprecated in favour of ``torch.amp`` (apex README) and is not used.
"""
from __future__ import annotations

import contextlib

import torch

AMP_MODES = ("off", "bf16", "fp16")

# Largest int32: the scale never grows when it is pinned at 1 (GradScaler wants growth_factor > 1).
_NEVER = 2**31 - 1


class Precision:
    """Autocast and gradient scaling for one training device.

    Args:
        mode: ``off``, ``bf16`` or ``fp16``.
        device: the training device.

    Attributes:
        scaler: the ``torch.amp.GradScaler`` every step goes through (initial scale 65536 and
            torch's dynamic rule for fp16; 1, pinned, otherwise).

    Raises:
        ValueError: unknown mode, or ``fp16`` on a device that is not CUDA.
    """

    def __init__(self, mode: str, device: torch.device):
        if mode not in AMP_MODES:
            raise ValueError(f"unknown --amp mode {mode!r}; choose one of {', '.join(AMP_MODES)}")
        device = torch.device(device)
        if mode == "fp16" and device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA GPU (float16 loss scaling is a GPU feature here); "
                             "use --amp bf16 or --amp off on the CPU")
        self.mode, self.device = mode, device
        self.dtype = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        dynamic = mode == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 if dynamic else 1.0,
                                           growth_interval=2000 if dynamic else _NEVER)

    def autocast(self):
        """Context manager: autocast to ``self.dtype`` (a no-op when mode is ``off``)."""
        if self.mode == "off":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def update(self) -> None:
        """After ``scaler.step``: fp16 adapts the scale (torch's rule); other modes keep it at 1,
        so a skipped non-finite step never shrinks later gradients. No host read either way."""
        if self.mode == "fp16":
            self.scaler.update()
        else:
            self.scaler.update(1.0)

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
