"""``cbpnet-bench``: performance figures of ros2_cbpnet as JSON, with a readable table.

What is measured (design.md section 3, "Performance model"):

- ``backbone_ips``: the bare frozen backbone (timm ``forward_features`` + pre-logits pooling,
  ``torch.inference_mode``), images/s at batch 1 and 8, from a normalised tensor.
- ``inference_ips``: the full prediction from uint8 480x640 RGB frames through
  ``ContinualLearner.predict`` (resize, normalise, query pass, prompt selection, prompted pass,
  CBP block, head, top-k) with 2 learned tasks (the query pass is needed);
  ``inference_ips_one_task``: the same with one task (the query pass is skipped).
- ``inference_floor_ratio`` = inference_ips / (backbone_ips / 2): the floor of a prediction is
  two backbone passes, so 1.0 means "everything around the two passes is free" and more than
  1.0 means a saving (one task, a CNN trunk shared by both passes) beats the floor.
- ``train_ips``: images x epochs per second of wall time of ``learn_task`` of a 200-image
  task (everything included: resize, the frozen pass, feature replay, optimiser, CBP
  bookkeeping, the statistics pass after training), for a later task (a second task learned
  onto one, the steady state of a robot) and, as ``*_first_task``, for the first one.
  ``train_floor_ips``: one no-grad query pass + one prompted forward with the prompts that
  task trains (requires_grad) + backward, on a training batch, measured directly;
  ``train_floor_ratio`` = train_ips / train_floor_ips.
- ``tasks_scaling``: inference_ips at batch 8 with 1, 10 and 50 tasks (tasks past the first
  two are synthetic: prompts, keys, head rows and class statistics of random features).
- ``memory``: peak resident memory (VmHWM, reset through ``/proc/self/clear_refs`` before each
  phase; ``ru_maxrss`` where that is impossible) during inference and during learning, CUDA
  peak allocation on CUDA, and checkpoint bytes per learned task.
- ``node_*``: ``cbpnet_node`` as a subprocess fed 640x480 bgr8 frames at 30 Hz through real DDS
  (one camera, then four), after teaching it one task through its topics and service.
- ``--compare-naive``: the model figures again with ``fast_paths=False`` (two full passes
  always, no shared trunk, no one-task shortcut, no per-task trunk cache), same weights.

Every figure is the median of ``--repeats`` timed rounds after a warm-up. Within a round the
timed items (backbone, each inference variant, fast and naive) take turns in ~0.1 s
sub-slices, and every ratio is the median of the per-round ratios, so load from other
processes hits numerator and denominator alike and mostly cancels in the ratios. ``spread``
gives (max - min) / median over the rounds of each figure, and
``machine.other_processes_cores_busy`` how much CPU everything else used meanwhile: a noisy
machine shows there. On a shared CPU machine, prefer ``--threads 1`` or
``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads that spin-wait for descheduled peers make torch
many times slower when another process is busy.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ['main', 'build_parser', 'run_bench']

BATCH_SIZES = (1, 8)
FRAME_HW = (480, 640)  # a 640x480 camera
CAMERA_RATE_HZ = 30.0

# Targets of the performance issue.
TARGET_FLOOR_B8 = 0.90
TARGET_FLOOR_B1 = 0.85
TARGET_TRAIN_FLOOR = 0.85
TARGET_SCALING_SLOWDOWN = 0.05
TARGET_NODE_VS_MODEL = 0.85


def _log(msg: str) -> None:
    print(f'[cbpnet-bench] {msg}', file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The ``cbpnet-bench`` argument parser."""
    p = argparse.ArgumentParser(
        prog='cbpnet-bench',
        description='Performance figures of ros2_cbpnet (model, learning, ROS node) as JSON on '
                    'stdout or --out, and a table on stderr.')
    p.add_argument('--backbone', default='tf_efficientnet_lite0',
                   help='timm model name (default: the embedded tf_efficientnet_lite0)')
    p.add_argument('--backbone-checkpoint', default='',
                   help="weights file, or 'random' for random weights (default: the model's "
                        'own source; embedded weights for tf_efficientnet_lite0)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N (default auto)')
    p.add_argument('--image-size', type=int, default=128,
                   help='model input side in pixels (default 128, the node default)')
    p.add_argument('--precision', default='fp32', choices=('fp32', 'fp16', 'bf16'),
                   help='fp16/bf16 run through the learner autocast, CUDA only')
    p.add_argument('--repeats', type=int, default=None,
                   help='timed rounds per figure; the median is reported (default 5, --quick 2)')
    p.add_argument('--slice-s', type=float, default=None,
                   help='seconds per timed sample of a throughput figure (default 1.0)')
    p.add_argument('--warmup-s', type=float, default=None,
                   help='warm-up seconds per item before timing (default 1.0)')
    p.add_argument('--quick', action='store_true',
                   help='tiny and fast (tests): 2 rounds, short slices, a 40-image task, 1 epoch')
    p.add_argument('--threads', type=int, default=0,
                   help='torch intra-op threads for this process, and OMP_NUM_THREADS of the '
                        'node subprocess (default: torch default, one per core)')
    p.add_argument('--train-images', type=int, default=None,
                   help='images in the timed learning task (default 200, --quick 40)')
    p.add_argument('--train-classes', type=int, default=2, help='classes per learned task')
    p.add_argument('--epochs', type=int, default=None,
                   help='epochs of the timed learning task (default: LearnerConfig default, '
                        '--quick 1)')
    p.add_argument('--batch-size', type=int, default=None,
                   help='training batch size (default: LearnerConfig default)')
    p.add_argument('--tasks-scaling', default='1,10,50',
                   help='comma-separated task counts for tasks_scaling (default 1,10,50)')
    p.add_argument('--compare-naive', action='store_true',
                   help='also measure the model figures with fast_paths=False')
    p.add_argument('--skip-node', action='store_true', help='skip the ROS node figures')
    p.add_argument('--node-seconds', type=float, default=20.0,
                   help='measured seconds per node configuration (default 20)')
    p.add_argument('--node-cameras', default='1,4',
                   help='camera counts to run the node with (default 1,4)')
    p.add_argument('--node-image-qos', default='reliable', choices=('reliable', 'sensor_data'),
                   help="the node's camera subscription QoS (default reliable: the transport "
                        'then loses no frame, so the figure is the node\'s)')
    p.add_argument('--node-command', default='',
                   help='command that starts the node, split like a shell line; '
                        '"--ros-args --params-file FILE" is appended (default: the cbpnet_node '
                        'console script next to this Python; e.g. "taskset -c 1 cbpnet_node")')
    p.add_argument('--node-timeout-s', type=float, default=180.0,
                   help='give up waiting for the node to start or learn after this long')
    p.add_argument('--out', default='', help='write the JSON here instead of stdout')
    p.add_argument('--no-table', action='store_true', help='no table on stderr')
    return p


