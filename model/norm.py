"""SyncBatchNorm conversion: NVIDIA apex's when it imports, torch's own otherwise.

torch's ``nn.SyncBatchNorm`` needs an initialised process group and CUDA tensors in training
(torch docs: "SyncBatchNorm ... only supports GPU"); on the CPU (gloo), or in a single process,
there is nothing it can synchronise, so the model keeps plain BatchNorm and the caller is warned.
Under DDP on the CPU each rank then normalises with its own batch's statistics (rank 0's running
statistics are broadcast at each forward by DDP).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn


def nvidia_apex_syncbn():
    """NVIDIA apex's ``convert_syncbn_model`` if NVIDIA apex is importable, else None.

    The PyPI package named ``apex`` is an unrelated project: only a module providing
    ``apex.parallel.convert_syncbn_model`` counts.
    """
    try:
        from apex.parallel import convert_syncbn_model  # type: ignore
    except Exception:
        return None
    return convert_syncbn_model


def convert_sync_bn(model: nn.Module, device: torch.device, warn: bool = True) -> tuple[nn.Module, str]:
    """Convert every BatchNorm of ``model`` to a synchronised one when that can work.

    Args:
        warn: say why plain BN is kept (pass ``ctx.is_main`` so only rank 0 warns).

    Returns:
        ``(model, kind)`` with ``kind`` one of ``"apex"``, ``"torch"`` or ``"none"`` (plain BN kept:
        no process group, or a CPU device).
    """
    reason = None
    if device.type != "cuda":
        reason = "--sync-bn: SyncBatchNorm needs CUDA tensors; keeping plain BatchNorm on the CPU"
    elif not (dist.is_available() and dist.is_initialized()):
        reason = ("--sync-bn: no torch.distributed process group is initialised; keeping plain BatchNorm "
                  "(launch with torchrun to synchronise BN across ranks)")
    if reason is not None:
        if warn:
            warnings.warn(reason, stacklevel=2)
        return model, "none"
    apex_convert = nvidia_apex_syncbn()
    if apex_convert is not None:
        return apex_convert(model), "apex"
    return nn.SyncBatchNorm.convert_sync_batchnorm(model), "torch"
