"""The continual learner: class registry, ``learn_task`` and ``predict``; undo, forget and
reconfigure (:mod:`.learner_changes`), checkpoints (:mod:`.learner_checkpoints`) and the fleet
(:mod:`.learner_fleet`) are mixed in.

No ROS import here: the node, the offline evaluation and the benchmark all drive this class.

Threading model (design.md section 3): everything a prediction needs (learned state, class
names, tasks, model version) lives in one immutable snapshot that is replaced with a single
reference assignment. ``learn_task`` works on a deep copy of the small learned state in the
calling thread while other threads keep predicting with the old snapshot, then swaps the new
one in. The frozen backbone is shared and never copied; its forward pass mutates nothing.

A call of ``learn_task``: validate the labels (new classes, known classes to refine); resize
the images once to uint8; run the frozen pass in chunks (trunk outputs cached within
``trunk_cache_mb``, frozen queries); train the new task's prompts, the CBP block and the head
when the recipe uses them (:mod:`ros2_cbpnet.learning.training`); merge every sample into the class
statistics; swap. Nothing is ever held as one float tensor of the whole buffer.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import ARCH_FIELDS, MAX_LABEL_LENGTH, LearnerConfig, resolve_device
from .frozen_runtime import OnnxQuery, load_onnx_query
from .image_resize import resize_batch
from .learner_changes import ChangesMixin
from .learner_checkpoints import CheckpointMixin
from .learner_fleet import FleetMixin
from .metrics import prediction_accuracy
from .model.backbones import Backbone, backbone_parameter_count, load_backbone
from .model.learned_state import LearnedState
from .precision import TrainingPrecision, resolve_precision
from .snapshot import UNDO_DEPTH, Snapshot, apply_state_config, forgotten_classes, hidden_classes
from .training import TaskData, TrainingCancelled, TrainingDiverged, steps_for, train_task
from .types import (LearnerBusyError, LearningCancelled, LearningError, Prediction, Progress,
                    TaskResult)

__all__ = [
    'ARCH_FIELDS', 'ContinualLearner', 'LearnerBusyError', 'LearnerConfig',
    'LearningCancelled', 'LearningError', 'MAX_LABEL_LENGTH', 'Prediction', 'Progress',
    'TaskResult', 'UNDO_DEPTH', 'resize_batch', 'resolve_device', 'resolve_layout',
    'steps_for',
]

_log = logging.getLogger(__name__)

#: Pixels per chunk of the frozen pass (64 images at the node's 128 px): activations of a
#: chunk, not of the whole buffer, are what learning holds at once.
_CHUNK_PIXELS = 64 * 128 * 128
#: Samples per slice of the (samples x query) statistics products after the frozen pass.
_ROWS = 512


def resolve_layout(config: LearnerConfig, backbone: Backbone) -> LearnerConfig:
    """``config`` with its empty layout fields filled with ``backbone``'s family defaults
    (``[-1]``: no G-prompt / the last layer as the query). Apply once: a resolved empty
    ``g_prompt_layers`` means "no G-prompt"."""
    g, e = backbone.default_prompt_layers()
    changes: Dict[str, Any] = {}
    if not config.g_prompt_layers:
        changes['g_prompt_layers'] = g
    elif config.g_prompt_layers == [-1]:
        changes['g_prompt_layers'] = []
    if not config.e_prompt_layers:
        changes['e_prompt_layers'] = e
    if not config.query_layers:
        changes['query_layers'] = backbone.default_query_layers()
    elif config.query_layers == [-1]:
        changes['query_layers'] = [backbone.num_layers - 1]
    if not config.image_size:
        changes['image_size'] = backbone.input_size
    return config.replace(**changes) if changes else config


class ContinualLearner(ChangesMixin, FleetMixin, CheckpointMixin):
    """Learns task after task of new classes from labelled images; predicts at any time.

    Args:
        config: the learner configuration (validated here).
        backbone: an already loaded backbone to share (e.g. between evaluation runs);
            loaded from ``config`` when omitted.
        runtime_cache_dir: where the ONNX export of the frozen pass is cached (the node: a
            folder in its checkpoint directory); None exports it in memory at every start.

    Raises:
        ValueError: invalid configuration, or ``runtime='onnxruntime'`` where ONNX Runtime
            cannot run the frozen pass (the message says why).
        BackboneLoadError: the backbone or its weights cannot be loaded.

    Example:
        >>> learner = ContinualLearner(LearnerConfig(image_size=64))  # doctest: +SKIP
        >>> learner.learn_task(images, ['cup', 'cup', 'shoe', 'shoe'])  # doctest: +SKIP
        >>> learner.predict([frame])[0].label  # doctest: +SKIP
        'cup'
    """

    def __init__(self, config: LearnerConfig, backbone: Optional[Backbone] = None, *,
                 runtime_cache_dir: Optional[str] = None) -> None:
        config.validate()
        self.device = resolve_device(config.device)
        config = config.replace(precision=resolve_precision(config.precision, self.device))
        if config.precision != 'fp32' and self.device.type != 'cuda':
            raise ValueError(f'precision {config.precision} needs a CUDA device')
        self.backbone = backbone if backbone is not None else load_backbone(
            config.backbone, config.backbone_checkpoint, image_size=config.image_size)
        self.backbone.to(self.device)
        self.config = resolve_layout(config, self.backbone)
        self._precision = TrainingPrecision(self.device, self.config.precision)
        mean = torch.tensor(self.backbone.mean, dtype=torch.float32, device=self.device)
        std = torch.tensor(self.backbone.std, dtype=torch.float32, device=self.device)
        # uint8 -> normalised float in one fused multiply-add: x * scale + offset.
        self._norm_scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self._norm_offset = (-mean / std).view(1, 3, 1, 1)
        self._learn_lock = threading.Lock()
        # Held only for the instant of a swap of config and/or snapshot, so reconfigure()
        # never waits for a task being learned.
        self._swap_lock = threading.Lock()
        self._snapshot = Snapshot(self._new_state(), (), (), 0)
        # Snapshots from before each of the last UNDO_DEPTH learned tasks (oldest first).
        self._history: List[Snapshot] = []
        self.replacements_last_task = 0
        self._runtime_cache_dir = runtime_cache_dir
        self._fingerprint: Optional[str] = None
        #: Fleet bookkeeping that no undo takes back (persisted with checkpoints):
        #: ``next_sequence`` of this robot's contributions, the (robot, sequence) tags of
        #: ``withdrawn`` contributions and of imports the user undid (``declined``).
        self.fleet_meta: Dict[str, Any] = {'next_sequence': 1, 'withdrawn': [],
                                           'declined': []}
        self._onnx: Optional[OnnxQuery] = None
        #: Why the frozen pass runs where it runs ('' for ONNX Runtime).
        self.runtime_note = ''
        self._load_runtime()

    def _load_runtime(self) -> None:
        """(Re)build the ONNX Runtime frozen pass for the current query layers and size."""
        c = self.config
        self._onnx, self.runtime_note = None, 'runtime: torch'
        if c.runtime == 'torch':
            return
        self._onnx, why = load_onnx_query(
            self.backbone, c.query_layers, c.image_size, providers=c.onnx_providers,
            threads=c.inference_threads, cache_dir=self._runtime_cache_dir)
        if self._onnx is not None:
            self.runtime_note = ''
            _log.info('frozen pass in ONNX Runtime (%s)', self._onnx.provider)
            return
        if c.runtime == 'onnxruntime':
            raise ValueError(f'runtime onnxruntime cannot be used: {why}')
        self.runtime_note = why
        _log.info('frozen pass in torch: %s', why)

    @property
    def runtime(self) -> Tuple[str, str]:
        """(runtime, provider) of the frozen pass of predictions now: ONNX Runtime serves
        the statistics recipe; prompted prediction runs in torch."""
        if self._onnx is not None and self.config.prediction == 'stats' \
                and self.config.fast_paths:
            return self._onnx.name, self._onnx.provider
        return 'torch', str(self.device)

    def _new_state(self) -> LearnedState:
        c = self.config
        state = LearnedState(
            self.backbone, g_prompt_length=c.g_prompt_length, g_prompt_layers=c.g_prompt_layers,
            e_prompt_length=c.e_prompt_length, e_prompt_layers=c.e_prompt_layers,
            query_layers=c.query_layers, cbp_hidden_units=c.cbp_hidden_units,
            cbp_replacement_rate=c.cbp_replacement_rate,
            cbp_maturity_threshold=c.cbp_maturity_threshold, cbp_decay_rate=c.cbp_decay_rate,
            cbp_enabled=c.cbp_enabled, prompt_selection=c.prompt_selection,
            prediction=c.prediction, head_weight=c.head_weight, lda_shrinkage=c.lda_shrinkage)
        state.stats.spread = c.lda_spread
        return state.to(self.device).eval()

    # ------------------------------------------------------------ properties
    @property
    def classes(self) -> List[str]:
        """Names of the classes that can be predicted, in head order (forgotten ones left out)."""
        snap = self._snapshot
        gone = hidden_classes(snap)
        return [c for c in snap.classes if c not in gone]

    @property
    def forgotten_classes(self) -> List[str]:
        """Classes removed with :meth:`forget`, in head order."""
        snap = self._snapshot
        return [c for c in snap.classes if c in forgotten_classes(snap)]

    @property
    def tasks(self) -> List[Dict[str, Any]]:
        """``[{'task_id': t, 'classes': [...]}, ...]`` of the learned tasks (without forgotten
        classes; a task whose classes were all forgotten keeps its id with an empty list)."""
        gone = hidden_classes(self._snapshot)
        return [{'task_id': t, 'classes': [c for c in cs if c not in gone]}
                for t, cs in enumerate(self._snapshot.tasks)]

    @property
    def num_tasks(self) -> int:
        """Number of learned tasks."""
        return len(self._snapshot.tasks)

    @property
    def model_version(self) -> int:
        """Increments with every change of the model (and survives checkpoints)."""
        return self._snapshot.model_version

    @property
    def is_learning(self) -> bool:
        """True while ``learn_task`` (or undo/forget/reconfigure) runs."""
        return self._learn_lock.locked()

    @property
    def can_undo(self) -> bool:
        """True when :meth:`undo_last_task` has a model to go back to."""
        return bool(self._history)

    @property
    def state(self) -> LearnedState:
        """The learned state currently used for prediction (do not modify)."""
        return self._snapshot.state

    @property
    def training_precision(self) -> TrainingPrecision:
        """The autocast and loss-scaling policy of training (fp16 uses a GradScaler)."""
        return self._precision

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters trained for one task (G-prompt, one E-prompt and key, CBP block, head
        at its current size) and the frozen backbone's (without its ImageNet classifier)."""
        st = self._snapshot.state
        per_task = st.prompts.per_task_size() + sum(p.numel() for p in st.cbp.parameters())
        per_task += sum(p.numel() for p in st.head.parameters())
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
        return self._normalise(resize_batch(images, self.config.image_size))

    def _normalise(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        return x.permute(0, 3, 1, 2).float() * self._norm_scale + self._norm_offset

    def _autocast(self):
        return self._precision.autocast()

    # ------------------------------------------------------------ prediction
    def predict_tensor(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Snapshot]:
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
        runtime, provider = self.runtime
        with torch.inference_mode(), self._autocast():
            if runtime == 'onnxruntime' and snap.state.prediction == 'stats':
                probs, task_ids, novelty = snap.state.predict_from_queries(self._onnx(x))
            else:
                runtime, provider = 'torch', str(self.device)
                probs, task_ids, novelty = snap.state.predict_with_novelty(
                    self.backbone, x, c.fast_paths, novelty=True)
        active = snap.state.class_active
        k = min(top_k or c.top_k, int(active.sum()))
        # Forgotten classes have probability 0, but so may others after underflow: keep them
        # out of the top-k explicitly.
        scores, idx = probs.float().masked_fill(~active, -1.0).topk(k, dim=1)
        scores, idx, task_ids = scores.cpu().tolist(), idx.cpu().tolist(), task_ids.cpu().tolist()
        out = []
        for s_row, i_row, t, nov in zip(scores, idx, task_ids, novelty.float().cpu().tolist()):
            topk = [(snap.classes[i], float(s)) for i, s in zip(i_row, s_row)]
            known = not (reject and nov > c.unknown_threshold)
            out.append(Prediction(topk[0][0] if known else c.unknown_label, topk[0][1], int(t),
                                  topk, float(nov), known, snap.model_version, runtime,
                                  provider))
        return out

    def within_task_scores(self, images: Sequence[np.ndarray], task_id: int
                           ) -> Tuple[List[str], torch.Tensor]:
        """(class names of ``task_id``, scores (B, classes)) deciding among that task's
        classes only, the task being known (how learning accuracy is measured)."""
        snap = self._snapshot
        with torch.inference_mode(), self._autocast():
            scores = snap.state.within_task_scores(self.backbone, self.preprocess(images),
                                                   task_id)
        return list(snap.tasks[task_id]), scores.float()

    def evaluate(self, images: Sequence[np.ndarray], labels: Sequence[str],
                 batch_size: int = 64) -> float:
        """Accuracy of ``predict`` on labelled images (labels as class names)."""
        return prediction_accuracy(self.predict, images, labels, batch_size)

    # -------------------------------------------------------------- learning
    def learn_task(self, images: Sequence[np.ndarray], labels: Sequence[str], *,
                   progress: Optional[Callable[[Progress], None]] = None,
                   cancel: Optional[threading.Event] = None, origin: str = 'local',
                   export: Optional[Tuple[str, int]] = None) -> TaskResult:
        """Learn the labelled images: new labels become a new task, known labels refine
        their classes' statistics.

        With a recipe that uses the prompted head (``prediction`` other than ``'stats'``),
        the new task's E-prompt and key, the CBP block and the head are trained on a copy of
        the learned state (see :mod:`ros2_cbpnet.learning.training`); every sample is merged into
        the class statistics; then the copy is swapped in.

        ``origin`` is recorded as where the classes' images came from (the fleet's robot id).
        ``export=(robot id, sequence)`` also returns the call's statistics as a fleet
        :class:`~ros2_cbpnet.learning.fleet.Contribution` (``result.contribution``) and records the
        sequence in the model's ledger.

        Raises:
            LearnerBusyError: another task is being learned.
            LearningCancelled: ``cancel`` was set; the previous model stays in use.
            LearningError: bad input, a forgotten label, or divergence (NaN/inf loss or
                weights); the previous model stays in use.
        """
        if not self._learn_lock.acquire(blocking=False):
            raise LearnerBusyError('a task is already being learned')
        try:
            return self._learn_task(images, labels, progress, cancel, origin, export)
        finally:
            self._learn_lock.release()

    def _learn_task(self, images: Sequence[np.ndarray], labels: Sequence[str],
                    progress: Optional[Callable[[Progress], None]],
                    cancel: Optional[threading.Event], origin: str,
                    export: Optional[Tuple[str, int]]) -> TaskResult:
        started = time.monotonic()
        base = self._snapshot
        labels = self._check_labels(images, labels, base)
        known = set(base.classes)
        new_classes = sorted({label for label in labels if label not in known})
        refined = sorted({label for label in labels if label in known})
        c = self.config
        torch.manual_seed(c.seed + len(base.tasks))
        state = copy.deepcopy(base.state)
        # Training draws batches at random, so it keeps the images resized (uint8); the
        # statistics recipe reads them once and never holds more than a chunk.
        resized = _TaskImages(images, c.image_size, keep=state.trains_prompts, cancel=cancel)
        index = {name: i for i, name in enumerate(base.classes)}
        task_id: Optional[int] = None
        if new_classes:
            task_id = state.add_task(trained=state.trains_prompts)
            for name, i in zip(new_classes, state.add_classes(len(new_classes), task_id)):
                index[name] = i
        y = torch.tensor([index[label] for label in labels], device=self.device)
        trains = task_id is not None and state.trains_prompts
        planned = steps_for(sum(label not in known for label in labels), c) if trains \
            else (0, 0)

        def features_done(done: int) -> None:
            if progress is not None:
                progress(Progress(task_id, 0, planned[0], 0, planned[1], 0.0, 0.0, 0,
                                  stage='features', done=done, total=len(labels)))
        trunk, queries = self._frozen_pass(state, resized, cancel, features_done)
        replaced, train_accuracy, epochs = 0, float('nan'), 0
        key_cosine: Optional[Tuple[float, float]] = None
        if trains:
            new = torch.tensor([label not in known for label in labels], device=self.device)
            pick = torch.nonzero(new).flatten()
            data = TaskData(y[pick], queries[pick], None if trunk is None else trunk[pick],
                            lambda idx: self._normalise(resized.take(pick[idx].cpu().numpy())))
            generator = torch.Generator().manual_seed(c.seed + 1000 * len(base.tasks))
            try:
                trained = train_task(state, self.backbone, task_id, data, c, self._precision,
                                     generator=generator, progress=progress, cancel=cancel)
            except TrainingCancelled:
                raise LearningCancelled() from None
            except TrainingDiverged as exc:
                raise LearningError(f'{exc}; the task was rolled back and the previous model '
                                    'is kept. Lower learning_rate.') from None
            replaced, train_accuracy, epochs = (trained.replaced_units, trained.train_accuracy,
                                                trained.epochs)
            key_cosine = (trained.key_query_cosine, trained.key_query_cosine_max)
        _check_cancel(cancel)
        features = self._block_inputs(state, resized, trunk, state.class_task[y], cancel) \
            if state.trains_prompts else None
        state.stats.add(y, queries, features)
        # In slices of rows: (samples x query) float64 products of a full buffer would cost
        # hundreds of MB at once.
        rows = range(0, len(y), _ROWS)
        raw = torch.cat([state.stats.leave_one_out_novelty(
            y[r:r + _ROWS], queries[r:r + _ROWS], state.class_active) for r in rows])
        state.stats.calibrate_novelty(raw)
        contribution = self._contribution(export, labels, y, queries, raw) if export else None
        if epochs == 0:
            # Nothing trained: report how the statistics classify the samples just taught.
            with torch.no_grad():
                guess = torch.cat([state.class_log_posterior(queries[r:r + _ROWS]).argmax(1)
                                   for r in rows])
            train_accuracy = float((guess == y).float().mean())
        ledger = base.fleet.with_origin(new_classes + refined, origin)
        if export:
            ledger = dataclasses.replace(ledger, exported=ledger.exported + (int(export[1]),))
        with self._swap_lock:
            # Settings changed by reconfigure() while this task was learned apply to it too.
            apply_state_config(state, self.config)
            state.prepare_inference()
            current = self._snapshot
            if new_classes:
                snap = Snapshot(state, base.classes + tuple(new_classes),
                                base.tasks + (tuple(new_classes),), current.model_version + 1,
                                ledger)
                self._history = (self._history + [current])[-UNDO_DEPTH:]
            else:
                snap = Snapshot(state, base.classes, base.tasks, current.model_version + 1,
                                ledger)
            self._snapshot = snap
        self.replacements_last_task = replaced
        if progress is not None:
            progress(Progress(task_id, epochs, epochs, planned[1] if epochs else 0,
                              planned[1] if epochs else 0, 0.0, train_accuracy, replaced,
                              stage='done', done=len(labels), total=len(labels)))
        return TaskResult(task_id, sorted(new_classes + refined), len(labels), epochs,
                          train_accuracy, time.monotonic() - started, replaced,
                          snap.model_version, new_classes, refined,
                          *(key_cosine or (None, None)), contribution=contribution)

    @staticmethod
    def _check_labels(images: Sequence[np.ndarray], labels: Sequence[str],
                      base: Snapshot) -> List[str]:
        if len(images) != len(labels):
            raise LearningError(f'{len(images)} images but {len(labels)} labels')
        if len(images) < 2:
            raise LearningError('a task needs at least 2 labelled images')
        labels = [str(label) for label in labels]
        if any(not label.strip() for label in labels):
            raise LearningError('empty labels are not allowed')
        revived = sorted({label for label in labels if label in forgotten_classes(base)})
        if revived:
            raise LearningError(
                f'classes {revived} were forgotten; teach them under a new label')
        return labels

    def _frozen_pass(self, state: LearnedState, resized: '_TaskImages',
                     cancel: Optional[threading.Event],
                     report: Callable[[int], None] = lambda done: None
                     ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Queries of all samples, and their trunk outputs when they fit the cache budget.

        Without augmentation neither depends on anything trained, so both are computed once
        per task instead of once per epoch, a chunk of images at a time (``report`` gets the
        images done after each chunk; ``cancel`` is checked before each). The statistics
        recipe computes them in the runtime its predictions use, so both see the same
        numbers.
        """
        trunks: List[torch.Tensor] = []
        queries: List[torch.Tensor] = []
        cached_bytes, keep = 0, self.config.fast_paths and state.trains_prompts
        onnx = self._onnx if not state.trains_prompts and self.config.fast_paths else None
        with torch.no_grad(), self._autocast():
            for start in range(0, len(resized), resized.chunk_size):
                _check_cancel(cancel)
                x = self._normalise(resized.chunk(start))
                if onnx is not None:
                    queries.append(onnx(x).float())
                else:
                    h, taps = state.trunk_and_taps(self.backbone, x)
                    queries.append(state.queries(self.backbone, h, taps).float())
                    cached_bytes += h.numel() * h.element_size()
                    keep = keep and cached_bytes <= self.config.trunk_cache_mb * 2 ** 20
                    trunks = trunks + [h] if keep else []
                report(min(start + resized.chunk_size, len(resized)))
        trunk = torch.cat(trunks) if keep and trunks else None
        return trunk, torch.cat(queries)

    def _block_inputs(self, state: LearnedState, resized: '_TaskImages',
                      trunk: Optional[torch.Tensor], task_ids: torch.Tensor,
                      cancel: Optional[threading.Event] = None
                      ) -> torch.Tensor:
        """Prompted features (CBP block inputs) of samples, each with its class's E-prompt."""
        out = []
        with torch.no_grad(), self._autocast():
            for start in range(0, len(resized), resized.chunk_size):
                _check_cancel(cancel)
                stop = start + resized.chunk_size
                h = trunk[start:stop] if trunk is not None else self.backbone.trunk(
                    self._normalise(resized.chunk(start)), state.first_layer)
                out.append(state.prompted_features(self.backbone, h,
                                                   task_ids[start:stop]).float())
        return torch.cat(out)


class _TaskImages:
    """A task's images at the network input size, in chunks of about :data:`_CHUNK_PIXELS`.

    ``keep=True`` resizes them all once into one uint8 array (training needs random access);
    otherwise every chunk is resized when it is read, so only a chunk is ever held.

    Raises:
        LearningError: an image is malformed (found when its chunk is resized).
        LearningCancelled: ``cancel`` was set.
    """

    def __init__(self, images: Sequence[np.ndarray], size: int, *, keep: bool,
                 cancel: Optional[threading.Event]) -> None:
        self._images, self._size, self._cancel = images, size, cancel
        self.chunk_size = min(256, max(8, _CHUNK_PIXELS // (size * size)))
        self._kept: Optional[np.ndarray] = None
        if keep:
            self._kept = np.empty((len(images), size, size, 3), dtype=np.uint8)
            for start in range(0, len(images), self.chunk_size):
                self._kept[start:start + self.chunk_size] = self._resize(start)

    def __len__(self) -> int:
        return len(self._images)

    def _resize(self, start: int) -> np.ndarray:
        _check_cancel(self._cancel)
        try:
            return resize_batch(self._images[start:start + self.chunk_size], self._size)
        except ValueError as exc:
            raise LearningError(f'bad training image: {exc}') from exc

    def chunk(self, start: int) -> np.ndarray:
        """The chunk of images from ``start`` (fewer at the end), uint8 (N, S, S, 3)."""
        if self._kept is not None:
            return self._kept[start:start + self.chunk_size]
        return self._resize(start)

    def take(self, index: np.ndarray) -> np.ndarray:
        """Images at ``index`` (only when kept)."""
        if self._kept is None:
            raise RuntimeError('images were not kept for random access')
        return self._kept[index]


def _check_cancel(cancel: Optional[threading.Event]) -> None:
    if cancel is not None and cancel.is_set():
        raise LearningCancelled()
