"""Un-augmented single views for the kNN monitor and linear probe.

Images are decoded as every loader decodes them (:func:`pipeline.sources.imagefolder.load_rgb` for
files, :func:`~pipeline.sources.imagefolder.decode_rgb` for shard samples: upright by their EXIF
orientation, 8-bit RGB), resized (shorter side) and centre-cropped to the view size, decoded once
with a DataLoader and kept in memory as uint8 ``(N, 3, S, S)``; each evaluation only normalises
batches. The source is an ImageFolder split or tar shards; a shard sample that cannot be used is
left out and counted (``bad``).
"""
from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision.transforms import v2

from .augment import AugmentConfig
from .device import to_training_layout
from .sources.imagefolder import ImageList, decode_rgb, load_rgb
from .sources.shards import ShardSource
from .sources.tar_samples import BadSample, read_piece
from .workers import ignore_stop_signals, stop_signals_deferred


def _plain(size: int) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])


class _Plain(Dataset):
    def __init__(self, samples, size):
        self.samples, self.t = samples, _plain(size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.t(load_rgb(path)), label


class _PlainShards(IterableDataset):
    """``(image (3,S,S) uint8, label)`` of every sample of a shard source, pieces dealt to workers in
    turn; an unusable sample gives a blank image with label -1 (left out by :class:`EvalImages`)."""

    def __init__(self, source: ShardSource, size: int):
        self.pieces, self.size, self.limit = source.pieces(), size, source.limit

    def __iter__(self):
        info = get_worker_info()
        me, n = (info.id, info.num_workers) if info is not None else (0, 1)
        t = _plain(self.size)
        left = self.limit  # set only for counted sources, read by one worker (see EvalImages)
        for piece in self.pieces[me::n]:
            for item in read_piece(piece):
                if left is not None:
                    if left == 0:
                        return
                    left -= 1
                if not isinstance(item, BadSample):
                    try:
                        yield t(decode_rgb(item.image)), item.label
                        continue
                    except Exception:  # PIL raises many types for bytes it cannot decode
                        pass
                yield torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1


class EvalImages:
    """A fixed set of labelled images, decoded once.

    Args:
        images: the split to draw from: an :class:`ImageList` or a :class:`ShardSource`.
        aug: gives the view size and the normalisation mean/std.
        limit: keep at most this many images (None: all): a random subset drawn with ``seed`` of a
            split, the first ``limit`` samples of shards (which the writer shuffled).
        workers: DataLoader workers for the one decode pass.

    Attributes:
        images: ``(N, 3, S, S)`` uint8; ``labels``: ``(N,)`` int64; ``bad``: shard samples left out.

    Warns:
        UserWarning: some shard samples could not be used (how many).
    """

    def __init__(self, images: ImageList | ShardSource, aug: AugmentConfig, limit: int | None = None, seed: int = 0,
                 workers: int = 2):
        part = images.subset(limit, seed)
        data = _PlainShards(part, aug.size) if isinstance(part, ShardSource) else _Plain(part.samples, aug.size)
        if isinstance(part, ShardSource):  # a limit on a counted source is one reader's count
            workers = 0 if part.limit is not None else min(workers, len(data.pieces))
        loader = DataLoader(data, batch_size=256, num_workers=workers,
                            worker_init_fn=ignore_stop_signals)  # a stop signal is the caller's (pipeline.workers)
        with stop_signals_deferred():
            batches = iter(loader)
        xs, ys = [], []
        for x, y in batches:
            xs.append(x)
            ys.append(y)
        s = aug.size
        self.images = torch.cat(xs) if xs else torch.empty(0, 3, s, s, dtype=torch.uint8)
        self.labels = torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64)
        keep = self.labels >= 0
        self.bad = int((~keep).sum())
        if self.bad:
            self.images, self.labels = self.images[keep], self.labels[keep]
            warnings.warn(f"{self.bad} sample(s) of {images} could not be used for evaluation and were left out",
                          stacklevel=2)
        self.mean = torch.tensor(aug.mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(aug.std).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, device: torch.device, channels_last: bool = False):
        """Yield ``(images (B,3,S,S) float32 normalised on device, labels (B,) int64)`` in order."""
        for i in range(0, len(self), batch_size):
            x = (self.images[i:i + batch_size].float() - self.mean) / self.std
            yield to_training_layout(x, device, channels_last), self.labels[i:i + batch_size]
