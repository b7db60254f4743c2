"""Costs that must not grow with the number of learned tasks (``cbpnet-bench``).

Many-task learners are built only through the learner's public API: ``learn_task`` on small
synthetic tasks, ``save_checkpoint`` and ``load_latest_checkpoint``. Nothing here touches the
model's internals, so the figures survive refactors of the learner and the model.

Figures (assembled in :mod:`.model_figures`):

- ``tasks_scaling_2_50``: prediction at batch 8 with N learned tasks over that with 2, timed
  in the same interleaved rounds (the median of per-round ratios; target >= 0.95).
- ``learn_time_ratio_50_2``: ``learn_task`` of the Nth task over that of the 2nd, the same
  task (same images, same sample count) learned onto the N-1-task and the 1-task checkpoint,
  paired per round (target <= 1.1).
- checkpoint growth per task (bytes, from 2 to N tasks) and this process's resident memory
  after N tasks over after 2, after a garbage collection and glibc's ``malloc_trim`` (as
  ``cbpnet_node`` trims after every task; the untrimmed figures are reported beside it).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from .timing import log, synthetic_frame
from .memory import settled_rss_mb

#: Side of the small synthetic images of the filler tasks (the learner resizes them).
TINY_HW = (96, 128)


def tiny_task(rng: np.random.Generator, index: int, classes_per_task: int, n_images: int,
              hw: Tuple[int, int] = TINY_HW) -> Tuple[List[np.ndarray], List[str]]:
    """A small task of new classes ``scale<index>_<j>``: noisy colour patterns per class."""
    classes = [f'scale{index}_{j}' for j in range(classes_per_task)]
    images, labels = [], []
    for k in range(n_images):
        j = k % classes_per_task
        images.append(synthetic_frame(rng, hw, 1000 + 11 * index + 3 * j))
        labels.append(classes[j])
    return images, labels


def checkpoint_bytes(path: str) -> int:
    """Size of one checkpoint file."""
    return int(os.path.getsize(path))


def load_learner(factory: Callable[[], Any], directory: str, expect_tasks: int) -> Any:
    """A new learner (sharing the backbone) restored from the newest checkpoint of
    ``directory``.

    Raises:
        RuntimeError: no checkpoint, or not the expected number of tasks.
    """
    learner = factory()
    if learner.load_latest_checkpoint(directory) is None:
        raise RuntimeError(f'no valid checkpoint in {directory}')
    if learner.num_tasks != expect_tasks:
        raise RuntimeError(f'checkpoint in {directory} holds {learner.num_tasks} tasks, '
                           f'expected {expect_tasks}')
    return learner


def grow_chain(learner: Any, target: int, save_at: Sequence[int], root: str,
               rng: np.random.Generator, classes_per_task: int, images_per_task: int
               ) -> Dict[str, Any]:
    """Learn small tasks onto ``learner`` until it holds ``target`` tasks.

    A checkpoint is written (``save_checkpoint``) whenever the task count is in ``save_at``
    (its directory is ``root/tasks_<n>``), including the count the learner starts with.

    Returns:
        ``{'dirs': {n: dir}, 'bytes': {n: file bytes}, 'rss_mb': {start: .., target: ..},
        'rss_trimmed_mb': (the same after malloc_trim), 'filler_learn_s': [...]}``.
    """
    dirs: Dict[int, str] = {}
    sizes: Dict[int, int] = {}

    def save() -> None:
        n = learner.num_tasks
        if n in save_at and n not in dirs:
            dirs[n] = os.path.join(root, f'tasks_{n}')
            sizes[n] = checkpoint_bytes(learner.save_checkpoint(dirs[n]))

    start = learner.num_tasks
    save()
    rss = {start: settled_rss_mb()}
    rss_trimmed = {start: settled_rss_mb(trim=True)}
    learn_s: List[float] = []
    t0 = time.perf_counter()
    while learner.num_tasks < target:
        images, labels = tiny_task(rng, learner.num_tasks, classes_per_task, images_per_task)
        t = time.perf_counter()
        learner.learn_task(images, labels)
        learn_s.append(time.perf_counter() - t)
        save()
    rss[target] = settled_rss_mb()
    rss_trimmed[target] = settled_rss_mb(trim=True)
    log(f'learned {target - start} filler tasks ({images_per_task} images each) in '
        f'{time.perf_counter() - t0:.1f} s')
    return {'dirs': dirs, 'bytes': sizes, 'rss_mb': rss, 'rss_trimmed_mb': rss_trimmed,
            'filler_learn_s': learn_s}


def distinct_tasks_selected(learner: Any, frames: Sequence[np.ndarray]) -> int:
    """How many different E-prompts (tasks) a batch of frames selects."""
    return len({p.task_id for p in learner.predict(list(frames))})


def scaling_figures(samples: Dict[str, List[float]], fast: str, n_many: int,
                    chain: Dict[str, Any], learn_ratio: Dict[str, Any], ratio_fn,
                    selected: Dict[str, int]) -> Dict[str, Any]:
    """The JSON figures of this module from the timing samples and the grown chain."""
    r = ratio_fn(samples, f'{fast}_t{n_many}_b8', f'{fast}_t2_b8')
    per_round = [a / b for a, b in zip(samples[f'{fast}_t{n_many}_b8'],
                                       samples[f'{fast}_t2_b8'])]
    sizes = chain['bytes']
    out: Dict[str, Any] = {
        'tasks_scaling_2_50': {
            'tasks': [2, n_many], 'batch': 8, 'ratio': round(r, 4),
            'slowdown': round(1.0 - r, 4),
            'ratio_by_round': [round(x, 4) for x in per_round],
            'distinct_tasks_selected_in_batch': selected,
        },
        'learn_time_ratio_50_2': learn_ratio,
        'checkpoint_growth': {
            'tasks': [2, n_many],
            'bytes_per_task_2_to_n': round((sizes[n_many] - sizes[2]) / (n_many - 2), 1),
            'bytes_by_tasks': {str(k): v for k, v in sorted(sizes.items())},
        },
        'memory_tasks': _memory_tasks(chain, n_many),
    }
    return out


def _memory_tasks(chain: Dict[str, Any], n_many: int) -> Dict[str, Any]:
    """RSS after N tasks vs after 2; ``ratio`` after malloc_trim, as the node runs."""
    out: Dict[str, Any] = {'tasks': [2, n_many]}
    trimmed, raw = chain['rss_trimmed_mb'], chain['rss_mb']
    for label, rss in (('', trimmed), ('_untrimmed', raw)):
        a, b = rss.get(2), rss.get(n_many)
        out[f'rss_mb_after_2{label}'] = a
        out[f'rss_mb_after_{n_many}{label}'] = b
        out[f'ratio{label}'] = round(b / a, 4) if a and b else None
        out[f'increase_mb{label}'] = round(b - a, 1) if a and b else None
    learn_s = chain['filler_learn_s']
    out['filler_task_learn_s_first_last'] = [round(learn_s[0], 3), round(learn_s[-1], 3)] \
        if learn_s else None
    return out
