"""The node's side of the fleet: this robot's contributions out, other robots' in, over one
ROS 2 topic (the format and the merge are in :mod:`ros2_cbpnet.learning.fleet` and the learner).

- **Out** (``fleet_export``): after every learned task the statistics of its images go out
  as a ``task`` contribution; when a learned task is undone, a ``withdraw`` of it; when a
  class is forgotten, a ``forget``. Each gets this robot's next sequence number, is written
  to ``<checkpoint_dir>/fleet/own-<sequence>.cbpf`` and published on ``fleet_topic``
  (``std_msgs/UInt8MultiArray``, reliable, transient-local, keep-all), so a robot that
  joins later receives it; at start every stored one is published again, and
  ``~/share_classes`` does the same on request.
- **In** (``fleet_import``): a contribution from another robot id is decoded and checked
  (:func:`ros2_cbpnet.learning.fleet.decode`), then refused when its robot is not in
  ``fleet_peers`` (empty = any) or its feature fingerprint differs from this robot's; otherwise
  merged (``task``), taken back out (``withdraw``) or followed (``forget``) as a change of the
  model like any other: one at a time, checkpointed, undoable. The same (robot id, sequence)
  twice, a contribution withdrawn before, and one whose import was undone here change
  nothing.

Each refusal is counted by reason in the ``fleet`` diagnostics and logged as a WARN
(throttled); nothing of a refused contribution reaches the model.
"""
from __future__ import annotations

import collections
import os
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from ..learning import fleet
from ..learning.fleet import Contribution, FleetLedger, FleetRefused

__all__ = ['FleetLink']

_OWN = 'own-'


