"""``cbpnet_node``: the rclpy node that learns new image classes on the robot and classifies
camera frames (the interface contract is docs/interface.md; this module is its one home).

Topics, services and parameters (``~`` = ``/<namespace>/cbpnet``):

- subscribes: every topic of ``image_topics`` (``sensor_msgs/Image``; a name ending in
  ``/compressed`` is ``CompressedImage``) with the QoS of ``image_qos``;
  ``~/labelled_images`` (Image) and ``~/labelled_images/compressed`` (CompressedImage), label
  in ``header.frame_id``, reliable with a deep queue; ``~/teach`` (String).
- services (``std_srvs/Trigger``, ``message`` is always JSON, ``{"error": ...}`` on failure):
  ``~/learn_task``, ``~/clear_buffer``, ``~/save``.
- publishes: ``~/predictions`` and ``~/learning_progress`` (JSON Strings), ``~/labels``
  (JSON String, transient-local), ``~/debug_image`` (bgr8, only while subscribed),
  ``/diagnostics`` (four ``cbpnet: ...`` statuses).
- parameters: :data:`PARAMETERS` (defaults in :data:`DEFAULTS` and ``config/cbpnet.yaml``).

Diagnostics keys (values are strings; lists and dicts as JSON):

- ``cbpnet: inference``: input_rate_hz, classified_rate_hz, frames_received,
  frames_classified, dropped_frames (replaced before inference saw them), rejected (all bad
  messages), rejected_<reason> for every image_codec reason and bad_label,
  rejected_camera/labelled/teach, latency_mean_ms, latency_p95_ms (receipt to publish, last
  frames), debug_images, device, backbone, image_size, topics.
- ``cbpnet: learner`` (WARN until a task is learned or after a failed learn_task): state
  (idle/learning), tasks, classes, model_version, buffer_samples, buffer_per_class,
  buffer_dropped, teaching, teach_samples, labelled_samples, last_task, last_error,
  max_label_length, progress (while learning).
- ``cbpnet: cbp block``: ContinualLearner.cbp_stats() (hidden_units, utility_mean/min/max,
  dormant_fraction, mature_units, replacements_total, replacements_last_task, enabled).
- ``cbpnet: prompts``: task_<t> (frames that selected E-prompt t since start),
  selections_total, e_prompts.

Threading: camera callbacks only keep the newest message per camera; one inference thread
decodes whatever is waiting, classifies it in one batch and publishes. ``~/learn_task``
trains on one dedicated learning thread while its service callback waits (a reentrant group,
so a second call is refused at once); inference keeps using the previous model meanwhile (the
learner swaps models atomically).
Labelled images, teaching, the other services, parameters and diagnostics each have their
own callback group, so none of them waits for another.
"""
from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import rclpy
import rclpy.logging
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                ParameterType, SetParametersResult)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.exceptions import (InvalidParameterTypeException, ParameterException,
                              ParameterUninitializedException)
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from . import checkpoint as ckpt
from .image_codec import (REASONS, ImageRejected, compressed_msg_to_rgb, draw_label,
                          image_msg_to_rgb)
from .learner import (ARCH_FIELDS, ContinualLearner, LearnerBusyError, LearnerConfig,
                      LearningError, Progress)
from .model.backbones import BackboneLoadError
from .sample_buffer import MAX_LABEL_LENGTH, SampleBuffer, validate_label

__all__ = ['CBPNetNode', 'ConfigError', 'DEFAULTS', 'PARAMETERS', 'check_parameters',
           'declare_parameters', 'main']

#: Rejection reason for labels (empty, too long, control characters), next to image_codec's.
BAD_LABEL = 'bad_label'
REJECT_REASONS: Tuple[str, ...] = tuple(REASONS) + (BAD_LABEL,)
#: Executor threads: learn_task (+1 to refuse a concurrent call), labelled images, camera and
#: teach, services, diagnostics, parameter services, and one spare.
EXECUTOR_THREADS = 8
#: Latencies (most recent frames) behind the mean/p95 in diagnostics.
LATENCY_WINDOW = 1000
QOS_CHOICES = ('sensor_data', 'reliable')

# ------------------------------------------------------------------------------ parameters
#: Learner fields exposed as parameters of the same name.
LEARNER_PARAMS: Tuple[str, ...] = (
    'backbone', 'backbone_checkpoint', 'device', 'precision', 'image_size', 'epochs',
    'batch_size', 'learning_rate', 'g_prompt_length', 'g_prompt_layers', 'e_prompt_length',
    'e_prompt_layers', 'pull_constraint_coeff', 'cbp_enabled', 'cbp_hidden_units',
    'cbp_replacement_rate', 'cbp_maturity_threshold', 'cbp_decay_rate', 'prompt_selection',
    'prediction', 'lda_shrinkage', 'feature_replay_coeff', 'g_prompt_first_task_only', 'seed',
    'top_k')

_LEARNER_DEFAULTS = LearnerConfig()
#: Every parameter's default, the single source in code (config/cbpnet.yaml mirrors it and a
#: test keeps the two equal). Learner defaults come from LearnerConfig itself.
DEFAULTS: Dict[str, Any] = {
    **{name: getattr(_LEARNER_DEFAULTS, name) for name in LEARNER_PARAMS},
    # LearnerConfig's 0 means the backbone's own size (224 for Lite0); 128 px keeps a 2-core
    # robot at camera rate while losing little accuracy on object-sized classes.
    'image_size': 128,
    'image_topics': ['/camera/image_raw'],
    'image_qos': 'sensor_data',
    'max_image_pixels': 8_000_000,
    'teach_rate_hz': 5.0,
    'teach_timeout_s': 30.0,
    'min_samples_per_class': 5,
    'max_samples_per_class': 500,
    'max_buffer_samples': 5000,
    'checkpoint_dir': '~/.ros/cbpnet',
    'diagnostics_period_s': 1.0,
}


