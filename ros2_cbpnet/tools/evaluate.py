r"""``cbpnet-eval``: offline class-incremental evaluation of CBPNet and its baselines (no ROS).

Protocol (design.md section 2.3): the data set's classes are split into ``--tasks``
consecutive groups by :func:`ros2_cbpnet.datasets.split_tasks` in the data set's documented
class order (digits ``0..9``; Fashion-MNIST's standard label order; folders: sorted sub-folder
names), earlier tasks taking the extra class when the split is uneven. Tasks are learned one
after the other; after task ``i`` every earlier task ``j <= i`` is tested over *all* classes
seen so far, with no task id (class-incremental), giving ``acc_matrix[i][j]``.

Methods (all share one loaded backbone):

- ``cbpnet``: the learner with the CBP block replacing units (``cbp_enabled=True``).
- ``dualprompt``: the same pipeline with ``cbp_enabled=False`` (same block, never replaced).
- ``linear``: frozen query features + a linear head trained task by task (masked CE).
- ``ncm``: nearest class mean of the frozen query features (cosine by default).

``--recipe`` picks how the two prompt methods run: ``cbpnet`` (default, this project's
improvements: LDA prompt selection, task-conditional prediction, feature replay of earlier
classes through the CBP block and head, G-prompt trained on the first task only) or
``faithful`` (the paper's DualPrompt recipe: key selection, softmax over all classes, no
replay, G-prompt trained on every task). ``--prompt-selection``, ``--prediction``,
``--feature-replay-coeff`` and ``--g-prompt-training`` override single parts.

Seeds: ``--seed S`` or ``--seeds 0,1,2``. A seed sets the train/test split (where one is
made) and the per-class subsample of the data set, and the training randomness of every
method; all methods of one seed see exactly the same images, so they can be compared pairwise.

Defaults: ``--image-size`` 64 for ``digits`` (8x8 images upsampled) and ``fashion-mnist``
(28x28 upsampled; 64 px keeps a 2-core CPU run to minutes and Lite0's stride-32 feature map
at 2x2), the backbone's default input size for ``folder:`` data; epochs, batch size and
learning rate from :class:`~ros2_cbpnet.learner.LearnerConfig`.

Output: a readable accuracy matrix and summary line per run on stdout, a progress bar on
stderr, and with ``--out`` a JSON file. One (method, seed) run writes one object with the
interface keys (``method, dataset, backbone, tasks, classes_per_task, acc_matrix,
average_accuracy, forgetting, learning_accuracy, trainable_params, backbone_params,
train_seconds``) plus ``seed, recipe, label, config, replaced_units`` and more. Several runs
write ``{"runs": [one such object per run], "summary": {label: {metric: {"mean", "std",
"values"}}}}`` (std is the sample standard deviation over seeds, 0 for one seed).
``classes_per_task`` is an int when every task has the same number of classes, else a list.
While a multi-run job is still going, ``--out`` already holds the finished runs (with
``"partial": true``), so a killed job loses only the run in progress.

``--compare a.json b.json [--plot p.png] [--out all.json]`` runs nothing: it reads earlier
result files (either form) and prints/plots them together, one line per method.

Example:
    cbpnet-eval --dataset digits --tasks 5 --method cbpnet,dualprompt,ncm --seeds 0,1,2 \\
        --out results/digits.json --plot results/digits.png
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..baselines import (BASELINES, NCM_METRICS, FrozenFeatureBaseline,
                         backbone_params_without_classifier)
from ..datasets import DatasetError, ImageDataset, load_dataset, split_tasks, task_subset
from ..learner import ContinualLearner, LearnerConfig, LearningError, Progress
from ..metrics import format_matrix, summarize
from ..model.backbones import EMBEDDED_BACKBONE, Backbone, BackboneLoadError, load_backbone
from ..model.cbpnet import PREDICTION_MODES, SELECTION_MODES
from ..progress import ProgressBar

__all__ = [
    'INTERFACE_KEYS', 'LEARNER_METHODS', 'METHODS', 'METRICS', 'RECIPES', 'build_parser',
    'code_fingerprint', 'default_image_size', 'format_summary', 'learner_config',
    'load_results', 'main', 'make_model', 'run_label', 'run_method', 'summarize_runs',
]

PROG = 'cbpnet-eval'
METHODS = ('cbpnet', 'dualprompt', 'linear', 'ncm')
LEARNER_METHODS = ('cbpnet', 'dualprompt')
#: LearnerConfig fields each recipe sets (see the module docstring). ``cbpnet`` keeps the
#: learner's drift control at its defaults; ``faithful`` switches it off, as in the paper.
_DEFAULT_REPLAY = getattr(LearnerConfig(), 'feature_replay_coeff', 1.0)
RECIPES: Dict[str, Dict[str, Any]] = {
    'cbpnet': {'prompt_selection': 'lda', 'prediction': 'task',
               'feature_replay_coeff': _DEFAULT_REPLAY,
               'g_prompt_first_task_only': True},
    'faithful': {'prompt_selection': 'key', 'prediction': 'all',
                 'feature_replay_coeff': 0.0, 'g_prompt_first_task_only': False},
}
METRICS = ('average_accuracy', 'forgetting', 'learning_accuracy')
#: The keys interface.md promises in every result object.
INTERFACE_KEYS = ('method', 'dataset', 'backbone', 'tasks', 'classes_per_task', 'acc_matrix',
                  'average_accuracy', 'forgetting', 'learning_accuracy', 'trainable_params',
                  'backbone_params', 'train_seconds')
_BUILTIN_IMAGE_SIZE = {'digits': 64, 'fashion-mnist': 64}

Model = Union[ContinualLearner, FrozenFeatureBaseline]


# ------------------------------------------------------------------------ arguments
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text!r}') from None
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text!r}')
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive number, got {text!r}') from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f'expected a positive number, got {text!r}')
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number >= 0, got {text!r}') from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f'expected a number >= 0, got {text!r}')
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number in [0, 1], got {text!r}') from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'expected a number in [0, 1], got {text!r}')
    return value


def _method_list(text: str) -> List[str]:
    methods: List[str] = []
    for name in (s.strip().lower() for s in text.split(',')):
        if not name:
            continue
        if name not in METHODS:
            raise argparse.ArgumentTypeError(
                f'unknown method {name!r}; choose from {", ".join(METHODS)} '
                '(several comma-separated)')
        if name not in methods:
            methods.append(name)
    if not methods:
        raise argparse.ArgumentTypeError('no method given')
    return methods


def _seed_list(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(',') if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected comma-separated integers such as 0,1,2, got {text!r}') from None
    if not seeds:
        raise argparse.ArgumentTypeError('no seed given')
    return list(dict.fromkeys(seeds))


def _layer_list(text: str) -> List[int]:
    """'6,7' -> [6, 7]; 'none' -> [-1] (the learner's 'no G-prompt'); '' -> [] (default)."""
    if text.strip().lower() in ('none', 'off', '-1'):
        return [-1]
    try:
        layers = sorted({int(s) for s in text.split(',') if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 6,7 (or 'none'), got {text!r}"
        ) from None
    if any(i < 0 for i in layers):
        raise argparse.ArgumentTypeError(f'layer indices must be >= 0, got {text!r}')
    return layers


def build_parser() -> argparse.ArgumentParser:
    """The ``cbpnet-eval`` argument parser."""
    d = LearnerConfig()
    p = argparse.ArgumentParser(
        prog=PROG, description='Offline class-incremental evaluation of CBPNet and baselines '
        "(no ROS). Tasks are consecutive groups of classes in the data set's documented "
        'order; after each task all seen tasks are tested over all seen classes.',
        epilog='Example: cbpnet-eval --dataset digits --tasks 5 --method cbpnet,dualprompt '
        '--seeds 0,1,2 --out results/digits.json --plot results/digits.png')
    g = p.add_argument_group('experiment')
    g.add_argument('--dataset', help="'digits', 'fashion-mnist' or 'folder:PATH'")
    g.add_argument('--tasks', type=_positive_int, help='number of tasks (<= number of classes)')
    g.add_argument('--method', type=_method_list, default=['cbpnet'],
                   help=f'one or several comma-separated of {",".join(METHODS)} '
                   '(default cbpnet); they share the loaded backbone')
    g.add_argument('--backbone', default=EMBEDDED_BACKBONE,
                   help=f'timm model name (default {EMBEDDED_BACKBONE}, weights embedded)')
    g.add_argument('--backbone-checkpoint', default='',
                   help="weights file, or 'random' for random weights (tests only)")
    g.add_argument('--image-size', type=_non_negative_int, default=0,
                   help='input side in pixels; 0 = 64 for digits and fashion-mnist, the '
                   "backbone's default for folder data")
    seeds = g.add_mutually_exclusive_group()
    seeds.add_argument('--seed', type=int, default=None, help='one seed (default 0)')
    seeds.add_argument('--seeds', type=_seed_list, default=None,
                       help='several seeds, e.g. 0,1,2: repeat and report mean +- std')
    g.add_argument('--train-per-class', type=_positive_int, default=None,
                   help='keep at most N random training images per class')
    g.add_argument('--test-per-class', type=_positive_int, default=None,
                   help='keep at most N random test images per class')
    g.add_argument('--device', default='auto', help='auto, cpu or cuda[:N] (default auto)')
    g.add_argument('--threads', type=_non_negative_int, default=0,
                   help='torch CPU threads (0 = torch default)')

    t = p.add_argument_group('training')
    t.add_argument('--epochs', type=_positive_int, default=d.epochs,
                   help=f'epochs per task (default {d.epochs})')
    t.add_argument('--batch-size', type=_positive_int, default=d.batch_size,
                   help=f'default {d.batch_size}')
    t.add_argument('--lr', type=_positive_float, default=d.learning_rate,
                   help=f'Adam learning rate (default {d.learning_rate})')
    t.add_argument('--recipe', choices=sorted(RECIPES), default='cbpnet',
                   help='cbpnet: LDA selection + task-conditional prediction (default); '
                   "faithful: the paper's DualPrompt key selection + prediction over all "
                   'classes')
    t.add_argument('--prompt-selection', choices=SELECTION_MODES, default=None,
                   help="override the recipe's E-prompt selection")
    t.add_argument('--prediction', choices=PREDICTION_MODES, default=None,
                   help="override the recipe's prediction")
    t.add_argument('--feature-replay-coeff', type=_non_negative_float, default=None,
                   help="override the recipe's weight of the replay of earlier classes' "
                   'features (0 = off)')
    t.add_argument('--g-prompt-training', choices=('first-task', 'every-task'), default=None,
                   help="override the recipe's G-prompt training")
    t.add_argument('--g-prompt-layers', type=_layer_list, default=None,
                   help="G-prompt layers, e.g. 5, or 'none' (default: the family default)")
    t.add_argument('--e-prompt-layers', type=_layer_list, default=None,
                   help='E-prompt layers, e.g. 6,7 (default: the family default)')
    t.add_argument('--cbp-hidden-units', type=_positive_int, default=d.cbp_hidden_units,
                   help=f'CBP block width (default {d.cbp_hidden_units})')
    t.add_argument('--cbp-replacement-rate', type=_fraction, default=d.cbp_replacement_rate,
                   help=f'default {d.cbp_replacement_rate}')
    t.add_argument('--cbp-maturity-threshold', type=_non_negative_int,
                   default=d.cbp_maturity_threshold,
                   help=f'default {d.cbp_maturity_threshold}')
    t.add_argument('--cbp-decay-rate', type=float, default=d.cbp_decay_rate,
                   help=f'utility decay in (0, 1) (default {d.cbp_decay_rate})')
    t.add_argument('--ncm-metric', choices=NCM_METRICS, default='cosine',
                   help='distance of the ncm baseline (default cosine)')

    o = p.add_argument_group('output')
    o.add_argument('--out', help='write the results JSON here')
    o.add_argument('--plot', help='write an accuracy plot (PNG) here')
    o.add_argument('--compare', nargs='+', metavar='JSON',
                   help='run nothing: print and plot (with --plot) earlier result files '
                   'together, one line per method')
    o.add_argument('--tag', default='',
                   help='text appended to the method labels of this run, e.g. "rate=1e-3", '
                   'to tell variants apart in --compare')
    o.add_argument('--quiet', action='store_true',
                   help='no progress bar and no per-run matrices, only the summary')
    return p


def default_image_size(dataset: str, requested: int) -> int:
    """Input side for ``dataset``.

    Returns:
        ``requested`` if non-zero, else 64 for the built-in sets, else 0 (backbone default).
    """
    if requested:
        return requested
    return _BUILTIN_IMAGE_SIZE.get(dataset.strip().lower().replace('_', '-'), 0)


def learner_config(args: argparse.Namespace, method: str, seed: int,
                   image_size: int) -> LearnerConfig:
    """The :class:`LearnerConfig` of one run from the parsed arguments."""
    recipe = dict(RECIPES[args.recipe])
    overrides = {'prompt_selection': args.prompt_selection, 'prediction': args.prediction,
                 'feature_replay_coeff': args.feature_replay_coeff,
                 'g_prompt_first_task_only': None if args.g_prompt_training is None
                 else args.g_prompt_training == 'first-task'}
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(LearnerConfig)}
    changes: Dict[str, Any] = {k: v for k, v in recipe.items() if k in known}
    changes.update(
        backbone=args.backbone, backbone_checkpoint=args.backbone_checkpoint,
        device=args.device, image_size=image_size, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.lr,
        cbp_enabled=method != 'dualprompt', cbp_hidden_units=args.cbp_hidden_units,
        cbp_replacement_rate=args.cbp_replacement_rate,
        cbp_maturity_threshold=args.cbp_maturity_threshold,
        cbp_decay_rate=args.cbp_decay_rate, seed=seed)
    if args.g_prompt_layers is not None:
        changes['g_prompt_layers'] = args.g_prompt_layers
    if args.e_prompt_layers is not None:
        if args.e_prompt_layers == [-1]:
            raise ValueError('--e-prompt-layers cannot be none: every task has an E-prompt')
        changes['e_prompt_layers'] = args.e_prompt_layers
    return LearnerConfig().replace(**changes)


# ------------------------------------------------------------------------ running
def code_fingerprint() -> str:
    """Short hash of the learner, model and baseline sources, stored with every result.

    Results are only comparable when produced by the same algorithm code; other files
    (node, tools) do not change the numbers and are left out.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha1()
    for rel in ('learner.py', 'baselines.py', 'model/backbones.py', 'model/cbp.py',
                'model/cbpnet.py'):
        try:
            with open(os.path.join(root, rel), 'rb') as fh:
                digest.update(fh.read())
        except OSError:
            digest.update(rel.encode())
    return digest.hexdigest()[:12]


def make_model(method: str, config: LearnerConfig, backbone: Backbone, *,
               ncm_metric: str = 'cosine') -> Model:
    """A fresh learner or baseline for ``method`` on the shared ``backbone``."""
    # The learner draws its initial CBP block from the global RNG without seeding it; seed
    # here so runs repeat and cbpnet/dualprompt of one seed start from the same block.
    torch.manual_seed(config.seed)
    if method in LEARNER_METHODS:
        return ContinualLearner(config.replace(cbp_enabled=method == 'cbpnet'), backbone)
    common = dict(image_size=config.image_size, device=config.device, seed=config.seed)
    if method == 'ncm':
        return BASELINES['ncm'](backbone, metric=ncm_metric, **common)
    if method == 'linear':
        return BASELINES['linear'](backbone, epochs=config.epochs, batch_size=config.batch_size,
                                   learning_rate=config.learning_rate,
                                   grad_clip_norm=config.grad_clip_norm, **common)
    raise ValueError(f'unknown method {method!r}')


def run_label(result: Dict[str, Any]) -> str:
    """Display name of a run.

    The method, then the recipe when it is not the default one, then the run's ``tag``.
    """
    label = str(result.get('method', '?'))
    recipe = result.get('recipe')
    if label in LEARNER_METHODS and recipe and recipe != 'cbpnet':
        label = f'{label} ({recipe})'
    return f'{label} [{result["tag"]}]' if result.get('tag') else label


def _steps(n: int, config: LearnerConfig, method: str) -> int:
    if method == 'ncm':
        return 1
    return math.ceil(n / config.batch_size) * config.epochs


def run_method(method: str, data: ImageDataset, tasks: Sequence[Sequence[int]],
               config: LearnerConfig, backbone: Backbone, *, dataset: str,
               recipe: str = 'cbpnet', ncm_metric: str = 'cosine',
               progress: bool = True, tag: str = '') -> Dict[str, Any]:
    """Learn ``tasks`` one by one with ``method`` and test after each; the result dict.

    Args:
        method: one of :data:`METHODS`.
        data: the loaded data set (its split and subsample already seeded).
        tasks: class ids per task, e.g. from :func:`split_tasks`.
        config: learner configuration (baselines take image size, device, seed, epochs,
            batch size and learning rate from it).
        backbone: the shared frozen backbone.
        dataset: the data set spec, recorded in the result.
        recipe: recorded in the result (the config already holds its effect).
        ncm_metric: distance of the ``ncm`` baseline.
        progress: draw a progress bar on stderr.
        tag: appended to the label (see :func:`run_label`).

    Raises:
        LearningError: the learner refused or rolled back a task.
    """
    model = make_model(method, config, backbone, ncm_metric=ncm_metric)
    names = data.classes
    train = [task_subset(data.train_images, data.train_labels, t) for t in tasks]
    test = [task_subset(data.test_images, data.test_labels, t) for t in tasks]
    total = sum(_steps(len(y), config, method) for _, y in train)
    bar = ProgressBar(total, prefix=f'{method} seed {config.seed}') if progress else None
    acc: List[List[float]] = []
    replaced: List[int] = []
    train_seconds = 0.0

    def report(p: Progress) -> None:
        if bar is not None:
            bar.update(1, task=f'{p.task_id + 1}/{len(tasks)}', loss=p.loss,
                       acc=p.accuracy)

    try:
        for i, (x, y) in enumerate(train):
            started = time.perf_counter()
            result = model.learn_task(x, [names[k] for k in y], progress=report)
            train_seconds += time.perf_counter() - started
            replaced.append(int(result.replaced_units))
            acc.append([float(model.evaluate(xt, [names[k] for k in yt]))
                        for xt, yt in test[:i + 1]])
    finally:
        if bar is not None:
            bar.close()
    counts = model.parameter_counts()
    # Computed here rather than trusted from the model: the frozen extractor without timm's
    # unused ImageNet classifier (a robot never runs it).
    backbone_params = backbone_params_without_classifier(backbone)
    sizes = [len(t) for t in tasks]
    if isinstance(model, ContinualLearner):
        cfg: Dict[str, Any] = dataclasses.asdict(model.config)
        cbp = model.cbp_stats()
    else:
        cfg, cbp = model.config_dict(), None
    metrics = summarize(acc)
    res: Dict[str, Any] = {
        'method': method, 'dataset': dataset, 'backbone': backbone.name,
        'tasks': len(tasks),
        'classes_per_task': sizes[0] if len(set(sizes)) == 1 else sizes,
        'acc_matrix': acc, **metrics,
        'trainable_params': int(counts['trainable_params']),
        'backbone_params': int(backbone_params),
        'train_seconds': round(train_seconds, 3),
        'seed': int(config.seed), 'recipe': recipe if method in LEARNER_METHODS else None,
        'config': cfg, 'replaced_units': int(sum(replaced)),
        'replaced_units_per_task': replaced,
        'task_learning_accuracy': [row[i] for i, row in enumerate(acc)],
        'task_classes': [[names[k] for k in t] for t in tasks],
        'train_samples_per_task': [int(len(y)) for _, y in train],
        'test_samples_per_task': [int(len(y)) for _, y in test],
        'image_size': int(config.image_size or backbone.input_size),
        'code_version': code_fingerprint(),
    }
    if cbp is not None:
        res['cbp_stats'] = cbp
    if tag:
        res['tag'] = tag
    res['label'] = run_label(res)
    return res


# ------------------------------------------------------------------------ summaries
def _mean_std(values: Sequence[float]) -> Dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {'mean': float(arr.mean()), 'std': std, 'values': [float(v) for v in arr]}


def _group_key(run: Dict[str, Any], by_dataset: bool) -> str:
    label = run.get('label') or run_label(run)
    return f'{label} [{run.get("dataset")}]' if by_dataset else label


def summarize_runs(runs: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Mean and sample std over seeds of each metric, per method label.

    Runs are grouped by label, and by data set too when they mix data sets. Each group also
    gets the element-wise mean accuracy matrix and per-task learning accuracy.
    """
    by_dataset = len({r.get('dataset') for r in runs}) > 1
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(_group_key(r, by_dataset), []).append(r)
    out: Dict[str, Dict[str, Any]] = {}
    for key, rs in groups.items():
        entry: Dict[str, Any] = {'runs': len(rs), 'seeds': [r.get('seed') for r in rs],
                                 'dataset': rs[0].get('dataset'),
                                 'method': rs[0].get('method')}
        for m in METRICS + ('train_seconds', 'replaced_units'):
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                entry[m] = _mean_std(vals)
        shapes = {len(r['acc_matrix']) for r in rs}
        if len(shapes) == 1:
            n = shapes.pop()
            entry['acc_matrix'] = [[float(np.mean([r['acc_matrix'][i][j] for r in rs]))
                                    for j in range(i + 1)] for i in range(n)]
            diag = [[r['acc_matrix'][i][i] for r in rs] for i in range(n)]
            entry['task_learning_accuracy'] = [_mean_std(v) for v in diag]
        entry['trainable_params'] = rs[0].get('trainable_params')
        entry['backbone_params'] = rs[0].get('backbone_params')
        out[key] = entry
    return out


def _pm(entry: Dict[str, Any], metric: str, scale: float = 100.0, digits: int = 1) -> str:
    stat = entry.get(metric)
    if not stat:
        return '-'
    if entry['runs'] > 1:
        return f'{scale * stat["mean"]:.{digits}f} ± {scale * stat["std"]:.{digits}f}'
    return f'{scale * stat["mean"]:.{digits}f}'


def format_summary(summary: Dict[str, Dict[str, Any]]) -> str:
    """A markdown table: one row per method, metrics in percent (mean ± std over seeds)."""
    lines = ['| method | runs | avg acc % | forgetting % | learning acc % | '
             'last-2 learning acc % | replaced | train s | trainable params |',
             '|---|---|---|---|---|---|---|---|---|']
    for key, e in summary.items():
        last2 = '-'
        tla = e.get('task_learning_accuracy')
        if tla:
            last2 = ' / '.join(f'{100 * s["mean"]:.1f}' for s in tla[-2:])
        lines.append(
            f'| {key} | {e["runs"]} | {_pm(e, "average_accuracy")} | {_pm(e, "forgetting")} '
            f'| {_pm(e, "learning_accuracy")} | {last2} | {_pm(e, "replaced_units", 1, 0)} '
            f'| {_pm(e, "train_seconds", 1, 1)} | {e.get("trainable_params")} |')
    return '\n'.join(lines)


def _run_report(res: Dict[str, Any]) -> str:
    names = [','.join(c) for c in res['task_classes']]
    if max(len(n) for n in names) > 12:  # long class names would blow up the table
        names = [f'T{k + 1}' for k in range(len(names))]
    head = (f'== {res["label"]} | {res["dataset"]} | {res["backbone"]} | seed {res["seed"]} '
            f'| {res["tasks"]} tasks ==')
    tail = (f'{res["label"]}: average accuracy {100 * res["average_accuracy"]:.1f}%, '
            f'forgetting {100 * res["forgetting"]:.1f}%, learning accuracy '
            f'{100 * res["learning_accuracy"]:.1f}%, replaced units {res["replaced_units"]}, '
            f'train {res["train_seconds"]:.1f} s, trainable {res["trainable_params"]:,} / '
            f'backbone {res["backbone_params"]:,} params')
    return '\n'.join([head, format_matrix(res['acc_matrix'], names), tail])


def load_results(paths: Sequence[str]) -> List[Dict[str, Any]]:
    """Runs from result files: a single result object, ``{"runs": [...]}`` or a list.

    Raises:
        ValueError: a file is unreadable or holds no result with ``method`` and
            ``acc_matrix``.
    """
    runs: List[Dict[str, Any]] = []
    for path in paths:
        try:
            with open(path, encoding='utf-8') as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f'cannot read result file {path!r}: {exc}') from exc
        items = data.get('runs', [data]) if isinstance(data, dict) else data
        found = [r for r in items if isinstance(r, dict) and 'method' in r
                 and 'acc_matrix' in r] if isinstance(items, list) else []
        if not found:
            raise ValueError(f'{path}: no result with "method" and "acc_matrix" in it')
        runs.extend(found)
    return runs


