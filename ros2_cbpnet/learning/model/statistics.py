"""Per-class statistics of the frozen query: the closed-form classifier, novelty and replay.

Everything here is exact streaming arithmetic over labelled samples, so it neither forgets
nor depends on the order in which classes arrive:

- per class: the sample count and the mean of the frozen query;
- shared: the within-class scatter matrix summed over all classes;
- a shrinkage linear discriminant (LDA) from them: one shared covariance,
  ``(1 - alpha) * S + alpha * mean(diag S) * I`` (the streaming LDA of Hayes & Kanan, CVPR-W
  2020, which is also what RanPAC's decorrelated prototypes reduce to without projection);
- novelty: the relative Mahalanobis distance (Ren et al., "A simple fix to Mahalanobis
  distance for improving near-OOD detection", 2021): the squared distance to the nearest
  class mean under that covariance minus the squared distance to one background Gaussian of
  all taught samples, per query dimension; then standardised by its mean and standard
  deviation over taught samples measured *leave-one-out* (each sample scored as if it had
  not been taught: its class mean and the covariances without it, by the Sherman-Morrison
  formula, so it costs no extra matrix inversion). So 0 is "like a new view of a taught
  class", 1 is one standard deviation less like one, on any backbone, data set and number of
  samples (in-sample distances would be far too small whenever a class has fewer samples than
  the query has dimensions, the usual case on a robot);
- for the learned recipe's feature replay: per-class mean and variance of the prompted
  feature that enters the CBP block.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..choices import SPREADS

__all__ = ['ClassStatistics', 'SPREADS', 'quadratic_form']


class ClassStatistics(nn.Module):
    """Streaming class statistics and the shrinkage LDA built from them.

    Args:
        query_dim: size of the frozen query.
        feature_dim: size of the prompted feature (for feature replay).
        shrinkage: weight of the isotropic part of the covariance, in [0, 1].
        spread: how a class's sample count enters its score (:data:`SPREADS`):
            ``'scaled'`` divides the squared distance by the predictive spread ``1 + 1/n``;
            ``'full'`` is the whole Gaussian predictive log-density, which also subtracts
            ``D/2 log(1 + 1/n)``; ``'none'`` ignores the counts (plain LDA).
    """

    def __init__(self, query_dim: int, feature_dim: int, shrinkage: float = 0.1,
                 spread: str = 'scaled') -> None:
        super().__init__()
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError('lda_shrinkage must be in [0, 1]')
        if spread not in SPREADS:
            raise ValueError(f'lda_spread must be one of {SPREADS}')
        self.query_dim, self.feature_dim = int(query_dim), int(feature_dim)
        self.shrinkage = float(shrinkage)
        self.spread = spread
        self.register_buffer('class_count', torch.zeros(0, dtype=torch.long))
        self.register_buffer('query_mean', torch.zeros(0, query_dim))
        self.register_buffer('query_scatter', torch.zeros(query_dim, query_dim))
        self.register_buffer('feature_mean', torch.zeros(0, feature_dim))
        self.register_buffer('feature_var', torch.zeros(0, feature_dim))
        # Running sums of the held-out raw novelty of taught samples (its mean and spread are
        # the zero and unit of :meth:`novelty`).
        self.register_buffer('novelty_sum', torch.zeros((), dtype=torch.float64))
        self.register_buffer('novelty_sum_sq', torch.zeros((), dtype=torch.float64))
        self.register_buffer('novelty_count', torch.zeros((), dtype=torch.long))
        self._lda: Optional[Dict[str, torch.Tensor]] = None

    @property
    def num_classes(self) -> int:
        """Number of classes with a statistics slot."""
        return int(self.class_count.shape[0])

    def grow(self, count: int) -> None:
        """Add ``count`` empty class slots."""
        device = self.query_mean.device
        self.class_count = torch.cat([self.class_count, torch.zeros(
            count, dtype=torch.long, device=device)])
        self.query_mean = torch.cat([self.query_mean, torch.zeros(
            count, self.query_dim, device=device)])
        self.feature_mean = torch.cat([self.feature_mean, torch.zeros(
            count, self.feature_dim, device=device)])
        self.feature_var = torch.cat([self.feature_var, torch.zeros(
            count, self.feature_dim, device=device)])
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the solved LDA (after any change)."""
        self._lda = None

    @torch.no_grad()
    def add(self, class_ids: torch.Tensor, queries: torch.Tensor,
            features: Optional[torch.Tensor] = None) -> None:
        """Merge labelled samples into the statistics (Chan et al.'s pairwise update).

        ``features`` (the prompted block inputs) update the replay statistics too.
        """
        queries = queries.to(self.query_mean.dtype)
        for c in torch.unique(class_ids).tolist():
            pick = class_ids == c
            q = queries[pick]
            n_new, n_old = q.shape[0], int(self.class_count[c])
            n = n_old + n_new
            mean_new = q.mean(0)
            centred = q - mean_new
            scatter = centred.T @ centred
            if features is not None:
                self._merge_features(c, features[pick].to(self.feature_mean.dtype), n_old)
            if n_old:
                delta = (mean_new - self.query_mean[c])[:, None]
                scatter = scatter + (n_old * n_new / n) * (delta @ delta.T)
                mean_new = self.query_mean[c] + (mean_new - self.query_mean[c]) * (n_new / n)
            self.query_scatter += scatter
            self.query_mean[c] = mean_new
            self.class_count[c] = n
        self.invalidate()

    @torch.no_grad()
    def merge(self, class_ids: Sequence[int], counts: Sequence[int], means: torch.Tensor,
              scatter: torch.Tensor, novelty: Tuple[float, float, int] = (0.0, 0.0, 0),
              sign: int = 1) -> None:
        """Merge (``sign=1``) or take back out (``sign=-1``) statistics computed elsewhere:
        per class a count and a mean, and the scatter of those samples about their class
        means (D x D, summed over the classes), as another robot's :meth:`add` made them.

        Exact both ways (Chan et al.'s pairwise update and its inverse), so merging and then
        removing a contribution restores the statistics up to rounding. Removing more
        samples than a class has is an error.

        Raises:
            ValueError: shapes that do not fit, or a removal larger than a class.
        """
        if means.shape != (len(class_ids), self.query_dim) or \
                scatter.shape != (self.query_dim, self.query_dim):
            raise ValueError('statistics of another feature size')
        dtype = torch.float64
        total = scatter.to(self.query_scatter.device, dtype)
        for c, n_part, mean_part in zip(class_ids, counts, means.to(dtype)):
            n_part, n_here = int(n_part), int(self.class_count[c])
            mean_here = self.query_mean[c].to(dtype)
            mean_part = mean_part.to(mean_here.device)
            if sign > 0:
                n = n_here + n_part
                delta = mean_part - mean_here
                if n_here:
                    total = total + (n_here * n_part / n) * torch.outer(delta, delta)
                mean = mean_here + delta * (n_part / n)
            else:
                n = n_here - n_part
                if n < 0:
                    raise ValueError(f'class {c} has {n_here} samples, not {n_part}')
                mean = (n_here * mean_here - n_part * mean_part) / n if n else \
                    torch.zeros_like(mean_here)
                if n:
                    delta = mean_part - mean
                    total = total + (n * n_part / n_here) * torch.outer(delta, delta)
            self.query_mean[c] = mean.to(self.query_mean.dtype)
            self.class_count[c] = n
        self.query_scatter += float(sign) * total.to(self.query_scatter.dtype)
        s, sq, k = novelty
        self.novelty_sum += sign * float(s)
        self.novelty_sum_sq += sign * float(sq)
        self.novelty_count += sign * int(k)
        self.invalidate()

    def _merge_features(self, c: int, f: torch.Tensor, n_old: int) -> None:
        n_new = f.shape[0]
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

    # ------------------------------------------------------------------ LDA
    @torch.no_grad()
    def lda(self, active: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """The shrinkage LDA over all classes (solved once per change, cached): weights ``w``
        (C, D) = mean Sigma^-1, biases ``b`` (C,), the lower Cholesky factor ``chol`` of the
        shrunk covariance Sigma, and of the background Gaussian (``background_mean``,
        ``background_chol``); ``seen`` marks the classes that may be predicted (``active``
        and with samples). None before any sample of an active class.

        Quadratic forms ``r^T Sigma^-1 r`` are triangular solves with ``chol``
        (:func:`quadratic_form`): they read half the matrix a product with the precision
        matrix reads, and at a robot's batch sizes that memory traffic is their whole cost."""
        seen = (self.class_count > 0) & active
        if not self.num_classes or not bool(seen.any()):
            return None
        if self._lda is not None:
            return dict(self._lda, seen=seen)
        d = self.query_dim
        n, c = int(self.class_count.sum()), int((self.class_count > 0).sum())
        cov = self.query_scatter.double() / max(n - c, 1)
        trace = float(torch.diagonal(cov).sum()) / d
        alpha = self.shrinkage if n - c > 0 else 1.0
        chol = _spd_cholesky(_shrink_(cov, alpha, trace))
        del cov
        mean = self.query_mean.double()
        weight = torch.cholesky_solve(mean.T, chol).T  # (C, D) = mean Sigma^-1
        # The background Gaussian of relative Mahalanobis: every taught sample as one class,
        # its scatter = within-class + between-class scatter (exact from the statistics).
        counts = self.class_count.double()
        overall = (counts[:, None] * mean).sum(0) / max(float(counts.sum()), 1.0)
        spread = (mean - overall) * counts[:, None].sqrt()
        total = (self.query_scatter.double() + spread.T @ spread) / max(n - 1, 1)
        total = _shrink_(total, alpha, float(torch.diagonal(total).sum()) / d)
        dtype = self.query_mean.dtype
        self._lda = {'w': weight.to(dtype), 'b': (-0.5 * (weight * mean).sum(1)).to(dtype),
                     'chol': chol.to(dtype), 'background_mean': overall.to(dtype),
                     'background_chol': _spd_cholesky(total).to(dtype)}
        return dict(self._lda, seen=seen)

    @torch.no_grad()
    def distances(self, queries: torch.Tensor, active: torch.Tensor
                  ) -> Optional[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        """Squared Mahalanobis distances (B, C) of queries to every class mean (+inf for
        classes that cannot be predicted), and the LDA they come from; None before any
        sample. One quadratic form per query, shared by every class."""
        lda = self.lda(active)
        if lda is None:
            return None
        q = queries.to(lda['w'].dtype)
        quad = quadratic_form(lda['chol'], q)[:, None]
        dist = quad - 2.0 * (q @ lda['w'].T + lda['b'])
        return dist.masked_fill(~lda['seen'], float('inf')), lda

    @torch.no_grad()
    def log_posterior(self, queries: torch.Tensor, active: torch.Tensor,
                      dist: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """log p(class | query) under the LDA with equal priors and each class's predictive
        spread; -inf for classes that cannot be predicted. None before any sample.
        ``dist``: :meth:`distances` of the same queries, when already computed."""
        if dist is None:
            found = self.distances(queries, active)
            if found is None:
                return None
            dist = found[0]
        # A new sample lies (1 + 1/n) times farther from an estimated class mean than from
        # the true one; dividing by it keeps a class taught with many views from drawing
        # the frames of classes taught with few (what refining one class would otherwise do).
        # The full predictive density also subtracts D/2 log(1 + 1/n): measured with class
        # counts 10:1 (README, "Predictive spread"), that term over-penalises the rare
        # classes by several points of accuracy, so 'scaled' (without it) is the default.
        spread = 1.0 + 1.0 / self.class_count.clamp_min(1).to(dist.dtype)
        if self.spread == 'none':
            scores = -0.5 * dist
        else:
            scores = -0.5 * dist / spread
            if self.spread == 'full':
                scores = scores - 0.5 * self.query_dim * torch.log(spread)
        return torch.log_softmax(scores.float(), dim=1)

    @torch.no_grad()
    def novelty(self, queries: torch.Tensor, active: torch.Tensor,
                dist: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Relative Mahalanobis novelty, standardised by what held-out taught samples score
        (0: typical for a taught class; each unit one standard deviation further).
        ``dist``: :meth:`distances` of the same queries, when already computed."""
        raw = self.raw_novelty(queries, active, dist)
        count = int(self.novelty_count)
        if count < 2:
            return raw
        mean = float(self.novelty_sum) / count
        var = max(float(self.novelty_sum_sq) / count - mean * mean, 1e-12)
        return (raw - mean) / var ** 0.5

    @torch.no_grad()
    def leave_one_out_novelty(self, class_ids: torch.Tensor, queries: torch.Tensor,
                              active: torch.Tensor) -> torch.Tensor:
        """Raw novelty of taught samples as if each had not been taught (call after
        :meth:`add`). NaN for a class with a single sample."""
        found = self.distances(queries, active)
        if found is None:
            return torch.full((len(class_ids),), float('nan'), device=queries.device)
        dist, lda = found
        dtype = lda['chol'].dtype
        q = queries.to(dtype)
        n_total = float(self.class_count.sum())
        n_classes = float((self.class_count > 0).sum())
        alpha = self.shrinkage
        n_c = self.class_count[class_ids].to(dtype)
        # Own class: the mean without the sample moves away by n/(n-1), and the shared
        # covariance loses the sample's scatter n/(n-1) r r^T (Sherman-Morrison).
        own = quadratic_form(lda['chol'], q - self.query_mean[class_ids].to(dtype))
        factor = n_c / (n_c - 1).clamp_min(1.0)
        beta = (1.0 - alpha) * factor / max(n_total - n_classes, 1.0)
        own = factor ** 2 * own / (1.0 - beta * own).clamp_min(1e-3)
        dist = dist.scatter(1, class_ids[:, None], float('inf'))
        nearest = torch.minimum(own, dist.min(1).values)
        background = quadratic_form(lda['background_chol'], q - lda['background_mean'])
        f0 = n_total / max(n_total - 1.0, 1.0)
        beta0 = (1.0 - alpha) * f0 / max(n_total - 1.0, 1.0)
        background = f0 ** 2 * background / (1.0 - beta0 * background).clamp_min(1e-3)
        raw = (nearest - background).float() / self.query_dim
        return raw.masked_fill(n_c.float() < 2, float('nan'))

    @torch.no_grad()
    def calibrate_novelty(self, raw: torch.Tensor) -> None:
        """Fold taught samples' leave-one-out raw novelty into the zero and unit of
        :meth:`novelty`."""
        raw = raw[torch.isfinite(raw)].double()
        self.novelty_sum += raw.sum()
        self.novelty_sum_sq += (raw * raw).sum()
        self.novelty_count += raw.numel()

    @torch.no_grad()
    def mahalanobis(self, queries: torch.Tensor, active: torch.Tensor,
                    dist: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Plain squared Mahalanobis distance to the nearest predictable class mean, per query
        dimension (the textbook novelty score; :meth:`novelty` improves on it)."""
        if dist is None:
            found = self.distances(queries, active)
            if found is None:
                return torch.zeros(queries.shape[0], device=queries.device)
            dist = found[0]
        return dist.min(1).values.float() / self.query_dim

    @torch.no_grad()
    def raw_novelty(self, queries: torch.Tensor, active: torch.Tensor,
                    dist: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Relative Mahalanobis distance, per query dimension: the squared distance to the
        nearest predictable class mean minus that to the background Gaussian."""
        lda = self.lda(active)
        if lda is None:
            return torch.zeros(queries.shape[0], device=queries.device)
        nearest = self.mahalanobis(queries, active, dist) * self.query_dim
        q = queries.to(lda['chol'].dtype)
        background = quadratic_form(lda['background_chol'], q - lda['background_mean'])
        return (nearest - background).float() / self.query_dim

    # --------------------------------------------------------------- replay
    def sample_replay(self, classes: torch.Tensor, count: int, generator: torch.Generator
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-features of ``classes`` drawn from their diagonal Gaussians."""
        pick = torch.randint(len(classes), (count,), generator=generator)
        cls = classes[pick.to(classes.device)]
        noise = torch.randn(count, self.feature_dim, generator=generator).to(
            self.feature_mean.device)
        return self.feature_mean[cls] + noise * self.feature_var[cls].sqrt(), cls


def _shrink_(cov: torch.Tensor, alpha: float, mean_variance: float) -> torch.Tensor:
    """``(1 - alpha) * cov + alpha * mean_variance * I`` in place (no identity matrix made:
    these are 1,984 x 1,984 float64 matrices)."""
    cov.mul_(1.0 - alpha)
    cov.diagonal().add_(alpha * max(mean_variance, 1e-6))
    return cov


def _spd_cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive definite matrix. A vanishing jitter keeps
    an unshrunk, rank-deficient covariance (fewer samples than dimensions) factorable;
    ``matrix`` is changed in place by that jitter."""
    scale = float(torch.diagonal(matrix).mean().clamp_min(1e-12))
    matrix.diagonal().add_(1e-9 * scale)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        matrix.diagonal().add_(1e-6 * scale)
        factor = torch.linalg.cholesky(matrix)
    return factor


def quadratic_form(chol: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``r_i^T (L L^T)^-1 r_i`` for each row of ``r`` (B, D), with ``L`` = ``chol`` lower
    triangular: the squared norm of ``L^-1 r_i``."""
    return torch.linalg.solve_triangular(chol, r.T, upper=False).square().sum(0)
