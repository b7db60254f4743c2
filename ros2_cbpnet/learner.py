"""The continual learner: class registry, ``learn_task``, ``predict`` and checkpoints.

No ROS import here: the node, the offline evaluation and the benchmark all drive this class.

Threading model (design.md section 3): everything a prediction needs (learned state, class
names, tasks, model version) lives in one immutable snapshot that is replaced with a single
reference assignment. ``learn_task`` trains a deep copy of the small learned state in the
calling thread while other threads keep predicting with the old snapshot, then swaps the new
one in. The frozen backbone is shared and never copied; its forward pass mutates nothing.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .model.backbones import (EMBEDDED_BACKBONE, Backbone, ViTBackbone,
                              backbone_parameter_count, load_backbone)
from .model.cbpnet import PREDICTION_MODES, SELECTION_MODES, CBPNet

__all__ = [
    'ContinualLearner', 'LearnerBusyError', 'LearnerConfig', 'LearningCancelled',
    'LearningError', 'Prediction', 'Progress', 'TaskResult', 'UNDO_DEPTH',
    'default_prompt_layers',
]

_log = logging.getLogger(__name__)

#: Prompt layouts per backbone family, used when the config leaves the layers empty.
#: ViT: DualPrompt's published layout. CNN (EfficientNet-Lite0 stages 0-6 + head conv = 7):
#: late stages, so the unprompted trunk is shared between query and prompted pass.
VIT_G_LAYERS, VIT_E_LAYERS = [0, 1], [2, 3, 4]
CNN_G_LAYERS, CNN_E_LAYERS = [5], [6, 7]
#: Architecture fields stored in checkpoints; a saved model keeps its own layout.
#: Models from before this many learned tasks are kept in memory for ``undo_last_task``.
UNDO_DEPTH = 2
#: Longest accepted ``unknown_label`` (the node's label limit).
MAX_LABEL_LENGTH = 128
ARCH_FIELDS = ('g_prompt_length', 'g_prompt_layers', 'e_prompt_length', 'e_prompt_layers',
               'cbp_hidden_units', 'image_size')


@dataclass
class LearnerConfig:
    """Everything that configures a learner; the node's parameters map onto these fields.

    Empty ``g_prompt_layers``/``e_prompt_layers`` select the family default (ViT:
    DualPrompt's G in 0-1, E in 2-4; CNN: G in stage 5, E in stage 6 and the head conv).
    ``g_prompt_layers=[-1]`` means no G-prompt.

    Drift control (not in the paper; ``recipe='faithful'`` in ``cbpnet-eval`` switches both
    off): ``feature_replay_coeff`` weighs a cross-entropy on pseudo-features of earlier
    classes, drawn from per-class Gaussians of the block input, so training a new task does
    not silently re-purpose the shared CBP block and head; ``g_prompt_first_task_only``
    freezes the shared G-prompt after the first task so those statistics stay exact.

    ``fast_paths=False`` switches off the
    performance savings of design.md section 3 (shared trunk, one-task shortcut, per-task
    trunk cache) for benchmarking; results are the same up to float rounding.
    """

    backbone: str = EMBEDDED_BACKBONE
    backbone_checkpoint: str = ''
    device: str = 'auto'
    precision: str = 'fp32'
    image_size: int = 0
    epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 0.01
    g_prompt_length: int = 5
    g_prompt_layers: List[int] = field(default_factory=list)
    e_prompt_length: int = 5
    e_prompt_layers: List[int] = field(default_factory=list)
    pull_constraint_coeff: float = 1.0
    cbp_enabled: bool = True
    cbp_hidden_units: int = 64
    # Chosen by measurement (README, "Learning quality"): higher rates cost accuracy on
    # short task sequences; these fire a few times per five tasks and more on long runs.
    cbp_replacement_rate: float = 1e-4
    cbp_maturity_threshold: int = 200
    cbp_decay_rate: float = 0.99
    prompt_selection: str = 'lda'
    prediction: str = 'task'
    lda_shrinkage: float = 0.1
    feature_replay_coeff: float = 1.0
    g_prompt_first_task_only: bool = True
    grad_clip_norm: float = 1.0
    trunk_cache_mb: int = 512
    fast_paths: bool = True
    seed: int = 0
    top_k: int = 5
    #: Frames whose novelty exceeds this are reported as ``unknown_label``; <= 0 turns
    #: rejection off.
    unknown_threshold: float = 0.0
    unknown_label: str = 'unknown'

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        need(bool(self.backbone.strip()), 'backbone must be a timm model name')
        need(self.device in ('auto', 'cpu', 'cuda') or self.device.startswith('cuda:'),
             f"device must be auto, cpu or cuda[:N], not {self.device!r}")
        need(self.precision in ('fp32', 'fp16', 'bf16'),
             f'precision must be fp32, fp16 or bf16, not {self.precision!r}')
        need(self.image_size == 0 or 16 <= self.image_size <= 1024,
             'image_size must be 0 (backbone default) or 16..1024')
        need(1 <= self.epochs <= 1000, 'epochs must be 1..1000')
        need(1 <= self.batch_size <= 4096, 'batch_size must be 1..4096')
        need(math.isfinite(self.learning_rate) and self.learning_rate > 0,
             'learning_rate must be a positive number')
        need(0 <= self.g_prompt_length <= 256 and 1 <= self.e_prompt_length <= 256,
             'prompt lengths must be 0..256 (G) and 1..256 (E)')
        need(all(i >= -1 for i in self.g_prompt_layers)
             and all(i >= 0 for i in self.e_prompt_layers), 'prompt layers must be >= 0')
        need(math.isfinite(self.pull_constraint_coeff) and self.pull_constraint_coeff >= 0,
             'pull_constraint_coeff must be >= 0')
        need(1 <= self.cbp_hidden_units <= 65536, 'cbp_hidden_units must be 1..65536')
        need(0.0 <= self.cbp_replacement_rate <= 1.0, 'cbp_replacement_rate must be in [0, 1]')
        need(self.cbp_maturity_threshold >= 0, 'cbp_maturity_threshold must be >= 0')
        need(0.0 < self.cbp_decay_rate < 1.0, 'cbp_decay_rate must be in (0, 1)')
        need(self.prompt_selection in SELECTION_MODES,
             f'prompt_selection must be one of {SELECTION_MODES}')
        need(self.prediction in PREDICTION_MODES, f'prediction must be one of {PREDICTION_MODES}')
        need(0.0 <= self.lda_shrinkage <= 1.0, 'lda_shrinkage must be in [0, 1]')
        need(math.isfinite(self.feature_replay_coeff) and self.feature_replay_coeff >= 0,
             'feature_replay_coeff must be >= 0')
        need(self.grad_clip_norm > 0, 'grad_clip_norm must be > 0')
        need(1 <= self.top_k <= 1000, 'top_k must be 1..1000')
        need(math.isfinite(self.unknown_threshold),
             'unknown_threshold must be a finite number (<= 0 turns rejection off)')
        need(0 < len(self.unknown_label.strip()) <= MAX_LABEL_LENGTH,
             f'unknown_label must be 1..{MAX_LABEL_LENGTH} characters')

    def replace(self, **changes: Any) -> 'LearnerConfig':
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass
class Prediction:
    """One classified image.

    ``label`` is the best taught class, or the configured ``unknown_label`` when ``known`` is
    False; ``score`` and ``topk`` always refer to taught classes. ``novelty`` is >= 0, higher
    meaning less like anything taught. ``model_version`` is the version of the model that
    made this prediction.
    """

    label: str
    score: float
    task_id: int
    topk: List[Tuple[str, float]]
    novelty: float = 0.0
    known: bool = True
    model_version: int = 0


@dataclass
class Progress:
    """Training progress, reported after every optimiser step."""

    task_id: int
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    accuracy: float
    replaced_units: int


@dataclass
class TaskResult:
    """Summary of one ``learn_task`` call (the service reply carries these fields).

    ``task_id`` is None when every label was already known (the call only refined those
    classes and added no task). ``classes`` = ``new_classes`` + ``refined_classes``, sorted.
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

    def as_dict(self) -> Dict[str, Any]:
        """Plain dict for JSON."""
        return dataclasses.asdict(self)


class LearningError(RuntimeError):
    """``learn_task`` refused or rolled back; the previous model is intact."""


class LearnerBusyError(LearningError):
    """A task is already being learned."""


class LearningCancelled(LearningError):
    """``learn_task`` was cancelled through its ``cancel`` event; nothing changed."""

    def __init__(self) -> None:
        super().__init__('cancelled')


@dataclass(frozen=True)
class _Snapshot:
    state: CBPNet
    classes: Tuple[str, ...]          # every class ever learned, in head order
    tasks: Tuple[Tuple[str, ...], ...]
    model_version: int


def _forgotten(snap: _Snapshot) -> frozenset:
    active = snap.state.class_active.tolist()
    return frozenset(c for c, a in zip(snap.classes, active) if not a)


def _apply_state_config(state: CBPNet, config: 'LearnerConfig') -> None:
    """Copy the settings the learned state carries from ``config`` (a fresh copy only)."""
    state.prompt_selection = config.prompt_selection
    state.prediction = config.prediction
    state.lda_shrinkage = config.lda_shrinkage
    state.cbp.enabled = config.cbp_enabled
    state.cbp.replacement_rate = config.cbp_replacement_rate
    state.cbp.maturity_threshold = config.cbp_maturity_threshold
    state.cbp.decay_rate = config.cbp_decay_rate


def default_prompt_layers(backbone: Backbone) -> Tuple[List[int], List[int]]:
    """(G layers, E layers) of the family default layout, clipped to the model's depth."""
    g, e = (VIT_G_LAYERS, VIT_E_LAYERS) if isinstance(backbone, ViTBackbone) \
        else (CNN_G_LAYERS, CNN_E_LAYERS)
    last = backbone.num_layers - 1
    e = sorted({min(i, last) for i in e})
    g = sorted({min(i, last) for i in g})
    return g, e


def resize_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Stack uint8 RGB (H, W, 3) or grey (H, W[, 1]) images as a (N, size, size, 3) batch.

    Shrinking uses area interpolation (no aliasing), enlarging bilinear.

    Raises:
        ValueError: an image is not a non-empty uint8 array of 1 or 3 channels.
    """
    batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim not in (2, 3) or img.size == 0 \
                or (img.ndim == 3 and img.shape[2] not in (1, 3)):
            raise ValueError(f'image {i}: expected uint8 (H, W, 3) or (H, W), got '
                             f'{img.dtype} {img.shape}')
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        h, w = img.shape[:2]
        if (h, w) != (size, size):
            shrink = h > size or w > size
            img = cv2.resize(img, (size, size),
                             interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        batch[i] = img[:, :, None] if img.ndim == 2 else img
    return batch


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an error."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'device {name!r} requested but CUDA is not available')
    return torch.device(name)


class ContinualLearner:
    """Learns task after task of new classes from labelled images; predicts at any time.

    Args:
        config: the learner configuration (validated here).
        backbone: an already loaded backbone to share (e.g. between evaluation runs);
            loaded from ``config`` when omitted.

    Raises:
        ValueError: invalid configuration.
        BackboneLoadError: the backbone or its weights cannot be loaded.

    Example:
        >>> learner = ContinualLearner(LearnerConfig(image_size=64))  # doctest: +SKIP
        >>> learner.learn_task(images, ['cup', 'cup', 'shoe', 'shoe'])  # doctest: +SKIP
        >>> learner.predict([frame])[0].label  # doctest: +SKIP
        'cup'
    """

    def __init__(self, config: LearnerConfig, backbone: Optional[Backbone] = None) -> None:
        config.validate()
        self.device = resolve_device(config.device)
        if config.precision != 'fp32' and self.device.type != 'cuda':
            raise ValueError(f'precision {config.precision} needs a CUDA device')
        self.backbone = backbone if backbone is not None else load_backbone(
            config.backbone, config.backbone_checkpoint, image_size=config.image_size)
        self.backbone.to(self.device)
        g, e = default_prompt_layers(self.backbone)
        if not config.g_prompt_layers:
            config = config.replace(g_prompt_layers=g)
        if config.g_prompt_layers == [-1]:
            config = config.replace(g_prompt_layers=[])
        if not config.e_prompt_layers:
            config = config.replace(e_prompt_layers=e)
        if not config.image_size:
            config = config.replace(image_size=self.backbone.input_size)
        self.config = config
        self._autocast_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(
            config.precision)
        mean = torch.tensor(self.backbone.mean, dtype=torch.float32, device=self.device)
        std = torch.tensor(self.backbone.std, dtype=torch.float32, device=self.device)
        # uint8 -> normalised float in one fused multiply-add: x * scale + offset.
        self._norm_scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self._norm_offset = (-mean / std).view(1, 3, 1, 1)
        self._learn_lock = threading.Lock()
        self._snapshot = _Snapshot(self._new_state(), (), (), 0)
        # Snapshots from before each of the last UNDO_DEPTH learned tasks (oldest first).
        self._history: List[_Snapshot] = []
        self.replacements_last_task = 0

    # ------------------------------------------------------------ properties
    def _new_state(self) -> CBPNet:
        c = self.config
        state = CBPNet(
            self.backbone, g_prompt_length=c.g_prompt_length, g_prompt_layers=c.g_prompt_layers,
            e_prompt_length=c.e_prompt_length, e_prompt_layers=c.e_prompt_layers,
            cbp_hidden_units=c.cbp_hidden_units, cbp_replacement_rate=c.cbp_replacement_rate,
            cbp_maturity_threshold=c.cbp_maturity_threshold, cbp_decay_rate=c.cbp_decay_rate,
            cbp_enabled=c.cbp_enabled, prompt_selection=c.prompt_selection,
            prediction=c.prediction, lda_shrinkage=c.lda_shrinkage)
        return state.to(self.device).eval()

    @property
    def classes(self) -> List[str]:
        """Names of the classes that can be predicted, in head order (forgotten ones left out)."""
        snap = self._snapshot
        return [c for c in snap.classes if c not in _forgotten(snap)]

    @property
    def forgotten_classes(self) -> List[str]:
        """Classes removed with :meth:`forget`, in head order."""
        snap = self._snapshot
        return [c for c in snap.classes if c in _forgotten(snap)]

    @property
    def tasks(self) -> List[Dict[str, Any]]:
        """``[{'task_id': t, 'classes': [...]}, ...]`` of the learned tasks (without forgotten
        classes; a task whose classes were all forgotten keeps its id with an empty list)."""
        gone = _forgotten(self._snapshot)
        return [{'task_id': t, 'classes': [c for c in cs if c not in gone]}
                for t, cs in enumerate(self._snapshot.tasks)]

    @property
    def can_undo(self) -> bool:
        """True when :meth:`undo_last_task` has a model to go back to."""
        return bool(self._history)

    @property
    def num_tasks(self) -> int:
        """Number of learned tasks."""
        return len(self._snapshot.tasks)

    @property
    def model_version(self) -> int:
        """Increments with every learned task (and survives checkpoints)."""
        return self._snapshot.model_version

    @property
    def is_learning(self) -> bool:
        """True while ``learn_task`` runs."""
        return self._learn_lock.locked()

    @property
    def state(self) -> CBPNet:
        """The learned state currently used for prediction (do not modify)."""
        return self._snapshot.state

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters trained for one task (G-prompt, one E-prompt and key, CBP block, head
        at its current size) and the frozen backbone's (without its ImageNet classifier)."""
        st = self._snapshot.state
        per_task = sum(p.numel() for p in st.g_prompt.parameters())
        per_task += sum(math.prod(s) for s in st._e_shapes.values()) + st.feature_dim
        per_task += sum(p.numel() for p in st.cbp.parameters())
        per_task += st.head_weight.numel() + st.head_bias.numel()
        return {'trainable_params': int(per_task),
                'backbone_params': backbone_parameter_count(self.backbone)}

    def cbp_stats(self) -> Dict[str, Any]:
        """CBP block statistics for diagnostics."""
        stats = self._snapshot.state.cbp.stats()
        stats['replacements_last_task'] = self.replacements_last_task
        return stats

    # --------------------------------------------------------- preprocessing
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Resize uint8 RGB images (H, W, 3) or grey (H, W) and normalise to a batch tensor.

        Raises:
            ValueError: an image is not a non-empty uint8 array of 1 or 3 channels.
        """
        batch = resize_batch(images, self.config.image_size)
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        return x * self._norm_scale + self._norm_offset

    def _autocast(self):
        if self._autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    # ------------------------------------------------------------ prediction
    def predict_tensor(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, _Snapshot]:
        """Class probabilities and task ids for a normalised batch, and the snapshot used."""
        snap = self._snapshot
        with torch.inference_mode(), self._autocast():
            probs, task_ids = snap.state.predict(self.backbone, x, self.config.fast_paths)
        return probs.float(), task_ids, snap

    def predict(self, images: Sequence[np.ndarray], top_k: Optional[int] = None
                ) -> List[Prediction]:
        """Classify RGB uint8 images.

        Raises:
            RuntimeError: no task has been learned yet.
            ValueError: malformed image arrays.
        """
        if not len(images):
            return []
        snap = self._snapshot
        if not snap.tasks or not bool(snap.state.class_active.any()):
            raise RuntimeError('no task has been learned yet')
        c = self.config
        reject = c.unknown_threshold > 0
        x = self.preprocess(images)
        with torch.inference_mode(), self._autocast():
            probs, task_ids, novelty = snap.state.predict_with_novelty(
                self.backbone, x, c.fast_paths, novelty=True)
        probs = probs.float()
        active = snap.state.class_active
        k = min(top_k or c.top_k, int(active.sum()))
        # Forgotten classes have probability 0, but so may others after underflow: keep them
        # out of the top-k explicitly.
        scores, idx = probs.masked_fill(~active, -1.0).topk(k, dim=1)
        scores, idx, task_ids = scores.cpu().tolist(), idx.cpu().tolist(), task_ids.cpu().tolist()
        novelty = novelty.float().cpu().tolist()
        out = []
        for s_row, i_row, t, nov in zip(scores, idx, task_ids, novelty):
            topk = [(snap.classes[i], float(s)) for i, s in zip(i_row, s_row)]
            known = not (reject and nov > c.unknown_threshold)
            out.append(Prediction(topk[0][0] if known else c.unknown_label, topk[0][1], int(t),
                                  topk, float(nov), known, snap.model_version))
        return out

    def evaluate(self, images: Sequence[np.ndarray], labels: Sequence[str],
                 batch_size: int = 64) -> float:
        """Accuracy of ``predict`` on labelled images (labels as class names)."""
        if not len(images):
            return float('nan')
        correct = 0
        for start in range(0, len(images), batch_size):
            preds = self.predict(images[start:start + batch_size], top_k=1)
            correct += sum(p.label == y for p, y in zip(preds, labels[start:start + batch_size]))
        return correct / len(images)

    # -------------------------------------------------------------- learning
    def learn_task(self, images: Sequence[np.ndarray], labels: Sequence[str], *,
                   progress: Optional[Callable[[Progress], None]] = None,
                   cancel: Optional[threading.Event] = None) -> TaskResult:
        """Learn one new task whose classes are the labels given.

        Trains G-prompt, a new E-prompt and key, the CBP block and the head on a copy of the
        learned state (class-masked cross-entropy minus the pull constraint; Adam with a
        constant learning rate and gradient-norm clipping), then swaps the copy in.

        Raises:
            LearnerBusyError: another task is being learned.
            LearningError: bad input, a label that an earlier task already owns, divergence
                (NaN/inf loss) or cancellation; the previous model stays in use.
        """
        if not self._learn_lock.acquire(blocking=False):
            raise LearnerBusyError('a task is already being learned')
        try:
            return self._learn_task(images, labels, progress, cancel)
        finally:
            self._learn_lock.release()

    def _learn_task(self, images: Sequence[np.ndarray], labels: Sequence[str],
                    progress: Optional[Callable[[Progress], None]],
                    cancel: Optional[threading.Event]) -> TaskResult:
        started = time.monotonic()
        if len(images) != len(labels):
            raise LearningError(f'{len(images)} images but {len(labels)} labels')
        if len(images) < 2:
            raise LearningError('a task needs at least 2 labelled images')
        labels = [str(label) for label in labels]
        if any(not label.strip() for label in labels):
            raise LearningError('empty labels are not allowed')
        base = self._snapshot
        gone = _forgotten(base)
        revived = sorted({label for label in labels if label in gone})
        if revived:
            raise LearningError(
                f'classes {revived} were forgotten; teach them under a new label')
        known = set(base.classes)
        new_classes = sorted({label for label in labels if label not in known})
        refined = sorted({label for label in labels if label in known})
        try:
            x = self.preprocess(images)
        except ValueError as exc:
            raise LearningError(f'bad training image: {exc}') from exc
        c = self.config
        torch.manual_seed(c.seed + len(base.tasks))
        state = copy.deepcopy(base.state)
        trunk, queries = self._frozen_pass(x, state.first_layer)
        task_id: Optional[int] = None
        replaced, train_accuracy, epochs = 0, 1.0, 0
        new_mask = torch.tensor([label not in known for label in labels], device=self.device)
        index = {name: i for i, name in enumerate(base.classes)}
        if new_classes:
            task_id = state.add_task()
            for name, i in zip(new_classes, state.add_classes(len(new_classes), task_id)):
                index[name] = i
            replaced, train_accuracy = self._train_task(
                state, task_id, x[new_mask], None if trunk is None else trunk[new_mask],
                queries[new_mask], torch.tensor([index[label] for label, m in zip(
                    labels, new_mask.tolist()) if m], device=self.device),
                progress, cancel, len(base.tasks))
            epochs = c.epochs
        if cancel is not None and cancel.is_set():
            raise LearningCancelled()
        y = torch.tensor([index[label] for label in labels], device=self.device)
        state.eval()
        # Feature statistics first: they are weighted by the class counts from before.
        state.merge_feature_statistics(y, self._block_inputs(state, x, trunk, state.class_task[y]))
        state.add_class_statistics(y, queries)
        state.invalidate_cache()
        state._inference_cache()  # built here so the first prediction after the swap is fast
        if new_classes:
            snap = _Snapshot(state, base.classes + tuple(new_classes),
                             base.tasks + (tuple(new_classes),), base.model_version + 1)
            self._history = (self._history + [base])[-UNDO_DEPTH:]
        else:
            snap = _Snapshot(state, base.classes, base.tasks, base.model_version + 1)
        self._snapshot = snap
        self.replacements_last_task = replaced
        return TaskResult(task_id, sorted(new_classes + refined), len(labels), epochs,
                          train_accuracy, time.monotonic() - started, replaced,
                          snap.model_version, new_classes, refined)

    def _train_task(self, state: CBPNet, task_id: int, x: torch.Tensor,
                    trunk: Optional[torch.Tensor], queries: torch.Tensor, y: torch.Tensor,
                    progress: Optional[Callable[[Progress], None]],
                    cancel: Optional[threading.Event], seed_offset: int) -> Tuple[int, float]:
        """Train the new task's prompts, the CBP block and the head on ``state`` in place.

        Returns:
            (CBP replacements, training accuracy of the last epoch).
        """
        c = self.config
        class_ids = sorted(set(y.tolist()))
        task_classes = torch.tensor(class_ids, device=self.device)
        # Labels relative to the task's own classes, for the class-masked cross-entropy.
        y_task = y - class_ids[0]
        state.train()
        train_g = not (c.g_prompt_first_task_only and task_id > 0)
        params = state.trainable_parameters(task_id, train_g)
        replay = state.replay_classes(task_id) if c.feature_replay_coeff > 0 else None
        replay = replay if replay is not None and len(replay) else None
        optimizer = torch.optim.Adam(params, lr=c.learning_rate)
        n = len(y)
        steps = math.ceil(n / c.batch_size) * c.epochs
        generator = torch.Generator().manual_seed(c.seed + 1000 * seed_offset)
        replaced, step, correct, seen = 0, 0, 0, 0
        for epoch in range(c.epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            correct, seen = 0, 0
            for start in range(0, n, c.batch_size):
                if cancel is not None and cancel.is_set():
                    raise LearningCancelled()
                idx = order[start:start + c.batch_size]
                h = trunk[idx] if trunk is not None else self._trunk(x[idx], state.first_layer)
                with self._autocast():
                    z = self.backbone.prompted_from_trunk(
                        h, state.first_layer, state.prompts_for(torch.full(
                            (len(idx),), task_id, device=self.device)))
                    if replay is not None:
                        # Old classes' pseudo-features share the batch through the block, so
                        # its utility also counts what earlier tasks rely on.
                        z_old, y_old = state.sample_replay(replay, len(idx), generator)
                        z = torch.cat([z, z_old.to(z.dtype)])
                    out = state.cbp(z)
                    logits = state.logits(out[:len(idx)], task_classes).float()
                    ce = F.cross_entropy(logits, y_task[idx])
                    pull = state.pull_constraint(queries[idx].float(), task_id)
                    loss = ce - c.pull_constraint_coeff * pull
                    if replay is not None:
                        old_logits = state.own_task_logits(out[len(idx):], y_old).float()
                        loss = loss + c.feature_replay_coeff * F.cross_entropy(old_logits, y_old)
                if not torch.isfinite(loss):
                    raise LearningError(
                        f'training diverged (loss {loss.item()} at step {step + 1}); the task '
                        'was rolled back and the previous model is kept. Lower learning_rate.')
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, c.grad_clip_norm)
                optimizer.step()
                state.cbp.update_utility()
                replaced += state.cbp.replace_units(optimizer)
                step += 1
                correct += int((logits.argmax(1) == y_task[idx]).sum())
                seen += len(idx)
                if progress is not None:
                    progress(Progress(task_id, epoch + 1, c.epochs, step, steps,
                                      float(loss.detach()), correct / seen, replaced))
        if not all(torch.isfinite(p).all() for p in params):
            raise LearningError('training produced non-finite weights; the task was rolled '
                                'back and the previous model is kept. Lower learning_rate.')
        return replaced, correct / max(seen, 1)

    # ------------------------------------------------------- undo and forget
    def undo_last_task(self) -> Dict[str, Any]:
        """Go back to the model from before the last learned task.

        Refinements and forgotten classes since that task are undone with it. The model
        version still increases, so every consumer sees a change.

        Returns:
            ``{'removed_task': int, 'removed_classes': [str], 'model_version': int}``.

        Raises:
            LearnerBusyError: a task is being learned.
            LearningError: there is nothing to undo.
        """
        if not self._learn_lock.acquire(blocking=False):
            raise LearnerBusyError('a task is being learned; cancel it or wait')
        try:
            if not self._history:
                raise LearningError('nothing to undo')
            current = self._snapshot
            previous = self._history.pop()
            removed = list(current.tasks[len(previous.tasks):])
            self._snapshot = dataclasses.replace(previous,
                                                 model_version=current.model_version + 1)
            return {'removed_task': len(previous.tasks),
                    'removed_classes': [c for task in removed for c in task],
                    'model_version': self._snapshot.model_version}
        finally:
            self._learn_lock.release()

    def forget(self, label: str) -> Dict[str, Any]:
        """Remove one class: it is never predicted (nor replayed) again.

        Its statistics stay in the shared covariance (they cannot be separated out), which
        only slightly changes the other classes' posteriors.

        Returns:
            ``{'forgotten': label, 'model_version': int}``.

        Raises:
            LearnerBusyError: a task is being learned.
            LearningError: ``label`` is not a class the model can predict.
        """
        if not self._learn_lock.acquire(blocking=False):
            raise LearnerBusyError('a task is being learned; cancel it or wait')
        try:
            base = self._snapshot
            if label not in base.classes or label in _forgotten(base):
                raise LearningError(f'unknown class {label!r}')
            state = copy.deepcopy(base.state)
            state.class_active[base.classes.index(label)] = False
            state.invalidate_cache()
            state._inference_cache()
            self._snapshot = dataclasses.replace(base, state=state,
                                                 model_version=base.model_version + 1)
            return {'forgotten': label, 'model_version': self._snapshot.model_version}
        finally:
            self._learn_lock.release()

    def reconfigure(self, **changes: Any) -> None:
        """Change configuration fields at run time without touching the serving snapshot.

        Learning fields apply to the next task. Fields that the learned state carries
        (prediction and selection modes, LDA shrinkage, CBP settings) are applied to a copy
        that is swapped in atomically. Architecture fields cannot change.

        Raises:
            ValueError: an unknown or invalid field, or an architecture field.
        """
        fixed = [k for k in changes if k in ARCH_FIELDS + ('backbone', 'backbone_checkpoint',
                                                           'device', 'precision')]
        if fixed:
            raise ValueError(f'{fixed} cannot change at run time')
        config = self.config.replace(**changes)
        config.validate()
        with self._learn_lock:
            self.config = config
            base = self._snapshot
            state = copy.deepcopy(base.state)
            _apply_state_config(state, config)
            state.invalidate_cache()
            if state.num_tasks:
                state._inference_cache()
            self._snapshot = dataclasses.replace(base, state=state)

    def _block_inputs(self, state: CBPNet, x: torch.Tensor, trunk: Optional[torch.Tensor],
                      task_ids: torch.Tensor) -> torch.Tensor:
        """Prompted features (CBP block inputs) of samples, each with its class's E-prompt."""
        chunk = max(self.config.batch_size, 32)
        out = []
        with torch.no_grad(), self._autocast():
            for start in range(0, x.shape[0], chunk):
                h = trunk[start:start + chunk] if trunk is not None \
                    else self.backbone.trunk(x[start:start + chunk], state.first_layer)
                out.append(self.backbone.prompted_from_trunk(
                    h, state.first_layer,
                    state.prompts_for(task_ids[start:start + chunk])).float())
        return torch.cat(out)

    def _trunk(self, x: torch.Tensor, first_layer: int) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self.backbone.trunk(x, first_layer)

    def _frozen_pass(self, x: torch.Tensor, first_layer: int
                     ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Queries of all samples, and their trunk outputs when they fit the cache budget.

        Without augmentation neither depends on anything trained, so both are computed
        once per task instead of once per epoch.
        """
        chunk = max(self.config.batch_size, 32)
        trunks, queries, cached_bytes = [], [], 0
        keep = True
        with torch.no_grad(), self._autocast():
            for start in range(0, x.shape[0], chunk):
                h = self.backbone.trunk(x[start:start + chunk], first_layer)
                queries.append(self.backbone.query_from_trunk(h, first_layer).float())
                cached_bytes += h.numel() * h.element_size()
                keep = keep and self.config.fast_paths \
                    and cached_bytes <= self.config.trunk_cache_mb * 2 ** 20
                trunks.append(h if keep else None)
        trunk = torch.cat(trunks) if keep else None
        return trunk, torch.cat(queries)

    # ------------------------------------------------------------ checkpoints
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
        }

    def save_checkpoint(self, directory: str) -> str:
        """Atomically write the current model to ``directory``; returns the path."""
        return ckpt.write_checkpoint(self.checkpoint_payload(), directory)

    def load_checkpoint_payload(self, payload: Dict[str, Any]) -> None:
        """Restore a model from a checkpoint payload (see :meth:`checkpoint_payload`).

        The checkpoint's architecture (prompt layout, block width, image size) wins over the
        configuration, with a warning, since the learned weights only fit their own layout.
        The undo history is cleared.

        Raises:
            CheckpointError: the payload does not fit this model.
        """
        arch = payload['architecture']
        changes = {k: arch[k] for k in ARCH_FIELDS if k in arch and arch[k] != getattr(
            self.config, k)}
        if changes:
            _log.warning('checkpoint architecture overrides the configuration: %s', changes)
            self.config = self.config.replace(**changes)
        self._snapshot = self._snapshot_from_payload(payload)
        self._history = []

    def _snapshot_from_payload(self, payload: Dict[str, Any]) -> _Snapshot:
        arch = payload['architecture']
        state = self._new_state()
        weights = dict(payload['state_dict'])
        # Checkpoints from before forgetting existed: every class is active.
        weights.setdefault('class_active', torch.ones(len(arch.get('class_task', ())),
                                                      dtype=torch.bool))
        try:
            state.grow_to(int(arch['num_tasks']), arch['class_task'])
            state.load_state_dict(weights)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ckpt.CheckpointError(f'checkpoint does not fit this model: {exc}') from exc
        state.to(self.device).eval()
        state._inference_cache()
        tasks = tuple(tuple(t) for t in payload['tasks'])
        return _Snapshot(state, tuple(payload['classes']), tasks, int(payload['model_version']))

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
