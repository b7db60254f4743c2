"""The labelled-sample buffer that collects training images until a task is learned.

No ROS import here. The node adds samples from several executor threads while the learning
thread takes a snapshot, so every method is thread-safe. Labels are validated here
(:func:`validate_label`) because they arrive from the network: they are only ever used as
class names, never as paths.
"""
from __future__ import annotations

import collections
import threading
import unicodedata
from dataclasses import dataclass
from typing import Deque, Dict, Optional, OrderedDict, Sequence, Tuple

import numpy as np

from ..learning.config import MAX_LABEL_LENGTH
from ..learning.image_resize import resize_image

__all__ = ['BufferSnapshot', 'MAX_LABEL_LENGTH', 'SampleBuffer', 'validate_label']


def validate_label(label: object) -> str:
    """Return the label with surrounding whitespace removed, or raise ``ValueError``.

    Refused: non-strings (e.g. ``bytes``), empty or whitespace-only labels, labels longer than
    :data:`MAX_LABEL_LENGTH` characters, and labels containing control or format characters
    (newlines, NUL, bidi overrides...) or line/paragraph separators, which would corrupt logs,
    JSON consumers and displays. The zero-width (non-)joiners U+200C/U+200D are allowed: they
    are part of ordinary text (emoji sequences such as a ZWJ "scientist" emoji, Persian,
    Indic scripts).

    Non-UTF-8 labels: rclpy strings cannot hold them, and rclpy decodes a ``frame_id`` that
    another (e.g. C++) publisher sent as invalid UTF-8 with ``errors='replace'``, so the bytes
    arrive as U+FFFD REPLACEMENT CHARACTER; a label containing U+FFFD is refused for that
    reason (nobody names a class with it on purpose). A NUL byte cuts a ROS string short
    before it reaches Python (rosidl uses ``strlen``), so only the part before it is seen.

    Example:
        >>> validate_label('  cup ')
        'cup'
    """
    if not isinstance(label, str):
        raise ValueError(f'a label must be a string, got {type(label).__name__}')
    text = label.strip()
    if not text:
        raise ValueError('empty label (put the class name in header.frame_id)')
    if len(text) > MAX_LABEL_LENGTH:
        raise ValueError(f'label of {len(text)} characters is longer than {MAX_LABEL_LENGTH}')
    if _REPLACEMENT_CHAR in text:
        raise ValueError('label is not valid UTF-8 (it holds U+FFFD, the character that '
                         'replaces undecodable bytes)')
    bad = [ch for ch in text if ch not in _ALLOWED_FORMAT_CHARS
           and unicodedata.category(ch) in _REFUSED_CATEGORIES]
    if bad:
        raise ValueError(f'label contains control characters {[hex(ord(c)) for c in bad[:4]]}')
    return text


# Reliability hardening (see validate_label): Zl/Zp (U+2028/U+2029) break lines like '\n'
# does; ZWJ/ZWNJ are ordinary text (emoji sequences) although Unicode files them under Cf;
# U+FFFD is what an invalid UTF-8 frame_id becomes in rclpy.
_REFUSED_CATEGORIES = frozenset(('Cc', 'Cf', 'Cs', 'Co', 'Cn', 'Zl', 'Zp'))
_ALLOWED_FORMAT_CHARS = frozenset('\u200c\u200d')
_REPLACEMENT_CHAR = '\ufffd'


@dataclass(frozen=True)
class BufferSnapshot:
    """The samples buffered at one moment, in arrival order."""

    ids: Tuple[int, ...]
    images: Tuple[np.ndarray, ...]
    labels: Tuple[str, ...]

    def counts(self) -> Dict[str, int]:
        """Samples per label."""
        return dict(collections.Counter(self.labels))

    def __len__(self) -> int:
        return len(self.ids)


