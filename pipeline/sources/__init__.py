"""Sources: what the samples are and how an epoch is ordered and split across ranks.

- :mod:`~pipeline.sources.imagefolder`: an ImageFolder split, scanned once (:class:`ImageList`);
  every epoch's order is :func:`pipeline.sampling.shard_order`'s.
- :mod:`~pipeline.sources.shards`: WebDataset tar shards (:class:`ShardSource`), named by the
  writer's index or a brace pattern, local or through ``pipe:``; read with
  :mod:`~pipeline.sources.tar_samples`.
- a ``.beton`` path: FFCV's own format (only ``--loader ffcv`` reads it).

:func:`open_source` opens one split; :func:`open_splits` the train and val splits that ``--data``
names.
"""
from __future__ import annotations

import os
from pathlib import Path

from .imagefolder import ImageList, scan_image_folder
from .shards import ShardSource, is_shard_spec, open_shards, val_index_beside


def open_source(data: str | os.PathLike, split: str = "train", on_bad: str = "skip", num_samples: int | None = None,
                url_template: str | None = None):
    """The source ``data`` names: shards (an index, a folder of indexes — its ``<split>.json`` —, a
    pattern, see :func:`~pipeline.sources.shards.open_shards`) → :class:`ShardSource`; a ``.beton``
    → the path (FFCV's format); else an ImageFolder split folder → its :class:`ImageList`, scanned
    with the bad-file policy ``on_bad``.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: from the opener (each names the path).
    """
    if str(data).endswith(".beton"):
        return Path(data)
    if is_shard_spec(data):
        return open_shards(data, split, num_samples, url_template)
    return scan_image_folder(data, on_bad=on_bad)


def open_splits(data: str | os.PathLike, on_bad: str = "skip", num_samples: int | None = None,
                url_template: str | None = None, val_data: str | os.PathLike | None = None):
    """``(train, val or None)`` for ``--data``: an ImageFolder root (``train/``, ``val/``), or shards
    (the writer's folder → ``train.json`` and ``val.json``; an index → it, and ``val.json`` beside a
    ``train.json``; a pattern → train only). ``val_data`` names the val split explicitly (any form).

    Raises:
        FileNotFoundError: ``data`` or its ``train`` split is missing (naming the layout expected).
        ValueError: from the openers; train and val with different classes.
    """
    if is_shard_spec(data):
        train = open_shards(data, "train", num_samples, url_template)
        beside = val_index_beside(data)
        val = open_shards(beside, "val", None, url_template) if beside is not None and val_data is None else None
    else:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist")
        if not (root / "train").is_dir():
            raise FileNotFoundError(f"data folder {root} has no train/ folder: expected {root}/train/<class>/<images> "
                                    f"(and optionally {root}/val/), or the shards of python -m pipeline.shards write")
        train = scan_image_folder(root / "train", on_bad=on_bad)
        val = scan_image_folder(root / "val", on_bad=on_bad) if (root / "val").is_dir() and val_data is None else None
    if val_data is not None:
        val = open_source(val_data, "val", on_bad, None, url_template)
        if isinstance(val, Path):
            raise ValueError(f"--val-data {val_data} is a .beton; give an ImageFolder split or shards")
    tc, vc = getattr(train, "classes", None), getattr(val, "classes", None)
    if tc is not None and vc is not None and tc != vc:
        raise ValueError(f"the train split of {data} and its val split have different classes "
                         f"({len(tc)} vs {len(vc)}): labels would not match")
    return train, val


__all__ = ["ImageList", "ShardSource", "open_source", "open_splits", "scan_image_folder"]
