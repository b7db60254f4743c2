"""Predictions as standard ``vision_msgs`` (Classification, VisionInfo), when installed.

``vision_msgs`` comes with every apt ROS 2 install but has no PyPI wheel, so it is optional:
:func:`load_vision_msgs` returns None without it and the node then publishes only its JSON.
The mapping itself is plain functions over plain data, with the message classes passed
in, so it is tested with stand-in classes that have the same fields (vision_msgs 4.x, the
version of Humble and later):

- ``Classification``: ``header``, ``results`` (``ObjectHypothesis[]``)
- ``ObjectHypothesis``: ``class_id`` (string), ``score`` (float64)
- ``VisionInfo``: ``header``, ``method``, ``database_location``, ``database_version`` (int32)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

__all__ = ['VisionTypes', 'classification_message', 'hypotheses', 'load_vision_msgs',
           'method_name', 'vision_info_message']

_INT32_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class VisionTypes:
    """The three vision_msgs message classes the node publishes with."""

    Classification: Any
    ObjectHypothesis: Any
    VisionInfo: Any


def load_vision_msgs() -> Tuple[Optional[VisionTypes], str]:
    """``(types, '')`` when vision_msgs (4.x field names) imports, else ``(None, why)``."""
    try:
        from vision_msgs.msg import Classification, ObjectHypothesis, VisionInfo
    except ImportError as exc:
        return None, f'vision_msgs is not installed ({exc})'
    if not hasattr(ObjectHypothesis, 'class_id'):  # a property of rosidl message classes
        return None, 'vision_msgs is older than 4.0 (no ObjectHypothesis.class_id)'
    return VisionTypes(Classification, ObjectHypothesis, VisionInfo), ''


def hypotheses(label: str, score: float, known: bool,
               topk: Sequence[Tuple[str, float]]) -> List[Tuple[str, float]]:
    """``(class_id, score)`` pairs of one prediction, best first.

    The top-k taught classes; for a frame that is unlike anything taught (``known`` false)
    they are led by ``(label, score)``, where ``label`` is then the unknown label and
    ``score`` the best taught class's score, exactly as in the JSON prediction. So
    ``results[0]`` is always the JSON ``label``.
    """
    pairs = [(str(name), float(value)) for name, value in topk]
    if not known:
        pairs.insert(0, (str(label), float(score)))
    return pairs


def classification_message(header: Any, pairs: Sequence[Tuple[str, float]],
                           types: VisionTypes) -> Any:
    """A ``Classification`` with ``header`` (the classified image's) and one
    ``ObjectHypothesis`` per ``(class_id, score)`` pair."""
    msg = types.Classification()
    msg.header = header
    results = []
    for class_id, score in pairs:
        hypothesis = types.ObjectHypothesis()
        hypothesis.class_id = class_id
        hypothesis.score = score
        results.append(hypothesis)
    msg.results = results
    return msg


def method_name(config: Any) -> str:
    """VisionInfo ``method``: what classifies the frames, from a learner configuration.

    Says which of CBPNet's parts are in use: under ``prediction: stats`` no prompt and no
    CBP block touch a frame, and the text says so rather than "CBP on".
    """
    backbone = config.backbone
    cbp = 'CBP on' if config.cbp_enabled else 'CBP off'
    if not config.train_cbp_block:
        cbp = 'CBP block untrained'
    if config.prediction == 'stats':
        return (f'class statistics (shrinkage LDA) of a frozen multi-layer query of {backbone}; '
                'prompts and CBP block not in use')
    if config.recipe == 'paper':
        name = 'CBPNet, paper recipe' if config.cbp_enabled else \
            'DualPrompt (CBPNet paper recipe, CBP off)'
        return (f'{name} on {backbone}: key-selected E-prompts, CBP block ({cbp}), '
                'softmax head over all classes')
    return (f'CBPNet on {backbone} (selection {config.prompt_selection}, prediction '
            f'{config.prediction}, {cbp})')


def vision_info_message(stamp: Any, method: str, database_location: str, model_version: int,
                        types: VisionTypes) -> Any:
    """A ``VisionInfo``; ``database_version`` is the model version (clamped to int32)."""
    msg = types.VisionInfo()
    msg.header.stamp = stamp
    msg.method = method
    msg.database_location = database_location
    msg.database_version = max(0, min(int(model_version), _INT32_MAX))
    return msg
