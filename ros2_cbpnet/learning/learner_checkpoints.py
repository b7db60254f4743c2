"""Checkpoints of the learner: what one holds, writing it, and loading the newest valid one
with the undo history rebuilt from the one before (no ROS here; the file format is
:mod:`.checkpoint`)."""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Dict, Optional

from . import checkpoint as ckpt
from .config import ARCH_FIELDS
from .fleet import FleetLedger
from .snapshot import Snapshot

__all__ = ['CheckpointMixin']

_log = logging.getLogger('ros2_cbpnet.learning.learner')


class CheckpointMixin:
    """:class:`~.learner.ContinualLearner`'s checkpoint methods."""

    def checkpoint_payload(self) -> Dict[str, Any]:
        """Everything needed to restore the learned model (weights-only types)."""
        snap = self._snapshot
        c = self.config
        arch = {k: getattr(c, k) for k in ARCH_FIELDS}
        arch['class_task'] = snap.state.class_task.tolist()
        arch['num_tasks'] = snap.state.num_tasks
        return {
            'schema_version': ckpt.SCHEMA_VERSION, 'format': ckpt.FORMAT,
            'backbone': c.backbone, 'model_version': snap.model_version,
            'classes': list(snap.classes), 'tasks': [list(t) for t in snap.tasks],
            'architecture': arch, 'saved_at': time.time(),
            'state_dict': {k: v.detach().cpu().clone()
                           for k, v in snap.state.state_dict().items()},
            'fleet': {'ledger': snap.fleet.to_json(), 'meta': copy.deepcopy(self.fleet_meta)},
        }

    def save_checkpoint(self, directory: str) -> str:
        """Atomically write the current model to ``directory``; returns the path."""
        return ckpt.write_checkpoint(self.checkpoint_payload(), directory)

    def load_checkpoint_payload(self, payload: Dict[str, Any]) -> None:
        """Restore a model from a checkpoint payload (see :meth:`checkpoint_payload`).

        The checkpoint's architecture (prompt layout, block width, image size, query layers)
        wins over the configuration, with a warning, since the learned weights only fit
        their own layout. The undo history is cleared.

        Raises:
            CheckpointError: the payload does not fit this model.
        """
        arch = ckpt.upgrade_architecture(payload['architecture'], self.backbone.num_layers)
        changes = {k: arch[k] for k in ARCH_FIELDS if k in arch and arch[k] != getattr(
            self.config, k)}
        if changes:
            _log.warning('checkpoint architecture overrides the configuration: %s', changes)
            self.config = self.config.replace(**changes)
        self._snapshot = self._snapshot_from_payload(payload)
        self._history = []
        meta = (payload.get('fleet') or {}).get('meta')
        if meta:
            self.fleet_meta = {'next_sequence': int(meta.get('next_sequence', 1)),
                               'withdrawn': [list(t) for t in meta.get('withdrawn', [])],
                               'declined': [list(t) for t in meta.get('declined', [])]}
        if changes.keys() & {'query_layers', 'image_size'}:
            self._fingerprint = None
            self._load_runtime()  # the exported pass computes the old query

    def _snapshot_from_payload(self, payload: Dict[str, Any]) -> Snapshot:
        arch = ckpt.upgrade_architecture(payload['architecture'], self.backbone.num_layers)
        if any(arch.get(k) != getattr(self.config, k) for k in ARCH_FIELDS if k in arch):
            raise ckpt.CheckpointError('checkpoint layout differs from the loaded one')
        state = self._new_state()
        try:
            state.grow_to(int(arch['num_tasks']), arch['class_task'])
            state.load_state_dict(ckpt.upgrade_state_dict(payload['state_dict'], arch))
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ckpt.CheckpointError(f'checkpoint does not fit this model: {exc}') from exc
        state.to(self.device).eval()
        state.prepare_inference()
        tasks = tuple(tuple(t) for t in payload['tasks'])
        ledger = FleetLedger.from_json((payload.get('fleet') or {}).get('ledger'))
        return Snapshot(state, tuple(payload['classes']), tasks, int(payload['model_version']),
                        ledger)

    def load_latest_checkpoint(self, directory: str) -> Optional[str]:
        """Load the newest valid checkpoint of ``directory``, falling back to older ones.

        When an older kept checkpoint holds the same tasks minus the last one, it becomes
        the undo history, so :meth:`undo_last_task` also works after a restart.

        Returns:
            The path loaded, or None when the directory holds no valid checkpoint.

        Raises:
            IncompatibleCheckpointError: the newest readable checkpoint belongs to another
                backbone or schema.
        """
        payload, path, problems = ckpt.load_newest_valid(directory, self.config.backbone)
        for problem in problems:
            _log.error('skipping checkpoint: %s', problem)
        if payload is None:
            return None
        try:
            self.load_checkpoint_payload(payload)
        except ckpt.CheckpointError as exc:
            _log.error('skipping checkpoint %s: %s', path, exc)
            return self._load_older(directory, path)
        self._history_from_older(directory, path)
        return path

    def _load_older(self, directory: str, bad_path: str) -> Optional[str]:
        for path in ckpt.list_checkpoints(directory):
            if ckpt.checkpoint_version(path) >= ckpt.checkpoint_version(bad_path):
                continue
            try:
                self.load_checkpoint_payload(ckpt.read_checkpoint(path))
                return path
            except ckpt.CheckpointError as exc:
                _log.error('skipping checkpoint %s: %s', path, exc)
        return None

    def _history_from_older(self, directory: str, loaded: str) -> None:
        current = self._snapshot
        for path in ckpt.list_checkpoints(directory):
            if ckpt.checkpoint_version(path) >= ckpt.checkpoint_version(loaded):
                continue
            try:
                payload = ckpt.read_checkpoint(path)
                if payload.get('backbone') != self.config.backbone:
                    return
                older = self._snapshot_from_payload(payload)
            except ckpt.CheckpointError:
                return
            if older.tasks == current.tasks[:-1] and len(current.tasks) > len(older.tasks):
                self._history = [older]
            return
