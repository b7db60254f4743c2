"""``LearnerConfig``: the one place where every learner setting and its default lives.

The node's parameters, ``cbpnet-eval``'s options and the benchmark all map onto these
fields; defaults were chosen on validation splits (README, "Learning quality"). No ROS here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, List

import torch

from .choices import EMBEDDED_BACKBONE, PREDICTION_MODES, RUNTIMES, SELECTION_MODES, SPREADS

__all__ = [
    'ARCH_FIELDS', 'LearnerConfig', 'MAX_LABEL_LENGTH', 'RECIPES', 'START_FIELDS',
    'resolve_device',
]

#: Fields that only take effect when a learner is created.
START_FIELDS = ('backbone', 'backbone_checkpoint', 'device', 'precision', 'runtime',
                'onnx_providers', 'inference_threads')
#: Architecture fields stored in checkpoints; a saved model keeps its own layout.
ARCH_FIELDS = ('g_prompt_length', 'g_prompt_layers', 'e_prompt_length', 'e_prompt_layers',
               'cbp_hidden_units', 'image_size', 'query_layers')
#: Longest accepted ``unknown_label`` (the node's label limit).
MAX_LABEL_LENGTH = 128
#: What each ``recipe`` fixes. ``custom``: nothing, every field as set (the defaults give the
#: statistics recipe). ``paper``: CBPNet as published (arXiv 2509.15785 on DualPrompt, Wang et
#: al. ECCV 2022): key-query E-prompt selection, one softmax head over all classes, the
#: G-prompt trained on every task, the CBP block trained, no replay and nothing of the class
#: statistics in the prediction. ``cbp_enabled`` stays free: off, it is the paper's own
#: DualPrompt baseline in the same pipeline.
RECIPES = {
    'custom': {},
    'paper': {'prediction': 'all', 'prompt_selection': 'key', 'feature_replay_coeff': 0.0,
              'g_prompt_first_task_only': False, 'train_cbp_block': True},
}


@dataclass
class LearnerConfig:
    """Everything that configures a learner.

    Layout: empty ``g_prompt_layers``/``e_prompt_layers`` select the family default (ViT:
    DualPrompt's G in 0-1, E in 2-4; CNN: G in stage 5, E in stage 6 and the head conv);
    ``g_prompt_layers=[-1]`` means no G-prompt. Empty ``query_layers`` selects the family
    default query (CNN: pooled outputs of the last five stages; ViT: the pre-logits feature);
    ``query_layers=[-1]`` is the last layer alone (the backbone's pre-logits feature).

    ``recipe`` is a preset: ``'paper'`` fixes the fields of :data:`RECIPES` ``['paper']`` to
    the published CBPNet whatever they were set to (a copy made with :meth:`replace` keeps
    them fixed); ``'custom'`` (default) leaves every field as set.

    Prediction (see :mod:`ros2_cbpnet.learning.model.learned_state`): ``prediction='stats'``
    classifies with the closed-form LDA over the class statistics alone and trains nothing;
    ``'task'`` adds the prompted head within the selected task with weight ``head_weight``;
    ``'all'`` is the paper's softmax over all classes.

    ``train_cbp_block=False`` leaves the block at its identity start (the published DualPrompt
    has no such block); ``cbp_enabled=False`` trains it but never re-initialises a unit.

    Drift control of the learned recipe (not in the paper): ``feature_replay_coeff`` weighs a
    cross-entropy on pseudo-features of earlier classes, drawn from per-class Gaussians of
    the block input, so training a new task does not silently re-purpose the shared CBP
    block and head; ``g_prompt_first_task_only`` freezes the shared G-prompt after the first
    task so those statistics stay exact. ``min_steps`` gives a task with few samples at least
    that many optimiser steps (more epochs), so few-shot teaching still trains.
    ``key_steps``: each task's E-prompt key gets at least this many Adam steps of the pull
    constraint (the key appears in no other loss term and the queries are frozen, so the
    steps beyond the joint ones run on the cached queries alone and cost microseconds).

    ``lda_spread`` says how a class's sample count enters its LDA score (see
    :class:`~ros2_cbpnet.learning.model.statistics.ClassStatistics`); ``'scaled'`` measured best.

    Open world: a frame whose novelty (0 = typical of a taught class, 1 = one standard
    deviation less like one) exceeds ``unknown_threshold`` is reported as ``unknown_label``;
    ``unknown_threshold <= 0`` turns that off (a threshold of 0 would reject about half of
    the taught frames, so no useful setting is lost).

    ``precision='auto'`` picks per device
    (:func:`ros2_cbpnet.learning.precision.default_precision`: fp32 on CPU, bf16 on GPUs with
    native bf16, else fp16 with loss scaling).

    Runtime of the frozen pass (:mod:`ros2_cbpnet.learning.frozen_runtime`): ``runtime='auto'``
    runs the frozen multi-layer query of the statistics recipe in ONNX Runtime when it is
    installed and the export reproduces torch, else in torch; ``'onnxruntime'`` insists (the
    learner refuses to start without it); ``'torch'`` never exports. ``onnx_providers``
    orders ONNX Runtime's execution providers (empty: TensorRT, CUDA, CPU, whichever exist
    on a CUDA device; the CPU otherwise). ``inference_threads`` is ONNX Runtime's intra-op
    thread count (the node also gives it to torch); 0 = one per core.

    ``fast_paths=False`` switches off the performance savings of design.md section 3
    (shared trunk, one-task shortcut, trunk cache) for benchmarking; results are the same up
    to float rounding.
    """

    backbone: str = EMBEDDED_BACKBONE
    backbone_checkpoint: str = ''
    device: str = 'auto'
    precision: str = 'fp32'
    image_size: int = 0
    query_layers: List[int] = field(default_factory=list)
    epochs: int = 5
    min_steps: int = 50
    batch_size: int = 16
    learning_rate: float = 0.01
    g_prompt_length: int = 5
    g_prompt_layers: List[int] = field(default_factory=list)
    e_prompt_length: int = 5
    e_prompt_layers: List[int] = field(default_factory=list)
    pull_constraint_coeff: float = 1.0
    train_cbp_block: bool = True
    cbp_enabled: bool = True
    cbp_hidden_units: int = 64
    # Chosen on the validation lifetime stream (Fashion-MNIST, 50 tasks, 2 seeds): without
    # replacement 81% of the block's units ended dormant; rate 1e-3 at maturity 20 kept that
    # at 22% (about 3 replacements per task) for 0.2 points of learning accuracy, within noise.
    cbp_replacement_rate: float = 1e-3
    cbp_maturity_threshold: int = 20
    cbp_decay_rate: float = 0.99
    prompt_selection: str = 'lda'
    prediction: str = 'stats'
    head_weight: float = 1.0
    lda_shrinkage: float = 0.1
    # Measured with class counts 10:1 on validation (scripts/sweep.py --groups spread).
    lda_spread: str = 'scaled'
    feature_replay_coeff: float = 1.0
    g_prompt_first_task_only: bool = True
    runtime: str = 'auto'
    onnx_providers: List[str] = field(default_factory=list)
    # Measured on this project's 2-core machine (README, "Performance"): one thread for the
    # model leaves the other core to the camera and DDS threads.
    inference_threads: int = 1
    grad_clip_norm: float = 1.0
    trunk_cache_mb: int = 512
    fast_paths: bool = True
    # Chosen on validation (scripts/method_studies.py keys): the pull constraint's optimum is
    # the mean direction of the task's queries; 80 joint steps left the keys at a cosine of
    # 0.57-0.72 to their queries, this many reach it within 0.001.
    key_steps: int = 1000
    recipe: str = 'custom'
    seed: int = 0
    top_k: int = 5
    # Chosen on validation splits (digits, Fashion-MNIST; 2 classes held out, 3 seeds): the
    # largest 95th percentile of taught frames' novelty was 1.44, so at most ~5% of taught
    # frames are called unknown.
    unknown_threshold: float = 1.5
    unknown_label: str = 'unknown'

    def __post_init__(self) -> None:
        for name, value in RECIPES.get(self.recipe, {}).items():
            setattr(self, name, value)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        need(bool(self.backbone.strip()), 'backbone must be a timm model name')
        need(self.device in ('auto', 'cpu', 'cuda') or self.device.startswith('cuda:'),
             f"device must be auto, cpu or cuda[:N], not {self.device!r}")
        need(self.precision in ('auto', 'fp32', 'fp16', 'bf16'),
             f'precision must be auto, fp32, fp16 or bf16, not {self.precision!r}')
        need(self.image_size == 0 or 16 <= self.image_size <= 1024,
             'image_size must be 0 (backbone default) or 16..1024')
        need(all(i >= 0 for i in self.query_layers) or self.query_layers == [-1],
             'query_layers must be >= 0 ([-1] = the last layer only)')
        need(1 <= self.epochs <= 1000, 'epochs must be 1..1000')
        need(0 <= self.min_steps <= 100000, 'min_steps must be 0..100000')
        need(0 <= self.key_steps <= 1000000, 'key_steps must be 0..1000000')
        need(self.recipe in RECIPES, f'recipe must be one of {tuple(RECIPES)}')
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
        need(math.isfinite(self.head_weight) and self.head_weight >= 0,
             'head_weight must be >= 0')
        need(0.0 <= self.lda_shrinkage <= 1.0, 'lda_shrinkage must be in [0, 1]')
        need(self.lda_spread in SPREADS, f'lda_spread must be one of {SPREADS}')
        need(math.isfinite(self.feature_replay_coeff) and self.feature_replay_coeff >= 0,
             'feature_replay_coeff must be >= 0')
        need(self.grad_clip_norm > 0, 'grad_clip_norm must be > 0')
        need(self.runtime in RUNTIMES, f'runtime must be one of {RUNTIMES}')
        need(all(isinstance(p, str) and p.strip() for p in self.onnx_providers),
             'onnx_providers must be provider names such as tensorrt, cuda, cpu')
        need(0 <= self.inference_threads <= 256, 'inference_threads must be 0..256')
        need(self.trunk_cache_mb >= 0, 'trunk_cache_mb must be >= 0')
        need(1 <= self.top_k <= 1000, 'top_k must be 1..1000')
        need(math.isfinite(self.unknown_threshold),
             'unknown_threshold must be a finite number (<= 0 turns rejection off)')
        need(0 < len(self.unknown_label.strip()) <= MAX_LABEL_LENGTH,
             f'unknown_label must be 1..{MAX_LABEL_LENGTH} characters')

    def replace(self, **changes: Any) -> 'LearnerConfig':
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an error."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'device {name!r} requested but CUDA is not available')
    return torch.device(name)