def _int_list(text: str, name: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f'{name}: {exc}') from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f'{name} must be positive integers, got {text!r}')
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cbpnet-bench``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.tasks_scaling = sorted(set(_int_list(args.tasks_scaling, '--tasks-scaling')))
        args.node_cameras = sorted(set(_int_list(args.node_cameras, '--node-cameras')))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.slice_s = args.slice_s if args.slice_s is not None else (0.05 if args.quick else 1.0)
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (0.05 if args.quick else 1.0)
    args.train_images = args.train_images or (40 if args.quick else 200)
    if args.repeats < 1 or args.slice_s < 0 or args.node_seconds <= 0:
        parser.error('--repeats must be >= 1, --slice-s >= 0 and --node-seconds > 0')
    if args.train_classes < 1 or args.train_images < 2 * args.train_classes:
        parser.error('--train-images must give at least 2 images per class')

    import torch

    from ..learner import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.precision != 'fp32' and device.type != 'cuda':
        parser.error(f'--precision {args.precision} needs a CUDA device (half precision runs '
                     f'through CUDA autocast); this run would use {device}. Use --precision '
                     'fp32 on CPU.')
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = run_bench(args, device)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside a bigger process
    text = json.dumps(results, indent=2, allow_nan=False)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w', encoding='utf-8') as f:
            f.write(text + '\n')
        _log(f'wrote {args.out}')
    else:
        print(text)
    if not args.no_table:
        print(format_table(results), file=sys.stderr, flush=True)
    return 0


# --------------------------------------------------------------------------- helpers
def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _spread(values: Sequence[float]) -> float:
    med = _median(values)
    return float((max(values) - min(values)) / med) if med > 0 else 0.0


def _percentiles(values: Sequence[float]) -> Dict[str, Any]:
    if not values:
        return {'n': 0, 'p50': None, 'p95': None, 'mean': None, 'max': None}
    arr = np.asarray(values, dtype=np.float64)
    return {'n': int(arr.size), 'p50': round(float(np.percentile(arr, 50)), 2),
            'p95': round(float(np.percentile(arr, 95)), 2),
            'mean': round(float(arr.mean()), 2), 'max': round(float(arr.max()), 2)}


def _proc_status_kb(pid: Any, field: str) -> Optional[int]:
    try:
        with open(f'/proc/{pid}/status', encoding='ascii') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class _PeakRSS:
    """Peak resident memory of this process over a phase.

    Linux resets VmHWM to the current RSS when '5' is written to ``/proc/self/clear_refs``;
    where that is impossible, ``ru_maxrss`` (the lifetime peak) is reported and marked so.
    """

    def __init__(self) -> None:
        self.source = 'VmHWM'
        self.start_kb = _proc_status_kb('self', 'VmRSS') or 0
        try:
            with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
                f.write('5')
        except OSError:
            self.source = 'ru_maxrss (lifetime peak)'

    def peak_kb(self) -> int:
        if self.source == 'VmHWM':
            hwm = _proc_status_kb('self', 'VmHWM')
            if hwm is not None:
                return hwm
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def report(self) -> Dict[str, Any]:
        peak = self.peak_kb()
        return {'rss_before_mb': round(self.start_kb / 1024, 1),
                'peak_rss_mb': round(peak / 1024, 1),
                'peak_increase_mb': round(max(peak - self.start_kb, 0) / 1024, 1),
                'source': self.source}


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            for line in f:
                if line.lower().startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_times() -> Tuple[float, float, float]:
    """(busy seconds of all CPUs, stolen seconds, CPU seconds of this process and its
    waited-for children) for measuring how much else ran during the benchmark."""
    busy = steal = 0.0
    try:
        with open('/proc/stat', encoding='ascii') as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        tick = float(os.sysconf('SC_CLK_TCK'))
        busy = (vals[0] + vals[1] + vals[2] + vals[5] + vals[6]) / tick
        steal = (vals[7] if len(vals) > 7 else 0) / tick
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return busy, steal, t.user + t.system + t.children_user + t.children_system


def _other_load(start: Tuple[float, float, float], elapsed: float) -> Dict[str, float]:
    end = _cpu_times()
    other = (end[0] - start[0]) - (end[2] - start[2])
    return {'other_processes_cores_busy': round(max(other, 0.0) / elapsed, 2),
            'steal_cores': round((end[1] - start[1]) / elapsed, 2)}


def machine_info(device) -> Dict[str, Any]:
    """The machine the figures come from."""
    import cv2
    import timm
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    info = {
        'cpu_model': _cpu_model(), 'cpu_count': os.cpu_count(), 'cpu_affinity': affinity,
        'torch_threads': torch.get_num_threads(), 'device': str(device),
        'device_name': _cpu_model(), 'torch_version': torch.__version__,
        'timm_version': timm.__version__, 'numpy_version': np.__version__,
        'opencv_version': cv2.__version__, 'python_version': platform.python_version(),
        'platform': platform.platform(),
        'omp_env': {k: os.environ[k] for k in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY',
                                               'MKL_NUM_THREADS') if k in os.environ},
        'loadavg_start': [round(v, 2) for v in os.getloadavg()],
    }
    if device.type == 'cuda':
        info['device_name'] = torch.cuda.get_device_name(device)
        info['cuda_version'] = torch.version.cuda
    return info


