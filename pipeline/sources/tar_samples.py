"""Reading the samples of shard pieces through ``webdataset``, with every problem named.

:func:`read_piece` opens one shard with webdataset's ``gopen`` (local paths, ``pipe:``, http…),
expands it with webdataset's tar iterator and groups its files by key, and yields the samples of a
:class:`~pipeline.sources.shards.Piece` with their position in the shard. Problems never raise:
each becomes a :class:`BadSample` (shard URL, key, reason) that the caller counts — a sample
without its image or ``.cls`` component, a ``.cls`` that is not an integer, a shard that cannot
be opened or ends early (then the samples the piece still expected are counted as missing).
Decoding the image is the backend's step (:func:`pipeline.sources.imagefolder.decode_rgb`), and a
sample that fails there is a :class:`BadSample` too.

:func:`reader_stream` is one reader's samples for an epoch in the order every backend that decodes
in Python delivers them (``torch``, ``torchvision-gpu``): its plan's pieces — or, resampled, its
drawn shards — through a seeded shuffle buffer, bad samples left out and noted.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

import webdataset
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..sampling import epoch_seed
from .shards import IMAGE_EXTS, Piece, ReaderPlan, ShardSource


class BadShardData(ValueError):
    """Too many bad samples (more than ``--max-bad-fraction`` of an epoch), or a reader that finds no
    usable sample at all: the data's problem, said in one line."""


@dataclass(frozen=True)
class BadSample:
    """A sample (or a run of them) that could not be used.

    Attributes:
        url: the shard.
        key: the sample's key in the shard (None when the shard itself failed).
        reason: what was wrong, one line.
        count: samples this stands for (a shard cut short stands for every sample still expected).
    """

    url: str
    key: str | None
    reason: str
    count: int = 1

    def line(self) -> str:
        """``<shard>\\t<key or ->\\t<reason>`` for ``skipped.txt``."""
        return f"{self.url}\t{self.key or '-'}\t{' '.join(self.reason.split())}"


@dataclass(frozen=True)
class TarSample:
    """One usable sample: ``key``, ``image`` (encoded bytes), ``ext`` (``jpg`` / ``png``), ``label``,
    and where it is (``shard`` index, ``url``, ``position`` in the tar).

    ``salt`` tells repeated reads of one sample in an epoch apart (the repeat pass of a fixed plan, the
    draw of a resampled stream; 0 for a first pass), so each read draws views of its own;
    ``replay``: a repeat pass, whose problems were already counted in the first."""

    key: str
    image: bytes
    ext: str
    label: int
    shard: int
    url: str
    position: int
    salt: int = 0
    replay: bool = False


def _check(sample: dict, piece: Piece, position: int) -> TarSample | BadSample:
    key = sample.get("__key__")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return BadSample(piece.url, key, f"no image component (.{'/.'.join(IMAGE_EXTS)}); has "
                                         f"{sorted(k for k in sample if not k.startswith('__'))}")
    if "cls" not in sample:
        return BadSample(piece.url, key, "no .cls component (the class index)")
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return BadSample(piece.url, key, f".cls is not an integer: {sample['cls'][:20]!r}")
    if label < 0:
        return BadSample(piece.url, key, f".cls is negative: {label}")
    return TarSample(key, sample[ext], ext, label, piece.shard, piece.url, position)


def read_piece(piece: Piece) -> Iterator[TarSample | BadSample]:
    """The samples of ``piece`` in tar order, each a :class:`TarSample` or a :class:`BadSample`.

    A shard that cannot be opened, or that ends (or fails to read) before the piece's last sample,
    ends with one :class:`BadSample` whose ``count`` is the samples still expected (unknown for a
    counted piece: then 1). The shard's stream is closed however the iteration ends.
    """
    errors: list[Exception] = []

    def keep_going(exn: Exception) -> bool:  # webdataset's handler: note the error, go on
        errors.append(exn)
        return True

    try:
        stream = gopen(piece.url)
    except Exception as exc:  # gopen raises what the scheme's opener raises (OSError, ValueError...)
        yield BadSample(piece.url, None, f"cannot open the shard: {type(exc).__name__}: {exc}", piece.take or 1)
        return
    end = None if piece.take is None else piece.skip + piece.take
    position, last_key, finished = 0, None, False
    try:
        files = tar_file_expander([{"url": piece.url, "stream": stream}], handler=keep_going)
        for sample in group_by_keys(files, handler=keep_going):
            if end is not None and position >= end:
                finished = True
                break
            if errors:
                break
            if position >= piece.skip:
                yield _check(sample, piece, position)
            last_key = sample.get("__key__")
            position += 1
        else:
            finished = not errors and (end is None or position >= end)
    finally:
        try:
            stream.close()
        except Exception:  # a pipe stopped early exits with SIGPIPE's status; a failed read is already noted
            pass
    if not finished:
        read = max(0, position - piece.skip)
        missing = 1 if piece.take is None else max(1, piece.take - read)
        cause = f"{type(errors[0]).__name__}: {errors[0].args[0] if errors[0].args else errors[0]}" if errors else \
            "the tar ended"
        after = f"after key {last_key}" if last_key is not None else "before its first sample"
        yield BadSample(piece.url, None, f"shard cut short {after} ({cause}); "
                                         f"{missing} sample(s) of this reader's part missing", missing)


