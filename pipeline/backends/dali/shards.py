"""``--loader dali`` over tar shards: DALI's own ``fn.readers.webdataset`` reads the tars, decodes
once and draws two views (:func:`pipeline.backends.dali.graph.simsiam_shard_pipeline`).

**This rank's share, given as per-epoch indexes.** DALI's reader can split the data itself:
``shard_id`` / ``num_shards`` take the sample range ``[⌊i·N/S⌋, ⌊(i+1)·N/S⌋)`` of all the tars
concatenated in the order given, and DALI's PyTorch iterator, told the reader's name, sizes each
shard the same way (``nvidia/dali/plugin/base_iterator.py``, ``_calculate_shard_sizes``; with
``LastBatchPolicy.DROP`` every shard gets ``⌊⌊N/S⌋/b⌋`` batches). We hand each rank only its own
samples instead. Every epoch, this rank's part of the source's plan
(:meth:`~pipeline.sources.shards.ShardSource.plan` with one reader) becomes a list of samples,
and each run of consecutive samples of one tar is written as a DALI v1.2 index holding the
writer's ``.idx`` lines of exactly those samples, in the order they are to be read; the reader
gets those tars with those indexes (``shard_id`` 0 of ``num_shards`` 1). DALI reads a sample at
the offsets its index line gives, so an index may list part of a tar, in any order, and a tar may
be listed twice (checked with DALI 2.4 on the CPU; ``tests/test_shards_gpu_loaders.py``). So:

- rank ``r`` reads the samples the torch loader's rank ``r`` reads (exact epochs: the contiguous
  range ``[r·L·b, (r+1)·L·b)`` of the epoch's permuted shards);
- the indexes list exactly ``(L − start)·b`` samples, so **every rank yields exactly ``L −
  start`` batches**, nothing padded or dropped (``pad_last_batch`` stays on as a guard; the
  iterator's ``reader_name`` sizes the epoch from the reader);
- **mid-epoch resume is our own skip**, not DALI's checkpointing: the samples of the batches
  before ``start`` are left out of the indexes, so they are never read, and the batches from
  ``start`` on hold the samples of the uninterrupted epoch (their augmentation draws are fresh, as
  with :class:`~pipeline.backends.dali.loader.DaliLoader`). ``enable_checkpointing`` would need
  DALI's state saved with every checkpoint of the run, for the same result;
- each rank reads the index lines of its own ``~N/R`` samples, where DALI's own split makes every
  rank parse every index;
- resampled streams (:meth:`~pipeline.sources.shards.ShardSource.resample`) are the drawn shards,
  repeats included, cut to the epoch's samples.

**Order**: the plan permutes the shards with ``(seed, epoch)``; inside each piece the samples are
permuted with ``(seed, epoch, rank, piece number)``. DALI's ``random_shuffle`` (a buffer that
cannot be replayed from a mid-epoch step) and ``shuffle_after_epoch`` (DALI's own shard order)
stay off; the pipeline is rebuilt every epoch, as the file loader's is. Reads inside a tar follow
the permutation, so they are not sequential: with shards on a network filesystem give
``dont_use_mmap`` (``--dali-no-mmap``), DALI's advice for such filesystems.

**Bad samples**: DALI cannot skip one — a sample that fails to decode ends the pipeline
(NVIDIA/DALI#3913) —, so the writer's validation is what protects a run. A sample without its
image or ``.cls`` is found in the index before the epoch starts (DALI's
``missing_component_behavior="error"`` is the backstop); a ``.cls`` that is not a class index is
found when its batch arrives; an image that fails to decode stops DALI, and the loader finds which
one by decoding the samples in flight one by one. Each stops the run with one line naming the
shard and key (:class:`~pipeline.backends.dali.loader.DaliDecodeError`), never a hang or a bare
C++ trace; the sample is also appended to ``skip_log``. ``--loader torch`` and
``torchvision-gpu`` skip and count such samples instead.

Only local tars (a path, ``file:``, or a mounted network filesystem) with their ``.idx`` beside
them are read: ``pipe:`` and ``http(s)://`` shards stream through ``--loader torch`` or
``torchvision-gpu``.
"""
from __future__ import annotations