def synthetic_frame(rng: np.random.Generator, hw: Tuple[int, int], pattern: int) -> np.ndarray:
    """A uint8 RGB frame: a class-specific colour gradient with noise (not random junk, so
    resizing and the backbone see image-like statistics)."""
    h, w = hw
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    hue = (pattern * 0.37) % 1.0
    freq = 1 + pattern % 5
    r = 0.5 + 0.5 * np.sin(2 * np.pi * (freq * x + hue))
    g = 0.5 + 0.5 * np.cos(2 * np.pi * (freq * y - hue))
    b = (x * y + hue) % 1.0
    img = np.stack([r * np.ones_like(y), g * np.ones_like(x), b], axis=-1) * 200.0
    img += rng.integers(0, 56, size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_task(rng: np.random.Generator, classes: Sequence[str], n_images: int,
                   hw: Tuple[int, int] = FRAME_HW, distinct_per_class: int = 8,
                   first_pattern: int = 0) -> Tuple[List[np.ndarray], List[str]]:
    """``n_images`` labelled frames spread evenly over ``classes``.

    Only ``distinct_per_class`` frames per class are distinct arrays (the rest repeat them)
    to keep the benchmark's own memory small; the learner treats every entry as a sample.
    """
    pool = {c: [synthetic_frame(rng, hw, first_pattern + 7 * i + j)
                for j in range(distinct_per_class)] for i, c in enumerate(classes)}
    images, labels = [], []
    for k in range(n_images):
        c = classes[k % len(classes)]
        images.append(pool[c][(k // len(classes)) % distinct_per_class])
        labels.append(c)
    return images, labels


class _Rounds:
    """Interleaved timing: within each round every item runs in short sub-slices that take
    turns, so all items of a round see the same stretch of machine time.

    Items are ``(name, fn, items_per_call)``. One round gives each item about ``slice_s``
    seconds, cut into sub-slices of ``SUB_SLICE_S`` (each at least one call) that alternate
    between the items; the item's sample is items per second over all its sub-slices of the
    round. A burst of load from another process therefore hits every item of the round about
    equally, and the per-round ratios (see :func:`_ratio`) cancel it.
    """

    SUB_SLICE_S = 0.1

    def __init__(self, repeats: int, slice_s: float, warmup_s: float,
                 sync: Callable[[], None]) -> None:
        self.repeats, self.slice_s, self.warmup_s, self.sync = repeats, slice_s, warmup_s, sync
        self.samples: Dict[str, List[float]] = {}

    def timed(self, fn: Callable[[], Any], min_s: float, min_calls: int) -> Tuple[int, float]:
        """Run ``fn`` until ``min_s`` passed and ``min_calls`` were made: (calls, seconds)."""
        calls = 0
        t0 = time.perf_counter()
        while True:
            fn()
            calls += 1
            self.sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s and calls >= min_calls:
                return calls, elapsed

    def run(self, items: Sequence[Tuple[str, Callable[[], Any], int]]
            ) -> Dict[str, List[float]]:
        slowest = 0.0
        for _, fn, _ in items:
            c, t = self.timed(fn, self.warmup_s, 2)
            slowest = max(slowest, t / c)
        # Sub-slices no shorter than the slowest call, so a round stays about
        # len(items) * slice_s long even when calls are slow (a busy machine).
        subs = max(1, min(int(round(self.slice_s / self.SUB_SLICE_S)),
                          int(self.slice_s / max(slowest, 1e-9))))
        for r in range(self.repeats):
            calls = {name: 0 for name, _, _ in items}
            secs = {name: 0.0 for name, _, _ in items}
            for k in range(subs):
                order = list(items) if (r * subs + k) % 2 == 0 else list(reversed(items))
                for name, fn, _ in order:
                    c, t = self.timed(fn, self.slice_s / subs, 1)
                    calls[name] += c
                    secs[name] += t
            for name, _, n in items:
                self.samples.setdefault(name, []).append(calls[name] * n / secs[name])
        return self.samples


def _ratio(samples: Dict[str, List[float]], num: str, den: str, scale: float = 1.0) -> float:
    """Median over rounds of num/den (the per-round pairing cancels machine drift)."""
    return _median([a / (b * scale) for a, b in zip(samples[num], samples[den])])


# --------------------------------------------------------------------------- model part
def _grow_payload(payload: Dict[str, Any], learner_factory: Callable[[], Any], n_tasks: int,
                  classes_per_task: int, seed: int) -> Dict[str, Any]:
    """A checkpoint payload grown to ``n_tasks`` with synthetic tasks.

    Synthetic tasks go through the model's own growth API (add_task, add_classes,
    add_class_statistics) with random query features around the real classes' means, so
    their cost at inference is that of learned tasks; no training is needed.
    """
    import torch

    learner = learner_factory()
    learner.load_checkpoint_payload(payload)
    state = copy.deepcopy(learner.state)
    classes = list(payload['classes'])
    tasks = [list(t) for t in payload['tasks']]
    gen = torch.Generator().manual_seed(seed)
    seen = state.class_count > 0
    base = state.query_mean[seen].mean(0).cpu() if bool(seen.any()) \
        else torch.ones(state.feature_dim)
    per_class = 16
    while state.num_tasks < n_tasks:
        task_id = state.add_task()
        ids = state.add_classes(classes_per_task, task_id)
        names = [f'synthetic_{task_id}_{j}' for j in range(classes_per_task)]
        class_ids = torch.tensor(ids).repeat_interleave(per_class)
        scale = 1.0 + 0.5 * torch.randn(len(ids), state.feature_dim, generator=gen)
        noise = 0.1 * torch.randn(len(class_ids), state.feature_dim, generator=gen)
        queries = (base * scale.repeat_interleave(per_class, 0) + noise).clamp_min(0)
        device = state.query_mean.device
        state.add_class_statistics(class_ids.to(device), queries.to(device))
        classes += names
        tasks.append(names)
    grown = dict(payload)
    arch = dict(payload['architecture'])
    arch['class_task'] = state.class_task.tolist()
    arch['num_tasks'] = state.num_tasks
    grown.update(architecture=arch, classes=classes, tasks=tasks,
                 model_version=int(payload['model_version']) + n_tasks - len(payload['tasks']),
                 state_dict={k: v.detach().cpu().clone() for k, v in state.state_dict().items()})
    return grown


def _train_floor_fn(learner, x, autocast, later_task: bool) -> Callable[[], None]:
    """One no-grad query pass + one prompted forward with trainable prompts + backward.

    ``later_task``: the floor of learning a second task onto ``learner``'s one, with the
    prompts the learner trains then (a new E-prompt; the G-prompt only when the learner
    trains it past the first task); otherwise that of the first task (G and E).
    """
    import torch

    backbone = learner.backbone
    state = copy.deepcopy(learner.state)
    task_id = 0
    if later_task:
        task_id = state.add_task()
        train_g = not getattr(learner.config, 'g_prompt_first_task_only', False)
        try:
            state.trainable_parameters(task_id, train_g)
        except TypeError:  # a learner without the G-prompt switch trains it always
            pass
    state.train()
    task_ids = torch.full((x.shape[0],), task_id, dtype=torch.long, device=x.device)

    def floor() -> None:
        with torch.no_grad(), autocast():
            backbone.query(x)
        with autocast():
            z = backbone.forward_prompted(x, state.prompts_for(task_ids))
            loss = z.float().square().mean()
        loss.backward()
        state.zero_grad(set_to_none=True)
    return floor


def model_section(args, device) -> Dict[str, Any]:
    """Backbone, inference, learning, scaling, memory and checkpoint figures."""
    import torch

    from ..learner import ContinualLearner, LearnerConfig
    from ..model import load_backbone

    t_load = time.perf_counter()
    backbone = load_backbone(args.backbone, args.backbone_checkpoint, image_size=args.image_size)
    load_s = time.perf_counter() - t_load
    cfg_kw = dict(backbone=args.backbone, backbone_checkpoint=args.backbone_checkpoint,
                  device=args.device, precision=args.precision, image_size=args.image_size)
    if args.epochs:
        cfg_kw['epochs'] = args.epochs
    elif args.quick:
        cfg_kw['epochs'] = 1
    if args.batch_size:
        cfg_kw['batch_size'] = args.batch_size
    modes = {'fast': True, 'naive': False} if args.compare_naive else {'fast': True}
    configs = {m: LearnerConfig(fast_paths=fp, **cfg_kw) for m, fp in modes.items()}

    def factory(mode: str = 'fast'):
        return ContinualLearner(configs[mode], backbone=backbone)

    probe = factory()
    cfg = probe.config
    autocast = probe._autocast  # the learner's own autocast (fp32: disabled)
    is_cuda = probe.device.type == 'cuda'
    sync = (lambda: torch.cuda.synchronize(probe.device)) if is_cuda else (lambda: None)
    rng = np.random.default_rng(0)
    _log(f'backbone {args.backbone} loaded in {load_s:.1f} s; device {probe.device}, '
         f'{torch.get_num_threads()} torch threads, image size {cfg.image_size}, '
         f'first prompted layer {probe.state.first_layer} of {backbone.num_layers}')

    # ---- learn two real tasks (fast path), keep payloads after 1 and 2 tasks
    n_train = args.train_images
    classes_a = [f'a{i}' for i in range(args.train_classes)]
    classes_b = [f'b{i}' for i in range(args.train_classes)]
    train_a = synthetic_task(rng, classes_a, n_train)
    train_b = synthetic_task(rng, classes_b, n_train, first_pattern=100)
    base = factory()
    base.learn_task(*train_a)
    payloads = {1: base.checkpoint_payload()}
    base.learn_task(*train_b)
    payloads[2] = base.checkpoint_payload()
    counts = sorted({1, 2} | set(args.tasks_scaling))
    for n in counts:
        if n not in payloads:
            payloads[n] = _grow_payload(payloads[2], factory, n, args.train_classes, seed=n)

    # ---- checkpoint bytes
    ckpt_sizes: Dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix='cbpnet-bench-ckpt-') as tmp:
        for n in counts:
            learner = factory()
            learner.load_checkpoint_payload(payloads[n])
            ckpt_sizes[str(n)] = os.path.getsize(learner.save_checkpoint(
                os.path.join(tmp, f'tasks_{n}')))
    checkpoint = {'bytes_by_tasks': ckpt_sizes,
                  'bytes_per_task': ckpt_sizes['2'] - ckpt_sizes['1']}
    if len(counts) > 2 and counts[-1] > 2:
        lo = max(c for c in counts if c >= 2 and c < counts[-1])
        checkpoint[f'bytes_per_task_{lo}_to_{counts[-1]}'] = round(
            (ckpt_sizes[str(counts[-1])] - ckpt_sizes[str(lo)]) / (counts[-1] - lo), 1)

    # ---- throughput rounds: backbone, inference (1, 2 tasks; scaling), fast and naive
    frames = [synthetic_frame(rng, FRAME_HW, 200 + i) for i in range(max(BATCH_SIZES))]
    learners: Dict[Tuple[str, int], Any] = {}
    for mode in modes:
        for n in counts:
            learner = factory(mode)
            learner.load_checkpoint_payload(payloads[n])
            learner.predict(frames[:1])  # builds caches
            learners[mode, n] = learner
    model = backbone.model
    tensors = {b: probe.preprocess(frames[:b]) for b in BATCH_SIZES}

    def backbone_fn(b: int) -> Callable[[], Any]:
        x = tensors[b]

        def run():
            with torch.inference_mode(), autocast():
                return model.forward_head(model.forward_features(x), pre_logits=True)
        return run

    def predict_fn(learner, b: int) -> Callable[[], Any]:
        batch = frames[:b]
        return lambda: learner.predict(batch)

    items = [(f'backbone_b{b}', backbone_fn(b), b) for b in BATCH_SIZES]
    for mode in modes:
        for n in sorted({1, 2}):
            for b in BATCH_SIZES:
                items.append((f'{mode}_t{n}_b{b}', predict_fn(learners[mode, n], b), b))
        for n in counts:
            if n not in (1, 2):
                items.append((f'{mode}_t{n}_b8', predict_fn(learners[mode, n], 8), 8))
    _log(f'timing {len(items)} inference items x {args.repeats} rounds '
         f'({args.slice_s:g} s slices)')
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(probe.device)
    infer_mem = _PeakRSS()
    rounds = _Rounds(args.repeats, args.slice_s, args.warmup_s, sync)
    s = rounds.run(items)
    memory: Dict[str, Any] = {'inference': infer_mem.report()}
    if is_cuda:
        memory['inference']['cuda_max_allocated_mb'] = round(
            torch.cuda.max_memory_allocated(probe.device) / 2 ** 20, 1)

    # ---- learning rounds: learn_task vs the directly measured floor. The main figure is a
    # later task (a second task learned onto one: what a robot does for all but its first,
    # with the feature replay and the frozen G-prompt that later tasks bring); the first
    # task is measured beside it. Every learn_task starts from a fresh learner.
    train_bs = cfg.batch_size
    x_floor = probe.preprocess(train_b[0][:train_bs])
    floor_learner = factory()
    floor_learner.load_checkpoint_payload(payloads[1])
    floors = {'train_floor': _train_floor_fn(floor_learner, x_floor, autocast, True),
              'train_floor_first': _train_floor_fn(floor_learner, x_floor, autocast, False)}
    learn_results: Dict[str, List[Dict[str, Any]]] = {}

    def learn_fn(mode: str, first: bool) -> Callable[[], None]:
        key = f'{mode}_first' if first else mode

        def run():
            learner = factory(mode)
            if not first:
                learner.load_checkpoint_payload(payloads[1])
            steps: List[Any] = []
            result = learner.learn_task(*(train_a if first else train_b),
                                        progress=steps.append)
            learn_results.setdefault(key, []).append(result.as_dict())
        return run

    train_items = [(f'train_{m}', learn_fn(m, False), n_train * cfg.epochs) for m in modes]
    train_items += [(f'train_first_{m}', learn_fn(m, True), n_train * cfg.epochs)
                    for m in modes]
    _log(f'timing learn_task ({n_train} images, {cfg.epochs} epochs, batch {train_bs}; '
         f'first and later task) x {args.repeats} rounds')
    # Warm-up: a small first and later task through every mode (allocations, kernels).
    warm = synthetic_task(rng, classes_b, max(2 * train_bs, 8))
    for mode in modes:
        factory(mode).learn_task(*warm)
        learner = factory(mode)
        learner.load_checkpoint_payload(payloads[1])
        learner.learn_task(*warm)
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(probe.device)
    learn_mem = _PeakRSS()
    # One learn_task per item per round, with floor slices before, between and after them, so
    # the floors of a round are measured across the same stretch of time as its learn_tasks.
    train_rounds = _Rounds(args.repeats, 0.0, 0.0, sync)
    for floor in floors.values():
        train_rounds.timed(floor, args.warmup_s, 2)
    floor_slice = args.slice_s / (len(train_items) + 1) / len(floors)
    for r in range(args.repeats):
        f_acc = {name: [0, 0.0] for name in floors}

        def floor_slices() -> None:
            for name, floor in floors.items():
                c, t = train_rounds.timed(floor, floor_slice, 1)
                f_acc[name][0] += c
                f_acc[name][1] += t
        for name, fn, n in (train_items if r % 2 == 0 else list(reversed(train_items))):
            floor_slices()
            c, t = train_rounds.timed(fn, 0.0, 1)
            train_rounds.samples.setdefault(name, []).append(n / t)
        floor_slices()
        for name, (c, t) in f_acc.items():
            train_rounds.samples.setdefault(name, []).append(c * train_bs / t)
    memory['learning'] = learn_mem.report()
    memory['learning']['task_images'] = n_train
    if is_cuda:
        memory['learning']['cuda_max_allocated_mb'] = round(
            torch.cuda.max_memory_allocated(probe.device) / 2 ** 20, 1)
    s.update(train_rounds.samples)

    # ---- assemble
    def fig(name: str) -> float:
        return round(_median(s[name]), 2)

    def per_mode(mode: str) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            'inference_ips': {f'batch_{b}': fig(f'{mode}_t2_b{b}') for b in BATCH_SIZES},
            'inference_ips_one_task': {f'batch_{b}': fig(f'{mode}_t1_b{b}')
                                       for b in BATCH_SIZES},
            'inference_floor_ratio': {
                f'batch_{b}': round(_ratio(s, f'{mode}_t2_b{b}', f'backbone_b{b}', 0.5), 3)
                for b in BATCH_SIZES},
            'inference_floor_ratio_one_task': {
                f'batch_{b}': round(_ratio(s, f'{mode}_t1_b{b}', f'backbone_b{b}', 0.5), 3)
                for b in BATCH_SIZES},
            'train_ips': fig(f'train_{mode}'),
            'train_floor_ips': fig('train_floor'),
            'train_floor_ratio': round(_ratio(s, f'train_{mode}', 'train_floor'), 3),
            'train_task_duration_s': round(_median(
                [r['duration_s'] for r in learn_results[mode]]), 3),
            'train_ips_first_task': fig(f'train_first_{mode}'),
            'train_floor_ips_first_task': fig('train_floor_first'),
            'train_floor_ratio_first_task': round(
                _ratio(s, f'train_first_{mode}', 'train_floor_first'), 3),
        }
        scaling = {str(n): fig(f'{mode}_t{n}_b8') for n in counts if n in args.tasks_scaling}
        out['tasks_scaling'] = {'batch': 8, 'inference_ips_by_tasks': scaling}
        big = [n for n in args.tasks_scaling if n >= 2]
        if len(big) >= 2:
            lo, hi = big[-2], big[-1]
            slow = 1.0 - _ratio(s, f'{mode}_t{hi}_b8', f'{mode}_t{lo}_b8')
            out['tasks_scaling'][f'slowdown_{hi}_vs_{lo}'] = round(slow, 4)
        return out

    result: Dict[str, Any] = {
        'backbone_ips': {f'batch_{b}': fig(f'backbone_b{b}') for b in BATCH_SIZES},
        **per_mode('fast'),
        'memory': memory,
        'checkpoint': checkpoint,
        'learn_task_result': {'later_task': learn_results['fast'][-1],
                              'first_task': learn_results['fast_first'][-1]},
        'settings': {
            'backbone': args.backbone, 'backbone_checkpoint': args.backbone_checkpoint,
            'device': str(probe.device), 'precision': args.precision,
            'image_size': cfg.image_size, 'frame_hw': list(FRAME_HW),
            'first_prompted_layer': probe.state.first_layer,
            'num_prompt_layers': backbone.num_layers,
            'g_prompt_layers': cfg.g_prompt_layers, 'e_prompt_layers': cfg.e_prompt_layers,
            'prompt_selection': cfg.prompt_selection, 'prediction': cfg.prediction,
            'train_images': n_train, 'train_classes': args.train_classes,
            'epochs': cfg.epochs, 'batch_size': train_bs, 'repeats': args.repeats,
            'slice_s': args.slice_s, 'warmup_s': args.warmup_s, 'quick': args.quick,
            'backbone_load_s': round(load_s, 2),
        },
        'spread': {k: round(_spread(v), 3) for k, v in s.items()},
        'samples': {k: [round(x, 2) for x in v] for k, v in s.items()},
    }
    if args.compare_naive:
        naive = per_mode('naive')
        naive['note'] = ('fast_paths=False: two full backbone passes per prediction (no shared '
                         'trunk, no one-task shortcut) and no per-task trunk cache in training; '
                         'learn_task still computes each sample\'s query once per task')
        result['naive'] = naive
        result['fast_over_naive'] = {
            'inference_batch_1': round(_ratio(s, 'fast_t2_b1', 'naive_t2_b1'), 3),
            'inference_batch_8': round(_ratio(s, 'fast_t2_b8', 'naive_t2_b8'), 3),
            'inference_one_task_batch_1': round(_ratio(s, 'fast_t1_b1', 'naive_t1_b1'), 3),
            'inference_one_task_batch_8': round(_ratio(s, 'fast_t1_b8', 'naive_t1_b8'), 3),
            'train': round(_ratio(s, 'train_fast', 'train_naive'), 3),
            'train_first_task': round(_ratio(s, 'train_first_fast', 'train_first_naive'), 3),
        }
    return result


# --------------------------------------------------------------------------- node part
def _ros_env() -> Dict[str, str]:
    """DDS on loopback, in a domain of this run's own (unless the caller chose one)."""
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    os.environ.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 50))
    env = dict(os.environ)
    env.setdefault('PYTHONUNBUFFERED', '1')
    env.setdefault('HF_HUB_OFFLINE', '1')
    return env


