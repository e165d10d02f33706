"""``--loader dali``: NVIDIA DALI behind the loader interface of :mod:`pipeline.backends.torch.loader`.

Each image is decoded once and augmented twice (:mod:`pipeline.backends.dali.graph`). What this
module adds around the graph:

- **Device choice, in one place** (:func:`dali_placement`): a CUDA training device → nvJPEG
  decoding (``device='mixed'``) and GPU ops, batches already on that GPU; ``cpu_decode=True`` →
  CPU decoding, GPU ops (NVIDIA's DeepLearningExamples found CPU decoding faster for heavy
  networks); a CPU training device → ``device_id=None`` and CPU ops only. A CUDA device that DALI
  cannot see stops with one sentence (``GetCUDADeviceCount()`` returns 0 without raising).
- **Order and resume**: every epoch the reader gets this rank's files in the order
  :func:`pipeline.sampling.shard_order` gives (the torch loader's order), cut to whole batches,
  and the pipeline is built with seed ``epoch_seed(seed, epoch, rank)``. Epoch ``e`` is
  therefore a pure function of ``(seed, e, rank)``: a resumed run sees what an uninterrupted run
  sees (DALI#2849 is DALI's own reader replaying epoch 0's shuffle after a restart). Sharding
  is done by ``shard_order(rank, world_size)`` too, not by the reader's ``shard_id`` /
  ``num_shards``: the reader gets only this rank's list, so DALI and torch ranks read the same
  disjoint shards.
- **Exact length**: the file list holds ``len(loader) * batch_size`` files, so every epoch has
  exactly ``len(loader)`` full batches (DALI#2607, Lightning#12956 are off-by-one epochs with
  DALI's own padding/wrap-around). Rebuilding the pipeline each epoch costs about 2.5 s
  to the first batch for Fashion-MNIST's 60,000 files on 2 busy CPU cores (measured).
- **Buffers**: with DALI 2.x's dynamic executor (the default) ``DALIGenericIterator`` hands each
  output batch to torch by DLPack, and DALI does not reuse that memory while torch holds a
  reference (without it, the iterator copies into fresh ``torch.empty`` tensors), so a batch
  kept by the training loop is never overwritten (tested in ``tests/test_dali_loader.py``).
- **Bad files**: the same :class:`~pipeline.sources.imagefolder.ImageList` as the torch loader, so files PIL
  cannot decode never reach DALI. Files PIL decodes but DALI does not (a GIF named ``.jpg``, see
  :mod:`pipeline.sources.formats`) are read from lossless PNG copies of PIL's pixels, made before the
  first step and announced in a warning, so DALI trains on the same images as the other loaders.
  A file that still fails in DALI (changed after the scan) stops the epoch with a
  :class:`DaliDecodeError` that names the file (never a hang).
- **Mid-epoch resume**: ``set_epoch(epoch, start)`` hands the reader only the files of batches
  ``start..len-1`` of the epoch's order, so a resumed epoch reads exactly the images an
  uninterrupted one reads from that batch on, in the same order. The augmentation draws are
  not replayed: DALI's random ops draw from the pipeline's own RNG from its first batch on.
"""
from __future__ import annotations

import ctypes
import warnings

import torch
from nvidia.dali import backend as dali_backend
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ...augment import AugmentConfig
from ...batch import TwoViewBatch
from ...device import to_training_layout
from ...feed import Feed
from ...sampling import check_batch_size, epoch_seed
from ..base import Backend, image_list
from .graph import READER, first_undecodable, simsiam_pipeline
from .png_copies import dali_sources


class DaliDecodeError(ValueError):
    """DALI stopped on a file it could not read (one line naming it): a data problem, not a bug."""


