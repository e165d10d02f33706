"""torchvision ResNet backbones for SimSiam, with the small-image stem variant.

Source: torchvision ``resnet18/34/50`` (He et al., 2016). SimSiam builds them with
``zero_init_residual=True`` (official ``main_simsiam.py``). The small-image variant replaces the
7×7 stride-2 stem and its max-pool by one 3×3 stride-1 conv, as in the SimSiam paper's CIFAR
appendix (and SimCLR's CIFAR setting), for inputs of 64 px or less.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision import models

ARCHS = ("resnet18", "resnet34", "resnet50")


def build_backbone(arch: str = "resnet50", small_image: bool = False) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet whose ``fc`` is ``nn.Identity``.

    Args:
        arch: one of :data:`ARCHS`.
        small_image: use the 3×3 stride-1 stem without max-pool (inputs ≤ 64 px).

    Returns:
        ``(backbone, feat_dim)``: the module maps ``(B, 3, H, W)`` float images to ``(B, feat_dim)``
        globally pooled features (512 for resnet18/34, 2048 for resnet50).

    Raises:
        ValueError: unknown ``arch``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    net = getattr(models, arch)(weights=None, zero_init_residual=True)
    if small_image:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


def backbone_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights under torchvision's key names (``conv1.weight``, ``layer1.0...``).

    Loads into ``torchvision.models.<arch>()`` with ``strict=False`` (only ``fc.*`` missing); a
    small-stem backbone needs the same stem change first (its ``conv1`` is 3×3).
    """
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
