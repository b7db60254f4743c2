"""The performance issues' targets, and the readable table ``cbpnet-bench`` prints."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .timing import BATCH_SIZES

TARGET_FLOOR_B8 = 0.90
TARGET_FLOOR_B1 = 0.85
TARGET_TRAIN_FLOOR = 0.85
TARGET_TASKS_SCALING = 0.95
TARGET_LEARN_TIME_RATIO = 1.10
TARGET_CHECKPOINT_BYTES_PER_TASK_LITE0 = 100_000
TARGET_RSS_RATIO = 1.10
TARGET_NODE_VS_MODEL = 0.85
TARGET_ONE_CAMERA_FRACTION = 0.98
TARGET_FOUR_CAMERA_FRACTION = 0.90
# The runtime issue's targets (--runtime both).
TARGET_PREDICTION_OVER_BARE_ONNX = 0.8
TARGET_ONNX_FOUR_CAMERAS = 0.95
TARGET_ONNX_EIGHT_CAMERAS = 0.8
TARGET_LEARN_ONNX_SPEEDUP = 1.8


def _runtime_targets(r: Dict[str, Any], add: Any) -> None:
    rt = r['runtimes']
    for b in (1, 4):
        add(f'ONNX Runtime prediction / bare ONNX Runtime pass, batch {b}',
            rt['prediction_over_bare']['onnxruntime'][f'batch_{b}'], '>=',
            TARGET_PREDICTION_OVER_BARE_ONNX)
    add(f"learn_task of {rt['learn_task_images']} images: torch s / ONNX Runtime s",
        rt['learn_onnx_speedup'], '>=', TARGET_LEARN_ONNX_SPEEDUP)
    fractions = (r.get('node_by_runtime', {}).get('onnxruntime') or {}).get(
        'classified_fraction', {})
    for name, value in fractions.items():
        cams = int(name.split('_')[0])
        if cams in (4, 8):
            add(f'ONNX Runtime node, {name.replace("_", " ")} cameras: fraction classified',
                value, '>=', TARGET_ONNX_FOUR_CAMERAS if cams == 4 else TARGET_ONNX_EIGHT_CAMERAS)


def targets(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each target with the value measured and whether it is met (missing figures skipped)."""
    out: List[Dict[str, Any]] = []

    def add(name: str, value: Optional[float], op: str, target: float) -> None:
        if value is None:
            return
        met = value >= target if op == '>=' else value > target if op == '>' else \
            value <= target
        out.append({'name': name, 'value': value, 'target': f'{op} {target:g}', 'met': bool(met)})

    if 'runtimes' in r:
        _runtime_targets(r, add)
        return out
    fr = r['inference_floor_ratio']
    add('inference_floor_ratio batch 8 (2 tasks)', fr['batch_8'], '>=', TARGET_FLOOR_B8)
    add('inference_floor_ratio batch 1 (2 tasks)', fr['batch_1'], '>=', TARGET_FLOOR_B1)
    s = r['settings']
    if s.get('first_prompted_layer', 0) > 0 and 'vit' not in s['backbone']:
        for b in BATCH_SIZES:
            add(f'inference_floor_ratio batch {b} (2 tasks, shared CNN trunk)',
                fr[f'batch_{b}'], '>', 1.0)
    for b in BATCH_SIZES:
        add(f'inference_floor_ratio batch {b} (1 task)',
            r['inference_floor_ratio_one_task'][f'batch_{b}'], '>', 1.0)
    for suffix, label in (('', 'later task'), ('_first_task', 'first task')):
        value = r.get(f'train_floor_ratio{suffix}')
        add(f'train_floor_ratio ({label})', value, '>=', TARGET_TRAIN_FLOOR)
        add(f'train_floor_ratio ({label}, per-task cache)', value, '>', 1.0)
    n = s['scaling_tasks']
    add(f'tasks_scaling_2_50: prediction with {n} tasks / with 2 (batch 8, paired)',
        r['tasks_scaling_2_50']['ratio'], '>=', TARGET_TASKS_SCALING)
    add(f'learn_time_ratio_50_2: learn_task of task {n} / task 2',
        r['learn_time_ratio_50_2']['ratio'], '<=', TARGET_LEARN_TIME_RATIO)
    if s['backbone'].startswith('tf_efficientnet_lite0'):
        add('checkpoint growth per task, bytes (Lite0)',
            r['checkpoint_growth']['bytes_per_task_2_to_n'], '<=',
            TARGET_CHECKPOINT_BYTES_PER_TASK_LITE0)
    add(f'resident memory after {n} tasks / after 2', r['memory_tasks']['ratio'], '<=',
        TARGET_RSS_RATIO)
    if r.get('node_vs_model') is not None:
        add('node_vs_model (1 camera)', r['node_vs_model'], '>=', TARGET_NODE_VS_MODEL)
    one = (r.get('node_cameras') or {}).get('1_raw')
    if one:
        add('one raw camera: fraction of frames classified', one['classified_fraction'], '>=',
            TARGET_ONE_CAMERA_FRACTION)
    for kind, value in (r.get('four_camera_classified_fraction') or {}).items():
        add(f'four cameras ({kind}): fraction of frames classified', value, '>=',
            TARGET_FOUR_CAMERA_FRACTION)
    return out