# ---------------------------------------------------------------------- one reader's stream

EMPTY_DRAWS = 64
"""A resampled reader stops with :class:`BadShardData` after this many drawn shards in a row (or
the number of shards, if larger) without a usable sample: data that is all bad, not bad luck."""


def _fixed_samples(plan: ReaderPlan, bad: list[BadSample], pass_no: int) -> Iterator[TarSample]:
    """Pass ``pass_no`` over a fixed plan's pieces: its usable samples; problems go to ``bad`` (pass 0 only).

    Raises:
        BadShardData: a repeat pass (``pass_no > 0``) found not one usable sample.
    """
    found = 0
    for piece in plan.pieces:
        for item in read_piece(piece):
            if isinstance(item, BadSample):
                if pass_no == 0:  # a repeat pass meets the same problems again: count them once
                    bad.append(item)
                continue
            found += 1
            yield replace(item, salt=pass_no, replay=pass_no > 0) if pass_no else item
    if pass_no > 0 and found == 0:
        raise BadShardData(f"no usable sample in this reader's shards ({', '.join(sorted({p.url for p in plan.pieces}))}); "
                           f"see skipped.txt")


def _drawn_samples(source: ShardSource, plan: ReaderPlan, bad: list[BadSample]) -> Iterator[TarSample]:
    """A resampled reader's usable samples, shard after drawn shard, without end; every problem met
    goes to ``bad`` (a shard drawn twice is read, and counted, twice).

    Raises:
        BadShardData: :data:`EMPTY_DRAWS` drawn shards in a row without a usable sample.
    """
    empty, limit = 0, max(EMPTY_DRAWS, len(source.shards))
    for k, piece in enumerate(source.drawn(plan.draw_seed)):
        salt = epoch_seed(plan.draw_seed, k)
        found = False
        for item in read_piece(piece):
            if isinstance(item, BadSample):
                bad.append(item)
                continue
            found = True
            yield replace(item, salt=salt)
        empty = 0 if found else empty + 1
        if empty >= limit:
            raise BadShardData(f"no usable sample in {empty} shards drawn in a row from {source}; see skipped.txt")


def reader_stream(source: ShardSource, plan: ReaderPlan, seed: int, epoch: int, rank: int, buffer: int,
                  bad: list[BadSample]) -> Iterator[TarSample]:
    """One reader's usable samples for ``epoch``, without end, through a ``buffer``-sample shuffle
    (webdataset's ``shuffle``, a ``random.Random`` seeded with ``(seed, epoch, rank, reader, pass)``;
    ``buffer`` 1: the stored order). A fixed plan's pieces are read, then (only if the caller wants
    more) read again, each pass shuffled with its own seed; a resampled plan's shards are drawn
    without end (:meth:`~pipeline.sources.shards.ShardSource.drawn`). Bad samples are left out and
    appended to ``bad``. A pure function of its arguments and the shards' bytes: a resumed reader
    drops the samples of the batches before the resume point from this stream (before decoding).

    Raises:
        BadShardData: (while iterating) a reader without a usable sample (see :func:`_fixed_samples`,
            :func:`_drawn_samples`).
    """
    pass_no = 0
    while True:
        rng = random.Random(epoch_seed(seed, epoch, rank, plan.reader, pass_no))
        stream = _drawn_samples(source, plan, bad) if plan.draw_seed is not None else \
            _fixed_samples(plan, bad, pass_no)
        yield from webdataset.shuffle(buffer, initial=buffer, rng=rng)(stream) if buffer > 1 else stream
        pass_no += 1
