"""What the learner hands out: predictions, the summary of a learned task, progress, and the
errors that refuse a change (no ROS here; the evaluation baselines return the same types)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .fleet import Contribution

__all__ = ['LearnerBusyError', 'LearningCancelled', 'LearningError', 'Prediction', 'Progress',
           'TaskResult']


@dataclass
class Prediction:
    """One classified image.

    ``label`` is the best taught class, or the configured ``unknown_label`` when ``known`` is
    False; ``score`` and ``topk`` always refer to taught classes. ``novelty``: 0 is typical
    for a new view of a taught class, each unit one standard deviation less like one (see
    :mod:`ros2_cbpnet.learning.model.statistics`). ``model_version`` is the version of the model
    that made this prediction.
    """

    label: str
    score: float
    task_id: int
    topk: List[Tuple[str, float]]
    novelty: float = 0.0
    known: bool = True
    model_version: int = 0
    #: What computed the frozen pass: ``'onnxruntime'`` or ``'torch'``, and its provider
    #: (an ONNX Runtime execution provider, or the torch device).
    runtime: str = 'torch'
    provider: str = 'cpu'


@dataclass
class TaskResult:
    """Summary of one ``learn_task`` call (the service reply carries these fields).

    ``task_id`` is None when every label was already known (the call only refined those
    classes and added no task). ``classes`` = ``new_classes`` + ``refined_classes``, sorted.
    ``key_query_cosine`` close to ``key_query_cosine_max`` means the key converged.
    """

    task_id: Optional[int]
    classes: List[str]
    num_samples: int
    epochs: int
    train_accuracy: float
    duration_s: float
    replaced_units: int
    model_version: int
    new_classes: List[str] = field(default_factory=list)
    refined_classes: List[str] = field(default_factory=list)
    #: Mean cosine of the new task's key with its training queries, and the most any key
    #: could reach on them (None when no prompt was trained).
    key_query_cosine: Optional[float] = None
    key_query_cosine_max: Optional[float] = None
    #: The statistics of this call for the fleet (``learn_task(export=...)``), else None.
    contribution: Optional[Contribution] = field(default=None, repr=False)

    def as_dict(self) -> Dict[str, Any]:
        """Plain dict for JSON (without the contribution)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != 'contribution'}


class LearningError(RuntimeError):
    """``learn_task`` refused or rolled back; the previous model is intact."""


class LearnerBusyError(LearningError):
    """A task is already being learned."""


class LearningCancelled(LearningError):
    """``learn_task`` was cancelled through its ``cancel`` event; nothing changed."""

    def __init__(self) -> None:
        super().__init__('cancelled')


@dataclass
class Progress:
    """Progress of one ``learn_task``.

    ``stage`` is ``'features'`` during the frozen pass over the task's images (``done`` of
    ``total`` images, after every chunk), ``'training'`` after every optimiser step of the
    prompt training (``epoch``/``step`` of ``epochs``/``steps``, the batch's ``loss`` and
    the epoch's ``accuracy`` so far) and ``'done'`` once at the end. ``task_id`` is None
    when the call only refines known classes.
    """

    task_id: Optional[int]
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    accuracy: float
    replaced_units: int
    stage: str = 'training'
    done: int = 0
    total: int = 0
