"""Changes to the served model — learn, cancel, undo, forget, save, reconfigure — one at a time.

No ROS import here: the node's services and subscriptions are thin wrappers around
:class:`ModelChanges`, whose methods answer ``(success, reply)`` with a JSON-ready reply
(``{"error": ...}`` on failure) and never raise for a refused request.

Rules it keeps:

- one change at a time (a model lock): learn, undo and forget each end with a checkpoint
  (when ``checkpoint_dir`` is set) and a call of ``on_change`` (the node publishes
  ``~/labels``, ``class_labels`` and ``~/vision_info``), in that order;
- learning runs on one long-lived thread (see :meth:`ModelChanges.learn`); a second learn
  is refused at once, an undo is refused while learning, a forget waits for it;
- settings changed while a task is being learned are applied when it ends, so a parameter
  call never waits for learning; the learner applies them to a copy of its model
  (``reconfigure``), never to the snapshot that serves predictions.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

from ..learning.checkpoint import CheckpointError
from ..learning.fleet import Contribution, FleetLedger
from ..learning.learner import ContinualLearner, LearningCancelled, LearningError, Progress
from ..learning.types import TaskResult
from .callbacks import error_reply
from .sample_buffer import SampleBuffer

__all__ = ['CANCEL_WAIT_S', 'FleetHooks', 'Logger', 'MODEL_LOCK_WAIT_S', 'ModelChanges', 'Reply']

#: How long ``cancel`` waits for the learning thread to stop before answering.
CANCEL_WAIT_S = 30.0
#: How long ``undo`` waits for another change's checkpoint to be written.
MODEL_LOCK_WAIT_S = 2.0

Reply = Tuple[bool, Dict[str, Any]]


class Logger(Protocol):
    """What is logged to (the node's rclpy logger)."""

    def info(self, message: str) -> Any:
        ...

    def warning(self, message: str) -> Any:
        ...

    def error(self, message: str) -> Any:
        ...


class FleetHooks(Protocol):
    """What the fleet side is told (:class:`~ros2_cbpnet.ros.fleet_link.FleetLink`)."""

    def learn_kwargs(self) -> Dict[str, Any]:
        ...

    def learned(self, result: TaskResult) -> None:
        ...

    def undone(self, before: FleetLedger, after: FleetLedger) -> None:
        ...

    def forgotten(self, label: str) -> None:
        ...


class ModelChanges:
    """Serialised, persisted changes of one learner's model.

    Args:
        learner: the :class:`~ros2_cbpnet.learning.learner.ContinualLearner`.
        buffer: the :class:`~ros2_cbpnet.ros.sample_buffer.SampleBuffer` tasks are learned from.
        checkpoint_dir: where checkpoints go after each change; empty = no persistence.
        logger: anything with ``info``, ``warning`` and ``error`` methods (the node's logger).
        on_change: called (with the model lock held) after every change of the model.
        on_progress: called with each :class:`~ros2_cbpnet.learning.types.Progress` while
            learning.
    """

    def __init__(self, learner: ContinualLearner, buffer: SampleBuffer, checkpoint_dir: str,
                 logger: Logger, *,
                 on_change: Callable[[], None] = lambda: None,
                 on_progress: Callable[[Progress], None] = lambda p: None) -> None:
        self.learner = learner
        self.buffer = buffer
        self.checkpoint_dir = checkpoint_dir
        self._log = logger
        self._on_change = on_change
        self._on_progress = on_progress
        self._model_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._gate = threading.Lock()
        self._state_lock = threading.Lock()
        self._stopping = threading.Event()
        self._cancel: Optional[threading.Event] = None
        self._outcome = ''
        self._pending: Dict[str, Any] = {}
        # Every learn runs on this one thread. glibc gives each thread its own malloc arena
        # and keeps an arena's peak, so learning on the executor's threads in turn grew the
        # node's RSS by tens of MB per task until every thread had hosted one (found with
        # scripts/soak.py).
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix='cbpnet-learn')
        self.progress: Optional[Dict[str, Any]] = None
        self.last_task: Optional[Dict[str, Any]] = None
        self.last_change: Optional[Dict[str, Any]] = None
        self.last_error = ''
        #: The fleet side (:class:`~ros2_cbpnet.ros.fleet_link.FleetLink` or None): told of
        #: every learned task, undo and forget once its checkpoint is written.
        self.fleet: Optional[FleetHooks] = None

    # ------------------------------------------------------------------ state
    @property
    def learning(self) -> bool:
        """True from the start of a learn until its checkpoint is written."""
        return self._cancel is not None

    @property
    def pending_settings(self) -> Dict[str, Any]:
        """Settings waiting for the current task to end."""
        with self._state_lock:
            return dict(self._pending)

    # ------------------------------------------------------------------ learn
    def learn(self, min_samples_per_class: int) -> Reply:
        """Learn the buffered samples (new labels -> a new task, known ones -> refined);
        blocks until done. The learned samples leave the buffer; ones that arrived meanwhile
        stay."""
        if not self._gate.acquire(blocking=False):
            return False, {'error': 'a task is already being learned; call again when it is '
                                    'done'}
        try:
            future = self._pool.submit(self._learn, min_samples_per_class)
            # Stop waiting when the node stops: the learner only sees its cancel flag between
            # optimiser steps, and the executor must not wait for a long frozen pass.
            while True:
                try:
                    return future.result(timeout=0.2)
                except concurrent.futures.TimeoutError:
                    if self._stopping.is_set():
                        return False, {'error': 'the node is shutting down'}
        except RuntimeError:  # the pool is shut down: the node is stopping
            return False, {'error': 'the node is shutting down'}
        finally:
            self._gate.release()

    def _learn(self, need: int) -> Reply:
        snapshot = self.buffer.snapshot()
        if not len(snapshot):
            return False, {'error': 'the sample buffer is empty: publish labelled images on '
                                    '~/labelled_images or teach with ~/teach first'}
        counts = snapshot.counts()
        few = {label: n for label, n in sorted(counts.items()) if n < need}
        if few:
            return False, {'error': f'too few samples for classes {few}: each class needs at '
                                    f'least min_samples_per_class={need}', 'buffer': counts}
        with self._model_lock:
            cancel = threading.Event()
            with self._state_lock:
                self._cancel, self._outcome = cancel, ''
            if self._stopping.is_set():
                cancel.set()
            self._log.info(f'learning from {len(snapshot)} samples: {counts}')
            try:
                fleet_kwargs = self.fleet.learn_kwargs() if self.fleet is not None else {}
                result = self.learner.learn_task(list(snapshot.images), list(snapshot.labels),
                                                 progress=self._progress, cancel=cancel,
                                                 **fleet_kwargs)
            except LearningCancelled:
                self._outcome = 'cancelled'
                self._log.info('learning cancelled; the previous model keeps serving')
                return False, {'error': 'cancelled'}
            except LearningError as exc:  # LearnerBusyError included
                self._outcome, self.last_error = 'failed', str(exc)
                self._log.error(f'learn_task failed: {exc}')
                return False, {'error': str(exc)}
            except Exception as exc:  # noqa: BLE001 - keep the node (and the old model) alive
                self._outcome, self.last_error = 'failed', error_reply(exc)
                self._log.error(f'learn_task failed unexpectedly: {self.last_error}')
                return False, {'error': f'learning failed unexpectedly: {self.last_error}'}
            finally:
                self.progress = None
                with self._state_lock:
                    self._cancel = None
                    pending, self._pending = self._pending, {}
                if pending:
                    self._reconfigure_now(pending)
            self._outcome = 'learned'
            self.buffer.remove(snapshot.ids)
            reply = result.as_dict()
            self.last_error = ''
            reply.update(self._changed('learn', reply))
            self.last_task = reply
            if self.fleet is not None:
                self.fleet.learned(result)
        self._log.info(
            f"learned {result.new_classes or 'no new classes'} (task {result.task_id}), "
            f"refined {result.refined_classes or 'none'}: train accuracy "
            f"{result.train_accuracy:.3f} in {result.duration_s:.1f} s, "
            f"{result.replaced_units} CBP replacements, checkpoint {reply['checkpoint']}")
        return True, reply

    def _progress(self, progress: Progress) -> None:
        self.progress = dataclasses.asdict(progress)
        if self._stopping.is_set():  # shutting down (SIGINT): stop now, keep the old model
            with self._state_lock:
                if self._cancel is not None:
                    self._cancel.set()
            return
        self._on_progress(progress)

    def cancel(self, wait_s: float = CANCEL_WAIT_S) -> Reply:
        """Stop the running learn; answers once it has stopped (or after ``wait_s``)."""
        with self._state_lock:
            cancel = self._cancel
        if cancel is None:
            return False, {'error': 'nothing is being learned'}
        cancel.set()
        deadline = time.monotonic() + wait_s
        while self._cancel is cancel and time.monotonic() < deadline:
            time.sleep(0.02)
        outcome = self._outcome if self._cancel is not cancel else 'still stopping'
        reply: Dict[str, Any] = {'model_version': self.learner.model_version}
        if outcome == 'cancelled':
            return True, dict(reply, cancelled=True)
        reasons = {'learned': 'the task finished learning before it could be cancelled',
                   'failed': 'learning had already failed',
                   'still stopping': f'learning did not stop within {wait_s:.0f} s'}
        reply['error'] = reasons.get(outcome, outcome)
        return False, reply

    # ---------------------------------------------------------- undo, forget
    def undo(self) -> Reply:
        """Go back to the model from before the last learned task."""
        if self.learning or not self._model_lock.acquire(timeout=MODEL_LOCK_WAIT_S):
            return False, {'error': 'a task is being learned; cancel it (~/cancel_learning) '
                                    'or wait'}
        try:
            before = self.learner.fleet_ledger
            try:
                result = dict(self.learner.undo_last_task())
            except LearningError as exc:
                return False, {'error': str(exc)}
            self._log.info(f"undid task {result['removed_task']} (classes "
                           f"{result['removed_classes']}); model version "
                           f"{result['model_version']}")
            result.update(self._changed('undo', result))
            if self.fleet is not None:
                self.fleet.undone(before, self.learner.fleet_ledger)
            return True, result
        finally:
            self._model_lock.release()

    def forget(self, label: str, announce: bool = True) -> Reply:
        """Remove one class. While a task is being learned this waits for it (a forget
        request is applied after it, never dropped), unless the manager is stopped.
        ``announce``: tell the fleet (not when the fleet asked for it)."""
        return self._change('forget', lambda: self.learner.forget(label),
                            f'cannot forget {label!r}',
                            lambda: self.fleet.forgotten(label) if announce and self.fleet
                            is not None else None)

    def import_contribution(self, contribution: Contribution) -> Reply:
        """Merge another robot's contribution (waits for a task being learned)."""
        return self._change('import', lambda: self.learner.import_contribution(contribution),
                            f'cannot import {contribution.tag}')

    def withdraw_contribution(self, contribution: Contribution) -> Reply:
        """Take another robot's withdrawn contribution back out (waits like an import)."""
        return self._change('withdraw',
                            lambda: self.learner.withdraw_contribution(contribution),
                            f'cannot withdraw {contribution.tag}')

    def _change(self, kind: str, apply: Callable[[], Dict[str, Any]], failure: str,
                after: Callable[[], None] = lambda: None) -> Reply:
        """One change of the model that waits for learning, then checkpoint and on_change."""
        while not self._model_lock.acquire(timeout=0.5):
            if self._stopping.is_set():
                return False, {'error': 'the node is shutting down'}
        try:
            try:
                result = dict(apply())
            except LearningError as exc:
                return False, {'error': f'{failure}: {exc}'}
            self._log.info(f'{kind}: {result}')
            result.update(self._changed(kind, result))
            after()
            return True, result
        finally:
            self._model_lock.release()

    # ------------------------------------------------------------ persistence
    def save(self) -> Reply:
        """Write a checkpoint now."""
        if not self.checkpoint_dir:
            return False, {'error': 'persistence is off (checkpoint_dir is empty)'}
        if self.learner.num_tasks == 0:
            return False, {'error': 'nothing to save: no task has been learned yet'}
        path, error = self._save()
        if error:
            return False, {'error': error}
        return True, {'checkpoint': path, 'model_version': self.learner.model_version}

    def _save(self) -> Tuple[Optional[str], str]:
        """``(path, '')`` or ``(None, error)``; one writer at a time (same temp file name)."""
        with self._save_lock:
            try:
                return self.learner.save_checkpoint(self.checkpoint_dir), ''
            except (CheckpointError, OSError) as exc:
                self._log.error(f'could not save a checkpoint: {exc}')
                return None, str(exc)

    def _changed(self, kind: str, summary: Dict[str, Any]) -> Dict[str, Any]:
        """After a change: checkpoint, then ``on_change``; returns ``{'checkpoint': path or
        None}`` (plus ``checkpoint_error``) for the reply."""
        out: Dict[str, Any] = {'checkpoint': None}
        if self.checkpoint_dir:
            out['checkpoint'], error = self._save()
            if error:
                out['checkpoint_error'] = error
        self.last_change = {'kind': kind, **summary, **out}
        self._on_change()
        return out

    # ------------------------------------------------------------- settings
    def reconfigure(self, changes: Dict[str, Any]) -> bool:
        """Apply learner settings now, or when the current task ends; True when applied now.

        Raises:
            ValueError: an invalid setting (the learner validates).
        """
        with self._state_lock:
            if self._cancel is not None:
                self._pending.update(changes)
                return False
        self.learner.reconfigure(**changes)
        return True

    def _reconfigure_now(self, changes: Dict[str, Any]) -> None:
        try:
            self.learner.reconfigure(**changes)
        except (ValueError, LearningError) as exc:
            self._log.error(f'could not apply {sorted(changes)}: {exc}')

    # ------------------------------------------------------------- shutdown
    def wait_idle(self, timeout: float) -> bool:
        """Wait until no learn is running; False when one still is after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._cancel is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._cancel is None

    def stop(self) -> None:
        """Cancel a running learn and refuse new ones (idempotent)."""
        self._stopping.set()
        with self._state_lock:
            if self._cancel is not None:
                self._cancel.set()
        self._pool.shutdown(wait=False)
