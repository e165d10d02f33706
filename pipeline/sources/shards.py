"""Tar shards (WebDataset layout) as a source: what the samples are, and each epoch's split.

A shard is a tar file of samples ``<key>.jpg`` (or ``.png``) + ``<key>.cls`` (the class index as
text), read through the ``webdataset`` library (:mod:`pipeline.sources.tar_samples`): a local
path, or any URL webdataset opens (``pipe:CMD`` reads CMD's standard output, e.g. ``pipe:aws s3
cp s3://bucket/train-000000.tar -``; ``http(s)://``). Nothing here reads an image: opening a
source reads one JSON index at most, so start-up is O(shards), never O(images).

Two ways to name the shards (:func:`open_shards`):

- an **index** (``train.json``, written by ``python -m pipeline.shards write``): the ``wids``
  layout ``{"__kind__": "wids-shard-index-v1", "shardlist": [{"url", "nsamples", "filesize"}]}``
  plus ``classes``, the writer's ``seed`` and its ``skipped`` files. Relative URLs are relative to
  the index's folder, or are put into a ``url_template`` (``"pipe:aws s3 cp s3://b/{} -"``).
  Every shard's sample count is known: **exact epochs**.
- a **brace pattern** or URL list (``train-{000000..000127}.tar``) with the total sample count
  given (``--num-samples``): per-shard counts are unknown, so each reader is given whole shards
  and a fixed number of batches (**counted epochs**, below).

An epoch (:meth:`ShardSource.plan`):

- the shards are permuted with ``(seed, epoch)``;
- steps per epoch are ``L = ⌊N / (b · R)⌋`` for ``N`` samples, ``b`` images per batch and ``R``
  ranks, and **every rank yields exactly L batches**; each of its ``W`` readers (DataLoader
  workers; 1 without workers) yields ``len(range(w, L, W))`` of them, so the DataLoader's
  round-robin gives batch ``p`` of the epoch from reader ``p mod W``;
- exact: the permuted shards, concatenated, are cut into contiguous sample ranges, rank ``r``
  taking ``[r·L·b, (r+1)·L·b)`` and each reader a contiguous part of that: every sample once per
  epoch (the ``N − R·L·b`` left over, fewer than ``R·b``, wait for another epoch's order), a shard
  read by at most two readers (one reads its head, the next its tail);
- counted: reader ``k`` of the ``R·W`` takes the permuted shards ``k, k + R·W, …``;
- a reader whose samples run short (bad samples, or counted shards smaller than planned) reads its
  own pieces again until its batches are full — a repeat, never a rank with fewer batches (which
  would hang the others in an all-reduce, webdataset#188);
- fewer shards than readers is refused (:class:`ShardPlanError`), with how many are needed.

**Resampled streams** (:meth:`ShardSource.resample`, ``--shards-resampled``), for data larger than
anyone's epoch: each reader draws whole shards **with replacement** from a generator seeded with
``(seed, epoch, rank, reader)`` (:meth:`ShardSource.drawn`), without end, and yields its share of
``L = ⌊E / (b · R)⌋`` batches for an epoch of ``E`` samples (``epoch_samples``); the same seed gives
the same stream again (a resume replays it). An "epoch" is then a number of samples, not a pass:
a draw of ``S`` shards from ``S`` with replacement leaves about ``(1 − 1/S)^S ≈ e^−1 ≈ 37%`` of them
unseen (and reads about as many twice), so two epochs see different parts of the data.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import braceexpand
import numpy as np

from ..sampling import epoch_seed

INDEX_KIND = "wids-shard-index-v1"
"""``__kind__`` of a ``wids`` shard index (webdataset's indexed-dataset format, version 1)."""

IMAGE_EXTS = ("jpg", "png")
"""Image components a sample may carry (the writer stores ``jpg`` or, re-encoded, ``png``)."""


class ShardPlanError(ValueError):
    """The shards cannot be split as asked (too few shards for the readers): a user's setting."""


@dataclass(frozen=True)
class Piece:
    """Samples ``[skip, skip + take)`` of one shard, in the tar's order.

    Attributes:
        shard: the shard's position in the source's shard list (seeds the sample's views).
        url: what webdataset opens.
        skip: samples at the head of the shard that are not part of the piece.
        take: samples in the piece; None = to the shard's end (counted epochs).
    """

    shard: int
    url: str
    skip: int = 0
    take: int | None = None


@dataclass(frozen=True)
class ReaderPlan:
    """What one reader (a DataLoader worker of one rank) reads in one epoch.

    Attributes:
        pieces: its samples, in order; read again from the start when they run short (empty for a
            resampled reader: see ``draw_seed``).
        batches: batches it yields this epoch.
        skip_batches: batches of its stream dropped before the first one yielded (a mid-epoch resume).
        reader: its place ``w`` in the rank's round-robin (batch ``p`` comes from reader ``p mod W``).
        draw_seed: resampled streams only: the seed of ``(seed, epoch, rank, reader)`` its shards are
            drawn with (:meth:`ShardSource.drawn`); None for a fixed plan.
    """

    pieces: tuple[Piece, ...]
    batches: int
    skip_batches: int = 0
    reader: int = 0
    draw_seed: int | None = None


@dataclass
class ShardSource:
    """A list of tar shards, with what is known of them.

    Attributes:
        shards: ``(url, nsamples)`` per shard, ``nsamples`` None when unknown (a brace pattern).
        num_samples: samples in all shards (exact from an index, else as given).
        classes: class names by index, when the index holds them (else None).
        origin: where the list came from (the index path or the pattern), for messages.
        exact: every shard's sample count is known (an index).
        writer_seed: the seed the writer shuffled with (None if not written by our writer).
        skipped: ``(file, reason)`` that the writer left out (from the index).
        heads: per shard, samples at its head that are not part of this source (a slice that
            starts inside a shard, see :meth:`slice`); None: all zero.
        limit: counted sources: read at most this many samples (an evaluation subset, see
            :meth:`subset`); None: all.
        resampled: epochs are streams of shards drawn with replacement (see :meth:`resample`).
        epoch_samples: resampled: samples per epoch over all ranks.
    """

    shards: list[tuple[str, int | None]]
    num_samples: int | None
    classes: list[str] | None = None
    origin: str = ""
    exact: bool = True
    writer_seed: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    heads: list[int] | None = None
    limit: int | None = None
    resampled: bool = False
    epoch_samples: int | None = None
    kind = "shards"

    def __len__(self) -> int:
        """Samples of the source (counted: the given count, capped by ``limit``; 0 if unknown)."""
        n = self.num_samples
        if self.limit is not None:
            n = self.limit if n is None else min(n, self.limit)
        return n or 0

    def __str__(self) -> str:
        return self.origin or f"{len(self.shards)} shards"

    @property
    def samples_per_epoch(self) -> int | None:
        """Samples an epoch reads over all ranks: ``epoch_samples`` when resampled, else ``num_samples``."""
        return self.epoch_samples if self.resampled else self.num_samples

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    # ------------------------------------------------------------------ subsets and slices

    def pieces(self, start: int = 0, stop: int | None = None, order: list[int] | None = None) -> list[Piece]:
        """Samples ``[start, stop)`` of the shards concatenated in ``order`` (default: index order),
        as pieces. A counted source gives its whole shards (``start``, ``stop`` left at their defaults).

        Raises:
            ValueError: a range of a counted source (per-shard counts unknown).
        """
        if not self.exact:
            if start == 0 and stop is None:
                return [Piece(i, self.shards[i][0]) for i in (range(len(self.shards)) if order is None else order)]
            raise ValueError(f"{self}: per-shard sample counts are unknown (no index): give an index "
                             f"(python -m pipeline.shards write) for sample ranges")
        stop = self.num_samples if stop is None else min(stop, self.num_samples)
        out, at = [], 0
        for i in (range(len(self.shards)) if order is None else order):
            url, n = self.shards[i]
            lo, hi = max(start, at), min(stop, at + n)
            if lo < hi:
                out.append(Piece(i, url, lo - at + (self.heads[i] if self.heads else 0), hi - lo))
            at += n
            if at >= stop:
                break
        return out

    def slice(self, start: int, stop: int) -> "ShardSource":
        """Samples ``[start, stop)`` in index order, as a source of their own (a rank's part of an
        evaluation set). Exact sources only.

        Raises:
            ValueError: a counted source.
        """
        kept = self.pieces(start, stop)
        return replace(self, shards=[(p.url, p.take) for p in kept], heads=[p.skip for p in kept],
                       num_samples=sum(p.take for p in kept))

    def subset(self, n: int | None, seed: int = 0) -> "ShardSource":
        """The first ``n`` samples in index order (None or ``n >= len``: all): whole shards, the last
        one cut (its count is set to what is kept, so no plan reads past it). The writer shuffled
        the samples before writing, so these are a random draw; ``seed`` is not used (it is taken
        for the ImageFolder source's interface).

        Raises:
            ValueError: a counted source (per-shard counts unknown).
        """
        if n is None or (self.num_samples is not None and n >= self.num_samples):
            return self
        if not self.exact:
            return replace(self, limit=n if self.limit is None else min(n, self.limit))
        return self.slice(0, n)

    def part(self, rank: int, world_size: int) -> "ShardSource":
        """This rank's part of an evaluation set: exact → the contiguous samples
        ``[n·rank/world, n·(rank+1)/world)`` (``DistContext.shard_range``'s slice); counted → every
        ``world_size``-th shard from ``rank``, with the ``limit`` shared out."""
        if self.exact:
            n = self.num_samples
            return self.slice(n * rank // world_size, n * (rank + 1) // world_size)
        limit = None if self.limit is None else \
            self.limit * (rank + 1) // world_size - self.limit * rank // world_size
        return replace(self, shards=self.shards[rank::world_size], num_samples=None, limit=limit)

    # ------------------------------------------------------------------ epochs

    def resample(self, epoch_samples: int | None = None) -> "ShardSource":
        """This source with resampled epochs of ``epoch_samples`` samples over all ranks (None: the
        source's sample count, from the index or ``--num-samples``): see the module's docstring.

        Raises:
            ValueError: ``epoch_samples`` not given and the sample count unknown, or ``< 1``.
        """
        n = self.num_samples if epoch_samples is None else epoch_samples
        if n is None:
            raise ValueError(f"resampled shards ({self}) need the samples of an epoch: add --epoch-samples N")
        if n < 1:
            raise ValueError(f"--epoch-samples must be >= 1, got {n}")
        return replace(self, resampled=True, epoch_samples=int(n))

    def drawn(self, draw_seed: int):
        """Pieces of whole shards drawn with replacement (uniformly, numpy ``default_rng(draw_seed)``),
        without end: the stream of a resampled reader (:attr:`ReaderPlan.draw_seed`). A pure
        function of ``draw_seed``."""
        rng = np.random.default_rng(draw_seed)
        while True:
            for j in rng.integers(0, len(self.shards), 256).tolist():
                url, n = self.shards[j]
                yield Piece(j, url, self.heads[j] if self.heads else 0, n)

    def shard_order(self, seed: int, epoch: int) -> list[int]:
        """The shards' order in ``epoch``: a permutation, a pure function of ``(seed, epoch)``."""
        rng = np.random.default_rng(epoch_seed(seed, epoch))
        return rng.permutation(len(self.shards)).tolist()

    def batches_per_rank(self, batch_size: int, world_size: int) -> int:
        """``⌊N / (batch_size · world_size)⌋``: batches every rank yields per epoch, ``N`` the
        :attr:`samples_per_epoch` (0 if unknown)."""
        return (self.samples_per_epoch or 0) // (batch_size * world_size)

    def plan(self, seed: int, epoch: int, rank: int, world_size: int, readers: int, batch_size: int,
             start: int = 0) -> list[ReaderPlan]:
        """What each of this rank's ``readers`` reads in ``epoch`` (see the module's docstring),
        with the rank's first ``start`` batches skipped: reader ``i`` then plays round-robin place
        ``(start + i) mod readers``, so the DataLoader, which always begins with its worker 0,
        delivers batches ``start, start + 1, …`` in order.

        A resampled source gives each reader an empty ``pieces`` and its ``draw_seed`` instead
        (any number of shards serves any number of readers).

        Raises:
            ShardPlanError: fewer shards than ``world_size × readers`` (fixed plans); not one batch per rank.
            ValueError: ``start`` outside ``0..L``.
        """
        if self.resampled:
            return self._resampled_plan(seed, epoch, rank, world_size, readers, batch_size, start)
        if self.num_samples is None:
            raise ShardPlanError(f"shards given as a pattern ({self}) need their total sample count to plan an epoch: "
                                 f"add --num-samples N, or give the writer's index (train.json) instead")
        need = world_size * readers
        if len(self.shards) < need:
            raise ShardPlanError(
                f"{len(self.shards)} shard(s) in {self} cannot feed {world_size} rank(s) x {readers} reader(s) "
                f"= {need}: write at least {need} shards (better {4 * need}: python -m pipeline.shards write "
                f"... --shard-size SMALLER) or lower -j/--workers")
        total = self.batches_per_rank(batch_size, world_size)
        if total < 1:
            raise ShardPlanError(f"{self.num_samples} samples in {self} give no batch of {batch_size} on each of "
                                 f"{world_size} rank(s); lower -b/--batch-size")
        if not 0 <= start <= total:
            raise ValueError(f"start batch {start} outside this epoch's 0..{total} batches")
        order = self.shard_order(seed, epoch)
        counts = [len(range(w, total, readers)) for w in range(readers)]
        plans = []
        for i in range(readers):
            w = (start + i) % readers
            done = len(range(w, start, readers))  # reader w's batches at positions before `start`
            if self.exact:
                first = rank * total * batch_size + batch_size * sum(counts[:w])
                pieces = self.pieces(first, first + counts[w] * batch_size, order)
            else:
                mine = order[rank * readers + w::world_size * readers]
                pieces = [Piece(j, self.shards[j][0]) for j in mine]
            plans.append(ReaderPlan(tuple(pieces), counts[w] - done, done, w))
        return plans

    def _resampled_plan(self, seed, epoch, rank, world_size, readers, batch_size, start) -> list[ReaderPlan]:
        total = self.batches_per_rank(batch_size, world_size)
        if total < 1:
            raise ShardPlanError(f"--epoch-samples {self.epoch_samples} give no batch of {batch_size} on each of "
                                 f"{world_size} rank(s); raise --epoch-samples or lower -b/--batch-size")
        if not 0 <= start <= total:
            raise ValueError(f"start batch {start} outside this epoch's 0..{total} batches")
        counts = [len(range(w, total, readers)) for w in range(readers)]
        plans = []
        for i in range(readers):
            w = (start + i) % readers
            done = len(range(w, start, readers))
            plans.append(ReaderPlan((), counts[w] - done, done, w, draw_seed=epoch_seed(seed, epoch, rank, w)))
        return plans


# ---------------------------------------------------------------------- opening

def is_shard_spec(data: str | os.PathLike) -> bool:
    """Whether ``data`` names shards: an index ``.json``, a folder holding ``train.json``, a URL,
    or a ``.tar`` path / brace pattern."""
    text = str(data)
    if text.startswith(("pipe:", "http://", "https://", "gs://", "file:")) or "{" in text:
        return True
    if text.endswith((".json", ".tar")):
        return True
    return Path(text).is_dir() and (Path(text) / "train.json").is_file()


def read_index(path: str | os.PathLike, url_template: str | None = None) -> ShardSource:
    """A :class:`ShardSource` from a ``wids`` index file (the writer's ``<split>.json``).

    Args:
        path: the index file.
        url_template: where relative URLs go: ``"{}"`` in it is replaced by the URL (e.g.
            ``"pipe:aws s3 cp s3://bucket/shards/{} -"``); None: relative to the index's folder.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a shard index (not JSON, no ``shardlist``, a shard without ``url`` or with a
            negative / missing ``nsamples``), or a template without ``{}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard index {path} does not exist (write one with python -m pipeline.shards write)")
    if url_template is not None and "{}" not in url_template:
        raise ValueError(f"--shard-url {url_template!r} has no '{{}}' where the shard's name goes")
    try:
        spec = json.loads(path.read_text())
        entries = spec["shardlist"]
        shards = []
        for e in entries:
            url, n = str(e["url"]), int(e["nsamples"])
            if n < 0:
                raise ValueError(f"nsamples {n} < 0")
            shards.append((_resolve(url, path.parent, url_template), n))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a shard index ({{'shardlist': [{{'url', 'nsamples'}}]}}): "
                         f"{type(exc).__name__}: {exc}") from None
    if not shards:
        raise ValueError(f"shard index {path} lists no shard")
    classes = spec.get("classes")
    return ShardSource(shards=shards, num_samples=sum(n for _, n in shards),
                       classes=list(classes) if classes is not None else None, origin=str(path), exact=True,
                       writer_seed=spec.get("seed"), skipped=[tuple(s) for s in spec.get("skipped", [])])


def _resolve(url: str, base: Path, template: str | None) -> str:
    if "://" in url or url.startswith(("pipe:", "/")):
        return url
    if template is not None:
        return template.replace("{}", url)
    return str(base / url)


def expand_pattern(pattern: str, num_samples: int | None) -> ShardSource:
    """A counted :class:`ShardSource` from a brace pattern, or URLs separated by ``::``
    (``train-{000000..000127}.tar``, ``pipe:aws s3 cp s3://b/train-{000000..000127}.tar -``).
    ``num_samples`` (their total) is needed to train on them (:meth:`ShardSource.plan`), not to
    evaluate (every sample is read).

    Raises:
        ValueError: the pattern expands to nothing; ``num_samples < 1``.
    """
    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} names no shard")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    return ShardSource(shards=[(u, None) for u in urls], num_samples=num_samples, origin=pattern, exact=False)


def open_shards(data: str | os.PathLike, split: str = "train", num_samples: int | None = None,
                url_template: str | None = None) -> ShardSource:
    """The shards ``data`` names (see :func:`is_shard_spec`): a folder → its ``<split>.json``; an
    index file; else a pattern (``num_samples`` required).

    Raises:
        FileNotFoundError: a folder without ``<split>.json``; a missing index.
        ValueError: see :func:`read_index` and :func:`expand_pattern`.
    """
    text = str(data)
    if Path(text).is_dir():
        return read_index(Path(text) / f"{split}.json", url_template)
    if text.endswith(".json"):
        return read_index(text, url_template)
    return expand_pattern(text, num_samples)


def val_index_beside(index: str | os.PathLike) -> Path | None:
    """``val.json`` next to a ``train.json`` index (the writer's layout), if it exists."""
    p = Path(index)
    if p.name == "train.json" and (p.parent / "val.json").is_file():
        return p.parent / "val.json"
    if p.is_dir() and (p / "val.json").is_file():
        return p / "val.json"
    return None


__all__ = ["INDEX_KIND", "Piece", "ReaderPlan", "ShardPlanError", "ShardSource", "expand_pattern", "is_shard_spec",
           "open_shards", "read_index", "val_index_beside"]
