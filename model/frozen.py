"""A frozen backbone from a training checkpoint or an exported backbone, for the evaluation commands.

Two files are accepted (both written by ``train.py`` after every epoch):

* ``checkpoint.pth``: a dict with ``model`` (``SimSiam.state_dict()``: ``backbone.*``,
  ``projector.*``, ``predictor.*``) and ``args`` (the run's options: ``arch``, ``small_stem``,
  ``image_size``, ``seed``, ...);
* ``backbone_<arch>.pth``: the backbone alone under torchvision's key names
  (:func:`model.backbones.backbone_state_dict`); any torchvision ResNet-18/34/50 state dict works.

A bare backbone records no options, so its architecture is read from the tensors themselves
(:func:`infer_arch`): the stem from ``conv1.weight``'s kernel (7×7 standard, 3×3 small), the block
type from ``layer1.0.conv3`` (present only in bottleneck ResNets), the depth from the number of
blocks in ``layer3`` (torchvision: resnet18 [2,2,2,2], resnet34 [3,4,6,3], resnet50 [3,4,6,3]
bottlenecks; He et al. 2016, Tab. 1). No side-car file is needed. The view size is not in the
tensors: it comes from the checkpoint's ``args``, or from a ``checkpoint.pth`` beside the backbone
file, else from the caller.

Freezing follows the official ``main_lincls.py``: every parameter's ``requires_grad`` is off and
the module stays in eval mode (BatchNorm uses its running statistics and never updates them);
:func:`check_unchanged` is its ``sanity_check``: every tensor of the backbone, buffers included,
equals the one in the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backbones import build_backbone
from .checkpoint import load_checkpoint

BASIC_DEPTHS = {2: "resnet18", 6: "resnet34"}  # blocks in layer3 → arch (torchvision)
BOTTLENECK_DEPTHS = {6: "resnet50"}


class BackboneChanged(AssertionError):
    """The frozen backbone's weights or BN statistics differ from the file: a bug, never a user mistake."""


@dataclass
class Pretrained:
    """A frozen backbone and what its file records.

    Attributes:
        backbone: maps ``(B, 3, H, W)`` float images to ``(B, feat_dim)`` pooled features; eval mode,
            no parameter requires grad; on the CPU until moved.
        arch, small_stem: the torchvision architecture and whether the stem is the 3×3 one.
        feat_dim: 512 (resnet18/34) or 2048 (resnet50).
        image_size: the view side the backbone was trained at, in pixels (None when no file says).
        train_args: the training run's options (empty for a bare backbone without a checkpoint beside it).
        path: the file read; ``kind``: ``"checkpoint"`` or ``"backbone"``.
        reference: the backbone's tensors as read from the file (CPU), for :func:`check_unchanged`.
    """

    backbone: nn.Module
    arch: str
    small_stem: bool
    feat_dim: int
    image_size: int | None
    train_args: dict
    path: Path
    kind: str
    reference: dict[str, torch.Tensor] = field(repr=False)


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """``(arch, small_stem)`` of a torchvision-named ResNet state dict, read from its tensor shapes.

    Raises:
        ValueError: no ``conv1.weight``, a stem that is neither 7×7 nor 3×3, or a depth other than
            ResNet-18/34/50.
    """
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4:
        raise ValueError("no conv1.weight of a ResNet in it")
    kernel = tuple(conv1.shape[-2:])
    if kernel not in ((7, 7), (3, 3)):
        raise ValueError(f"its conv1 has a {kernel[0]}x{kernel[1]} kernel; expected 7x7 (standard stem) or 3x3 (small stem)")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer3\.(\d+)\.", k))}
    bottleneck = "layer1.0.conv3.weight" in state
    arch = (BOTTLENECK_DEPTHS if bottleneck else BASIC_DEPTHS).get(len(blocks))
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic-block"
        raise ValueError(f"a {kind} ResNet with {len(blocks)} blocks in layer3 is not resnet18, resnet34 or resnet50")
    return arch, kernel == (3, 3)


def _sibling_args(path: Path) -> dict:
    """The ``args`` of the ``checkpoint.pth`` in the same folder, or {} (unreadable files are ignored)."""
    ckpt = path.parent / "checkpoint.pth"
    if not ckpt.is_file():
        return {}
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged neighbour must not stop the evaluation of a good backbone file
        return {}
    return state.get("args", {}) if isinstance(state, dict) else {}


def load_pretrained(path: str | Path) -> Pretrained:
    """Read a training checkpoint or an exported backbone and return it frozen.

    Raises:
        model.checkpoint.CheckpointError: the file is missing or damaged (one line naming it).
        ValueError: the file holds neither a SimSiam model nor a ResNet backbone, or its tensors
            do not fit the architecture they describe.
    """
    path = Path(path)
    state = load_checkpoint(path, required=())
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint or a state dict")
    if isinstance(state.get("model"), dict) and any(k.startswith("backbone.") for k in state["model"]):
        kind, args = "checkpoint", dict(state.get("args") or {})
        weights = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    elif "conv1.weight" in state:
        kind, args = "backbone", _sibling_args(path)
        weights = {k: v for k, v in state.items() if not k.startswith("fc.")}
    else:
        raise ValueError(f"{path} is neither a train.py checkpoint (no model.backbone.* weights) "
                         f"nor an exported backbone (no conv1.weight)")
    try:
        arch, small_stem = infer_arch(weights)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    for key, found in (("arch", arch), ("small_stem", small_stem)):
        if key in args and args[key] != found:
            if kind == "checkpoint":
                raise ValueError(f"{path} records --{key.replace('_', '-')} {args[key]} but its weights are {found}")
            args = {}  # the checkpoint beside a bare backbone belongs to another model: ignore it
            break
    backbone, feat_dim = build_backbone(arch, small_stem)
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{path}: its weights do not fit a {arch}: {first}") from None
    backbone.requires_grad_(False)
    backbone.eval()
    reference = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    size = args.get("image_size")
    return Pretrained(backbone, arch, small_stem, feat_dim, int(size) if size else None, args, path, kind, reference)


def check_unchanged(backbone: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """The official ``sanity_check``: every tensor of ``backbone`` (weights and BN buffers) equals
    ``reference``.

    Raises:
        BackboneChanged: naming the tensors that differ (a bug in the evaluation, never the user's).
    """
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v.detach().cpu(), reference[k])]
    if changed:
        raise BackboneChanged(f"the frozen backbone changed during linear evaluation: {', '.join(changed[:5])}"
                              + (f" and {len(changed) - 5} more" if len(changed) > 5 else ""))
