"""Reading a loader's delivered views back: which file a view shows, and its crop geometry.

- With a "still" recipe (whole image, square aspect, no colour, no flip) a view of a square image
  is the image resized, so the nearest reference names the file: order, labels and shards are
  checked through the pixels a loader delivered, not through its bookkeeping.
- A coordinate probe (red = column ramp, green = row ramp, blue 0) lets a view's crop width,
  height and flip be read from the slopes of its colour ramps; grey views have R = G = B.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline import recipe

STILL = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0)


def still(size: int):
    """The recipe with every random op off: a view is the (central square of the) image resized."""
    return recipe(size).replace(**STILL)


def pixels(view: torch.Tensor, aug) -> torch.Tensor:
    """Normalised views ``(..., 3, H, W)`` → float pixels in [0, 255]."""
    mean = torch.tensor(aug.mean).view(3, 1, 1)
    std = torch.tensor(aug.std).view(3, 1, 1)
    return (view.float().cpu() * std + mean) * 255


def nearest(views: torch.Tensor, refs: torch.Tensor, aug) -> list[int]:
    """Index of the nearest of ``refs`` ``(N, 3, S, S)`` (pixels) for each normalised view."""
    return torch.cdist(pixels(views, aug).flatten(1), refs.flatten(1)).argmin(1).tolist()


def decoded(paths: list[str]) -> torch.Tensor:
    """``(N, 3, H, W)`` float pixels of equally sized files, decoded by PIL."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"), np.float32)).permute(2, 0, 1))
    return torch.stack(out)


def coordinate_probe(path, width: int = 320, height: int = 240) -> str:
    """Save a ``width × height`` probe as a quality-100, 4:4:4 JPEG (close to lossless on ramps)."""
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = np.round(np.linspace(0, 255, width))[None, :]
    img[..., 1] = np.round(np.linspace(0, 255, height))[:, None]
    Image.fromarray(img).save(path, quality=100, subsampling=0)
    return str(path)


def crop_stats(views: torch.Tensor, aug, width: int = 320, height: int = 240) -> dict[str, np.ndarray]:
    """Per view of the probe: ``grey``; for colour views ``area`` (fraction of the probe),
    ``log_aspect`` (log w/h) and ``flip``."""
    px = pixels(views, aug)
    s = px.shape[-1]
    grey = (px.amax(1) - px.amin(1)).amax((1, 2)) < 0.5
    t = torch.arange(s, dtype=torch.float32) - (s - 1) / 2
    slope_x = (px[:, 0].mean(1) * t).sum(1) / (t * t).sum()  # red per output pixel, along x
    slope_y = (px[:, 1].mean(2) * t).sum(1) / (t * t).sum()
    w = slope_x.abs() * s * (width - 1) / 255  # probe pixels spanned by the view
    h = slope_y * s * (height - 1) / 255
    colour = ~grey
    return {"grey": grey.numpy(), "area": (w * h / (width * height))[colour].numpy(),
            "log_aspect": torch.log(w / h)[colour].numpy(), "flip": (slope_x < 0)[colour].numpy()}
