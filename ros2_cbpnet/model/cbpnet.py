"""CBPNet's learned state and its forward pass around a shared frozen backbone.

:class:`CBPNet` holds everything that is learned (G-prompt, E-prompt pool and keys, the
Efficient CBP Block, the classifier head and per-class statistics of the frozen query
features) and nothing that is frozen, so a copy for training in the background is small and
the backbone is never duplicated (design.md section 3).

Prompt selection (``prompt_selection``):
- ``'key'``: DualPrompt's instance-wise argmax of cosine(query, key_j) (the paper's recipe).
- ``'class_mean'``: the task of the nearest class mean (cosine) of the frozen query.
- ``'lda'``: the task of the most likely class under a shared-covariance Gaussian model
  (linear discriminant) of the frozen query features, with shrinkage.

Prediction (``prediction``):
- ``'all'``: softmax of the head over all classes seen so far (the paper's recipe).
- ``'task'``: p(c) = P(task(c) | query) * p(c | task(c), x): the head ranks the classes of the
  selected task with that task's prompt; P(task | query) comes from the selection model.
  This removes the uncalibrated competition between heads trained on different tasks.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone, Prompts, init_prompt_
from .cbp import CBPBlock

__all__ = ['CBPNet', 'PREDICTION_MODES', 'SELECTION_MODES']

SELECTION_MODES = ('key', 'class_mean', 'lda')
PREDICTION_MODES = ('all', 'task')
#: Cosine similarities span [-1, 1]; a temperature turns them into a usable posterior.
_NCM_TEMPERATURE = 16.0


class CBPNet(nn.Module):
    """Learned part of CBPNet: prompts, keys, CBP block, head and class statistics.

    Args:
        backbone: the frozen backbone the prompts are shaped for (not stored as a submodule).
        g_prompt_length, g_prompt_layers: shared G-prompt (empty layers = no G-prompt).
        e_prompt_length, e_prompt_layers: per-task E-prompts.
        cbp_hidden_units, cbp_replacement_rate, cbp_maturity_threshold, cbp_decay_rate,
            cbp_enabled: :class:`CBPBlock` settings.
        prompt_selection: one of :data:`SELECTION_MODES`.
        prediction: one of :data:`PREDICTION_MODES`.
        lda_shrinkage: weight of the isotropic part of the LDA covariance, in [0, 1].
    """

    def __init__(self, backbone: Backbone, *, g_prompt_length: int = 5,
                 g_prompt_layers: Sequence[int] = (0, 1), e_prompt_length: int = 5,
                 e_prompt_layers: Sequence[int] = (2, 3, 4), cbp_hidden_units: int = 64,
                 cbp_replacement_rate: float = 1e-4, cbp_maturity_threshold: int = 100,
                 cbp_decay_rate: float = 0.99, cbp_enabled: bool = True,
                 prompt_selection: str = 'lda', prediction: str = 'task',
                 lda_shrinkage: float = 0.1) -> None:
        super().__init__()
        if prompt_selection not in SELECTION_MODES:
            raise ValueError(f'prompt_selection must be one of {SELECTION_MODES}')
        if prediction not in PREDICTION_MODES:
            raise ValueError(f'prediction must be one of {PREDICTION_MODES}')
        if not 0.0 <= lda_shrinkage <= 1.0:
            raise ValueError('lda_shrinkage must be in [0, 1]')
        self.g_prompt_layers = sorted({int(i) for i in g_prompt_layers})
        self.e_prompt_layers = sorted({int(i) for i in e_prompt_layers})
        if not self.e_prompt_layers:
            raise ValueError('e_prompt_layers must name at least one layer')
        self.g_prompt_length = int(g_prompt_length)
        self.e_prompt_length = int(e_prompt_length)
        self.prompt_selection = prompt_selection
        self.prediction = prediction
        self.lda_shrinkage = float(lda_shrinkage)
        self.first_layer = min(self.g_prompt_layers + self.e_prompt_layers)
        self.feature_dim = backbone.feature_dim
        self._shapes = {i: backbone.prompt_shape(i, g_prompt_length)
                        for i in self.g_prompt_layers}
        self._e_shapes = {i: backbone.prompt_shape(i, e_prompt_length)
                          for i in self.e_prompt_layers}
        self.prompt_init = backbone.prompt_init
        self.g_prompt = nn.ParameterDict()
        for i, shape in self._shapes.items():
            p = nn.Parameter(torch.empty(shape))
            backbone.init_prompt_(p.data)
            self.g_prompt[str(i)] = p
        self.e_prompts = nn.ModuleList()
        self.prompt_keys = nn.ParameterList()
        self.cbp = CBPBlock(self.feature_dim, cbp_hidden_units,
                            replacement_rate=cbp_replacement_rate,
                            maturity_threshold=cbp_maturity_threshold,
                            decay_rate=cbp_decay_rate, enabled=cbp_enabled)
        d = self.feature_dim
        self.head_weight = nn.Parameter(torch.zeros(0, d))
        self.head_bias = nn.Parameter(torch.zeros(0))
        self.register_buffer('class_task', torch.zeros(0, dtype=torch.long))
        self.register_buffer('class_count', torch.zeros(0, dtype=torch.long))
        # False for forgotten classes: never predicted again, never replayed.
        self.register_buffer('class_active', torch.zeros(0, dtype=torch.bool))
        self.register_buffer('query_mean', torch.zeros(0, d))
        # Within-class scatter of the frozen queries, summed over all classes (for LDA).
        self.register_buffer('query_scatter', torch.zeros(d, d))
        # Per-class mean and variance of the prompted feature entering the CBP block, taken
        # with the class's own E-prompt right after its task: the source of feature replay.
        self.register_buffer('feature_mean', torch.zeros(0, d))
        self.register_buffer('feature_var', torch.zeros(0, d))
        self._cache: Optional[Dict[str, torch.Tensor]] = None

    # ----------------------------------------------------------------- growth
    @property
    def num_tasks(self) -> int:
        """Number of E-prompts (learned or being learned)."""
        return len(self.e_prompts)

    @property
    def num_classes(self) -> int:
        """Number of head rows."""
        return int(self.head_weight.shape[0])

    def add_task(self) -> int:
        """Append an E-prompt and key; returns the new task id.

        The E-prompt starts as a copy of the previous task's (DualPrompt's prompt transfer);
        the key is freshly drawn uniform(-1, 1).
        """
        device = self.head_weight.device
        prompt = nn.ParameterDict()
        for i, shape in self._e_shapes.items():
            if self.num_tasks:
                init = self.e_prompts[-1][str(i)].detach().clone()
            else:
                init = torch.empty(shape, device=device)
                init_prompt_(init, self.prompt_init)
            prompt[str(i)] = nn.Parameter(init)
        self.e_prompts.append(prompt)
        key = torch.empty(self.feature_dim, device=device)
        nn.init.uniform_(key, -1.0, 1.0)
        self.prompt_keys.append(nn.Parameter(key))
        self.invalidate_cache()
        return self.num_tasks - 1

    def add_classes(self, count: int, task_id: int) -> List[int]:
        """Grow the head and statistics by ``count`` classes owned by ``task_id``."""
        if count <= 0:
            return []
        d, device = self.feature_dim, self.head_weight.device
        start = self.num_classes
        new_w = torch.empty(count, d, device=device)
        nn.init.normal_(new_w, std=0.01)
        self.head_weight = nn.Parameter(torch.cat([self.head_weight.detach(), new_w]))
        self.head_bias = nn.Parameter(torch.cat([self.head_bias.detach(),
                                                 torch.zeros(count, device=device)]))
        self.class_task = torch.cat([self.class_task, torch.full(
            (count,), task_id, dtype=torch.long, device=device)])
        self.class_count = torch.cat([self.class_count, torch.zeros(
            count, dtype=torch.long, device=device)])
        self.class_active = torch.cat([self.class_active, torch.ones(
            count, dtype=torch.bool, device=device)])
        self.query_mean = torch.cat([self.query_mean, torch.zeros(count, d, device=device)])
        self.feature_mean = torch.cat([self.feature_mean, torch.zeros(count, d, device=device)])
        self.feature_var = torch.cat([self.feature_var, torch.zeros(count, d, device=device)])
        self.invalidate_cache()
        return list(range(start, start + count))

    def grow_to(self, num_tasks: int, class_task: Sequence[int]) -> None:
        """Create the shapes of a saved model so its state dict can be loaded."""
        while self.num_tasks < num_tasks:
            self.add_task()
        for t in class_task[self.num_classes:]:
            self.add_classes(1, int(t))

    @torch.no_grad()
    def add_class_statistics(self, class_ids: torch.Tensor, queries: torch.Tensor) -> None:
        """Merge frozen query features of labelled samples into the class statistics."""
        queries = queries.to(self.query_mean.dtype)
        for c in torch.unique(class_ids).tolist():
            q = queries[class_ids == c]
            n_new = q.shape[0]
            mean_new = q.mean(0)
            centred = q - mean_new
            scatter = centred.T @ centred
            n_old = int(self.class_count[c])
            if n_old:
                delta = (mean_new - self.query_mean[c])[:, None]
                scatter = scatter + (n_old * n_new / (n_old + n_new)) * (delta @ delta.T)
                mean_new = (self.query_mean[c] * n_old + mean_new * n_new) / (n_old + n_new)
            self.query_scatter += scatter
            self.query_mean[c] = mean_new
            self.class_count[c] = n_old + n_new
        self.invalidate_cache()

    @torch.no_grad()
    def merge_feature_statistics(self, class_ids: torch.Tensor, features: torch.Tensor) -> None:
        """Merge block-input features into each class's mean and variance (feature replay).

        Call before :meth:`add_class_statistics`, whose counts weight the old statistics.
        """
        features = features.to(self.feature_mean.dtype)
        for c in torch.unique(class_ids).tolist():
            f = features[class_ids == c]
            n_new, n_old = f.shape[0], int(self.class_count[c])
            mean_new = f.mean(0)
            var_new = f.var(0, unbiased=False) if n_new > 1 else torch.zeros_like(mean_new)
            if n_old:
                n = n_old + n_new
                delta = mean_new - self.feature_mean[c]
                var_new = (n_old * self.feature_var[c] + n_new * var_new) / n \
                    + (n_old * n_new / n ** 2) * delta ** 2
                mean_new = self.feature_mean[c] + delta * (n_new / n)
            self.feature_mean[c] = mean_new
            self.feature_var[c] = var_new

    def replay_classes(self, before_task: int) -> torch.Tensor:
        """Classes of tasks before ``before_task`` that have feature statistics."""
        has_stats = (self.class_count > 0) & self.class_active
        return torch.nonzero(has_stats & (self.class_task < before_task)).flatten()

    def sample_replay(self, classes: torch.Tensor, count: int, generator: torch.Generator
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-features of old classes drawn from their diagonal Gaussians."""
        pick = torch.randint(len(classes), (count,), generator=generator)
        cls = classes[pick.to(classes.device)]
        noise = torch.randn(count, self.feature_dim, generator=generator).to(
            self.feature_mean.device)
        return self.feature_mean[cls] + noise * self.feature_var[cls].sqrt(), cls

    def own_task_logits(self, z: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Logits over all classes with those outside each sample's own task masked out."""
        same_task = self.class_task.unsqueeze(0) == self.class_task[class_ids].unsqueeze(1)
        return self.logits(z).masked_fill(~same_task, float('-inf'))

    # ---------------------------------------------------------------- forward
    def invalidate_cache(self) -> None:
        """Forget precomputed inference tensors (after any change of the state)."""
        self._cache = None

    def trainable_parameters(self, task_id: int, train_g_prompt: bool = True
                             ) -> List[nn.Parameter]:
        """Parameters trained for ``task_id``: G-prompt (optional), its E-prompt and key,
        block, head. Marks the G-prompt's ``requires_grad`` accordingly."""
        for p in self.g_prompt.parameters():
            p.requires_grad_(train_g_prompt)
        params = list(self.g_prompt.parameters()) if train_g_prompt else []
        params += list(self.e_prompts[task_id].parameters())
        params += [self.prompt_keys[task_id], self.head_weight, self.head_bias]
        return params + list(self.cbp.parameters())

    def prompts_for(self, task_ids: torch.Tensor) -> Prompts:
        """Per-sample prompts: the G-prompt for everyone, each sample's own E-prompt."""
        b = task_ids.shape[0]
        prompts: Prompts = {}
        for key, p in self.g_prompt.items():
            prompts.setdefault(int(key), []).append(p.unsqueeze(0).expand(b, *p.shape))
        single = bool((task_ids == task_ids[0]).all()) if b else True
        stacked = None if single else self._stacked_e_prompts()
        for i in self.e_prompt_layers:
            if single:
                p = self.e_prompts[int(task_ids[0]) if b else 0][str(i)]
                prompts.setdefault(i, []).append(p.unsqueeze(0).expand(b, *p.shape))
            else:
                prompts.setdefault(i, []).append(stacked[i][task_ids])
        return prompts

    def _stacked_e_prompts(self) -> Dict[int, torch.Tensor]:
        if self.training:
            return {i: torch.stack([e[str(i)] for e in self.e_prompts])
                    for i in self.e_prompt_layers}
        cache = self._inference_cache()
        return {i: cache[f'e{i}'] for i in self.e_prompt_layers}

    def features(self, backbone: Backbone, trunk: torch.Tensor,
                 task_ids: torch.Tensor) -> torch.Tensor:
        """Prompted backbone feature followed by the CBP block."""
        z = backbone.prompted_from_trunk(trunk, self.first_layer, self.prompts_for(task_ids))
        return self.cbp(z)

    def logits(self, z: torch.Tensor, class_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Head logits over all classes, or only over ``class_ids``."""
        w, b = self.head_weight, self.head_bias
        if class_ids is not None:
            w, b = w[class_ids], b[class_ids]
        return z @ w.T.to(z.dtype) + b.to(z.dtype)

    def pull_constraint(self, queries: torch.Tensor, task_id: int) -> torch.Tensor:
        """Mean cosine similarity between queries and the task's key (maximised)."""
        key = self.prompt_keys[task_id]
        return F.cosine_similarity(queries, key.unsqueeze(0).to(queries.dtype), dim=1).mean()

    @torch.no_grad()
    def _inference_cache(self) -> Dict[str, torch.Tensor]:
        if self._cache is not None:
            return self._cache
        cache: Dict[str, torch.Tensor] = {}
        if self.num_tasks:
            cache['keys'] = F.normalize(torch.stack(list(self.prompt_keys)).detach(), dim=1)
            for i in self.e_prompt_layers:
                cache[f'e{i}'] = torch.stack([e[str(i)].detach() for e in self.e_prompts])
        counts = self.class_count
        seen = (counts > 0) & self.class_active
        cache['seen'] = seen
        if self.num_classes and bool(seen.any()):
            mean = self.query_mean
            cache['mean_unit'] = F.normalize(mean, dim=1)
            n, c = int(counts.sum()), int(seen.sum())
            d = self.feature_dim
            cov = self.query_scatter.double() / max(n - c, 1)
            trace = float(torch.diagonal(cov).sum()) / d
            alpha = self.lda_shrinkage if n - c > 0 else 1.0
            cov = (1.0 - alpha) * cov + alpha * max(trace, 1e-6) * torch.eye(
                d, dtype=cov.dtype, device=cov.device)
            weight = torch.linalg.solve(cov, mean.double().T).T  # (C, D) = mean @ cov^-1
            cache['lda_w'] = weight.to(mean.dtype)
            cache['lda_b'] = (-0.5 * (weight * mean.double()).sum(1)).to(mean.dtype)
            cache['precision'] = torch.linalg.inv(cov).to(mean.dtype)
        self._cache = cache
        return cache

    @torch.no_grad()
    def class_posterior(self, queries: torch.Tensor) -> Optional[torch.Tensor]:
        """p(class | query) from the class statistics (None when there are none)."""
        cache = self._inference_cache()
        if 'mean_unit' not in cache:
            return None
        q = queries.to(cache['mean_unit'].dtype)
        if self.prompt_selection == 'lda':
            scores = q @ cache['lda_w'].T + cache['lda_b']
        else:
            scores = _NCM_TEMPERATURE * (F.normalize(q, dim=1) @ cache['mean_unit'].T)
        scores = scores.masked_fill(~cache['seen'], float('-inf'))
        return torch.softmax(scores.float(), dim=1)

    @torch.no_grad()
    def novelty(self, queries: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each query to the nearest taught class mean, per
        feature dimension, under the shrunk shared covariance (0 = at a class mean)."""
        cache = self._inference_cache()
        if 'precision' not in cache:
            return torch.zeros(queries.shape[0], device=queries.device)
        q = queries.to(cache['precision'].dtype)
        quad = ((q @ cache['precision']) * q).sum(1, keepdim=True)
        dist = quad - 2.0 * (q @ cache['lda_w'].T + cache['lda_b'])
        dist = dist.masked_fill(~cache['seen'], float('inf'))
        return dist.min(1).values.clamp_min(0.0).float() / self.feature_dim

    @torch.no_grad()
    def task_posterior(self, queries: torch.Tensor) -> torch.Tensor:
        """P(task | query) for each sample, shape (B, num_tasks)."""
        b, t = queries.shape[0], self.num_tasks
        if t == 1:
            return torch.ones(b, 1, device=queries.device)
        class_post = None if self.prompt_selection == 'key' else self.class_posterior(queries)
        if class_post is None:
            keys = self._inference_cache()['keys']
            sim = F.normalize(queries.float(), dim=1) @ keys.float().T
            alive = torch.zeros(t, dtype=torch.bool, device=sim.device)
            alive[self.class_task[self.class_active]] = True
            sim = sim.masked_fill(~alive, float('-inf'))
            return F.one_hot(sim.argmax(1), t).float()
        task_post = torch.zeros(b, t, device=queries.device)
        task_post.index_add_(1, self.class_task, class_post)
        return task_post

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
        """:meth:`predict` plus :meth:`novelty` of each frame (None when not asked for).

        Novelty needs the frozen query, so the one-task shortcut (no query pass) only applies
        when ``novelty`` is False.
        """
        if not self.num_tasks or not bool(self.class_active.any()):
            raise RuntimeError('no task has been learned yet')
        b = x.shape[0]
        queries = None
        if not fast_paths:
            queries = backbone.query(x)
            trunk = backbone.trunk(x, self.first_layer)
        else:
            trunk = backbone.trunk(x, self.first_layer)
            if self.num_tasks > 1 or novelty:
                queries = backbone.query_from_trunk(trunk, self.first_layer)
        if self.num_tasks == 1 and fast_paths:
            # One task: its E-prompt is the only choice, so selection needs no query.
            task_post = torch.ones(b, 1, device=x.device)
            class_post = None
        else:
            task_post = self.task_posterior(queries)
            class_post = None if self.prompt_selection == 'key' \
                else self.class_posterior(queries)
        task_ids = task_post.argmax(1)
        z = self.features(backbone, trunk, task_ids)
        logits = self.logits(z).float().masked_fill(~self.class_active, float('-inf'))
        if self.prediction == 'all':
            probs = torch.softmax(logits, dim=1)
        else:
            probs = self._task_conditional(logits, task_ids, task_post, class_post)
        return probs, task_ids, (self.novelty(queries) if novelty else None)

    def _task_conditional(self, logits: torch.Tensor, task_ids: torch.Tensor,
                          task_post: torch.Tensor, class_post: Optional[torch.Tensor]
                          ) -> torch.Tensor:
        owner = self.class_task.unsqueeze(0)                          # (1, C)
        in_selected = owner == task_ids.unsqueeze(1)                  # (B, C)
        within = torch.softmax(logits.masked_fill(~in_selected, float('-inf')), dim=1)
        if class_post is None:
            # No class statistics (key selection): other tasks share their mass uniformly.
            sizes = torch.bincount(self.class_task[self.class_active],
                                   minlength=self.num_tasks).float().clamp_min(1.0)
            other = (self.class_active.float() / sizes[self.class_task]).unsqueeze(0)
            other = other.expand_as(logits)
        else:
            per_task = torch.zeros_like(task_post).index_add_(1, self.class_task, class_post)
            other = class_post / per_task.gather(1, owner.expand_as(logits)).clamp_min(1e-12)
        conditional = torch.where(in_selected, within, other)
        return conditional * task_post.gather(1, owner.expand_as(logits))
