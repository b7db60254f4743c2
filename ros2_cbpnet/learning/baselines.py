"""Frozen-feature baselines for the offline evaluation (no ROS, no prompts, no CBP block).

Every baseline sees a frozen query of images preprocessed like the learner's (resize to
``image_size``, normalise with the backbone's mean/std): by default the backbone's pre-logits
feature (``query_layers=None``), or, with ``query_layers``, the same multi-layer query as
CBPNet's statistics (pooled outputs of those layers). They have the learner's
``learn_task``/``evaluate``/``predict`` shape, so the evaluation loop drives every method
alike, and they share an already loaded backbone instead of loading their own.

- :class:`LinearProbe` (``linear``): a linear head over all classes seen so far, trained task
  by task with class-masked cross-entropy (only the current task's logits), Adam with a
  constant learning rate, gradient-norm clipping, optimiser re-created each task. This is
  DualPrompt's head without any prompt or feature adaptation, so old classes are never
  revisited: expect poor calibration between tasks (the classic class-incremental failure).
- :class:`NearestClassMean` (``ncm``): one mean frozen feature per class; a sample gets the
  class whose mean is nearest. Default metric ``'cosine'`` (cosine similarity between the
  feature and the class mean of the raw features, as CBPNet's ``class_mean`` selection uses);
  ``'euclidean'`` is available. Nothing is trained by gradient and old means never change,
  so it cannot forget, but it cannot adapt the features either.
- :class:`StreamingLDA` (``lda``): class means and one shared within-class covariance,
  shrunk towards a scaled identity, updated exactly after every task (Hayes & Kanan,
  "Lifelong machine learning with deep streaming linear discriminant analysis", CVPR-W 2020).
  It uses the very statistics code of CBPNet (:class:`~ros2_cbpnet.learning.model.statistics.
  ClassStatistics`), so it is CBPNet's ``prediction='stats'`` without prompts.
- :class:`RandomProjectionRidge` (``ranpac``): RanPAC's second phase (McDonnell et al.,
  NeurIPS 2023): a fixed random projection of the query to ``projection_dim`` dimensions
  with ReLU, the Gram matrix and class sums accumulated over all tasks, and a ridge
  classifier solved from them. ``ridge`` is relative to the mean diagonal of the Gram matrix,
  so one value fits any feature scale. Without RanPAC's first-session fine-tuning of the
  backbone (its phase 1), which a frozen robot backbone does not do.

Example:
    >>> from ros2_cbpnet.learning.model.backbones import load_backbone  # doctest: +SKIP
    >>> backbone = load_backbone('tf_efficientnet_lite0')  # doctest: +SKIP
    >>> ncm = NearestClassMean(backbone, image_size=64)  # doctest: +SKIP
    >>> ncm.learn_task(images, ['cup', 'cup', 'shoe'])  # doctest: +SKIP
    >>> ncm.evaluate(test_images, test_labels)  # doctest: +SKIP
    0.97
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import resolve_device
from .image_resize import resize_batch
from .metrics import prediction_accuracy
from .model.backbones import Backbone
from .model.statistics import ClassStatistics
from .types import Prediction, Progress, TaskResult

__all__ = [
    'BASELINES', 'FrozenFeatureBaseline', 'LinearProbe', 'NCM_METRICS', 'NearestClassMean',
    'RandomProjectionRidge', 'StreamingLDA', 'backbone_params_without_classifier',
]

NCM_METRICS = ('cosine', 'euclidean')


def backbone_params_without_classifier(backbone: Backbone) -> int:
    """Parameters of the frozen feature extractor, without timm's unused ImageNet classifier.

    Only pre-logits features are used, so the classifier (``model.get_classifier()``; 1.28 M
    of tf_efficientnet_lite0's 4.65 M) is not part of what a robot runs.
    """
    model = getattr(backbone, 'model', backbone)
    seen = {id(p) for p in model.parameters()}
    total = sum(p.numel() for p in model.parameters())
    get_classifier = getattr(model, 'get_classifier', None)
    classifier = get_classifier() if callable(get_classifier) else None
    if isinstance(classifier, nn.Module):
        total -= sum(p.numel() for p in classifier.parameters() if id(p) in seen)
    return int(total)


class FrozenFeatureBaseline:
    """Common part of the baselines: class registry, preprocessing, frozen features.

    Args:
        backbone: a loaded frozen backbone (shared, moved to ``device``, never modified).
        image_size: square input side; 0 = the backbone's default.
        device: ``'auto'``, ``'cpu'`` or ``'cuda[:N]'``.
        seed: seeds head initialisation and batch order (per task).
        feature_batch_size: images per frozen forward pass.
        query_layers: layers whose pooled outputs form the query; None = pre-logits.
    """

    method = 'frozen'

    def __init__(self, backbone: Backbone, *, image_size: int = 0, device: str = 'auto',
                 seed: int = 0, feature_batch_size: int = 64,
                 query_layers: Optional[Sequence[int]] = None) -> None:
        self.backbone = backbone
        self.query_layers = None if query_layers is None else sorted(set(query_layers))
        self.feature_dim = backbone.feature_dim if query_layers is None \
            else backbone.query_dim(self.query_layers)
        self.device = resolve_device(device)
        self.backbone.to(self.device)
        self.image_size = int(image_size or backbone.input_size)
        self.seed = int(seed)
        self.feature_batch_size = int(feature_batch_size)
        mean = torch.tensor(backbone.mean, dtype=torch.float32, device=self.device)
        std = torch.tensor(backbone.std, dtype=torch.float32, device=self.device)
        self._norm_scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self._norm_offset = (-mean / std).view(1, 3, 1, 1)
        self.classes: List[str] = []
        self.tasks: List[List[str]] = []

    # ------------------------------------------------------------- features
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB (H, W, 3) or grey (H, W) images -> normalised batch, as the learner does.

        Raises:
            ValueError: an image is not a non-empty uint8 array of 1 or 3 channels.
        """
        # The learner's own resizing, so all methods see the same pixels.
        batch = resize_batch(images, self.image_size)
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        return x * self._norm_scale + self._norm_offset

    @torch.inference_mode()
    def features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Frozen query feature of each uint8 image, shape (N, feature_dim)."""
        chunks = [self.backbone.query(self.preprocess(images[s:s + self.feature_batch_size]),
                                      self.query_layers).float()
                  for s in range(0, len(images), self.feature_batch_size)]
        if not chunks:
            return torch.zeros(0, self.feature_dim, device=self.device)
        return torch.cat(chunks)

    # ------------------------------------------------------------- interface
    def _register(self, labels: Sequence[str]) -> List[str]:
        if len(labels) < 2:
            raise ValueError('a task needs at least 2 labelled images')
        new = sorted(set(str(label) for label in labels))
        owned = [c for c in new if c in self.classes]
        if owned:
            raise ValueError(f'classes {owned} were learned in an earlier task')
        return new

    def learn_task(self, images: Sequence[np.ndarray], labels: Sequence[str], *,
                   progress: Optional[Callable[[Progress], None]] = None) -> TaskResult:
        """Learn one new task whose classes are the labels given (closed form: the frozen
        features of the task are folded into the model by :meth:`_fit`)."""
        started = time.monotonic()
        labels = [str(label) for label in labels]
        new = self._register(labels)
        feats = self.features(images)
        self._fit(new, labels, feats)
        return self._finish_task(new, labels, feats, started, progress)

    def _fit(self, new: List[str], labels: List[str], feats: torch.Tensor) -> None:
        """Fold a task's features into the model (the new classes come after the old)."""
        raise NotImplementedError

    def _new_class_ids(self, new: List[str], labels: List[str]) -> torch.Tensor:
        """Head indices of ``labels`` once ``new`` is appended to the known classes."""
        index = {c: len(self.classes) + i for i, c in enumerate(new)}
        return torch.tensor([index[c] for c in labels], device=self.device)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Score of each class for each feature row, shape (N, num_classes); higher wins."""
        raise NotImplementedError

    def predict(self, images: Sequence[np.ndarray], top_k: Optional[int] = None
                ) -> List[Prediction]:
        """Classify images over all classes seen so far (``score`` is a softmax).

        Raises:
            RuntimeError: no task has been learned yet.
        """
        if not len(images):
            return []
        if not self.tasks:
            raise RuntimeError('no task has been learned yet')
        probs = torch.softmax(self.scores(self.features(images)), dim=1)
        k = min(top_k or 5, probs.shape[1])
        values, idx = probs.topk(k, dim=1)
        owner = {c: t for t, names in enumerate(self.tasks) for c in names}
        out = []
        for v_row, i_row in zip(values.cpu().tolist(), idx.cpu().tolist()):
            topk = [(self.classes[i], float(v)) for i, v in zip(i_row, v_row)]
            out.append(Prediction(topk[0][0], topk[0][1], owner[topk[0][0]], topk))
        return out

    def evaluate(self, images: Sequence[np.ndarray], labels: Sequence[str],
                 batch_size: int = 64) -> float:
        """Accuracy over all classes seen so far (labels as class names)."""
        return prediction_accuracy(self.predict, images, labels, batch_size)

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters trained for one task and the frozen backbone's (without classifier)."""
        return {'trainable_params': 0,
                'backbone_params': backbone_params_without_classifier(self.backbone)}

    def config_dict(self) -> Dict[str, object]:
        """The settings of this baseline, for result files."""
        return {'method': self.method, 'backbone': self.backbone.name,
                'image_size': self.image_size, 'device': str(self.device), 'seed': self.seed,
                'query_layers': self.query_layers}

    def _finish_task(self, new: List[str], labels: Sequence[str], feats: torch.Tensor,
                     started: float, progress: Optional[Callable[[Progress], None]]
                     ) -> TaskResult:
        """Register a task learned in closed form and report its training accuracy."""
        task_id = len(self.tasks)
        self.classes += new
        self.tasks.append(new)
        y = torch.tensor([self.classes.index(c) for c in labels], device=self.device)
        train_acc = float((self.scores(feats).argmax(1) == y).float().mean())
        if progress is not None:
            progress(Progress(task_id, 1, 1, 1, 1, 0.0, train_acc, 0))
        return TaskResult(task_id, new, len(labels), 0, train_acc,
                          time.monotonic() - started, 0, task_id + 1, new_classes=new)


class NearestClassMean(FrozenFeatureBaseline):
    """Nearest class mean of frozen query features (``metric`` cosine or euclidean)."""

    method = 'ncm'

    def __init__(self, backbone: Backbone, *, metric: str = 'cosine', **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        if metric not in NCM_METRICS:
            raise ValueError(f'metric must be one of {NCM_METRICS}, not {metric!r}')
        self.metric = metric
        self.class_means = torch.zeros(0, self.feature_dim, device=self.device)

    def _fit(self, new: List[str], labels: List[str], feats: torch.Tensor) -> None:
        """Store the mean frozen feature of each new class."""
        label_arr = np.asarray(labels)
        means = torch.stack([feats[torch.from_numpy(label_arr == c).to(self.device)].mean(0)
                             for c in new])
        self.class_means = torch.cat([self.class_means, means])

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to each class mean, or minus the squared Euclidean distance."""
        if self.metric == 'cosine':
            return F.normalize(feats, dim=1) @ F.normalize(self.class_means, dim=1).T
        return -torch.cdist(feats, self.class_means).pow(2)

    def config_dict(self) -> Dict[str, object]:
        """Settings, plus the distance metric."""
        return {**super().config_dict(), 'metric': self.metric}


class LinearProbe(FrozenFeatureBaseline):
    """Linear head on frozen query features, trained task by task (class-masked CE).

    Args:
        backbone: shared frozen backbone.
        epochs, batch_size, learning_rate: Adam training of each task (constant rate).
        grad_clip_norm: gradient-norm clip, as in the learner.
        **kwargs: see :class:`FrozenFeatureBaseline`.
    """

    method = 'linear'

    def __init__(self, backbone: Backbone, *, epochs: int = 5, batch_size: int = 16,
                 learning_rate: float = 0.01, grad_clip_norm: float = 1.0, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        if epochs < 1 or batch_size < 1 or not learning_rate > 0:
            raise ValueError('epochs and batch_size must be >= 1 and learning_rate > 0')
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.learning_rate, self.grad_clip_norm = float(learning_rate), float(grad_clip_norm)
        self.head_weight = torch.zeros(0, self.feature_dim, device=self.device)
        self.head_bias = torch.zeros(0, device=self.device)

    def learn_task(self, images: Sequence[np.ndarray], labels: Sequence[str], *,
                   progress: Optional[Callable[[Progress], None]] = None) -> TaskResult:
        """Grow the head by the new classes and train only their logits (masked CE)."""
        started = time.monotonic()
        labels = [str(label) for label in labels]
        new = self._register(labels)
        task_id = len(self.tasks)
        feats = self.features(images)
        index = {c: i for i, c in enumerate(new)}
        y = torch.tensor([index[c] for c in labels], device=self.device)
        torch.manual_seed(self.seed + task_id)
        d = self.feature_dim
        # Same head initialisation as CBPNet's (normal std 0.01, zero bias).
        weight = nn.Parameter(torch.randn(len(new), d, device=self.device) * 0.01)
        bias = nn.Parameter(torch.zeros(len(new), device=self.device))
        # The old rows get no gradient under the class mask, so only the new rows are trained.
        optimizer = torch.optim.Adam([weight, bias], lr=self.learning_rate)
        n = len(labels)
        steps = math.ceil(n / self.batch_size) * self.epochs
        generator = torch.Generator().manual_seed(self.seed + 1000 * task_id)
        step, correct, seen = 0, 0, 0
        for epoch in range(self.epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            correct, seen = 0, 0
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                logits = feats[idx] @ weight.T + bias
                loss = F.cross_entropy(logits, y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([weight, bias], self.grad_clip_norm)
                optimizer.step()
                step += 1
                correct += int((logits.argmax(1) == y[idx]).sum())
                seen += len(idx)
                if progress is not None:
                    progress(Progress(task_id, epoch + 1, self.epochs, step, steps,
                                      float(loss.detach()), correct / seen, 0))
        self.head_weight = torch.cat([self.head_weight, weight.detach()])
        self.head_bias = torch.cat([self.head_bias, bias.detach()])
        self.classes += new
        self.tasks.append(new)
        return TaskResult(task_id, new, n, self.epochs, correct / max(seen, 1),
                          time.monotonic() - started, 0, task_id + 1)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Head logits over all classes seen so far."""
        return feats @ self.head_weight.T + self.head_bias

    def parameter_counts(self) -> Dict[str, int]:
        """The head at its current size (as the learner counts its head)."""
        counts = super().parameter_counts()
        counts['trainable_params'] = int(self.head_weight.numel() + self.head_bias.numel())
        return counts

    def config_dict(self) -> Dict[str, object]:
        """Settings, plus the optimiser's."""
        return {**super().config_dict(), 'epochs': self.epochs, 'batch_size': self.batch_size,
                'learning_rate': self.learning_rate, 'grad_clip_norm': self.grad_clip_norm}


class StreamingLDA(FrozenFeatureBaseline):
    """Shrinkage LDA on frozen features, updated exactly task by task (no training).

    Args:
        backbone: shared frozen backbone.
        shrinkage: weight of the isotropic part of the covariance, in [0, 1].
        **kwargs: see :class:`FrozenFeatureBaseline`.
    """

    method = 'lda'

    def __init__(self, backbone: Backbone, *, shrinkage: float = 0.1, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.shrinkage = float(shrinkage)
        self.stats = ClassStatistics(self.feature_dim, 1, self.shrinkage).to(self.device)

    def _fit(self, new: List[str], labels: List[str], feats: torch.Tensor) -> None:
        """Merge the new classes into the class statistics."""
        y = self._new_class_ids(new, labels)
        self.stats.grow(len(new))
        self.stats.add(y, feats)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """log p(class | query) under the shrinkage LDA."""
        active = torch.ones(self.stats.num_classes, dtype=torch.bool, device=self.device)
        return self.stats.log_posterior(feats, active)

    def novelty(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Plain Mahalanobis novelty of each image: the squared distance to the nearest
        class mean under the shared covariance (the obvious open-world baseline)."""
        active = torch.ones(self.stats.num_classes, dtype=torch.bool, device=self.device)
        return self.stats.mahalanobis(self.features(images), active)

    def config_dict(self) -> Dict[str, object]:
        """Settings, plus the shrinkage."""
        return {**super().config_dict(), 'shrinkage': self.shrinkage}


class RandomProjectionRidge(FrozenFeatureBaseline):
    """RanPAC-style random ReLU projection and a ridge classifier from accumulated sums.

    Args:
        backbone: shared frozen backbone.
        projection_dim: size of the random projection (RanPAC uses 10,000 for ViT-B/16).
        ridge: ridge coefficient relative to the mean diagonal of the Gram matrix.
        **kwargs: see :class:`FrozenFeatureBaseline`.
    """

    method = 'ranpac'

    def __init__(self, backbone: Backbone, *, projection_dim: int = 5000, ridge: float = 0.1,
                 **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        if projection_dim < 1 or not ridge > 0:
            raise ValueError('projection_dim must be >= 1 and ridge > 0')
        self.projection_dim, self.ridge = int(projection_dim), float(ridge)
        generator = torch.Generator().manual_seed(self.seed)
        self.projection = torch.randn(self.feature_dim, projection_dim, generator=generator,
                                      dtype=torch.float64).to(self.device)
        self.gram = torch.zeros(projection_dim, projection_dim, dtype=torch.float64,
                                device=self.device)
        self.class_sums = torch.zeros(projection_dim, 0, dtype=torch.float64, device=self.device)
        self.weight = torch.zeros(projection_dim, 0, dtype=torch.float64, device=self.device)

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.relu(feats.double() @ self.projection)

    def _fit(self, new: List[str], labels: List[str], feats: torch.Tensor) -> None:
        """Accumulate the Gram matrix and class sums, then solve the ridge classifier."""
        h = self._project(feats)
        y = self._new_class_ids(new, labels)
        self.gram += h.T @ h
        self.class_sums = torch.cat([self.class_sums, torch.zeros(
            self.projection_dim, len(new), dtype=torch.float64, device=self.device)], dim=1)
        self.class_sums.index_add_(1, y, h.T)
        lam = self.ridge * float(torch.diagonal(self.gram).mean())
        eye = torch.eye(self.projection_dim, dtype=torch.float64, device=self.device)
        self.weight = torch.linalg.solve(self.gram + lam * eye, self.class_sums)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Ridge outputs over all classes seen so far."""
        return (self._project(feats) @ self.weight).float()

    def config_dict(self) -> Dict[str, object]:
        """Settings, plus projection size and ridge."""
        return {**super().config_dict(), 'projection_dim': self.projection_dim,
                'ridge': self.ridge}


#: Method name -> baseline class.
BASELINES = {'linear': LinearProbe, 'ncm': NearestClassMean, 'lda': StreamingLDA,
             'ranpac': RandomProjectionRidge}
