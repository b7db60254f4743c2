"""What both node executables share: configure (parameters, the learner and its checkpoint,
every interface but the cameras), activate (cameras, the inference thread, diagnostics),
deactivate, clean up, and run-time parameter changes (mixed into the plain node,
:class:`~.node.CBPNetNode`, and the managed one, :class:`~.lifecycle_node.CBPNetLifecycleNode`).
"""
from __future__ import annotations

import gc
import os
import socket
import threading
from typing import Any, Dict, List, Optional, Sequence

import torch
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from ..learning import checkpoint as ckpt
from ..learning.config import ARCH_FIELDS, LearnerConfig
from ..learning.learner import ContinualLearner
from ..learning.model.backbones import BackboneLoadError
from .callbacks import release_memory
from .camera_input import CameraInput
from .counters import NodeStats
from .diagnostics import StatusBuilder, status_prefix
from .fleet_link import FleetLink
from .inference_worker import InferenceWorker
from .model_changes import ModelChanges
from .parameters import (CLASS_LABELS_PARAMETER, LEARNER_PARAMS, PARAMETERS, ConfigError,
                         check_parameters, declare_class_labels, plain_value, recipe_conflict,
                         recipe_fixes, seal_parameters, set_node_parameter)
from .sample_buffer import SampleBuffer
from .teaching import TeachSession
from .vision_msgs_bridge import load_vision_msgs

#: Sub-folder of ``checkpoint_dir`` where the ONNX export of the frozen pass is cached (it is
#: derived from the backbone, so it is rebuilt when missing; checkpoints never depend on it).
RUNTIME_CACHE_DIR = 'onnx'

__all__ = ['LOSSLESS_QOS', 'NodeCore', 'RELIABLE_CAMERA_DEPTH']

#: History depth of ``image_qos: reliable`` camera subscriptions. The node classifies only the
#: newest frame of a camera anyway; a deeper queue only hands it older frames to replace
#: after it fell behind (each one received, decoded and dropped).
RELIABLE_CAMERA_DEPTH = 5
#: Training samples and forget requests: reliable and keep-all, so a publisher that sends
#: faster than the node takes them is slowed down by DDS flow control instead of having
#: unread samples overwritten (a keep-last queue of 256 lost everything beyond it in a burst
#: of 400). rclpy exposes no resource limits; Fast DDS bounds the queue with its defaults.
LOSSLESS_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)


