"""The fleet side of the learner: the statistics of a learned task as a contribution for
other robots, and other robots' contributions merged into (or taken back out of) the model,
exactly (:mod:`.fleet` has the format; the node's side is :mod:`ros2_cbpnet.ros.fleet_link`)."""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch

from . import fleet
from .fleet import Contribution, FleetLedger
from .snapshot import Snapshot, UNDO_DEPTH  # noqa: F401 - UNDO_DEPTH documents the history
from .types import LearningError

__all__ = ['FleetMixin']


class FleetMixin:
    """:class:`~.learner.ContinualLearner`'s fleet methods (see the module docstring)."""

    @property
    def fleet_ledger(self) -> FleetLedger:
        """What of the fleet the current model holds (own exports, imports, origins)."""
        return self._snapshot.fleet

    @property
    def feature_fingerprint(self) -> str:
        """The fingerprint of the frozen feature the statistics are of (fleet peers must
        share it)."""
        if self._fingerprint is None:
            c = self.config
            self._fingerprint = fleet.feature_fingerprint(self.backbone, c.image_size,
                                                          c.query_layers)
        return self._fingerprint

    def _contribution(self, export: Tuple[str, int], labels: Sequence[str], y: torch.Tensor,
                      queries: torch.Tensor, raw: torch.Tensor) -> Contribution:
        """The statistics of one learn_task call as a fleet contribution."""
        names = list(dict.fromkeys(labels))
        index = torch.tensor([names.index(label) for label in labels])
        q = queries.double().cpu()
        counts = torch.bincount(index, minlength=len(names))
        means = torch.zeros(len(names), q.shape[1], dtype=torch.float64)
        means.index_add_(0, index, q)
        means /= counts[:, None]
        form, scatter = fleet.compact_scatter((q - means[index]).numpy())
        finite = raw[torch.isfinite(raw)].double()
        return Contribution(
            'task', export[0], int(export[1]), self.feature_fingerprint, names,
            counts.numpy().astype(np.int64), means.numpy().astype(np.float32), form, scatter,
            (float(finite.sum()), float((finite * finite).sum()), int(finite.numel())),
            created=time.time())

    def import_contribution(self, c: Contribution) -> Dict[str, Any]:
        """Merge another robot's task statistics (exact); a new model version, undoable.

        Classes new here become one task; classes known here are refined by them.

        Raises:
            LearnerBusyError: a task is being learned.
            LearningError: another feature, or a contribution this model already holds.
        """
        with self._exclusive():
            base = self._snapshot
            self._check_contribution(c, base)
            if c.tag in base.fleet.applied:
                raise LearningError(f'contribution {c.tag} is already in the model')
            state = copy.deepcopy(base.state)
            new = [name for name in c.classes if name not in base.classes]
            index = {name: i for i, name in enumerate(base.classes)}
            task_id = None
            if new:
                task_id = state.add_task(trained=False)
                index.update(zip(new, state.add_classes(len(new), task_id)))
            state.stats.merge([index[n] for n in c.classes], c.counts.tolist(),
                              torch.from_numpy(c.means), torch.from_numpy(
                                  fleet.scatter_matrix(c)), c.novelty)
            ledger = base.fleet.with_origin(c.classes, c.robot_id)
            ledger = dataclasses.replace(ledger, applied=ledger.applied + (c.tag,))
            tasks = base.tasks + ((tuple(new),) if new else ())
            snap = self._swap_in(state, base.classes + tuple(new), tasks, ledger, undoable=True)
            return {'imported': list(c.classes), 'new_classes': new, 'task_id': task_id,
                    'from': c.robot_id, 'sequence': c.sequence,
                    'model_version': snap.model_version}

    def withdraw_contribution(self, c: Contribution) -> Dict[str, Any]:
        """Take a merged contribution's statistics back out (its robot undid that task).

        Raises:
            LearnerBusyError: a task is being learned.
            LearningError: the model does not hold that contribution.
        """
        with self._exclusive():
            base = self._snapshot
            self._check_contribution(c, base)
            tag = (c.robot_id, int(c.withdraws if c.withdraws is not None else c.sequence))
            if tag not in base.fleet.applied:
                raise LearningError(f'contribution {tag} is not in the model')
            state = copy.deepcopy(base.state)
            index = {name: i for i, name in enumerate(base.classes)}
            try:
                state.stats.merge([index[n] for n in c.classes], c.counts.tolist(),
                                  torch.from_numpy(c.means), torch.from_numpy(
                                      fleet.scatter_matrix(c)), c.novelty, sign=-1)
            except (KeyError, ValueError) as exc:
                raise LearningError(f'cannot withdraw {tag}: {exc}') from None
            ledger = base.fleet.with_origin(c.classes, c.robot_id, add=False)
            ledger = dataclasses.replace(ledger, applied=tuple(
                t for t in ledger.applied if t != tag))
            if self._history and self._history[-1].fleet.applied == ledger.applied \
                    and self._history[-1].fleet.exported == ledger.exported:
                # The model from before that import: undoing to it would change nothing now.
                self._history.pop()
            snap = self._swap_in(state, base.classes, base.tasks, ledger, undoable=False)
            return {'withdrawn': list(c.classes), 'from': c.robot_id, 'sequence': tag[1],
                    'model_version': snap.model_version}

    def _check_contribution(self, c: Contribution, base: Snapshot) -> None:
        if c.fingerprint != self.feature_fingerprint:
            raise LearningError('statistics of another feature (backbone, weights, input size '
                                'or query layers differ)')
        if c.dim != base.state.stats.query_dim:
            raise LearningError(f'statistics of {c.dim} numbers, this model has '
                                f'{base.state.stats.query_dim}')