@dataclass(frozen=True)
class ParamSpec:
    """How one parameter is declared: type, description, range, read-only flag."""

    type: int
    description: str
    low: Optional[float] = None
    high: Optional[float] = None
    read_only: bool = False
    constraints: str = ''


_T = ParameterType
_RO = dict(read_only=True)

#: Every parameter the node declares, in one place.
PARAMETERS: Dict[str, ParamSpec] = {
    # --- model (read-only: they shape the network and its checkpoint)
    'backbone': ParamSpec(_T.PARAMETER_STRING, 'timm model name of the frozen backbone; '
                          'tf_efficientnet_lite0 has embedded weights, others need the '
                          'Hugging Face cache or backbone_checkpoint', **_RO),
    'backbone_checkpoint': ParamSpec(_T.PARAMETER_STRING, 'local weights file for the backbone '
                                     '(.safetensors/.pth); empty = default source', **_RO),
    'device': ParamSpec(_T.PARAMETER_STRING, 'torch device', constraints='auto, cpu, cuda or '
                        'cuda:N', **_RO),
    'precision': ParamSpec(_T.PARAMETER_STRING, 'inference/training precision; fp16 and bf16 '
                           'need CUDA', constraints='fp32, fp16 or bf16', **_RO),
    'image_size': ParamSpec(_T.PARAMETER_INTEGER, 'network input side in pixels (frames are '
                            'resized to a square); 0 = backbone default', 0, 1024, **_RO),
    'g_prompt_length': ParamSpec(_T.PARAMETER_INTEGER, 'G-prompt length (ViT prefix tokens)',
                                 0, 256, **_RO),
    'g_prompt_layers': ParamSpec(_T.PARAMETER_INTEGER_ARRAY, 'layers with the G-prompt; empty '
                                 '= family default (ViT [0, 1], CNN [5]); [-1] = none', **_RO),
    'e_prompt_length': ParamSpec(_T.PARAMETER_INTEGER, 'E-prompt length (ViT prefix tokens)',
                                 1, 256, **_RO),
    'e_prompt_layers': ParamSpec(_T.PARAMETER_INTEGER_ARRAY, 'layers with the task E-prompts; '
                                 'empty = family default (ViT [2, 3, 4], CNN [6, 7])', **_RO),
    'cbp_hidden_units': ParamSpec(_T.PARAMETER_INTEGER, 'hidden units of the CBP block', 1,
                                  65536, **_RO),
    # --- learning (apply to the next learned task)
    'epochs': ParamSpec(_T.PARAMETER_INTEGER, 'training epochs per task', 1, 1000),
    'batch_size': ParamSpec(_T.PARAMETER_INTEGER, 'training batch size', 1, 4096),
    'learning_rate': ParamSpec(_T.PARAMETER_DOUBLE, 'Adam learning rate (constant), > 0', 0.0,
                               10.0),
    'pull_constraint_coeff': ParamSpec(_T.PARAMETER_DOUBLE, 'weight of the key pull '
                                       'constraint in the loss', 0.0, 1000.0),
    'cbp_enabled': ParamSpec(_T.PARAMETER_BOOL, 'continual backpropagation on; false = the '
                             'DualPrompt baseline (same block, no replacement)'),
    'cbp_replacement_rate': ParamSpec(_T.PARAMETER_DOUBLE, 'fraction of mature CBP units '
                                      'replaced per optimiser step', 0.0, 1.0),
    'cbp_maturity_threshold': ParamSpec(_T.PARAMETER_INTEGER, 'optimiser steps before a CBP '
                                        'unit may be replaced', 0, 1_000_000_000),
    'cbp_decay_rate': ParamSpec(_T.PARAMETER_DOUBLE, 'decay of the running utility, in (0, 1)',
                                0.0, 1.0),
    'feature_replay_coeff': ParamSpec(_T.PARAMETER_DOUBLE, 'weight of the loss on replayed '
                                      'pseudo-features of earlier classes (keeps the shared '
                                      'block and head from drifting); 0 = off', 0.0, 1000.0),
    'g_prompt_first_task_only': ParamSpec(_T.PARAMETER_BOOL, 'train the shared G-prompt on the '
                                          'first task only, so earlier tasks keep their '
                                          'features; false = DualPrompt (always)'),
    'seed': ParamSpec(_T.PARAMETER_INTEGER, 'random seed of training', 0, 2 ** 31 - 1),
    # --- prediction (apply at once)
    'prompt_selection': ParamSpec(_T.PARAMETER_STRING, 'how the E-prompt is chosen for a '
                                  'frame', constraints='key, class_mean or lda'),
    'prediction': ParamSpec(_T.PARAMETER_STRING, 'all = softmax over all classes; task = '
                            'weighted by the task posterior', constraints='all or task'),
    'lda_shrinkage': ParamSpec(_T.PARAMETER_DOUBLE, 'isotropic share of the LDA covariance',
                               0.0, 1.0),
    'top_k': ParamSpec(_T.PARAMETER_INTEGER, 'entries in each prediction topk list (at most '
                       'the number of classes)', 1, 1000),
    # --- input
    'image_topics': ParamSpec(_T.PARAMETER_STRING_ARRAY, 'camera topics to classify; names '
                              'ending in /compressed are CompressedImage', **_RO),
    'image_qos': ParamSpec(_T.PARAMETER_STRING, 'camera QoS: sensor_data (best effort, depth '
                           '1) or reliable', constraints='sensor_data or reliable', **_RO),
    'max_image_pixels': ParamSpec(_T.PARAMETER_INTEGER, 'larger images are rejected (also '
                                  'guards against decompression bombs)', 1, 2 ** 28),
    # --- buffer and teaching
    'teach_rate_hz': ParamSpec(_T.PARAMETER_DOUBLE, 'camera frames per second added to the '
                               'buffer while teaching', 0.001, 1000.0),
    'teach_timeout_s': ParamSpec(_T.PARAMETER_DOUBLE, 'teaching stops by itself after this '
                                 'long', 0.001, 86400.0),
    'min_samples_per_class': ParamSpec(_T.PARAMETER_INTEGER, 'learn_task refuses classes with '
                                       'fewer buffered samples', 1, 1_000_000),
    'max_samples_per_class': ParamSpec(_T.PARAMETER_INTEGER, 'per-class buffer cap (oldest '
                                       'dropped first)', 1, 1_000_000),
    'max_buffer_samples': ParamSpec(_T.PARAMETER_INTEGER, 'total buffer cap (oldest dropped '
                                    'first)', 1, 10_000_000),
    # --- persistence and monitoring
    'checkpoint_dir': ParamSpec(_T.PARAMETER_STRING, 'checkpoints are written here after each '
                                'task and on ~/save, and loaded at start; ~ is expanded; '
                                'empty = no persistence', **_RO),
    'diagnostics_period_s': ParamSpec(_T.PARAMETER_DOUBLE, 'period of /diagnostics', 0.01,
                                      3600.0),
}
assert set(PARAMETERS) == set(DEFAULTS), set(PARAMETERS) ^ set(DEFAULTS)

