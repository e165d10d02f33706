"""Crop and resize many boxes of differently sized images with a few ``roi_align`` calls.

``torchvision.ops.roi_align`` crops and resizes any number of boxes in one kernel, but wants the
images as one ``(N, C, H, W)`` tensor. A batch of decoded photos differs in size, so images are
put into canvases: :func:`plan_groups` forms groups on the host from the decoded sizes (tensor
shapes are host metadata: no device read), so that padding adds at most ``max_pad`` × the group's
pixels; each group is one canvas and one ``roi_align`` call. ``max_pad = 0`` groups equal sizes
only; ``float('inf')`` puts the whole batch in one canvas (see the README's
``--loader torchvision-gpu`` section for the measurement behind the default).

Resampling: ``roi_align(aligned=True, sampling_ratio=0)`` averages ``⌈box/size⌉`` bilinear
samples per output pixel and axis, at bin centres, with pixel centres at half-integers as in
torchvision's ``resize`` — an area filter when shrinking, plain bilinear when enlarging
(torchvision ``ops/roi_align.py`` docs; compared with ``resize(antialias=True)`` in the tests).
Samples past the last pixel centre are clamped to the image edge by ``roi_align`` only at the
canvas edge, so a padded canvas repeats each image's last row and column once (a 1-pixel
replicate border) to give the same edge behaviour inside a canvas.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import roi_align


def plan_groups(shapes: list[tuple[int, int]], max_pad: float) -> list[list[int]]:
    """Group image indices so that each group's canvas wastes at most ``max_pad`` of its pixels.

    Images are taken in order of ``(height, width)`` and added to the current group while the
    canvas ``count × max height × max width`` stays within ``(1 + max_pad) ×`` the group's pixels.

    Args:
        shapes: ``(height, width)`` per image.
        max_pad: allowed padding as a fraction of the real pixels (0: equal sizes only).

    Returns:
        Lists of indices into ``shapes``; every index appears exactly once.
    """
    order = sorted(range(len(shapes)), key=lambda i: shapes[i])
    groups: list[list[int]] = []
    hmax = wmax = pixels = 0
    for i in order:
        h, w = shapes[i]
        if groups:
            nh, nw, npx = max(hmax, h), max(wmax, w), pixels + h * w
            if (len(groups[-1]) + 1) * nh * nw <= (1 + max_pad) * npx:
                groups[-1].append(i)
                hmax, wmax, pixels = nh, nw, npx
                continue
        groups.append([i])
        hmax, wmax, pixels = h, w, h * w
    return groups


def _canvas(images: list[torch.Tensor], index: list[int], sizes: torch.Tensor) -> torch.Tensor:
    """``(m, C, Hc, Wc)`` float32 canvas of ``images[index]`` with a 1-pixel replicate border.

    ``sizes``: ``(m, 3)`` int64 on the device: flat offset, height, width of each image in the
    concatenation of the group's images. Built with one ``cat`` (every image's pixels), one
    ``index_select`` of rows (each canvas row is a window of the flat pixels starting at that image
    row; rows past an image's bottom repeat its last row) and one ``index_put`` (the column after
    each image's last column repeats it): no per-image device op, no host read.
    """
    group = [images[i] for i in index]
    c = group[0].shape[0]
    hc = max(im.shape[1] for im in group) + 1
    wc = max(im.shape[2] for im in group) + 1
    flat = torch.cat([im.reshape(-1) for im in group] + [group[0].new_zeros(wc)])
    off, h, w = sizes[:, 0:1, None], sizes[:, 1:2, None], sizes[:, 2:3, None]
    ch = torch.arange(c, device=sizes.device).view(1, c, 1)
    row = torch.arange(hc, device=sizes.device).view(1, 1, hc)
    starts = off + ch * h * w + torch.minimum(row, h - 1) * w  # (m, C, Hc)
    canvas = flat.unfold(0, wc, 1).index_select(0, starts.reshape(-1)).view(len(group), c, hc, wc)
    b = torch.arange(len(group), device=sizes.device).view(-1, 1, 1)
    canvas[b, ch, row, w] = canvas[b, ch, row, w - 1]
    return canvas.float()


def crop_resize(images: list[torch.Tensor], boxes: np.ndarray, size: int, max_pad: float = 0.0) -> torch.Tensor:
    """Crop ``V`` boxes from each of ``n`` images and resize each crop to ``size × size``.

    Args:
        images: ``n`` tensors ``(C, H_i, W_i)`` uint8 (or float), contiguous, all on one device.
        boxes: ``(V, n, 4)`` ``x0, y0, x1, y1`` in pixels of each image (float or int; box ``v``
            of image ``i`` is ``boxes[v, i]``).
        size: output side in pixels.
        max_pad: padding allowed per canvas (see :func:`plan_groups`).

    Returns:
        ``(V·n, C, size, size)`` float32 on the images' device, pixel values in the input's units
        (0-255 for uint8); row ``v·n + i`` is box ``v`` of image ``i``.

    The boxes, the canvas layout and the output order go to the device as three small
    non-blocking copies (from pinned memory on CUDA); nothing is read back.
    """
    device = images[0].device
    n_views, n = boxes.shape[0], len(images)
    groups = plan_groups([(int(im.shape[1]), int(im.shape[2])) for im in images], max_pad)
    rois = np.empty((n_views * n, 5), np.float32)
    layout = np.empty((n, 3), np.int64)  # per image in group order: flat offset in its group, h, w
    source = np.empty(n_views * n, np.int64)  # output row → row of the concatenated group outputs
    at = 0
    for g in groups:
        m = len(g)
        for v in range(n_views):
            rows = slice(at * n_views + v * m, at * n_views + (v + 1) * m)
            rois[rows, 0] = np.arange(m)
            rois[rows, 1:] = boxes[v, g]
            source[v * n + np.asarray(g)] = np.arange(rows.start, rows.stop)
        hw = np.array([images[i].shape[1:] for i in g], np.int64).reshape(m, 2)
        px = images[g[0]].shape[0] * hw[:, 0] * hw[:, 1]
        layout[at:at + m] = np.column_stack([np.concatenate([[0], np.cumsum(px)[:-1]]), hw])
        at += m
    rois_d, layout_d, source_d = (to_device_async(a, device) for a in (rois, layout, source))
    outputs, at = [], 0
    for g in groups:
        m = len(g)
        same = all(images[i].shape == images[g[0]].shape for i in g)
        canvas = torch.stack([images[i] for i in g]).float() if same else _canvas(images, g, layout_d[at:at + m])
        outputs.append(roi_align(canvas, rois_d[at * n_views:(at + m) * n_views], output_size=size,
                                 spatial_scale=1.0, sampling_ratio=0, aligned=True))
        at += m
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    if len(groups) == 1 and groups[0] == list(range(n)):
        return out  # already in output order
    return out.index_select(0, source_d)


def to_device_async(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array as a tensor on ``device`` without blocking the host: pinned and copied
    non-blocking on CUDA (a pageable or blocking copy would wait for the GPU), shared on the CPU."""
    t = torch.from_numpy(a)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
