"""The protocols ``cbpnet-eval`` runs: class-incremental (with open-world scoring) and
the robot-lifetime plasticity stream (no ROS).

- :func:`run_incremental`: tasks of consecutive classes, learned one after the other; after
  task ``i`` every task ``j <= i`` is tested over all classes seen so far (no task id),
  giving ``acc_matrix[i][j]``. ``joint`` instead learns, after each task, a fresh model on all
  classes seen so far at once. With ``unknown`` classes held out of training, the result also
  scores the novelty of taught against held-out test frames.
- :func:`run_lifetime`: a long stream of small tasks built as Dohare et al. (Nature 2024)
  build Continual ImageNet: every task is a pair of classes drawn at random, under labels
  new to the learner, learned and immediately tested among its own two classes (learning
  accuracy); the CBP block's dormant fraction and the effective rank of its hidden units
  are recorded after every task.
- :func:`validation_split`: carves a validation set out of the training images and drops
  the test images, so a sweep can never see them.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ..learning.baselines import StreamingLDA
from ..learning.datasets import ImageDataset, task_subset
from ..learning.learner import ContinualLearner, LearnerConfig, Progress
from ..learning.metrics import effective_rank, summarize
from ..learning.model.backbones import Backbone
from .eval_methods import Model, make_model, model_config

__all__ = ['auroc', 'last_tasks_summary', 'run_incremental', 'run_lifetime', 'score',
           'thin_classes', 'validation_split']


def validation_split(data: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """A copy of ``data`` whose test set is a stratified ``fraction`` of its training images.

    The original test images are dropped, so nothing evaluated on the result can see them.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError('the validation fraction must be in (0, 1)')
    rng = np.random.default_rng([seed, 7])
    val = np.zeros(len(data.train_labels), dtype=bool)
    for c in np.unique(data.train_labels):
        idx = np.flatnonzero(data.train_labels == c)
        rng.shuffle(idx)
        val[idx[:max(1, int(round(fraction * len(idx))))]] = True
    return ImageDataset(f'{data.name}[validation]', list(data.classes),
                        data.train_images[~val], data.train_labels[~val],
                        data.train_images[val], data.train_labels[val])


