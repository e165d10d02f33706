"""Random normalised views already on the training device: the model-only throughput ceiling."""
from __future__ import annotations

import torch

from .batch import TwoViewBatch
from .sampling import check_batch_size, epoch_seed


class SyntheticLoader:
    """Yields ``num_samples // batch_size`` batches of standard-normal views per epoch.

    A pool of ``pool`` batches is generated on ``device`` once per epoch (seeded from ``seed`` and
    the epoch) and cycled, so iteration itself costs no host work and no copy.

    Args:
        num_samples: images per epoch (per rank).
        batch_size: images per batch.
        size: view side in pixels.
        device: the training device.
        channels_last, dtype: memory format and dtype of the views.
        num_classes: labels are drawn uniformly from ``[0, num_classes)``.
        rank, world_size: this rank draws its own views (seeded with the rank); ``num_samples`` is
            already this rank's share.

    Raises:
        ValueError: batch size larger than ``num_samples``.
    """

    def __init__(self, num_samples: int, batch_size: int, size: int, device: torch.device | str = "cpu",
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0,
                 num_classes: int = 10, pool: int = 4, rank: int = 0, world_size: int = 1):
        self._len = check_batch_size(batch_size, num_samples, "the synthetic data set")
        self.num_samples, self.batch_size, self.size = num_samples, batch_size, size
        self.device, self.channels_last, self.dtype = torch.device(device), channels_last, dtype
        self.seed, self.num_classes, self.pool = seed, num_classes, max(1, min(pool, self._len))
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch ``epoch``; skip its first ``start`` batches (mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self._len

    def _make(self, g: torch.Generator) -> torch.Tensor:
        x = torch.randn(self.batch_size, 3, self.size, self.size, generator=g, device=self.device).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self):
        g = torch.Generator(device=self.device).manual_seed(epoch_seed(self.seed, self.epoch, self.rank))
        batches = [TwoViewBatch(self._make(g), self._make(g),
                                torch.randint(self.num_classes, (self.batch_size,), generator=g, device=self.device))
                   for _ in range(self.pool)]
        for i in range(self.start, self._len):
            yield batches[i % self.pool]
