"""Reading the samples of shard pieces through ``webdataset``, with every problem named.

:func:`read_piece` opens one shard with webdataset's ``gopen`` (local paths, ``pipe:``, http…),
expands it with webdataset's tar iterator and groups its files by key, and yields the samples of a
:class:`~pipeline.sources.shards.Piece` with their position in the shard. Problems never raise:
each becomes a :class:`BadSample` (shard URL, key, reason) that the caller counts — a sample
without its image or ``.cls`` component, a ``.cls`` that is not an integer, a shard that cannot
be opened or ends early (then the samples the piece still expected are counted as missing).
Decoding the image is the backend's step (:func:`pipeline.sources.imagefolder.decode_rgb`), and a
sample that fails there is a :class:`BadSample` too.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from .shards import IMAGE_EXTS, Piece


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
    and where it is (``shard`` index, ``url``, ``position`` in the tar)."""

    key: str
    image: bytes
    ext: str
    label: int
    shard: int
    url: str
    position: int


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
