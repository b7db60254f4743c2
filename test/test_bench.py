"""cbpnet-bench: it runs, and its JSON carries every figure, present and finite.

No timing assertions: the figures depend on the machine and on whatever else runs on it.
"""
import json
import math
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from ros2_cbpnet.tools import bench
from ros2_cbpnet.tools.bench import cli, node_profile

ROOT = Path(__file__).resolve().parents[1]
# One torch thread: on a shared 2-core machine, 2 OpenMP threads next to other busy processes
# can be 100x slower (spin-waiting threads); main() restores the thread count afterwards.
QUICK = ['--quick', '--skip-node', '--backbone-checkpoint', 'random', '--image-size', '32',
         '--threads', '1']
# The paper's prediction mode trains prompts, so the training figures and floors exist.
TRAINING = ['--prediction', 'all']
BATCHES = ('batch_1', 'batch_8')


def _positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope='module')
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    assert bench.main(QUICK + TRAINING + ['--compare-naive', '--no-table', '--out',
                                          str(out)]) == 0
    with open(out, encoding='utf-8') as f:
        return json.load(f)


def _model_figures(r, n_many=4):
    for key in ('inference_ips', 'inference_ips_one_task'):
        assert set(r[key]) == set(BATCHES)
        assert all(_positive(r[key][b]) for b in BATCHES), (key, r[key])
    for key in ('inference_floor_ratio', 'inference_floor_ratio_one_task'):
        assert all(_positive(r[key][b]) for b in BATCHES), (key, r[key])
    for key in ('train_ips', 'train_floor_ips', 'train_floor_ratio', 'train_task_duration_s',
                'train_ips_first_task', 'train_floor_ips_first_task',
                'train_floor_ratio_first_task'):
        assert _positive(r[key]), (key, r[key])
    scaling = r['tasks_scaling']
    assert scaling['batch'] == 8
    assert set(scaling['inference_ips_by_tasks']) == {'1', '2', str(n_many)}
    assert all(_positive(v) for v in scaling['inference_ips_by_tasks'].values())


@pytest.mark.slow
def test_model_figures_are_all_there(result):
    assert all(_positive(result['backbone_ips'][b]) for b in BATCHES)
    _model_figures(result)
    # the one-task and scaling figures come from the same timed items
    assert result['inference_ips_one_task']['batch_8'] == \
        result['tasks_scaling']['inference_ips_by_tasks']['1']
    assert 'train_floor_error' not in result


@pytest.mark.slow
def test_costs_that_must_not_grow_are_there(result):
    ts = result['tasks_scaling_2_50']
    assert ts['tasks'] == [2, 4] and ts['batch'] == 8
    assert _positive(ts['ratio']) and _finite(ts['slowdown'])
    assert ts['slowdown'] == pytest.approx(1 - ts['ratio'], abs=1e-3)
    assert len(ts['ratio_by_round']) == 2  # paired: one ratio per round
    assert sorted(ts['ratio_by_round'])[0] <= ts['ratio'] <= sorted(ts['ratio_by_round'])[-1]
    assert all(1 <= ts['distinct_tasks_selected_in_batch'][k] <= int(k) for k in ('2', '4'))
    lt = result['learn_time_ratio_50_2']
    assert lt['tasks'] == [2, 4] and lt['train_images'] == 40
    assert _positive(lt['ratio']) and len(lt['ratio_by_round']) == 2
    assert _positive(lt['learn_task_s_2nd']) and _positive(lt['learn_task_s_4th'])
    # the 4th task is the same task as the 2nd, learned onto 3 tasks
    later = result['learn_task_result']
    assert later['task_4']['task_id'] == 3 and later['later_task']['task_id'] == 1
    assert later['task_4']['classes'] == later['later_task']['classes']
    growth = result['checkpoint_growth']
    assert _positive(growth['bytes_per_task_2_to_n'])
    sizes = growth['bytes_by_tasks']
    assert sizes['2'] < sizes['3'] < sizes['4']
    mem = result['memory_tasks']
    for suffix in ('', '_untrimmed'):
        assert _positive(mem[f'rss_mb_after_2{suffix}'])
        assert _positive(mem[f'rss_mb_after_4{suffix}'])
        assert _positive(mem[f'ratio{suffix}']) and _finite(mem[f'increase_mb{suffix}'])
        assert mem[f'ratio{suffix}'] == pytest.approx(
            mem[f'rss_mb_after_4{suffix}'] / mem[f'rss_mb_after_2{suffix}'], abs=1e-3)


