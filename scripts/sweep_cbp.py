#!/usr/bin/env python3
r"""Sweep of CBP and prompt-placement settings around the learner's defaults (resumable).

One-factor-at-a-time design: every setting changes one thing (or, in the ``rate_maturity``
group, the pair replacement rate x maturity threshold) from the current
:class:`~ros2_cbpnet.learner.LearnerConfig` defaults, so the cost grows with the number of
values, not their product. ``rate=0`` never replaces a unit, which is exactly the
``dualprompt`` baseline; every row also gets its paired difference to that baseline on the
same seeds (same data, same initial block), and to the default setting, which is far less
noisy than comparing means.

Groups, in the default priority order:

- ``rate_maturity``: replacement rate {0, 1e-4, 1e-3, 1e-2} x maturity {10, 50, 200}
- ``hidden``: CBP block width {32, 128} (64 is the default)
- ``prompts``: E-prompt layers {[7], [5,6,7]} (default [6,7]); no G-prompt (default [5])
- ``optim``: learning rate {0.003, 0.03} (default 0.01); epochs {3, 10} (default 5)
- ``drift``: the learner's drift control off one at a time: no feature replay; G-prompt
  trained on every task

Each finished (data set, setting, seed) run is appended to ``<out>_runs.jsonl`` at once, so
an interrupted sweep resumes where it stopped (runs already there are skipped). Every run
records ``code_version``, a hash of the learner/model sources; runs of other code versions
are left out of the table and redone (numbers of different algorithms must not be mixed),
unless ``--any-code-version``. The table
(``<out>.csv``, ``<out>.json``, ``<out>.md``) is rebuilt from that file after every run and
printed as markdown at the end. ``--max-minutes`` stops starting new runs after a budget.

Example (the order is the priority: rate x maturity on digits, then on Fashion-MNIST, ...)::

    python scripts/sweep_cbp.py --datasets digits,fashion-mnist --seeds 0,1,2 \\
        --train-per-class 200 --max-minutes 40
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ros2_cbpnet.datasets import DatasetError, ImageDataset, load_dataset, split_tasks
from ros2_cbpnet.learner import LearnerConfig
from ros2_cbpnet.model.backbones import EMBEDDED_BACKBONE, load_backbone
from ros2_cbpnet.tools.evaluate import code_fingerprint, run_method

GROUPS = ('rate_maturity', 'hidden', 'prompts', 'optim', 'drift')
BASELINE = 'rate=0 (dualprompt)'
METRICS = ('average_accuracy', 'learning_accuracy', 'forgetting')


def settings(group: str, default: LearnerConfig) -> List[Tuple[str, Dict[str, Any]]]:
    """(name, LearnerConfig overrides) of one group; names are unique across groups."""
    if group == 'rate_maturity':
        out: List[Tuple[str, Dict[str, Any]]] = [(BASELINE, {'cbp_replacement_rate': 0.0})]
        for rate in (1e-4, 1e-3, 1e-2):
            for maturity in (10, 50, 200):
                out.append((f'rate={rate:g} mat={maturity}',
                            {'cbp_replacement_rate': rate,
                             'cbp_maturity_threshold': maturity}))
        return out
    if group == 'hidden':
        return [(f'hidden={h}', {'cbp_hidden_units': h}) for h in (32, 128)
                if h != default.cbp_hidden_units]
    if group == 'prompts':
        return [('E=[7]', {'e_prompt_layers': [7]}),
                ('E=[5,6,7]', {'e_prompt_layers': [5, 6, 7]}),
                ('G=none', {'g_prompt_layers': [-1]})]
    if group == 'drift':
        return [('replay=0', {'feature_replay_coeff': 0.0}),
                ('G every task', {'g_prompt_first_task_only': False})]
    if group == 'optim':
        return [(f'lr={lr:g}', {'learning_rate': lr}) for lr in (0.003, 0.03)] + \
               [(f'epochs={e}', {'epochs': e}) for e in (3, 10)]
    raise ValueError(f'unknown group {group!r}; choose from {GROUPS}')


def default_name(default: LearnerConfig) -> str:
    """Name the ``rate_maturity`` grid gives the default configuration."""
    return f'rate={default.cbp_replacement_rate:g} mat={default.cbp_maturity_threshold}'


def _csv_list(text: str) -> List[str]:
    return [s.strip() for s in text.split(',') if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the sweep."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--datasets', type=_csv_list, default=['digits', 'fashion-mnist'])
    p.add_argument('--seeds', type=lambda s: [int(x) for x in _csv_list(s)], default=[0, 1, 2])
    p.add_argument('--groups', type=_csv_list, default=list(GROUPS),
                   help=f'comma-separated, in priority order (default {",".join(GROUPS)})')
    p.add_argument('--tasks', type=int, default=5)
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--train-per-class', type=int, default=200,
                   help='subsample Fashion-MNIST training images per class (digits: all)')
    p.add_argument('--test-per-class', type=int, default=100,
                   help='subsample Fashion-MNIST test images per class (digits: all)')
    p.add_argument('--backbone', default=EMBEDDED_BACKBONE)
    p.add_argument('--backbone-checkpoint', default='')
    p.add_argument('--out', default='results/sweep_cbp', help='output path prefix')
    p.add_argument('--max-minutes', type=float, default=0.0,
                   help='start no new run after this many minutes (0 = no limit)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--any-code-version', action='store_true',
                   help='keep runs made by other learner/model code (default: redo them)')
    p.add_argument('--list', action='store_true', help='print the planned runs and exit')
    p.add_argument('--table-only', action='store_true',
                   help='rebuild and print the table from the runs file, run nothing')
    return p


def plan(args: argparse.Namespace, default: LearnerConfig
         ) -> Iterator[Tuple[str, str, str, Dict[str, Any], int]]:
    """(group, data set, setting, overrides, seed) in priority order: group, then data set."""
    for group in args.groups:
        for dataset in args.datasets:
            for name, overrides in settings(group, default):
                for seed in args.seeds:
                    yield group, dataset, name, overrides, seed


def read_runs(path: str) -> List[Dict[str, Any]]:
    """Finished runs of the JSONL file (a torn last line from a kill is ignored)."""
    runs = []
    if os.path.exists(path):
        with open(path, encoding='utf-8') as fh:
            for line in fh:
                try:
                    runs.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return runs


def _stat(values: Sequence[float]) -> Tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def table(runs: Sequence[Dict[str, Any]], default: str) -> List[Dict[str, Any]]:
    """One row per (data set, setting): mean and sample std over seeds.

    Each row also gets the paired difference of average accuracy (same seeds) to the
    ``rate=0`` baseline and to the ``default`` setting.
    """
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r['dataset'], r['setting']), []).append(r)
    rows = []
    for (dataset, setting), rs in groups.items():
        row: Dict[str, Any] = {'dataset': dataset, 'group': rs[0]['group'],
                               'setting': setting, 'seeds': len(rs)}
        for m in METRICS:
            row[f'{m}_mean'], row[f'{m}_std'] = _stat([r[m] for r in rs])
        row['replaced_units_mean'] = float(np.mean([r['replaced_units'] for r in rs]))
        row['train_seconds_mean'] = float(np.mean([r['train_seconds'] for r in rs]))
        for tag, ref in (('rate0', BASELINE), ('default', default)):
            base = {r['seed']: r for r in groups.get((dataset, ref), [])}
            diffs = [r['average_accuracy'] - base[r['seed']]['average_accuracy']
                     for r in rs if r['seed'] in base]
            row[f'delta_vs_{tag}_mean'], row[f'delta_vs_{tag}_std'] = \
                _stat(diffs) if diffs else (float('nan'), float('nan'))
            row[f'delta_vs_{tag}_seeds'] = len(diffs)
        rows.append(row)
    order = {g: i for i, g in enumerate(GROUPS)}
    rows.sort(key=lambda r: (r['dataset'], order.get(r['group'], 99)))
    return rows


def markdown(rows: Sequence[Dict[str, Any]], default: str) -> str:
    """The table as markdown, percentages, mean ± sample std over seeds (paired deltas)."""
    lines = ['| dataset | setting | seeds | avg acc % | learning acc % | forgetting % | '
             'Δ avg acc vs rate=0 | Δ avg acc vs default | replaced/run | train s |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        name = r['setting'] + (' (default)' if r['setting'] == default else '')

        def pm(m: str) -> str:
            return f'{100 * r[m + "_mean"]:.1f} ± {100 * r[m + "_std"]:.1f}'

        def delta(tag: str, ref: str) -> str:
            if r['setting'] == ref or not r[f'delta_vs_{tag}_seeds']:
                return '-'
            return (f'{100 * r[f"delta_vs_{tag}_mean"]:+.1f} ± '
                    f'{100 * r[f"delta_vs_{tag}_std"]:.1f}')

        lines.append(f'| {r["dataset"]} | {name} | {r["seeds"]} | {pm("average_accuracy")} '
                     f'| {pm("learning_accuracy")} | {pm("forgetting")} '
                     f'| {delta("rate0", BASELINE)} | {delta("default", default)} '
                     f'| {r["replaced_units_mean"]:.0f} | {r["train_seconds_mean"]:.1f} |')
    return '\n'.join(lines)


def write_table(runs: Sequence[Dict[str, Any]], out: str, default: str) -> str:
    """Write ``<out>.csv``, ``<out>.json`` and ``<out>.md``; return the markdown."""
    rows = table(runs, default)
    md = markdown(rows, default)
    with open(f'{out}.json', 'w', encoding='utf-8') as fh:
        json.dump(rows, fh, indent=1)
    if rows:
        with open(f'{out}.csv', 'w', newline='', encoding='utf-8') as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with open(f'{out}.md', 'w', encoding='utf-8') as fh:
        fh.write(md + '\n')
    return md


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the planned settings that are not in the runs file yet."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    for g in args.groups:
        if g not in GROUPS:
            print(f'unknown group {g!r}; choose from {", ".join(GROUPS)}', file=sys.stderr)
            return 2
    default = LearnerConfig(image_size=args.image_size, backbone=args.backbone,
                            backbone_checkpoint=args.backbone_checkpoint, device='cpu')
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    runs_path = f'{args.out}_runs.jsonl'
    runs = read_runs(runs_path)
    version = code_fingerprint()
    if not args.any_code_version:
        stale = [r for r in runs if r.get('code_version') != version]
        if stale:
            print(f'ignoring {len(stale)} runs made by other learner/model code '
                  f'(this code: {version})', file=sys.stderr)
        runs = [r for r in runs if r.get('code_version') == version]
    done = {(r['dataset'], r['setting'], r['seed']) for r in runs}
    todo = [p for p in plan(args, default) if (p[1], p[2], p[4]) not in done]
    if args.list or args.table_only:
        if args.list:
            for group, dataset, name, overrides, seed in todo:
                print(f'{group:14s} {dataset:14s} {name:24s} seed {seed}  {overrides}')
            print(f'{len(todo)} runs to do, {len(done)} done')
        else:
            print(write_table(runs, args.out, default_name(default)))
        return 0
    backbone = load_backbone(args.backbone, args.backbone_checkpoint,
                             image_size=args.image_size)
    data: Dict[Tuple[str, int], ImageDataset] = {}
    started = time.monotonic()
    for k, (group, dataset, name, overrides, seed) in enumerate(todo):
        elapsed = (time.monotonic() - started) / 60
        if args.max_minutes and elapsed > args.max_minutes:
            print(f'budget of {args.max_minutes} min used; {len(todo) - k} runs left '
                  '(run again to resume)', flush=True)
            break
        if (dataset, seed) not in data:
            builtin_small = dataset == 'digits'
            try:
                data[(dataset, seed)] = load_dataset(
                    dataset, seed=seed, image_size=args.image_size,
                    train_per_class=None if builtin_small else args.train_per_class,
                    test_per_class=None if builtin_small else args.test_per_class)
            except DatasetError as exc:
                print(f'{dataset}: {exc}', file=sys.stderr)
                return 2
        ds = data[(dataset, seed)]
        config = default.replace(seed=seed, **overrides)
        res = run_method('cbpnet', ds, split_tasks(ds.num_classes, args.tasks), config,
                         backbone, dataset=dataset, progress=False)
        res.update(group=group, setting=name, overrides=overrides)
        with open(runs_path, 'a', encoding='utf-8') as fh:
            fh.write(json.dumps(res) + '\n')
        runs.append(res)
        print(f'[{k + 1}/{len(todo)} {elapsed:5.1f} min] {dataset} {name} seed {seed}: '
              f'avg {100 * res["average_accuracy"]:.1f} learn '
              f'{100 * res["learning_accuracy"]:.1f} forget {100 * res["forgetting"]:.1f} '
              f'replaced {res["replaced_units"]} ({res["train_seconds"]:.0f} s)', flush=True)
        write_table(runs, args.out, default_name(default))
    print(write_table(runs, args.out, default_name(default)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
