r"""``cbpnet-eval``: offline evaluation of CBPNet and its baselines (no ROS).

Protocols (``--protocol``):

- ``incremental`` (default; design.md section 2.3): the data set's classes are split into
  ``--tasks`` consecutive groups in the data set's documented class order (digits ``0..9``;
  Fashion-MNIST's standard label order; folders: sorted sub-folder names). Tasks are learned
  one after the other; after task ``i`` every task ``j <= i`` is tested over *all* classes seen
  so far, with no task id, giving ``acc_matrix[i][j]``. ``--unknown-classes K`` holds the last
  K classes out of training and scores the novelty of taught against held-out test frames
  (``unknown_auroc``, ``known_rejected_rate`` at the learner's ``unknown_threshold``, and
  ``mahalanobis_auroc`` / ``mahalanobis_query_auroc`` of the obvious baseline, Mahalanobis
  distance to the nearest class on the pre-logits feature / on the learner's own query).
- ``lifetime``: ``--lifetime-tasks`` (default 50) pairs of classes drawn at random, each under
  labels new to the learner, as Dohare et al. (Nature 2024) build Continual ImageNet; per
  task the learning accuracy (among the task's two classes, right after learning it), the
  CBP block's dormant fraction and the effective rank of its hidden units.
- ``plasticity``: the learned parts alone (CBP block, and with ``--plasticity-prompts`` the
  prompts), trained continually over ``--lifetime-tasks`` (default 200) pairs of classes with
  a fresh head per task, as Dohare et al. build Continual ImageNet; ``--plasticity-path
  no-skip`` is the control in which the head reads only the block's hidden units (see
  :mod:`ros2_cbpnet.tools.eval_plasticity`). ``cbpnet`` = CBP on, ``cbpnet-nocbp`` = off.

Methods: see :mod:`ros2_cbpnet.tools.eval_methods` (``cbpnet``, ``cbpnet-nocbp``,
``dualprompt``, ``joint``, ``lda``, ``ranpac``, ``ncm``, ``linear``). Every option that maps
onto a :class:`~ros2_cbpnet.learning.learner.LearnerConfig` field overrides it for the learner
methods.

Splits: ``--split test`` (default) reports on the data set's test images; ``--split
validation`` carves ``--validation-fraction`` of each class's *training* images as the
evaluation set and drops the test images before anything runs. Every sweep that chooses a
default uses ``--split validation``; the result records ``split``.

Seeds: ``--seed S`` or ``--seeds 0,1,2``. A seed sets the train/test split (where one is made),
the per-class subsample and the training randomness of every method; all methods of one seed
see exactly the same images, so they can be compared pairwise.

Defaults: ``--image-size`` 64 for ``digits`` and ``fashion-mnist``, the backbone's default for
``folder:`` data.

Output: a readable accuracy matrix and summary line per run on stdout, a progress bar on
stderr, and with ``--out`` a JSON file: one result object per run, or ``{"runs": [...],
"summary": {label: {metric: {"mean", "std", "values"}}}}`` for several (std is the sample
standard deviation over seeds). While a multi-run job is going, ``--out`` already holds the
finished runs (``"partial": true``). ``--compare a.json b.json [--plot p.png]`` runs nothing:
it prints and plots earlier result files together.

Example:
    cbpnet-eval --dataset digits --tasks 5 --method cbpnet,lda,ranpac,ncm --seeds 0,1,2 \\
        --out results/digits.json --plot results/digits.png
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..learning.baselines import NCM_METRICS
from ..learning.choices import EMBEDDED_BACKBONE, PREDICTION_MODES, SELECTION_MODES, SPREADS
from ..learning.datasets import DatasetError, ImageDataset, load_dataset, split_tasks
from ..learning.learner import LearnerConfig, LearningError
from ..learning.model.backbones import BackboneLoadError, load_backbone
from .cli_types import fraction, non_negative_float, non_negative_int, positive_float, positive_int
from .eval_methods import METHODS, learner_config
from .eval_plasticity import PATHS, run_plasticity_method
from .eval_protocols import run_incremental, run_lifetime, thin_classes, validation_split
from .eval_report import (METRICS, format_summary, load_results, output_runs, run_label,
                          run_report, summarize_runs, write_json)

__all__ = [
    'INTERFACE_KEYS', 'METHODS', 'METRICS', 'build_parser', 'code_fingerprint',
    'default_image_size', 'format_summary', 'load_results', 'main', 'run_label',
    'summarize_runs',
]

PROG = 'cbpnet-eval'
#: The keys interface.md promises in every incremental result object.
INTERFACE_KEYS = ('method', 'dataset', 'backbone', 'tasks', 'classes_per_task', 'acc_matrix',
                  'average_accuracy', 'forgetting', 'learning_accuracy', 'trainable_params',
                  'backbone_params', 'train_seconds')
_BUILTIN_IMAGE_SIZE = {'digits': 64, 'fashion-mnist': 64}


# ------------------------------------------------------------------------ arguments
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


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ('1', 'true', 'yes', 'on'):
        return True
    if value in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


def _query_layers(text: str) -> List[int]:
    """'3,4,5' -> [3, 4, 5]; 'prelogits' or 'last' -> [-1] (the last layer alone)."""
    if text.strip().lower() in ('prelogits', 'last', '-1'):
        return [-1]
    layers = _layer_list(text)
    if layers == [-1]:
        raise argparse.ArgumentTypeError('the query needs at least one layer')
    return layers


def build_parser() -> argparse.ArgumentParser:
    """The ``cbpnet-eval`` argument parser."""
    d = LearnerConfig()
    p = argparse.ArgumentParser(
        prog=PROG, description='Offline continual-learning evaluation of CBPNet and baselines '
        '(no ROS): class-incremental tasks, open-world novelty, or a long lifetime stream.',
        epilog='Example: cbpnet-eval --dataset digits --tasks 5 --method cbpnet,lda,ranpac '
        '--seeds 0,1,2 --out results/digits.json --plot results/digits.png')
    g = p.add_argument_group('experiment')
    g.add_argument('--dataset', help="'digits', 'fashion-mnist' or 'folder:PATH'")
    g.add_argument('--protocol', choices=('incremental', 'lifetime', 'plasticity'),
                   default='incremental',
                   help='incremental (default); lifetime (a long stream of class pairs through '
                   'the learner); plasticity (the learned parts alone, a fresh head per task)')
    g.add_argument('--tasks', type=positive_int,
                   help='number of tasks of the incremental protocol (<= classes taught)')
    g.add_argument('--method', type=_method_list, default=['cbpnet'],
                   help=f'one or several comma-separated of {",".join(METHODS)} '
                   '(default cbpnet); they share the loaded backbone')
    g.add_argument('--backbone', default=EMBEDDED_BACKBONE,
                   help=f'timm model name (default {EMBEDDED_BACKBONE}, weights embedded)')
    g.add_argument('--backbone-checkpoint', default='',
                   help="weights file, or 'random' for random weights (tests only)")
    g.add_argument('--image-size', type=non_negative_int, default=0,
                   help='input side in pixels; 0 = 64 for digits and fashion-mnist, the '
                   "backbone's default for folder data")
    seeds = g.add_mutually_exclusive_group()
    seeds.add_argument('--seed', type=int, default=None, help='one seed (default 0)')
    seeds.add_argument('--seeds', type=_seed_list, default=None,
                       help='several seeds, e.g. 0,1,2: repeat and report mean +- std')
    g.add_argument('--split', choices=('test', 'validation'), default='test',
                   help='evaluate on the test images (default), or on a validation set carved '
                   'from the training images (the test images are then never loaded into a '
                   'model); every sweep uses validation')
    g.add_argument('--validation-fraction', type=fraction, default=0.2,
                   help='share of each class\'s training images held out by --split '
                   'validation (default 0.2)')
    g.add_argument('--train-per-class', type=positive_int, default=None,
                   help='keep at most N random training images per class (few-shot: 5, 10, 20)')
    g.add_argument('--test-per-class', type=positive_int, default=None,
                   help='keep at most N random test images per class')
    g.add_argument('--count-ratio', type=positive_int, default=1,
                   help='keep 1/R of the training images of every other class (odd class '
                   'ids), so class counts differ R-fold (default 1: as loaded)')
    g.add_argument('--unknown-classes', type=non_negative_int, default=0,
                   help='hold the last K classes out of training and score the novelty of '
                   'their test frames against the taught ones')
    g.add_argument('--lifetime-tasks', type=positive_int, default=None,
                   help='tasks of the lifetime / plasticity protocols (default 50 / 200)')
    g.add_argument('--lifetime-train-per-class', type=positive_int, default=None,
                   help='training images per class and task in the lifetime / plasticity '
                   'protocols (default 30 / 100)')
    g.add_argument('--lifetime-test-per-class', type=positive_int, default=50,
                   help='test images per class and task in the lifetime protocol')
    g.add_argument('--plasticity-path', choices=PATHS, default='residual',
                   help="plasticity protocol: the head reads the CBP block's output "
                   "(residual, as the node) or its hidden units only (no-skip, the control)")
    g.add_argument('--plasticity-prompts', type=_bool, default=False,
                   help='plasticity protocol: train the G-prompt and E-prompt chain too '
                   '(each step then runs the backbone from the first prompted layer)')
    g.add_argument('--device', default='auto', help='auto, cpu or cuda[:N] (default auto)')
    g.add_argument('--threads', type=non_negative_int, default=0,
                   help='torch CPU threads (0 = torch default)')

    t = p.add_argument_group('learner (each overrides the LearnerConfig default and the '
                             "method's recipe)")
    t.add_argument('--epochs', type=positive_int, default=None,
                   help=f'epochs per task (default {d.epochs})')
    t.add_argument('--min-steps', type=non_negative_int, default=None,
                   help=f'optimiser steps per task at least (default {d.min_steps})')
    t.add_argument('--batch-size', type=positive_int, default=None,
                   help=f'default {d.batch_size}')
    t.add_argument('--lr', type=positive_float, default=None,
                   help=f'Adam learning rate (default {d.learning_rate})')
    t.add_argument('--prediction', choices=PREDICTION_MODES, default=None,
                   help=f'stats, task or all (default {d.prediction})')
    t.add_argument('--head-weight', type=non_negative_float, default=None,
                   help=f'weight of the prompted head in task prediction '
                   f'(default {d.head_weight})')
    t.add_argument('--prompt-selection', choices=SELECTION_MODES, default=None,
                   help=f'E-prompt selection (default {d.prompt_selection})')
    t.add_argument('--query-layers', type=_query_layers, default=None,
                   help="layers of the frozen query, e.g. 3,4,5,6,7, or 'prelogits' "
                   '(default: the family default)')
    t.add_argument('--lda-shrinkage', type=fraction, default=None,
                   help=f'LDA covariance shrinkage (default {d.lda_shrinkage}); also the '
                   'lda baseline\'s')
    t.add_argument('--lda-spread', choices=SPREADS, default=None,
                   help=f"how a class's sample count enters its LDA score (default "
                   f"{d.lda_spread})")
    t.add_argument('--feature-replay-coeff', type=non_negative_float, default=None,
                   help='weight of the replay of earlier classes\' features (0 = off)')
    t.add_argument('--g-prompt-training', choices=('first-task', 'every-task'), default=None,
                   help='G-prompt training')
    t.add_argument('--g-prompt-layers', type=_layer_list, default=None,
                   help="G-prompt layers, e.g. 5, or 'none' (default: the family default)")
    t.add_argument('--e-prompt-layers', type=_layer_list, default=None,
                   help='E-prompt layers, e.g. 6,7 (default: the family default)')
    t.add_argument('--train-cbp-block', type=_bool, default=None,
                   help='train the CBP block (false: it stays the identity)')
    t.add_argument('--cbp', type=_bool, default=None,
                   help='continual backpropagation on or off (fixed by cbpnet-nocbp, '
                   'cbpnet-paper and dualprompt)')
    t.add_argument('--key-steps', type=non_negative_int, default=None,
                   help=f'Adam steps of the pull constraint per E-prompt key at least '
                   f'(default {d.key_steps})')
    t.add_argument('--pull-constraint-coeff', type=non_negative_float, default=None,
                   help=f'weight of the key pull constraint (default '
                   f'{d.pull_constraint_coeff})')
    t.add_argument('--cbp-hidden-units', type=positive_int, default=None,
                   help=f'CBP block width (default {d.cbp_hidden_units})')
    t.add_argument('--cbp-replacement-rate', type=fraction, default=None,
                   help=f'default {d.cbp_replacement_rate}')
    t.add_argument('--cbp-maturity-threshold', type=non_negative_int, default=None,
                   help=f'default {d.cbp_maturity_threshold}')
    t.add_argument('--cbp-decay-rate', type=float, default=None,
                   help=f'utility decay in (0, 1) (default {d.cbp_decay_rate})')
    t.add_argument('--unknown-threshold', type=float, default=None,
                   help=f'novelty threshold (default {d.unknown_threshold}; <= 0 = off)')

    b = p.add_argument_group('baselines')
    b.add_argument('--baseline-query', choices=('prelogits', 'multilayer'), default='prelogits',
                   help="the baselines' frozen query: the backbone's pre-logits feature "
                   "(default) or CBPNet's multi-layer query")
    b.add_argument('--ncm-metric', choices=NCM_METRICS, default='cosine',
                   help='distance of the ncm baseline (default cosine)')
    # Defaults chosen on validation splits of digits and Fashion-MNIST (scripts/sweep.py).
    b.add_argument('--ranpac-dim', type=positive_int, default=5000,
                   help='random projection size of the ranpac baseline (default 5000)')
    b.add_argument('--ranpac-ridge', type=positive_float, default=0.1,
                   help='ridge of the ranpac baseline, relative to the mean Gram diagonal '
                   '(default 0.1)')

    o = p.add_argument_group('output')
    o.add_argument('--out', help='write the results JSON here')
    o.add_argument('--plot', help='write a plot (PNG) here')
    o.add_argument('--compare', nargs='+', metavar='JSON',
                   help='run nothing: print and plot (with --plot) earlier result files '
                   'together, one line per method')
    o.add_argument('--tag', default='',
                   help='text appended to the method labels of this run, e.g. "rate=1e-3", '
                   'to tell variants apart in --compare')
    o.add_argument('--resume', action='store_true',
                   help='with --out: keep the runs an earlier, killed job already wrote there '
                   '(same method, seed, options and code version) and run only the rest')
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


# ------------------------------------------------------------------------ running
def code_fingerprint() -> str:
    """Short hash of the learner, model and baseline sources, stored with every result.

    Results are only comparable when produced by the same algorithm code; other files
    (node, tools) do not change the numbers and are left out.
    """
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'learning')
    digest = hashlib.sha1()
    for rel in ('learner.py', 'learner_changes.py', 'snapshot.py', 'config.py', 'training.py',
                'baselines.py', 'frozen_runtime.py', 'image_resize.py', 'model/backbones.py',
                'model/cbp.py', 'model/learned_state.py', 'model/head.py', 'model/prompts.py',
                'model/statistics.py'):
        try:
            with open(os.path.join(root, rel), 'rb') as fh:
                digest.update(fh.read())
        except OSError:
            digest.update(rel.encode())
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------ main
def _load(spec: str, seed: int, args: argparse.Namespace, image_size: int) -> ImageDataset:
    data = load_dataset(spec, seed=seed, train_per_class=args.train_per_class,
                        test_per_class=args.test_per_class, image_size=image_size)
    if args.split == 'validation':
        data = validation_split(data, args.validation_fraction, seed)
    if args.count_ratio > 1:
        data = thin_classes(data, args.count_ratio, seed)
    return data


_NOT_OPTIONS = ('out', 'plot', 'compare', 'resume', 'quiet', 'seeds', 'seed', 'threads')


def run_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The options that decide a run's numbers (output and seed options left out)."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items()
                                  if k not in _NOT_OPTIONS}, default=str))


def _earlier_runs(args: argparse.Namespace) -> Dict[tuple, Dict[str, Any]]:
    """Finished runs in ``args.out`` that this job would repeat, keyed by (method, seed):
    same options and same algorithm code."""
    if not args.out or not os.path.exists(args.out):
        return {}
    try:
        runs = load_results([args.out])
    except ValueError:
        return {}
    options, version = run_options(args), code_fingerprint()
    return {(r['method'], r['seed']): r for r in runs
            if r.get('options') == options and r.get('code_version') == version}


def _tasks(args: argparse.Namespace, num_classes: int, parser: argparse.ArgumentParser
           ) -> tuple:
    """(tasks, held-out classes) of the incremental protocol."""
    unknown = args.unknown_classes
    taught = num_classes - unknown
    if unknown and taught < 1:
        parser.error(f'--unknown-classes {unknown} leaves no class of {num_classes} to teach')
    if not args.tasks:
        parser.error('--tasks is required for the incremental protocol')
    if args.tasks > taught:
        parser.error(f'--tasks {args.tasks} is more than the {taught} classes to teach')
    return split_tasks(taught, args.tasks), list(range(taught, num_classes))


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
        output_runs(runs, args)
        return 0
    if not args.dataset:
        parser.error('--dataset is required (or --compare FILE...)')
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
    if args.protocol == 'incremental':
        tasks, unknown = _tasks(args, num_classes, parser)
    elif num_classes < 2:
        parser.error('the lifetime protocol needs at least 2 classes')

    if args.protocol != 'incremental':
        plasticity = args.protocol == 'plasticity'
        args.lifetime_tasks = args.lifetime_tasks or (200 if plasticity else 50)
        args.lifetime_train_per_class = args.lifetime_train_per_class or (
            100 if plasticity else 30)
    runs: List[Dict[str, Any]] = []
    frozen: Dict[Any, Any] = {}  # the plasticity protocol's frozen inputs, per seed
    earlier = _earlier_runs(args) if args.resume else {}
    for seed in seeds:
        kept = [earlier.get((method, seed)) for method in args.method]
        if all(kept):
            runs.extend(kept)
            datasets.pop(seed, None)
            continue
        if seed not in datasets:
            try:
                datasets[seed] = _load(args.dataset, seed, args, image_size)
            except DatasetError as exc:
                parser.error(str(exc))
        data = datasets.pop(seed)
        frozen.clear()
        for method, done in zip(args.method, kept):
            if done:
                runs.append(done)
                continue
            config = learner_config(args, method, seed, image_size)
            try:
                if args.protocol == 'plasticity':
                    res = run_plasticity_method(method, data, config, backbone, args=args,
                                                cache=frozen, dataset=args.dataset,
                                                progress=not args.quiet)
                elif args.protocol == 'lifetime':
                    res = run_lifetime(
                        method, data, config, backbone, dataset=args.dataset, split=args.split,
                        num_tasks=args.lifetime_tasks,
                        train_per_class=args.lifetime_train_per_class,
                        test_per_class=args.lifetime_test_per_class, args=args,
                        progress=not args.quiet)
                else:
                    res = run_incremental(method, data, tasks, config, backbone,
                                          dataset=args.dataset, split=args.split,
                                          unknown=unknown, args=args, progress=not args.quiet)
            except LearningError as exc:
                print(f'{PROG}: error: {method} seed {seed}: {exc}', file=sys.stderr)
                return 1
            res['code_version'] = code_fingerprint()
            res['options'] = run_options(args)
            if args.tag:
                res['tag'] = args.tag
            res['label'] = run_label(res)
            runs.append(res)
            if not args.quiet:
                print(run_report(res), flush=True)
            if args.out and len(runs) < len(seeds) * len(args.method):
                # Long sweeps get killed on shared machines: keep what is finished so far.
                write_json(args.out, {'runs': runs, 'summary': summarize_runs(runs),
                                      'partial': True})
    output_runs(runs, args)
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
