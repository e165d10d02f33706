"""The SimSiam augmentation, as parameters every loader reads.

Source: SimSiam paper (Chen & He, CVPR 2021) §4 / appendix A and the official repository's
``main_simsiam.py``, which reuses MoCo v2's set (Chen et al., 2020, "Improved Baselines with
Momentum Contrastive Learning"):

    RandomResizedCrop(size, scale=(0.2, 1.0))            # ratio (3/4, 4/3): torchvision default
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    RandomGrayscale(p=0.2)
    RandomApply([GaussianBlur(sigma in [0.1, 2.0])], p=0.5)
    RandomHorizontalFlip()                               # p = 0.5
    ToTensor(); Normalize(ImageNet mean, std)

Each view draws its own parameters. The paper's CIFAR setting (appendix) drops the blur; so
does our small-image default (``blur_p=0`` whenever ``size <= 64``, see :func:`recipe`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# ImageNet statistics used by torchvision's pretrained models and the official repo.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of one SimSiam view; every backend (torch, DALI, FFCV) reads these.

    Attributes:
        size: output side in pixels (views are ``size x size``).
        crop_scale: RandomResizedCrop area fraction range, (0.2, 1.0) in the paper.
        crop_ratio: RandomResizedCrop aspect-ratio range (w/h), (3/4, 4/3).
        jitter_p: probability of applying colour jitter (0.8).
        brightness, contrast, saturation: jitter strengths (0.4 each): factors drawn
            uniformly from ``[1 - s, 1 + s]``.
        hue: jitter hue strength (0.1): shift drawn from ``[-0.1, 0.1]`` of a full turn
            (DALI's ``fn.color_twist`` wants degrees: ``0.1 * 360 = 36``).
        grayscale_p: probability of converting to grey (0.2).
        blur_p: probability of a Gaussian blur (0.5; 0 in the CIFAR / small-image setting).
        blur_sigma: blur sigma range in pixels, (0.1, 2.0).
        flip_p: horizontal flip probability (0.5).
        mean, std: per-channel normalisation on [0, 1] pixels (ImageNet statistics).
    """

    size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"image size must be >= 1 pixel, got {self.size}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        for name in ("jitter_p", "grayscale_p", "blur_p", "flip_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")

    @property
    def blur_kernel(self) -> int:
        """Odd Gaussian kernel side in pixels: about 10% of the view, as in SimCLR/BYOL
        (23 px at 224 px), never below 3."""
        return max(3, int(0.1 * self.size) | 1)

    def replace(self, **changes) -> "AugmentConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def recipe(size: int = 224, min_crop_scale: float = 0.2) -> AugmentConfig:
    """The SimSiam recipe for views of ``size`` pixels.

    Views of 64 px or less follow the paper's CIFAR appendix: no Gaussian blur.
    """
    return AugmentConfig(size=size, crop_scale=(min_crop_scale, 1.0), blur_p=0.0 if size <= 64 else 0.5)