class FleetLink:
    """Publishes and merges fleet contributions for one node.

    Args:
        node: the rclpy node (publisher, subscription, logger).
        model: the node's :class:`~ros2_cbpnet.ros.model_changes.ModelChanges`.
        robot_id: this robot's id in the fleet.
        topic: the fleet topic (absolute).
        export, import_: what this robot does.
        peers: robot ids accepted (empty: any).
        max_bytes: largest contribution accepted.
        directory: where this robot's own contributions are kept ('' = in memory only).
    """

    def __init__(self, node: Any, model: Any, *, robot_id: str, topic: str, export: bool,
                 import_: bool, peers: List[str], max_bytes: int, directory: str) -> None:
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import UInt8MultiArray

        self._node, self._model, self._log = node, model, node.get_logger()
        self.robot_id, self.topic = robot_id, topic
        self.export, self.import_ = export, import_
        self.peers = list(peers)
        self.max_bytes, self.directory = int(max_bytes), directory
        self._msg_type = UInt8MultiArray
        self._lock = threading.Lock()
        self._own: Dict[int, bytes] = {}
        self.counts: collections.Counter = collections.Counter()
        self.peers_seen: Dict[str, int] = {}
        self.last_refusal = ''
        qos = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._pub = node.create_publisher(UInt8MultiArray, topic, qos) if export else None
        self._sub = node.create_subscription(
            UInt8MultiArray, topic, self._on_message, qos,
            callback_group=MutuallyExclusiveCallbackGroup()) if import_ else None
        if export:
            self._load_own()

    def destroy(self) -> None:
        """Destroy the fleet publisher and subscription (the node cleans up)."""
        if self._pub is not None:
            self._node.destroy_publisher(self._pub)
            self._pub = None
        if self._sub is not None:
            self._node.destroy_subscription(self._sub)
            self._sub = None

    # ------------------------------------------------------------------ out
    def learn_kwargs(self) -> Dict[str, Any]:
        """What ``learn_task`` is called with: this robot as the origin and, when exporting,
        the sequence number its contribution gets."""
        kwargs: Dict[str, Any] = {'origin': self.robot_id}
        if self.export:
            kwargs['export'] = (self.robot_id, self._next_sequence())
        return kwargs

    def learned(self, result: Any) -> None:
        """After a learned task (checkpoint written): publish its contribution."""
        if self.export and result.contribution is not None:
            self._send(result.contribution)

    def undone(self, before: FleetLedger, after: FleetLedger) -> None:
        """After an undo: withdraw this robot's contributions the model no longer holds."""
        if not self.export:
            return
        for sequence in before.exported:
            if sequence in after.exported:
                continue
            data = self._stored(sequence)
            if data is None:
                self._log.warning(f'cannot withdraw contribution {sequence}: it is not stored')
                continue
            self._send(fleet.decode(data, max(self.max_bytes, len(data))).as_withdraw(
                self._next_sequence()))

    def forgotten(self, label: str) -> None:
        """After a forget: tell the fleet."""
        if self.export:
            self._send(Contribution('forget', self.robot_id, self._next_sequence(),
                                    self._model.learner.feature_fingerprint, forget=label,
                                    created=time.time()))

    def share(self) -> Tuple[int, int]:
        """Publish every stored contribution of this robot again: (count, bytes)."""
        if not self.export:
            return 0, 0
        with self._lock:
            own = sorted(self._own.items())
        for _, data in own:
            self._publish(data)
        return len(own), sum(len(d) for _, d in own)

    def _next_sequence(self) -> int:
        meta = self._model.learner.fleet_meta
        sequence = int(meta['next_sequence'])
        meta['next_sequence'] = sequence + 1
        return sequence

    def _send(self, c: Contribution) -> None:
        data = fleet.encode(c)
        with self._lock:
            self._own[c.sequence] = data
        if self.directory:
            _write_atomic(self.directory, f'{_OWN}{c.sequence:09d}.cbpf', data)
        self._publish(data)
        self.counts[f'exported_{c.kind}'] += 1
        self._log.info(f'fleet: published {c.kind} {c.sequence} '
                       f'({", ".join(c.classes) or c.forget}; {len(data)} bytes)')

    def _publish(self, data: bytes) -> None:
        if self._pub is None:
            return
        msg = self._msg_type()
        msg.data = data
        self._pub.publish(msg)

    def _stored(self, sequence: int) -> Optional[bytes]:
        with self._lock:
            return self._own.get(sequence)

    def _load_own(self) -> None:
        """Own contributions kept from earlier runs, published again for late joiners."""
        if not self.directory or not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if not (name.startswith(_OWN) and name.endswith('.cbpf')):
                continue
            try:
                with open(os.path.join(self.directory, name), 'rb') as fh:
                    data = fh.read()
                c = fleet.decode(data, max(self.max_bytes, len(data)))
            except (OSError, FleetRefused) as exc:
                self._log.error(f'fleet: skipping stored contribution {name}: {exc}')
                continue
            self._own[c.sequence] = data
        if self._own:
            meta = self._model.learner.fleet_meta
            meta['next_sequence'] = max(int(meta['next_sequence']), max(self._own) + 1)
            count, size = self.share()
            self._log.info(f'fleet: published {count} stored contributions again ({size} '
                           'bytes)')

    # ------------------------------------------------------------------ in
    def _on_message(self, msg: Any) -> None:
        data = bytes(msg.data)
        try:
            c = fleet.decode(data, self.max_bytes)
        except FleetRefused as exc:
            return self._refuse(exc.reason, exc.detail, '?')
        if c.robot_id == self.robot_id:
            self.counts['own'] += 1
            return None
        self.peers_seen[c.robot_id] = max(self.peers_seen.get(c.robot_id, 0), c.sequence)
        if self.peers and c.robot_id not in self.peers:
            return self._refuse('peer', 'not in fleet_peers', c.robot_id)
        learner = self._model.learner
        if c.fingerprint != learner.feature_fingerprint:
            return self._refuse('fingerprint', 'statistics of another feature (backbone, '
                                'weights, input size or query layers)', c.robot_id)
        meta = learner.fleet_meta
        tag = [c.robot_id, c.sequence]
        if c.kind == 'task':
            if tuple(tag) in learner.fleet_ledger.applied or tag in meta['withdrawn'] \
                    or tag in meta['declined']:
                self.counts['duplicate'] += 1
                return None
            ok, reply = self._model.import_contribution(c)
            self.counts['imported' if ok else 'failed'] += 1
        elif c.kind == 'withdraw':
            target = [c.robot_id, int(c.withdraws)]
            if target in meta['withdrawn']:
                self.counts['duplicate'] += 1
                return None
            meta['withdrawn'].append(target)
            if tuple(target) not in learner.fleet_ledger.applied:
                return None
            ok, reply = self._model.withdraw_contribution(c)
            self.counts['withdrawn' if ok else 'failed'] += 1
        else:
            if c.forget not in learner.classes:
                return None
            ok, reply = self._model.forget(c.forget, announce=False)
            self.counts['forgotten' if ok else 'failed'] += 1
        if not ok:
            self._log.error(f'fleet: {c.kind} {c.tag} not applied: {reply.get("error")}')
        return None

    def _refuse(self, reason: str, detail: str, robot: str) -> None:
        self.counts[f'refused_{reason}'] += 1
        self.last_refusal = f'{reason} from {robot}: {detail}'
        self._log.warning(f'fleet: refused a contribution ({reason}) from {robot}: {detail}',
                          throttle_duration_sec=1.0)

    # ------------------------------------------------------------ diagnostics
    def status_values(self) -> Dict[str, Any]:
        """The ``fleet`` diagnostics values."""
        refused = {k: v for k, v in self.counts.items() if k.startswith('refused_')}
        values: Dict[str, Any] = {
            'robot_id': self.robot_id, 'topic': self.topic, 'export': self.export,
            'import': self.import_, 'peers': self.peers, 'peers_seen': dict(self.peers_seen),
            'exported': sum(v for k, v in self.counts.items() if k.startswith('exported_')),
            'imported': self.counts['imported'], 'withdrawn': self.counts['withdrawn'],
            'forgotten': self.counts['forgotten'], 'duplicates': self.counts['duplicate'],
            'failed': self.counts['failed'], 'refused': sum(refused.values()),
            'last_refusal': self.last_refusal,
        }
        values.update({f'refused_{r}': self.counts[f'refused_{r}'] for r in fleet.REFUSALS})
        return values


def _write_atomic(directory: str, name: str, data: bytes) -> None:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-')
    with os.fdopen(fd, 'wb') as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(directory, name))
