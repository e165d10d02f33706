"""The DALI graph of the SimSiam recipe: read once, decode once, augment twice.

One reader — ``fn.readers.file`` over an explicit file list (:func:`simsiam_pipeline`), or
``fn.readers.webdataset`` over tar shards with per-epoch indexes (:func:`simsiam_shard_pipeline`);
the caller fixes the order either way —, one decoder, and two independent branches of random ops,
one per view, each with its own random draws:

    random_resized_crop → p=jitter_p color_twist → p=grayscale_p grey (luma, 3 channels)
    → p=blur_p gaussian_blur
    → crop_mirror_normalize (flip with p=flip_p, mean/std, dtype, layout)

Per-sample "apply with probability p" uses ``@pipeline_def(enable_conditionals=True)`` with
``if fn.random.coin_flip(probability=p):`` (DALI docs, "Conditional execution"); multiplying
parameters by a coin instead would blur or jitter every sample.

Known differences from torchvision's ``ColorJitter`` (documented, not tested as equal):
``fn.color_twist`` applies brightness, contrast, saturation and hue in one fixed order (torchvision
draws a random order), and its contrast pivots on a fixed grey (DALI docs: contrast 0 gives "a
uniform grey image"; ``fn.contrast``'s centre is mid-range) rather than on the image's mean grey. The
crop, flip, grey and blur draws follow the same distributions; ``tests/test_dali_loader.py``
checks crop area, aspect ratio, flip and grey rates against the torch loader.
"""
from __future__ import annotations

import math

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from ...augment import AugmentConfig

READER = "Reader"

# GPU (mixed) decoder settings. nvJPEG's buffer paddings are DALI's ResNet-50 PyTorch example's
# (docs/examples/use_cases/pytorch/resnet50/main.py: 211025920 device, 140544512 host bytes), and
# the preallocation hints (5980 x 6430) are the largest ImageNet image, as DALI's ResNet-50
# TensorFlow and Paddle examples set them, so nvJPEG and the hardware decoder never reallocate
# mid-training.
# hw_decoder_load is the share of images sent to the hardware JPEG decoder (A100, H100 and H200
# carry one: 5 NVJPG engines on A100, 7 on H100/H200 by NVIDIA's H100 whitepaper); the rest go to the
# hybrid CUDA + CPU-thread path. DALI's guidance (fn.decoders.image docs): the best share depends on
# the pipeline's CPU thread count and is to be found by measurement. DALI's own measurement
# (NVIDIA/DALI#6366, EfficientNet training, batch 256): 0.90 gave +1.8% iterations/s over 0.65
# with a longer decode tail, and DALI kept 0.65 as the default.
# We ship DALI's default until the H200 run (bench/gpu_check.sh, section "variants", which times
# 0.65, 0.9 and 1.0 at batch 256) shows which share feeds the model best; DaliLoader(hw_decoder_load=)
# overrides it.
MIXED_DECODER_ARGS = dict(
    device_memory_padding=211025920,
    host_memory_padding=140544512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
    hw_decoder_load=0.65,
)

_DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}


def _factor(strength: float):
    """A jitter factor ~ U[max(0, 1 - s), 1 + s] per sample (torchvision ColorJitter's rule); 1 if s = 0."""
    if strength <= 0:
        return 1.0
    return fn.random.uniform(range=[max(0.0, 1 - strength), 1 + strength])


def _blur_window(aug: AugmentConfig) -> dict:
    """``gaussian_blur``'s window: DALI's own per-sample ``2 * ceil(3 * sigma) + 1`` (DALI docs) when
    the torch loader's fixed ``aug.blur_kernel`` holds all of it (23 px at 224 px holds sigma = 2's
    13 taps: the extra taps weigh < 0.3%, and the fitted window blurs ~1.8x faster on CPU);
    else ``aug.blur_kernel`` itself, truncating the kernel exactly as the torch loader does."""
    if aug.blur_kernel >= 2 * math.ceil(3 * aug.blur_sigma[1]) + 1:
        return {}
    return {"window_size": aug.blur_kernel}