class NodeCore:
    """Configure / activate / deactivate / clean up, and parameter changes."""

    def _init_core(self) -> None:
        """Attributes every later step may look at (call first in ``__init__``)."""
        self._worker: Optional[InferenceWorker] = None
        self._model: Optional[ModelChanges] = None
        self._cameras: Optional[CameraInput] = None
        self._fleet: Optional[FleetLink] = None
        self._entities: List[Any] = []      # what configure created, for cleanup
        self._callbacks_added = False
        self._camera_topics: List[str] = []

    # ---------------------------------------------------------------- configure
    def _configure(self, values: Dict[str, Any]) -> Optional[str]:
        """Build everything but the cameras from the declared parameter ``values``; returns
        the checkpoint loaded (or None).

        Raises:
            ConfigError: invalid parameters, the backbone or the checkpoint directory.
        """
        self._values = values
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
        if not getattr(self, '_sealed', False):  # once: read-only stays read-only
            seal_parameters(self)
            self._sealed = True
        self.buffer = SampleBuffer(self._values['max_samples_per_class'],
                                   self._values['max_buffer_samples'],
                                   image_size=self.learner.config.image_size)
        self._stats = NodeStats()
        self._teach = TeachSession()
        self._writing_labels = threading.local()
        self._model = ModelChanges(self.learner, self.buffer, self._checkpoint_dir,
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
        self._vision, why = load_vision_msgs()
        if self._vision is None and self._values['publish_vision_msgs']:
            self.get_logger().info(f'{why}: ~/classification and ~/vision_info are not '
                                   'published (the JSON topics are)')
        c = self.learner.config
        name = self.get_fully_qualified_name()
        self._diag = StatusBuilder(status_prefix(name), f'{name}@{socket.gethostname()} '
                                   f'({c.backbone} on {self.learner.device})')
        if not self.has_parameter(CLASS_LABELS_PARAMETER):
            declare_class_labels(self)
        self._create_interfaces()
        if not self._callbacks_added:
            if hasattr(self, 'add_post_set_parameters_callback'):
                self.add_on_set_parameters_callback(self._validate_parameter_change)
                self.add_post_set_parameters_callback(self._apply_parameter_change)
            else:  # Humble: no post-set callbacks, so validate and apply in one place
                self.add_on_set_parameters_callback(self._validate_and_apply)
            self._callbacks_added = True
        self._publish_model()
        return loaded

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
                self._checkpoint_dir, RUNTIME_CACHE_DIR) if self._checkpoint_dir else None)
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

    def _own(self, entity: Any) -> Any:
        """Remember an entity created at configure, to destroy it at cleanup."""
        self._entities.append(entity)
        return entity

    def _create_interfaces(self) -> None:
        """Every subscription, service, publisher and timer but the cameras."""
        labelled_group = MutuallyExclusiveCallbackGroup()
        self._labelled_topics = [
            self._own(self.create_subscription(
                msg_type, topic, lambda m, c=compressed: self._on_labelled(m, c), LOSSLESS_QOS,
                callback_group=labelled_group)).topic_name
            for msg_type, topic, compressed in (
                (Image, '~/labelled_images', False),
                (CompressedImage, '~/labelled_images/compressed', True))]
        self._teach_topic = self._own(self.create_subscription(
            String, '~/teach', self._on_teach, QoSProfile(
                depth=10, reliability=ReliabilityPolicy.RELIABLE),
            callback_group=MutuallyExclusiveCallbackGroup())).topic_name
        self._own(self.create_subscription(String, '~/forget', self._on_forget, LOSSLESS_QOS,
                                           callback_group=MutuallyExclusiveCallbackGroup()))

        # learn_task: reentrant, so a second call is answered (refused) at once; cancel: a
        # group of its own, so it is answered while learn_task waits.
        self._own(self.create_service(Trigger, '~/learn_task', self._on_learn_task,
                                      callback_group=ReentrantCallbackGroup()))
        self._own(self.create_service(Trigger, '~/cancel_learning', self._on_cancel_learning,
                                      callback_group=MutuallyExclusiveCallbackGroup()))
        service_group = MutuallyExclusiveCallbackGroup()
        for name, callback in (('~/undo_last_task', self._on_undo_last_task),
                               ('~/clear_buffer', self._on_clear_buffer),
                               ('~/save', self._on_save),
                               ('~/share_classes', self._on_share_classes)):
            self._own(self.create_service(Trigger, name, callback,
                                          callback_group=service_group))

        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._predictions_pub = self._own(self.create_publisher(String, '~/predictions', 10))
        self._progress_pub = self._own(self.create_publisher(String, '~/learning_progress',
                                                             100))
        self._labels_pub = self._own(self.create_publisher(String, '~/labels', latched))
        self._debug_pub = self._own(self.create_publisher(Image, '~/debug_image', 1))
        self._classification_pub = self._vision_info_pub = None
        if self._vision is not None:
            self._classification_pub = self._own(self.create_publisher(
                self._vision.Classification, '~/classification', 10))
            self._vision_info_pub = self._own(self.create_publisher(
                self._vision.VisionInfo, '~/vision_info', latched))
        self._diagnostics_pub = self._own(self.create_publisher(DiagnosticArray,
                                                                '/diagnostics', 10))
        self._diagnostics_timer = self._own(self.create_timer(
            self._values['diagnostics_period_s'], self._publish_diagnostics,
            callback_group=MutuallyExclusiveCallbackGroup()))

    # ----------------------------------------------------------------- activate
    def _activate(self) -> None:
        """Subscribe the cameras and start classifying their frames."""
        if self._values['image_qos'] == 'reliable':
            camera_qos = QoSProfile(depth=RELIABLE_CAMERA_DEPTH,
                                    reliability=ReliabilityPolicy.RELIABLE,
                                    history=HistoryPolicy.KEEP_LAST)
        else:  # sensor_data as the contract defines it: best effort, keep only the newest
            camera_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                                    history=HistoryPolicy.KEEP_LAST,
                                    durability=DurabilityPolicy.VOLATILE)
        self._worker = InferenceWorker(self._process, self._stats, self.get_logger(),
                                       is_stopping=lambda: not self.context.ok())
        # This node's camera subscriptions, run on a thread of their own (camera_input).
        self._cameras = CameraInput(self)
        self._camera_topics = []
        for topic in self._values['image_topics']:
            # The type follows the name after remapping: image:=/cam/image_raw/compressed.
            compressed = self.resolve_topic_name(topic).rstrip('/').endswith('/compressed')
            sub = self._cameras.subscribe(
                CompressedImage if compressed else Image, topic,
                self._camera_callback(len(self._camera_topics), compressed), camera_qos)
            self._camera_topics.append(sub.topic_name)  # resolved: namespace, remapping
        self._worker.start()
        self._cameras.start()

    def _deactivate(self) -> None:
        """Stop classifying: the cameras are unsubscribed; everything learned stays."""
        if self._cameras is not None:
            self._cameras.stop()
            self._cameras.destroy()
            self._cameras = None
        if self._worker is not None:
            self._worker.stop()

    def _cleanup(self) -> None:
        """Release the model and every interface configure created (back to unconfigured)."""
        self._deactivate()
        if self._model is not None:
            self._model.stop()
            self._model.wait_idle(10.0)
        if self._fleet is not None:
            self._fleet.destroy()
        for entity in reversed(self._entities):
            for destroy in (self.destroy_subscription, self.destroy_service,
                            self.destroy_publisher, self.destroy_timer):
                try:
                    if destroy(entity):
                        break
                except (TypeError, AttributeError):
                    continue
        self._entities = []
        self._model = self._fleet = self._worker = None
        self.learner = self.buffer = None
        gc.collect()
        release_memory()

    def _ready_message(self, loaded: Optional[str]) -> str:
        c = self.learner.config
        runtime, provider = self.learner.runtime
        return (f'ready: backbone {c.backbone} on {self.learner.device} at {c.image_size} px '
                f'(frozen pass: {runtime}, {provider}'
                + (f'; {self.learner.runtime_note}' if self.learner.runtime_note else '')
                + f'), cameras {self._camera_topics}, '
                + (f'loaded {loaded} ({self.learner.num_tasks} tasks, classes '
                   f'{self.learner.classes})' if loaded else 'no task learned yet')
                + (f', checkpoints in {self._checkpoint_dir}' if self._checkpoint_dir
                   else ', persistence off (checkpoint_dir empty)'))

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
        if self._model is None:  # cleaned up (lifecycle): the next configure reads them
            return
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
