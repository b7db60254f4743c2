"""``cbpnet_node``: the rclpy node that learns new image classes on the robot and classifies
camera frames (the contract is docs/interface.md; the README's "Interface" section lists it).

Every topic, service and parameter is created in :meth:`CBPNetNode._create_interfaces` and
:mod:`ros2_cbpnet.node_parameters` (``~`` = ``/<namespace>/cbpnet``):

- subscribes: each topic of ``image_topics`` (default the relative ``image``; ``Image``, or
  ``CompressedImage`` when the resolved name ends in ``/compressed``) with the QoS of
  ``image_qos``; ``~/labelled_images`` (Image) and ``~/labelled_images/compressed``
  (CompressedImage), label in ``header.frame_id``, reliable keep-all; ``~/teach`` and
  ``~/forget`` (String).
- services (``std_srvs/Trigger``, ``message`` is always JSON, ``{"error": ...}`` on failure):
  ``~/learn_task``, ``~/cancel_learning``, ``~/undo_last_task``, ``~/clear_buffer``,
  ``~/save``.
- publishes: ``~/predictions`` and ``~/learning_progress`` (JSON Strings), ``~/labels``
  (JSON String, transient-local), ``~/debug_image`` (bgr8, only while subscribed),
  ``~/classification`` and ``~/vision_info`` (vision_msgs, when installed),
  ``/diagnostics`` (:mod:`ros2_cbpnet.node_diagnostics`).

The node class is the ROS wiring; the work is in modules without ROS imports:
:mod:`~ros2_cbpnet.inference_worker` (the newest frame per camera, classified in batches on
one thread; frames arrive decoded and resized to the model input by
:mod:`~ros2_cbpnet.image_codec` on the camera thread), :mod:`~ros2_cbpnet.model_manager`
(learn on one dedicated thread while the service callback waits, cancel, undo, forget, save:
one change at a time, each followed by a checkpoint and ``~/labels``),
:mod:`~ros2_cbpnet.teaching`, and the ROS-facing helpers :mod:`~ros2_cbpnet.node_parameters`,
:mod:`~ros2_cbpnet.node_diagnostics`, :mod:`~ros2_cbpnet.vision_msgs_bridge` and
:mod:`~ros2_cbpnet.ros_logging` (the package's Python logger goes to ``/rosout``). Inference
keeps using the previous model while a task is learned (the learner swaps models
atomically). The camera subscriptions are run by a ``SingleThreadedExecutor`` on a thread
of their own, whatever executor spins the node (:mod:`~ros2_cbpnet.camera_input`: a
multi-threaded executor cost more CPU per frame than the model); labelled images, teach,
forget, learn_task (reentrant: a second call is refused at once), cancel, the other services
and diagnostics each have their own callback group on the executor that spins the node; no
exception leaves a callback.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import rclpy
import torch
import rclpy.logging
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from . import checkpoint as ckpt
from .camera_input import CameraInput
from .image_codec import ImageRejected, compressed_msg_to_rgb, draw_label, image_msg_to_rgb
from .fleet_link import FleetLink
from .image_resize import resize_image
from .inference_worker import InferenceWorker
from .learner import ARCH_FIELDS, ContinualLearner, LearnerConfig, Prediction, Progress
from .model.backbones import BackboneLoadError
from .model_manager import ModelManager
from .node_diagnostics import (BAD_LABEL, LearnerFacts, NodeStats, StatusBuilder,
                               status_prefix)
from .node_parameters import (CLASS_LABELS_PARAMETER, DEFAULTS, LEARNER_PARAMS, PARAMETERS,
                              ConfigError, check_parameters, declare_class_labels,
                              declare_parameters, plain_value, recipe_conflict, recipe_fixes,
                              seal_parameters, set_node_parameter)
from .ros_logging import forward_package_logs, stop_forwarding
from .sample_buffer import MAX_LABEL_LENGTH, SampleBuffer, validate_label
from .teaching import TeachSession
from .vision_msgs_bridge import (classification_message, hypotheses, load_vision_msgs,
                                 method_name, vision_info_message)

__all__ = ['CBPNetNode', 'ConfigError', 'DEFAULTS', 'PARAMETERS', 'check_parameters',
           'declare_parameters', 'main', 'prediction_record']

#: Seconds main() waits, after SIGINT, for a cancelled task to stop before exiting anyway.
EXIT_WAIT_S = 3.0
#: Executor threads: learn_task (+1 to refuse a concurrent call), labelled images, teach,
#: forget, services, cancel, diagnostics, parameter services, and one spare. (The cameras
#: have a thread of their own: :mod:`ros2_cbpnet.camera_input`.)
EXECUTOR_THREADS = 10
#: History depth of ``image_qos: reliable`` camera subscriptions. The node classifies only the
#: newest frame of a camera anyway; a deeper queue only hands it older frames to replace
#: after it fell behind (each one received, decoded and dropped).
RELIABLE_CAMERA_DEPTH = 5

#: Training samples and forget requests: reliable and keep-all, so a publisher that sends
#: faster than the node takes them is slowed down by DDS flow control instead of having
#: unread samples overwritten (a keep-last queue of 256 lost everything beyond it in a burst
#: of 400). rclpy exposes no resource limits; Fast DDS bounds the queue with its defaults.
LOSSLESS_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)


def prediction_record(pred: Prediction, header: Any, source: str, latency_ms: float
                      ) -> Dict[str, Any]:
    """The JSON object published on ``~/predictions`` for one classified frame."""
    return {
        'stamp': {'sec': int(header.stamp.sec), 'nanosec': int(header.stamp.nanosec)},
        'frame_id': header.frame_id, 'source': source, 'label': pred.label,
        'score': float(pred.score), 'known': bool(pred.known),
        'novelty': float(pred.novelty), 'task_id': int(pred.task_id),
        'topk': [{'label': label, 'score': float(score)} for label, score in pred.topk],
        'latency_ms': latency_ms, 'model_version': int(pred.model_version),
        'runtime': pred.runtime, 'provider': pred.provider,
    }


def _error_reply(exc: BaseException) -> str:
    return f'{type(exc).__name__}: {exc}'


def _guarded_service(name: str) -> Callable:
    """Wrap a Trigger callback: any exception becomes ``success=false`` with the error, never
    an exception in the executor (which would stop spinning for every callback)."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def callback(self: 'CBPNetNode', request: Any, response: Any) -> Any:
            try:
                return method(self, request, response)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                self.get_logger().error(f'{name} failed: {_error_reply(exc)}')
                response.success = False
                response.message = json.dumps({'error': f'{name} failed: {_error_reply(exc)}'})
                return response
        return callback
    return wrap


