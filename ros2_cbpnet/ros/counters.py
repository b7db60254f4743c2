"""The node's counters, shared by its threads (no ROS import, so the inference thread and
the tests use them without messages; :mod:`.diagnostics` turns them into statuses)."""
from __future__ import annotations

import collections
import threading
import time
from typing import Deque, Optional

__all__ = ['LATENCY_WINDOW', 'NodeStats']

#: Latencies (most recent frames) behind the mean/p95 in diagnostics.
LATENCY_WINDOW = 1000


class NodeStats:
    """Counters for diagnostics, updated from several threads (hold :attr:`lock`)."""

    def __init__(self, now: Optional[float] = None) -> None:
        self.lock = threading.Lock()
        self.started = time.monotonic() if now is None else now
        self.received = 0
        self.dropped = 0
        self.classified = 0
        self.frames_processed = 0        # frames the inference thread has finished with
        self.rejected: collections.Counter = collections.Counter()
        self.rejected_by_input: collections.Counter = collections.Counter()
        self.latencies_ms: Deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.prompt_selected: collections.Counter = collections.Counter()
        self.debug_images = 0
        self.classifications = 0
        self.labelled_received = 0
        self.labelled_accepted = 0
        self.teach_samples = 0
        self.forget_refused = 0
        self.unknown_frames = 0
        self.last_frame_at: Optional[float] = None
        self.failed_batches = 0          # in a row; reset by a good batch
        self.last_inference_error = ''
        # (time, received, classified, rejected camera frames) at the previous report
        self.last_report = (self.started, 0, 0, 0)
