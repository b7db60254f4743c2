"""The node's counters and its five ``/diagnostics`` statuses.

Status names follow diagnostic_updater: ``"<node name>: <task>"``, where the node name is
its fully qualified name without the leading slash (``cbpnet`` by default,
``robot1/cbpnet`` under namespace ``robot1``), so two nodes are told apart; ``hardware_id``
names the node, its host and its device. Values are strings (lists and dicts as JSON).

- ``inference``: rates, counters (received, classified, dropped, rejected per reason and per
  input), latency, device, backbone. OK while frames are classified; WARN when no camera
  frame arrived for :data:`STALE_INPUT_S` or every frame of the last period was rejected;
  ERROR when the inference thread or the camera thread died or the last
  :data:`FAILING_AFTER` batches failed.
- ``learner``: state, tasks, classes, buffer, teaching, labelled-image counters, last change.
  WARN until a task is learned and after a failed ``learn_task``.
- ``cbp block``: the learner's ``cbp_stats()``.
- ``prompts``: how often each E-prompt was selected.
- ``fleet``: contributions exported, imported, withdrawn and refused (per reason), peers
  seen (:mod:`ros2_cbpnet.ros.fleet_link`).

The status builders are plain functions of the facts the node gathers, so their levels are
tested without a node.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from .counters import NodeStats
from .image_codec import REASONS

__all__ = ['BAD_LABEL', 'FAILING_AFTER', 'InferenceHealth', 'LearnerFacts', 'REJECT_REASONS',
           'STALE_INPUT_S', 'StatusBuilder', 'inference_health', 'status_prefix']

#: Rejection reason for labels (empty, too long, control characters), next to image_codec's.
BAD_LABEL = 'bad_label'
REJECT_REASONS: Tuple[str, ...] = tuple(REASONS) + (BAD_LABEL,)
#: ``inference`` turns WARN when no camera frame arrived for this long (a camera stopped).
STALE_INPUT_S = 5.0
#: ``inference`` turns ERROR after this many failed batches in a row.
FAILING_AFTER = 3
INPUT_KINDS = ('camera', 'labelled', 'teach')

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


def status_prefix(fully_qualified_name: str) -> str:
    """``'/robot1/cbpnet'`` -> ``'robot1/cbpnet'``; ``'/cbpnet'`` -> ``'cbpnet'``."""
    return fully_qualified_name.lstrip('/') or fully_qualified_name


@dataclass
class InferenceHealth:
    """What the inference status level is decided from."""

    worker_alive: bool
    failed_batches: int
    last_error: str
    seconds_since_frame: Optional[float]   # None: no frame yet
    seconds_since_start: float
    received_in_period: int
    rejected_in_period: int
    topics: Sequence[str] = ()
    camera_thread_alive: bool = True   # the thread that receives and decodes camera frames


def inference_health(h: InferenceHealth) -> Tuple[bytes, str]:
    """``(level, message)`` of the inference status (see the module docstring)."""
    if not h.worker_alive:
        return ERROR, 'the inference thread stopped; restart the node'
    if not h.camera_thread_alive:
        return ERROR, 'the camera thread stopped; restart the node'
    if h.failed_batches >= FAILING_AFTER:
        return ERROR, f'inference failing ({h.failed_batches} batches in a row): {h.last_error}'
    if h.seconds_since_frame is None:
        if h.seconds_since_start >= STALE_INPUT_S:
            return WARN, (f'no camera frame received since start '
                          f'({h.seconds_since_start:.0f} s) on {list(h.topics)}')
        return OK, 'waiting for camera frames'
    if h.seconds_since_frame >= STALE_INPUT_S:
        return WARN, f'no camera frame for {h.seconds_since_frame:.0f} s'
    if h.received_in_period > 0 and h.rejected_in_period >= h.received_in_period:
        return WARN, f'every camera frame was rejected ({h.rejected_in_period} in the last period)'
    return OK, 'classifying'


@dataclass
class LearnerFacts:
    """Node-side facts of the learner status that the learner itself does not hold."""

    learning: bool
    teaching: str
    last_task: Optional[Dict[str, Any]]
    last_change: Optional[Dict[str, Any]]
    last_error: str
    progress: Optional[Dict[str, Any]]
    max_label_length: int
    extra: Dict[str, Any] = field(default_factory=dict)


class StatusBuilder:
    """Builds the node's ``DiagnosticStatus`` entries under one name prefix and hardware id."""

    def __init__(self, prefix: str, hardware_id: str) -> None:
        self.prefix = prefix
        self.hardware_id = hardware_id

    def name(self, task: str) -> str:
        """``'<prefix>: <task>'``."""
        return f'{self.prefix}: {task}'

    def status(self, task: str, level: bytes, message: str, values: Dict[str, Any]
               ) -> DiagnosticStatus:
        """One status; non-string values are JSON-encoded."""
        return DiagnosticStatus(
            level=level, name=self.name(task), message=message, hardware_id=self.hardware_id,
            values=[KeyValue(key=k, value=v if isinstance(v, str) else json.dumps(v))
                    for k, v in values.items()])

    def inference(self, stats: NodeStats, now: float, *, worker_alive: bool, num_tasks: int,
                  topics: List[str], static: Dict[str, Any], camera_thread_alive: bool = True,
                  active: bool = True) -> DiagnosticStatus:
        """The ``inference`` status; rates are over the time since the previous call.
        ``active`` False: a managed node that is not active (OK, not classifying)."""
        with stats.lock:
            then, received0, classified0, rejected0 = stats.last_report
            received, classified = stats.received, stats.classified
            rejected_camera = stats.rejected_by_input['camera']
            stats.last_report = (now, received, classified, rejected_camera)
            latencies = sorted(stats.latencies_ms)
            rejected = dict(stats.rejected)
            by_input = dict(stats.rejected_by_input)
            health = InferenceHealth(
                worker_alive=worker_alive, failed_batches=stats.failed_batches,
                last_error=stats.last_inference_error,
                seconds_since_frame=None if stats.last_frame_at is None
                else now - stats.last_frame_at,
                seconds_since_start=now - stats.started,
                received_in_period=received - received0,
                rejected_in_period=rejected_camera - rejected0, topics=topics,
                camera_thread_alive=camera_thread_alive)
            counters = {'dropped_frames': stats.dropped, 'debug_images': stats.debug_images,
                        'frames_processed': stats.frames_processed,
                        'classifications_published': stats.classifications,
                        'unknown_frames': stats.unknown_frames,
                        'failed_batches': stats.failed_batches,
                        'last_error': stats.last_inference_error}
        elapsed = max(now - then, 1e-6)
        values: Dict[str, Any] = {
            'input_rate_hz': round((received - received0) / elapsed, 3),
            'classified_rate_hz': round((classified - classified0) / elapsed, 3),
            'frames_received': received, 'frames_classified': classified,
            'rejected': sum(rejected.values()),
            **{f'rejected_{reason}': rejected.get(reason, 0) for reason in REJECT_REASONS},
            **{f'rejected_{kind}': by_input.get(kind, 0) for kind in INPUT_KINDS},
            'latency_mean_ms': round(float(np.mean(latencies)), 3) if latencies else 0.0,
            'latency_p95_ms': round(float(np.percentile(latencies, 95)), 3)
            if latencies else 0.0,
            'seconds_since_frame': round(health.seconds_since_frame, 3)
            if health.seconds_since_frame is not None else -1.0,
            **counters, **static, 'topics': topics,
        }
        level, message = inference_health(health) if active else (
            OK, 'inactive (lifecycle): cameras not subscribed, nothing classified')
        if level == OK and num_tasks == 0 and active:
            message = 'waiting for the first learned task'
        if sum(rejected.values()):
            message += f'; {sum(rejected.values())} bad messages rejected since start'
        return self.status('inference', level, message, values)

    def learner(self, learner: Any, buffer: Any, stats: NodeStats, facts: LearnerFacts
                ) -> DiagnosticStatus:
        """The ``learner`` status (``learner``: a ContinualLearner, ``buffer``: SampleBuffer)."""
        counts = buffer.counts()
        with stats.lock:
            received, accepted = stats.labelled_received, stats.labelled_accepted
            refused = stats.rejected_by_input['labelled']
            teach_samples, forget_refused = stats.teach_samples, stats.forget_refused
        num_tasks, classes = learner.num_tasks, learner.classes
        values: Dict[str, Any] = {
            'state': 'learning' if facts.learning else 'idle', 'tasks': num_tasks,
            'classes': classes, 'forgotten': learner.forgotten_classes,
            'model_version': learner.model_version, 'can_undo': learner.can_undo,
            'buffer_samples': sum(counts.values()), 'buffer_per_class': counts,
            'buffer_dropped': buffer.dropped, 'buffer_limits': list(buffer.limits),
            'teaching': facts.teaching, 'teach_samples': teach_samples,
            'labelled_received': received, 'labelled_samples': accepted,
            'labelled_refused': refused, 'forget_refused': forget_refused,
            'last_task': facts.last_task if facts.last_task is not None else '',
            'last_change': facts.last_change if facts.last_change is not None else '',
            'last_error': facts.last_error, 'max_label_length': facts.max_label_length,
            **facts.extra,
        }
        if facts.progress is not None:
            values['progress'] = facts.progress
        if num_tasks == 0:
            level, message = WARN, 'no task learned yet'
        else:
            level, message = OK, f'{num_tasks} tasks, {len(classes)} classes'
        if facts.learning:
            message = f'learning; {message}'
        if facts.last_error:
            level, message = WARN, f'{message}; last learn_task failed'
        return self.status('learner', level, message, values)

    def cbp(self, learner: Any) -> DiagnosticStatus:
        """The ``cbp block`` status."""
        stats = dict(learner.cbp_stats())
        # Under `prediction: stats` no frame passes the block and it is never trained: its
        # utilities then say nothing, and "dormant 1.00" would read as a fault.
        stats['in_use'] = learner.config.prediction != 'stats'
        if stats['in_use']:
            message = (f"dormant {stats['dormant_fraction']:.2f}, "
                       f"{stats['replacements_total']} replacements")
        else:
            message = 'not in use (prediction: stats)'
        return self.status('cbp block', OK, message, stats)

    def fleet(self, values: Dict[str, Any]) -> DiagnosticStatus:
        """The ``fleet`` status: what this robot shared and merged, and what it refused."""
        if not values['export'] and not values['import']:
            return self.status('fleet', OK, 'off (fleet_export and fleet_import false)', values)
        message = (f"exported {values['exported']}, imported {values['imported']}, "
                   f"withdrawn {values['withdrawn']}, refused {values['refused']}")
        return self.status('fleet', WARN if values['failed'] else OK, message, values)

    def prompts(self, learner: Any, stats: NodeStats) -> DiagnosticStatus:
        """The ``prompts`` status: frames per selected E-prompt since start."""
        with stats.lock:
            selected = dict(stats.prompt_selected)
        task_ids = [t['task_id'] for t in learner.tasks]
        values: Dict[str, Any] = {f'task_{t}': selected.get(t, 0) for t in task_ids}
        values['selections_total'] = sum(selected.values())
        values['e_prompts'] = len(task_ids)
        return self.status('prompts', OK, f'{len(task_ids)} E-prompts', values)
