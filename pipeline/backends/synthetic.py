"""Random normalised views already on the training device: the model-only throughput ceiling."""
from __future__ import annotations

import torch

from ..batch import TwoViewBatch
from ..feed import Feed
from ..sampling import check_batch_size, epoch_seed
from .base import Backend


class SyntheticLoader(Backend):
    """Yields ``num_samples // batch_size`` batches of standard-normal views per epoch.

    A pool of ``pool`` batches is generated on ``device`` once per epoch (seeded from ``seed`` and
    the epoch) and cycled, so iteration itself costs no host work and no copy.

    Args:
        source: unused (None): the views are random.
        aug: unused (None).
        feed: batch size, device, layout, dtype, seed, rank (this rank draws its own views,
            seeded with the rank).
        num_samples: images per epoch on this rank (already this rank's share).
        size: view side in pixels.
        num_classes: labels are drawn uniformly from ``[0, num_classes)``.
        pool: batches generated per epoch and cycled.

    Raises:
        ValueError: batch size larger than ``num_samples``.
    """

    name = "synthetic"

    def __init__(self, source, aug, feed: Feed, num_samples: int = 60000, size: int = 32, num_classes: int = 10,
                 pool: int = 4):
        super().__init__(source, aug, feed)
        self._len = check_batch_size(self.batch_size, num_samples, "the synthetic data set")
        self.num_samples, self.size, self.num_classes = num_samples, size, num_classes
        self.pool = max(1, min(pool, self._len))

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
