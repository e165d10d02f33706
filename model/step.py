"""One SimSiam optimisation step, shared by ``train.py`` and ``bench/throughput.py``.

The step is labelled with ``torch.profiler.record_function`` ranges ``forward``, ``loss``,
``backward`` and ``optimizer`` so a profiler trace shows where time goes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from .loss import SimSiamLoss, z_std
from .precision import Precision


@dataclass
class StepResult:
    """What one step measured (Python floats; reading them synchronised the device once).

    Attributes:
        loss: the loss value, float32 (NaN/inf when the step was skipped).
        z_std: collapse metric of view 1's projections (see :func:`model.loss.z_std`).
        skipped: True when the loss was not finite and no update was made.
    """

    loss: float
    z_std: float
    skipped: bool


def train_step(model: torch.nn.Module, criterion: SimSiamLoss, view1: torch.Tensor, view2: torch.Tensor,
               optimizer: torch.optim.Optimizer, precision: Precision) -> StepResult:
    """Forward both views, compute the loss in float32, back-propagate and update.

    A non-finite loss skips backward and the update (the caller counts it); with fp16 the
    GradScaler additionally skips updates whose gradients overflow.

    Args:
        view1, view2: ``(B, 3, H, W)`` float batches on the model's device.
    """
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        with record_function("forward"):
            out = model(view1, view2)
        with record_function("loss"):
            loss = criterion(*out)
    stats = torch.stack([loss.detach(), z_std(out.z1)]).tolist()  # one device sync per step
    if not math.isfinite(stats[0]):
        return StepResult(stats[0], stats[1], skipped=True)
    scaler = precision.scaler
    with record_function("backward"):
        (scaler.scale(loss) if scaler is not None else loss).backward()
    with record_function("optimizer"):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return StepResult(stats[0], stats[1], skipped=False)