@pytest.mark.slow
def test_naive_comparison_is_there(result):
    _model_figures(result['naive'])
    assert all(_positive(v) for v in result['fast_over_naive'].values())


@pytest.mark.slow
def test_memory_and_checkpoint_figures(result):
    for phase in ('inference', 'learning'):
        mem = result['memory'][phase]
        assert _positive(mem['peak_rss_mb']) and mem['peak_rss_mb'] >= mem['peak_increase_mb']
    assert result['memory']['learning']['task_images'] == 40
    ckpt = result['checkpoint']
    assert _positive(ckpt['bytes_per_task'])
    sizes = ckpt['bytes_by_tasks']
    assert sizes['1'] < sizes['2'] < sizes['4']
    assert 'cuda_peak_mb' not in result['memory'] and 'gpu' not in result  # CPU run


@pytest.mark.slow
def test_machine_settings_targets_and_spread(result):
    m = result['machine']
    for key in ('cpu_model', 'cpu_count', 'torch_threads', 'device', 'device_name',
                'torch_version'):
        assert m[key], key
    assert m['torch_version'] == torch.__version__
    s = result['settings']
    assert s['image_size'] == 32 and s['precision'] == 'fp32' and s['quick'] is True
    assert s['repeats'] == 2 and s['scaling_tasks'] == 4 and s['grad_scaler'] is False
    assert s['prediction'] == 'all' and s['prompt_training'] is True
    assert m['torch_threads'] == 1 and torch.get_num_threads() != 0
    assert all(len(v) == 2 for v in result['samples'].values())
    assert all(_finite(v) and v >= 0 for v in result['spread'].values())
    names = [t['name'] for t in result['targets']]
    for part in ('floor_ratio batch 8', 'train_floor_ratio', 'tasks_scaling_2_50',
                 'learn_time_ratio_50_2', 'checkpoint growth', 'resident memory'):
        assert any(part in n for n in names), part
    assert all(isinstance(t['met'], bool) for t in result['targets'])
    assert result['node'] == {'skipped': True} and result['node_fps'] is None
    assert result['four_camera_classified_fraction'] is None


@pytest.mark.slow
def test_table_renders(result):
    table = bench.format_table(result)
    for part in ('inference_floor_ratio batch 8', 'naive', 'targets:', 'tasks_scaling_2_50',
                 'learn_time_ratio_50_2'):
        assert part in table


@pytest.mark.slow
def test_gpu_summary_takes_its_figures_from_the_run(result):
    r = json.loads(json.dumps(result))
    r['memory']['cuda_peak_mb'] = {'fast_t2_b1': 10.0, 'fast_t2_b8': 20.0, 'train_fast': 30.0}
    g = cli.gpu_summary(r)
    assert g['peak_gpu_mb'] == {'inference_batch_1': 10.0, 'inference_batch_8': 20.0,
                                'learn_task': 30.0}
    assert g['inference_floor_ratio'] == result['inference_floor_ratio']
    assert g['learn_task_s'] == result['train_task_duration_s']
    assert g['train_images'] == 40 and g['grad_scaler'] is False


@pytest.mark.slow
def test_json_to_stdout_auto_precision_and_default_learner(capsys):
    assert bench.main(QUICK + ['--repeats', '1', '--scaling-tasks', '3', '--precision', 'auto',
                               '--no-table']) == 0
    r = json.loads(capsys.readouterr().out)
    # the learner's default prediction mode, whether or not it trains prompts
    assert _positive(r['train_ips']) and _positive(r['train_task_duration_s'])
    assert _positive(r['learn_time_ratio_50_2']['ratio'])
    if r['settings']['prompt_training']:
        assert _positive(r['train_floor_ratio'])
    else:
        assert r['train_floor_ratio'] is None and 'trains no prompts' in r['train_floor_error']
    assert set(r['tasks_scaling']['inference_ips_by_tasks']) == {'1', '2', '3'}
    assert r['tasks_scaling_2_50']['tasks'] == [2, 3]
    assert r['settings']['precision'] == 'fp32'  # auto on CPU
    assert 'naive' not in r


