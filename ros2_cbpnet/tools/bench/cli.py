"""``cbpnet-bench`` command line: arguments, the run, the JSON and the table."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from ..cli_types import non_negative_int, positive_float, positive_int
from .timing import CAMERA_RATE_HZ, log
from .machine import cpu_times, machine_info, other_load
from .report import format_table, targets


def build_parser() -> argparse.ArgumentParser:
    """The ``cbpnet-bench`` argument parser."""
    p = argparse.ArgumentParser(
        prog='cbpnet-bench',
        description='Performance figures of ros2_cbpnet (model, learning, costs that grow '
                    'with tasks, ROS node) as JSON on stdout or --out, and a table on stderr.')
    p.add_argument('--backbone', default='tf_efficientnet_lite0',
                   help='timm model name (default: the embedded tf_efficientnet_lite0)')
    p.add_argument('--backbone-checkpoint', default='',
                   help="weights file, or 'random' for random weights (default: the model's "
                        'own source; embedded weights for tf_efficientnet_lite0)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N (default auto)')
    p.add_argument('--image-size', type=positive_int, default=128,
                   help='model input side in pixels (default 128, the node default)')
    p.add_argument('--precision', default='fp32', choices=('fp32', 'fp16', 'bf16', 'auto'),
                   help='fp32, fp16 (training with a GradScaler), bf16, or auto (bf16 on a GPU '
                        'with native bf16, fp16 on older GPUs, fp32 on CPU); half precision '
                        'needs CUDA')
    p.add_argument('--repeats', type=positive_int, default=None,
                   help='timed rounds per figure; the median is reported (default 5, --quick 2)')
    p.add_argument('--slice-s', type=positive_float, default=None,
                   help='seconds per timed sample of a throughput figure (default 1.0)')
    p.add_argument('--warmup-s', type=positive_float, default=None,
                   help='warm-up seconds per item before timing (default 1.0)')
    p.add_argument('--quick', action='store_true',
                   help='tiny and fast (tests): 2 rounds, short slices, a 40-image task, 1 epoch,'
                        ' no minimum of training steps, 4 tasks for the scaling figures')
    p.add_argument('--threads', type=non_negative_int, default=0,
                   help='torch intra-op threads for this process, and OMP_NUM_THREADS of the '
                        'node subprocess (default: torch default, one per core)')
    p.add_argument('--train-images', type=positive_int, default=None,
                   help='images in each timed learning task (default 200, --quick 40)')
    p.add_argument('--train-classes', type=positive_int, default=2,
                   help='classes per learned task')
    p.add_argument('--epochs', type=positive_int, default=None,
                   help='epochs per learned task (default: LearnerConfig default, --quick 1)')
    p.add_argument('--batch-size', type=positive_int, default=None,
                   help='training batch size (default: LearnerConfig default)')
    p.add_argument('--scaling-tasks', type=positive_int, default=None,
                   help='N of tasks_scaling_2_50 and learn_time_ratio_50_2: tasks learned '
                        '(through learn_task) before comparing with 2 (default 50, --quick 4)')
    p.add_argument('--scaling-images', type=positive_int, default=16,
                   help='images per filler task on the way to N tasks (default 16)')
    p.add_argument('--prediction', default='',
                   help="the learner's prediction mode (LearnerConfig.prediction; default: the "
                        "learner's default). Modes that train prompts give the training "
                        'figures; a statistics-only mode learns without them')
    p.add_argument('--runtime', default='auto',
                   choices=('auto', 'torch', 'onnxruntime', 'both'),
                   help='runtime of the frozen pass (LearnerConfig.runtime) for every figure; '
                        'both = torch and ONNX Runtime side by side in one run: bare pass, '
                        'prediction, learn_task and the node per runtime (default auto)')
    p.add_argument('--onnx-providers', default='',
                   help='ONNX Runtime execution providers, comma-separated (tensorrt, cuda, '
                        'cpu); default: the learner\'s (TensorRT, CUDA, CPU on a GPU)')
    p.add_argument('--runtime-learn-images', type=positive_int, default=None,
                   help='images of the timed learn_task of --runtime both (default 500, '
                        '--quick 40)')
    p.add_argument('--compare-naive', action='store_true',
                   help='also measure the model figures with fast_paths=False')
    p.add_argument('--skip-node', action='store_true', help='skip the ROS node figures')
    p.add_argument('--node-seconds', type=positive_float, default=20.0,
                   help='measured seconds per node configuration (default 20)')
    p.add_argument('--node-cameras', default='1,4',
                   help='raw (bgr8 Image) camera counts to run the node with (default 1,4)')
    p.add_argument('--node-compressed-cameras', default='4',
                   help="JPEG CompressedImage ('.../compressed') camera counts (default 4; "
                        "'' for none)")
    p.add_argument('--node-image-qos', default='reliable', choices=('reliable', 'sensor_data'),
                   help="the node's camera subscription QoS (default reliable: the transport "
                        'then loses no frame, so the figure is the node\'s)')
    p.add_argument('--node-command', default='',
                   help='command that starts the node, split like a shell line; '
                        '"--ros-args --params-file FILE" is appended (default: the cbpnet_node '
                        'console script next to this Python; e.g. "taskset -c 1 cbpnet_node")')
    p.add_argument('--node-profile', default='', metavar='DIR',
                   help='sample the node with py-spy during each camera configuration; raw '
                        'samples go to DIR, a per-thread breakdown into the JSON')
    p.add_argument('--py-spy', default='py-spy', help='the py-spy executable (default: PATH)')
    p.add_argument('--node-timeout-s', type=positive_float, default=180.0,
                   help='give up waiting for the node to start or learn after this long')
    p.add_argument('--out', default='', help='write the JSON here instead of stdout')
    p.add_argument('--no-table', action='store_true', help='no table on stderr')
    return p


def _int_list(text: str, name: str, allow_empty: bool = False) -> List[int]:
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f'{name}: {exc}') from exc
    if (not values and not allow_empty) or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f'{name} must be positive integers, got {text!r}')
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cbpnet-bench``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.node_cameras = sorted(set(_int_list(args.node_cameras, '--node-cameras')))
        args.node_compressed_cameras = sorted(set(_int_list(
            args.node_compressed_cameras, '--node-compressed-cameras', allow_empty=True)))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.slice_s = args.slice_s if args.slice_s is not None else (0.05 if args.quick else 1.0)
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (0.05 if args.quick else 1.0)
    args.train_images = args.train_images or (40 if args.quick else 200)
    args.scaling_tasks = args.scaling_tasks or (4 if args.quick else 50)
    args.runtime_learn_images = args.runtime_learn_images or (40 if args.quick else 500)
    if args.repeats < 1 or args.slice_s < 0 or args.node_seconds <= 0:
        parser.error('--repeats must be >= 1, --slice-s >= 0 and --node-seconds > 0')
    if args.train_classes < 1 or args.train_images < 2 * args.train_classes:
        parser.error('--train-images must give at least 2 images per class')
    if args.scaling_tasks < 3:
        parser.error('--scaling-tasks must be at least 3 (it is compared with 2 tasks)')
    if args.scaling_images < 2 * args.train_classes:
        parser.error('--scaling-images must give at least 2 images per class')

    import torch

    from ...learning.learner import resolve_device
    from ...learning.precision import resolve_precision

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    args.precision = resolve_precision(args.precision, device)
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
    replaced: List[str] = []
    results = finite_json(results, replaced)
    if replaced:
        results['non_finite_replaced_by_null'] = replaced
        log(f'non-finite values reported as null: {", ".join(replaced[:10])}')
    text = json.dumps(results, indent=2, allow_nan=False)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w', encoding='utf-8') as f:
            f.write(text + '\n')
        log(f'wrote {args.out}')
    else:
        print(text)
    if not args.no_table:
        print(format_table(results), file=sys.stderr, flush=True)
    return 0


def finite_json(value: Any, replaced: List[str], path: str = '') -> Any:
    """``value`` with every NaN/inf float replaced by None (strict JSON has neither); the
    paths of the replaced values are appended to ``replaced``."""
    if isinstance(value, float) and not math.isfinite(value):
        replaced.append(path or '/')
        return None
    if isinstance(value, dict):
        return {k: finite_json(v, replaced, f'{path}/{k}') for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, replaced, f'{path}/{i}') for i, v in enumerate(value)]
    return value


def _warn_if_busy() -> None:
    if os.getloadavg()[0] <= 0.5 * (os.cpu_count() or 1):
        return
    log(f'the machine is busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): '
        'expect noisy figures; see machine.other_processes_cores_busy and spread')
    import torch
    if torch.get_num_threads() > 1 and os.environ.get('OMP_WAIT_POLICY', '').upper() \
            != 'PASSIVE':
        log('with one OpenMP thread per core next to other busy processes, torch on CPU '
            'can run many times slower (threads spin-wait for descheduled peers); '
            '--threads 1 or OMP_WAIT_POLICY=PASSIVE avoid that')


def _node_summary(results: Dict[str, Any], node: Dict[str, Any]) -> None:
    """Top-level node figures from the node section."""
    runs = node['runs']
    results['node_cameras'] = {
        name: {'kind': run['kind'], 'cameras': run['cameras'],
               'offered_fps': run['published_fps'], 'classified_fps': run['classified_fps'],
               'classified_fraction': run['classified_fraction'],
               'per_camera': {t: {'classified_fraction': c['classified_fraction'],
                                  'e2e_latency_ms': {k: c['e2e_latency_ms'][k]
                                                     for k in ('p50', 'p95')}}
                              for t, c in run['per_camera'].items()}}
        for name, run in runs.items()}
    one = runs.get('1_raw')
    if one is not None:
        model_b1 = results['inference_ips_one_task']['batch_1']
        results['node_fps'] = one['classified_fps']
        results['node_latency_ms'] = {k: one['node_latency_ms'][k] for k in ('p50', 'p95')}
        results['node_e2e_latency_ms'] = {k: one['e2e_latency_ms'][k] for k in ('p50', 'p95')}
        results['node_vs_model'] = round(
            one['classified_fps'] / min(CAMERA_RATE_HZ, model_b1), 3)
    four = {kind: runs[f'4_{kind}']['classified_fraction'] for kind in ('raw', 'compressed')
            if f'4_{kind}' in runs}
    results['four_camera_classified_fraction'] = four or None


def run_bench(args, device) -> Dict[str, Any]:
    """All figures as one JSON-ready dict."""
    from .model_figures import model_section

    t0 = time.perf_counter()
    cpu0 = cpu_times()
    _warn_if_busy()
    results: Dict[str, Any] = {'tool': 'cbpnet-bench', 'version': 3,
                               'machine': machine_info(device)}
    if args.runtime == 'both':
        return _runtime_comparison(args, device, results, t0, cpu0)
    results.update(model_section(args, device))
    results.update(node_fps=None, node_latency_ms=None, node_e2e_latency_ms=None,
                   node_vs_model=None, node_cameras=None, four_camera_classified_fraction=None)
    if args.skip_node:
        results['node'] = {'skipped': True}
    else:
        from .node_figures import node_section

        node = node_section(args)
        results['node'] = node
        _node_summary(results, node)
        results['memory']['node'] = {'rss_peak_mb_by_phase': node.get('node_rss_peak_mb'),
                                     'vm_hwm_mb': node.get('node_vm_hwm_mb')}
    if device.type == 'cuda':
        results['gpu'] = gpu_summary(results)
    results['machine']['loadavg_end'] = [round(v, 2) for v in os.getloadavg()]
    # CPU time that other processes used while this ran (the node's is this run's own).
    results['machine'].update(other_load(cpu0, time.perf_counter() - t0))
    results['targets'] = targets(results)
    results['bench_seconds'] = round(time.perf_counter() - t0, 1)
    return results


def _runtime_comparison(args, device, results: Dict[str, Any], t0: float, cpu0: Any
                        ) -> Dict[str, Any]:
    """``--runtime both``: the side-by-side figures, then the node once per runtime."""
    from .runtime_figures import RUNTIMES, runtime_section

    section = runtime_section(args, device)
    results['runtimes'] = section
    results['node_by_runtime'] = {}
    if not args.skip_node:
        from .node_figures import node_section

        for runtime in RUNTIMES:
            node_args = argparse.Namespace(**vars(args))
            node_args.runtime = runtime
            node = node_section(node_args)
            fps_b1 = section['prediction_ips'][runtime]['batch_1']
            one = node['runs'].get('1_raw')
            results['node_by_runtime'][runtime] = {
                'classified_fraction': {name: run['classified_fraction']
                                        for name, run in node['runs'].items()},
                'e2e_latency_ms': {name: {k: run['e2e_latency_ms'][k] for k in ('p50', 'p95')}
                                   for name, run in node['runs'].items()},
                'node_vs_model': round(one['classified_fps'] / min(CAMERA_RATE_HZ, fps_b1), 3)
                if one else None,
                'runtime_reported': node.get('diagnostics', {}).get('cbpnet: inference', {})
                .get('runtime'),
                'rss_peak_mb': node.get('node_rss_peak_mb'), 'vm_hwm_mb': node.get(
                    'node_vm_hwm_mb'),
                'learn_task': node.get('learn_task'), 'detail': node}
    results['machine']['loadavg_end'] = [round(v, 2) for v in os.getloadavg()]
    results['machine'].update(other_load(cpu0, time.perf_counter() - t0))
    results['targets'] = targets(results)
    results['bench_seconds'] = round(time.perf_counter() - t0, 1)
    return results


def gpu_summary(r: Dict[str, Any]) -> Dict[str, Any]:
    """The figures the GPU run is for, in one place (CUDA runs only)."""
    s, mem = r['settings'], r['memory']
    peaks = mem.get('cuda_peak_mb', {})
    return {
        'device_name': r['machine'].get('device_name'), 'precision': s['precision'],
        'grad_scaler': s['grad_scaler'], 'backbone': s['backbone'],
        'image_size': s['image_size'],
        'inference_floor_ratio': r['inference_floor_ratio'],
        'inference_ips': r['inference_ips'], 'backbone_ips': r['backbone_ips'],
        'train_ips': r['train_ips'], 'train_images': s['train_images'],
        'epochs': s['epochs'], 'learn_task_s': r['train_task_duration_s'],
        'tasks_scaling_2_50': r['tasks_scaling_2_50']['ratio'],
        'learn_time_ratio_50_2': r['learn_time_ratio_50_2']['ratio'],
        'peak_gpu_mb': {'inference_batch_1': peaks.get('fast_t2_b1'),
                        'inference_batch_8': peaks.get('fast_t2_b8'),
                        'learn_task': peaks.get('train_fast')},
    }