import itertools
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ...augment import AugmentConfig
from ...batch import TwoViewBatch
from ...feed import Feed
from ...sampling import check_batch_size, epoch_seed
from ...sources.shards import IMAGE_EXTS, ReaderPlan, ShardSource
from ..base import Backend
from .graph import READER, first_undecodable_bytes, simsiam_shard_pipeline
from .loader import DaliDecodeError, _is_input_error, configure_dali, delivered_view, executor_args

REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://")
EMPTY_PIECES = 64
"""Pieces in a row without a sample after which an epoch's list stops with an error (a plan that
cannot fill its batches), as :data:`pipeline.sources.tar_samples.EMPTY_DRAWS`."""


def local_tar(url: str) -> str:
    """The local path of a shard URL (a plain path or ``file:PATH``).

    Raises:
        ValueError: a ``pipe:`` / ``http(s)://`` / other remote URL (one line: DALI reads files).
    """
    if url.startswith("file:"):
        return url[len("file:"):]
    if url.startswith(REMOTE) or "://" in url:
        raise ValueError(f"--loader dali reads tar files on a local or mounted filesystem, not {url}: stream "
                         f"remote shards with --loader torch or torchvision-gpu (or mount the bucket)")
    return url


def index_of(tar: str) -> Path:
    """The DALI index beside a tar: ``x.tar`` → ``x.idx`` (the writer's and ``wds2idx``'s convention)."""
    return Path(tar).with_suffix(".idx")


@dataclass(frozen=True)
class IndexedSample:
    """One sample as DALI finds it: its ``tar``, ``key``, and its ``line`` of the tar's DALI index
    (``ext offset size name`` per component, offsets and sizes in bytes)."""

    tar: str
    key: str
    line: str

    def image_bytes(self) -> bytes:
        """The encoded image, read from the tar at the offset its index line gives."""
        parts = self.line.split()
        for ext, offset, size in zip(parts[0::4], parts[1::4], parts[2::4]):
            if ext in IMAGE_EXTS:
                with open(self.tar, "rb") as f:
                    f.seek(int(offset))
                    return f.read(int(size))
        return b""


def read_dali_index(tar: str) -> list[IndexedSample]:
    """The samples of ``tar`` from its DALI v1.2 index (:func:`index_of`), in tar order, each checked
    to carry an image (``.jpg`` / ``.png``) and a ``.cls`` component.

    Raises:
        DaliDecodeError: the index is unreadable, not v1.2 (v1.1 has no component names, so no
            keys), inconsistent, or a sample lacks its image or ``.cls`` (one line naming the shard
            and the key).
    """
    path = index_of(tar)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DaliDecodeError(f"cannot read the DALI index {path} of shard {tar} ({exc.strerror or exc}): "
                              f"python -m pipeline.shards write makes one beside each tar") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
        raise DaliDecodeError(f"{path} is not a DALI v1.2 index (first line {(lines or [''])[0][:40]!r}): rewrite the "
                              f"shards with python -m pipeline.shards write (v1.2 names each component)")
    rows = []
    for line in lines[1:1 + int(head[1])]:
        parts = line.split()
        if not parts or len(parts) % 4:
            raise DaliDecodeError(f"{path}: line {len(rows) + 2} is not 'ext offset size name' per component: {line[:80]!r}")
        exts, key = parts[0::4], parts[3].rsplit("/", 1)[-1].split(".", 1)[0]
        if not any(e in IMAGE_EXTS for e in exts):
            raise DaliDecodeError(f"shard {tar} key {key} has no image component (.{'/.'.join(IMAGE_EXTS)}; has "
                                  f"{', '.join(exts)}): --loader dali cannot skip a sample (NVIDIA/DALI#3913); rewrite "
                                  f"the shard (python -m pipeline.shards write) or use --loader torch, which skips it")
        if "cls" not in exts:
            raise DaliDecodeError(f"shard {tar} key {key} has no .cls component (the class index): --loader dali "
                                  f"cannot skip a sample (NVIDIA/DALI#3913); rewrite the shard (python -m pipeline.shards "
                                  f"write) or use --loader torch, which skips it")
        rows.append(IndexedSample(tar, key, line))
    if len(rows) != int(head[1]):
        raise DaliDecodeError(f"{path} announces {head[1]} samples and lists {len(rows)}: rewrite the shards")
    return rows


