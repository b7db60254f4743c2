#!/usr/bin/env python3
"""Where does a per-task cost come from? cProfile of ``predict`` (batch 8) and ``learn_task``
with 2 learned tasks against N, side by side, function by function.

Builds the N-task learner through the learner's public API only (``learn_task`` on small
synthetic tasks, as ``cbpnet-bench`` does), so it runs against any version of the learner.
Prints the functions whose time per call grows the most from 2 to N tasks, and writes the
full comparison as JSON with ``--out``.

Example (the README's figures): ``OMP_NUM_THREADS=1 .venv/bin/python
scripts/profile_task_scaling.py --tasks 50 --threads 1``.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from ros2_cbpnet.tools.bench.timing import FRAME_HW, synthetic_frame, synthetic_task  # noqa
from ros2_cbpnet.tools.bench.scaling import grow_chain, load_learner  # noqa: E402


def _stats(prof: cProfile.Profile, calls: int) -> Dict[str, Dict[str, float]]:
    out = {}
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in pstats.Stats(prof).stats.items():
        key = f'{name} ({os.path.basename(file)}:{line})'
        out[key] = {'own_s': tottime / calls, 'cum_s': cumtime / calls,
                    'calls': ncalls / calls}
    return out


def _profile_pair(fn_a, fn_b, calls: int
                  ) -> Tuple[Tuple[float, float], Tuple[Dict[str, Any], Dict[str, Any]]]:
    """Alternate ``fn_a`` and ``fn_b`` call by call, each under its own profiler, so load
    from other processes hits both alike. Returns wall seconds per call and the stats."""
    profs = (cProfile.Profile(), cProfile.Profile())
    walls = [0.0, 0.0]
    for k in range(calls):
        for i in ((0, 1) if k % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            profs[i].enable()
            (fn_a, fn_b)[i]()
            profs[i].disable()
            walls[i] += time.perf_counter() - t0
    return ((walls[0] / calls, walls[1] / calls),
            (_stats(profs[0], calls), _stats(profs[1], calls)))


def _compare(a: Dict[str, Dict[str, float]], b: Dict[str, Dict[str, float]], top: int
             ) -> List[Dict[str, Any]]:
    rows = []
    for key in set(a) | set(b):
        x, y = a.get(key, {}), b.get(key, {})
        rows.append({'function': key,
                     'own_ms_2': round(1000 * x.get('own_s', 0.0), 3),
                     'own_ms_n': round(1000 * y.get('own_s', 0.0), 3),
                     'cum_ms_2': round(1000 * x.get('cum_s', 0.0), 3),
                     'cum_ms_n': round(1000 * y.get('cum_s', 0.0), 3),
                     'calls_2': x.get('calls', 0.0), 'calls_n': y.get('calls', 0.0)})
    rows.sort(key=lambda r: r['own_ms_n'] - r['own_ms_2'], reverse=True)
    return rows[:top]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--backbone', default='tf_efficientnet_lite0')
    p.add_argument('--backbone-checkpoint', default='')
    p.add_argument('--image-size', type=int, default=128)
    p.add_argument('--prediction', default='',
                   help="LearnerConfig.prediction (default: the learner's default)")
    p.add_argument('--tasks', type=int, default=50)
    p.add_argument('--train-images', type=int, default=200)
    p.add_argument('--filler-images', type=int, default=16)
    p.add_argument('--predict-calls', type=int, default=200)
    p.add_argument('--learn-calls', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--top', type=int, default=15)
    p.add_argument('--out', default='')
    args = p.parse_args()

    import torch

    from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig
    from ros2_cbpnet.learning.model import load_backbone

    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone, args.backbone_checkpoint,
                             image_size=args.image_size)
    extra = {'prediction': args.prediction} if args.prediction else {}
    config = LearnerConfig(backbone=args.backbone, backbone_checkpoint=args.backbone_checkpoint,
                           image_size=args.image_size, device='cpu', **extra)

    def factory():
        return ContinualLearner(config, backbone=backbone)

    rng = np.random.default_rng(0)
    tmp = tempfile.TemporaryDirectory(prefix='cbpnet-profile-')
    base = factory()
    dirs = {1: os.path.join(tmp.name, 'tasks_1')}
    base.learn_task(*synthetic_task(rng, ['a0', 'a1'], args.train_images))
    base.save_checkpoint(dirs[1])
    base.learn_task(*synthetic_task(rng, ['b0', 'b1'], args.train_images, first_pattern=100))
    chain = grow_chain(base, args.tasks, {2, args.tasks - 1, args.tasks}, tmp.name, rng, 2,
                       args.filler_images)
    dirs.update(chain['dirs'])
    frames = [synthetic_frame(rng, FRAME_HW, 200 + i) for i in range(8)]
    task = synthetic_task(rng, ['c0', 'c1'], args.train_images, first_pattern=200)
    report: Dict[str, Any] = {'tasks': [2, args.tasks], 'settings': vars(args)}
    n = args.tasks
    walls, profiles = {}, {}
    few, many = load_learner(factory, dirs[2], 2), load_learner(factory, dirs[n], n)
    for learner, k in ((few, 2), (many, n)):
        learner.predict(frames)
        report[f'distinct_tasks_selected_{k}'] = len({q.task_id for q in learner.predict(
            frames)})
    w, st = _profile_pair(lambda: few.predict(frames), lambda: many.predict(frames),
                          args.predict_calls)
    walls['predict_2'], walls[f'predict_{n}'] = w
    profiles['predict_2'], profiles[f'predict_{n}'] = st
    learners = {k: [load_learner(factory, dirs[k], k) for _ in range(args.learn_calls)]
                for k in (1, n - 1)}
    its = {k: iter(v) for k, v in learners.items()}
    w, st = _profile_pair(lambda: next(its[1]).learn_task(*task),
                          lambda: next(its[n - 1]).learn_task(*task), args.learn_calls)
    walls['learn_2'], walls[f'learn_{n}'] = w
    profiles['learn_2'], profiles[f'learn_{n}'] = st
    report['wall_ms'] = {k: round(1000 * v, 2) for k, v in walls.items()}
    report['predict_growth'] = _compare(profiles['predict_2'], profiles[f'predict_{n}'],
                                        args.top)
    report['learn_growth'] = _compare(profiles['learn_2'], profiles[f'learn_{n}'], args.top)
    print(f"predict batch 8: {report['wall_ms']['predict_2']} ms with 2 tasks, "
          f"{report['wall_ms'][f'predict_{n}']} ms with {n} "
          f"(distinct tasks selected in the batch: {report['distinct_tasks_selected_2']} / "
          f"{report[f'distinct_tasks_selected_{n}']})")
    print(f"learn_task ({args.train_images} images): {report['wall_ms']['learn_2']} ms as "
          f"task 2, {report['wall_ms'][f'learn_{n}']} ms as task {n}")
    for what in ('predict_growth', 'learn_growth'):
        print(f'\n{what}: own ms per call, 2 tasks -> {n} tasks (calls per call)')
        for r in report[what]:
            print(f"  {r['own_ms_2']:9.3f} -> {r['own_ms_n']:9.3f}   "
                  f"({r['calls_2']:g} -> {r['calls_n']:g})  {r['function']}")
    if args.out:
        with open(args.out, 'w', encoding='utf-8') as f:
            json.dump(report, f, indent=2)
    tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
