"""What every backend shares: its source, augmentation and :class:`~pipeline.feed.Feed`, the epoch
and resume position, and the one check that a backend can read the source it was given."""
from __future__ import annotations

from ..augment import AugmentConfig
from ..feed import Feed
from ..sampling import check_start
from ..sources.imagefolder import ImageList


class Backend:
    """Base of the backends: ``set_epoch(epoch, start)``, ``len()``, and the feed's settings as
    attributes (``batch_size``, ``device``, ``channels_last``, ``dtype``, ``seed``, ``rank``,
    ``world_size``). A subclass sets ``self._len`` (batches per epoch on this rank) and
    ``self.num_samples`` (images this rank reads per epoch) in its constructor.
    """

    name = "backend"

    def __init__(self, source, aug: AugmentConfig, feed: Feed):
        self.source, self.aug, self.feed = source, aug, feed
        self.device, self.channels_last, self.dtype = feed.device, feed.channels_last, feed.dtype
        self.batch_size, self.seed = feed.batch_size, feed.seed
        self.rank, self.world_size = feed.rank, feed.world_size
        self.epoch, self.start = 0, 0
        self._len = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch ``epoch``'s order and augmentation draws (a function of the seed) and skip
        its first ``start`` batches: iteration then yields batches ``start..len(self)-1`` of that
        epoch, the batches an uninterrupted epoch yields from there (a mid-epoch resume).

        Raises:
            ValueError: ``start`` outside ``0..len(self)``.
        """
        self.epoch, self.start = epoch, check_start(start, self._len)

    def __len__(self) -> int:
        return self._len


def image_list(source, loader: str) -> ImageList:
    """``source`` when it is an ImageFolder split (:class:`ImageList`).

    Raises:
        ValueError: it is another kind of source (tar shards, a ``.beton``), which this backend
            does not read (one line naming the backends that do).
    """
    if isinstance(source, ImageList):
        return source
    kind = getattr(source, "kind", type(source).__name__)
    readers = {"shards": "--loader torch, dali or torchvision-gpu", "beton": "--loader ffcv"}.get(kind, "another loader")
    raise ValueError(f"--loader {loader} reads an ImageFolder split, not {kind} ({source}); use {readers}")