def _plot(runs: Sequence[Dict[str, Any]], path: str) -> None:
    from ..plotting import plot_accuracy_curves

    summary = summarize_runs(runs)
    curves = []
    for key, e in summary.items():
        if 'acc_matrix' not in e:
            continue
        label = key if e['runs'] == 1 else f'{key} (mean of {e["runs"]})'
        curves.append({'method': label, 'acc_matrix': e['acc_matrix'],
                       'dataset': e.get('dataset')})
    plot_accuracy_curves(curves, path)


def _write_json(path: str, payload: Any) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as fh:
        json.dump(payload, fh, indent=1)
        fh.write('\n')
    os.replace(tmp, path)


def _output(runs: List[Dict[str, Any]], args: argparse.Namespace) -> None:
    summary = summarize_runs(runs)
    print('\nSummary (percent; mean ± sample std over seeds):')
    print(format_summary(summary))
    if args.out:
        payload: Any = runs[0] if len(runs) == 1 else {'runs': runs, 'summary': summary}
        _write_json(args.out, payload)
        print(f'results written to {args.out}')
    if args.plot:
        _plot(runs, args.plot)
        print(f'plot written to {args.plot}')


# ------------------------------------------------------------------------ main
def _load(spec: str, seed: int, args: argparse.Namespace, image_size: int) -> ImageDataset:
    return load_dataset(spec, seed=seed, train_per_class=args.train_per_class,
                        test_per_class=args.test_per_class, image_size=image_size)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cbpnet-eval``; returns the exit status (2 for bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        try:
            runs = load_results(args.compare)
        except ValueError as exc:
            parser.error(str(exc))
        _output(runs, args)
        return 0
    if not args.dataset or not args.tasks:
        parser.error('--dataset and --tasks are required (or --compare FILE...)')
    seeds = args.seeds if args.seeds is not None else [0 if args.seed is None else args.seed]
    image_size = default_image_size(args.dataset, args.image_size)
    try:
        for method in args.method:
            learner_config(args, method, seeds[0], image_size).validate()
    except ValueError as exc:
        parser.error(str(exc))

    datasets: Dict[int, ImageDataset] = {}
    try:
        # Known image size: load the data first, so a bad data set fails before the backbone.
        if image_size:
            datasets[seeds[0]] = _load(args.dataset, seeds[0], args, image_size)
        backbone = load_backbone(args.backbone, args.backbone_checkpoint,
                                 image_size=image_size)
        image_size = image_size or backbone.input_size
        if seeds[0] not in datasets:
            datasets[seeds[0]] = _load(args.dataset, seeds[0], args, image_size)
    except (DatasetError, BackboneLoadError) as exc:
        parser.error(str(exc))
    num_classes = datasets[seeds[0]].num_classes
    if args.tasks > num_classes:
        parser.error(f'--tasks {args.tasks} is more than the {num_classes} classes of '
                     f'{args.dataset}')
    tasks = split_tasks(num_classes, args.tasks)

    runs: List[Dict[str, Any]] = []
    for seed in seeds:
        if seed not in datasets:
            try:
                datasets[seed] = _load(args.dataset, seed, args, image_size)
            except DatasetError as exc:
                parser.error(str(exc))
        data = datasets.pop(seed)
        for method in args.method:
            config = learner_config(args, method, seed, image_size)
            try:
                res = run_method(method, data, tasks, config, backbone, dataset=args.dataset,
                                 recipe=args.recipe, ncm_metric=args.ncm_metric,
                                 progress=not args.quiet, tag=args.tag)
            except LearningError as exc:
                print(f'{PROG}: error: {method} seed {seed}: {exc}', file=sys.stderr)
                return 1
            runs.append(res)
            if not args.quiet:
                print(_run_report(res), flush=True)
            if args.out and len(runs) < len(seeds) * len(args.method):
                # Long sweeps get killed on shared machines: keep what is finished so far.
                _write_json(args.out, {'runs': runs, 'summary': summarize_runs(runs),
                                       'partial': True})
    _output(runs, args)
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
