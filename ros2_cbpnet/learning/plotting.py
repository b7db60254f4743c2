"""Accuracy plots for class-incremental runs (no ROS; matplotlib imported lazily).

matplotlib is imported inside the function and drawn through its Agg canvas directly, never
through ``pyplot``: no global backend switch, no display needed, and it is safe to call from a
ROS executor thread.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from .metrics import lower_triangle

__all__ = ['plot_accuracy_curves', 'plot_lifetime']


def _running_average(acc: list[list[float]]) -> list[float]:
    """Average accuracy over the tasks seen so far, after each task, in percent."""
    return [100.0 * float(np.mean(row)) for row in acc]


def plot_accuracy_curves(results: Sequence[dict[str, Any]], path: str,
                         title: str | None = None) -> str:
    """Plot average accuracy over seen tasks versus the number of tasks learnt.

    One line per result, labelled by its method. With a single result a second panel shows its
    accuracy matrix as an annotated heat map.

    Args:
        results: Dicts with ``'method'`` (str) and ``'acc_matrix'`` (see
            :mod:`ros2_cbpnet.learning.metrics`); an optional ``'dataset'`` is used in the default
            title, other keys (e.g. ``'std'``) are ignored.
        path: Output PNG path; missing parent folders are created.
        title: Figure title; defaults to the data set name(s) if given.

    Returns:
        ``path``.

    Raises:
        ValueError: No results, a result without ``'method'`` or ``'acc_matrix'``, or a bad
            accuracy matrix.
    """
    if not results:
        raise ValueError('plot_accuracy_curves needs at least one result')
    curves = []
    for k, res in enumerate(results):
        if 'method' not in res or 'acc_matrix' not in res:
            raise ValueError(f"result {k} needs keys 'method' and 'acc_matrix', "
                             f'has {sorted(res)}')
        curves.append((str(res['method']), lower_triangle(res['acc_matrix'])))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    single = len(curves) == 1
    fig = Figure(figsize=(8, 3.5) if single else (6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1) if single else fig.add_subplot(1, 1, 1)
    max_tasks = 1
    for method, acc in curves:
        x = np.arange(1, len(acc) + 1)
        ax.plot(x, _running_average(acc), marker='o', label=method)
        max_tasks = max(max_tasks, len(acc))
    ax.set_xlabel('tasks learnt')
    ax.set_ylabel('avg. accuracy on seen tasks (%)')
    ax.set_xticks(np.arange(1, max_tasks + 1))
    ax.set_xlim(0.7, max_tasks + 0.3)
    ax.set_ylim(0, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(loc='lower left', fontsize='small')

    if single:
        method, acc = curves[0]
        n = len(acc)
        grid = np.full((n, n), np.nan)
        for i, row in enumerate(acc):
            grid[i, :i + 1] = 100.0 * np.asarray(row)
        hm = fig.add_subplot(1, 2, 2)
        image = hm.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=100, cmap='viridis')
        # Keep the annotations legible on 10+ tasks without overlapping.
        size = 8 if n <= 6 else max(4, 8 - (n - 6) // 2)
        for i in range(n):
            for j in range(i + 1):
                v = grid[i, j]
                hm.text(j, i, f'{v:.0f}', ha='center', va='center', fontsize=size,
                        color='black' if v > 60 else 'white')
        hm.set_xticks(range(n), [str(j + 1) for j in range(n)])
        hm.set_yticks(range(n), [str(i + 1) for i in range(n)])
        hm.set_xlabel('accuracy on task')
        hm.set_ylabel('after learning task')
        hm.set_title(f'{method}: accuracy (%)', fontsize='medium')
        fig.colorbar(image, ax=hm, fraction=0.046, pad=0.04)

    if title is None:
        datasets = sorted({str(r['dataset']) for r in results if r.get('dataset')})
        title = ', '.join(datasets) if datasets else None
    return _save(fig, path, title)


def _save(fig: Any, path: str, title: str | None) -> str:
    """Title, tight layout, and the PNG written (missing parent folders created)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format='png')
    return path


def plot_lifetime(curves: dict[str, dict[str, Sequence[float]]], path: str,
                  title: str | None = 'robot lifetime: one new pair of classes per task',
                  window: int = 5) -> str:
    """Plot a lifetime stream: learning accuracy per task (and its moving average), and the
    CBP block's dormant fraction and effective rank where present.

    Args:
        curves: label -> ``{'learning_accuracy': [...], 'dormant_fraction': [...],
            'dormant_fraction_zero': [...], 'effective_rank': [...]}`` (all but the first
            optional), one value per task.
        path: output PNG path; missing parent folders are created.
        title: figure title.
        window: tasks in the moving average drawn over the learning accuracy.

    Returns:
        ``path``.
    """
    if not curves:
        raise ValueError('plot_lifetime needs at least one curve')
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = ['learning_accuracy'] + [k for k in ('dormant_fraction_zero', 'dormant_fraction',
                                                  'effective_rank')
                                      if any(k in c for c in curves.values())]
    names = {'learning_accuracy': 'learning accuracy (%)',
             'dormant_fraction_zero': 'dormant units (zero on >= 99% of inputs)',
             'dormant_fraction': 'dormant units (utility <= 1% of mean)',
             'effective_rank': 'effective rank of hidden units'}
    fig = Figure(figsize=(4.2 * len(panels), 3.5), dpi=100)
    FigureCanvasAgg(fig)
    for k, key in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for label, c in curves.items():
            if key not in c:
                continue
            y = np.asarray(c[key], dtype=float) * (100.0 if key == 'learning_accuracy' else 1)
            x = np.arange(1, len(y) + 1)
            if key == 'learning_accuracy' and len(y) >= window:
                line, = ax.plot(x, y, alpha=0.25, linewidth=0.8)
                smooth = np.convolve(y, np.ones(window) / window, mode='valid')
                ax.plot(x[window - 1:], smooth, color=line.get_color(), label=label)
            else:
                ax.plot(x, y, label=label)
        ax.set_xlabel('task')
        ax.set_ylabel(names[key])
        ax.grid(True, alpha=0.3)
        if k == 0:
            ax.legend(loc='lower left', fontsize='small')
    return _save(fig, path, title)
