"""``cbpnet-eval`` end to end on a tiny folder data set, the baselines, and bad arguments."""
import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from ros2_cbpnet import datasets
from ros2_cbpnet.baselines import (LinearProbe, NearestClassMean,
                                   backbone_params_without_classifier)
from ros2_cbpnet.learner import ContinualLearner, LearnerConfig
from ros2_cbpnet.model import load_backbone
from ros2_cbpnet.tools import evaluate
from ros2_cbpnet.tools.evaluate import INTERFACE_KEYS, main

COLOURS = {'blue': (0, 0, 230), 'green': (0, 200, 0), 'red': (220, 0, 0),
           'yellow': (230, 230, 0)}
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _colour_folder(root, per_class=12, size=40):
    """One sub-folder per class of flat colour images with mild noise (trivially separable)."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            img = np.clip(np.array(rgb, float) + rng.normal(0, 12, (size, size, 3)), 0, 255)
            cv2.imwrite(str(root / name / f'{k}.png'), img.astype(np.uint8)[:, :, ::-1])
    return root


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return _colour_folder(tmp_path_factory.mktemp('colours') / 'data')


@pytest.fixture(scope='module')
def e2e(folder, tmp_path_factory):
    """One real run of cbpnet-eval: cbpnet and ncm, 2 tasks, embedded backbone."""
    out = tmp_path_factory.mktemp('eval')
    args = ['--dataset', f'folder:{folder}', '--tasks', '2', '--method', 'cbpnet,ncm',
            '--image-size', '32', '--epochs', '1', '--batch-size', '8', '--device', 'cpu',
            '--out', str(out / 'res.json'), '--plot', str(out / 'acc.png')]
    assert main(args) == 0
    return out


def test_results_json_has_the_interface_keys_and_a_triangular_matrix(e2e):
    data = json.loads((e2e / 'res.json').read_text())
    runs = data['runs']
    assert [r['method'] for r in runs] == ['cbpnet', 'ncm']
    for r in runs:
        missing = [k for k in INTERFACE_KEYS if k not in r]
        assert not missing
        assert r['dataset'].startswith('folder:') and r['backbone'] == 'tf_efficientnet_lite0'
        assert r['tasks'] == 2 and r['classes_per_task'] == 2
        # Classes in sorted folder order, split into consecutive tasks.
        assert r['task_classes'] == [['blue', 'green'], ['red', 'yellow']]
        acc = r['acc_matrix']
        assert [len(row) for row in acc] == [1, 2]
        flat = [v for row in acc for v in row]
        assert all(0.0 <= v <= 1.0 for v in flat)
        # Chance is 1/2 after task 1 and 1/4 after task 2; flat colours are far above it.
        assert r['average_accuracy'] >= 0.75, r
        assert r['average_accuracy'] == pytest.approx(np.mean(acc[-1]))
        assert r['learning_accuracy'] == pytest.approx((acc[0][0] + acc[1][1]) / 2)
        assert r['backbone_params'] == 3_371_008  # Lite0 without its 1.28 M classifier
        assert r['train_seconds'] > 0 and r['seed'] == 0
        assert isinstance(r['config'], dict)
    cbp, ncm = runs
    assert cbp['recipe'] == 'cbpnet' and cbp['config']['cbp_enabled'] is True
    assert cbp['config']['prompt_selection'] == 'lda' and cbp['trainable_params'] > 0
    assert ncm['trainable_params'] == 0 and ncm['replaced_units'] == 0
    assert set(data['summary']) == {'cbpnet', 'ncm'}


def test_plot_is_written(e2e):
    png = (e2e / 'acc.png').read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_compare_reads_result_files_and_plots_them_together(e2e, tmp_path, capsys):
    runs = json.loads((e2e / 'res.json').read_text())['runs']
    single = dict(runs[1], method='dualprompt', recipe='faithful', tag='x')
    del single['label']
    (tmp_path / 'single.json').write_text(json.dumps(single))
    plot = tmp_path / 'cmp.png'
    assert main(['--compare', str(e2e / 'res.json'), str(tmp_path / 'single.json'),
                 '--plot', str(plot)]) == 0
    out = capsys.readouterr().out
    for label in ('| cbpnet |', '| ncm |', '| dualprompt (faithful) [x] |'):
        assert label in out
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_summary_gives_mean_and_sample_std_over_seeds():
    runs = [{'method': 'ncm', 'dataset': 'd', 'seed': s, 'acc_matrix': [[a], [a, b]],
             'average_accuracy': (a + b) / 2, 'forgetting': 0.0, 'learning_accuracy': a}
            for s, (a, b) in enumerate([(1.0, 0.5), (0.8, 0.3)])]
    summary = evaluate.summarize_runs(runs)['ncm']
    assert summary['runs'] == 2 and summary['seeds'] == [0, 1]
    assert summary['average_accuracy']['mean'] == pytest.approx(0.65)
    assert summary['average_accuracy']['std'] == pytest.approx(np.std([0.75, 0.55], ddof=1))
    assert np.allclose(np.concatenate(summary['acc_matrix']), [0.9, 0.9, 0.4])


def test_recipes_and_overrides_map_onto_the_learner_config():
    parser = evaluate.build_parser()
    args = parser.parse_args(['--dataset', 'digits', '--tasks', '5', '--recipe', 'faithful',
                              '--g-prompt-layers', 'none', '--e-prompt-layers', '5,6,7',
                              '--cbp-replacement-rate', '0.01'])
    cfg = evaluate.learner_config(args, 'dualprompt', 3, 64)
    assert (cfg.prompt_selection, cfg.prediction) == ('key', 'all')
    # The paper's recipe has none of the learner's drift control.
    assert cfg.feature_replay_coeff == 0.0 and cfg.g_prompt_first_task_only is False
    assert cfg.cbp_enabled is False and cfg.seed == 3 and cfg.image_size == 64
    assert cfg.g_prompt_layers == [-1] and cfg.e_prompt_layers == [5, 6, 7]
    assert cfg.cbp_replacement_rate == 0.01
    args = parser.parse_args(['--dataset', 'digits', '--tasks', '5',
                              '--prediction', 'all'])
    cfg = evaluate.learner_config(args, 'cbpnet', 0, 64)
    assert (cfg.prompt_selection, cfg.prediction, cfg.cbp_enabled) == ('lda', 'all', True)
    assert cfg.feature_replay_coeff == LearnerConfig().feature_replay_coeff > 0
    assert cfg.g_prompt_first_task_only is True
    args = parser.parse_args(['--dataset', 'digits', '--tasks', '5', '--recipe', 'faithful',
                              '--feature-replay-coeff', '0.5', '--g-prompt-training',
                              'first-task'])
    cfg = evaluate.learner_config(args, 'cbpnet', 0, 64)
    assert (cfg.prompt_selection, cfg.feature_replay_coeff) == ('key', 0.5)
    assert cfg.g_prompt_first_task_only is True
    assert evaluate.default_image_size('fashion-mnist', 0) == 64
    assert evaluate.default_image_size('folder:/x', 0) == 0


# --------------------------------------------------------------------------- baselines

class ColourMean(nn.Module):
    """A stand-in backbone whose 'feature' is the mean RGB of the image in [0, 1]."""

    name = 'colour-mean'
    feature_dim = 3
    input_size = 8
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def query(self, x):
        return x.mean(dim=(2, 3))


def _flat(rgb, n, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    imgs = np.clip(np.array(rgb, float) + rng.normal(0, noise, (n, 8, 8, 3)), 0, 255)
    return list(imgs.astype(np.uint8))


def test_ncm_separates_trivially_separable_features_and_documents_its_metric():
    x = _flat((250, 0, 0), 5) + _flat((0, 250, 0), 5)
    ncm = NearestClassMean(ColourMean(), device='cpu')
    ncm.learn_task(x, ['r'] * 5 + ['g'] * 5)
    ncm.learn_task(_flat((0, 0, 250), 5), ['b'] * 5)
    test = _flat((200, 30, 30), 3, 10, 1) + _flat((30, 200, 30), 3, 10, 2) \
        + _flat((30, 30, 200), 3, 10, 3)
    assert ncm.evaluate(test, ['r'] * 3 + ['g'] * 3 + ['b'] * 3) == 1.0
    assert ncm.classes == ['g', 'r', 'b'] and ncm.tasks == [['g', 'r'], ['b']]
    assert [p.task_id for p in ncm.predict(test[-1:] + test[:1])] == [1, 0]
    # Same direction, different length: cosine cannot tell them apart, Euclidean can.
    dark, bright = _flat((60, 60, 0), 4), _flat((240, 240, 0), 4)
    euclid = NearestClassMean(ColourMean(), metric='euclidean', device='cpu')
    euclid.learn_task(dark + bright, ['dark'] * 4 + ['bright'] * 4)
    assert euclid.evaluate(dark + bright, ['dark'] * 4 + ['bright'] * 4) == 1.0
    cosine = NearestClassMean(ColourMean(), device='cpu')
    cosine.learn_task(dark + bright, ['dark'] * 4 + ['bright'] * 4)
    assert cosine.evaluate(dark + bright, ['dark'] * 4 + ['bright'] * 4) == 0.5
    with pytest.raises(ValueError, match='metric'):
        NearestClassMean(ColourMean(), metric='manhattan', device='cpu')


def test_linear_probe_trains_task_by_task():
    probe = LinearProbe(ColourMean(), epochs=30, batch_size=4, learning_rate=0.1,
                        device='cpu')
    steps = []
    first = probe.learn_task(_flat((250, 0, 0), 6, 5) + _flat((0, 250, 0), 6, 5, 1),
                             ['r'] * 6 + ['g'] * 6, progress=steps.append)
    assert first.train_accuracy == 1.0
    assert len(steps) == 30 * 3 and steps[-1].loss < steps[0].loss
    assert probe.evaluate(_flat((230, 20, 20), 3, 5, 2) + _flat((20, 230, 20), 3, 5, 3),
                          ['r'] * 3 + ['g'] * 3) == 1.0
    old_rows = probe.head_weight.clone()
    probe.learn_task(_flat((0, 0, 250), 6, 5) + _flat((250, 250, 250), 6, 5, 1),
                     ['b'] * 6 + ['w'] * 6)
    # The class mask leaves the old classes' rows alone; the head grows by the new classes.
    assert torch.equal(probe.head_weight[:2], old_rows)
    assert probe.head_weight.shape == (4, 3)
    assert probe.parameter_counts()['trainable_params'] == 4 * 3 + 4
    assert probe.evaluate(_flat((0, 0, 240), 3), ['b'] * 3) == 1.0


def test_baseline_features_are_the_learners_query_and_the_count_drops_the_classifier():
    bb = load_backbone('tf_efficientnet_lite0', 'random', image_size=32)
    imgs = list(np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8))
    learner = ContinualLearner(LearnerConfig(image_size=32, device='cpu'), backbone=bb)
    ncm = NearestClassMean(bb, image_size=32, device='cpu')
    with torch.no_grad():
        expected = bb.query(learner.preprocess(imgs))
    assert torch.allclose(ncm.features(imgs), expected, atol=1e-5)
    total = sum(p.numel() for p in bb.model.parameters())
    classifier = sum(p.numel() for p in bb.model.get_classifier().parameters())
    assert backbone_params_without_classifier(bb) == total - classifier == 3_371_008


# --------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize('argv, message', [
    (['--tasks', '5'], '--dataset and --tasks are required'),
    (['--dataset', 'digits', '--tasks', '0'], 'positive integer'),
    (['--dataset', 'digits', '--tasks', '5', '--method', 'cbpnet,l2p'], "unknown method 'l2p'"),
    (['--dataset', 'digits', '--tasks', '5', '--seeds', '0,x'], 'comma-separated integers'),
    (['--dataset', 'digits', '--tasks', '5', '--seed', '1', '--seeds', '1,2'],
     'not allowed with'),
    (['--dataset', 'digits', '--tasks', '5', '--cbp-decay-rate', '1.5'], 'cbp_decay_rate'),
    (['--dataset', 'imagenet', '--tasks', '5'], 'unknown data set spec'),
    (['--dataset', 'folder:/nonexistent/x', '--tasks', '2', '--image-size', '32'],
     '/nonexistent/x'),
    (['--dataset', 'digits', '--tasks', '11', '--image-size', '32'],
     '--tasks 11 is more than the 10 classes'),
    (['--compare', '/nonexistent/a.json'], 'cannot read result file'),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ['--backbone-checkpoint', 'random'])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_fashion_mnist_says_which_package_to_install(monkeypatch, capsys):
    monkeypatch.setattr(datasets, '_find_fashion_mnist_dir', lambda: None)
    with pytest.raises(SystemExit) as exc:
        main(['--dataset', 'fashion-mnist', '--tasks', '5'])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'Fashion-MNIST not found' in err and 'dataset-fashion-mnist' in err
