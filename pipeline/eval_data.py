"""Un-augmented single views for the kNN monitor and linear probe.

Images are decoded as every loader decodes them (:func:`pipeline.imagefolder.load_rgb`: upright by
their EXIF orientation, 8-bit RGB), resized (shorter side) and centre-cropped to the view size,
decoded once with a DataLoader and kept in memory as uint8 ``(N, 3, S, S)``; each evaluation only
normalises batches.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .augment import AugmentConfig
from .device import to_training_layout
from .imagefolder import ImageList, load_rgb
from .workers import ignore_stop_signals, stop_signals_deferred


class _Plain(Dataset):
    def __init__(self, samples, size):
        self.samples = samples
        self.t = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.t(load_rgb(path)), label


class EvalImages:
    """A fixed set of labelled images, decoded once.

    Args:
        images: the split to draw from.
        aug: gives the view size and the normalisation mean/std.
        limit: keep at most this many images, a class-stratified-by-chance subset drawn with
            ``seed`` (None: all).
        workers: DataLoader workers for the one decode pass.

    Attributes:
        images: ``(N, 3, S, S)`` uint8; ``labels``: ``(N,)`` int64.
    """

    def __init__(self, images: ImageList, aug: AugmentConfig, limit: int | None = None, seed: int = 0,
                 workers: int = 2):
        samples = images.subset(limit, seed).samples
        loader = DataLoader(_Plain(samples, aug.size), batch_size=256, num_workers=workers,
                            worker_init_fn=ignore_stop_signals)  # a stop signal is the caller's (pipeline.workers)
        with stop_signals_deferred():
            batches = iter(loader)
        xs, ys = zip(*[(x, y) for x, y in batches])
        self.images, self.labels = torch.cat(xs), torch.cat(ys)
        self.mean = torch.tensor(aug.mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(aug.std).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, device: torch.device, channels_last: bool = False):
        """Yield ``(images (B,3,S,S) float32 normalised on device, labels (B,) int64)`` in order."""
        for i in range(0, len(self), batch_size):
            x = (self.images[i:i + batch_size].float() - self.mean) / self.std
            yield to_training_layout(x, device, channels_last), self.labels[i:i + batch_size]
