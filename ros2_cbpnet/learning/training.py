"""One task's training of the learned recipe: prompts, CBP block and head (no ROS here).

Loss (design.md section 2.1): cross-entropy over the new task's classes minus
``pull_constraint_coeff`` times the pull constraint, plus ``feature_replay_coeff`` times a
cross-entropy on pseudo-features of earlier classes drawn from their stored Gaussians (the
project's drift control). Adam with a constant learning rate, gradient-norm clipping and,
for fp16, loss scaling (:class:`~ros2_cbpnet.learning.precision.TrainingPrecision`). Continual
backpropagation runs after every optimiser step that was taken.

The key of the task's E-prompt appears only in the pull constraint, whose other input (the
frozen query) has no gradient, so its training is separable: after the joint steps it gets
more Adam steps on the cached queries alone until it has had ``key_steps`` in all
(:func:`train_key`). DualPrompt's keys get on the order of a thousand steps per task; a
robot's small task gives tens, which left keys far from their optimum.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import LearnerConfig
from .model.backbones import Backbone
from .model.learned_state import LearnedState
from .precision import TrainingPrecision
from .types import Progress

__all__ = ['Progress', 'TaskData', 'TaskTraining', 'TrainingCancelled', 'TrainingDiverged',
           'key_query_cosine', 'steps_for', 'train_key', 'train_task']


@dataclass
class TaskData:
    """What one task trains on: frozen-pass results of its samples (all on the device).

    ``trunk`` is None when it did not fit the cache budget; ``inputs(idx)`` then gives the
    normalised images of a batch so the trunk can be recomputed per batch.
    """

    labels: torch.Tensor                 # class ids (into the head), (N,)
    queries: torch.Tensor                # frozen queries, (N, query_dim)
    trunk: Optional[torch.Tensor]        # trunk outputs, (N, ...), or None
    inputs: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TaskTraining:
    """What :func:`train_task` reports.

    ``key_query_cosine``: mean cosine between the task's key and its training queries after
    training; ``key_query_cosine_max``: the largest value any key can reach on them (the norm
    of the mean unit query), so the two together show whether the key converged.
    """

    replaced_units: int
    train_accuracy: float
    epochs: int
    key_query_cosine: float
    key_query_cosine_max: float


class TrainingCancelled(Exception):
    """The cancel event was set; the state being trained must be discarded."""


class TrainingDiverged(Exception):
    """The loss or the weights became non-finite; the state must be discarded."""


def steps_for(n: int, config: LearnerConfig) -> tuple:
    """(epochs, steps) for ``n`` samples: ``config.epochs`` epochs, raised until a task has
    at least ``config.min_steps`` optimiser steps (few-shot tasks)."""
    per_epoch = math.ceil(n / config.batch_size)
    epochs = max(config.epochs, math.ceil(config.min_steps / per_epoch))
    return epochs, epochs * per_epoch


def train_task(state: LearnedState, backbone: Backbone, task_id: int, data: TaskData,
               config: LearnerConfig, precision: TrainingPrecision, *,
               generator: torch.Generator,
               progress: Optional[Callable[[Progress], None]] = None,
               cancel: Optional[threading.Event] = None) -> TaskTraining:
    """Train task ``task_id``'s E-prompt and key, (the G-prompt,) the block and the head.

    ``state`` is a private copy and is changed in place.

    Raises:
        TrainingCancelled: ``cancel`` was set.
        TrainingDiverged: a non-finite loss or non-finite weights.
    """
    c = config
    device = data.labels.device
    class_ids = sorted(set(data.labels.tolist()))
    task_classes = torch.tensor(class_ids, device=device)
    # Labels relative to the task's own classes, for the class-masked cross-entropy.
    y_task = data.labels - class_ids[0]
    train_g = not (c.g_prompt_first_task_only and task_id > 0)
    state.set_g_prompt_trainable(train_g)
    state.train()
    params = state.task_parameters(task_id, train_g, c.train_cbp_block)
    replay = state.replay_classes(task_id) if c.feature_replay_coeff > 0 else None
    replay = replay if replay is not None and len(replay) else None
    optimizer = torch.optim.Adam(params, lr=c.learning_rate)
    n = len(data.labels)
    epochs, steps = steps_for(n, c)
    ids = torch.full((c.batch_size,), task_id, device=device)
    replaced, step, correct, seen = 0, 0, 0, 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        correct, seen = 0, 0
        for start in range(0, n, c.batch_size):
            if cancel is not None and cancel.is_set():
                raise TrainingCancelled()
            idx = order[start:start + c.batch_size]
            if data.trunk is not None:
                h = data.trunk[idx]
            else:
                with torch.no_grad(), precision.autocast():
                    h = backbone.trunk(data.inputs(idx), state.first_layer)
            with precision.autocast():
                z = state.prompted_features(backbone, h, ids[:len(idx)])
                if replay is not None:
                    # Old classes' pseudo-features share the batch through the block, so
                    # its utility also counts what earlier tasks rely on.
                    z_old, y_old = state.stats.sample_replay(replay, len(idx), generator)
                    z = torch.cat([z, z_old.to(z.dtype)])
                out = state.cbp(z)
                logits = state.head(out[:len(idx)], task_classes).float()
                loss = F.cross_entropy(logits, y_task[idx])
                loss = loss - c.pull_constraint_coeff * state.prompts.pull_constraint(
                    data.queries[idx].float(), task_id)
                if replay is not None:
                    old_logits = state.own_task_logits(out[len(idx):], y_old).float()
                    loss = loss + c.feature_replay_coeff * F.cross_entropy(old_logits, y_old)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f'training diverged (loss {loss.item()} at step '
                                       f'{step + 1})')
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss)
            if precision.step(optimizer, params, c.grad_clip_norm) and c.train_cbp_block:
                state.cbp.update_utility()
                replaced += state.cbp.replace_units(optimizer)
            else:
                state.cbp.discard_activation()
            step += 1
            correct += int((logits.argmax(1) == y_task[idx]).sum())
            seen += len(idx)
            if progress is not None:
                progress(Progress(task_id, epoch + 1, epochs, step, steps,
                                  float(loss.detach()), correct / seen, replaced))
    state.set_g_prompt_trainable(True)
    if c.pull_constraint_coeff > 0:
        train_key(state, task_id, data.queries, c.key_steps - step, config=c,
                  generator=generator, cancel=cancel)
    state.prompts.invalidate()  # the prompts and keys changed in place
    state.eval()
    if not all(torch.isfinite(p).all() for p in params):
        raise TrainingDiverged('training produced non-finite weights')
    cosine, best = key_query_cosine(state, task_id, data.queries)
    return TaskTraining(replaced, correct / max(seen, 1), epochs, cosine, best)


def train_key(state: LearnedState, task_id: int, queries: torch.Tensor, steps: int, *,
              config: LearnerConfig, generator: torch.Generator,
              cancel: Optional[threading.Event] = None) -> None:
    """``steps`` more Adam steps of the pull constraint on task ``task_id``'s key alone,
    in batches of the cached ``queries`` (same learning rate and clipping as the task)."""
    if steps <= 0:
        return
    key = state.prompts.prompt_keys[task_id]
    optimizer = torch.optim.Adam([key], lr=config.learning_rate)
    q = queries.float()
    n = q.shape[0]
    for step in range(steps):
        if step % 100 == 0 and cancel is not None and cancel.is_set():
            raise TrainingCancelled()
        idx = torch.randint(n, (min(config.batch_size, n),), generator=generator).to(q.device)
        loss = -config.pull_constraint_coeff * state.prompts.pull_constraint(q[idx], task_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([key], config.grad_clip_norm)
        optimizer.step()


@torch.no_grad()
def key_query_cosine(state: LearnedState, task_id: int, queries: torch.Tensor) -> tuple:
    """(mean cosine of the task's key with ``queries``, the largest mean cosine any key
    reaches on them)."""
    unit = F.normalize(queries.float(), dim=1)
    key = F.normalize(state.prompts.prompt_keys[task_id].detach().float(), dim=0)
    return float((unit @ key).mean()), float(unit.mean(0).norm())