def _node_command(params_file: str, command: str = '') -> List[str]:
    exe = os.path.join(os.path.dirname(sys.executable), 'cbpnet_node')
    ros_args = ['--ros-args', '--params-file', params_file]
    if command.strip():
        return shlex.split(command) + ros_args
    if os.access(exe, os.X_OK):
        return [exe] + ros_args
    return [sys.executable, '-c', 'import sys; from ros2_cbpnet.node import main; '
            'sys.exit(main())'] + ros_args


def _yaml_value(v: Any) -> str:
    return json.dumps(v)  # JSON scalars and lists are valid YAML flow values


class _RSSSampler(threading.Thread):
    """Samples a process's VmRSS every ``period_s``; keeps the peak per phase."""

    def __init__(self, pid: int, period_s: float = 0.2) -> None:
        super().__init__(daemon=True, name='cbpnet-bench-rss')
        self.pid, self.period_s = pid, period_s
        self.phase = 'startup'
        self.peaks_kb: Dict[str, int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period_s):
            kb = _proc_status_kb(self.pid, 'VmRSS')
            if kb is None:
                return
            self.peaks_kb[self.phase] = max(self.peaks_kb.get(self.phase, 0), kb)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2.0)


def _stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> Dict[str, Any]:
    """SIGINT, wait; escalate to SIGTERM and SIGKILL only if it will not stop."""
    if proc.poll() is not None:
        return {'exit_code': proc.returncode, 'signal': None, 'stop_s': 0.0}
    t0 = time.monotonic()
    for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 5.0),
                        (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            return {'exit_code': proc.returncode, 'signal': signal.Signals(sig).name,
                    'stop_s': round(time.monotonic() - t0, 2)}
        except subprocess.TimeoutExpired:
            continue
    return {'exit_code': proc.poll(), 'signal': 'SIGKILL', 'stop_s': round(
        time.monotonic() - t0, 2)}


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError:
        return ''


class _NodeBench:
    """The bench side of the node measurement: an rclpy node in its own context."""

    def __init__(self, ns: str = '/cbpnet') -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from std_msgs.msg import String

        self.ns = ns
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('cbpnet_bench', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.predictions: List[Tuple[float, Dict[str, Any]]] = []
        self.diagnostics: Dict[str, Dict[str, str]] = {}
        self._string = String
        self._thread = threading.Thread(target=self._spin, daemon=True, name='cbpnet-bench-spin')
        self._thread.start()
        self.pred_sub = None

    def _spin(self) -> None:
        while not self._stop.is_set():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # noqa: BLE001 - shutdown races end the loop
                if self._stop.is_set():
                    return
                raise

    def _on_prediction(self, msg) -> None:
        now = time.time()
        try:
            data = json.loads(msg.data)
        except ValueError:
            return
        with self._lock:
            self.predictions.append((now, data))

    def _on_diagnostics(self, msg) -> None:
        for st in msg.status:
            if st.name.startswith('cbpnet:'):
                self.diagnostics[st.name] = {kv.key: kv.value for kv in st.values}

    def subscribe_outputs(self, timeout_s: float) -> str:
        """Subscribe to the predictions with the publisher's reliability; returns it."""
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

        topic = f'{self.ns}/predictions'
        reliability = ReliabilityPolicy.RELIABLE
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            infos = self.node.get_publishers_info_by_topic(topic)
            if infos:
                if all(i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
                       for i in infos):
                    reliability = ReliabilityPolicy.BEST_EFFORT
                break
            time.sleep(0.1)
        qos = QoSProfile(depth=200, history=HistoryPolicy.KEEP_LAST, reliability=reliability)
        self.pred_sub = self.node.create_subscription(self._string, topic, self._on_prediction,
                                                      qos)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        return reliability.name.lower()

    def take_predictions(self) -> List[Tuple[float, Dict[str, Any]]]:
        with self._lock:
            out, self.predictions = self.predictions, []
        return out

    def close(self) -> None:
        import rclpy

        self._stop.set()
        self._thread.join(timeout=5.0)
        try:
            self.executor.shutdown(timeout_sec=1.0)
        except Exception:  # noqa: BLE001
            pass
        self.node.destroy_node()
        with contextlib.suppress(Exception):
            rclpy.shutdown(context=self.context)


def _wait(cond: Callable[[], bool], timeout_s: float, proc: subprocess.Popen, what: str,
          log_path: str, period_s: float = 0.05) -> float:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f'cbpnet_node exited ({proc.returncode}) while waiting for '
                               f'{what}; its log ends with:\n{_tail(log_path)}')
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f'timed out after {timeout_s:.0f} s waiting for {what}; node log '
                               f'ends with:\n{_tail(log_path)}')
        time.sleep(period_s)
    return time.monotonic() - t0