def test_runtime_both_gives_the_side_by_side_figures(tmp_path, capsys):
    out = tmp_path / 'runtimes.json'
    assert bench.main(QUICK + ['--runtime', 'both', '--runtime-learn-images', '12',
                               '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    rt = r['runtimes']
    for key in ('bare_ips', 'prediction_ips', 'prediction_over_bare',
                'prediction_over_bare_onnx'):
        for runtime in ('torch', 'onnxruntime'):
            assert all(_positive(rt[key][runtime][f'batch_{b}']) for b in (1, 4, 8)), key
    assert all(_positive(v) for v in rt['learn_task_s'].values())
    assert [len(v) for v in rt['learn_task_s_by_round'].values()] == [2, 2]  # --quick rounds
    assert _positive(rt['learn_onnx_speedup']) and rt['learn_task_images'] == 12
    assert rt['max_relative_difference'] < 1e-4 and rt['provider'] == 'CPUExecutionProvider'
    names = [t['name'] for t in r['targets']]
    assert any('prediction / bare ONNX Runtime pass' in n for n in names)
    table = capsys.readouterr().err
    assert 'onnxruntime' in table and 'learn_task s, 12 images' in table


def test_half_precision_on_cpu_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(QUICK + ['--device', 'cpu', '--precision', 'fp16'])
    assert exc.value.code == 2
    assert 'needs a CUDA device' in capsys.readouterr().err


@pytest.mark.parametrize('bad', [['--node-cameras', '0,x'], ['--scaling-tasks', '2'],
                                 ['--scaling-images', '1']])
def test_bad_arguments_are_refused(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(QUICK + bad)
    assert exc.value.code == 2


def test_console_script_and_module_entry_points():
    eps = [e for e in metadata.entry_points(group='console_scripts') if e.name == 'cbpnet-bench']
    assert eps and eps[0].value == 'ros2_cbpnet.tools.bench:main'
    assert eps[0].load() is bench.main
    out = subprocess.run([sys.executable, '-m', 'ros2_cbpnet.tools.bench', '--help'],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and '--scaling-tasks' in out.stdout


def test_node_profile_breakdown(tmp_path):
    raw = tmp_path / 'node.raw.txt'
    raw.write_text(
        'thread (1): cbpnet-inference;run (threading.py:1);_inference_loop (node.py:1);'
        '_process (node.py:2);_decode (node.py:3);image_msg_to_rgb (image_codec.py:4) 30\n'
        'thread (1): cbpnet-inference;run (threading.py:1);_inference_loop (node.py:1);'
        '_process (node.py:2);predict (learner.py:5);preprocess (learner.py:6);'
        'resize_batch (learner.py:7) 10\n'
        'thread (1): cbpnet-inference;run (threading.py:1);_inference_loop (node.py:1);'
        '_process (node.py:2);predict (learner.py:5);predict_tensor (learner.py:8);'
        'predict (cbpnet.py:9) 50\n'
        'thread (1): cbpnet-inference;_inference_loop (node.py:1);wait (threading.py:2);'
        'Condition.wait (threading.py:3) 10\n'
        'thread (2): MainThread;main (node.py:1);spin (executors.py:2);'
        'wait_for_ready_callbacks (executors.py:3) 40\n'
        'thread (3): ThreadPoolExecutor-0_0;_worker (thread.py:1);handler (executors.py:2);'
        '_take_subscription (executors.py:3) 5\n'
        'thread (4): ThreadPoolExecutor-0_1;_worker (concurrent/futures/thread.py:81) 15\n'
        'garbage line\n')
    b = node_profile.breakdown_from_raw(str(raw), frames=50)
    assert b['frames'] == 50
    inf = b['threads']['inference_thread']
    assert inf['seconds'] == 1.0 and inf['threads'] == 1
    assert inf['stages'] == {'model': 0.5, 'decode_raw_image': 0.3, 'resize': 0.1,
                             'waiting_for_frames': 0.1}
    assert inf['ms_per_frame']['model'] == 10.0  # 50 samples at 100 Hz over 50 frames
    assert b['threads']['main_executor_loop']['stages'] == {'rclpy_wait_for_work': 1.0}
    workers = b['threads']['executor_workers']
    assert workers['threads'] == 2
    assert workers['stages'] == {'thread_pool_idle': 0.75, 'rclpy_take_message': 0.25}


def test_synthetic_frames_are_image_like():
    rng = np.random.default_rng(0)
    a = bench.synthetic_frame(rng, (48, 64), 1)
    b = bench.synthetic_frame(rng, (48, 64), 2, noise=0)
    assert a.shape == (48, 64, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b) and b.std() > 10
    images, labels = bench.synthetic_task(rng, ['x', 'y'], 10, hw=(8, 8))
    assert labels == ['x', 'y'] * 5 and len(images) == 10


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_cuda_half_precision_predict(precision):
    from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig

    learner = ContinualLearner(LearnerConfig(
        backbone_checkpoint='random', device='cuda', precision=precision, image_size=32,
        epochs=1))
    rng = np.random.default_rng(0)
    images, labels = bench.synthetic_task(rng, ['a', 'b'], 16, hw=(48, 64))
    learner.learn_task(images, labels)
    preds = learner.predict(images[:8])
    assert len(preds) == 8
    assert all(p.label in ('a', 'b') and 0.0 <= p.score <= 1.0 for p in preds)
    probs, _, _ = learner.predict_tensor(learner.preprocess(images[:8]))
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_cuda_half_precision_bench(tmp_path, precision):
    out = tmp_path / 'bench.json'
    assert bench.main(QUICK + TRAINING + ['--device', 'cuda', '--precision', precision,
                                          '--no-table', '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['settings']['precision'] == precision
    assert r['settings']['grad_scaler'] is (precision == 'fp16')
    assert _positive(r['memory']['inference']['cuda_max_allocated_mb'])
    assert all(_positive(v) for v in r['gpu']['peak_gpu_mb'].values())
    assert all(_positive(r['inference_ips'][b]) for b in BATCHES)


@pytest.mark.slow
@pytest.mark.ros
def test_node_section(tmp_path):
    out = tmp_path / 'bench.json'
    args = [a for a in QUICK if a != '--skip-node']
    args[args.index('32')] = '64'
    assert bench.main(args + ['--node-seconds', '3', '--node-cameras', '1,4',
                              '--node-compressed-cameras', '4', '--no-table',
                              '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['node_fps'] > 0
    assert _positive(r['node_vs_model'])
    for key in ('node_latency_ms', 'node_e2e_latency_ms'):
        assert _positive(r[key]['p50']) and _positive(r[key]['p95'])
    four = r['four_camera_classified_fraction']
    assert set(four) == {'raw', 'compressed'}
    assert all(_positive(v) and v <= 1.0 for v in four.values())
    assert set(r['node_cameras']) == {'1_raw', '4_raw', '4_compressed'}
    comp = r['node_cameras']['4_compressed']
    assert sorted(comp['per_camera']) == [f'/bench/cam{i}/compressed' for i in range(4)]
    for run in r['node_cameras'].values():
        for cam in run['per_camera'].values():
            assert 0 < cam['classified_fraction'] <= 1.0
            assert _positive(cam['e2e_latency_ms']['p50'])
            assert cam['e2e_latency_ms']['p95'] >= cam['e2e_latency_ms']['p50']
    node = r['node']
    assert node['learn_task']['classes'] == ['bench_a', 'bench_b']
    assert node['jpeg_bytes_mean'] > 1000
    assert node['stop']['signal'] == 'SIGINT' and node['stop']['exit_code'] == 0
    assert _positive(r['memory']['node']['vm_hwm_mb'])
    names = [t['name'] for t in r['targets']]
    assert any('four cameras (compressed)' in n for n in names)


@pytest.mark.slow
def test_gpu_bench_script_dry_run(tmp_path):
    """scripts/gpu_bench.sh runs its whole loop and merge on the CPU with --dry-run."""
    out = tmp_path / 'gpu.json'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(['bash', str(ROOT / 'scripts' / 'gpu_bench.sh'), '--dry-run',
                           '--python', sys.executable, '--out', str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r['dry_run'] is True and r['device'] == 'cpu'
    assert {row['run'] for row in r['summary']} == {'lite0_32_fp32', 'vit_tiny_32_fp32',
                                                    'runtime_lite0_128_cpu'}
    runtime = next(row for row in r['summary'] if row['run'] == 'runtime_lite0_128_cpu')
    assert runtime['provider'] == 'CPUExecutionProvider', runtime
    assert runtime['max_relative_difference'] < 1e-4
    assert all(_positive(v) for v in runtime['learn_task_s'].values())
    for row in r['summary']:
        if row is runtime:
            continue
        for key in ('floor_ratio_b1', 'floor_ratio_b8', 'train_ips', 'learn_task_s',
                    'tasks_scaling_2_50', 'learn_time_ratio_50_2'):
            assert _positive(row[key]), (row['run'], key)
    assert r['runs']['vit_tiny_32_fp32']['settings']['backbone'] == 'vit_tiny_patch16_224'


def test_non_finite_values_become_null():
    replaced = []
    out = cli.finite_json({'a': float('nan'), 'b': [1.0, float('inf')], 'c': {'d': 2}},
                          replaced)
    assert out == {'a': None, 'b': [1.0, None], 'c': {'d': 2}}
    assert replaced == ['/a', '/b/1']
    json.dumps(out, allow_nan=False)