def dali_placement(device: torch.device, cpu_decode: bool = False) -> tuple[int | None, str, str]:
    """Where DALI decodes and augments for a training ``device``: the one place that decides.

    Returns:
        ``(device_id, decode_device, op_device)``: ``(None, "cpu", "cpu")`` for a CPU device;
        ``(gpu index, "mixed", "gpu")`` for CUDA; ``(gpu index, "cpu", "gpu")`` for CUDA with
        ``cpu_decode``.

    Raises:
        ValueError: ``device`` is neither CPU nor CUDA, or is CUDA and DALI sees no such GPU
            (one sentence, no DALI trace).
    """
    if device.type == "cpu":
        return None, "cpu", "cpu"
    if device.type != "cuda":
        raise ValueError(f"--loader dali delivers batches on the CPU or a CUDA GPU, not on {device}")
    count = dali_backend.GetCUDADeviceCount()
    index = torch.cuda.current_device() if device.index is None and count else (device.index or 0)
    if count == 0 or index >= count:
        raise ValueError(f"--loader dali was asked to decode and augment on {device}, but DALI sees "
                         f"{count} CUDA GPU(s); use --device cpu (DALI then runs on the CPU)")
    return index, ("cpu" if cpu_decode else "mixed"), "gpu"


def configure_dali(backend: Backend, feed: Feed, cpu_decode: bool, hw_decoder_load: float | None,
                   overlap: bool | None = None) -> None:
    """Set what every DALI backend decides from its feed and options: ``device_id``,
    ``decode_device``, ``op_device`` (:func:`dali_placement`), ``hw_decoder_load``, ``workers``
    (DALI CPU threads, at least 1), ``prefetch`` (DALI's ``prefetch_queue_depth``, default 2) and
    ``overlap`` (None: overlap, DALI's default; see :func:`executor_args`).

    Warns:
        UserWarning: ``cpu_decode`` with a CPU device (it changes nothing).

    Raises:
        ValueError: see :func:`dali_placement`; ``hw_decoder_load`` outside [0, 1].
    """
    backend.device_id, backend.decode_device, backend.op_device = dali_placement(backend.device, cpu_decode)
    if cpu_decode and backend.device.type == "cpu":
        warnings.warn("--dali-cpu-decode does nothing without a GPU: DALI already decodes and augments on the "
                      "CPU here", stacklevel=3)
    if hw_decoder_load is not None and not 0.0 <= hw_decoder_load <= 1.0:
        raise ValueError(f"hw_decoder_load must be a share in [0, 1], got {hw_decoder_load}")
    backend.hw_decoder_load = hw_decoder_load
    backend.workers, backend.prefetch = max(1, feed.workers), feed.prefetch_or(2)
    backend.overlap = True if overlap is None else bool(overlap)


def executor_args(backend: Backend) -> dict:
    """``pipeline_def`` keywords for how DALI runs beside the training step.

    ``backend.overlap`` True: DALI's default, pipelined and asynchronous, ``prefetch`` batches ahead: its
    threads prepare the next batches while the step runs. False: synchronous, one batch deep: each batch
    is made inside the ``next()`` that asks for it, on DALI's threads, while the step waits. Both give the
    same batches. On a CPU step, which keeps every core busy, serial was tried as a cure for DALI's threads
    competing with the step and was slower (docs/default-run.md, "Is it input-bound?"): overlap stays
    the default everywhere.
    """
    if backend.overlap:
        return dict(exec_async=True, exec_pipelined=True, prefetch_queue_depth=backend.prefetch)
    return dict(exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)


def delivered_view(x: torch.Tensor, backend: Backend) -> torch.Tensor:
    """A DALI view output as the training loop wants it: NHWC memory seen as NCHW channels_last (no
    copy) when the backend asked DALI for ``HWC``, then the backend's device and dtype."""
    if backend.channels_last:
        x = x.permute(0, 3, 1, 2)
    return to_training_layout(x, backend.device, backend.channels_last, backend.dtype)