def _stamp(msg) -> None:
    ns = time.time_ns()
    msg.header.stamp.sec, msg.header.stamp.nanosec = ns // 1_000_000_000, ns % 1_000_000_000


def node_section(args, model: Dict[str, Any]) -> Dict[str, Any]:
    """cbpnet_node in a subprocess, fed by real DDS from this process."""
    env = _ros_env()
    if args.threads:
        env['OMP_NUM_THREADS'] = str(args.threads)
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from std_srvs.srv import Trigger

    from ..image_codec import rgb_to_image_msg

    cams = max(args.node_cameras)
    topics = [f'/bench/cam{i}' for i in range(cams)]
    tmp = tempfile.mkdtemp(prefix='cbpnet-bench-node-')
    params = {
        'backbone': args.backbone, 'device': args.device, 'image_size': args.image_size,
        'image_topics': topics, 'image_qos': args.node_image_qos,
        'checkpoint_dir': os.path.join(tmp, 'checkpoints'), 'epochs': 1,
        'min_samples_per_class': 2, 'diagnostics_period_s': 1.0,
    }
    if args.backbone_checkpoint:
        params['backbone_checkpoint'] = args.backbone_checkpoint
    if args.precision != 'fp32':
        params['precision'] = args.precision
    params_file = os.path.join(tmp, 'params.yaml')
    with open(params_file, 'w', encoding='utf-8') as f:
        f.write('cbpnet:\n  ros__parameters:\n')
        for k, v in params.items():
            f.write(f'    {k}: {_yaml_value(v)}\n')
    log_path = os.path.join(tmp, 'node.log')
    cmd = _node_command(params_file, args.node_command)
    out: Dict[str, Any] = {'params': params, 'command': cmd, 'log': log_path,
                           'ros_domain_id': int(env['ROS_DOMAIN_ID'])}
    _log(f'starting {" ".join(cmd)} (ROS_DOMAIN_ID={env["ROS_DOMAIN_ID"]}, log {log_path})')
    t_start = time.monotonic()
    with open(log_path, 'wb') as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    sampler = _RSSSampler(proc.pid)
    sampler.start()
    bench = None
    try:
        bench = _NodeBench()
        node = bench.node
        client = node.create_client(Trigger, '/cbpnet/learn_task')
        _wait(lambda: client.service_is_ready(), args.node_timeout_s, proc,
              'the /cbpnet/learn_task service', log_path)
        out['startup_s'] = round(time.monotonic() - t_start, 2)
        out['predictions_qos'] = bench.subscribe_outputs(5.0)

        # ---- teach one task through the topics and the service
        sampler.phase = 'learning'
        rng = np.random.default_rng(1)
        per_class = 20
        images, labels = synthetic_task(rng, ['bench_a', 'bench_b'], 2 * per_class, FRAME_HW,
                                        distinct_per_class=per_class)
        teach_qos = QoSProfile(depth=len(images), history=HistoryPolicy.KEEP_LAST,
                               reliability=ReliabilityPolicy.RELIABLE,
                               durability=DurabilityPolicy.VOLATILE)
        from sensor_msgs.msg import Image
        teach_pub = node.create_publisher(Image, '/cbpnet/labelled_images', teach_qos)
        _wait(lambda: teach_pub.get_subscription_count() > 0, 30.0, proc,
              'the labelled_images subscription', log_path)
        time.sleep(0.3)  # the match is seen here before the reader is fully set up
        for img, label in zip(images, labels):
            msg = rgb_to_image_msg(img, 'bgr8')
            msg.header.frame_id = label
            _stamp(msg)
            teach_pub.publish(msg)
            time.sleep(0.01)
        time.sleep(1.0)
        reply, t_learn = None, time.monotonic()
        for attempt in range(10):
            future = client.call_async(Trigger.Request())
            _wait(future.done, args.node_timeout_s, proc, 'the learn_task reply', log_path)
            reply = future.result()
            if reply.success:
                break
            _log(f'learn_task attempt {attempt + 1}: {reply.message}; retrying')
            time.sleep(1.0)
        if reply is None or not reply.success:
            raise RuntimeError(f'learn_task failed: {reply.message if reply else "no reply"}')
        out['learn_task_s'] = round(time.monotonic() - t_learn, 2)
        try:
            out['learn_task'] = json.loads(reply.message)
        except ValueError:
            out['learn_task'] = reply.message
        out['teach_images'] = len(images)

        # ---- cameras
        cam_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE)
        pubs = [node.create_publisher(Image, t, cam_qos) for t in topics]
        msgs = [[rgb_to_image_msg(synthetic_frame(rng, FRAME_HW, 300 + 2 * c + j), 'bgr8')
                 for j in range(2)] for c in range(cams)]
        _wait(lambda: all(p.get_subscription_count() > 0 for p in pubs), 30.0, proc,
              'the camera subscriptions', log_path)
        time.sleep(0.3)
        out['cameras'] = {}
        warm_s = min(3.0, max(1.0, args.node_seconds / 5))
        for n_cams in args.node_cameras:
            sampler.phase = f'inference_{n_cams}cam'
            out['cameras'][str(n_cams)] = _run_cameras(
                bench, pubs[:n_cams], msgs, n_cams, warm_s, args.node_seconds, proc, log_path)
        out['diagnostics'] = bench.diagnostics
        out['node_vm_hwm_mb'] = round((_proc_status_kb(proc.pid, 'VmHWM') or 0) / 1024, 1)
    finally:
        sampler.stop()
        out['stop'] = _stop_process(proc)
        if bench is not None:
            bench.close()
    out['node_rss_peak_mb'] = {k: round(v / 1024, 1) for k, v in sampler.peaks_kb.items()}
    if out['stop']['signal'] != 'SIGINT' or out['stop']['exit_code'] not in (0, -2, 130):
        out['log_tail'] = _tail(log_path, 20)
    return out