class SampleBuffer:
    """Bounded, thread-safe store of (RGB image, label) training samples.

    Two caps, both dropping the oldest sample first and counting it in :attr:`dropped`:
    ``max_per_class`` samples of any one label and ``max_total`` samples overall.

    Args:
        max_per_class: per-label cap (>= 1).
        max_total: overall cap (>= 1).
        image_size: when > 0, images larger than ``image_size`` in either side are shrunk to
            ``image_size`` x ``image_size`` on insertion, exactly as the learner's
            preprocessing would (:mod:`ros2_cbpnet.learning.image_resize`), so a full buffer of
            camera frames costs kilobytes per sample instead of megabytes without changing
            what is learned.

    Example:
        >>> buf = SampleBuffer(max_per_class=2, max_total=10)
        >>> for _ in range(3):
        ...     _ = buf.add(np.zeros((4, 4, 3), np.uint8), 'cup')
        >>> len(buf), buf.dropped
        (2, 1)
    """

    def __init__(self, max_per_class: int, max_total: int, *, image_size: int = 0) -> None:
        self._lock = threading.Lock()
        self._samples: OrderedDict[int, Tuple[str, np.ndarray]] = collections.OrderedDict()
        self._by_label: Dict[str, Deque[int]] = {}
        self._next_id = 0
        self._dropped = 0
        self._image_size = int(image_size)
        self._max_per_class = 1
        self._max_total = 1
        self.set_limits(max_per_class, max_total)

    # ----------------------------------------------------------------- limits
    def set_limits(self, max_per_class: int, max_total: int) -> int:
        """Change the caps; returns how many samples had to be dropped to satisfy them."""
        if max_per_class < 1 or max_total < 1:
            raise ValueError('buffer limits must be >= 1')
        with self._lock:
            self._max_per_class, self._max_total = int(max_per_class), int(max_total)
            dropped = 0
            for label in list(self._by_label):
                dropped += self._trim_label(label)
            return dropped + self._trim_total()

    @property
    def limits(self) -> Tuple[int, int]:
        """``(max_per_class, max_total)``."""
        return self._max_per_class, self._max_total

    # ------------------------------------------------------------------ access
    def add(self, image: np.ndarray, label: str) -> int:
        """Store one sample (label as given; validate it first). Returns samples dropped."""
        image = self._shrink(np.asarray(image))
        with self._lock:
            sample_id = self._next_id
            self._next_id += 1
            self._samples[sample_id] = (label, image)
            self._by_label.setdefault(label, collections.deque()).append(sample_id)
            return self._trim_label(label) + self._trim_total()

    def snapshot(self) -> BufferSnapshot:
        """All buffered samples, oldest first (the arrays are shared, not copied)."""
        with self._lock:
            items = list(self._samples.items())
        return BufferSnapshot(tuple(i for i, _ in items), tuple(s[1] for _, s in items),
                              tuple(s[0] for _, s in items))

    def remove(self, ids: Sequence[int]) -> int:
        """Remove the given samples (e.g. those just learned); returns how many were there."""
        removed = 0
        with self._lock:
            for sample_id in ids:
                sample = self._samples.pop(sample_id, None)
                if sample is None:
                    continue
                removed += 1
                queue = self._by_label[sample[0]]
                queue.remove(sample_id)
                if not queue:
                    del self._by_label[sample[0]]
        return removed

    def clear(self) -> int:
        """Drop every sample (not counted as dropped); returns how many there were."""
        with self._lock:
            count = len(self._samples)
            self._samples.clear()
            self._by_label.clear()
            return count

    def counts(self) -> Dict[str, int]:
        """Samples per label."""
        with self._lock:
            return {label: len(q) for label, q in self._by_label.items()}

    @property
    def dropped(self) -> int:
        """Samples dropped by the caps since creation."""
        return self._dropped

    def __len__(self) -> int:
        return len(self._samples)

    # ---------------------------------------------------------------- internal
    def _shrink(self, image: np.ndarray) -> np.ndarray:
        size = self._image_size
        if size > 0 and image.ndim >= 2 and (image.shape[0] > size or image.shape[1] > size):
            return resize_image(image, size)
        return image

    def _drop(self, sample_id: int) -> None:
        label, _ = self._samples.pop(sample_id)
        queue = self._by_label[label]
        if queue[0] == sample_id:  # the usual case: the oldest of its label
            queue.popleft()
        else:
            queue.remove(sample_id)
        if not queue:
            del self._by_label[label]
        self._dropped += 1

    def _trim_label(self, label: str) -> int:
        queue: Optional[Deque[int]] = self._by_label.get(label)
        dropped = 0
        while queue and len(queue) > self._max_per_class:
            self._drop(queue[0])
            dropped += 1
        return dropped

    def _trim_total(self) -> int:
        dropped = 0
        while len(self._samples) > self._max_total:
            self._drop(next(iter(self._samples)))
            dropped += 1
        return dropped
