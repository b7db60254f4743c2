"""Summaries, tables, plots and result files of ``cbpnet-eval`` runs (no ROS)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from ..learning.metrics import format_matrix
from .eval_methods import LEARNER_METHODS

__all__ = ['EXTRA_METRICS', 'METRICS', 'format_summary', 'load_results', 'output_runs',
           'run_label', 'run_report', 'summarize_runs', 'write_json']

METRICS = ('average_accuracy', 'forgetting', 'learning_accuracy')
#: Extra metrics summarised when present (open world, lifetime, plasticity).
EXTRA_METRICS = ('unknown_auroc', 'known_rejected_rate', 'unknown_rejected_rate',
                 'mahalanobis_auroc', 'mahalanobis_query_auroc', 'first10_learning_accuracy',
                 'last10_learning_accuracy', 'last10_dormant_fraction',
                 'last10_dormant_fraction_zero', 'last10_effective_rank',
                 'mean_task_selection_accuracy')


def run_label(result: Dict[str, Any]) -> str:
    """Display name of a run: the method, the baselines' multi-layer query, the ``tag``."""
    label = str(result.get('method', '?'))
    config = result.get('config') or {}
    if label not in LEARNER_METHODS and config.get('query_layers'):
        label = f'{label} (multi-layer)'
    return f'{label} [{result["tag"]}]' if result.get('tag') else label


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
        for m in METRICS + EXTRA_METRICS + ('train_seconds', 'replaced_units'):
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                entry[m] = _mean_std(vals)
        shapes = {len(r['acc_matrix']) for r in rs if 'acc_matrix' in r}
        if len(shapes) == 1 and all('acc_matrix' in r for r in rs):
            n = shapes.pop()
            entry['acc_matrix'] = [[float(np.mean([r['acc_matrix'][i][j] for r in rs]))
                                    for j in range(i + 1)] for i in range(n)]
            diag = [[r['acc_matrix'][i][i] for r in rs] for i in range(n)]
            entry['task_learning_accuracy'] = [_mean_std(v) for v in diag]
        if all('lifetime' in r for r in rs):
            n = min(len(r['lifetime']) for r in rs)
            entry['lifetime'] = {key: [float(np.mean([r['lifetime'][i][key] for r in rs]))
                                       for i in range(n)]
                                 for key in ('learning_accuracy', 'dormant_fraction',
                                             'dormant_fraction_zero', 'effective_rank')
                                 if all(key in r['lifetime'][0] for r in rs)}
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
    if all('lifetime' in e for e in summary.values()):
        lines = ['| method | runs | learning acc % (all tasks) | first 10 tasks % | '
                 'last 10 tasks % | dormant, last 10 (zero on >= 99 % / utility) | '
                 'effective rank, last 10 | replaced | train s |',
                 '|---|---|---|---|---|---|---|---|---|']
        for key, e in summary.items():
            lines.append(
                f'| {key} | {e["runs"]} | {_pm(e, "learning_accuracy")} | '
                f'{_pm(e, "first10_learning_accuracy")} | {_pm(e, "last10_learning_accuracy")}'
                f' | {_pm(e, "last10_dormant_fraction_zero", 1, 2)} / '
                f'{_pm(e, "last10_dormant_fraction", 1, 2)} | '
                f'{_pm(e, "last10_effective_rank", 1, 2)} | {_pm(e, "replaced_units", 1, 0)} | '
                f'{_pm(e, "train_seconds", 1, 1)} |')
        return '\n'.join(lines)
    lines = ['| method | runs | avg acc % | forgetting % | learning acc % | '
             'last-2 learning acc % | task selection % | replaced | train s | '
             'trainable params |', '|---|---|---|---|---|---|---|---|---|---|']
    for key, e in summary.items():
        last2 = '-'
        tla = e.get('task_learning_accuracy')
        if tla:
            last2 = ' / '.join(f'{100 * s["mean"]:.1f}' for s in tla[-2:])
        lines.append(
            f'| {key} | {e["runs"]} | {_pm(e, "average_accuracy")} | {_pm(e, "forgetting")} '
            f'| {_pm(e, "learning_accuracy")} | {last2} | '
            f'{_pm(e, "mean_task_selection_accuracy")} | {_pm(e, "replaced_units", 1, 0)} '
            f'| {_pm(e, "train_seconds", 1, 1)} | {e.get("trainable_params")} |')
    if any('unknown_auroc' in e or 'mahalanobis_auroc' in e for e in summary.values()):
        lines += ['', '| method | novelty AUROC | Mahalanobis AUROC, pre-logits / same query '
                  '| taught frames called unknown % | untaught frames called unknown % |',
                  '|---|---|---|---|---|']
        for key, e in summary.items():
            lines.append(f'| {key} | {_pm(e, "unknown_auroc", 1, 3)} | '
                         f'{_pm(e, "mahalanobis_auroc", 1, 3)} / '
                         f'{_pm(e, "mahalanobis_query_auroc", 1, 3)} | '
                         f'{_pm(e, "known_rejected_rate")} | {_pm(e, "unknown_rejected_rate")} |')
    return '\n'.join(lines)


def run_report(res: Dict[str, Any]) -> str:
    """The readable report of one run: its accuracy matrix and a summary line."""
    if res.get('protocol') in ('lifetime', 'plasticity'):
        return (f'== {res["label"]} | {res["dataset"]} ({res.get("split", "test")}) | seed '
                f'{res["seed"]} | {res["protocol"]} stream of {res["tasks"]} tasks ==\n'
                f'learning accuracy {100 * res["learning_accuracy"]:.1f}% (first 10 tasks '
                f'{100 * res["first10_learning_accuracy"]:.1f}%, last 10 '
                f'{100 * res["last10_learning_accuracy"]:.1f}%), replaced units '
                f'{res["replaced_units"]}, train {res["train_seconds"]:.1f} s')
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
                 and ('acc_matrix' in r or 'lifetime' in r)] if isinstance(items, list) else []
        if not found:
            raise ValueError(f'{path}: no result with "method" and "acc_matrix" (or '
                             '"lifetime") in it')
        runs.extend(found)
    return runs


def _plot(runs: Sequence[Dict[str, Any]], path: str) -> None:
    from ..learning.plotting import plot_accuracy_curves, plot_lifetime

    summary = summarize_runs(runs)
    if all('lifetime' in e for e in summary.values()):
        plot_lifetime({key: e['lifetime'] for key, e in summary.items()}, path)
        return
    curves = []
    for key, e in summary.items():
        if 'acc_matrix' not in e:
            continue
        label = key if e['runs'] == 1 else f'{key} (mean of {e["runs"]})'
        curves.append({'method': label, 'acc_matrix': e['acc_matrix'],
                       'dataset': e.get('dataset')})
    plot_accuracy_curves(curves, path)


def write_json(path: str, payload: Any) -> None:
    """Write ``payload`` atomically (temporary file, then rename)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as fh:
        json.dump(payload, fh, indent=1)
        fh.write('\n')
    os.replace(tmp, path)


def output_runs(runs: List[Dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the summary table; write ``--out`` and ``--plot`` when asked."""
    summary = summarize_runs(runs)
    print('\nSummary (percent; mean ± sample std over seeds):')
    print(format_summary(summary))
    if args.out:
        payload: Any = runs[0] if len(runs) == 1 else {'runs': runs, 'summary': summary}
        write_json(args.out, payload)
        print(f'results written to {args.out}')
    if args.plot:
        _plot(runs, args.plot)
        print(f'plot written to {args.plot}')
