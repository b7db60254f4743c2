"""The plasticity protocol of ``cbpnet-eval`` (``--protocol plasticity``; no ROS).

Can CBPNet's learned parts keep learning new tasks for a robot's lifetime, and does
continual backpropagation matter for that? Built as Dohare et al. (Nature 2024) build
Continual ImageNet: a long stream (default 200) of binary tasks, each a pair of classes drawn
at random, a fresh two-class head per task, and everything else trained continually across
tasks: the CBP block and, with ``prompts``, the shared G-prompt and the chain of E-prompts
(each new one a copy of the last, DualPrompt's transfer, so one E-prompt trained on and on).
A task's learning accuracy is its head's test accuracy right after training on it. Nothing of
the class statistics takes part, so plasticity lost by the learned parts shows in it.

Two paths from the frozen feature ``z`` to the head (``path``):

- ``residual``: the block's output ``z + W2 relu(W1 z + b1) + b2``, as the node's learned
  recipe uses it. The skip connection hands the head the frozen feature whatever the hidden
  units do.
- ``no-skip``: ``W2 relu(W1 z + b1) + b2`` alone: the hidden units are the only way to the
  head, as a hidden layer is in Dohare et al.'s networks, so dormant units cost capacity.
  This is the control that shows whether plasticity loss can appear here at all.

Recorded per task: learning accuracy; the dormant fraction as Dohare et al. define it (units
whose ReLU output is zero on at least 99 % of the task's test inputs) beside the utility-based
figure the node reports (:meth:`CBPBlock.stats`); the effective rank of the hidden
activations; the mean magnitude of ``W1``; replacements so far.

The frozen inputs are computed once per data set (the trunk output at the first prompted
layer with ``prompts``, the pre-logits feature without), so the stream costs only the
learned parts' optimiser steps. :func:`run_plasticity` also takes inputs made up by a test
(any ``(N, D)`` features, ``backbone=None``).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..learning.datasets import ImageDataset
from ..learning.image_resize import resize_batch
from ..learning.learner import LearnerConfig, resolve_device, resolve_layout
from ..learning.metrics import effective_rank
from ..learning.model.backbones import Backbone, backbone_parameter_count
from ..learning.model.cbp import CBPBlock
from ..learning.model.head import ClassifierHead
from ..learning.model.prompts import PromptPool
from .eval_methods import LEARNER_METHODS
from .eval_protocols import last_tasks_summary

__all__ = ['DORMANT_INPUT_SHARE', 'FrozenInputs', 'PATHS', 'frozen_inputs', 'run_plasticity',
           'run_plasticity_method']

PATHS = ('residual', 'no-skip')
#: Dohare et al.'s dormant unit: zero output on at least this share of the inputs.
DORMANT_INPUT_SHARE = 0.99


@dataclass
class FrozenInputs:
    """Frozen inputs of the learned parts for every image of a data set.

    ``first_layer`` is the backbone layer they enter at (None: they are the frozen feature
    itself and no prompt is trained).
    """

    train: torch.Tensor
    train_labels: np.ndarray
    test: torch.Tensor
    test_labels: np.ndarray
    first_layer: Optional[int] = None


@torch.no_grad()
def frozen_inputs(data: ImageDataset, backbone: Backbone, image_size: int, device: str,
                  first_layer: Optional[int] = None, batch: int = 256) -> FrozenInputs:
    """The trunk outputs below ``first_layer`` (or, with None, the pre-logits features) of
    every training and test image, normalised as the learner does."""
    dev = resolve_device(device)
    backbone.to(dev).eval()
    mean = torch.tensor(backbone.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=dev).view(1, 3, 1, 1)

    def run(images: np.ndarray) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch):
            x = torch.from_numpy(resize_batch(list(images[start:start + batch]), image_size))
            x = (x.to(dev).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            out.append(backbone.query(x) if first_layer is None
                       else backbone.trunk(x, first_layer))
        return torch.cat(out)

    return FrozenInputs(run(data.train_images), np.asarray(data.train_labels),
                        run(data.test_images), np.asarray(data.test_labels), first_layer)


class _LearnedPath:
    """Prompts (optional), the CBP block and one fresh head per task, over frozen inputs."""

    def __init__(self, inputs: FrozenInputs, config: LearnerConfig,
                 backbone: Optional[Backbone], path: str) -> None:
        c = config
        self.backbone, self.residual = backbone, path == 'residual'
        self.first_layer = inputs.first_layer
        self.prompts: Optional[PromptPool] = None
        if self.first_layer is not None:
            if backbone is None:
                raise ValueError('prompts need the backbone')
            self.prompts = PromptPool(
                backbone, g_prompt_length=c.g_prompt_length, g_prompt_layers=c.g_prompt_layers,
                e_prompt_length=c.e_prompt_length, e_prompt_layers=c.e_prompt_layers,
                key_dim=1)
            self.prompts.add_task(inputs.train.device)
            dim = backbone.feature_dim
        else:
            dim = int(inputs.train.shape[1])
        self.block = CBPBlock(dim, c.cbp_hidden_units, replacement_rate=c.cbp_replacement_rate,
                              maturity_threshold=c.cbp_maturity_threshold,
                              decay_rate=c.cbp_decay_rate,
                              enabled=c.cbp_enabled).to(inputs.train.device)
        self.dim = dim

    def shared_parameters(self) -> List[torch.nn.Parameter]:
        """What is trained continually across tasks (prompts and block)."""
        params = list(self.block.parameters())
        if self.prompts is not None:
            params += list(self.prompts.g_prompt.parameters())
            params += list(self.prompts.e_prompts[0].parameters())
        return params

    def feature(self, x: torch.Tensor) -> torch.Tensor:
        """The (prompted) frozen feature that enters the block."""
        if self.prompts is None:
            return x
        ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.backbone.prompted_from_trunk(x, self.first_layer,
                                                 self.prompts.prompts_for(ids))

    def train(self, mode: bool = True) -> None:
        """Training or evaluation mode of every part."""
        self.block.train(mode)
        if self.prompts is not None:
            self.prompts.train(mode)


def _pairs(num_classes: int, count: int, seed: int) -> List[List[int]]:
    rng = np.random.default_rng([seed, 11])
    return [sorted(rng.choice(num_classes, size=2, replace=False).tolist())
            for _ in range(count)]


def _pick(labels: np.ndarray, pair: Sequence[int], per_class: int,
          rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                           for c in pair])


def run_plasticity(inputs: FrozenInputs, config: LearnerConfig, *,
                   backbone: Optional[Backbone] = None, path: str = 'residual',
                   num_tasks: int = 200, train_per_class: int = 100, test_per_class: int = 50,
                   progress: Optional[Callable[[int, float], None]] = None) -> Dict[str, Any]:
    """The plasticity stream over ``inputs``; the result dict (``lifetime``: one row per task).

    Uses ``config``'s optimiser (Adam, ``learning_rate``, ``batch_size``, ``epochs``,
    ``grad_clip_norm``), CBP block and prompt settings and ``seed``; the optimiser is
    re-created for every task, as the learner does. With inputs that enter at a prompted
    layer, ``config``'s layout must be resolved (:func:`resolve_layout`).

    Raises:
        ValueError: an unknown ``path``, or fewer than 2 classes.
    """
    if path not in PATHS:
        raise ValueError(f'path must be one of {PATHS}')
    classes = np.unique(inputs.train_labels)
    if len(classes) < 2:
        raise ValueError('the plasticity stream needs at least 2 classes')
    c = config
    torch.manual_seed(c.seed)
    generator = torch.Generator().manual_seed(c.seed)
    rng = np.random.default_rng([c.seed, 13])
    model = _LearnedPath(inputs, c, backbone, path)
    device = inputs.train.device
    rows: List[Dict[str, Any]] = []
    started = time.perf_counter()
    for t, pair in enumerate(_pairs(len(classes), num_tasks, c.seed)):
        pair = [int(classes[k]) for k in pair]
        tr = _pick(inputs.train_labels, pair, train_per_class, rng)
        te = _pick(inputs.test_labels, pair, test_per_class, rng)
        x_tr, x_te = inputs.train[tr], inputs.test[te]
        y_tr = torch.from_numpy((inputs.train_labels[tr] == pair[1]).astype(np.int64)).to(device)
        y_te = torch.from_numpy((inputs.test_labels[te] == pair[1]).astype(np.int64)).to(device)
        head = ClassifierHead(model.dim).to(device)
        head.grow(2)
        params = model.shared_parameters() + list(head.parameters())
        optimizer = torch.optim.Adam(params, lr=c.learning_rate)
        model.train()
        replaced = 0
        for _ in range(c.epochs):
            order = torch.randperm(len(tr), generator=generator).to(device)
            for start in range(0, len(tr), c.batch_size):
                idx = order[start:start + c.batch_size]
                out = model.block(model.feature(x_tr[idx]), residual=model.residual)
                loss = F.cross_entropy(head(out), y_tr[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, c.grad_clip_norm)
                optimizer.step()
                model.block.update_utility()
                replaced += model.block.replace_units(optimizer)
        model.train(False)
        with torch.no_grad():
            z = model.feature(x_te)
            accuracy = float((head(model.block(z, residual=model.residual)).argmax(1)
                              == y_te).float().mean())
            hidden = model.block.hidden(z)
        zero_share = (hidden <= 0).float().mean(0)
        stats = model.block.stats()
        rows.append({
            'task': t, 'classes': pair, 'learning_accuracy': accuracy,
            'dormant_fraction': float(stats['dormant_fraction']),
            'dormant_fraction_zero': float((zero_share >= DORMANT_INPUT_SHARE).float().mean()),
            'effective_rank': effective_rank(hidden.cpu().numpy()),
            'weight_magnitude': float(model.block.fc1.weight.detach().abs().mean()),
            'replaced_units': int(replaced),
            'replacements_total': int(stats['replacements_total'])})
        if progress is not None:
            progress(t, accuracy)
    la = [r['learning_accuracy'] for r in rows]
    k = min(10, len(la))
    return {
        'protocol': 'plasticity', 'path': path, 'prompts': inputs.first_layer is not None,
        'tasks': num_tasks, 'lifetime': rows, 'learning_accuracy': float(np.mean(la)),
        'first10_learning_accuracy': float(np.mean(la[:k])),
        'last10_learning_accuracy': float(np.mean(la[-k:])),
        'train_seconds': round(time.perf_counter() - started, 3),
        'replaced_units': int(sum(r['replaced_units'] for r in rows)),
        'train_per_class': train_per_class, 'test_per_class': test_per_class,
        'cbp_enabled': bool(c.cbp_enabled), **last_tasks_summary(rows),
    }


def run_plasticity_method(method: str, data: ImageDataset, config: LearnerConfig,
                          backbone: Backbone, *, args: Any, cache: Dict[Any, FrozenInputs],
                          dataset: str, progress: bool = True) -> Dict[str, Any]:
    """One ``cbpnet-eval --protocol plasticity`` run of a learner method (its CBP and
    training settings) on ``data``; ``cache`` keeps the frozen inputs between the methods of
    one seed.

    Raises:
        ValueError: a baseline method (they have no learned parts to lose plasticity).
    """
    if method not in LEARNER_METHODS:
        raise ValueError(f'the plasticity protocol runs learner methods, not {method!r}')
    first_layer = None
    if args.plasticity_prompts:
        config = resolve_layout(config, backbone)  # as the learner reads it, [-1] included
        first_layer = min(config.g_prompt_layers + config.e_prompt_layers)
    if first_layer not in cache:
        cache[first_layer] = frozen_inputs(data, backbone, config.image_size, config.device,
                                           first_layer)
    bar = tqdm(total=args.lifetime_tasks, desc=f'{method} plasticity seed {config.seed}',
               unit='task', leave=False, dynamic_ncols=True) if progress else None

    def report(task: int, accuracy: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f'{accuracy:.2f}', refresh=False)
    try:
        res = run_plasticity(cache[first_layer], config, backbone=backbone,
                             path=args.plasticity_path, num_tasks=args.lifetime_tasks,
                             train_per_class=args.lifetime_train_per_class,
                             test_per_class=args.lifetime_test_per_class, progress=report)
    finally:
        if bar is not None:
            bar.close()
    counts = {'trainable_params': sum(int(p.numel()) for p in _LearnedPath(
        cache[first_layer], config, backbone, args.plasticity_path).shared_parameters())}
    res.update(method=method, dataset=dataset, split=args.split, backbone=backbone.name,
               seed=int(config.seed), config=dataclasses.asdict(config),
               image_size=int(config.image_size),
               backbone_params=backbone_parameter_count(backbone), **counts)
    return res
