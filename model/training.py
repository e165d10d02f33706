"""The objects a SimSiam run trains, built one way for ``train.py`` and the benchmark.

Order of set-up (``shared/DESIGN.md``, torch DDP docs): model → SyncBN conversion →
``.to(device, channels_last)`` → DDP → ``torch.compile`` (torch docs: compile the DDP-wrapped module
so TorchDynamo's DDPOptimizer splits graphs at bucket boundaries) → optimiser.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .distributed import DistContext, wrap_ddp
from .norm import convert_sync_bn
from .simsiam import SimSiam


@dataclass
class Built:
    """A SimSiam ready to train.

    Attributes:
        model: the unwrapped :class:`~model.simsiam.SimSiam` on the device: what checkpoints save
            and evaluation reads (no ``module.`` / ``_orig_mod.`` key prefixes).
        step_model: what the training step calls: ``model`` wrapped in DDP (under a process group)
            and ``torch.compile`` (when asked).
        sync_bn: ``"apex"``, ``"torch"`` or ``"none"`` (see :func:`model.norm.convert_sync_bn`).
    """

    model: SimSiam
    step_model: nn.Module
    sync_bn: str


def build_simsiam(ctx: DistContext, arch: str = "resnet50", dim: int = 2048, pred_dim: int = 512,
                  small_stem: bool = False, proj_layers: int = 3, predictor: str = "learned", *,
                  sync_bn: bool = False, channels_last: bool = False, compile: bool = False) -> Built:
    """Build SimSiam on ``ctx.device`` (see :class:`~model.simsiam.SimSiam` for the model arguments).

    Args:
        ctx: this process's rank, world size and device (:func:`model.distributed.init_from_env`).
        sync_bn: convert BatchNorm to SyncBatchNorm (kept plain, with one warning on rank 0, on the
            CPU or without a process group).
        channels_last: NHWC weights and activations (cuDNN's fast path for convolutions on tensor cores).
        compile: ``torch.compile`` the (DDP-wrapped) model.

    Raises:
        ValueError: unknown ``arch`` or ``predictor``.
    """
    model = SimSiam(arch, dim, pred_dim, small_stem, proj_layers, predictor)
    kind = "none"
    if sync_bn:
        model, kind = convert_sync_bn(model, ctx.device, warn=ctx.is_main)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(ctx.device, memory_format=fmt)
    step_model = wrap_ddp(model, ctx)
    if compile:
        step_model = torch.compile(step_model)
    return Built(model, step_model, kind)


def recipe_sgd(model: SimSiam, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
               fix_pred_lr: bool = True) -> torch.optim.SGD:
    """SimSiam's SGD (paper §4, official ``main_simsiam.py``): encoder and predictor groups, the
    predictor's tagged ``fix_lr`` (paper §4.2, Tab. 1c), ``lr`` already scaled by the global batch.

    ``fused=True`` (torch SGD docs): one kernel per step, and it lets the GradScaler skip a
    non-finite step on the device, without a host read.
    """
    return torch.optim.SGD(model.param_groups(fix_pred_lr), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           fused=True)