_ARRAY_TYPES = {_T.PARAMETER_INTEGER_ARRAY: Parameter.Type.INTEGER_ARRAY,
                _T.PARAMETER_STRING_ARRAY: Parameter.Type.STRING_ARRAY}
_TYPE_NAMES = {_T.PARAMETER_BOOL: 'bool', _T.PARAMETER_INTEGER: 'integer',
               _T.PARAMETER_DOUBLE: 'double (write 5.0, not 5)', _T.PARAMETER_STRING: 'string',
               _T.PARAMETER_INTEGER_ARRAY: 'integer list',
               _T.PARAMETER_STRING_ARRAY: 'string list'}


class ConfigError(ValueError):
    """An invalid parameter or an unusable checkpoint_dir at start (exit code 2)."""


def check_parameters(values: Dict[str, Any]) -> LearnerConfig:
    """Validate a full set of parameter values; returns the learner configuration.

    Raises:
        ValueError: naming the first invalid parameter.
    """
    topics = values['image_topics']
    if not topics:
        raise ValueError('image_topics must name at least one camera topic')
    if any(not isinstance(t, str) or not t.strip() or ' ' in t for t in topics):
        raise ValueError(f'image_topics holds an invalid topic name: {topics}')
    if len(set(topics)) != len(topics):
        raise ValueError(f'image_topics lists a topic twice: {topics}')
    if values['image_qos'] not in QOS_CHOICES:
        raise ValueError(f"image_qos must be one of {QOS_CHOICES}, not {values['image_qos']!r}")
    for name in ('teach_rate_hz', 'teach_timeout_s', 'diagnostics_period_s'):
        if not (math.isfinite(values[name]) and values[name] > 0):
            raise ValueError(f'{name} must be a positive number, not {values[name]}')
    if values['min_samples_per_class'] > values['max_samples_per_class']:
        raise ValueError(f"min_samples_per_class ({values['min_samples_per_class']}) must not "
                         f"exceed max_samples_per_class ({values['max_samples_per_class']})")
    if values['max_image_pixels'] < 1:
        raise ValueError('max_image_pixels must be >= 1')
    config = LearnerConfig(**{name: values[name] for name in LEARNER_PARAMS})
    config.validate()
    if config.image_size and config.image_size < 16:
        raise ValueError('image_size must be 0 or 16..1024')
    return config


def declare_parameters(node: Node) -> Dict[str, Any]:
    """Declare every parameter of :data:`PARAMETERS` on ``node`` (descriptions, ranges,
    read-only flags) and return their values (overrides applied).

    Raises:
        ConfigError: an override of the wrong type or out of range.
    """
    values: Dict[str, Any] = {}
    for name, spec in PARAMETERS.items():
        descriptor = ParameterDescriptor(
            name=name, type=spec.type, description=spec.description,
            read_only=spec.read_only, additional_constraints=spec.constraints)
        if spec.low is not None:
            if spec.type == _T.PARAMETER_INTEGER:
                descriptor.integer_range = [IntegerRange(
                    from_value=int(spec.low), to_value=int(spec.high), step=1)]
            else:
                descriptor.floating_point_range = [FloatingPointRange(
                    from_value=float(spec.low), to_value=float(spec.high), step=0.0)]
        default = DEFAULTS[name]
        try:
            if spec.type in _ARRAY_TYPES and not default:
                # An empty list has no element type for rclpy to infer; YAML `[]` also
                # arrives as "not set", which reads back as the empty default.
                node.declare_parameter(name, _ARRAY_TYPES[spec.type], descriptor)
            else:
                node.declare_parameter(name, default, descriptor)
            value = node.get_parameter(name).value
        except ParameterUninitializedException:
            value = None
        except InvalidParameterTypeException as exc:
            raise ConfigError(f'invalid parameter {name}: it must be a '
                              f'{_TYPE_NAMES[spec.type]} ({exc})') from exc
        except (ParameterException, TypeError, ValueError) as exc:
            raise ConfigError(f'invalid parameter {name}: {exc}') from exc
        if value is None:
            # Not set: declared without a default, or YAML `[]` / `null` (rcl has no type for
            # an empty list). For lists that means empty; anything else needs a value.
            if spec.type not in _ARRAY_TYPES:
                raise ConfigError(f'parameter {name} has no value (null in the YAML?)')
            value = []
        values[name] = _plain(value)
    return values