def _val(d: Optional[Dict[str, Any]], *path: str) -> str:
    cur: Any = d
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return ''
        cur = cur[p]
    if cur is None:
        return '-'
    if isinstance(cur, float):
        return f'{cur:.3f}' if abs(cur) < 10 else f'{cur:.1f}'
    return str(cur)


def _runtime_table(r: Dict[str, Any]) -> str:
    rt, m = r['runtimes'], r['machine']
    rows = []
    for kind, key in (('bare frozen pass', 'bare_ips'), ('prediction', 'prediction_ips'),
                      ('prediction / own bare pass', 'prediction_over_bare'),
                      ('prediction / bare ONNX pass', 'prediction_over_bare_onnx')):
        for b in (1, 4, 8):
            rows.append((f'{kind}, batch {b}', *(_val(rt, key, r_, f'batch_{b}')
                                                 for r_ in ('torch', 'onnxruntime'))))
    rows.append((f"learn_task s, {rt['learn_task_images']} images",
                 _val(rt, 'learn_task_s', 'torch'), _val(rt, 'learn_task_s', 'onnxruntime')))
    nodes = r.get('node_by_runtime') or {}
    for name in (nodes.get('torch') or nodes.get('onnxruntime') or {}).get(
            'classified_fraction', {}):
        rows.append((f'node {name}: fraction classified',
                     *(_val(nodes.get(x), 'classified_fraction', name)
                       for x in ('torch', 'onnxruntime'))))
    if nodes:
        rows.append(('node_vs_model', *(_val(nodes.get(x), 'node_vs_model')
                                        for x in ('torch', 'onnxruntime'))))
        rows.append(('node VmHWM MB', *(_val(nodes.get(x), 'vm_hwm_mb')
                                        for x in ('torch', 'onnxruntime'))))
    width = max(len(x[0]) for x in rows) + 2
    lines = [f"cbpnet-bench --runtime both: {m['cpu_model']}, {m['cpu_affinity']} cores, "
             f"{m['torch_threads']} torch threads, ONNX Runtime on {rt['provider']}; other "
             f"processes kept {m.get('other_processes_cores_busy')} cores busy; queries differ "
             f"by {rt['max_relative_difference']:.1e} (relative)",
             f"{'figure':<{width}}{'torch':>12}{'onnxruntime':>14}"]
    lines += [f'{a:<{width}}{b:>12}{c:>14}' for a, b, c in rows]
    return '\n'.join(lines + _target_lines(r['targets']))