def _guarded_callback(name: str) -> Callable:
    """Wrap a subscription callback: exceptions are logged (throttled), never raised."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def callback(self: 'CBPNetNode', *args: Any) -> None:
            try:
                method(self, *args)
            except Exception as exc:  # noqa: BLE001 - keep the executor spinning
                if not self.context.ok():
                    # Shutting down (SIGINT): a callback still running finds the handles it
                    # touches gone. Not a fault; the inference worker treats it the same way.
                    return
                self.get_logger().error(f'{name} failed: {_error_reply(exc)}',
                                        throttle_duration_sec=5.0)
        return callback
    return wrap


@dataclass
class _Frame:
    """A camera frame on its way to the model: decoded and resized on arrival."""

    topic: str
    header: Any
    received: float
    rgb: np.ndarray                     # the model input, image_size x image_size RGB
    full: Optional[np.ndarray] = None   # the whole frame, kept only for ~/debug_image


class CBPNetNode(Node):
    """Learns new image classes from labelled images on the robot and classifies camera frames."""

    def __init__(self, *, node_name: str = 'cbpnet', **kwargs: Any) -> None:
        """Create the node; ``kwargs`` go to ``rclpy.node.Node`` (``context``, ``namespace``,
        ``parameter_overrides``, ``cli_args``...).

        Raises:
            ConfigError: invalid parameters, unknown backbone or an incompatible checkpoint in
                ``checkpoint_dir`` (the node is destroyed before raising).
        """
        super().__init__(node_name, **kwargs)
        self._worker: Optional[InferenceWorker] = None
        self._model: Optional[ModelManager] = None
        self._cameras: Optional[CameraInput] = None
        # From the start, so what the learner logs while loading checkpoints reaches /rosout.
        self._log_handler: Optional[Any] = forward_package_logs(self.get_logger())
        try:
            self._setup()
        except BaseException:
            self.destroy_node()
            raise

    # --------------------------------------------------------------------- setup
    def _setup(self) -> None:
        self._values = declare_parameters(self)
        try:
            config = check_parameters(self._values)
        except ValueError as exc:
            raise ConfigError(f'invalid parameter: {exc}') from exc
        self._write_recipe_values()
        self.get_logger().debug('parameters: ' + ', '.join(
            f'{k}={v}' for k, v in sorted(self._values.items())))
        directory = self._values['checkpoint_dir'].strip()
        self._checkpoint_dir = os.path.abspath(os.path.expanduser(directory)) if directory else ''
        loaded = self._create_learner(config)
        seal_parameters(self)
        self.buffer = SampleBuffer(self._values['max_samples_per_class'],
                                   self._values['max_buffer_samples'],
                                   image_size=self.learner.config.image_size)
        self._stats = NodeStats()
        self._teach = TeachSession()
        self._writing_labels = threading.local()
        self._model = ModelManager(self.learner, self.buffer, self._checkpoint_dir,
                                   self.get_logger(), on_change=self._publish_model,
                                   on_progress=self._publish_progress)
        v = self._values
        self._fleet = FleetLink(
            self, self._model, robot_id=v['robot_id'].strip() or self.get_fully_qualified_name(),
            topic=v['fleet_topic'], export=v['fleet_export'], import_=v['fleet_import'],
            peers=v['fleet_peers'], max_bytes=v['fleet_max_bytes'],
            directory=os.path.join(self._checkpoint_dir, 'fleet') if self._checkpoint_dir
            else '')
        self._model.fleet = self._fleet
        self._worker = InferenceWorker(self._process, self._stats, self.get_logger(),
                                       is_stopping=lambda: not self.context.ok())
        self._vision, why = load_vision_msgs()
        if self._vision is None and self._values['publish_vision_msgs']:
            self.get_logger().info(f'{why}: ~/classification and ~/vision_info are not '
                                   'published (the JSON topics are)')
        c = self.learner.config
        name = self.get_fully_qualified_name()
        self._diag = StatusBuilder(status_prefix(name), f'{name}@{socket.gethostname()} '
                                   f'({c.backbone} on {self.learner.device})')
        declare_class_labels(self)
        self._create_interfaces()
        if hasattr(self, 'add_post_set_parameters_callback'):
            self.add_on_set_parameters_callback(self._validate_parameter_change)
            self.add_post_set_parameters_callback(self._apply_parameter_change)
        else:  # Humble: no post-set callbacks, so validate and apply in one place
            self.add_on_set_parameters_callback(self._validate_and_apply)
        self._publish_model()
        self._worker.start()
        self._cameras.start()
        runtime, provider = self.learner.runtime
        self.get_logger().info(
            f'ready: backbone {c.backbone} on {self.learner.device} at {c.image_size} px '
            f'(frozen pass: {runtime}, {provider}'
            + (f'; {self.learner.runtime_note}' if self.learner.runtime_note else '') + '), '
            f'cameras {self._camera_topics}, '
            + (f'loaded {loaded} ({self.learner.num_tasks} tasks, classes '
               f'{self.learner.classes})' if loaded else 'no task learned yet')
            + (f', checkpoints in {self._checkpoint_dir}' if self._checkpoint_dir
               else ', persistence off (checkpoint_dir empty)'))

    def _create_learner(self, config: LearnerConfig) -> Optional[str]:
        """Create the learner and load the newest checkpoint; returns its path or None."""
        if self._checkpoint_dir:
            # Refuse before the (possibly slow) backbone load; never overwrite such a dir.
            try:
                ckpt.load_newest_valid(self._checkpoint_dir, config.backbone)
            except ckpt.IncompatibleCheckpointError as exc:
                raise ConfigError(self._incompatible_message(exc)) from exc
        if config.inference_threads:
            # Process-wide: the prompted pass and training; ONNX Runtime has its own.
            torch.set_num_threads(config.inference_threads)
        try:
            self.learner = ContinualLearner(config, runtime_cache_dir=os.path.join(
                self._checkpoint_dir, 'onnx') if self._checkpoint_dir else None)
        except (ValueError, BackboneLoadError) as exc:
            raise ConfigError(f'cannot create the learner: {exc}') from exc
        loaded = None
        if self._checkpoint_dir:
            try:
                loaded = self.learner.load_latest_checkpoint(self._checkpoint_dir)
            except ckpt.IncompatibleCheckpointError as exc:
                raise ConfigError(self._incompatible_message(exc)) from exc
        for name in ARCH_FIELDS:
            want, have = getattr(config, name), getattr(self.learner.config, name)
            if want and want != have:  # empty/0 = family or backbone default
                self.get_logger().warning(
                    f'{name} is {have} (from the loaded checkpoint), not the configured {want}'
                    '; the parameter now says so')
                set_node_parameter(self, name, have)
                self._values[name] = plain_value(have)
        return loaded

    def _incompatible_message(self, exc: Exception) -> str:
        return (f'checkpoint_dir {self._checkpoint_dir!r} holds a checkpoint this node cannot '
                f'use: {exc}. Refusing to start; the checkpoint is left untouched.')

    def _create_interfaces(self) -> None:
        """Every subscription, service, publisher and timer of the node."""
        if self._values['image_qos'] == 'reliable':
            camera_qos = QoSProfile(depth=RELIABLE_CAMERA_DEPTH,
                                    reliability=ReliabilityPolicy.RELIABLE,
                                    history=HistoryPolicy.KEEP_LAST)
        else:  # sensor_data as the contract defines it: best effort, keep only the newest
            camera_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                                    history=HistoryPolicy.KEEP_LAST,
                                    durability=DurabilityPolicy.VOLATILE)
        # This node's subscriptions, run on a thread of their own (ros2_cbpnet.camera_input).
        self._cameras = CameraInput(self)
        self._camera_topics: List[str] = []
        for topic in self._values['image_topics']:
            # The type follows the name after remapping: image:=/cam/image_raw/compressed.
            compressed = self.resolve_topic_name(topic).rstrip('/').endswith('/compressed')
            sub = self._cameras.subscribe(
                CompressedImage if compressed else Image, topic,
                self._camera_callback(len(self._camera_topics), compressed), camera_qos)
            self._camera_topics.append(sub.topic_name)  # resolved: namespace, remapping
        labelled_group = MutuallyExclusiveCallbackGroup()
        self._labelled_topics = [
            self.create_subscription(
                msg_type, topic, lambda m, c=compressed: self._on_labelled(m, c), LOSSLESS_QOS,
                callback_group=labelled_group).topic_name
            for msg_type, topic, compressed in (
                (Image, '~/labelled_images', False),
                (CompressedImage, '~/labelled_images/compressed', True))]
        self._teach_topic = self.create_subscription(
            String, '~/teach', self._on_teach, QoSProfile(
                depth=10, reliability=ReliabilityPolicy.RELIABLE),
            callback_group=MutuallyExclusiveCallbackGroup()).topic_name
        self.create_subscription(String, '~/forget', self._on_forget, LOSSLESS_QOS,
                                 callback_group=MutuallyExclusiveCallbackGroup())

        # learn_task: reentrant, so a second call is answered (refused) at once; cancel: a
        # group of its own, so it is answered while learn_task waits.
        self.create_service(Trigger, '~/learn_task', self._on_learn_task,
                            callback_group=ReentrantCallbackGroup())
        self.create_service(Trigger, '~/cancel_learning', self._on_cancel_learning,
                            callback_group=MutuallyExclusiveCallbackGroup())
        service_group = MutuallyExclusiveCallbackGroup()
        for name, callback in (('~/undo_last_task', self._on_undo_last_task),
                               ('~/clear_buffer', self._on_clear_buffer),
                               ('~/save', self._on_save),
                               ('~/share_classes', self._on_share_classes)):
            self.create_service(Trigger, name, callback, callback_group=service_group)

        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._predictions_pub = self.create_publisher(String, '~/predictions', 10)
        self._progress_pub = self.create_publisher(String, '~/learning_progress', 100)
        self._labels_pub = self.create_publisher(String, '~/labels', latched)
        self._debug_pub = self.create_publisher(Image, '~/debug_image', 1)
        self._classification_pub = self._vision_info_pub = None
        if self._vision is not None:
            self._classification_pub = self.create_publisher(
                self._vision.Classification, '~/classification', 10)
            self._vision_info_pub = self.create_publisher(
                self._vision.VisionInfo, '~/vision_info', latched)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diagnostics_timer = self.create_timer(
            self._values['diagnostics_period_s'], self._publish_diagnostics,
            callback_group=MutuallyExclusiveCallbackGroup())

    # ----------------------------------------------------------------- parameters
    def _candidate(self, params: Sequence[Parameter]) -> Dict[str, Any]:
        values = dict(self._values)
        for param in params:
            if param.name in PARAMETERS and param.value is not None:
                values[param.name] = plain_value(param.value)
        return values

    def _write_recipe_values(self) -> None:
        """Give the parameters that the selected recipe fixes the values it uses, so
        ``ros2 param get`` never reads back a value the learner ignores."""
        fixed = recipe_fixes(self._values)
        if not fixed:
            return
        self.get_logger().info(f"recipe {self._values['recipe']} sets " + ', '.join(
            f'{name}={value}' for name, value in sorted(fixed.items())))
        self._values.update(fixed)
        results = self.set_parameters([Parameter(name, value=value)
                                       for name, value in fixed.items()])
        for name, result in zip(fixed, results):
            if not result.successful:
                self.get_logger().error(f'could not set {name}: {result.reason}')

    def _validate_parameter_change(self, params: List[Parameter]) -> SetParametersResult:
        why = recipe_conflict(self._values, {p.name: plain_value(p.value) for p in params
                                             if p.name in PARAMETERS})
        if why:
            return SetParametersResult(successful=False, reason=why)
        for param in params:
            if param.name == CLASS_LABELS_PARAMETER and not getattr(
                    self._writing_labels, 'active', False):
                return SetParametersResult(
                    successful=False, reason=f'{param.name} is written by the node only')
            spec = PARAMETERS.get(param.name)
            if spec is not None and spec.read_only:
                return SetParametersResult(
                    successful=False, reason=f'{param.name} is read-only; restart the node')
        try:
            check_parameters(self._candidate(params))
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameter_change(self, params: List[Parameter]) -> None:
        old = self._values
        self._values = new = self._candidate(params)
        changed = {name for name in new if new[name] != old[name]}
        learner_changes = {name: new[name] for name in changed if name in LEARNER_PARAMS}
        if learner_changes and not self._model.reconfigure(learner_changes):
            self.get_logger().info(f'{sorted(learner_changes)} apply when the current task '
                                   'is learned')
        if changed & {'max_samples_per_class', 'max_buffer_samples'}:
            dropped = self.buffer.set_limits(new['max_samples_per_class'],
                                             new['max_buffer_samples'])
            if dropped:
                self.get_logger().warning(f'new buffer limits dropped {dropped} samples')
        if 'fleet_peers' in changed:
            self._fleet.peers = list(new['fleet_peers'])
        if 'diagnostics_period_s' in changed:
            # Changed in place: destroying a timer while the executor waits on it can make
            # the executor raise InvalidHandle.
            self._diagnostics_timer.timer_period_ns = int(new['diagnostics_period_s'] * 1e9)
            self._diagnostics_timer.reset()
        if changed & {'publish_vision_msgs', 'prompt_selection', 'prediction', 'cbp_enabled',
                      'recipe', 'train_cbp_block'}:
            self._publish_vision_info()
        if changed:
            self.get_logger().info('parameters changed: ' + ', '.join(
                f'{name}={new[name]}' for name in sorted(changed)))
        if 'recipe' in changed:
            self._write_recipe_values()

    def _validate_and_apply(self, params: List[Parameter]) -> SetParametersResult:
        result = self._validate_parameter_change(params)
        if result.successful and any(p.name in PARAMETERS for p in params):
            self._apply_parameter_change(params)
        return result

    # ----------------------------------------------------------------- input
    def _camera_callback(self, index: int, compressed: bool) -> Callable[[Any], None]:
        """The callback of camera ``index`` (runs on the camera thread)."""
        @_guarded_callback('camera')
        def callback(self: 'CBPNetNode', msg: Any) -> None:
            now = time.monotonic()
            topic = self._camera_topics[index]
            self._worker.count_received(now)
            # Decoded here, on the camera thread, straight to the model input (OpenCV releases
            # the GIL, so this overlaps with the model on the inference thread); the whole
            # frame only while someone watches ~/debug_image.
            size = self.learner.config.image_size
            full = None
            if self._debug_pub.get_subscription_count() > 0:
                full = self._decode(msg, compressed, topic, 'camera')
                rgb = None if full is None else resize_image(full, size)
            else:
                rgb = self._decode(msg, compressed, topic, 'camera', size=size)
            if rgb is not None:
                self._worker.submit(topic, _Frame(topic, msg.header, now, rgb, full), now,
                                    counted=True)
        return functools.partial(callback, self)

    def _decode(self, msg: Any, compressed: bool, source: str, kind: str, *, size: int = 0
                ) -> Optional[np.ndarray]:
        """The RGB image of ``msg`` (``size`` x ``size`` when ``size``), or None when it is
        rejected (counted and logged)."""
        max_pixels = self._values['max_image_pixels']
        try:
            if compressed:
                return compressed_msg_to_rgb(msg, max_pixels, size=size)
            return image_msg_to_rgb(msg, max_pixels, size=size)
        except ImageRejected as exc:
            self._reject(exc.reason, source, kind, str(exc))
        except Exception as exc:  # noqa: BLE001 - no malformed message may kill the node
            self._reject('bad_format', source, kind, _error_reply(exc))
        return None

    def _reject(self, reason: str, source: str, kind: str, detail: str) -> None:
        with self._stats.lock:
            self._stats.rejected[reason] += 1
            self._stats.rejected_by_input[kind] += 1
        self.get_logger().warning(f'dropped a bad message on {source}: {detail}',
                                  throttle_duration_sec=5.0)

    @_guarded_callback('~/labelled_images')
    def _on_labelled(self, msg: Any, compressed: bool) -> None:
        with self._stats.lock:
            self._stats.labelled_received += 1
        source = self._labelled_topics[1 if compressed else 0]
        try:
            label = validate_label(msg.header.frame_id)
        except ValueError as exc:
            self._reject(BAD_LABEL, source, 'labelled', f'label refused: {exc}')
            return
        rgb = self._decode(msg, compressed, source, 'labelled')
        if rgb is None:
            return
        dropped = self.buffer.add(rgb, label)
        with self._stats.lock:
            self._stats.labelled_accepted += 1
        self.get_logger().debug(f'buffered a labelled image of {label!r} ({len(self.buffer)} '
                                'in the buffer)', throttle_duration_sec=1.0)
        if dropped:
            self.get_logger().warning(
                f'sample buffer full: dropped {dropped} oldest sample(s) (limits '
                f'max_samples_per_class / max_buffer_samples)', throttle_duration_sec=5.0)

    @_guarded_callback('~/teach')
    def _on_teach(self, msg: String) -> None:
        text = msg.data if isinstance(msg.data, str) else ''
        if not text.strip():
            was = self._teach.stop()
            if was is not None:
                self.get_logger().info(f'stopped teaching {was!r}')
            return
        try:
            label = validate_label(text)
        except ValueError as exc:
            self._reject(BAD_LABEL, self._teach_topic, 'teach', f'label refused: {exc}')
            return
        timeout_s = self._values['teach_timeout_s']
        self._teach.start(label, timeout_s, time.monotonic())
        self.get_logger().info(
            f'teaching {label!r}: camera frames go to the buffer at '
            f"{self._values['teach_rate_hz']} Hz for up to {timeout_s} s (empty string stops)")

    def _teaching(self, now: float) -> Optional[str]:
        label, expired = self._teach.current(now)
        if expired is not None:
            self.get_logger().info(f'stopped teaching {expired!r}: teach_timeout_s reached')
        return label

    @_guarded_callback('~/forget')
    def _on_forget(self, msg: String) -> None:
        try:
            ok, reply = self._model.forget(validate_label(msg.data))
        except ValueError as exc:
            ok, reply = False, {'error': f'label refused: {exc}'}
        if not ok:
            with self._stats.lock:
                self._stats.forget_refused += 1
            self.get_logger().warning(f"~/forget: {reply['error']}")

    # ----------------------------------------------------------------- inference
    def _process(self, frames: List[_Frame]) -> None:
        """Teach, classify one batch (one frame per camera at most) and publish (on the
        inference thread; the frames were decoded on arrival)."""
        now = time.monotonic()
        for frame in frames:
            self._maybe_teach(frame.rgb, now)
        if not frames or not self.learner.classes:
            return
        started = time.monotonic()
        predictions = self.learner.predict([f.rgb for f in frames],
                                           top_k=self._values['top_k'])
        self.get_logger().debug(
            f'classified {len(frames)} frame(s) in {(time.monotonic() - started) * 1e3:.1f} ms '
            f'({predictions[0].runtime}): ' + ', '.join(
                f'{f.topic} -> {p.label} {p.score:.2f}' for f, p in zip(frames, predictions)),
            throttle_duration_sec=1.0)
        want_debug = self._debug_pub.get_subscription_count() > 0
        vision = self._classification_pub if self._values['publish_vision_msgs'] else None
        for frame, pred in zip(frames, predictions):
            latency_ms = (time.monotonic() - frame.received) * 1000.0
            record = prediction_record(pred, frame.header, frame.topic, latency_ms)
            self._predictions_pub.publish(String(data=json.dumps(record)))
            if vision is not None:
                vision.publish(classification_message(
                    frame.header, hypotheses(pred.label, pred.score, pred.known, pred.topk),
                    self._vision))
            with self._stats.lock:
                self._stats.classified += 1
                self._stats.latencies_ms.append(latency_ms)
                self._stats.prompt_selected[int(pred.task_id)] += 1
                self._stats.unknown_frames += not pred.known
                self._stats.classifications += vision is not None
            if want_debug:
                self._publish_debug(frame, pred.label, pred.score)

    def _maybe_teach(self, rgb: np.ndarray, now: float) -> None:
        if self._teaching(now) is None:
            return
        label = self._teach.take_sample(now, self._values['teach_rate_hz'])
        if label is not None:
            self.buffer.add(rgb, label)
            with self._stats.lock:
                self._stats.teach_samples += 1

    def _publish_debug(self, frame: _Frame, label: str, score: float) -> None:
        # A frame that arrived before the first debug subscriber has only the model input.
        bgr = draw_label(frame.full if frame.full is not None else frame.rgb, label, score)
        msg = Image()
        msg.header = frame.header
        msg.height, msg.width = int(bgr.shape[0]), int(bgr.shape[1])
        msg.encoding = 'bgr8'
        msg.step = int(bgr.shape[1] * 3)
        msg.data = bgr.tobytes()
        self._debug_pub.publish(msg)
        with self._stats.lock:
            self._stats.debug_images += 1

    # ----------------------------------------------------------------- services
    @_guarded_service('learn_task')
    def _on_learn_task(self, request: Trigger.Request, response: Trigger.Response
                       ) -> Trigger.Response:
        try:
            ok, reply = self._model.learn(self._values['min_samples_per_class'])
        finally:
            _release_memory()  # the training peak (see ModelManager)
        return _answer(response, ok, reply)

    @_guarded_service('cancel_learning')
    def _on_cancel_learning(self, request: Trigger.Request, response: Trigger.Response
                            ) -> Trigger.Response:
        return _answer(response, *self._model.cancel())

    @_guarded_service('undo_last_task')
    def _on_undo_last_task(self, request: Trigger.Request, response: Trigger.Response
                           ) -> Trigger.Response:
        return _answer(response, *self._model.undo())

    @_guarded_service('clear_buffer')
    def _on_clear_buffer(self, request: Trigger.Request, response: Trigger.Response
                         ) -> Trigger.Response:
        cleared = self.buffer.clear()
        self.get_logger().info(f'cleared {cleared} buffered samples')
        return _answer(response, True, {'cleared': cleared})

    @_guarded_service('save')
    def _on_save(self, request: Trigger.Request, response: Trigger.Response
                 ) -> Trigger.Response:
        try:
            return _answer(response, *self._model.save())
        finally:
            _release_memory()  # the serialised copy of the model

    @_guarded_service('share_classes')
    def _on_share_classes(self, request: Trigger.Request, response: Trigger.Response
                          ) -> Trigger.Response:
        if not self._fleet.export:
            return _answer(response, False, {'error': 'fleet_export is off'})
        published, size = self._fleet.share()
        return _answer(response, True, {'published': published, 'bytes': size})

    # ----------------------------------------------------------------- outputs
    def _publish_model(self) -> None:
        """Publish what describes the current model: ``~/labels``, the ``class_labels``
        parameter and ``~/vision_info`` (at start and after every change)."""
        classes = self.learner.classes
        origins = self.learner.fleet_ledger.origin_map()
        labels = {'model_version': self.learner.model_version, 'tasks': self.learner.tasks,
                  'classes': classes, 'origins': {c: origins.get(c, []) for c in classes}}
        self._labels_pub.publish(String(data=json.dumps(labels)))
        self._writing_labels.active = True
        try:
            result = self.set_parameters([Parameter(
                CLASS_LABELS_PARAMETER, Parameter.Type.STRING_ARRAY, labels['classes'])])[0]
        finally:
            self._writing_labels.active = False
        if not result.successful:
            self.get_logger().error(f'could not update {CLASS_LABELS_PARAMETER}: '
                                    f'{result.reason}')
        self._publish_vision_info()

    def _publish_vision_info(self) -> None:
        if self._vision_info_pub is None or not self._values['publish_vision_msgs']:
            return
        c = self.learner.config
        self._vision_info_pub.publish(vision_info_message(
            self.get_clock().now().to_msg(),
            method_name(c),
            f'{self.get_fully_qualified_name()}/{CLASS_LABELS_PARAMETER}',
            self.learner.model_version, self._vision))

    def _publish_progress(self, progress: Progress) -> None:
        try:
            self._progress_pub.publish(String(data=json.dumps(dataclasses.asdict(progress))))
        except Exception as exc:  # noqa: BLE001 - a lost progress message must not stop learning
            self.get_logger().warning(f'could not publish progress: {exc}',
                                      throttle_duration_sec=10.0)

    def _publish_diagnostics(self) -> None:
        try:
            now = time.monotonic()
            learner, model = self.learner, self._model
            facts = LearnerFacts(
                learning=model.learning, teaching=self._teaching(now) or '',
                last_task=model.last_task, last_change=model.last_change,
                last_error=model.last_error, progress=model.progress,
                max_label_length=MAX_LABEL_LENGTH,
                extra={'pending_parameters': sorted(model.pending_settings)})
            vision = ('published' if self._values['publish_vision_msgs'] else 'off') \
                if self._vision is not None else 'not installed'
            array = DiagnosticArray()
            array.header.stamp = self.get_clock().now().to_msg()
            array.status = [
                self._diag.inference(
                    self._stats, now, worker_alive=self._worker.alive,
                    camera_thread_alive=self._cameras.alive,
                    num_tasks=learner.num_tasks, topics=self._camera_topics,
                    static={'device': str(learner.device), 'backbone': learner.config.backbone,
                            'image_size': learner.config.image_size, 'vision_msgs': vision,
                            'runtime': learner.runtime[0], 'provider': learner.runtime[1],
                            'runtime_note': learner.runtime_note}),
                self._diag.learner(learner, self.buffer, self._stats, facts),
                self._diag.cbp(learner), self._diag.prompts(learner, self._stats),
                self._diag.fleet(self._fleet.status_values())]
            self._diagnostics_pub.publish(array)
        except Exception as exc:  # noqa: BLE001 - diagnostics must never take the node down
            self.get_logger().error(f'diagnostics failed: {exc}', throttle_duration_sec=10.0)

    # ----------------------------------------------------------------- shutdown
    def stop(self) -> None:
        """Stop the camera thread, cancel learning and stop the inference thread (idempotent;
        before the executor that spins the node is shut down)."""
        if self._cameras is not None:
            self._cameras.stop()
        if self._model is not None:
            self._model.stop()
        if self._worker is not None:
            self._worker.stop()

    def wait_for_learning(self, timeout: float) -> bool:
        """Wait until no task is being learned (after :meth:`stop` it is being cancelled);
        False when one still is after ``timeout``."""
        return self._model is None or self._model.wait_idle(timeout)

    def destroy_node(self) -> None:
        """Stop the threads, shut the camera executor down, then destroy the ROS entities."""
        self.stop()
        if self._cameras is not None:
            self._cameras.destroy()
        if self._log_handler is not None:
            stop_forwarding(self._log_handler)
            self._log_handler = None
        super().destroy_node()


def _answer(response: Trigger.Response, ok: bool, reply: Dict[str, Any]) -> Trigger.Response:
    response.success = bool(ok)
    response.message = json.dumps(reply)
    return response


_LIBC: Any = None


def _release_memory() -> None:
    """Give freed heap memory back to the OS after a big, rare allocation peak (learning,
    saving), via glibc's ``malloc_trim``; a no-op where that does not exist."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL('libc.so.6')
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


