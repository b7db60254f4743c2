"""Synthetic camera frames for the soak run, the load tests and the codec and resize tests.

Gradients with filled discs and Gaussian noise: smooth regions, sharp edges and texture, so
resampling and JPEG have something to get wrong, and no data set is needed.
"""
from __future__ import annotations

import numpy as np

__all__ = ['camera_frame', 'scene']


def scene(height: int, width: int, seed: int = 0, *, discs: int = 20,
          min_radius: int = 3, radius_divisor: int = 4, noise: float = 12.0) -> np.ndarray:
    """An ``(height, width, 3)`` uint8 frame: RGB gradients, ``discs`` filled discs of random
    colour (radius from ``min_radius`` up to the height // ``radius_divisor``) and Gaussian
    noise of standard deviation ``noise``; the same ``seed`` gives the same frame."""
    import cv2  # only the frame builders need OpenCV
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (height + width)],
                   -1).astype(np.uint8)
    max_radius = max(min_radius + 1, height // radius_divisor)
    for _ in range(discs):
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.circle(img, (int(rng.integers(width)), int(rng.integers(height))),
                   int(rng.integers(min_radius, max_radius)), colour, -1)
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)


def camera_frame(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth camera-like frame (six large discs, mild noise): what the soak run and the
    load tests stream; ``width`` first, as camera resolutions are written."""
    return scene(height, width, seed, discs=6, min_radius=10, radius_divisor=3, noise=4.0)
