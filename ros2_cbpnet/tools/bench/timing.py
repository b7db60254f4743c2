"""Shared pieces of ``cbpnet-bench``: synthetic frames and tasks, interleaved timing rounds
with device synchronisation and per-item CUDA peak memory, and small statistics."""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

BATCH_SIZES = (1, 8)
FRAME_HW = (480, 640)  # a 640x480 camera
CAMERA_RATE_HZ = 30.0


def log(msg: str) -> None:
    """A progress line on stderr (stdout may carry the JSON)."""
    print(f'[cbpnet-bench] {msg}', file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    """The median as a float."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much the rounds of one figure disagree."""
    med = median(values)
    return float((max(values) - min(values)) / med) if med > 0 else 0.0


def percentiles(values: Sequence[float]) -> Dict[str, Any]:
    """n, p50, p95, mean and max of ``values`` (None when empty), rounded to 0.01."""
    if not values:
        return {'n': 0, 'p50': None, 'p95': None, 'mean': None, 'max': None}
    arr = np.asarray(values, dtype=np.float64)
    return {'n': int(arr.size), 'p50': round(float(np.percentile(arr, 50)), 2),
            'p95': round(float(np.percentile(arr, 95)), 2),
            'mean': round(float(arr.mean()), 2), 'max': round(float(arr.max()), 2)}


def synthetic_frame(rng: np.random.Generator, hw: Tuple[int, int], pattern: int,
                    noise: int = 56) -> np.ndarray:
    """A uint8 RGB frame: a class-specific colour gradient with noise (not random junk, so
    resizing and the backbone see image-like statistics)."""
    h, w = hw
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    hue = (pattern * 0.37) % 1.0
    freq = 1 + pattern % 5
    r = 0.5 + 0.5 * np.sin(2 * np.pi * (freq * x + hue))
    g = 0.5 + 0.5 * np.cos(2 * np.pi * (freq * y - hue))
    b = (x * y + hue) % 1.0
    img = np.stack([r * np.ones_like(y), g * np.ones_like(x), b], axis=-1) * 200.0
    if noise:
        img += rng.integers(0, noise, size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_task(rng: np.random.Generator, classes: Sequence[str], n_images: int,
                   hw: Tuple[int, int] = FRAME_HW, distinct_per_class: int = 8,
                   first_pattern: int = 0) -> Tuple[List[np.ndarray], List[str]]:
    """``n_images`` labelled frames spread evenly over ``classes``.

    Only ``distinct_per_class`` frames per class are distinct arrays (the rest repeat them)
    to keep the benchmark's own memory small; the learner treats every entry as a sample.
    """
    pool = {c: [synthetic_frame(rng, hw, first_pattern + 7 * i + j)
                for j in range(distinct_per_class)] for i, c in enumerate(classes)}
    images, labels = [], []
    for k in range(n_images):
        c = classes[k % len(classes)]
        images.append(pool[c][(k // len(classes)) % distinct_per_class])
        labels.append(c)
    return images, labels


class Pacer:
    """Publish times of ``cameras`` cameras at ``rate_hz`` each, with evenly spread phases.

    Call :meth:`wait` after each publish: it sleeps until the next one is due. A publisher
    that fell more than one tick behind starts afresh instead of bursting to catch up (a
    burst would measure the transport's queue, not the subscriber).
    """

    def __init__(self, rate_hz: float, cameras: int = 1) -> None:
        self.tick = 1.0 / (rate_hz * cameras)
        self._next = time.perf_counter()

    def wait(self) -> None:
        """Sleep until the next publish is due."""
        self._next += self.tick
        delay = self._next - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        elif delay < -self.tick:
            self._next = time.perf_counter()


class DeviceClock:
    """Synchronises the device around timers and reads CUDA peak memory (no-ops on CPU).

    CUDA kernels run asynchronously: a timer stopped without ``torch.cuda.synchronize`` would
    time the launches, not the work.
    """

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.is_cuda = self.device.type == 'cuda'

    def sync(self) -> None:
        """Wait for all queued device work."""
        if self.is_cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        """Start a new CUDA peak-allocation window."""
        if self.is_cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> Optional[float]:
        """CUDA peak allocation since :meth:`reset_peak`, in MiB (None on CPU)."""
        if not self.is_cuda:
            return None
        self.sync()
        return round(self.torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)


class Rounds:
    """Interleaved timing: within each round every item runs in short sub-slices that take
    turns, so all items of a round see the same stretch of machine time.

    Items are ``(name, fn, items_per_call)``. One round gives each item about ``slice_s``
    seconds, cut into sub-slices of ``SUB_SLICE_S`` (each at least one call) that alternate
    between the items; the item's sample is items per second over all its sub-slices of the
    round. A burst of load from another process therefore hits every item of the round about
    equally, and the per-round ratios (see :func:`ratio`) cancel it. On CUDA every timed call
    ends with a device synchronisation, and each item's warm-up runs in its own CUDA
    peak-memory window (``peak_mb``).
    """

    SUB_SLICE_S = 0.1

    def __init__(self, repeats: int, slice_s: float, warmup_s: float,
                 clock: DeviceClock) -> None:
        self.repeats, self.slice_s, self.warmup_s, self.clock = repeats, slice_s, warmup_s, clock
        self.samples: Dict[str, List[float]] = {}
        self.peak_mb: Dict[str, float] = {}

    def timed(self, fn: Callable[[], Any], min_s: float, min_calls: int) -> Tuple[int, float]:
        """Run ``fn`` until ``min_s`` passed and ``min_calls`` were made: (calls, seconds)."""
        calls = 0
        self.clock.sync()
        t0 = time.perf_counter()
        while True:
            fn()
            calls += 1
            self.clock.sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s and calls >= min_calls:
                return calls, elapsed

    def warm(self, name: str, fn: Callable[[], Any], min_calls: int = 2) -> float:
        """Warm ``fn`` up (records its CUDA peak memory); returns seconds per call."""
        self.clock.reset_peak()
        c, t = self.timed(fn, self.warmup_s, min_calls)
        peak = self.clock.peak_mb()
        if peak is not None:
            self.peak_mb[name] = peak
        return t / c

    def run(self, items: Sequence[Tuple[str, Callable[[], Any], int]]
            ) -> Dict[str, List[float]]:
        """Time ``items`` over ``repeats`` rounds; returns all samples so far (items/s)."""
        slowest = max(self.warm(name, fn) for name, fn, _ in items)
        # Sub-slices no shorter than the slowest call, so a round stays about
        # len(items) * slice_s long even when calls are slow (a busy machine).
        subs = max(1, min(int(round(self.slice_s / self.SUB_SLICE_S)),
                          int(self.slice_s / max(slowest, 1e-9))))
        for r in range(self.repeats):
            calls = {name: 0 for name, _, _ in items}
            secs = {name: 0.0 for name, _, _ in items}
            for k in range(subs):
                order = list(items) if (r * subs + k) % 2 == 0 else list(reversed(items))
                for name, fn, _ in order:
                    c, t = self.timed(fn, self.slice_s / subs, 1)
                    calls[name] += c
                    secs[name] += t
            for name, _, n in items:
                self.samples.setdefault(name, []).append(calls[name] * n / secs[name])
        return self.samples


def ratio(samples: Dict[str, List[float]], num: str, den: str, scale: float = 1.0) -> float:
    """Median over rounds of num/den (the per-round pairing cancels machine drift)."""
    return median([a / (b * scale) for a, b in zip(samples[num], samples[den])])