def one_view(images, aug: AugmentConfig, layout: str, dtype: str):
    """One SimSiam view of a batch of decoded images (a DALI graph fragment).

    Args:
        images: DALI ``DataNode`` of ``HWC`` uint8 RGB images (any size, CPU or GPU).
        aug: recipe parameters; hue is converted from a fraction of a turn to degrees, the unit
            ``fn.color_twist`` takes (DALI docs: "hue: Hue change, in degrees").
        layout: ``"CHW"`` or ``"HWC"`` output layout.
        dtype: ``"float32"`` or ``"float16"``.

    Returns:
        ``DataNode`` of ``(3, S, S)`` (or ``(S, S, 3)``) normalised floats: ``(x/255 - mean) / std``.
    """
    v = fn.random_resized_crop(images, size=[aug.size, aug.size], random_area=list(aug.crop_scale),
                               random_aspect_ratio=list(aug.crop_ratio), num_attempts=10, antialias=True)
    if aug.jitter_p > 0:
        if fn.random.coin_flip(probability=aug.jitter_p):
            v = fn.color_twist(
                v,
                brightness=_factor(aug.brightness),
                contrast=_factor(aug.contrast),
                saturation=_factor(aug.saturation),
                hue=fn.random.uniform(range=[-aug.hue * 360.0, aug.hue * 360.0]) if aug.hue > 0 else 0.0,
            )
    if aug.grayscale_p > 0:
        if fn.random.coin_flip(probability=aug.grayscale_p):
            # ITU-R 601 luma (0.299, 0.587, 0.114: torchvision's rgb_to_grayscale and PIL's "L")
            # copied to 3 channels. Measured here: equal to PIL's grey within 1 level, and 1.4x
            # faster on CPU than fn.hsv(saturation=0), whose channels differ by a level or two.
            grey = fn.color_space_conversion(v, image_type=types.RGB, output_type=types.GRAY)
            v = fn.cat(grey, grey, grey, axis=2)
    if aug.blur_p > 0:
        if fn.random.coin_flip(probability=aug.blur_p):
            v = fn.gaussian_blur(v, sigma=fn.random.uniform(range=list(aug.blur_sigma)), **_blur_window(aug))
    return fn.crop_mirror_normalize(
        v, mirror=fn.random.coin_flip(probability=aug.flip_p), dtype=_DALI_DTYPES[dtype],
        output_layout=layout, mean=[m * 255 for m in aug.mean], std=[s * 255 for s in aug.std])


def decode_two_views(encoded, aug: AugmentConfig, decode_device: str, op_device: str, layout: str, dtype: str,
                     hw_decoder_load: float | None = None):
    """Decode ``encoded`` once (``fn.decoders.image`` to RGB on ``decode_device``) and return its two
    views (:func:`one_view`, ops on ``op_device``): a graph fragment shared by both readers."""
    extra = dict(MIXED_DECODER_ARGS) if decode_device == "mixed" else {}
    if decode_device == "mixed" and hw_decoder_load is not None:
        extra["hw_decoder_load"] = hw_decoder_load
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, **extra)
    if op_device == "gpu" and decode_device == "cpu":
        images = images.gpu()
    return one_view(images, aug, layout, dtype), one_view(images, aug, layout, dtype)


@pipeline_def(enable_conditionals=True)
def simsiam_pipeline(files: list[str], labels: list[int], aug: AugmentConfig, decode_device: str,
                     op_device: str, layout: str, dtype: str, hw_decoder_load: float | None = None):
    """Two views of every file in ``files``, read in exactly that order.

    Args:
        files, labels: absolute paths and class indices, read in list order (no reader shuffle,
            no reader sharding: the caller puts this rank's epoch order in the list).
        aug: recipe parameters.
        decode_device: ``"mixed"`` (nvJPEG on the GPU) or ``"cpu"``.
        op_device: ``"gpu"`` or ``"cpu"``: where the augmentation ops run.
        layout, dtype: see :func:`one_view`.
        hw_decoder_load: ``mixed`` only: share of images for the hardware JPEG decoder (None:
            :data:`MIXED_DECODER_ARGS`'s).

    Pipeline-level ``batch_size``, ``num_threads``, ``device_id``, ``seed`` and
    ``prefetch_queue_depth`` are the keyword arguments of ``pipeline_def``.

    Returns (per batch of ``B``): view1, view2 as in :func:`one_view`; label ``(B, 1)`` int32.
    """
    encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name=READER)
    view1, view2 = decode_two_views(encoded, aug, decode_device, op_device, layout, dtype, hw_decoder_load)
    return view1, view2, label


