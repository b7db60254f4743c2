"""Model figures of ``cbpnet-bench``: backbone, prediction and learning throughput against
their two-pass floors, costs that grow with tasks, memory and checkpoint size.

Everything about learners goes through the public API (``ContinualLearner``,
``LearnerConfig``, ``learn_task``, ``predict``, ``preprocess``, ``save_checkpoint``,
``load_latest_checkpoint``). Only the learning floor needs more (a prompted forward and
backward without the learner around it); if that breaks, that one figure is
reported as missing with the reason and everything else still runs; it uses the backbone's
prompt API only (``prompt_shape``, ``init_prompt_``, ``query``, ``forward_prompted``).
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .timing import (BATCH_SIZES, FRAME_HW, DeviceClock, Rounds, log, median, ratio, spread,
                     synthetic_frame, synthetic_task)
from .memory import PeakRSS
from .scaling import distinct_tasks_selected, grow_chain, load_learner, scaling_figures


def _train_floor_fn(learner, x, prec, later_task: bool) -> Callable[[], None]:
    """One no-grad query pass + one prompted forward with trainable prompts + backward.

    The prompts are the learner's layout (``learner.config``): the E-prompt layers, and the
    G-prompt layers trained (``later_task`` False, or a learner that trains the G-prompt on
    every task) or frozen. Only the backbone's prompt API is used (``prompt_shape``,
    ``init_prompt_``, ``query``, ``forward_prompted``), not the learner's internals.
    """
    import torch

    backbone, c = learner.backbone, learner.config
    b = x.shape[0]
    train_g = not (later_task and getattr(c, 'g_prompt_first_task_only', False))
    prompts: Dict[int, List[torch.Tensor]] = {}
    layout = [(i, c.g_prompt_length, train_g) for i in c.g_prompt_layers if i >= 0]
    layout += [(i, c.e_prompt_length, True) for i in c.e_prompt_layers]
    for layer, length, trained in layout:
        p = torch.empty(backbone.prompt_shape(layer, length), device=x.device)
        backbone.init_prompt_(p)
        prompts.setdefault(layer, []).append(p.requires_grad_(trained))
    leaves = [p for ps in prompts.values() for p in ps if p.requires_grad]

    def floor() -> None:
        with torch.no_grad(), prec.autocast():
            backbone.query(x)
        with prec.autocast():
            batch = {i: [p.unsqueeze(0).expand(b, *p.shape) for p in ps]
                     for i, ps in prompts.items()}
            loss = backbone.forward_prompted(x, batch).float().square().mean()
        prec.backward(loss)
        for p in leaves:
            p.grad = None
    return floor


def _epochs_run(result: Any, default: int) -> int:
    """Epochs a ``learn_task`` actually trained (0: no prompt training at all)."""
    epochs = getattr(result, 'epochs', default)
    return int(epochs) if isinstance(epochs, (int, float)) else default


def _learner_configs(args, modes: Dict[str, bool]):
    from ...learning.learner import LearnerConfig

    kw = dict(backbone=args.backbone, backbone_checkpoint=args.backbone_checkpoint,
              device=args.device, precision=args.precision, image_size=args.image_size)
    if args.epochs:
        kw['epochs'] = args.epochs
    elif args.quick:
        kw['epochs'] = 1
    if args.quick:
        kw['min_steps'] = 0  # the learner's floor of 50 steps would dwarf a 40-image task
    if args.batch_size:
        kw['batch_size'] = args.batch_size
    if args.prediction:
        kw['prediction'] = args.prediction
    kw['runtime'] = getattr(args, 'runtime', 'auto')
    kw['onnx_providers'] = [p for p in getattr(args, 'onnx_providers', '').split(',')
                            if p.strip()]
    return {m: LearnerConfig(fast_paths=fp, **kw) for m, fp in modes.items()}


def model_section(args, device) -> Dict[str, Any]:
    """Backbone, inference, learning, scaling, memory and checkpoint figures."""
    import torch

    from ...learning.learner import ContinualLearner
    from ...learning.model import load_backbone
    from ...learning.precision import TrainingPrecision

    t_load = time.perf_counter()
    backbone = load_backbone(args.backbone, args.backbone_checkpoint, image_size=args.image_size)
    load_s = time.perf_counter() - t_load
    modes = {'fast': True, 'naive': False} if args.compare_naive else {'fast': True}
    configs = _learner_configs(args, modes)

    def factory(mode: str = 'fast'):
        return ContinualLearner(configs[mode], backbone=backbone)

    probe = factory()
    cfg = probe.config
    prec = TrainingPrecision(probe.device, args.precision)  # the bench's own passes
    clock = DeviceClock(probe.device)
    rng = np.random.default_rng(0)
    n_many = args.scaling_tasks
    log(f'backbone {args.backbone} loaded in {load_s:.1f} s; device {probe.device}, '
        f'{args.precision}, {torch.get_num_threads()} torch threads, image size '
        f'{cfg.image_size}')
    tmp = tempfile.TemporaryDirectory(prefix='cbpnet-bench-')
    try:
        return _measure(args, factory, probe, prec, clock, rng, n_many, modes, tmp.name,
                        backbone, load_s)
    finally:
        tmp.cleanup()


def _measure(args, factory, probe, prec, clock: DeviceClock, rng, n_many: int,
             modes: Dict[str, bool], root: str, backbone, load_s: float) -> Dict[str, Any]:
    import torch

    cfg = probe.config
    # ---- the chain of learned tasks: two real ones, then small ones up to N (public API)
    n_train = args.train_images
    classes = {k: [f'{k}{i}' for i in range(args.train_classes)] for k in 'abc'}
    train_a = synthetic_task(rng, classes['a'], n_train)
    train_b = synthetic_task(rng, classes['b'], n_train, first_pattern=100)
    # The timed later task: learned onto 1 task (the 2nd) and onto N - 1 (the Nth).
    train_c = synthetic_task(rng, classes['c'], n_train, first_pattern=200)
    base = factory()
    base.learn_task(*train_a)
    dirs = {1: os.path.join(root, 'tasks_1')}
    sizes = {1: os.path.getsize(base.save_checkpoint(dirs[1]))}
    base.learn_task(*train_b)
    chain = grow_chain(base, n_many, {2, n_many - 1, n_many}, root, rng, args.train_classes,
                       args.scaling_images)
    del base
    dirs.update(chain['dirs'])
    sizes.update(chain['bytes'])
    checkpoint = {'bytes_by_tasks': {str(k): v for k, v in sorted(sizes.items())},
                  'bytes_per_task': sizes[2] - sizes[1]}

    # ---- throughput rounds: backbone, inference (1, 2, N tasks), fast and naive
    frames = [synthetic_frame(rng, FRAME_HW, 200 + i) for i in range(max(BATCH_SIZES))]
    learners: Dict[Tuple[str, int], Any] = {}
    for mode in modes:
        for n in (1, 2, n_many):
            learners[mode, n] = load_learner(lambda: factory(mode), dirs[n], n)
            learners[mode, n].predict(frames[:1])  # builds caches
    selected = {str(n): distinct_tasks_selected(learners['fast', n], frames)
                for n in (2, n_many)}
    model = backbone.model
    tensors = {b: probe.preprocess(frames[:b]) for b in BATCH_SIZES}

    def backbone_fn(b: int) -> Callable[[], Any]:
        x = tensors[b]

        def run():
            with torch.inference_mode(), prec.autocast():
                return model.forward_head(model.forward_features(x), pre_logits=True)
        return run

    def predict_fn(learner, b: int) -> Callable[[], Any]:
        batch = frames[:b]
        return lambda: learner.predict(batch)

    items = [(f'backbone_b{b}', backbone_fn(b), b) for b in BATCH_SIZES]
    for mode in modes:
        for n in (1, 2):
            for b in BATCH_SIZES:
                items.append((f'{mode}_t{n}_b{b}', predict_fn(learners[mode, n], b), b))
        items.append((f'{mode}_t{n_many}_b8', predict_fn(learners[mode, n_many], 8), 8))
    log(f'timing {len(items)} inference items x {args.repeats} rounds '
        f'({args.slice_s:g} s slices)')
    infer_mem = PeakRSS()
    rounds = Rounds(args.repeats, args.slice_s, args.warmup_s, clock)
    s = rounds.run(items)
    memory: Dict[str, Any] = {'inference': infer_mem.report()}
    learners.clear()

    # ---- learning rounds: learn_task vs the directly measured floor; only learn_task is
    # timed (each learner is created and restored before its timer starts).
    train_bs = cfg.batch_size
    x_floor = probe.preprocess(train_b[0][:train_bs])
    floors: Dict[str, Callable[[], None]] = {}
    floor_error: Optional[str] = None
    try:
        floor_learner = load_learner(factory, dirs[1], 1)
        floors = {'train_floor': _train_floor_fn(floor_learner, x_floor, prec, True),
                  'train_floor_first': _train_floor_fn(floor_learner, x_floor, prec, False)}
        for fn in floors.values():
            fn()
    except (AttributeError, TypeError, RuntimeError) as exc:
        floors = {}
        floor_error = f'the learning floor failed: {type(exc).__name__}: {exc}'
        log(floor_error)
    learn_results: Dict[str, List[Dict[str, Any]]] = {}

    def prepare(mode: str, kind: str):
        if kind == 'first':
            return factory(mode), train_a
        n_before = 1 if kind == 'second' else n_many - 1
        return load_learner(lambda: factory(mode), dirs[n_before], n_before), train_c

    learn_items = [(f'train_{m}', m, 'second') for m in modes]
    learn_items += [(f'train_first_{m}', m, 'first') for m in modes]
    learn_items.append((f'train_{n_many}th_fast', 'fast', 'many'))
    log(f'timing learn_task ({n_train} images, {cfg.epochs} epochs, batch {train_bs}; the '
        f'1st, 2nd and {n_many}th task) x {args.repeats} rounds')
    # Warm-up: a small first and later task through every mode (allocations, kernels).
    warm = synthetic_task(rng, ['w0', 'w1'], max(2 * train_bs, 8))
    trains = True
    for mode in modes:
        factory(mode).learn_task(*warm)
        trains = _epochs_run(load_learner(lambda: factory(mode), dirs[1], 1).learn_task(
            *warm), cfg.epochs) > 0
    if not trains:
        # e.g. prediction='stats': learn_task is a frozen pass and class statistics, so a
        # floor of prompt training does not apply.
        floors = {}
        floor_error = (f'learn_task trains no prompts with prediction={cfg.prediction!r}; '
                       'the training floor does not apply')
    learn_mem = PeakRSS()
    floor_rounds = Rounds(args.repeats, 0.0, 0.0, clock)
    for fn in floors.values():
        floor_rounds.timed(fn, args.warmup_s, 2)
    floor_slice = args.slice_s / (len(learn_items) + 1) / max(len(floors), 1)
    learn_peak: Dict[str, float] = {}
    durations: Dict[str, List[float]] = {}
    for r in range(args.repeats):
        f_acc = {name: [0, 0.0] for name in floors}

        def floor_slices() -> None:
            for name, floor in floors.items():
                c, t = floor_rounds.timed(floor, floor_slice, 1)
                f_acc[name][0] += c
                f_acc[name][1] += t
        # One learn_task per item per round, floor slices before, between and after them,
        # so a round's floors cover the same stretch of time as its learn_tasks.
        for name, mode, kind in (learn_items if r % 2 == 0 else list(reversed(learn_items))):
            floor_slices()
            learner, task = prepare(mode, kind)
            clock.reset_peak()
            t0 = time.perf_counter()
            result = learner.learn_task(*task)
            clock.sync()
            t = time.perf_counter() - t0
            peak = clock.peak_mb()
            if peak is not None:
                learn_peak[name] = max(learn_peak.get(name, 0.0), peak)
            # images x epochs per second (images per second when no epoch is trained)
            passes = max(_epochs_run(result, cfg.epochs), 1)
            s.setdefault(name, []).append(n_train * passes / t)
            durations.setdefault(name, []).append(t)
            learn_results.setdefault(name, []).append(result.as_dict())
            del learner
        floor_slices()
        for name, (c, t) in f_acc.items():
            s.setdefault(name, []).append(c * train_bs / t)
    memory['learning'] = learn_mem.report()
    memory['learning']['task_images'] = n_train
    if clock.is_cuda:
        memory['cuda_peak_mb'] = {**rounds.peak_mb, **learn_peak}
        memory['inference']['cuda_max_allocated_mb'] = max(
            v for k, v in rounds.peak_mb.items() if not k.startswith('backbone'))
        memory['learning']['cuda_max_allocated_mb'] = max(learn_peak.values())

    # ---- assemble
    def fig(name: str) -> Optional[float]:
        return round(median(s[name]), 2) if name in s else None

    def floor_ratio(num: str, den: str) -> Optional[float]:
        return round(ratio(s, num, den), 3) if den in s else None

    def per_mode(mode: str) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            'inference_ips': {f'batch_{b}': fig(f'{mode}_t2_b{b}') for b in BATCH_SIZES},
            'inference_ips_one_task': {f'batch_{b}': fig(f'{mode}_t1_b{b}')
                                       for b in BATCH_SIZES},
            'inference_floor_ratio': {
                f'batch_{b}': round(ratio(s, f'{mode}_t2_b{b}', f'backbone_b{b}', 0.5), 3)
                for b in BATCH_SIZES},
            'inference_floor_ratio_one_task': {
                f'batch_{b}': round(ratio(s, f'{mode}_t1_b{b}', f'backbone_b{b}', 0.5), 3)
                for b in BATCH_SIZES},
            'train_ips': fig(f'train_{mode}'),
            'train_floor_ips': fig('train_floor'),
            'train_floor_ratio': floor_ratio(f'train_{mode}', 'train_floor'),
            'train_task_duration_s': round(median(durations[f'train_{mode}']), 3),
            'train_ips_first_task': fig(f'train_first_{mode}'),
            'train_floor_ips_first_task': fig('train_floor_first'),
            'train_floor_ratio_first_task': floor_ratio(f'train_first_{mode}',
                                                        'train_floor_first'),
            'tasks_scaling': {'batch': 8, 'inference_ips_by_tasks': {
                str(n): fig(f'{mode}_t{n}_b8') for n in (1, 2, n_many)}},
        }
        return out

    many = f'train_{n_many}th_fast'
    per_round = [b / a for a, b in zip(durations['train_fast'], durations[many])]
    learn_ratio = {
        'tasks': [2, n_many], 'train_images': n_train, 'epochs': cfg.epochs,
        # paired: the 2nd and the Nth task of a round ran next to each other
        'ratio': round(median(per_round), 4),
        'ratio_by_round': [round(x, 4) for x in per_round],
        'learn_task_s_2nd': round(median(durations['train_fast']), 3),
        f'learn_task_s_{n_many}th': round(median(durations[many]), 3),
    }
    result: Dict[str, Any] = {
        'backbone_ips': {f'batch_{b}': fig(f'backbone_b{b}') for b in BATCH_SIZES},
        **per_mode('fast'),
        **scaling_figures(s, 'fast', n_many, chain, learn_ratio, ratio, selected),
        'memory': memory,
        'checkpoint': checkpoint,
        'learn_task_result': {'later_task': learn_results['train_fast'][-1],
                              'first_task': learn_results['train_first_fast'][-1],
                              f'task_{n_many}': learn_results[many][-1]},
        'settings': {
            'backbone': args.backbone, 'backbone_checkpoint': args.backbone_checkpoint,
            'device': str(probe.device), 'precision': args.precision,
            'grad_scaler': prec.uses_grad_scaler,
            'image_size': cfg.image_size, 'frame_hw': list(FRAME_HW),
            'num_prompt_layers': backbone.num_layers,
            'g_prompt_layers': cfg.g_prompt_layers, 'e_prompt_layers': cfg.e_prompt_layers,
            'prompt_selection': cfg.prompt_selection, 'prediction': cfg.prediction,
            'prompt_training': trains,
            'train_images': n_train, 'train_classes': args.train_classes,
            'epochs': cfg.epochs, 'batch_size': train_bs, 'repeats': args.repeats,
            'slice_s': args.slice_s, 'warmup_s': args.warmup_s, 'quick': args.quick,
            'scaling_tasks': n_many, 'scaling_images': args.scaling_images,
            'backbone_load_s': round(load_s, 2),
        },
        'spread': {k: round(spread(v), 3) for k, v in s.items()},
        'samples': {k: [round(x, 2) for x in v] for k, v in s.items()},
    }
    first_layer = getattr(probe.state, 'first_layer', None)
    if first_layer is not None:
        result['settings']['first_prompted_layer'] = int(first_layer)
    if floor_error:
        result['train_floor_error'] = floor_error
    if args.compare_naive:
        naive = per_mode('naive')
        naive['note'] = ('fast_paths=False: two full backbone passes per prediction (no shared '
                         'trunk, no one-task shortcut) and no per-task trunk cache in training; '
                         'learn_task still computes each sample\'s query once per task')
        result['naive'] = naive
        result['fast_over_naive'] = {
            'inference_batch_1': round(ratio(s, 'fast_t2_b1', 'naive_t2_b1'), 3),
            'inference_batch_8': round(ratio(s, 'fast_t2_b8', 'naive_t2_b8'), 3),
            'inference_one_task_batch_1': round(ratio(s, 'fast_t1_b1', 'naive_t1_b1'), 3),
            'inference_one_task_batch_8': round(ratio(s, 'fast_t1_b8', 'naive_t1_b8'), 3),
            'train': round(ratio(s, 'train_fast', 'train_naive'), 3),
            'train_first_task': round(ratio(s, 'train_first_fast', 'train_first_naive'), 3),
        }
    return result
