"""Changes of the learner's model other than learning: undo, forget, reconfigure, and the
swap that puts any changed copy in place (no ROS here)."""
from __future__ import annotations

import copy
import dataclasses
import threading
from typing import Any, Dict, Tuple

from .config import ARCH_FIELDS, START_FIELDS
from .fleet import FleetLedger
from .model.learned_state import LearnedState
from .snapshot import (UNDO_DEPTH, Snapshot, apply_state_config, forgotten_classes,
                       hidden_classes)
from .types import LearnerBusyError, LearningError

__all__ = ['ChangesMixin']


class ChangesMixin:
    """:class:`~.learner.ContinualLearner`'s undo, forget and reconfigure."""

    def undo_last_task(self) -> Dict[str, Any]:
        """Go back to the model from before the last learned task.

        Refinements and forgotten classes since that task are undone with it. The model
        version still increases, so every consumer sees a change.

        Returns:
            ``{'removed_task': int, 'removed_classes': [str], 'model_version': int}``.

        Raises:
            LearnerBusyError: a task is being learned.
            LearningError: there is nothing to undo.
        """
        with self._exclusive():
            if not self._history:
                raise LearningError('nothing to undo')
            previous = self._history.pop()
            # Imports undone here must not come back when their robot shares them again.
            self.fleet_meta['declined'] += [list(t) for t in self._snapshot.fleet.applied
                                            if t not in previous.fleet.applied]
            state = copy.deepcopy(previous.state)
            with self._swap_lock:
                current = self._snapshot
                apply_state_config(state, self.config)
                state.prepare_inference()
                self._snapshot = dataclasses.replace(previous, state=state,
                                                     model_version=current.model_version + 1)
            removed = list(current.tasks[len(previous.tasks):])
            gone = hidden_classes(current)
            return {'removed_task': len(previous.tasks),
                    'removed_classes': [c for task in removed for c in task if c not in gone],
                    'model_version': self._snapshot.model_version}

    def forget(self, label: str) -> Dict[str, Any]:
        """Remove one class: it is never predicted (nor replayed) again.

        Its statistics stay in the shared covariance (they cannot be separated out), which
        only slightly changes the other classes' posteriors.

        Returns:
            ``{'forgotten': label, 'model_version': int}``.

        Raises:
            LearnerBusyError: a task is being learned.
            LearningError: ``label`` is not a class the model can predict.
        """
        with self._exclusive():
            base = self._snapshot
            if label not in base.classes or label in forgotten_classes(base):
                raise LearningError(f'unknown class {label!r}')
            state = copy.deepcopy(base.state)
            state.class_active[base.classes.index(label)] = False
            with self._swap_lock:
                apply_state_config(state, self.config)
                state.prepare_inference()
                self._snapshot = dataclasses.replace(base, state=state,
                                                     model_version=base.model_version + 1)
            return {'forgotten': label, 'model_version': self._snapshot.model_version}

    def reconfigure(self, **changes: Any) -> None:
        """Change configuration fields at run time without touching the serving snapshot.

        Learning fields apply to the next task. Fields that the learned state carries
        (prediction and selection modes, head weight, LDA shrinkage, CBP settings) are
        applied to a copy that is swapped in atomically, and to the model of a task being
        learned when it is swapped in. Never waits for learning. Architecture fields cannot
        change.

        Raises:
            ValueError: an unknown or invalid field, or an architecture field.
        """
        fixed = [k for k in changes if k in ARCH_FIELDS + START_FIELDS]
        if fixed:
            raise ValueError(f'{fixed} cannot change at run time')
        with self._swap_lock:
            config = self.config.replace(**changes)
            config.validate()
            base = self._snapshot
            state = copy.deepcopy(base.state)
            apply_state_config(state, config)
            state.prepare_inference()
            self.config = config
            self._snapshot = dataclasses.replace(base, state=state)

    def _exclusive(self):
        if not self._learn_lock.acquire(blocking=False):
            raise LearnerBusyError('a task is being learned; cancel it or wait')
        return _Release(self._learn_lock)

    def _swap_in(self, state: LearnedState, classes: Tuple[str, ...],
                 tasks: Tuple[Tuple[str, ...], ...], ledger: FleetLedger, *,
                 undoable: bool) -> Snapshot:
        """Swap a changed copy of the model in as the next version."""
        with self._swap_lock:
            apply_state_config(state, self.config)
            state.prepare_inference()
            current = self._snapshot
            if undoable:
                self._history = (self._history + [current])[-UNDO_DEPTH:]
            self._snapshot = Snapshot(state, classes, tasks, current.model_version + 1, ledger)
            return self._snapshot


class _Release:
    """Context manager that releases an already acquired lock on exit."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()
