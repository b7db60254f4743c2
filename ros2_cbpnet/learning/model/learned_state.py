"""CBPNet's learned state and its prediction around a shared frozen backbone.

:class:`LearnedState` holds everything that is learned and nothing that is frozen, so a copy for
training in the background is small and the backbone is never duplicated (design.md
section 3). It is assembled from one-idea parts:

- :class:`~.prompts.PromptPool`: G-prompt, E-prompts and their keys (DualPrompt);
- :class:`~.cbp.CBPBlock`: the Efficient CBP Block (continual backpropagation);
- :class:`~.head.ClassifierHead`: one linear layer over all classes seen so far;
- :class:`~.statistics.ClassStatistics`: per-class statistics of the frozen query, which
  give a closed-form shrinkage LDA, a novelty score and the replay statistics.

Prompt selection (``prompt_selection``) picks each frame's E-prompt:
- ``'key'``: DualPrompt's argmax of cosine(query, key_j) (the paper's recipe);
- ``'class_mean'``: the task of the nearest class mean (cosine) of the frozen query;
- ``'lda'``: the task with the most posterior mass under the shrinkage LDA.

Prediction (``prediction``):
- ``'all'``: softmax of the head over all classes seen so far (the paper's recipe);
- ``'task'``: p(c) = P(task(c) | query) * p(c | task(c), x), where within the selected task
  the LDA log-posterior and ``head_weight`` times the prompted head's logits are added
  (a product of experts); other tasks' classes keep their LDA posterior;
- ``'stats'``: the LDA posterior alone. No prompted pass runs, so a prediction costs one
  backbone pass, and learning a task only updates statistics.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import PREDICTION_MODES, SELECTION_MODES
from .backbones import Backbone
from .cbp import CBPBlock
from .head import ClassifierHead
from .prompts import PromptPool
from .statistics import ClassStatistics

__all__ = ['LearnedState', 'PREDICTION_MODES', 'SELECTION_MODES']

#: Cosine similarities span [-1, 1]; a temperature turns them into a usable posterior.
_NCM_TEMPERATURE = 16.0


class LearnedState(nn.Module):
    """Learned part of CBPNet: prompts, keys, CBP block, head and class statistics.

    Args:
        backbone: the frozen backbone the prompts are shaped for (not stored as a submodule).
        g_prompt_length, g_prompt_layers: shared G-prompt (empty layers = no G-prompt).
        e_prompt_length, e_prompt_layers: per-task E-prompts.
        query_layers: backbone layers whose pooled outputs form the frozen query.
        cbp_hidden_units, cbp_replacement_rate, cbp_maturity_threshold, cbp_decay_rate,
            cbp_enabled: :class:`CBPBlock` settings.
        prompt_selection: one of :data:`SELECTION_MODES`.
        prediction: one of :data:`PREDICTION_MODES`.
        head_weight: weight of the prompted head against the LDA in ``'task'`` prediction.
        lda_shrinkage: weight of the isotropic part of the LDA covariance, in [0, 1].
    """

    def __init__(self, backbone: Backbone, *, g_prompt_length: int = 5,
                 g_prompt_layers: Sequence[int] = (0, 1), e_prompt_length: int = 5,
                 e_prompt_layers: Sequence[int] = (2, 3, 4),
                 query_layers: Optional[Sequence[int]] = None, cbp_hidden_units: int = 64,
                 cbp_replacement_rate: float = 1e-4, cbp_maturity_threshold: int = 100,
                 cbp_decay_rate: float = 0.99, cbp_enabled: bool = True,
                 prompt_selection: str = 'lda', prediction: str = 'task',
                 head_weight: float = 1.0, lda_shrinkage: float = 0.1) -> None:
        super().__init__()
        if prompt_selection not in SELECTION_MODES:
            raise ValueError(f'prompt_selection must be one of {SELECTION_MODES}')
        if prediction not in PREDICTION_MODES:
            raise ValueError(f'prediction must be one of {PREDICTION_MODES}')
        if head_weight < 0:
            raise ValueError('head_weight must be >= 0')
        self.query_layers = sorted({int(i) for i in (
            backbone.default_query_layers() if query_layers is None else query_layers)})
        if not self.query_layers or not all(0 <= i < backbone.num_layers
                                            for i in self.query_layers):
            raise ValueError(f'query_layers must be in 0..{backbone.num_layers - 1}')
        self.prompt_selection = prompt_selection
        self.prediction = prediction
        self.head_weight = float(head_weight)
        self.feature_dim = backbone.feature_dim
        self.query_dim = backbone.query_dim(self.query_layers)
        self.prompts = PromptPool(backbone, g_prompt_length=g_prompt_length,
                                  g_prompt_layers=g_prompt_layers,
                                  e_prompt_length=e_prompt_length,
                                  e_prompt_layers=e_prompt_layers, key_dim=self.query_dim)
        self.first_layer = self.prompts.first_layer
        self.cbp = CBPBlock(self.feature_dim, cbp_hidden_units,
                            replacement_rate=cbp_replacement_rate,
                            maturity_threshold=cbp_maturity_threshold,
                            decay_rate=cbp_decay_rate, enabled=cbp_enabled)
        self.head = ClassifierHead(self.feature_dim)
        self.stats = ClassStatistics(self.query_dim, self.feature_dim, lda_shrinkage)
        self.register_buffer('class_task', torch.zeros(0, dtype=torch.long))
        # False for forgotten classes: never predicted again, never replayed.
        self.register_buffer('class_active', torch.zeros(0, dtype=torch.bool))
        # False for tasks learned without training the prompts (``'stats'`` prediction):
        # their head rows carry no information, so ``'task'`` prediction ignores them.
        self.register_buffer('task_trained', torch.zeros(0, dtype=torch.bool))

    # ----------------------------------------------------------------- growth
    @property
    def num_tasks(self) -> int:
        """Number of E-prompts (learned or being learned)."""
        return len(self.prompts)

    @property
    def num_classes(self) -> int:
        """Number of classes ever added (forgotten ones included)."""
        return int(self.class_task.shape[0])

    @property
    def trains_prompts(self) -> bool:
        """Whether learning a task trains prompts, block and head (all but ``'stats'``)."""
        return self.prediction != 'stats'

    def add_task(self, trained: bool = True) -> int:
        """Append an E-prompt and key; returns the new task id."""
        device = self.class_task.device
        task_id = self.prompts.add_task(device)
        self.task_trained = torch.cat([self.task_trained, torch.tensor(
            [trained], dtype=torch.bool, device=device)])
        return task_id

    def add_classes(self, count: int, task_id: int) -> List[int]:
        """Grow the head and statistics by ``count`` classes owned by ``task_id``."""
        if count <= 0:
            return []
        device = self.class_task.device
        start = self.num_classes
        self.head.grow(count)
        self.stats.grow(count)
        self.class_task = torch.cat([self.class_task, torch.full(
            (count,), task_id, dtype=torch.long, device=device)])
        self.class_active = torch.cat([self.class_active, torch.ones(
            count, dtype=torch.bool, device=device)])
        return list(range(start, start + count))

    def grow_to(self, num_tasks: int, class_task: Sequence[int]) -> None:
        """Create the shapes of a saved model so its state dict can be loaded."""
        while self.num_tasks < num_tasks:
            self.add_task()
        for t in class_task[self.num_classes:]:
            self.add_classes(1, int(t))

    def set_g_prompt_trainable(self, trainable: bool) -> None:
        """Switch gradients of the shared G-prompt on or off (off after the first task)."""
        for p in self.prompts.g_prompt.parameters():
            p.requires_grad_(trainable)

    def task_parameters(self, task_id: int, with_g_prompt: bool, with_block: bool = True
                        ) -> List[nn.Parameter]:
        """What one task trains: (G-prompt,) its E-prompt and key, (the CBP block,) the head."""
        block = list(self.cbp.parameters()) if with_block else []
        return self.prompts.task_parameters(task_id, with_g_prompt) + block \
            + list(self.head.parameters())

    def replay_classes(self, before_task: int) -> torch.Tensor:
        """Active classes of tasks before ``before_task`` that have statistics."""
        usable = (self.stats.class_count > 0) & self.class_active
        return torch.nonzero(usable & (self.class_task < before_task)).flatten()

    def own_task_logits(self, z: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Head logits with the classes outside each sample's own task masked out."""
        same_task = self.class_task.unsqueeze(0) == self.class_task[class_ids].unsqueeze(1)
        return self.head(z).masked_fill(~same_task, float('-inf'))

    # ---------------------------------------------------------------- passes
    def invalidate_cache(self) -> None:
        """Forget precomputed inference tensors (after any change of the state)."""
        self.prompts.invalidate()
        self.stats.invalidate()

    @torch.no_grad()
    def prepare_inference(self) -> None:
        """Build the inference caches now (parts whose inputs changed have invalidated
        theirs), so the first prediction after a swap is fast."""
        if self.num_tasks > 1:
            self.prompts.key_similarity(torch.zeros(1, self.query_dim,
                                                    device=self.class_task.device))
        self.stats.lda(self.class_active)

    def trunk_and_taps(self, backbone: Backbone, x: torch.Tensor
                       ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The unprompted trunk below the first prompted layer, and the query taps in it."""
        return backbone.tapped_trunk(x, self.first_layer, self.query_layers)

    def queries(self, backbone: Backbone, trunk: torch.Tensor,
                taps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The frozen query from :meth:`trunk_and_taps`."""
        return backbone.tapped_query(trunk, self.first_layer, self.query_layers, taps)

    def prompted_features(self, backbone: Backbone, trunk: torch.Tensor,
                          task_ids: torch.Tensor) -> torch.Tensor:
        """The prompted backbone feature (the CBP block's input), each sample with the
        G-prompt and its own E-prompt."""
        return backbone.prompted_from_trunk(trunk, self.first_layer,
                                            self.prompts.prompts_for(task_ids))

    # ------------------------------------------------------------ prediction
    @torch.no_grad()
    def class_log_posterior(self, queries: torch.Tensor,
                            dist: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p(class | query) from the statistics, as the selection mode defines it.
        ``dist``: the statistics' :meth:`~.statistics.ClassStatistics.distances`, when
        already computed for these queries."""
        active = self.class_active
        if self.prompt_selection == 'class_mean':
            means = F.normalize(self.stats.query_mean.float(), dim=1)
            scores = _NCM_TEMPERATURE * (F.normalize(queries.float(), dim=1) @ means.T)
            seen = (self.stats.class_count > 0) & active
            return torch.log_softmax(scores.masked_fill(~seen, float('-inf')), dim=1)
        log_post = self.stats.log_posterior(queries, active, dist)
        if log_post is None:
            raise RuntimeError('no class statistics yet')
        return log_post

    @torch.no_grad()
    def task_posterior(self, queries: torch.Tensor) -> torch.Tensor:
        """P(task | query) (B, num_tasks) as the selection mode defines it (one-hot for keys)."""
        log_post = None if self.prompt_selection == 'key' else self.class_log_posterior(queries)
        return self._task_posterior(queries, log_post, queries.shape[0], queries.device)

    @torch.no_grad()
    def predict(self, backbone: Backbone, x: torch.Tensor, fast_paths: bool = True
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities (B, C) and selected task ids (B,) for a normalised batch.

        ``fast_paths=False`` runs the naive two full passes (no shared trunk, no one-task
        shortcut); the benchmark uses it to show what the savings buy.
        """
        probs, task_ids, _ = self.predict_with_novelty(backbone, x, fast_paths, novelty=False)
        return probs, task_ids

    @torch.no_grad()
    def predict_with_novelty(self, backbone: Backbone, x: torch.Tensor,
                             fast_paths: bool = True, novelty: bool = True
                             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`predict` plus the novelty of each frame (None when not asked for).

        Novelty needs the frozen query, so the one-task shortcut (no query pass) only
        applies when ``novelty`` is False and the head predicts.
        """
        if not self.num_tasks or not bool(self.class_active.any()):
            raise RuntimeError('no task has been learned yet')
        b = x.shape[0]
        stats_only = self.prediction == 'stats'
        need_query = stats_only or novelty or self.num_tasks > 1 or not fast_paths
        if fast_paths:
            trunk, taps = self.trunk_and_taps(backbone, x)
            queries = self.queries(backbone, trunk, taps) if need_query else None
        else:
            queries = backbone.query(x, self.query_layers)
            trunk = None if stats_only else backbone.trunk(x, self.first_layer)
        if stats_only:
            return self.predict_from_queries(queries, novelty)
        log_post = None
        if queries is not None and self.prompt_selection != 'key':
            log_post = self.class_log_posterior(queries)
        nov = self.stats.novelty(queries, self.class_active) if novelty else None
        task_post = self._task_posterior(queries, log_post, b, x.device)
        task_ids = task_post.argmax(1)
        logits = self.head(self.cbp(self.prompted_features(backbone, trunk, task_ids))).float()
        logits = logits.masked_fill(~self.class_active, float('-inf'))
        if self.prediction == 'all':
            return torch.softmax(logits, dim=1), task_ids, nov
        return self._task_conditional(logits, task_ids, task_post, log_post), task_ids, nov

    @torch.no_grad()
    def predict_from_queries(self, queries: torch.Tensor, novelty: bool = True
                             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The ``'stats'`` prediction from frozen queries computed elsewhere (e.g. by ONNX
        Runtime): class probabilities, the task of the best class, novelty (or None)."""
        if not self.num_tasks or not bool(self.class_active.any()):
            raise RuntimeError('no task has been learned yet')
        found = self.stats.distances(queries, self.class_active)
        dist = None if found is None else found[0]
        probs = self.class_log_posterior(queries, dist).exp()
        nov = self.stats.novelty(queries, self.class_active, dist) if novelty else None
        return probs, self.class_task[probs.argmax(1)], nov

    @torch.no_grad()
    def within_task_scores(self, backbone: Backbone, x: torch.Tensor, task_id: int
                           ) -> torch.Tensor:
        """Scores (B, classes of ``task_id``) deciding among one task's classes with the task
        known, as the prediction mode would inside that task (for learning accuracy)."""
        classes = torch.nonzero(self.class_task == task_id).flatten()
        trunk, taps = self.trunk_and_taps(backbone, x)
        scores = torch.zeros(x.shape[0], len(classes), device=x.device)
        if self.prediction != 'all' and self.prompt_selection != 'key':
            scores = scores + self.class_log_posterior(self.queries(backbone, trunk, taps))[
                :, classes]
        if self.prediction != 'stats':
            ids = torch.full((x.shape[0],), task_id, device=x.device)
            logits = self.head(self.cbp(self.prompted_features(backbone, trunk, ids)))[
                :, classes].float()
            weight = 1.0 if self.prediction == 'all' or self.prompt_selection == 'key' \
                else self.head_weight * float(self.task_trained[task_id])
            scores = scores + weight * logits
        return scores

    def _task_posterior(self, queries: Optional[torch.Tensor], log_post: Optional[torch.Tensor],
                        b: int, device: torch.device) -> torch.Tensor:
        t = self.num_tasks
        if t == 1:
            return torch.ones(b, 1, device=device)
        if self.prompt_selection == 'key' or log_post is None:
            sim = self.prompts.key_similarity(queries)
            alive = torch.zeros(t, dtype=torch.bool, device=sim.device)
            alive[self.class_task[self.class_active]] = True
            return F.one_hot(sim.masked_fill(~alive, float('-inf')).argmax(1), t).float()
        task_post = torch.zeros(b, t, device=device)
        return task_post.index_add_(1, self.class_task, log_post.exp())

    def _task_conditional(self, logits: torch.Tensor, task_ids: torch.Tensor,
                          task_post: torch.Tensor, log_post: Optional[torch.Tensor]
                          ) -> torch.Tensor:
        owner = self.class_task.unsqueeze(0)                          # (1, C)
        in_selected = (owner == task_ids.unsqueeze(1)) & self.class_active
        mass = task_post.gather(1, owner.expand_as(logits))           # P(task(c) | x)
        if log_post is None:
            # No class statistics (key selection): the head ranks the selected task's
            # classes; every other task's classes share its (zero) mass uniformly.
            within = torch.softmax(logits.masked_fill(~in_selected, float('-inf')), dim=1)
            return torch.where(in_selected, within, torch.zeros_like(within)) * mass
        weight = self.head_weight * self.task_trained[task_ids].float().unsqueeze(1)
        fused = torch.nan_to_num(log_post, neginf=-1e30) + weight * torch.nan_to_num(
            logits, neginf=0.0)
        within = torch.softmax(fused.masked_fill(~in_selected, float('-inf')), dim=1)
        return torch.where(in_selected, within * mass, log_post.exp())