def format_table(r: Dict[str, Any]) -> str:
    """A readable table of the main figures (fast paths, naive beside them when measured)."""
    if 'runtimes' in r:
        return _runtime_table(r)
    naive = r.get('naive')
    rows: List[Tuple[str, str, str]] = []

    def row(label: str, *path: str, both: bool = True) -> None:
        rows.append((label, _val(r, *path), _val(naive, *path) if naive and both else ''))

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
    row('train_ips (2nd task)', 'train_ips')
    row('train_floor_ips (2nd task)', 'train_floor_ips', both=False)
    row('train_floor_ratio (2nd task)', 'train_floor_ratio')
    row('learn_task duration s (2nd task)', 'train_task_duration_s')
    row('train_ips (first task)', 'train_ips_first_task')
    row('train_floor_ratio (first task)', 'train_floor_ratio_first_task')
    n = r['settings']['scaling_tasks']
    for k in r['tasks_scaling']['inference_ips_by_tasks']:
        row(f'inference_ips batch 8 with {k} tasks', 'tasks_scaling', 'inference_ips_by_tasks',
            k)
    row(f'tasks_scaling_2_50 ({n} tasks / 2, paired)', 'tasks_scaling_2_50', 'ratio',
        both=False)
    row(f'learn_time_ratio_50_2 (task {n} / task 2)', 'learn_time_ratio_50_2', 'ratio',
        both=False)
    row('checkpoint growth per task, bytes', 'checkpoint_growth', 'bytes_per_task_2_to_n',
        both=False)
    row(f'RSS after {n} tasks / after 2', 'memory_tasks', 'ratio', both=False)
    mem = r['memory']
    rows.append(('peak RSS MB inference', _val(mem, 'inference', 'peak_rss_mb'), ''))
    rows.append(('peak RSS MB learning', _val(mem, 'learning', 'peak_rss_mb'), ''))
    if 'cuda_max_allocated_mb' in mem.get('inference', {}):
        rows.append(('CUDA peak MB inference', _val(mem, 'inference', 'cuda_max_allocated_mb'),
                     ''))
        rows.append(('CUDA peak MB learning', _val(mem, 'learning', 'cuda_max_allocated_mb'),
                     ''))
    if r.get('node_fps') is not None:
        rows.append(('node_fps (1 camera)', _val(r, 'node_fps'), ''))
        rows.append(('node_vs_model', _val(r, 'node_vs_model'), ''))
        for name, run in (r.get('node_cameras') or {}).items():
            rows.append((f'node {name}: fraction classified',
                         _val(run, 'classified_fraction'), ''))
            for topic, cam in run['per_camera'].items():
                rows.append((f'  {topic} e2e ms p50/p95',
                             f"{_val(cam, 'e2e_latency_ms', 'p50')}/"
                             f"{_val(cam, 'e2e_latency_ms', 'p95')}", ''))
        rows.append(('node VmHWM MB', _val(mem.get('node') or {}, 'vm_hwm_mb'), ''))
    width = max(len(x[0]) for x in rows) + 2
    m = r['machine']
    s = r['settings']
    lines = [f"cbpnet-bench: {s['backbone']} @ {s['image_size']} px, {s['device']} "
             f"({m.get('device_name')}), {s['precision']}; {m['cpu_model']}, "
             f"{m['cpu_affinity']} cores, {m['torch_threads']} torch threads; load "
             f"{m['loadavg_start']} -> {m.get('loadavg_end')}; other processes kept "
             f"{m.get('other_processes_cores_busy')} cores busy",
             f"{'figure':<{width}}{'fast':>12}{'naive' if naive else '':>12}"]
    lines += [f'{a:<{width}}{b:>12}{c:>12}' for a, b, c in rows]
    return '\n'.join(lines + _target_lines(r['targets']))


def _target_lines(checked: List[Dict[str, Any]]) -> List[str]:
    """The ``targets:`` block of a table: each target, met or missed, with value and bound."""
    return ['targets:'] + [f"  [{'met' if t['met'] else 'MISSED':>6}] {t['name']}: "
                           f"{t['value']} (target {t['target']})" for t in checked]
