"""The baseline loader: ImageFolder files + torchvision.transforms.v2 + DataLoader.

Two views per image with the official SimSiam augmentation (``pipeline.augment``), applied in
DataLoader workers. Augmentation randomness is a pure function of ``(seed, epoch, image index)``:
each sample's two views are drawn under ``torch.random.fork_rng`` seeded from that triple, so
the result does not depend on the number of workers, on persistent workers, or on resuming, also
mid-epoch (``set_epoch(epoch, start)``). Images are decoded with PIL, upright by their EXIF
orientation as DALI decodes them (:func:`pipeline.sources.imagefolder.load_rgb`).
"""
from __future__ import annotations


import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from ...augment import AugmentConfig
from ...batch import TwoViewBatch
from ...device import to_training_layout
from ...feed import Feed
from ...sampling import check_batch_size, epoch_seed
from ...sources.imagefolder import ImageList, load_rgb
from ...workers import ignore_stop_signals, stop_signals_deferred
from ..base import Backend, image_list


def view_transform(aug: AugmentConfig) -> v2.Compose:
    """One view of the SimSiam recipe as torchvision v2 ops on a PIL image → ``(3, S, S)`` float32.

    Order and constants as the official ``main_simsiam.py`` (see :mod:`pipeline.augment`); the
    blur uses torchvision's ``GaussianBlur`` with ``aug.blur_kernel`` taps and σ ~ U(blur_sigma).
    """
    ops: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(aug.size, scale=aug.crop_scale, ratio=aug.crop_ratio, antialias=True),
        v2.RandomApply([v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)], p=aug.jitter_p),
        v2.RandomGrayscale(p=aug.grayscale_p),
    ]
    if aug.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(aug.blur_kernel, sigma=aug.blur_sigma)], p=aug.blur_p))
    ops += [
        v2.RandomHorizontalFlip(p=aug.flip_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(aug.mean), std=list(aug.std)),
    ]
    return v2.Compose(ops)


class TwoViewDataset(Dataset):
    """Indexed by ``(image index, epoch)``; returns ``(view1, view2, label)``, views ``(3, S, S)`` float32.

    Raises:
        ValueError: the image no longer decodes (it changed after the scan); the message names it.
    """

    def __init__(self, images: ImageList, aug: AugmentConfig, seed: int):
        self.samples, self.seed = images.samples, seed
        self.transform = view_transform(aug)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        path, label = self.samples[index]
        try:
            img = load_rgb(path)
        except Exception as exc:  # PIL raises many types; the scan found this file decodable
            raise ValueError(f"{path} no longer decodes ({type(exc).__name__}: {exc}); it changed after "
                             f"the scan: remove or restore it (the next run's scan skips it)") from exc
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(self.seed, epoch, index))
            return self.transform(img), self.transform(img), label


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` in this rank's order for the current epoch (the source's
    :meth:`~pipeline.sources.imagefolder.ImageList.epoch_indices`), from position ``skip`` of that
    order on (a mid-epoch resume skips whole batches).
    """

    def __init__(self, images: ImageList, seed: int, rank: int, world_size: int):
        self.images, self.seed, self.rank, self.world_size = images, seed, rank, world_size
        self.shard = len(images) // world_size
        self.epoch, self.skip = 0, 0

    def __iter__(self):
        order = self.images.epoch_indices(self.seed, self.epoch, self.rank, self.world_size)
        return iter([(i, self.epoch) for i in order[self.skip:]])

    def __len__(self) -> int:
        return self.shard - self.skip


class TorchLoader(Backend):
    """Two-view batches from an ImageFolder split through torchvision + ``DataLoader``.

    Args:
        source: an ImageFolder split (:class:`ImageList`).
        aug: augmentation parameters.
        feed: batch size per rank, device (pinned memory when it is CUDA), ``workers`` DataLoader
            worker processes (0 decodes in the main process), layout, dtype, seed, rank and world
            size (see :mod:`pipeline.sampling`); ``prefetch`` batches per worker (default 2).

    Raises:
        ValueError: batch size larger than this rank's shard; a source that is not a split.
    """

    name = "torch"

    def __init__(self, source, aug: AugmentConfig, feed: Feed):
        super().__init__(image_list(source, self.name), aug, feed)
        self.images = self.source
        self.sampler = EpochSampler(self.images, feed.seed, feed.rank, feed.world_size)
        self.num_samples = self.sampler.shard
        self._len = check_batch_size(feed.batch_size, self.num_samples, f"shard {feed.rank} of {self.images.root}")
        workers = feed.workers
        self.loader = DataLoader(
            TwoViewDataset(self.images, aug, feed.seed), batch_size=feed.batch_size, sampler=self.sampler,
            num_workers=workers, pin_memory=self.device.type == "cuda", drop_last=True,
            persistent_workers=workers > 0, prefetch_factor=feed.prefetch_or(2) if workers > 0 else None,
            worker_init_fn=ignore_stop_signals,  # a stop signal is the training process's (pipeline.workers)
        )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch ``epoch``'s order and augmentation draws (deterministic from the seed) and
        skip its first ``start`` batches: iteration then yields batches ``start..len(self)-1`` of
        that epoch, the same images with the same augmentations as an uninterrupted epoch.

        Raises:
            ValueError: ``start`` outside ``0..len(self)``.
        """
        super().set_epoch(epoch, start)
        self.sampler.epoch, self.sampler.skip = epoch, self.start * self.batch_size

    def __iter__(self):
        with stop_signals_deferred():  # the workers start here (first epoch): see pipeline.workers
            batches = iter(self.loader)
        for v1, v2_, label in batches:
            yield TwoViewBatch(to_training_layout(v1, self.device, self.channels_last, self.dtype),
                               to_training_layout(v2_, self.device, self.channels_last, self.dtype),
                               label.to(self.device, non_blocking=True))
