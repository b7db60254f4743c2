"""``cbpnet-bench --runtime both``: torch and ONNX Runtime side by side, in one run.

For each runtime of the frozen pass (``torch``, ``onnxruntime``), paired in the same timing
rounds (:class:`.timing.Rounds`), so load from other processes hits both alike:

- ``bare_ips``: the frozen multi-layer query alone on normalised batches (torch eager under
  ``inference_mode``, or the ONNX Runtime session), images/s at batch 1, 4 and 8;
- ``prediction_ips``: ``ContinualLearner.predict`` of 480x640 uint8 frames with the
  statistics recipe and two learned tasks (resize, normalise, frozen pass, LDA, novelty,
  top-k), images/s;
- ``prediction_over_bare``: the per-round ratio of the two (1.0 = everything around the
  frozen pass is free); ``prediction_over_bare_onnx`` compares both runtimes' predictions
  with the bare ONNX Runtime pass, the floor the issue sets;
- ``onnx_over_torch``: ONNX Runtime over torch, for the bare pass and the prediction;
- ``learn_task_s``: seconds of one ``learn_task`` of ``--runtime-learn-images`` (default 500)
  images as the third task (undone after each round), alternating runtimes;
  ``learn_onnx_speedup`` their per-round ratio;
- ``max_relative_difference``: |onnx - torch| / max|torch| of the queries of the frames.

Then the node (``--skip-node`` skips it): ``cbpnet_node`` once per runtime, with the camera
configurations of ``--node-cameras`` / ``--node-compressed-cameras``, and its peak resident
memory per phase (learning, each camera configuration).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List

import numpy as np

from .timing import FRAME_HW, DeviceClock, Rounds, log, median, ratio, synthetic_frame, \
    synthetic_task

RUNTIMES = ('torch', 'onnxruntime')
BATCHES = (1, 4, 8)


def runtime_section(args, device) -> Dict[str, Any]:
    """The side-by-side figures (and the node per runtime unless ``--skip-node``)."""
    import torch

    from ...learning.learner import ContinualLearner, LearnerConfig
    from ...learning.model import load_backbone

    backbone = load_backbone(args.backbone, args.backbone_checkpoint, image_size=args.image_size)
    rng = np.random.default_rng(0)
    task_a = synthetic_task(rng, ['a0', 'a1'], 40)
    task_b = synthetic_task(rng, ['b0', 'b1'], 40, first_pattern=100)
    learn_images = args.runtime_learn_images
    task_c = synthetic_task(rng, ['c0', 'c1'], learn_images, first_pattern=200,
                            distinct_per_class=16)
    frames = [synthetic_frame(rng, FRAME_HW, 300 + i) for i in range(max(BATCHES))]
    learners: Dict[str, Any] = {}
    for runtime in RUNTIMES:
        config = LearnerConfig(
            backbone=args.backbone, backbone_checkpoint=args.backbone_checkpoint,
            device=args.device, precision=args.precision, image_size=args.image_size,
            runtime=runtime, inference_threads=args.threads or 0,
            onnx_providers=[p for p in args.onnx_providers.split(',') if p.strip()])
        learner = ContinualLearner(config, backbone=backbone)
        if learner.runtime[0] != runtime:
            raise RuntimeError(f'the {runtime} runtime is not available: {learner.runtime_note}')
        learner.learn_task(*task_a)
        learner.learn_task(*task_b)
        learner.predict(frames[:1])
        learners[runtime] = learner
    layers = learners['torch'].config.query_layers
    tensors = {b: learners['torch'].preprocess(frames[:b]) for b in BATCHES}
    with torch.inference_mode():
        ref = backbone.query(tensors[max(BATCHES)], layers)
    onnx_q = learners['onnxruntime']._onnx(tensors[max(BATCHES)])
    max_rel = float((onnx_q - ref).abs().max() / ref.abs().max())

    def bare(runtime: str, b: int):
        x = tensors[b]
        if runtime == 'onnxruntime':
            run = learners['onnxruntime']._onnx
            return lambda: run(x)

        def torch_pass():
            with torch.inference_mode():
                return backbone.query(x, layers)
        return torch_pass

    def predict(runtime: str, b: int):
        learner, batch = learners[runtime], frames[:b]
        return lambda: learner.predict(batch)

    items = [(f'{kind}_{r}_b{b}', fn(r, b), b) for b in BATCHES for r in RUNTIMES
             for kind, fn in (('bare', bare), ('predict', predict))]
    clock = DeviceClock(learners['torch'].device)
    log(f'timing {len(items)} runtime items x {args.repeats} rounds')
    s = Rounds(args.repeats, args.slice_s, args.warmup_s, clock).run(items)

    # learn_task of a larger task as the 3rd task, alternating runtimes; undone after each.
    durations: Dict[str, List[float]] = {r: [] for r in RUNTIMES}
    log(f'timing learn_task of {learn_images} images x {args.repeats} rounds per runtime')
    for k in range(args.repeats):
        for runtime in (RUNTIMES if k % 2 == 0 else tuple(reversed(RUNTIMES))):
            learner = learners[runtime]
            clock.sync()
            t0 = time.perf_counter()
            learner.learn_task(*task_c)
            clock.sync()
            durations[runtime].append(time.perf_counter() - t0)
            learner.undo_last_task()

    def fig(name: str) -> float:
        return round(median(s[name]), 1)

    out: Dict[str, Any] = {
        'bare_ips': {r: {f'batch_{b}': fig(f'bare_{r}_b{b}') for b in BATCHES}
                     for r in RUNTIMES},
        'prediction_ips': {r: {f'batch_{b}': fig(f'predict_{r}_b{b}') for b in BATCHES}
                           for r in RUNTIMES},
        'prediction_over_bare': {r: {f'batch_{b}': round(ratio(
            s, f'predict_{r}_b{b}', f'bare_{r}_b{b}'), 3) for b in BATCHES} for r in RUNTIMES},
        'prediction_over_bare_onnx': {r: {f'batch_{b}': round(ratio(
            s, f'predict_{r}_b{b}', f'bare_onnxruntime_b{b}'), 3) for b in BATCHES}
            for r in RUNTIMES},
        'onnx_over_torch': {kind: {f'batch_{b}': round(ratio(
            s, f'{kind}_onnxruntime_b{b}', f'{kind}_torch_b{b}'), 3) for b in BATCHES}
            for kind in ('bare', 'predict')},
        'learn_task_s': {r: round(median(v), 3) for r, v in durations.items()},
        'learn_task_s_by_round': {r: [round(x, 3) for x in v] for r, v in durations.items()},
        'learn_onnx_speedup': round(median([a / b for a, b in zip(
            durations['torch'], durations['onnxruntime'])]), 3),
        'learn_task_images': learn_images,
        'max_relative_difference': max_rel,
        'provider': learners['onnxruntime'].runtime[1],
        'samples': {k: [round(x, 2) for x in v] for k, v in s.items()},
    }
    return out
