"""Class-incremental learning metrics over an accuracy matrix (no ROS, numpy only).

``acc[i][j]`` is the test accuracy, as a fraction in ``[0, 1]``, on the classes of task ``j``
measured right after learning task ``i`` (``j <= i``). Two layouts are accepted, also mixed
row by row: a lower triangle (row ``i`` has ``i + 1`` entries) or a square ``T x T`` matrix
whose entries with ``j > i`` are ignored (typically ``None`` or ``NaN``). A numpy array works
as well as a list of lists.

With ``L = T - 1`` the index of the last task, the metrics follow the DualPrompt / L2P papers:

* average accuracy ``A_T = mean_{j <= L} acc[L][j]``
* forgetting ``F_T = mean_{j < L} (max_{j <= i < L} acc[i][j] - acc[L][j])`` (0 for one task;
  negative values mean backward transfer and are kept as such)
* learning accuracy ``mean_i acc[i][i]``: how well each new task is learnt (plasticity).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    'average_accuracy',
    'effective_rank',
    'forgetting',
    'format_matrix',
    'prediction_accuracy',
    'learning_accuracy',
    'lower_triangle',
    'summarize',
]

# Accuracies a little above 1 can come from float sums; anything beyond is a unit mistake.
_TOLERANCE = 1e-6


def lower_triangle(acc_matrix: Any) -> list[list[float]]:
    """Validate ``acc_matrix`` and return its lower triangle as floats."""
    if isinstance(acc_matrix, np.ndarray):
        if acc_matrix.ndim != 2:
            raise ValueError(f'accuracy matrix must be 2-D, got shape {acc_matrix.shape}')
        acc_matrix = acc_matrix.tolist()
    if acc_matrix is None or isinstance(acc_matrix, (str, bytes)):
        raise ValueError(f'accuracy matrix must be a list of rows, got {acc_matrix!r}')
    rows = list(acc_matrix)
    if not rows:
        raise ValueError('accuracy matrix is empty')
    num_tasks = len(rows)
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)):
            raise ValueError(f'row {i} of the accuracy matrix is not a sequence: {row!r}')
        if len(row) not in (i + 1, num_tasks):
            expected = f'{i + 1}' if i + 1 == num_tasks else f'{i + 1} or {num_tasks}'
            raise ValueError(f'ragged accuracy matrix: row {i} has {len(row)} entries, '
                             f'expected {expected}')
        values = []
        for j in range(i + 1):
            v = row[j]
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f'acc[{i}][{j}] must be a number, got {v!r}') from None
            if not math.isfinite(f):
                raise ValueError(f'acc[{i}][{j}] must be finite (tasks j <= i are all '
                                 f'evaluated), got {v!r}')
            if not -_TOLERANCE <= f <= 1 + _TOLERANCE:
                raise ValueError(f'acc[{i}][{j}] = {f} is outside [0, 1]; accuracies are '
                                 'fractions, not percentages')
            values.append(f)
        out.append(values)
    return out


def average_accuracy(acc_matrix: Any) -> float:
    """Mean accuracy over all tasks after learning the last one.

    Args:
        acc_matrix: Accuracy matrix (see the module docstring).

    Returns:
        ``mean_j acc[T-1][j]`` as a fraction.

    Raises:
        ValueError: Empty, ragged or non-numeric matrix.
    """
    return float(np.mean(lower_triangle(acc_matrix)[-1]))


def forgetting(acc_matrix: Any) -> float:
    """Average drop from each old task's best accuracy to its final accuracy.

    Args:
        acc_matrix: Accuracy matrix (see the module docstring).

    Returns:
        Mean over tasks ``j < T-1`` of ``max_{j <= i < T-1} acc[i][j] - acc[T-1][j]``;
        ``0.0`` when there is only one task.

    Raises:
        ValueError: Empty, ragged or non-numeric matrix.
    """
    acc = lower_triangle(acc_matrix)
    last = len(acc) - 1
    if last == 0:
        return 0.0
    drops = [max(acc[i][j] for i in range(j, last)) - acc[last][j] for j in range(last)]
    return float(np.mean(drops))


def learning_accuracy(acc_matrix: Any) -> float:
    """Mean accuracy on each task right after learning it (plasticity).

    Args:
        acc_matrix: Accuracy matrix (see the module docstring).

    Returns:
        ``mean_i acc[i][i]`` as a fraction.

    Raises:
        ValueError: Empty, ragged or non-numeric matrix.
    """
    acc = lower_triangle(acc_matrix)
    return float(np.mean([acc[i][i] for i in range(len(acc))]))


def summarize(acc_matrix: Any) -> dict[str, float]:
    """All three metrics at once.

    Args:
        acc_matrix: Accuracy matrix (see the module docstring).

    Returns:
        ``{'average_accuracy': ..., 'forgetting': ..., 'learning_accuracy': ...}`` (fractions).

    Raises:
        ValueError: Empty, ragged or non-numeric matrix.
    """
    acc = lower_triangle(acc_matrix)
    return {
        'average_accuracy': average_accuracy(acc),
        'forgetting': forgetting(acc),
        'learning_accuracy': learning_accuracy(acc),
    }


def format_matrix(acc_matrix: Any, task_names: list[str] | None = None) -> str:
    """Render the accuracy matrix as a fixed-width text table in percent.

    Rows are "after learning task i", columns "accuracy on task j"; cells with ``j > i`` show
    ``-``.

    Args:
        acc_matrix: Accuracy matrix (see the module docstring).
        task_names: One name per task; defaults to ``T1 .. Tn``.

    Returns:
        A multi-line string without a trailing newline.

    Raises:
        ValueError: Bad matrix, or ``task_names`` of the wrong length.
    """
    acc = lower_triangle(acc_matrix)
    n = len(acc)
    names = [f'T{k + 1}' for k in range(n)] if task_names is None else [str(s) for s in
                                                                        task_names]
    if len(names) != n:
        raise ValueError(f'task_names has {len(names)} entries for {n} tasks')
    col = max(6, *(len(s) for s in names))
    row_labels = [f'after {s}' for s in names]
    corner = 'acc %'
    first = max(len(corner), *(len(s) for s in row_labels))
    lines = [f'{corner:<{first}}' + ''.join(f' {s:>{col}}' for s in names)]
    for i, values in enumerate(acc):
        cells = [f'{100.0 * values[j]:.1f}' if j <= i else '-' for j in range(n)]
        lines.append(f'{row_labels[i]:<{first}}' + ''.join(f' {c:>{col}}' for c in cells))
    return '\n'.join(lines)


def effective_rank(activations: Any) -> float:
    """Effective rank of a (samples, units) activation matrix (Roy & Vetterli, 2007).

    ``exp(H(p))`` with ``p`` the singular values normalised to sum 1, the measure Dohare et
    al. (Nature 2024) use to show a network's representation collapsing: it equals the
    number of units when all directions are used equally and falls towards 1 as they
    collapse onto few. 0 for an all-zero matrix.
    """
    a = np.asarray(activations, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError('activations must be a non-empty 2-D array')
    s = np.linalg.svd(a, compute_uv=False)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def prediction_accuracy(predict: Callable[..., Sequence[Any]], images: Sequence[np.ndarray],
                        labels: Sequence[str], batch_size: int = 64) -> float:
    """Share of ``images`` whose top-1 class from ``predict(batch, top_k=1)`` is the label.

    Closed-set: the top class counts even where a learner would call the frame unknown (the
    protocols score novelty separately). ``nan`` for no images.
    """
    if not len(images):
        return float('nan')
    correct = 0
    for start in range(0, len(images), batch_size):
        preds = predict(images[start:start + batch_size], top_k=1)
        correct += sum(p.topk[0][0] == str(y)
                       for p, y in zip(preds, labels[start:start + batch_size]))
    return correct / len(images)