def _run_cameras(bench: _NodeBench, pubs, msgs, n_cams: int, warm_s: float, measure_s: float,
                 proc: subprocess.Popen, log_path: str) -> Dict[str, Any]:
    """Publish ``n_cams`` staggered cameras at 30 Hz; count predictions of the window."""
    tick = 1.0 / (CAMERA_RATE_HZ * n_cams)  # cameras run with evenly spread phases
    published = [0] * n_cams
    bench.take_predictions()
    t_begin = time.perf_counter()
    t_measure = t_begin + warm_s
    t_end = t_measure + measure_s
    next_t, k = t_begin, 0
    wall_measure = wall_end = None
    while True:
        now = time.perf_counter()
        if now >= t_end:
            wall_end = time.time()
            break
        if wall_measure is None and now >= t_measure:
            wall_measure = time.time()
            published = [0] * n_cams
        cam = k % n_cams
        msg = msgs[cam][(k // n_cams) % 2]
        _stamp(msg)
        msg.header.frame_id = f'cam{cam}:{k // n_cams}'
        pubs[cam].publish(msg)
        published[cam] += 1
        k += 1
        next_t += tick
        delay = next_t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        elif delay < -tick:
            next_t = time.perf_counter()  # fell behind: never burst
        if k % 30 == 0 and proc.poll() is not None:
            raise RuntimeError(f'cbpnet_node exited ({proc.returncode}); log:\n{_tail(log_path)}')
    time.sleep(1.5)  # let the predictions of the last frames arrive
    preds = bench.take_predictions()
    duration = wall_end - wall_measure
    node_lat, e2e_lat = [], []
    per_source: Dict[str, int] = {}
    late = 0
    for recv, p in preds:
        stamp = p.get('stamp') or {}
        t_stamp = float(stamp.get('sec', 0)) + float(stamp.get('nanosec', 0)) * 1e-9
        if not wall_measure <= t_stamp < wall_end:
            continue  # a warm-up frame, or not one of ours
        src = str(p.get('source', '?'))
        per_source[src] = per_source.get(src, 0) + 1
        if isinstance(p.get('latency_ms'), (int, float)):
            node_lat.append(float(p['latency_ms']))
        e2e_lat.append((recv - t_stamp) * 1000.0)
        late += recv > wall_end
    classified = sum(per_source.values())
    total_pub = sum(published)
    return {
        'cameras': n_cams, 'seconds': round(duration, 2),
        'published_fps': round(total_pub / duration, 2),
        'classified_fps': round(classified / duration, 2),
        'classified_fraction': round(classified / total_pub, 3) if total_pub else 0.0,
        'per_source_fps': {k: round(v / duration, 2) for k, v in sorted(per_source.items())},
        'node_latency_ms': _percentiles(node_lat),
        'e2e_latency_ms': _percentiles(e2e_lat),
        'predictions_after_window': late,
    }


# --------------------------------------------------------------------------- assembly
def run_bench(args, device) -> Dict[str, Any]:
    """All figures as one JSON-ready dict."""
    t0 = time.perf_counter()
    cpu0 = _cpu_times()
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        _log(f'the machine is busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): '
             'expect noisy figures; see machine.other_processes_cores_busy and spread')
        import torch
        if torch.get_num_threads() > 1 and os.environ.get('OMP_WAIT_POLICY', '').upper() \
                != 'PASSIVE':
            _log('with one OpenMP thread per core next to other busy processes, torch on CPU '
                 'can run many times slower (threads spin-wait for descheduled peers); '
                 '--threads 1 or OMP_WAIT_POLICY=PASSIVE avoid that')
    results: Dict[str, Any] = {'tool': 'cbpnet-bench', 'version': 1,
                               'machine': machine_info(device)}
    results.update(model_section(args, device))
    if args.skip_node:
        results['node'] = {'skipped': True}
        results.update(node_fps=None, node_latency_ms=None, node_e2e_latency_ms=None,
                       node_vs_model=None, node_multi_camera=None)
    else:
        node = node_section(args, results)
        results['node'] = node
        cams = node['cameras']
        one = cams.get('1') or cams[str(min(args.node_cameras))]
        model_b1 = results['inference_ips_one_task']['batch_1']
        results['node_fps'] = one['classified_fps']
        results['node_latency_ms'] = {k: one['node_latency_ms'][k] for k in ('p50', 'p95')}
        results['node_e2e_latency_ms'] = {k: one['e2e_latency_ms'][k] for k in ('p50', 'p95')}
        results['node_vs_model'] = round(
            one['classified_fps'] / min(CAMERA_RATE_HZ, model_b1), 3)
        multi = {}
        for n, c in cams.items():
            if n != '1':
                multi[n] = {'aggregate_fps': c['classified_fps'],
                            'vs_one_camera': round(c['classified_fps'] / one['classified_fps'], 3)
                            if one['classified_fps'] else None,
                            # what the model could do with batches of frames (informative)
                            'vs_model_capacity': round(c['classified_fps'] / min(
                                CAMERA_RATE_HZ * int(n),
                                results['inference_ips_one_task']['batch_8']), 3),
                            'node_latency_ms': {k: c['node_latency_ms'][k]
                                                for k in ('p50', 'p95')},
                            'e2e_latency_ms': {k: c['e2e_latency_ms'][k] for k in ('p50', 'p95')}}
        results['node_multi_camera'] = multi
        results['memory']['node'] = {'rss_peak_mb_by_phase': node.get('node_rss_peak_mb'),
                                     'vm_hwm_mb': node.get('node_vm_hwm_mb')}
    results['machine']['loadavg_end'] = [round(v, 2) for v in os.getloadavg()]
    # CPU time that other processes used while this ran (the node's is this run's own).
    results['machine'].update(_other_load(cpu0, time.perf_counter() - t0))
    results['targets'] = targets(results)
    results['bench_seconds'] = round(time.perf_counter() - t0, 1)
    return results


def targets(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The performance issue's targets, each with the value measured and whether it is met."""
    out: List[Dict[str, Any]] = []

    def add(name: str, value: Optional[float], op: str, target: float) -> None:
        if value is None:
            return
        met = value >= target if op == '>=' else value > target if op == '>' else \
            value <= target
        out.append({'name': name, 'value': value, 'target': f'{op} {target:g}', 'met': bool(met)})

    fr = r['inference_floor_ratio']
    add('inference_floor_ratio batch 8 (2 tasks)', fr['batch_8'], '>=', TARGET_FLOOR_B8)
    add('inference_floor_ratio batch 1 (2 tasks)', fr['batch_1'], '>=', TARGET_FLOOR_B1)
    s = r['settings']
    if s['first_prompted_layer'] > 0 and 'vit' not in s['backbone']:
        for b in BATCH_SIZES:
            add(f'inference_floor_ratio batch {b} (2 tasks, shared CNN trunk)',
                fr[f'batch_{b}'], '>', 1.0)
    for b in BATCH_SIZES:
        add(f'inference_floor_ratio batch {b} (1 task)',
            r['inference_floor_ratio_one_task'][f'batch_{b}'], '>', 1.0)
    for suffix, label in (('', 'later task'), ('_first_task', 'first task')):
        value = r[f'train_floor_ratio{suffix}']
        add(f'train_floor_ratio ({label})', value, '>=', TARGET_TRAIN_FLOOR)
        add(f'train_floor_ratio ({label}, per-task cache)', value, '>', 1.0)
    ts = r['tasks_scaling']
    for k, v in ts.items():
        if k.startswith('slowdown_'):
            add(f'tasks_scaling {k}', v, '<=', TARGET_SCALING_SLOWDOWN)
    if r.get('node_vs_model') is not None:
        add('node_vs_model (1 camera)', r['node_vs_model'], '>=', TARGET_NODE_VS_MODEL)
        for n, m in (r.get('node_multi_camera') or {}).items():
            if m.get('vs_one_camera') is not None:
                add(f'node {n} cameras aggregate vs 1 camera', m['vs_one_camera'], '>=', 1.0)
    return out


def format_table(r: Dict[str, Any]) -> str:
    """A readable table of the main figures (fast paths, naive beside them when measured)."""
    naive = r.get('naive')
    rows: List[Tuple[str, str, str]] = []

    def val(d: Optional[Dict[str, Any]], *path: str) -> str:
        cur: Any = d
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return ''
            cur = cur[p]
        if cur is None:
            return '-'
        return f'{cur:.3f}' if isinstance(cur, float) and abs(cur) < 10 else \
            f'{cur:.1f}' if isinstance(cur, float) else str(cur)

    def row(label: str, *path: str, both: bool = True) -> None:
        rows.append((label, val(r, *path), val(naive, *path) if naive and both else ''))

    for b in BATCH_SIZES:
        row(f'backbone_ips batch {b}', 'backbone_ips', f'batch_{b}', both=False)
    for b in BATCH_SIZES:
        row(f'inference_ips batch {b} (2 tasks)', 'inference_ips', f'batch_{b}')
    for b in BATCH_SIZES:
        row(f'inference_ips batch {b} (1 task)', 'inference_ips_one_task', f'batch_{b}')
    for b in BATCH_SIZES:
        row(f'inference_floor_ratio batch {b} (2 tasks)', 'inference_floor_ratio', f'batch_{b}')
    for b in BATCH_SIZES:
        row(f'inference_floor_ratio batch {b} (1 task)', 'inference_floor_ratio_one_task',
            f'batch_{b}')
    row('train_ips (later task)', 'train_ips')
    row('train_floor_ips (later task)', 'train_floor_ips', both=False)
    row('train_floor_ratio (later task)', 'train_floor_ratio')
    row('learn_task duration s (later task)', 'train_task_duration_s')
    row('train_ips (first task)', 'train_ips_first_task')
    row('train_floor_ips (first task)', 'train_floor_ips_first_task', both=False)
    row('train_floor_ratio (first task)', 'train_floor_ratio_first_task')
    for n in r['tasks_scaling']['inference_ips_by_tasks']:
        row(f'tasks_scaling {n} tasks (batch 8)', 'tasks_scaling', 'inference_ips_by_tasks', n)
    for k in r['tasks_scaling']:
        if k.startswith('slowdown_'):
            row(f'tasks_scaling {k}', 'tasks_scaling', k)
    mem = r['memory']
    rows.append(('peak RSS MB inference', val(mem, 'inference', 'peak_rss_mb'), ''))
    rows.append(('peak RSS MB learning', val(mem, 'learning', 'peak_rss_mb'), ''))
    if 'cuda_max_allocated_mb' in mem.get('inference', {}):
        rows.append(('CUDA max allocated MB inference',
                     val(mem, 'inference', 'cuda_max_allocated_mb'), ''))
        rows.append(('CUDA max allocated MB learning',
                     val(mem, 'learning', 'cuda_max_allocated_mb'), ''))
    rows.append(('checkpoint bytes per task', val(r, 'checkpoint', 'bytes_per_task'), ''))
    if r.get('node_fps') is not None:
        rows.append(('node_fps (1 camera)', val(r, 'node_fps'), ''))
        rows.append(('node latency ms p50/p95', f"{val(r, 'node_latency_ms', 'p50')}/"
                     f"{val(r, 'node_latency_ms', 'p95')}", ''))
        rows.append(('node e2e latency ms p50/p95', f"{val(r, 'node_e2e_latency_ms', 'p50')}/"
                     f"{val(r, 'node_e2e_latency_ms', 'p95')}", ''))
        rows.append(('node_vs_model', val(r, 'node_vs_model'), ''))
        for n, m in (r.get('node_multi_camera') or {}).items():
            rows.append((f'node {n} cameras aggregate fps', val(m, 'aggregate_fps'), ''))
            rows.append((f'node {n} cameras e2e ms p50/p95',
                         f"{val(m, 'e2e_latency_ms', 'p50')}/{val(m, 'e2e_latency_ms', 'p95')}",
                         ''))
        node_mem = mem.get('node') or {}
        rows.append(('node VmHWM MB', val(node_mem, 'vm_hwm_mb'), ''))
    width = max(len(x[0]) for x in rows) + 2
    m = r['machine']
    s = r['settings']
    lines = [f"cbpnet-bench: {s['backbone']} @ {s['image_size']} px, {s['device']}, "
             f"{s['precision']}; {m['cpu_model']}, {m['cpu_affinity']} cores, "
             f"{m['torch_threads']} torch threads; load {m['loadavg_start']} -> "
             f"{m.get('loadavg_end')}; other processes kept "
             f"{m.get('other_processes_cores_busy')} cores busy",
             f"{'figure':<{width}}{'fast':>12}{'naive' if naive else '':>12}"]
    lines += [f'{a:<{width}}{b:>12}{c:>12}' for a, b, c in rows]
    lines.append('targets:')
    for t in r['targets']:
        lines.append(f"  [{'met' if t['met'] else 'MISSED':>6}] {t['name']}: {t['value']} "
                     f"(target {t['target']})")
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit(main())
