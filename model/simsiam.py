"""The SimSiam network: encoder (backbone + projector) and predictor.

Source: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021, §4 and the
official ``simsiam/builder.py``. Projector: 3 fc layers, BN on each (the output BN without affine
parameters), ReLU on the hidden two, hidden and output width ``dim`` = 2048; its last Linear's bias
is frozen, since the affine-free BN after it cancels it (official code). Predictor: bottleneck
``dim → pred_dim (512) → dim`` with BN + ReLU in the hidden layer and nothing on the output
(paper §4.4: "no BN on its output"). Paper appendix (CIFAR): a 2-layer projector.

Ablations (paper Tab. 1, Fig. 2): ``predictor='identity'`` (removed) fails; ``predictor='fixed'``
(random init, frozen) fails; the stop-gradient ablation lives in :mod:`model.loss`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .backbones import build_backbone

PREDICTORS = ("learned", "identity", "fixed")


class SimSiamOutput(NamedTuple):
    """Predictions ``p`` and projections ``z`` of both views, each ``(B, dim)``, in the autocast dtype.

    ``z`` is *not* detached here: :class:`model.loss.SimSiamLoss` applies the stop-gradient, so the
    stop-gradient ablation is one flag of the loss.
    """

    p1: torch.Tensor
    p2: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor


def projector(in_dim: int, dim: int = 2048, layers: int = 3) -> nn.Sequential:
    """Projection MLP ``(B, in_dim) → (B, dim)``: ``layers`` × (Linear-BN[-ReLU]), last BN affine-free.

    Raises:
        ValueError: ``layers`` not 2 or 3.
    """
    if layers not in (2, 3):
        raise ValueError(f"projector layers must be 2 or 3, got {layers}")
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
        d = dim
    last = nn.Linear(d, dim)
    last.bias.requires_grad = False  # cancelled by the affine-free BN below (official builder.py)
    mods += [last, nn.BatchNorm1d(dim, affine=False)]
    return nn.Sequential(*mods)


def predictor(dim: int = 2048, pred_dim: int = 512) -> nn.Sequential:
    """Bottleneck predictor MLP ``(B, dim) → (B, pred_dim) → (B, dim)``, no BN on the output."""
    return nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
        nn.Linear(pred_dim, dim),
    )


class SimSiam(nn.Module):
    """SimSiam: ``encoder = projector ∘ backbone`` shared by both views, and a ``predictor``.

    Args:
        arch: torchvision ResNet name (``resnet18``, ``resnet34``, ``resnet50``).
        dim: projector width (hidden and output), 2048 in the paper.
        pred_dim: predictor bottleneck width, 512 in the paper.
        small_image: 3×3 stem without max-pool, for inputs of 64 px or less.
        proj_layers: 3 (ImageNet setting) or 2 (paper's CIFAR appendix).
        predictor_mode: ``learned`` (default), ``identity`` (no predictor) or ``fixed`` (random,
            frozen): paper Tab. 1.

    Raises:
        ValueError: unknown ``arch`` or ``predictor_mode``.
    """

    def __init__(self, arch: str = "resnet50", dim: int = 2048, pred_dim: int = 512,
                 small_image: bool = False, proj_layers: int = 3, predictor_mode: str = "learned"):
        super().__init__()
        if predictor_mode not in PREDICTORS:
            raise ValueError(f"unknown predictor mode {predictor_mode!r}; choose one of {', '.join(PREDICTORS)}")
        self.backbone, self.feat_dim = build_backbone(arch, small_image)
        self.projector = projector(self.feat_dim, dim, proj_layers)
        self.predictor_mode = predictor_mode
        if predictor_mode == "identity":
            self.predictor: nn.Module = nn.Identity()
        else:
            self.predictor = predictor(dim, pred_dim)
            if predictor_mode == "fixed":
                self.predictor.requires_grad_(False)
        self.dim = dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images → ``(B, dim)`` projections ``z``."""
        return self.projector(self.backbone(x))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> SimSiamOutput:
        """Both views ``(B, 3, H, W)`` → :class:`SimSiamOutput`. Each view is its own forward pass,
        so BN statistics are per view, as in the official code."""
        z1, z2 = self.encode(x1), self.encode(x2)
        return SimSiamOutput(self.predictor(z1), self.predictor(z2), z1, z2)

    def param_groups(self, fix_pred_lr: bool) -> list[dict]:
        """SGD parameter groups: encoder (backbone + projector), then predictor.

        With ``fix_pred_lr`` the predictor group is tagged ``fix_lr=True`` so the schedule keeps its
        lr constant (paper §4.2, Tab. 1c / official ``--fix-pred-lr``). Frozen parameters are left out.
        """
        enc = [p for m in (self.backbone, self.projector) for p in m.parameters() if p.requires_grad]
        pred = [p for p in self.predictor.parameters() if p.requires_grad]
        groups = [{"params": enc, "fix_lr": False, "name": "encoder"}]
        if pred:
            groups.append({"params": pred, "fix_lr": fix_pred_lr, "name": "predictor"})
        return groups
