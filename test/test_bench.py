"""cbpnet-bench: it runs, and its JSON carries every figure with a sane type.

No timing assertions: the figures depend on the machine and on whatever else runs on it.
"""
import json
import math

import numpy as np
import pytest
import torch

from ros2_cbpnet.tools import bench

# One torch thread: on a shared 2-core machine, 2 OpenMP threads next to other busy processes
# can be 100x slower (spin-waiting threads); main() restores the thread count afterwards.
QUICK = ['--quick', '--skip-node', '--backbone-checkpoint', 'random', '--image-size', '32',
         '--threads', '1']
BATCHES = ('batch_1', 'batch_8')


def _positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope='module')
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    assert bench.main(QUICK + ['--compare-naive', '--no-table', '--out', str(out)]) == 0
    with open(out, encoding='utf-8') as f:
        return json.load(f)


def _model_figures(r):
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
    assert set(scaling['inference_ips_by_tasks']) == {'1', '10', '50'}
    assert all(_positive(v) for v in scaling['inference_ips_by_tasks'].values())
    assert _finite(scaling['slowdown_50_vs_10'])


def test_model_figures_are_all_there(result):
    assert all(_positive(result['backbone_ips'][b]) for b in BATCHES)
    _model_figures(result)
    # the one-task and scaling figures come from the same learners
    assert result['inference_ips_one_task']['batch_8'] == \
        result['tasks_scaling']['inference_ips_by_tasks']['1']


def test_naive_comparison_is_there(result):
    _model_figures(result['naive'])
    assert all(_positive(v) for v in result['fast_over_naive'].values())


def test_memory_and_checkpoint_figures(result):
    for phase in ('inference', 'learning'):
        mem = result['memory'][phase]
        assert _positive(mem['peak_rss_mb']) and mem['peak_rss_mb'] >= mem['peak_increase_mb']
    assert result['memory']['learning']['task_images'] == 40
    ckpt = result['checkpoint']
    assert _positive(ckpt['bytes_per_task'])
    sizes = ckpt['bytes_by_tasks']
    assert sizes['1'] < sizes['2'] < sizes['10'] < sizes['50']


def test_machine_settings_targets_and_spread(result):
    m = result['machine']
    for key in ('cpu_model', 'cpu_count', 'torch_threads', 'device', 'device_name',
                'torch_version'):
        assert m[key], key
    assert m['torch_version'] == torch.__version__
    s = result['settings']
    assert s['image_size'] == 32 and s['precision'] == 'fp32' and s['quick'] is True
    assert s['repeats'] == 2
    assert m['torch_threads'] == 1 and torch.get_num_threads() != 0
    assert all(len(v) == 2 for v in result['samples'].values())
    assert all(_finite(v) and v >= 0 for v in result['spread'].values())
    names = [t['name'] for t in result['targets']]
    assert any('floor_ratio batch 8' in n for n in names)
    assert any('train_floor_ratio' in n for n in names)
    assert any('tasks_scaling' in n for n in names)
    assert all(isinstance(t['met'], bool) for t in result['targets'])
    assert result['node'] == {'skipped': True} and result['node_fps'] is None


def test_table_renders(result):
    table = bench.format_table(result)
    assert 'inference_floor_ratio batch 8' in table and 'naive' in table
    assert 'targets:' in table


def test_json_to_stdout_is_valid(capsys):
    assert bench.main(QUICK + ['--repeats', '1', '--tasks-scaling', '1,3', '--no-table']) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r['tasks_scaling']['inference_ips_by_tasks']) == {'1', '3'}
    assert 'naive' not in r


def test_half_precision_on_cpu_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(QUICK + ['--device', 'cpu', '--precision', 'fp16'])
    assert exc.value.code == 2
    assert 'needs a CUDA device' in capsys.readouterr().err


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.main(QUICK + ['--tasks-scaling', '0,x'])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_cuda_half_precision_predict(precision):
    from ros2_cbpnet.learner import ContinualLearner, LearnerConfig

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
def test_cuda_half_precision_bench(tmp_path):
    out = tmp_path / 'bench.json'
    assert bench.main(QUICK + ['--device', 'cuda', '--precision', 'fp16', '--no-table',
                               '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['settings']['precision'] == 'fp16'
    assert _positive(r['memory']['inference']['cuda_max_allocated_mb'])
    assert all(_positive(r['inference_ips'][b]) for b in BATCHES)


@pytest.mark.slow
@pytest.mark.ros
def test_node_section(tmp_path):
    out = tmp_path / 'bench.json'
    args = [a for a in QUICK if a != '--skip-node']
    args[args.index('32')] = '64'
    assert bench.main(args + ['--node-seconds', '3', '--no-table', '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['node_fps'] > 0
    assert _positive(r['node_vs_model'])
    for key in ('node_latency_ms', 'node_e2e_latency_ms'):
        assert _positive(r[key]['p50']) and _positive(r[key]['p95'])
    four = r['node_multi_camera']['4']
    assert four['aggregate_fps'] > 0 and _positive(four['e2e_latency_ms']['p50'])
    node = r['node']
    assert node['learn_task']['classes'] == ['bench_a', 'bench_b']
    assert node['stop']['signal'] == 'SIGINT' and node['stop']['exit_code'] == 0
    assert _positive(r['memory']['node']['vm_hwm_mb'])
