"""RandomResizedCrop boxes for a whole batch, drawn on the host, and EXIF orientation as box maps.

:func:`random_resized_crop_boxes` is torchvision's ``RandomResizedCrop.get_params`` rule
(torchvision 0.29, ``transforms/v2/_geometry.py``) vectorised over samples: up to 10 tries of
``area ~ U(scale)·H·W``, ``log(aspect) ~ U(log ratio)``, ``w = round(√(area·aspect))``,
``h = round(√(area/aspect))``; the first try with ``0 < w ≤ W`` and ``0 < h ≤ H`` wins and its
corner is uniform over the valid positions; with no valid try, the central crop with the aspect
clamped to ``ratio`` (the whole image when its aspect is inside). Python's ``round`` and numpy's
both round halves to even, so the integer sizes are the same function of the draws.

The draws come from a ``numpy.random.Generator``: drawing on the host needs no device sync, and a
generator seeded per batch makes every box a function of (seed, epoch, rank, batch).

EXIF orientation: a photo whose EXIF tag says it is rotated is stored as ``R`` (``H×W``) but shown
as ``O = flips(transpose?(R))``. A crop of ``O`` is the same transform applied to the crop of ``R``
at the mapped box (:func:`to_stored_frame`), and since views are square, the transform can be
applied to the resized output (:data:`ORIENTATIONS`; EXIF 2.32 §4.6.4 tag 0x0112, checked against
``PIL.ImageOps.exif_transpose`` in the tests).
"""
from __future__ import annotations

import numpy as np

# EXIF orientation → (transpose, flip left-right, flip top-bottom), applied in that order to the
# stored pixels to show the photo upright (PIL: 2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM,
# 5 TRANSPOSE, 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90).
ORIENTATIONS = {
    1: (False, False, False), 2: (False, True, False), 3: (False, True, True), 4: (False, False, True),
    5: (True, False, False), 6: (True, True, False), 7: (True, True, True), 8: (True, False, True),
}
ORIENTATION_FLAGS = np.array([ORIENTATIONS[1]] + [ORIENTATIONS[o] for o in range(1, 9)])  # (9, 3) by EXIF value


def random_resized_crop_boxes(heights: np.ndarray, widths: np.ndarray, scale: tuple[float, float],
                              ratio: tuple[float, float], rng: np.random.Generator, tries: int = 10) -> np.ndarray:
    """One RandomResizedCrop box per sample (torchvision's rule, see the module doc).

    Args:
        heights, widths: ``(n,)`` int image sizes in pixels (as shown, i.e. after EXIF orientation).
        scale: area fraction range, e.g. ``(0.2, 1.0)``.
        ratio: aspect (w/h) range, e.g. ``(3/4, 4/3)``.
        rng: the generator all draws come from.
        tries: draws per sample before the central-crop fallback (10 in torchvision).

    Returns:
        ``(n, 4)`` int64 boxes ``x0, y0, x1, y1`` in pixels (``x1 - x0`` = crop width), inside the image.
    """
    h_img = np.asarray(heights, dtype=np.int64)
    w_img = np.asarray(widths, dtype=np.int64)
    n = len(h_img)
    area = (h_img * w_img).astype(np.float64)[:, None]
    target = area * rng.uniform(scale[0], scale[1], size=(n, tries))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), size=(n, tries)))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= w_img[:, None]) & (h > 0) & (h <= h_img[:, None])
    first = ok.argmax(1)
    rows = np.arange(n)
    w, h, found = w[rows, first], h[rows, first], ok.any(1)
    corner = rng.random((n, 2))
    y0 = np.floor(corner[:, 0] * (h_img - h + 1)).astype(np.int64)
    x0 = np.floor(corner[:, 1] * (w_img - w + 1)).astype(np.int64)
    if not found.all():  # central crop, aspect clamped to the range
        in_ratio = w_img / h_img
        fw = np.where(in_ratio < min(ratio), w_img,
                      np.where(in_ratio > max(ratio), np.round(h_img * max(ratio)), w_img)).astype(np.int64)
        fh = np.where(in_ratio < min(ratio), np.round(w_img / min(ratio)), h_img).astype(np.int64)
        w, h = np.where(found, w, fw), np.where(found, h, fh)
        y0 = np.where(found, y0, (h_img - h) // 2)
        x0 = np.where(found, x0, (w_img - w) // 2)
    return np.stack([x0, y0, x0 + w, y0 + h], 1)


def shown_size(height: int, width: int, orientation: int) -> tuple[int, int]:
    """``(height, width)`` of a stored ``height × width`` image once shown with its EXIF orientation."""
    return (width, height) if ORIENTATIONS[orientation][0] else (height, width)


def to_stored_frame(boxes: np.ndarray, shown_h: np.ndarray, shown_w: np.ndarray,
                    orientation: np.ndarray) -> np.ndarray:
    """Map boxes drawn on the shown (upright) images onto their stored pixels.

    Args:
        boxes: ``(n, 4)`` ``x0, y0, x1, y1`` on the shown images.
        shown_h, shown_w: ``(n,)`` shown sizes.
        orientation: ``(n,)`` EXIF orientation 1-8.

    Returns:
        ``(n, 4)`` boxes on the stored images: cropping there and then applying the orientation's
        transpose / flips to the (square) crop gives the crop of the shown image.
    """
    t, fx, fy = ORIENTATION_FLAGS[np.asarray(orientation)].T
    x0, y0, x1, y1 = (boxes[:, k].copy() for k in range(4))
    x0, x1 = np.where(fx, shown_w - x1, x0), np.where(fx, shown_w - x0, x1)
    y0, y1 = np.where(fy, shown_h - y1, y0), np.where(fy, shown_h - y0, y1)
    return np.stack([np.where(t, y0, x0), np.where(t, x0, y0), np.where(t, y1, x1), np.where(t, x1, y1)], 1)