def _pieces(source: ShardSource, plan: ReaderPlan):
    """The plan's pieces in reading order, without end: a fixed plan's again and again (a reader
    that runs short reads its pieces again), a resampled plan's drawn shards."""
    if plan.draw_seed is not None:
        return source.drawn(plan.draw_seed)
    return itertools.cycle(plan.pieces)


def epoch_samples(source: ShardSource, plan: ReaderPlan, seed: int, epoch: int, rank: int,
                  batch_size: int) -> list[IndexedSample]:
    """This rank's samples of ``epoch`` from batch ``plan.skip_batches`` on, in the order DALI is to
    read them: ``plan.batches × batch_size`` of them (see the module's docstring).

    Each piece's samples are permuted with ``(seed, epoch, rank, k)`` for the ``k``-th piece of the
    stream; pieces are read again (fixed plans) or drawn (resampled) until the batches are full.

    Raises:
        DaliDecodeError: an index that does not hold the samples the shard index promised, or a
            sample without its image or ``.cls`` (see :func:`read_dali_index`); pieces without
            samples, again and again.
        ValueError: a remote shard URL (see :func:`local_tar`).
    """
    want = (plan.skip_batches + plan.batches) * batch_size
    rows: dict[str, list[IndexedSample]] = {}
    out: list[IndexedSample] = []
    empty = 0
    for k, piece in enumerate(_pieces(source, plan)):
        tar = local_tar(piece.url)
        if tar not in rows:
            rows[tar] = read_dali_index(tar)
        have = rows[tar]
        stop = len(have) if piece.take is None else piece.skip + piece.take
        if stop > len(have):
            raise DaliDecodeError(f"the DALI index of shard {tar} lists {len(have)} samples, {source} needs {stop}: "
                                  f"the .idx and the shard index disagree; rewrite the shards")
        chosen = have[piece.skip:stop]
        order = np.random.default_rng(epoch_seed(seed, epoch, rank, k)).permutation(len(chosen)).tolist()
        out.extend(chosen[i] for i in order)
        if len(out) >= want:
            break
        empty = 0 if chosen else empty + 1
        if empty >= max(EMPTY_PIECES, len(source.shards)):
            raise DaliDecodeError(f"{empty} pieces of {source} in a row hold no sample: nothing to fill epoch {epoch + 1}")
    return out[plan.skip_batches * batch_size:want]