def _quiet_opencv() -> None:
    """Silence OpenCV's own [WARN]/[ERROR] console lines (the process is ours).

    OpenCV prints one line per undecodable frame (e.g. "PNG input buffer is incomplete"),
    unthrottled, so a stream of garbage would flood the log; the node already counts every
    rejection and logs it throttled. (libjpeg/libpng print some warnings themselves, e.g.
    "Corrupt JPEG data", which no OpenCV setting reaches.)
    """
    try:
        import cv2
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)
    except Exception:  # noqa: BLE001 - an OpenCV build without the logging API
        pass


def main(args: Optional[List[str]] = None) -> int:
    """Run the node until SIGINT. Returns the exit code: 0, 2 for a configuration error."""
    # Until the node forwards the package logger to rclpy (and after it is gone).
    logging.basicConfig(level=logging.INFO, format='[%(levelname)s] [%(name)s]: %(message)s')
    _quiet_opencv()
    rclpy.init(args=args)
    node: Optional[CBPNetNode] = None
    executor: Optional[MultiThreadedExecutor] = None
    code = 0
    try:
        node = CBPNetNode()
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
        executor.add_node(node)
        executor.spin()
    except ConfigError as exc:
        rclpy.logging.get_logger('cbpnet').fatal(str(exc))
        code = 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:  # noqa: BLE001 - report, then exit non-zero
        rclpy.logging.get_logger('cbpnet').fatal(_error_reply(exc))
        code = 1
    finally:
        # Order matters (docs/environment.md): stop our threads (this cancels learning, so
        # the executor's callbacks end at once), then the executor, then destroy the node,
        # then shut rclpy down.
        if node is not None:
            node.stop()
        if executor is not None:
            executor.shutdown(timeout_sec=10.0)
        learning = node is not None and not node.wait_for_learning(EXIT_WAIT_S)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    if learning:
        # The learner checks its cancel flag only between optimiser steps; in a long frozen
        # pass (thousands of buffered images) it would keep the process alive for a minute.
        # Nothing of an unfinished task is ever persisted (checkpoints are written
        # atomically after learning), so leave without joining the learning thread.
        rclpy.logging.get_logger('cbpnet').warning(
            f'a task was still being learned {EXIT_WAIT_S:.0f} s after the stop; exiting '
            'without it (the previous model is what the checkpoint holds)')
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == '__main__':
    raise SystemExit(main())
