"""Resize camera frames to the model's square input, fast, with OpenCV only (no ROS, no torch).

The reference is ``cv2.resize(img, (size, size), interpolation=INTER_AREA)`` when shrinking
(either side larger than ``size``) and ``INTER_LINEAR`` otherwise, i.e. what
``ContinualLearner.preprocess`` has always done. Area interpolation of a 640x480 frame to
128x128 is a general (fractional) box filter over all 307,200 pixels: 0.82 ms on one core of
this project's machine. OpenCV has a vectorised special case for an exact 2x area shrink
(0.07 ms for the same frame), so :func:`resize_image` first halves the image with it while
both sides stay at least :data:`MIN_REMAINING_SHRINK` times ``size`` after halving (and are
even, so each halving is exact), then does the remaining fractional area step on a quarter
(or less) of the pixels: 0.37 ms in all.

Exact 2x area steps are exact box averages, so any number of them equals one exact 2^k box;
only the last, fractional step differs from the one-step reference, in how its box edges fall
on the source pixels, and the less it still shrinks the more that shows (640x480 halved, then
to 224: mean 1.85 grey levels; to 128: 0.98; to 80: 0.13). Measured on a noisy 640x480 scene
(sharp-edged discs plus Gaussian noise, sigma 12) against the one-step reference, to 128: mean
absolute difference 0.98 grey levels, 99th percentile 5, maximum 20 (at sharp edges);
:data:`MEAN_ABS_TOLERANCE` and :data:`P99_ABS_TOLERANCE` are the bounds the tests hold it to.
Enlarging, shrinking by less than ``2 * MIN_REMAINING_SHRINK`` and images already
``size`` x ``size`` are exactly the reference.

(An exact 4x shrink to 160x120 followed by bilinear is as fast but has to enlarge 120 rows
to 128, which doubles the error: mean 1.9, maximum 60.)
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

__all__ = ['MEAN_ABS_TOLERANCE', 'MIN_REMAINING_SHRINK', 'P99_ABS_TOLERANCE', 'resize_batch',
           'resize_image']

#: A cheap exact 2x step is taken only while the fractional area step after it still shrinks
#: by at least this much on both sides (below it the two-step result drifts from the
#: reference faster than it saves time).
MIN_REMAINING_SHRINK = 1.5

#: Largest mean absolute difference (grey levels) from the one-step reference on a frame.
MEAN_ABS_TOLERANCE = 1.5
#: Largest 99th percentile of the absolute difference (grey levels) from the reference.
P99_ABS_TOLERANCE = 8.0


def _check(img: np.ndarray, what: str) -> np.ndarray:
    """A uint8 (H, W) or (H, W, 3) view of ``img`` ((H, W, 1) becomes (H, W))."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or img.size == 0 \
            or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f'{what}: expected uint8 (H, W, 3) or (H, W), got {img.dtype} '
                         f'{img.shape}')
    return img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """``img`` resized to ``size`` x ``size`` (area when shrinking, bilinear when enlarging).

    Args:
        img: uint8 (H, W, C) with any C OpenCV resizes (1, 3, 4), or (H, W); strided views
            (e.g. rows of a message buffer with padding) are fine and are not copied first.
        size: the output side in pixels (>= 1).

    Returns:
        A new uint8 array (size, size[, C]); for an input of that size already, a copy.

    Example:
        >>> resize_image(np.zeros((480, 640, 3), np.uint8), 128).shape
        (128, 128, 3)
    """
    if size < 1:
        raise ValueError(f'size must be >= 1, got {size}')
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return np.array(img, copy=True, order='C')
    if h <= size and w <= size:
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    # Exact 2x area halvings (OpenCV's vectorised fast path) while enough shrink is left.
    least = 2 * MIN_REMAINING_SHRINK * size
    while h >= least and w >= least and h % 2 == 0 and w % 2 == 0:
        h, w = h // 2, w // 2
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def resize_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Stack uint8 RGB (H, W, 3) or grey (H, W[, 1]) images as a (N, size, size, 3) batch.

    The learner's preprocessing (``ros2_cbpnet.learning.learner`` re-exports it): grey becomes
    three equal channels; shrinking uses :func:`resize_image`'s exact 2x area steps.

    Raises:
        ValueError: an image is not a non-empty uint8 array of 1 or 3 channels.
    """
    batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        img = _check(img, f'image {i}')
        out = img if img.shape[:2] == (size, size) else resize_image(img, size)
        batch[i] = out[:, :, None] if out.ndim == 2 else out
    return batch
