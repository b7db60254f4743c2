"""The model a learner serves, as one immutable snapshot, and what is read off it.

Everything a prediction needs (learned state, class names, tasks, model version, what of the
fleet it holds) lives in one :class:`Snapshot` that a change replaces with a single reference
assignment, so a prediction never sees half a change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from .config import LearnerConfig
from .fleet import FleetLedger
from .model.learned_state import LearnedState

__all__ = ['Snapshot', 'UNDO_DEPTH', 'apply_state_config', 'forgotten_classes',
           'hidden_classes']

#: Models from before this many learned tasks are kept in memory for ``undo_last_task``.
UNDO_DEPTH = 2


@dataclass(frozen=True)
class Snapshot:
    """One version of the served model."""

    state: LearnedState
    classes: Tuple[str, ...]          # every class ever learned, in head order
    tasks: Tuple[Tuple[str, ...], ...]
    model_version: int
    fleet: FleetLedger = FleetLedger()


def forgotten_classes(snap: Snapshot) -> frozenset:
    """Classes removed with ``forget``."""
    active = snap.state.class_active.tolist()
    return frozenset(c for c, a in zip(snap.classes, active) if not a)


def hidden_classes(snap: Snapshot) -> frozenset:
    """Classes that cannot be predicted: forgotten, or left without samples when another
    robot withdrew the contribution they came from."""
    counts = snap.state.stats.class_count.tolist()
    return forgotten_classes(snap) | frozenset(c for c, n in zip(snap.classes, counts) if n == 0)


def apply_state_config(state: LearnedState, config: LearnerConfig) -> None:
    """Copy the settings the learned state carries from ``config`` (a fresh copy only)."""
    state.prompt_selection = config.prompt_selection
    state.prediction = config.prediction
    state.head_weight = config.head_weight
    if state.stats.shrinkage != config.lda_shrinkage:
        state.stats.shrinkage = config.lda_shrinkage
        state.stats.invalidate()
    state.stats.spread = config.lda_spread
    state.cbp.enabled = config.cbp_enabled
    state.cbp.replacement_rate = config.cbp_replacement_rate
    state.cbp.maturity_threshold = config.cbp_maturity_threshold
    state.cbp.decay_rate = config.cbp_decay_rate