def thin_classes(data: ImageDataset, ratio: int, seed: int) -> ImageDataset:
    """A copy of ``data`` whose odd-numbered classes keep a random ``1/ratio`` of their
    training images (at least 2), so taught classes differ ``ratio``-fold in count; test
    images are untouched."""
    rng = np.random.default_rng([seed, 17])
    keep = np.ones(len(data.train_labels), dtype=bool)
    for c in np.unique(data.train_labels):
        if c % 2:
            idx = rng.permutation(np.flatnonzero(data.train_labels == c))
            keep[idx[max(2, len(idx) // ratio):]] = False
    return ImageDataset(data.name, list(data.classes), data.train_images[keep],
                        data.train_labels[keep], data.test_images, data.test_labels)


def auroc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """Area under the ROC curve of a score that should be higher for ``positives``
    (the Mann-Whitney statistic; ties count one half)."""
    neg, pos = np.asarray(negatives, float), np.asarray(positives, float)
    if not len(neg) or not len(pos):
        return float('nan')
    order = np.argsort(np.concatenate([neg, pos]), kind='mergesort')
    values = np.concatenate([neg, pos])[order]
    ranks = np.empty(len(values))
    i = 0
    while i < len(values):  # average ranks of ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    pos_ranks = ranks[np.argsort(order)][len(neg):]
    return float((pos_ranks.sum() - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def _bar(total: int, desc: str, enabled: bool) -> Optional[tqdm]:
    return tqdm(total=total, desc=desc, unit='step', leave=False, dynamic_ncols=True) \
        if enabled else None


def _reporter(bar: Optional[tqdm], tasks: int) -> Callable[[Progress], None]:
    def report(p: Progress) -> None:
        if bar is not None and p.stage == 'training':
            bar.update(1)
            bar.set_postfix(task=f'{p.task_id + 1}/{tasks}', loss=f'{p.loss:.3f}',
                            acc=f'{p.accuracy:.2f}', refresh=False)
    return report


def _base_result(method: str, model: Model, backbone: Backbone, config: LearnerConfig,
                 dataset: str, split: str) -> Dict[str, Any]:
    counts = model.parameter_counts()
    return {'method': method, 'dataset': dataset, 'split': split, 'backbone': backbone.name,
            'trainable_params': int(counts['trainable_params']),
            'backbone_params': int(counts['backbone_params']), 'seed': int(config.seed),
            'config': model_config(model),
            'image_size': int(config.image_size or backbone.input_size)}


def run_incremental(method: str, data: ImageDataset, tasks: Sequence[Sequence[int]],
                    config: LearnerConfig, backbone: Backbone, *, dataset: str,
                    split: str = 'test', unknown: Sequence[int] = (), args: Any = None,
                    progress: bool = True) -> Dict[str, Any]:
    """Learn ``tasks`` one by one with ``method`` and test after each; the result dict.

    Args:
        method: one of :data:`~ros2_cbpnet.tools.eval_methods.METHODS`.
        data: the loaded data set (split and subsample already seeded).
        tasks: class ids per task.
        config: the run's learner configuration (baselines take what applies).
        backbone: the shared frozen backbone.
        dataset: the data set spec, recorded in the result.
        split: ``'test'`` or ``'validation'`` (what ``data``'s test images are).
        unknown: class ids held out of training; their test frames are scored for novelty.
        args: parsed ``cbpnet-eval`` options for the baselines' own settings.
        progress: draw a progress bar on stderr.

    Raises:
        LearningError: the learner refused or rolled back a task.
    """
    names = data.classes
    train = [task_subset(data.train_images, data.train_labels, t) for t in tasks]
    test = [task_subset(data.test_images, data.test_labels, t) for t in tasks]
    bar = _bar(0, f'{method} seed {config.seed}', progress)
    report = _reporter(bar, len(tasks))
    acc: List[List[float]] = []
    selection: List[List[float]] = []
    replaced: List[int] = []
    keys: List[Optional[List[float]]] = []
    train_seconds = 0.0
    model: Model = make_model(method, config, backbone, args=args)
    try:
        for i, (x, y) in enumerate(train):
            started = time.perf_counter()
            if method == 'joint':
                # Not continual: a fresh model learns every class seen so far as one task.
                model = make_model(method, config, backbone, args=args)
                x = np.concatenate([t[0] for t in train[:i + 1]])
                y = np.concatenate([t[1] for t in train[:i + 1]])
            result = model.learn_task(list(x), [names[k] for k in y], progress=report)
            train_seconds += time.perf_counter() - started
            replaced.append(int(result.replaced_units))
            keys.append(None if result.key_query_cosine is None else
                        [result.key_query_cosine, result.key_query_cosine_max])
            scored = [score(model, list(xt), [names[k] for k in yt], j)
                      for j, (xt, yt) in enumerate(test[:i + 1])]
            acc.append([a for a, _ in scored])
            selection.append([s for _, s in scored])
    finally:
        if bar is not None:
            bar.close()
    sizes = [len(t) for t in tasks]
    res = _base_result(method, model, backbone, config, dataset, split)
    res.update({
        'protocol': 'incremental', 'tasks': len(tasks),
        'classes_per_task': sizes[0] if len(set(sizes)) == 1 else sizes,
        'acc_matrix': acc, **summarize(acc), 'train_seconds': round(train_seconds, 3),
        'replaced_units': int(sum(replaced)), 'replaced_units_per_task': replaced,
        'task_learning_accuracy': [row[i] for i, row in enumerate(acc)],
        # Fraction of each task's test frames whose selected task (E-prompt, or the task of
        # the predicted class where no prompt is selected) is their own, after the last task.
        # (joint learns everything as one task: nothing to select).
        **({} if method == 'joint' else {
            'task_selection_accuracy': selection[-1], 'task_selection_matrix': selection,
            'mean_task_selection_accuracy': float(np.mean(selection[-1]))}),
        'task_classes': [[names[k] for k in t] for t in tasks],
        'train_samples_per_task': [int(len(y)) for _, y in train],
        'test_samples_per_task': [int(len(y)) for _, y in test],
    })
    if isinstance(model, ContinualLearner):
        res['cbp_stats'] = model.cbp_stats()
    if any(k is not None for k in keys):
        # Per task: [mean key-query cosine after training, the most any key reaches].
        res['key_query_cosine'] = keys
    if unknown:
        res.update(_open_world(model, data, tasks, unknown, config, backbone))
    return res


def score(model: Model, images: Sequence[np.ndarray], labels: Sequence[str], task_id: int,
          batch_size: int = 128) -> Tuple[float, float]:
    """(accuracy over all classes seen so far, task-selection accuracy) of ``model`` on the
    test frames of task ``task_id`` (labels as class names).

    A frame counts as correct when the best taught class is its label (a frame called
    unknown is scored by that class, so open-world rejection does not change accuracy).
    """
    if not len(images):
        return float('nan'), float('nan')
    correct = selected = 0
    for start in range(0, len(images), batch_size):
        preds = model.predict(images[start:start + batch_size], top_k=1)
        correct += sum(p.topk[0][0] == y for p, y in zip(preds, labels[start:start + batch_size]))
        selected += sum(p.task_id == task_id for p in preds)
    return correct / len(images), selected / len(images)


def _open_world(model: Model, data: ImageDataset, tasks: Sequence[Sequence[int]],
                unknown: Sequence[int], config: LearnerConfig, backbone: Backbone
                ) -> Dict[str, Any]:
    """Novelty of taught against held-out test frames, and the Mahalanobis baseline."""
    taught = [c for t in tasks for c in t]
    known_x = list(task_subset(data.test_images, data.test_labels, taught)[0])
    novel_x = list(task_subset(data.test_images, data.test_labels, unknown)[0])
    out: Dict[str, Any] = {'unknown_classes': [data.classes[k] for k in unknown]}
    if isinstance(model, ContinualLearner):
        known = [p.novelty for p in _predict_all(model, known_x)]
        novel = [p.novelty for p in _predict_all(model, novel_x)]
        threshold = model.config.unknown_threshold
        quantiles = (0.5, 0.9, 0.95, 0.99)
        out.update(unknown_auroc=auroc(known, novel), unknown_threshold=threshold,
                   known_novelty_quantiles=dict(zip(map(str, quantiles), np.quantile(
                       known, quantiles).tolist())),
                   unknown_novelty_quantiles=dict(zip(map(str, quantiles), np.quantile(
                       novel, quantiles).tolist())),
                   known_rejected_rate=float(np.mean(np.asarray(known) > threshold))
                   if threshold > 0 else 0.0,
                   unknown_rejected_rate=float(np.mean(np.asarray(novel) > threshold))
                   if threshold > 0 else 0.0)
    # The obvious baseline: Mahalanobis distance to the nearest class, on the backbone's
    # pre-logits feature and on the learner's own query (its statistics' feature).
    query = list(config.query_layers) or backbone.default_query_layers()
    for key, layers in (('mahalanobis_auroc', None), ('mahalanobis_query_auroc', query)):
        baseline = StreamingLDA(backbone, image_size=config.image_size, device=config.device,
                                shrinkage=config.lda_shrinkage, query_layers=layers)
        for t in tasks:
            x, y = task_subset(data.train_images, data.train_labels, t)
            baseline.learn_task(list(x), [data.classes[k] for k in y])
        out[key] = auroc(_chunked(baseline.novelty, known_x),
                         _chunked(baseline.novelty, novel_x))
    return out


def _chunked(fn: Callable[[List[np.ndarray]], torch.Tensor], images: List[np.ndarray],
             size: int = 128) -> List[float]:
    return [v for s in range(0, len(images), size) for v in fn(images[s:s + size]).tolist()]


def _predict_all(model: ContinualLearner, images: List[np.ndarray], size: int = 128):
    return [p for s in range(0, len(images), size) for p in model.predict(images[s:s + size])]


# ------------------------------------------------------------------------ lifetime
def lifetime_tasks(num_classes: int, count: int, seed: int) -> List[List[int]]:
    """``count`` pairs of distinct classes drawn at random (seeded)."""
    rng = np.random.default_rng([seed, 11])
    return [sorted(rng.choice(num_classes, size=2, replace=False).tolist())
            for _ in range(count)]


def run_lifetime(method: str, data: ImageDataset, config: LearnerConfig, backbone: Backbone,
                 *, dataset: str, split: str = 'test', num_tasks: int = 50,
                 train_per_class: int = 30, test_per_class: int = 50, args: Any = None,
                 progress: bool = True) -> Dict[str, Any]:
    """The robot-lifetime stream: ``num_tasks`` pairs of classes, each under new labels.

    After each task: its learning accuracy (test frames of its two classes, decided among
    those two classes only, as Dohare et al. measure it), and for learner methods the CBP
    block's dormant fraction, the effective rank of its hidden activations on the task's
    test frames (with the task's E-prompt) and the replacements so far.
    """
    pairs = lifetime_tasks(data.num_classes, num_tasks, config.seed)
    rng = np.random.default_rng([config.seed, 13])
    model = make_model(method, config, backbone, args=args)
    bar = _bar(num_tasks, f'{method} lifetime seed {config.seed}', progress)
    rows: List[Dict[str, Any]] = []
    train_seconds = 0.0
    try:
        for t, pair in enumerate(pairs):
            labels = [f't{t}:{data.classes[c]}' for c in pair]
            x_tr, y_tr = _pick(data.train_images, data.train_labels, pair, train_per_class, rng)
            x_te, y_te = _pick(data.test_images, data.test_labels, pair, test_per_class, rng)
            started = time.perf_counter()
            result = model.learn_task(list(x_tr), [labels[pair.index(k)] for k in y_tr])
            train_seconds += time.perf_counter() - started
            row = {'task': t, 'classes': [data.classes[c] for c in pair],
                   'learning_accuracy': _pair_accuracy(model, x_te, y_te, pair, labels),
                   'replaced_units': int(result.replaced_units)}
            if isinstance(model, ContinualLearner):
                row.update(_block_health(model, x_te))
            rows.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(acc=f'{row["learning_accuracy"]:.2f}', refresh=False)
    finally:
        if bar is not None:
            bar.close()
    la = [r['learning_accuracy'] for r in rows]
    first = la[:min(10, len(la))]
    last = la[-min(10, len(la)):]
    res = _base_result(method, model, backbone, config, dataset, split)
    res.update({
        'protocol': 'lifetime', 'tasks': num_tasks, 'lifetime': rows,
        'learning_accuracy': float(np.mean(la)), 'first10_learning_accuracy': float(
            np.mean(first)), 'last10_learning_accuracy': float(np.mean(last)),
        'train_seconds': round(train_seconds, 3),
        'replaced_units': int(sum(r['replaced_units'] for r in rows)),
        'train_per_class': train_per_class, 'test_per_class': test_per_class,
        **last_tasks_summary(rows),
    })
    return res


def last_tasks_summary(rows: Sequence[Dict[str, Any]], count: int = 10) -> Dict[str, float]:
    """``last10_<key>``: the mean over the last ``count`` tasks of each block-health figure
    the rows carry (dormant fractions, effective rank)."""
    tail = rows[-count:]
    return {f'last10_{key}': float(np.mean([r[key] for r in tail]))
            for key in ('dormant_fraction', 'dormant_fraction_zero', 'effective_rank')
            if tail and all(key in r for r in tail)}


def _pick(images: np.ndarray, labels: np.ndarray, classes: Sequence[int], per_class: int,
          rng: np.random.Generator):
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                           for c in classes])
    return images[keep], labels[keep]


def _pair_accuracy(model: Model, x: np.ndarray, y: np.ndarray, pair: Sequence[int],
                   labels: Sequence[str]) -> float:
    """Accuracy on the task's test frames, deciding between its two classes only."""
    truth = [labels[pair.index(int(k))] for k in y]
    if isinstance(model, ContinualLearner):
        names, scores = model.within_task_scores(list(x), model.num_tasks - 1)
    else:
        names = list(labels)
        with torch.no_grad():
            scores = model.scores(model.features(list(x)))[
                :, [model.classes.index(name) for name in names]]
    guesses = [names[i] for i in scores.argmax(1).tolist()]
    return float(np.mean([g == t for g, t in zip(guesses, truth)]))


def _block_health(model: ContinualLearner, x: np.ndarray) -> Dict[str, float]:
    """Dormant fraction and effective rank of the CBP block on the newest task's frames."""
    state = model.state
    stats = state.cbp.stats()
    with torch.no_grad():
        xb = model.preprocess(list(x))
        trunk = model.backbone.trunk(xb, state.first_layer)
        ids = torch.full((xb.shape[0],), state.num_tasks - 1, device=xb.device)
        hidden = state.cbp.hidden(state.prompted_features(model.backbone, trunk, ids))
    return {'dormant_fraction': float(stats['dormant_fraction']),
            'effective_rank': effective_rank(hidden.cpu().numpy()),
            'hidden_units': int(stats['hidden_units']),
            'replacements_total': int(stats['replacements_total'])}
