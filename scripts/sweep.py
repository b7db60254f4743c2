#!/usr/bin/env python3
r"""Choose defaults on VALIDATION data: runs ``cbpnet-eval --split validation`` over a grid.

Every run carves a validation set out of the training images (``--validation-fraction``,
default 0.2 of each class) and never loads the test images, so nothing chosen here has seen
a test image. Each setting is one line of extra ``cbpnet-eval`` options; the script runs it
on every data set and seed, writes one result file per (data set, setting) under ``--out``
(``<out>/<dataset>/<setting>.json``; finished files are kept, so an interrupted sweep
resumes), and prints a table of mean validation accuracy per setting and data set, plus the
mean over data sets, best first.

Groups (``--groups``, default all):

- ``query``: which backbone layers form the frozen query (statistics-only prediction);
- ``shrinkage``: the LDA shrinkage;
- ``head``: the prompted head's weight in ``task`` prediction, against statistics only;
- ``cbp``: replacement rate x maturity of the CBP block in the learned recipe, on the
  lifetime stream (mean learning accuracy over its tasks);
- ``baselines``: the ranpac projection size and ridge, the lda shrinkage;
- ``keys``: steps of the pull constraint per E-prompt key in the paper recipe (the table
  also gives the task-selection accuracy, the share of frames whose selected E-prompt is
  their own task's);
- ``paper``: learning rate x epochs of the paper recipe (``cbpnet-paper``; ``dualprompt``, its
  CBP-off twin, is then run at the same setting, so CBP on and off are compared at one);
- ``spread``: the LDA's predictive spread (``scaled``, ``full``, ``none``) when class counts
  differ ten-fold (``--count-ratio 10``: every other class keeps a tenth of its images).

Example::

    python scripts/sweep.py --groups query,shrinkage --datasets digits,fashion-mnist \
        --seeds 0,1,2 --out results/sweep
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Dict, List

import numpy as np

from ros2_cbpnet.tools.evaluate import main as evaluate

LEARNED = '--prediction task --head-weight 1'
LIFETIME = f'--protocol lifetime {LEARNED}'
GROUPS: Dict[str, Dict[str, str]] = {
    'query': {
        'query=prelogits': '--query-layers prelogits',
        'query=6,7': '--query-layers 6,7',
        'query=5-7': '--query-layers 5,6,7',
        'query=4-7': '--query-layers 4,5,6,7',
        'query=3-7': '--query-layers 3,4,5,6,7',
        'query=2-7': '--query-layers 2,3,4,5,6,7',
    },
    'shrinkage': {f'shrinkage={a}': f'--lda-shrinkage {a}' for a in (0.05, 0.1, 0.2, 0.3, 0.5)},
    'head': {
        'stats only': '--prediction stats',
        **{f'task, head weight {w}': f'--prediction task --head-weight {w}'
           for w in (0.3, 1, 3)},
        'task, head alone (weight 100)': '--prediction task --head-weight 100',
    },
    'cbp': {
        'lifetime, CBP off': f'{LIFETIME} --cbp false',
        **{f'lifetime, rate {r}, maturity {m}':
           f'{LIFETIME} --cbp-replacement-rate {r} --cbp-maturity-threshold {m}'
           for r in (1e-3, 1e-2) for m in (20, 100)},
    },
    'keys': {f'paper recipe, key steps {k}': f'--method cbpnet-paper --key-steps {k}'
             for k in (0, 100, 300, 1000, 3000)},
    'paper': {f'paper recipe, lr {lr}, {e} epochs': f'--method cbpnet-paper --lr {lr} '
              f'--epochs {e}' for lr in (0.002, 0.01, 0.03) for e in (5, 20)},
    'spread': {f'spread {m}, counts 10:1': f'--lda-spread {m} --count-ratio 10'
               for m in ('scaled', 'full', 'none')},
    'baselines': {
        **{f'ranpac dim {d} ridge {r}': f'--method ranpac --ranpac-dim {d} --ranpac-ridge {r}'
           for d in (2000, 5000) for r in (0.01, 0.1, 1.0)},
        **{f'lda shrinkage {a}': f'--method lda --lda-shrinkage {a}'
           for a in (0.05, 0.1, 0.2, 0.4)},
    },
}


def _dataset_args(name: str, train_per_class: int) -> List[str]:
    if name == 'fashion-mnist':
        return ['--dataset', name, '--train-per-class', str(train_per_class)]
    return ['--dataset', name]


def _finished(path: str) -> bool:
    """A result file written to the end (an interrupted run leaves ``"partial": true``)."""
    try:
        with open(path, encoding='utf-8') as fh:
            return not json.load(fh).get('partial', False)
    except (OSError, ValueError):
        return False


def main(argv: List[str] | None = None) -> int:
    """Run the sweep; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--groups', default=','.join(GROUPS),
                   help=f'comma-separated of {",".join(GROUPS)}')
    p.add_argument('--datasets', default='digits,fashion-mnist')
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--tasks', type=int, default=5)
    p.add_argument('--train-per-class', type=int, default=200,
                   help='Fashion-MNIST training images per class before the validation split')
    p.add_argument('--validation-fraction', type=float, default=0.2)
    p.add_argument('--out', default='results/sweep')
    p.add_argument('--extra', default='', help='options added to every run')
    args = p.parse_args(argv)
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    selection: Dict[str, Dict[str, Dict[str, float]]] = {}
    for group in args.groups.split(','):
        for name, options in GROUPS[group].items():
            for dataset in args.datasets.split(','):
                path = os.path.join(args.out, dataset, f'{name}.json'.replace(' ', '_')
                                    .replace('/', '_').replace(',', '_'))
                if not _finished(path):
                    extra = shlex.split(options) + shlex.split(args.extra)
                    if '--method' not in extra:
                        extra += ['--method', 'cbpnet']

                    if '--protocol' not in extra:
                        extra += ['--tasks', str(args.tasks)]
                    evaluate(_dataset_args(dataset, args.train_per_class) + [
                        '--seeds', args.seeds,
                        '--split', 'validation',
                        '--validation-fraction', str(args.validation_fraction),
                        '--quiet', '--out', path] + extra)
                with open(path, encoding='utf-8') as fh:
                    result = json.load(fh)
                runs = result.get('runs', [result])
                assert all(r.get('split') == 'validation' for r in runs), path
                # Incremental runs: average accuracy; lifetime runs: learning accuracy.
                table.setdefault(group, {}).setdefault(name, {})[dataset] = float(np.mean(
                    [r.get('average_accuracy', r['learning_accuracy']) for r in runs]))
                if all('mean_task_selection_accuracy' in r for r in runs):
                    selection.setdefault(group, {}).setdefault(name, {})[dataset] = float(
                        np.mean([r['mean_task_selection_accuracy'] for r in runs]))
    datasets = args.datasets.split(',')
    print(f'\nValidation split ({args.validation_fraction:.0%} of each class\'s training '
          f'images; test images never loaded), seeds {args.seeds}; mean average accuracy % '
          '(lifetime rows: mean learning accuracy %):\n')
    for group, rows in table.items():
        print(f'\n{group}:\n')
        print('| setting | ' + ' | '.join(datasets) + ' | mean |')
        print('|---|' + '---|' * (len(datasets) + 1))
        for name, values in sorted(rows.items(), key=lambda kv: -np.mean(list(kv[1].values()))):
            picked = selection.get(group, {}).get(name, {})
            cells = [(f'{100 * values[d]:.2f}' + (f' (selection {100 * picked[d]:.1f})'
                                                  if d in picked else ''))
                     if d in values else '-' for d in datasets]
            mean = 100 * np.mean(list(values.values()))
            print(f'| {name} | ' + ' | '.join(cells) + f' | {mean:.2f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
