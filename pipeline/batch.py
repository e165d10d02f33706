"""The one batch type every loader yields (see ``../shared/DESIGN.md``)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class TwoViewBatch(NamedTuple):
    """Two independent augmentations of the same ``B`` images, plus their labels.

    Attributes:
        view1: ``(B, 3, H, W)`` float32 (or float16/bfloat16 when a loader is asked for it),
            normalised with the recipe's mean/std, on the training device; channels_last
            memory format when the loader was built with ``channels_last=True``.
        view2: same shape, dtype, device and memory format as ``view1``; drawn with its own
            random augmentation parameters.
        label: ``(B,)`` int64 class index (ImageFolder ``class_to_idx``). Only the kNN monitor
            and linear evaluation read it; SimSiam itself is label-free.
    """

    view1: torch.Tensor
    view2: torch.Tensor
    label: torch.Tensor