def write_indexes(samples: list[IndexedSample], folder: Path) -> tuple[list[str], list[str], list[int]]:
    """Write one DALI v1.2 index per run of consecutive ``samples`` of one tar into ``folder``.

    Returns:
        ``(paths, index_paths, starts)``: the tar, the index and the position in ``samples`` of
        the first sample of every run, in reading order (``fn.readers.webdataset``'s ``paths`` and
        ``index_paths``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths, index_paths, starts = [], [], []
    i = 0
    while i < len(samples):
        j = i
        while j < len(samples) and samples[j].tar == samples[i].tar:
            j += 1
        index = folder / f"run{len(paths):06d}.idx"
        index.write_text(f"v1.2 {j - i}\n" + "".join(s.line + "\n" for s in samples[i:j]))
        paths.append(samples[i].tar)
        index_paths.append(str(index))
        starts.append(i)
        i = j
    return paths, index_paths, starts


def labels_from_cls(raw: np.ndarray) -> tuple[np.ndarray, int | None]:
    """Class indices from ``.cls`` texts as the pipeline delivers them.

    Args:
        raw: ``(B, LABEL_BYTES)`` uint8, each row the text zero-padded (or cut) to the width.

    Returns:
        ``((B,) int64 labels, row of the first text that is not a class index or None)``: a class
        index is a non-negative decimal integer (surrounding whitespace allowed) that ends inside the
        width (its last byte is 0).
    """
    out = np.zeros(len(raw), np.int64)
    for i, row in enumerate(raw):
        text = row.tobytes()
        try:
            value = int(text.rstrip(b"\0").decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return out, i
        if text[-1] != 0 or value < 0:
            return out, i
        out[i] = value
    return out, None


class DaliShardLoader(Backend):
    """Two-view batches from tar shards through DALI's ``fn.readers.webdataset``.

    Args:
        source: the shards (:class:`~pipeline.sources.shards.ShardSource`: the writer's index, or a
            pattern of local tars with their ``.idx``; resampled or not).
        aug: augmentation parameters.
        feed: as :class:`~pipeline.backends.dali.loader.DaliLoader` (device and placement, DALI
            threads, prefetch, layout, dtype, seed, rank, world size).
        cpu_decode, hw_decoder_load, overlap: as :class:`~pipeline.backends.dali.loader.DaliLoader`.
        dont_use_mmap: DALI reads the tars with plain reads instead of mapping them (network
            filesystems).
        skip_log: file the sample that stopped DALI is appended to (``shard \\t key \\t reason``).
        record_keys: keep ``"<shard>#<key>"`` of every delivered sample in ``keys`` (tests, tracing).

    Yields:
        :class:`TwoViewBatch`: views ``(B, 3, S, S)``, label ``(B,)`` int64, on ``device``.

    Attributes:
        num_samples: images this rank reads per epoch (``len(self) * batch_size``).
        keys: with ``record_keys``, the keys delivered since the last ``set_epoch``.

    Raises:
        ValueError: a remote shard URL; a shard without its ``.idx``; see
            :func:`~pipeline.backends.dali.loader.configure_dali`.
        pipeline.sources.shards.ShardPlanError: fewer shards than ranks, or no batch per rank.
        DaliDecodeError: (while iterating) a sample DALI cannot read; one line naming shard and key.
    """

    name = "dali"

    def __init__(self, source: ShardSource, aug: AugmentConfig, feed: Feed, cpu_decode: bool = False,
                 hw_decoder_load: float | None = None, dont_use_mmap: bool = False,
                 skip_log: str | Path | None = None, record_keys: bool = False, overlap: bool | None = None):
        super().__init__(source, aug, feed)
        configure_dali(self, feed, cpu_decode, hw_decoder_load, overlap)
        missing = [t for t in (local_tar(u) for u, _ in source.shards) if not index_of(t).is_file()]
        if missing:
            raise ValueError(f"--loader dali needs DALI's index beside each shard; {len(missing)} of {len(source.shards)} "
                             f"have none, e.g. {index_of(missing[0])}: write the shards with python -m pipeline.shards "
                             f"write, or index them with DALI's wds2idx")
        source.plan(self.seed, 0, self.rank, self.world_size, 1, self.batch_size)  # refuses bad splits now
        self._len = check_batch_size(self.batch_size, source.batches_per_rank(self.batch_size, self.world_size)
                                     * self.batch_size, f"rank {self.rank}'s part of {source}")
        self.num_samples = self._len * self.batch_size
        self.dont_use_mmap, self.skip_log, self.record_keys = dont_use_mmap, skip_log, record_keys
        self.keys: list[str] = []
        self._dir = Path(tempfile.mkdtemp(prefix="simsiam-dali-idx-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch ``epoch`` and skip its first ``start`` batches (never read; see the module's docstring).

        Raises:
            ValueError: ``start`` outside ``0..len(self)``.
        """
        super().set_epoch(epoch, start)
        self.keys = []

    def epoch_samples(self, epoch: int, start: int = 0) -> list[IndexedSample]:
        """This rank's samples of batches ``start..len(self)-1`` of ``epoch``, in reading order."""
        plan = self.source.plan(self.seed, epoch, self.rank, self.world_size, 1, self.batch_size, start)[0]
        return epoch_samples(self.source, plan, self.seed, epoch, self.rank, self.batch_size)

    def _build(self, paths: list[str], index_paths: list[str]):
        pipe = simsiam_shard_pipeline(
            paths, index_paths, self.aug, self.decode_device, self.op_device, "HWC" if self.channels_last else "CHW",
            "float16" if self.dtype == torch.float16 else "float32", self.hw_decoder_load, self.dont_use_mmap,
            batch_size=self.batch_size, num_threads=self.workers, device_id=self.device_id,
            seed=epoch_seed(self.seed, self.epoch, self.rank) % 2**31, **executor_args(self))
        pipe.build()
        return DALIGenericIterator(pipe, ["view1", "view2", "label"], reader_name=READER,
                                   last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)

    def __iter__(self):
        if self.start >= self._len:  # resumed after the epoch's last batch
            return
        samples = self.epoch_samples(self.epoch, self.start)
        folder = self._dir / f"epoch{self.epoch}"
        shutil.rmtree(folder, ignore_errors=True)
        iterator = None
        b = self.batch_size
        try:
            paths, index_paths, starts = write_indexes(samples, folder)
            try:
                iterator = self._build(paths, index_paths)  # runs the first batches already
            except RuntimeError as exc:
                if not _is_input_error(exc):
                    raise
                raise self._error(exc, samples, starts, folder, 0) from exc
            for step in range(self._len - self.start):
                try:
                    out = next(iterator)[0]
                except StopIteration:  # cannot happen: the indexes hold whole batches; never yield short
                    raise RuntimeError(f"DALI ended epoch {self.epoch} early") from None
                except RuntimeError as exc:
                    if not _is_input_error(exc):
                        raise
                    raise self._error(exc, samples, starts, folder, step) from exc
                mine = samples[step * b:(step + 1) * b]
                labels, bad = labels_from_cls(out["label"].numpy())
                if bad is not None:
                    text = out["label"][bad].numpy().tobytes().rstrip(b"\0")
                    raise self._stop(mine[bad], f".cls is not a class index: {text[:20]!r}")
                if self.record_keys:
                    self.keys.extend(f"{s.tar}#{s.key}" for s in mine)
                yield TwoViewBatch(delivered_view(out["view1"], self), delivered_view(out["view2"], self),
                                   torch.from_numpy(labels).to(self.device, non_blocking=True))
        finally:
            del iterator
            shutil.rmtree(folder, ignore_errors=True)

    def _stop(self, sample: IndexedSample | None, reason: str, where: str = "") -> DaliDecodeError:
        """The one-line error for a sample DALI could not use (appended to ``skip_log`` when named)."""
        if sample is not None and self.skip_log is not None:
            with open(self.skip_log, "a") as f:
                f.write(f"{sample.tar}\t{sample.key}\t{' '.join(reason.split())}\n")
        what = f"shard {sample.tar} key {sample.key}" if sample is not None else where
        return DaliDecodeError(f"--loader dali stopped in epoch {self.epoch + 1} on {what}: {reason}; DALI cannot skip a "
                               f"sample (NVIDIA/DALI#3913): rewrite the shard (python -m pipeline.shards write checks "
                               f"every image) or train with --loader torch, which skips and counts bad samples")

    def _error(self, exc: RuntimeError, samples: list[IndexedSample], starts: list[int], folder: Path,
               step: int) -> DaliDecodeError:
        """Name the sample a DALI error stopped on: from an index line DALI names, else, for a decode
        failure, by decoding the samples not yet delivered (the failing batch is among the
        ``prefetch`` + 1 in flight) one by one with DALI's CPU decoder."""
        text = str(exc)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        after = lines.index("encountered:") + 1 if "encountered:" in lines else 0
        cause = lines[after] if after < len(lines) else type(exc).__name__
        sample = None
        named = re.search(r'index file at "([^"]+)" line (\d+)', text)
        if named and Path(named.group(1)).parent == folder:
            run, line = int(Path(named.group(1)).stem.removeprefix("run")), int(named.group(2))
            if run < len(starts) and 0 <= starts[run] + line - 1 < len(samples):
                sample = samples[starts[run] + line - 1]
        elif "fn.decoders.image" in text:
            window = samples[step * self.batch_size:(step + self.prefetch + 2) * self.batch_size]
            found = first_undecodable_bytes(s.image_bytes() for s in window)
            sample = window[found] if found is not None else None
            cause = f"its image does not decode ({cause})"
        tars = sorted({s.tar for s in samples if s.tar in text})
        where = f"shard {tars[0]}" if tars else f"a sample of {self.source}"
        return self._stop(sample, cause, where)