SHARD_EXTS = ["jpg;png", "cls"]
"""``fn.readers.webdataset``'s ``ext``: the image (the writer stores ``jpg``, or ``png`` re-encoded) and the class."""

LABEL_BYTES = 12
"""Bytes of a ``.cls`` component kept for the label (an 11-digit class index and a 0 that shows it
ended): the text is padded with zeros, or cut, to this width so every batch is one uniform tensor."""


@pipeline_def(enable_conditionals=True)
def simsiam_shard_pipeline(paths: list[str], index_paths: list[str], aug: AugmentConfig, decode_device: str,
                           op_device: str, layout: str, dtype: str, hw_decoder_load: float | None = None,
                           dont_use_mmap: bool = False):
    """Two views of every sample the indexes list, read by DALI's ``fn.readers.webdataset`` in
    exactly that order.

    Args:
        paths, index_paths: tar files and, one each, a DALI v1.2 index listing the samples to read
            from it, in order (the caller writes them per epoch: this rank's samples, no reader
            shuffle, no reader sharding).
        aug, decode_device, op_device, layout, dtype, hw_decoder_load: see :func:`simsiam_pipeline`.
        dont_use_mmap: plain reads instead of mapping the tars (DALI's advice for network
            filesystems).

    The reader runs with ``missing_component_behavior="error"`` (a sample without its image or
    ``.cls`` stops the build) and ``pad_last_batch=True`` (never a short batch; the caller's count
    is a whole number of batches anyway).

    Returns (per batch of ``B``): view1, view2 as in :func:`one_view`; label ``(B, LABEL_BYTES)``
    uint8 on the CPU: the ``.cls`` text, zero-padded (see :data:`LABEL_BYTES`).
    """
    encoded, cls = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=SHARD_EXTS,
                                         missing_component_behavior="error", random_shuffle=False,
                                         pad_last_batch=True, dont_use_mmap=dont_use_mmap, name=READER)
    view1, view2 = decode_two_views(encoded, aug, decode_device, op_device, layout, dtype, hw_decoder_load)
    label = fn.slice(cls, start=[0], shape=[LABEL_BYTES], axes=[0], out_of_bounds_policy="pad", fill_values=0)
    return view1, view2, label


@pipeline_def(batch_size=1, num_threads=1, exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
def _decode_each(files: list[str]):
    encoded, _ = fn.readers.file(files=files, random_shuffle=False)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


@pipeline_def(batch_size=1, num_threads=1, exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
def _decode_bytes():
    data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
    return fn.decoders.image(data, device="cpu", output_type=types.RGB)


def first_undecodable_bytes(items) -> int | None:
    """Position in ``items`` (an iterable of encoded images as ``bytes``) of the first one DALI's CPU
    decoder cannot decode, or None if all decode: a synchronous batch-of-one pipeline, one item per
    ``run()``. Used only after a shard pipeline stopped without naming its sample."""
    pipe = None
    for i, data in enumerate(items):
        if pipe is None:
            pipe = _decode_bytes(device_id=None)
            pipe.build()
        try:
            pipe.feed_input("data", [np.frombuffer(data, dtype=np.uint8)])
            pipe.run()
        except RuntimeError:
            return i
    return None


def first_undecodable(files: list[str], device_id: int | None = None) -> str | None:
    """The first of ``files`` DALI's CPU decoder cannot decode, or None if all decode.

    Runs a synchronous batch-of-one DALI pipeline (one file per ``run()``), so the failing run
    is the failing file. Used only after a pipeline error that does not name its file; cost is
    one CPU decode per file up to the bad one.
    """
    if not files:
        return None
    pipe = _decode_each(files, device_id=device_id)
    pipe.build()
    for path in files:
        try:
            pipe.run()
        except RuntimeError:
            return path
    return None
