"""Every parameter of ``cbpnet_node``: declarations, defaults and validation.

One place for what the node can be configured with. Learner settings are
:class:`~ros2_cbpnet.learning.learner.LearnerConfig` fields exposed under the same name, and their
defaults are read from ``LearnerConfig()`` itself, so the learner stays the single source of
truth (``config/cbpnet.yaml`` mirrors :data:`DEFAULTS`; tests keep the three equal).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                ParameterType)
from rclpy.exceptions import (InvalidParameterTypeException, ParameterException,
                              ParameterUninitializedException)
from rclpy.node import Node
from rclpy.parameter import Parameter

from ..learning.learner import LearnerConfig
from ..learning.config import RECIPES
from .sample_buffer import validate_label

__all__ = ['CLASS_LABELS_PARAMETER', 'ConfigError', 'DEFAULTS', 'LEARNER_PARAMS',
           'NODE_DEFAULT_OVERRIDES', 'NOT_EXPOSED', 'PARAMETERS', 'ParamSpec', 'QOS_CHOICES',
           'check_parameters', 'declare_class_labels', 'declare_parameters', 'plain_value',
           'recipe_conflict', 'recipe_fixes', 'seal_parameters', 'set_node_parameter']

QOS_CHOICES = ('sensor_data', 'reliable')

#: LearnerConfig fields exposed as node parameters of the same name.
LEARNER_PARAMS: Tuple[str, ...] = (
    'backbone', 'backbone_checkpoint', 'device', 'precision', 'image_size', 'query_layers',
    'epochs', 'min_steps', 'batch_size', 'learning_rate', 'g_prompt_length', 'g_prompt_layers',
    'e_prompt_length', 'e_prompt_layers', 'pull_constraint_coeff', 'train_cbp_block',
    'cbp_enabled', 'cbp_hidden_units', 'cbp_replacement_rate', 'cbp_maturity_threshold',
    'cbp_decay_rate', 'prompt_selection', 'prediction', 'head_weight', 'lda_shrinkage',
    'feature_replay_coeff', 'g_prompt_first_task_only', 'key_steps', 'recipe', 'seed', 'top_k',
    'unknown_threshold', 'unknown_label', 'runtime', 'onnx_providers', 'inference_threads')
#: LearnerConfig fields deliberately not exposed (benchmark and numerical-safety knobs); a
#: test fails when LearnerConfig gains a field that is in neither tuple.
NOT_EXPOSED: Tuple[str, ...] = ('grad_clip_norm', 'trunk_cache_mb', 'fast_paths',
                                # an evaluation knob: the measured choice is fixed
                                'lda_spread')

#: The only node default that differs from LearnerConfig's: LearnerConfig's 0 means the
#: backbone's own size (224 for Lite0); 128 px keeps a 2-core robot at camera rate while
#: losing little accuracy on object-sized classes.
NODE_DEFAULT_OVERRIDES: Dict[str, Any] = {'image_size': 128}

#: Name of the read-only parameter that holds the current class list (VisionInfo's
#: ``database_location`` points at it, as ros_deep_learning does). Not a setting: the node
#: writes it after every change of the model, so it is not in :data:`PARAMETERS`.
CLASS_LABELS_PARAMETER = 'class_labels'


def _learner_defaults() -> Dict[str, Any]:
    defaults = LearnerConfig()
    values = {}
    for name in LEARNER_PARAMS:
        value = getattr(defaults, name)
        values[name] = list(value) if isinstance(value, (list, tuple)) else value
    values.update(NODE_DEFAULT_OVERRIDES)
    return values


#: Every parameter's default, the single source in code (config/cbpnet.yaml mirrors it and a
#: test keeps the two equal). Learner defaults come from LearnerConfig itself.
DEFAULTS: Dict[str, Any] = {
    **_learner_defaults(),
    # Relative, so a namespace applies and launch files remap it (as image_proc does).
    'image_topics': ['image'],
    'image_qos': 'sensor_data',
    'max_image_pixels': 8_000_000,
    'teach_rate_hz': 5.0,
    'teach_timeout_s': 30.0,
    'min_samples_per_class': 5,
    'max_samples_per_class': 500,
    'max_buffer_samples': 5000,
    'checkpoint_dir': '~/.ros/cbpnet',
    'diagnostics_period_s': 1.0,
    'publish_vision_msgs': True,
    'fleet_export': False,
    'fleet_import': False,
    'fleet_topic': '/cbpnet_fleet/classes',
    'fleet_peers': [],
    'robot_id': '',
    'fleet_max_bytes': 64 * 2 ** 20,
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
                           'need CUDA; auto = fp32 on CPU, bf16 on GPUs with native bf16, '
                           'else fp16 with loss scaling', constraints='auto, fp32, fp16 or '
                           'bf16', **_RO),
    'image_size': ParamSpec(_T.PARAMETER_INTEGER, 'network input side in pixels (frames are '
                            'resized to a square); 0 = backbone default', 0, 1024, **_RO),
    'query_layers': ParamSpec(_T.PARAMETER_INTEGER_ARRAY, 'backbone layers whose pooled outputs '
                              'form the frozen query of the class statistics; empty = family '
                              'default (CNN: last five stages, ViT: pre-logits); [-1] = the '
                              'last layer only', **_RO),
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
    # --- runtime of the frozen pass (read-only)
    'runtime': ParamSpec(_T.PARAMETER_STRING, 'runtime of the frozen pass of the statistics '
                         'recipe: auto = ONNX Runtime when installed and its export matches '
                         'torch, else torch; onnxruntime = refuse to start without it; torch',
                         constraints='auto, torch or onnxruntime', **_RO),
    'onnx_providers': ParamSpec(_T.PARAMETER_STRING_ARRAY, 'ONNX Runtime execution providers '
                                'in order (tensorrt, cuda, cpu or full names); empty = '
                                'TensorRT, CUDA, CPU, whichever exist, on a CUDA device, the '
                                'CPU otherwise', **_RO),
    'inference_threads': ParamSpec(_T.PARAMETER_INTEGER, 'intra-op threads of ONNX Runtime '
                                   'and torch; 0 = one per core', 0, 256, **_RO),
    # --- learning (apply to the next learned task)
    'epochs': ParamSpec(_T.PARAMETER_INTEGER, 'training epochs per task (prediction task or '
                        'all)', 1, 1000),
    'min_steps': ParamSpec(_T.PARAMETER_INTEGER, 'a task with few samples gets more epochs, up '
                           'to at least this many optimiser steps', 0, 100000),
    'batch_size': ParamSpec(_T.PARAMETER_INTEGER, 'training batch size', 1, 4096),
    'learning_rate': ParamSpec(_T.PARAMETER_DOUBLE, 'Adam learning rate (constant), > 0', 0.0,
                               10.0),
    'pull_constraint_coeff': ParamSpec(_T.PARAMETER_DOUBLE, 'weight of the key pull '
                                       'constraint in the loss', 0.0, 1000.0),
    'train_cbp_block': ParamSpec(_T.PARAMETER_BOOL, 'train the CBP block; false = it stays '
                                 'the identity (as in the published DualPrompt)'),
    'cbp_enabled': ParamSpec(_T.PARAMETER_BOOL, 'continual backpropagation on; false = the '
                             'same block trained without unit replacement'),
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
    'key_steps': ParamSpec(_T.PARAMETER_INTEGER, 'Adam steps of the pull constraint each '
                           "E-prompt key gets at least (on the task's cached queries)", 0,
                           1_000_000),
    'seed': ParamSpec(_T.PARAMETER_INTEGER, 'random seed of training', 0, 2 ** 31 - 1),
    # --- recipe (applies to prediction at once, to learning from the next task)
    'recipe': ParamSpec(_T.PARAMETER_STRING, 'custom = every parameter as set (the defaults '
                        'are the statistics recipe); paper = the published CBPNet: sets '
                        'prediction all, prompt_selection key, feature_replay_coeff 0, '
                        'g_prompt_first_task_only false, train_cbp_block true and keeps them '
                        'so (cbp_enabled false = its DualPrompt baseline)',
                        constraints='custom or paper'),
    # --- prediction (apply at once)
    'prompt_selection': ParamSpec(_T.PARAMETER_STRING, 'how the E-prompt is chosen for a '
                                  'frame', constraints='key, class_mean or lda'),
    'prediction': ParamSpec(_T.PARAMETER_STRING, 'stats = closed-form LDA over the class '
                            'statistics, nothing trained (one backbone pass); task = stats '
                            'plus the prompted head within the selected task; all = the '
                            "paper's softmax over all classes", constraints='stats, task or '
                            'all'),
    'head_weight': ParamSpec(_T.PARAMETER_DOUBLE, 'weight of the prompted head against the '
                             'LDA inside the selected task (prediction task)', 0.0, 1000.0),
    'lda_shrinkage': ParamSpec(_T.PARAMETER_DOUBLE, 'isotropic share of the LDA covariance',
                               0.0, 1.0),
    'top_k': ParamSpec(_T.PARAMETER_INTEGER, 'entries in each prediction topk list (at most '
                       'the number of classes)', 1, 1000),
    'unknown_threshold': ParamSpec(_T.PARAMETER_DOUBLE, 'a frame whose novelty (0 = typical '
                                   'of a taught class, 1 = one standard deviation less like '
                                   'one) is above this is reported as unknown_label (known: '
                                   'false); 0 = never say unknown', 0.0, 1e9),
    'unknown_label': ParamSpec(_T.PARAMETER_STRING, 'label of frames unlike anything taught; '
                               'do not teach a class of this name'),
    'publish_vision_msgs': ParamSpec(_T.PARAMETER_BOOL, 'also publish ~/classification and '
                                     '~/vision_info (vision_msgs); no effect when vision_msgs '
                                     'is not installed'),
    # --- input
    'image_topics': ParamSpec(_T.PARAMETER_STRING_ARRAY, 'camera topics to classify (relative '
                              'names follow the namespace and remappings); names ending in '
                              '/compressed are CompressedImage', **_RO),
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
                                'change of the model (learn, undo, forget) and on ~/save, and '
                                'loaded at start; ~ is expanded; empty = no persistence',
                                **_RO),
    'diagnostics_period_s': ParamSpec(_T.PARAMETER_DOUBLE, 'period of /diagnostics', 0.01,
                                      3600.0),
    # --- fleet (README, "Fleet")
    'fleet_export': ParamSpec(_T.PARAMETER_BOOL, "publish this robot's class statistics on "
                              'fleet_topic after each learned task, undo and forget', **_RO),
    'fleet_import': ParamSpec(_T.PARAMETER_BOOL, "merge other robots' class statistics of the "
                              'same feature from fleet_topic', **_RO),
    'fleet_topic': ParamSpec(_T.PARAMETER_STRING, 'absolute topic the fleet shares (reliable, '
                             'transient-local)', **_RO),
    'fleet_peers': ParamSpec(_T.PARAMETER_STRING_ARRAY, 'robot ids accepted; empty = any robot '
                             'with the same feature'),
    'robot_id': ParamSpec(_T.PARAMETER_STRING, "this robot's id in the fleet; empty = the "
                          "node's fully qualified name", **_RO),
    'fleet_max_bytes': ParamSpec(_T.PARAMETER_INTEGER, 'largest contribution accepted',
                                 1024, 2 ** 31 - 1, **_RO),
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
    try:
        # The same rules as a taught label: it is shown wherever labels are.
        validate_label(values['unknown_label'])
    except ValueError as exc:
        raise ValueError(f'unknown_label: {exc}') from exc
    if not values['fleet_topic'].startswith('/') or ' ' in values['fleet_topic']:
        raise ValueError(f"fleet_topic must be an absolute topic name, not "
                         f"{values['fleet_topic']!r}")
    if any(not isinstance(p, str) or not p.strip() for p in values['fleet_peers']):
        raise ValueError(f"fleet_peers holds an empty robot id: {values['fleet_peers']}")
    if values['unknown_threshold'] < 0 or not math.isfinite(values['unknown_threshold']):
        raise ValueError('unknown_threshold must be >= 0 (0 = never say unknown)')
    config = LearnerConfig(**{name: values[name] for name in LEARNER_PARAMS})
    config.validate()
    if config.image_size and config.image_size < 16:
        raise ValueError('image_size must be 0 or 16..1024')
    return config


def recipe_fixes(values: Dict[str, Any]) -> Dict[str, Any]:
    """The parameters whose values the selected ``recipe`` overrules, with the values it
    gives them (empty when they already agree or the recipe is ``custom``)."""
    return {name: value for name, value in RECIPES.get(values.get('recipe'), {}).items()
            if values.get(name) != value}


def recipe_conflict(current: Dict[str, Any], changes: Dict[str, Any]) -> Optional[str]:
    """Why a change of parameters contradicts the recipe it leaves selected, or None.

    Switching ``recipe`` to ``paper`` is fine (the node then writes the recipe's values);
    changing a field that ``paper`` fixes while it stays selected is refused, so a parameter
    never reads back a value the learner does not use.
    """
    recipe = changes.get('recipe', current.get('recipe'))
    fixed = RECIPES.get(recipe, {})
    clash = sorted(name for name, value in changes.items()
                   if name in fixed and value != fixed[name])
    if not clash:
        return None
    return (f"recipe '{recipe}' fixes {', '.join(f'{n}={fixed[n]}' for n in clash)}; "
            "set recipe to custom first")


def _descriptor(name: str, spec: ParamSpec) -> ParameterDescriptor:
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
    return descriptor


def declare_parameters(node: Node) -> Dict[str, Any]:
    """Declare every parameter of :data:`PARAMETERS` on ``node`` (descriptions, ranges) and
    return their values (overrides applied). Read-only parameters stay writable by the node
    until :func:`seal_parameters`, so it can write the values it really uses first (a
    recipe's fields, a layout a checkpoint imposes: :func:`set_node_parameter`).

    A list parameter left empty holds a typed empty list, so ``ros2 param get`` and ``ros2
    param dump`` read it (rclpy has no type for a bare ``[]``: declared the usual way it stays
    "not set", and one unset name makes ``get_parameters`` answer nothing for the whole
    request). Call before any parameter callback is added.

    Raises:
        ConfigError: an override of the wrong type or out of range.
    """
    values: Dict[str, Any] = {}
    for name, spec in PARAMETERS.items():
        descriptor = _descriptor(name, spec)
        descriptor.read_only = False
        default = DEFAULTS[name]
        try:
            if spec.type in _ARRAY_TYPES and not default:
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
            node.set_parameters([Parameter(name, _ARRAY_TYPES[spec.type], [])])
        values[name] = plain_value(value)
    return values


def set_node_parameter(node: Node, name: str, value: Any) -> None:
    """Give a parameter the value the node really uses (before :func:`seal_parameters`)."""
    kind = _ARRAY_TYPES.get(PARAMETERS[name].type)
    result = node.set_parameters([Parameter(name, kind, list(value)) if kind else
                                  Parameter(name, value=value)])[0]
    if not result.successful:
        raise ConfigError(f'could not set {name}: {result.reason}')


def seal_parameters(node: Node) -> None:
    """Make the read-only parameters read-only (after the node wrote what it uses)."""
    for name, spec in PARAMETERS.items():
        if spec.read_only:
            node.set_descriptor(name, _descriptor(name, spec))


def declare_class_labels(node: Node) -> None:
    """Declare :data:`CLASS_LABELS_PARAMETER` (a string list the node keeps up to date).

    Not read-only in the rcl sense, because the node itself must be able to set it; the
    node's parameter callback refuses changes from outside instead.
    """
    descriptor = ParameterDescriptor(
        name=CLASS_LABELS_PARAMETER, type=_T.PARAMETER_STRING_ARRAY,
        description='the classes the model can predict, in head order; written by the node '
                    'after every learn, undo and forget (setting it is refused)',
        additional_constraints='read only')
    node.declare_parameter(CLASS_LABELS_PARAMETER, Parameter.Type.STRING_ARRAY, descriptor,
                           ignore_override=True)


def plain_value(value: Any) -> Any:
    """rclpy array values (array.array) as plain lists."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == 'array':
        return list(value)
    return value


def learner_fields() -> Tuple[str, ...]:
    """Names of every LearnerConfig field (for the one-source-of-truth test)."""
    return tuple(f.name for f in dataclasses.fields(LearnerConfig))
