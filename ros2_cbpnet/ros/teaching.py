"""Live teaching state: which label camera frames are added under, until when, how often.

No ROS import here; the node's ``~/teach`` callback starts and stops a session and the
inference thread asks, per frame, whether this one should go to the buffer. Thread-safe.
"""
from __future__ import annotations

import math
import threading
from typing import Optional, Tuple

__all__ = ['TeachSession']


class TeachSession:
    """One teach label at a time, with a timeout and a sampling rate.

    Example:
        >>> s = TeachSession()
        >>> s.start('cup', timeout_s=10.0, now=0.0)
        >>> s.take_sample(now=0.1, rate_hz=5.0), s.take_sample(now=0.2, rate_hz=5.0)
        ('cup', None)
        >>> s.current(now=11.0)
        (None, 'cup')
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._label: Optional[str] = None
        self._deadline = 0.0
        self._last_sample = -math.inf

    def start(self, label: str, timeout_s: float, now: float) -> None:
        """Teach ``label`` (already validated) from now until ``now + timeout_s``."""
        with self._lock:
            self._label = label
            self._deadline = now + timeout_s
            self._last_sample = -math.inf

    def stop(self) -> Optional[str]:
        """Stop teaching; returns the label that was being taught, if any."""
        with self._lock:
            label, self._label = self._label, None
            return label

    def current(self, now: float) -> Tuple[Optional[str], Optional[str]]:
        """``(label being taught or None, label whose timeout just ended it or None)``."""
        with self._lock:
            if self._label is not None and now > self._deadline:
                expired, self._label = self._label, None
                return None, expired
            return self._label, None

    def take_sample(self, now: float, rate_hz: float) -> Optional[str]:
        """The label to store the current frame under, or None (not teaching, timed out, or
        too soon after the previous sample for ``rate_hz``)."""
        with self._lock:
            if self._label is None or now > self._deadline:
                return None
            if now - self._last_sample < 1.0 / rate_hz:
                return None
            self._last_sample = now
            return self._label