def release_freed_heap() -> None:
    """Return the C heap's free memory to the OS (glibc ``malloc_trim(0)``; elsewhere nothing).

    Every epoch builds a new DALI pipeline, and destroying it frees all of its memory (no pipeline
    object outlives its epoch), but glibc keeps the freed blocks: measured here on the CPU, the
    process's resident memory rose by 0.25-0.45 MiB per rebuild, 48 MiB over 200 rebuilds, with
    no end in sight; with ``malloc_trim(0)`` after each rebuild it stayed flat (within 1 MiB). One
    call per epoch costs milliseconds.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _name_the_file(exc: Exception, files: list[str]) -> str | None:
    """The file a DALI error message names ("Failed to decode sample #i : <path>"), if one of ``files``."""
    text = str(exc)
    named = [f for f in set(files) if f in text]
    return max(named, key=len) if named else None  # the longest: a/10.jpg, not its prefix a/1.jpg


def _is_input_error(exc: Exception) -> bool:
    """Whether a DALI error comes from reading or decoding a file or shard (else it is a bug to surface as is)."""
    return any(op in str(exc) for op in ("fn.decoders.image", "fn.readers.file", "fn.readers.webdataset"))


class DaliLoader(Backend):
    """Two-view batches from an ImageFolder split through an NVIDIA DALI pipeline.

    Args:
        source: an ImageFolder split (:class:`ImageList`; labels are its ``class_to_idx``,
            identical to the torch loader's).
        aug: augmentation parameters.
        feed: batch size per rank; ``device`` where batches are delivered and, for CUDA, where
            DALI decodes and augments; ``workers`` DALI CPU threads (``num_threads``; 0 is treated
            as 1); ``channels_last`` (DALI writes NHWC and the loader returns the NCHW permutation
            of it, a view, no copy); seed, rank, world size (see :mod:`pipeline.sampling`: rank
            ``r`` reads shard ``r`` of ``world_size`` disjoint shards; ``device`` is the local GPU);
            ``dtype`` (float32 and float16 are written by DALI directly; others are cast after
            DALI); ``prefetch``, DALI's ``prefetch_queue_depth`` (default 2, DALI's documented
            default; on a GPU each extra batch holds two views of GPU memory).
        cpu_decode: decode on the CPU even when ``device`` is a GPU (ops still on the GPU). With a
            CPU ``device`` everything already runs on the CPU: a warning says the option does nothing.
        hw_decoder_load: GPU (``mixed``) decoding only: the share of images for the hardware JPEG
            decoder, in [0, 1] (None: ``MIXED_DECODER_ARGS``'s; see :mod:`pipeline.backends.dali.graph`).
        overlap: run DALI beside the training step (pipelined, asynchronous, ``prefetch`` deep; None, the
            default) or serially inside ``next()`` (:func:`executor_args`).

    Yields:
        :class:`TwoViewBatch`: views ``(B, 3, S, S)``, label ``(B,)`` int64, all on ``device``.

    Attributes:
        paths: per sample of ``images``, the file DALI reads (the sample, or its PNG copy).
        converted: ``(path, kind)`` of the samples read from a PNG copy (see :mod:`pipeline.sources.formats`).

    Warns:
        UserWarning: some files are read from PNG copies (names the first few and the count).

    Raises:
        ValueError: a source that is not an ImageFolder split; batch size larger than this rank's
            shard; bad rank / world size; a CUDA ``device`` DALI cannot see (see :func:`dali_placement`); ``hw_decoder_load`` outside [0, 1].
        OSError: a PNG copy cannot be written.
        DaliDecodeError: (while iterating) DALI could not decode a file; the message names it.
    """

    name = "dali"

    def __init__(self, source, aug: AugmentConfig, feed: Feed, cpu_decode: bool = False,
                 hw_decoder_load: float | None = None, overlap: bool | None = None):
        super().__init__(image_list(source, self.name), aug, feed)
        self.images = self.source
        configure_dali(self, feed, cpu_decode, hw_decoder_load, overlap)
        self.num_samples = len(self.images) // self.world_size
        self._len = check_batch_size(self.batch_size, self.num_samples, f"shard {self.rank} of {self.images.root}")
        self.paths, self.converted = dali_sources(self.images)
        if self.converted:
            kinds = sorted({k for _, k in self.converted})
            names = "; ".join(p for p, _ in self.converted[:3])
            more = f" and {len(self.converted) - 3} more" if len(self.converted) > 3 else ""
            warnings.warn(f"DALI cannot decode {len(self.converted)} file(s) of {self.images.root} as PIL does "
                          f"({', '.join(kinds)}); it reads lossless PNG copies of them made with PIL: "
                          f"{names}{more}", stacklevel=2)

    def epoch_files(self, epoch: int, start: int = 0) -> tuple[list[str], list[int]]:
        """Files (as DALI reads them, see ``paths``) and labels of batches ``start..len(self)-1`` of
        ``epoch`` on this rank, in order: ``(len(self) - start) * batch_size`` of them."""
        order = self.images.epoch_indices(self.seed, epoch, self.rank, self.world_size)
        order = order[start * self.batch_size:self._len * self.batch_size]
        return [self.paths[i] for i in order], [self.images.samples[i][1] for i in order]

    def _build(self, files: list[str], labels: list[int]):
        out_dtype = "float16" if self.dtype == torch.float16 else "float32"
        pipe = simsiam_pipeline(
            files, labels, self.aug, self.decode_device, self.op_device,
            "HWC" if self.channels_last else "CHW", out_dtype, self.hw_decoder_load,
            batch_size=self.batch_size, num_threads=self.workers, device_id=self.device_id,
            seed=epoch_seed(self.seed, self.epoch, self.rank) % 2**31, **executor_args(self))
        pipe.build()
        return DALIGenericIterator(pipe, ["view1", "view2", "label"], reader_name=READER,
                                   last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)

    def __iter__(self):
        files, labels = self.epoch_files(self.epoch, self.start)
        if not files:  # resumed after the epoch's last batch
            return
        try:
            iterator = self._build(files, labels)  # runs the first batches already
        except RuntimeError as exc:
            if not _is_input_error(exc):
                raise
            raise self._decode_error(exc, files) from exc
        try:
            for step in range(self._len - self.start):
                try:
                    out = next(iterator)[0]
                except StopIteration:  # cannot happen with a whole-batch file list; never yield short
                    raise RuntimeError(f"DALI ended epoch {self.epoch} early") from None
                except RuntimeError as exc:
                    if not _is_input_error(exc):
                        raise
                    raise self._decode_error(exc, files, step * self.batch_size) from exc
                # labels are DALI's CPU memory, seen through DLPack: converted on the host into a tensor of
                # our own before the non-blocking upload, so DALI may reuse its buffer at once
                label = out["label"].reshape(-1).to(torch.int64, copy=True).to(self.device, non_blocking=True)
                yield TwoViewBatch(delivered_view(out["view1"], self), delivered_view(out["view2"], self), label)
        finally:
            del iterator
            release_freed_heap()  # the epoch's pipeline is gone: give its freed memory back (see the function)

    def _decode_error(self, exc: RuntimeError, files: list[str], start: int = 0) -> DaliDecodeError:
        """A one-paragraph error naming the file DALI stopped on: from DALI's message, or else by
        decoding this epoch's files one by one from ``start`` (the first not yet delivered)."""
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        after = lines.index("encountered:") + 1 if "encountered:" in lines else 0
        cause = lines[after] if after < len(lines) else type(exc).__name__
        name = _name_the_file(exc, files) or first_undecodable(files[start:])
        where = f"file {name}" if name else f"a file of {self.images.root}"
        return DaliDecodeError(f"DALI could not read {where} in epoch {self.epoch} ({cause}); "
                               f"remove or re-encode that file (it passed the PIL check or changed after it)")
