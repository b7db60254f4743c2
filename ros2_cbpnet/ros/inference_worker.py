"""The inference thread: the newest frame of each camera, classified in batches.

No ROS import here. Camera callbacks :meth:`InferenceWorker.submit` frames (the node's are
already decoded and resized to the model input on the camera thread, so that work overlaps
with the model on another core); a frame that a newer one of the same camera replaces before
the thread took it is counted as dropped, so the node never falls behind its cameras. The
thread hands whatever is waiting, at most one frame per camera, to the node's ``process``
function as one batch (so several cameras share one model call); a failing batch is counted
(diagnostics turn ERROR after a few in a row) and the thread goes on; only a
``BaseException`` ends it, which diagnostics report as ERROR too.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List, Optional

from .counters import NodeStats

__all__ = ['InferenceWorker']


class InferenceWorker:
    """One thread classifying the newest frame per source.

    Args:
        process: called with a list of frames (at most one per source), oldest source
            first; runs on the worker thread.
        stats: counters updated here (received, dropped, last_frame_at, failed_batches,
            frames_processed).
        logger: an rclpy logger (``error`` is called with ``throttle_duration_sec``).
        is_stopping: extra stop condition (e.g. the ROS context is shutting down); failures
            then end the thread quietly.
    """

    def __init__(self, process: Callable[[List[Any]], None], stats: NodeStats, logger: Any, *,
                 is_stopping: Callable[[], bool] = lambda: False,
                 name: str = 'cbpnet-inference') -> None:
        self._process = process
        self._stats = stats
        self._log = logger
        self._is_stopping = is_stopping
        self._cond = threading.Condition()
        self._pending: Dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    def submit(self, source: str, frame: Any, now: Optional[float] = None, *,
               counted: bool = False) -> None:
        """Offer the newest frame of ``source`` (replacing one not yet taken, which is counted
        as dropped); ``counted``: :meth:`count_received` was already called for it."""
        now = time.monotonic() if now is None else now
        with self._cond:
            with self._stats.lock:
                if not counted:
                    self._count(now)
                if source in self._pending:
                    self._stats.dropped += 1
            self._pending[source] = frame
            self._cond.notify()

    def count_received(self, now: Optional[float] = None) -> None:
        """Count a camera frame as received (the node calls this on arrival, before decoding,
        so that a frame it rejects counts as received too)."""
        with self._stats.lock:
            self._count(time.monotonic() if now is None else now)

    def _count(self, now: float) -> None:
        self._stats.received += 1
        self._stats.last_frame_at = now

    def stop(self, timeout: float = 30.0) -> None:
        """Stop and join the thread (idempotent; safe from the thread itself)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread = self._thread
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)

    def _stopping(self) -> bool:
        return self._stop.is_set() or self._is_stopping()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._cond:
                    if not self._pending:
                        self._cond.wait(timeout=0.5)
                    pending, self._pending = self._pending, {}
                if not pending or self._stop.is_set():
                    continue
                try:
                    self._process(list(pending.values()))
                except Exception as exc:  # noqa: BLE001 - the worker outlives any bad frame
                    with self._stats.lock:
                        self._stats.frames_processed += len(pending)
                    if self._stopping():
                        return
                    error = f'{type(exc).__name__}: {exc}'
                    with self._stats.lock:
                        self._stats.failed_batches += 1
                        self._stats.last_inference_error = error
                    self._log.error(f'inference failed: {error}', throttle_duration_sec=5.0)
                else:
                    with self._stats.lock:
                        self._stats.failed_batches = 0
                        self._stats.frames_processed += len(pending)
        except BaseException as exc:
            # Diagnostics turn ERROR (the thread is no longer alive); say why once.
            self._log.fatal(f'the inference thread stopped: {type(exc).__name__}: {exc}')
            raise