def _plain(value: Any) -> Any:
    """rclpy array values (array.array) as plain lists."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == 'array':
        return list(value)
    return value


# ------------------------------------------------------------------------------ statistics
class _Stats:
    """Counters for diagnostics, updated from several threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0
        self.dropped = 0
        self.classified = 0
        self.rejected: collections.Counter = collections.Counter()
        self.rejected_by_input: collections.Counter = collections.Counter()
        self.latencies_ms: Deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.prompt_selected: collections.Counter = collections.Counter()
        self.debug_images = 0
        self.labelled_accepted = 0
        self.teach_samples = 0
        # for rates: (time, received, classified) at the previous report
        self.last_report = (time.monotonic(), 0, 0)


@dataclass
class _Frame:
    topic: str
    msg: Any
    compressed: bool
    received: float
    rgb: Optional[np.ndarray] = None


# ------------------------------------------------------------------------------ the node
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
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._worker: Optional[threading.Thread] = None
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
        directory = self._values['checkpoint_dir'].strip()
        self._checkpoint_dir = os.path.abspath(os.path.expanduser(directory)) if directory else ''
        if self._checkpoint_dir:
            # Refuse before the (possibly slow) backbone load; never overwrite such a dir.
            try:
                ckpt.load_newest_valid(self._checkpoint_dir, config.backbone)
            except ckpt.IncompatibleCheckpointError as exc:
                raise ConfigError(self._incompatible_message(exc)) from exc
        try:
            self.learner = ContinualLearner(config)
        except (ValueError, BackboneLoadError) as exc:
            raise ConfigError(f'cannot create the learner: {exc}') from exc
        loaded = None
        if self._checkpoint_dir:
            try:
                loaded = self.learner.load_latest_checkpoint(self._checkpoint_dir)
            except ckpt.IncompatibleCheckpointError as exc:
                raise ConfigError(self._incompatible_message(exc)) from exc
        self._check_architecture(config)

        self.buffer = SampleBuffer(self._values['max_samples_per_class'],
                                   self._values['max_buffer_samples'],
                                   image_size=self.learner.config.image_size)
        self._stats = _Stats()
        self._predict_lock = threading.Lock()
        self._save_lock = threading.Lock()
        # Every learn_task trains on this one long-lived thread (see _on_learn_task).
        self._learn_gate = threading.Lock()
        self._learn_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix='cbpnet-learn')
        self._frames_cond = threading.Condition()
        self._pending: Dict[str, _Frame] = {}
        self._teach_lock = threading.Lock()
        self._teach_label: Optional[str] = None
        self._teach_deadline = 0.0
        self._teach_last = -math.inf
        self._last_task: Optional[Dict[str, Any]] = None
        self._last_error = ''
        self._progress: Optional[Progress] = None
        self._hardware_id = f'{self.learner.config.backbone}@{self.learner.device}'

        self._create_interfaces()
        if hasattr(self, 'add_post_set_parameters_callback'):
            self.add_on_set_parameters_callback(self._validate_parameter_change)
            self.add_post_set_parameters_callback(self._apply_parameter_change)
        else:  # Humble: no post-set callbacks, so validate and apply in one place
            self.add_on_set_parameters_callback(self._validate_and_apply)

        self._publish_labels()
        self._worker = threading.Thread(target=self._inference_loop, name='cbpnet-inference',
                                        daemon=True)
        self._worker.start()
        c = self.learner.config
        self.get_logger().info(
            f'ready: backbone {c.backbone} on {self.learner.device} at {c.image_size} px, '
            f'cameras {self._camera_topics}, '
            + (f'loaded {loaded} ({self.learner.num_tasks} tasks, classes '
               f'{self.learner.classes})' if loaded else 'no task learned yet')
            + (f', checkpoints in {self._checkpoint_dir}' if self._checkpoint_dir
               else ', persistence off (checkpoint_dir empty)'))

    def _incompatible_message(self, exc: Exception) -> str:
        return (f'checkpoint_dir {self._checkpoint_dir!r} holds a checkpoint this node cannot '
                f'use: {exc}. Refusing to start; the checkpoint is left untouched.')

    def _check_architecture(self, requested: LearnerConfig) -> None:
        actual = self.learner.config
        for name in ARCH_FIELDS:
            want, have = getattr(requested, name), getattr(actual, name)
            if name in ('g_prompt_layers', 'e_prompt_layers') and not want:
                continue  # family default, resolved by the learner
            if name == 'image_size' and not want:
                continue
            if want != have:
                self.get_logger().warning(
                    f'{name} is {have} (from the loaded checkpoint), not the configured {want}')

    def _create_interfaces(self) -> None:
        camera_group = MutuallyExclusiveCallbackGroup()
        labelled_group = MutuallyExclusiveCallbackGroup()
        learn_group = ReentrantCallbackGroup()
        service_group = MutuallyExclusiveCallbackGroup()
        self._diagnostics_group = MutuallyExclusiveCallbackGroup()

        if self._values['image_qos'] == 'reliable':
            camera_qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE,
                                    history=HistoryPolicy.KEEP_LAST)
        else:  # sensor_data as the contract defines it: best effort, keep only the newest
            camera_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                                    history=HistoryPolicy.KEEP_LAST,
                                    durability=DurabilityPolicy.VOLATILE)
        self._camera_subs = []
        self._camera_topics: List[str] = []
        for index, topic in enumerate(self._values['image_topics']):
            compressed = topic.rstrip('/').endswith('/compressed')
            sub = self.create_subscription(
                CompressedImage if compressed else Image, topic, self._camera_callback(
                    index, compressed), camera_qos, callback_group=camera_group)
            self._camera_subs.append(sub)
            self._camera_topics.append(sub.topic_name)  # resolved: namespace, remapping
        # Training samples must not be lost: reliable, and deep enough for a burst of a few
        # hundred images published back to back.
        labelled_qos = QoSProfile(depth=256, reliability=ReliabilityPolicy.RELIABLE,
                                  history=HistoryPolicy.KEEP_LAST)
        self._labelled_subs = [
            self.create_subscription(Image, '~/labelled_images',
                                     lambda m: self._on_labelled(m, False), labelled_qos,
                                     callback_group=labelled_group),
            self.create_subscription(CompressedImage, '~/labelled_images/compressed',
                                     lambda m: self._on_labelled(m, True), labelled_qos,
                                     callback_group=labelled_group),
        ]
        self._teach_sub = self.create_subscription(
            String, '~/teach', self._on_teach, QoSProfile(
                depth=10, reliability=ReliabilityPolicy.RELIABLE),
            callback_group=camera_group)

        self._learn_srv = self.create_service(Trigger, '~/learn_task', self._on_learn_task,
                                              callback_group=learn_group)
        self._clear_srv = self.create_service(Trigger, '~/clear_buffer', self._on_clear_buffer,
                                              callback_group=service_group)
        self._save_srv = self.create_service(Trigger, '~/save', self._on_save,
                                             callback_group=service_group)

        self._predictions_pub = self.create_publisher(String, '~/predictions', 10)
        self._progress_pub = self.create_publisher(String, '~/learning_progress', 100)
        self._labels_pub = self.create_publisher(String, '~/labels', QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self._debug_pub = self.create_publisher(Image, '~/debug_image', 1)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diagnostics_timer = self.create_timer(
            self._values['diagnostics_period_s'], self._publish_diagnostics,
            callback_group=self._diagnostics_group)

    # ----------------------------------------------------------------- parameters
    def _candidate(self, params: Sequence[Parameter]) -> Dict[str, Any]:
        values = dict(self._values)
        for param in params:
            if param.name in PARAMETERS and param.value is not None:
                values[param.name] = _plain(param.value)
        return values

    def _validate_parameter_change(self, params: List[Parameter]) -> SetParametersResult:
        for param in params:
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
        if learner_changes:
            # The learner reads its config once per task, so this applies to the next task.
            self.learner.config = self.learner.config.replace(**learner_changes)
            self._sync_state_with_config()
        if changed & {'max_samples_per_class', 'max_buffer_samples'}:
            dropped = self.buffer.set_limits(new['max_samples_per_class'],
                                             new['max_buffer_samples'])
            if dropped:
                self.get_logger().warning(f'new buffer limits dropped {dropped} samples')
        if 'diagnostics_period_s' in changed:
            self.destroy_timer(self._diagnostics_timer)
            self._diagnostics_timer = self.create_timer(
                new['diagnostics_period_s'], self._publish_diagnostics,
                callback_group=self._diagnostics_group)
        if changed:
            self.get_logger().info('parameters changed: ' + ', '.join(
                f'{name}={new[name]}' for name in sorted(changed)))

    def _validate_and_apply(self, params: List[Parameter]) -> SetParametersResult:
        result = self._validate_parameter_change(params)
        if result.successful:
            self._apply_parameter_change(params)
        return result

    def _sync_state_with_config(self) -> None:
        """Push CBP and prediction settings into the live model.

        The CBP hyper-parameters are plain attributes of the block (not checkpointed), so
        the model the next task is trained from must carry the current values; the
        prediction modes act at once. Under the predict lock so a frame never sees a
        half-built LDA cache.
        """
        config, state = self.learner.config, self.learner.state
        with self._predict_lock:
            cbp = state.cbp
            cbp.enabled = bool(config.cbp_enabled)
            cbp.replacement_rate = float(config.cbp_replacement_rate)
            cbp.maturity_threshold = int(config.cbp_maturity_threshold)
            cbp.decay_rate = float(config.cbp_decay_rate)
            state.prompt_selection = config.prompt_selection
            state.prediction = config.prediction
            if state.lda_shrinkage != float(config.lda_shrinkage):
                state.lda_shrinkage = float(config.lda_shrinkage)
                state.invalidate_cache()

    # ----------------------------------------------------------------- input
    def _camera_callback(self, index: int, compressed: bool) -> Callable[[Any], None]:
        def callback(msg: Any) -> None:
            topic = self._camera_topics[index]
            frame = _Frame(topic, msg, compressed, time.monotonic())
            with self._frames_cond:
                with self._stats.lock:
                    self._stats.received += 1
                    if topic in self._pending:  # the worker never saw the older frame
                        self._stats.dropped += 1
                self._pending[topic] = frame
                self._frames_cond.notify()
        return callback

    def _decode(self, msg: Any, compressed: bool, source: str, kind: str
                ) -> Optional[np.ndarray]:
        max_pixels = self._values['max_image_pixels']
        try:
            if compressed:
                return compressed_msg_to_rgb(msg, max_pixels)
            return image_msg_to_rgb(msg, max_pixels)
        except ImageRejected as exc:
            self._reject(exc.reason, source, kind, str(exc))
        except Exception as exc:  # noqa: BLE001 - no malformed message may kill the node
            self._reject('bad_format', source, kind, f'{type(exc).__name__}: {exc}')
        return None

    def _reject(self, reason: str, source: str, kind: str, detail: str) -> None:
        with self._stats.lock:
            self._stats.rejected[reason] += 1
            self._stats.rejected_by_input[kind] += 1
        self.get_logger().warning(f'dropped a bad message on {source}: {detail}',
                                  throttle_duration_sec=5.0)

    def _on_labelled(self, msg: Any, compressed: bool) -> None:
        source = self._labelled_subs[1 if compressed else 0].topic_name
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
        if dropped:
            self.get_logger().warning(
                f'sample buffer full: dropped {dropped} oldest sample(s) (limits '
                f'max_samples_per_class / max_buffer_samples)', throttle_duration_sec=5.0)

    def _on_teach(self, msg: String) -> None:
        text = msg.data if isinstance(msg.data, str) else ''
        if not text.strip():
            with self._teach_lock:
                was, self._teach_label = self._teach_label, None
            if was is not None:
                self.get_logger().info(f'stopped teaching {was!r}')
            return
        try:
            label = validate_label(text)
        except ValueError as exc:
            self._reject(BAD_LABEL, self._teach_sub.topic_name, 'teach', f'label refused: {exc}')
            return
        timeout_s = self._values['teach_timeout_s']
        with self._teach_lock:
            self._teach_label = label
            self._teach_deadline = time.monotonic() + timeout_s
            self._teach_last = -math.inf
        self.get_logger().info(
            f'teaching {label!r}: camera frames go to the buffer at '
            f"{self._values['teach_rate_hz']} Hz for up to {timeout_s} s (empty string stops)")

    def _teaching(self, now: float) -> Optional[str]:
        """The current teach label, ending teaching when its timeout has passed."""
        with self._teach_lock:
            if self._teach_label is not None and now > self._teach_deadline:
                label, self._teach_label = self._teach_label, None
                self.get_logger().info(f'stopped teaching {label!r}: teach_timeout_s reached')
            return self._teach_label

    def _maybe_teach(self, rgb: np.ndarray, now: float) -> None:
        if self._teaching(now) is None:
            return
        with self._teach_lock:
            label = self._teach_label
            if label is None or now - self._teach_last < 1.0 / self._values['teach_rate_hz']:
                return
            self._teach_last = now
        self.buffer.add(rgb, label)
        with self._stats.lock:
            self._stats.teach_samples += 1

    # ----------------------------------------------------------------- inference
    def _inference_loop(self) -> None:
        while not self._stop.is_set():
            with self._frames_cond:
                if not self._pending:
                    self._frames_cond.wait(timeout=0.5)
                pending, self._pending = self._pending, {}
            if not pending or self._stop.is_set():
                continue
            try:
                self._process(list(pending.values()))
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any bad frame
                if self._stop.is_set() or not self.context.ok():
                    return
                self.get_logger().error(f'inference failed: {type(exc).__name__}: {exc}',
                                        throttle_duration_sec=5.0)

    def _process(self, frames: List[_Frame]) -> None:
        now = time.monotonic()
        ready = []
        for frame in frames:
            frame.rgb = self._decode(frame.msg, frame.compressed, frame.topic, 'camera')
            if frame.rgb is not None:
                self._maybe_teach(frame.rgb, now)
                ready.append(frame)
        if not ready or self.learner.num_tasks == 0:
            return
        version = self.learner.model_version
        with self._predict_lock:
            predictions = self.learner.predict([f.rgb for f in ready],
                                               top_k=self._values['top_k'])
        want_debug = self._debug_pub.get_subscription_count() > 0
        for frame, pred in zip(ready, predictions):
            header = frame.msg.header
            latency_ms = (time.monotonic() - frame.received) * 1000.0
            out = {
                'stamp': {'sec': int(header.stamp.sec), 'nanosec': int(header.stamp.nanosec)},
                'frame_id': header.frame_id, 'source': frame.topic, 'label': pred.label,
                'score': float(pred.score), 'task_id': int(pred.task_id),
                'topk': [{'label': label, 'score': float(score)} for label, score in pred.topk],
                'latency_ms': latency_ms, 'model_version': version,
            }
            self._predictions_pub.publish(String(data=json.dumps(out)))
            with self._stats.lock:
                self._stats.classified += 1
                self._stats.latencies_ms.append(latency_ms)
                self._stats.prompt_selected[int(pred.task_id)] += 1
            if want_debug:
                self._publish_debug(frame, pred.label, pred.score)

    def _publish_debug(self, frame: _Frame, label: str, score: float) -> None:
        bgr = draw_label(frame.rgb, label, score)
        msg = Image()
        msg.header = frame.msg.header
        msg.height, msg.width = int(bgr.shape[0]), int(bgr.shape[1])
        msg.encoding = 'bgr8'
        msg.step = int(bgr.shape[1] * 3)
        msg.data = bgr.tobytes()
        self._debug_pub.publish(msg)
        with self._stats.lock:
            self._stats.debug_images += 1

    # ----------------------------------------------------------------- services
    def _on_learn_task(self, request: Trigger.Request, response: Trigger.Response
                       ) -> Trigger.Response:
        # Reliability fix: train on one dedicated thread, not on whichever executor thread
        # took the call. glibc gives each thread its own malloc arena and keeps an arena's
        # peak, so learning on the executor's threads in turn grew the node's RSS by tens of
        # MB per task until every thread had hosted one (found with scripts/soak.py). The
        # gate refuses a concurrent call at once instead of queueing it behind the first.
        if not self._learn_gate.acquire(blocking=False):
            ok, reply = False, {'error': 'a task is already being learned; call again when '
                                         'it is done'}
        else:
            try:
                ok, reply = self._learn_pool.submit(self._learn_task).result()
            except RuntimeError:  # the pool is shut down: the node is stopping
                ok, reply = False, {'error': 'the node is shutting down'}
            finally:
                self._learn_gate.release()
                _release_memory()
        response.success = ok
        response.message = json.dumps(reply)
        return response

    def _learn_task(self) -> Tuple[bool, Dict[str, Any]]:
        if self.learner.is_learning:
            return False, {'error': 'a task is already being learned; call again when it is '
                                    'done'}
        snapshot = self.buffer.snapshot()
        if not len(snapshot):
            return False, {'error': 'the sample buffer is empty: publish labelled images on '
                                    '~/labelled_images or teach with ~/teach first'}
        counts = snapshot.counts()
        need = self._values['min_samples_per_class']
        few = {label: n for label, n in sorted(counts.items()) if n < need}
        if few:
            return False, {'error': f'too few samples for classes {few}: each class needs at '
                                    f'least min_samples_per_class={need}', 'buffer': counts}
        self._sync_state_with_config()
        self.get_logger().info(f'learning a task of {len(snapshot)} samples: {counts}')
        try:
            result = self.learner.learn_task(list(snapshot.images), list(snapshot.labels),
                                             progress=self._publish_progress,
                                             cancel=self._cancel)
        except LearnerBusyError as exc:
            return False, {'error': str(exc)}
        except LearningError as exc:
            self._last_error = str(exc)
            if not self._cancel.is_set():
                self.get_logger().error(f'learn_task failed: {exc}')
            return False, {'error': str(exc)}
        except Exception as exc:  # noqa: BLE001 - keep the node (and the old model) alive
            self._last_error = f'{type(exc).__name__}: {exc}'
            self.get_logger().error(f'learn_task failed unexpectedly: {self._last_error}')
            return False, {'error': f'learning failed unexpectedly: {self._last_error}'}
        finally:
            self._progress = None
        # Samples that arrived during learning stay for the next task.
        self.buffer.remove(snapshot.ids)
        self._sync_state_with_config()
        reply = result.as_dict()
        reply['checkpoint'] = None
        if self._checkpoint_dir:
            reply['checkpoint'], error = self._save_checkpoint()
            if error:
                reply['checkpoint_error'] = error
        self._last_task = reply
        self._last_error = ''
        self._publish_labels()
        self.get_logger().info(
            f"learned task {result.task_id} {result.classes}: train accuracy "
            f"{result.train_accuracy:.3f} in {result.duration_s:.1f} s, "
            f"{result.replaced_units} CBP replacements, checkpoint {reply['checkpoint']}")
        return True, reply

    def _on_clear_buffer(self, request: Trigger.Request, response: Trigger.Response
                         ) -> Trigger.Response:
        cleared = self.buffer.clear()
        self.get_logger().info(f'cleared {cleared} buffered samples')
        response.success = True
        response.message = json.dumps({'cleared': cleared})
        return response

    def _on_save(self, request: Trigger.Request, response: Trigger.Response
                 ) -> Trigger.Response:
        response.success = False
        if not self._checkpoint_dir:
            reply: Dict[str, Any] = {'error': 'persistence is off (checkpoint_dir is empty)'}
        elif self.learner.num_tasks == 0:
            reply = {'error': 'nothing to save: no task has been learned yet'}
        else:
            path, error = self._save_checkpoint()
            _release_memory()  # the serialised copy of the model (see _on_learn_task)
            if error:
                reply = {'error': error}
            else:
                response.success = True
                reply = {'checkpoint': path, 'model_version': self.learner.model_version}
        response.message = json.dumps(reply)
        return response

    def _save_checkpoint(self) -> Tuple[Optional[str], str]:
        """``(path, '')`` or ``(None, error)``; one writer at a time (same temp file name)."""
        with self._save_lock:
            try:
                return self.learner.save_checkpoint(self._checkpoint_dir), ''
            except (ckpt.CheckpointError, OSError) as exc:
                self.get_logger().error(f'could not save a checkpoint: {exc}')
                return None, str(exc)

    # ----------------------------------------------------------------- outputs
    def _publish_progress(self, progress: Progress) -> None:
        self._progress = progress
        if not self.context.ok():  # shutting down (SIGINT): stop training, keep the old model
            self._cancel.set()
            return
        try:
            self._progress_pub.publish(String(data=json.dumps(dataclasses.asdict(progress))))
        except Exception as exc:  # noqa: BLE001 - a lost progress message must not stop learning
            self.get_logger().warning(f'could not publish progress: {exc}',
                                      throttle_duration_sec=10.0)

    def _publish_labels(self) -> None:
        labels = {'model_version': self.learner.model_version, 'tasks': self.learner.tasks,
                  'classes': self.learner.classes}
        self._labels_pub.publish(String(data=json.dumps(labels)))

    def _publish_diagnostics(self) -> None:
        try:
            array = DiagnosticArray()
            array.header.stamp = self.get_clock().now().to_msg()
            array.status = [self._inference_status(), self._learner_status(),
                            self._cbp_status(), self._prompts_status()]
            self._diagnostics_pub.publish(array)
        except Exception as exc:  # noqa: BLE001 - diagnostics must never take the node down
            self.get_logger().error(f'diagnostics failed: {exc}', throttle_duration_sec=10.0)

    def _status(self, name: str, level: bytes, message: str, values: Dict[str, Any]
                ) -> DiagnosticStatus:
        return DiagnosticStatus(
            level=level, name=f'cbpnet: {name}', message=message,
            hardware_id=self._hardware_id,
            values=[KeyValue(key=k, value=v if isinstance(v, str) else json.dumps(v))
                    for k, v in values.items()])

    def _inference_status(self) -> DiagnosticStatus:
        stats = self._stats
        now = time.monotonic()
        with stats.lock:
            then, received0, classified0 = stats.last_report
            received, classified = stats.received, stats.classified
            stats.last_report = (now, received, classified)
            latencies = sorted(stats.latencies_ms)
            rejected = dict(stats.rejected)
            by_input = dict(stats.rejected_by_input)
            dropped, debug = stats.dropped, stats.debug_images
        elapsed = max(now - then, 1e-6)
        values: Dict[str, Any] = {
            'input_rate_hz': round((received - received0) / elapsed, 3),
            'classified_rate_hz': round((classified - classified0) / elapsed, 3),
            'frames_received': received, 'frames_classified': classified,
            'dropped_frames': dropped,
            'rejected': sum(rejected.values()),
            **{f'rejected_{reason}': rejected.get(reason, 0) for reason in REJECT_REASONS},
            **{f'rejected_{kind}': by_input.get(kind, 0)
               for kind in ('camera', 'labelled', 'teach')},
            'latency_mean_ms': round(float(np.mean(latencies)), 3) if latencies else 0.0,
            'latency_p95_ms': round(float(np.percentile(latencies, 95)), 3)
            if latencies else 0.0,
            'debug_images': debug,
            'device': str(self.learner.device), 'backbone': self.learner.config.backbone,
            'image_size': self.learner.config.image_size,
            'topics': self._camera_topics,
        }
        level, message = DiagnosticStatus.OK, 'classifying'
        if self.learner.num_tasks == 0:
            message = 'waiting for the first learned task'
        if sum(rejected.values()):
            message += f'; {sum(rejected.values())} bad messages rejected since start'
        return self._status('inference', level, message, values)

    def _learner_status(self) -> DiagnosticStatus:
        learner = self.learner
        counts = self.buffer.counts()
        progress = self._progress
        state = 'learning' if learner.is_learning else 'idle'
        teaching = self._teaching(time.monotonic())
        values = {
            'state': state, 'tasks': learner.num_tasks, 'classes': learner.classes,
            'model_version': learner.model_version, 'buffer_samples': sum(counts.values()),
            'buffer_per_class': counts, 'buffer_dropped': self.buffer.dropped,
            'teaching': teaching or '', 'teach_samples': self._stats.teach_samples,
            'labelled_samples': self._stats.labelled_accepted,
            'last_task': self._last_task if self._last_task is not None else '',
            'last_error': self._last_error,
            'max_label_length': MAX_LABEL_LENGTH,
        }
        if progress is not None:
            values['progress'] = dataclasses.asdict(progress)
        if learner.num_tasks == 0:
            level, message = DiagnosticStatus.WARN, 'no task learned yet'
        else:
            level, message = DiagnosticStatus.OK, (
                f'{learner.num_tasks} tasks, {len(learner.classes)} classes')
        if learner.is_learning:
            message = f'learning; {message}'
        if self._last_error:
            level, message = DiagnosticStatus.WARN, f'{message}; last learn_task failed'
        return self._status('learner', level, message, values)

    def _cbp_status(self) -> DiagnosticStatus:
        stats = self.learner.cbp_stats()
        message = (f"dormant {stats['dormant_fraction']:.2f}, "
                   f"{stats['replacements_total']} replacements")
        return self._status('cbp block', DiagnosticStatus.OK, message, stats)

    def _prompts_status(self) -> DiagnosticStatus:
        with self._stats.lock:
            selected = dict(self._stats.prompt_selected)
        values: Dict[str, Any] = {f'task_{t}': selected.get(t, 0)
                                  for t in range(self.learner.num_tasks)}
        values['selections_total'] = sum(selected.values())
        values['e_prompts'] = self.learner.num_tasks
        message = f'{self.learner.num_tasks} E-prompts'
        return self._status('prompts', DiagnosticStatus.OK, message, values)

    # ----------------------------------------------------------------- shutdown
    def stop(self) -> None:
        """Cancel learning and stop the inference thread (idempotent; before shutdown)."""
        self._stop.set()
        self._cancel.set()
        pool = getattr(self, '_learn_pool', None)
        if pool is not None:
            pool.shutdown(wait=False)  # a running task sees _cancel and ends
        cond = getattr(self, '_frames_cond', None)
        if cond is not None:
            with cond:
                cond.notify_all()
        worker = self._worker
        if worker is not None and worker.is_alive() and worker is not threading.current_thread():
            worker.join(timeout=30.0)

    def destroy_node(self) -> None:
        """Stop the worker, then destroy the ROS entities."""
        self.stop()
        super().destroy_node()


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
        rclpy.logging.get_logger('cbpnet').fatal(f'{type(exc).__name__}: {exc}')
        code = 1
    finally:
        # Order matters (docs/environment.md): stop our threads and the executor's, then
        # destroy the node, then shut rclpy down.
        if node is not None:
            node.stop()
        if executor is not None:
            executor.shutdown(timeout_sec=10.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == '__main__':
    raise SystemExit(main())
