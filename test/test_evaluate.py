"""``cbpnet-eval`` end to end on a tiny folder data set, the baselines, and bad arguments."""
import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from ros2_cbpnet.learning import datasets
from ros2_cbpnet.learning.baselines import (LinearProbe, NearestClassMean, RandomProjectionRidge,
                                            StreamingLDA, backbone_params_without_classifier)
from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig
from ros2_cbpnet.learning.model import load_backbone
from ros2_cbpnet.tools import eval_report, evaluate
from ros2_cbpnet.learning.config import RECIPES
from ros2_cbpnet.tools.eval_methods import learner_config
from ros2_cbpnet.tools.eval_protocols import auroc, validation_split
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
    assert cbp['config'] == {**cbp['config'], **{
        k: v for k, v in vars(LearnerConfig()).items()
        if k not in ('image_size', 'device', 'query_layers', 'g_prompt_layers',
                     'e_prompt_layers', 'epochs', 'batch_size')}}
    assert cbp['config']['query_layers'] == [3, 4, 5, 6, 7]  # resolved family default
    assert cbp['split'] == 'test' and cbp['protocol'] == 'incremental'
    assert ncm['trainable_params'] == 0 and ncm['replaced_units'] == 0
    assert set(data['summary']) == {'cbpnet', 'ncm'}


def test_plot_is_written(e2e):
    png = (e2e / 'acc.png').read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_compare_reads_result_files_and_plots_them_together(e2e, tmp_path, capsys):
    runs = json.loads((e2e / 'res.json').read_text())['runs']
    single = dict(runs[1], method='dualprompt', tag='x')
    del single['label']
    (tmp_path / 'single.json').write_text(json.dumps(single))
    plot = tmp_path / 'cmp.png'
    assert main(['--compare', str(e2e / 'res.json'), str(tmp_path / 'single.json'),
                 '--plot', str(plot)]) == 0
    out = capsys.readouterr().out
    for label in ('| cbpnet |', '| ncm |', '| dualprompt [x] |'):
        assert label in out
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_summary_gives_mean_and_sample_std_over_seeds():
    runs = [{'method': 'ncm', 'dataset': 'd', 'seed': s, 'acc_matrix': [[a], [a, b]],
             'average_accuracy': (a + b) / 2, 'forgetting': 0.0, 'learning_accuracy': a}
            for s, (a, b) in enumerate([(1.0, 0.5), (0.8, 0.3)])]
    summary = eval_report.summarize_runs(runs)['ncm']
    assert summary['runs'] == 2 and summary['seeds'] == [0, 1]
    assert summary['average_accuracy']['mean'] == pytest.approx(0.65)
    assert summary['average_accuracy']['std'] == pytest.approx(np.std([0.75, 0.55], ddof=1))
    assert np.allclose(np.concatenate(summary['acc_matrix']), [0.9, 0.9, 0.4])


def test_methods_and_overrides_map_onto_the_learner_config():
    parser = evaluate.build_parser()
    args = parser.parse_args(['--dataset', 'digits', '--tasks', '5',
                              '--g-prompt-layers', 'none', '--e-prompt-layers', '5,6,7',
                              '--cbp-replacement-rate', '0.01'])
    cfg = learner_config(args, 'dualprompt', 3, 64)
    # DualPrompt = the paper recipe with CBP off: key selection, one head over all classes,
    # no replay, G-prompt trained on every task, the block trained without replacement.
    assert cfg.recipe == 'paper' and cfg.cbp_enabled is False
    assert {k: getattr(cfg, k) for k in RECIPES['paper']} == RECIPES['paper']
    assert (cfg.prompt_selection, cfg.prediction, cfg.train_cbp_block) == ('key', 'all', True)
    paper = learner_config(args, 'cbpnet-paper', 3, 64)
    assert paper == cfg.replace(cbp_enabled=True)
    assert cfg.seed == 3 and cfg.image_size == 64
    assert cfg.g_prompt_layers == [-1] and cfg.e_prompt_layers == [5, 6, 7]
    assert cfg.cbp_replacement_rate == 0.01
    args = parser.parse_args(['--dataset', 'digits', '--tasks', '5', '--prediction', 'task',
                              '--head-weight', '2', '--query-layers', 'prelogits'])
    cfg = learner_config(args, 'cbpnet', 0, 64)
    assert (cfg.prediction, cfg.head_weight, cfg.query_layers) == ('task', 2.0, [-1])
    assert cfg.cbp_enabled is True
    assert learner_config(args, 'cbpnet-nocbp', 0, 64).cbp_enabled is False
    args = parser.parse_args(['--dataset', 'digits', '--tasks', '5', '--cbp', 'false',
                              '--feature-replay-coeff', '0.5', '--g-prompt-training',
                              'every-task', '--train-cbp-block', 'no'])
    cfg = learner_config(args, 'cbpnet', 0, 64)
    assert (cfg.cbp_enabled, cfg.feature_replay_coeff) == (False, 0.5)
    assert cfg.train_cbp_block is False
    assert cfg.g_prompt_first_task_only is False
    # Nothing given: the learner's own defaults (one source of truth).
    args = parser.parse_args(['--dataset', 'digits', '--tasks', '5'])
    assert learner_config(args, 'cbpnet', 0, 64) == LearnerConfig(image_size=64)
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

    def query(self, x, taps=None):
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
    (['--tasks', '5'], '--dataset is required'),
    (['--dataset', 'digits'], '--tasks is required'),
    (['--dataset', 'digits', '--tasks', '5', '--unknown-classes', '10'], 'leaves no class'),
    (['--dataset', 'digits', '--tasks', '5', '--unknown-classes', '6'],
     '--tasks 5 is more than the 4 classes to teach'),
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
    (['--dataset', 'digits', '--tasks', '5', '--method', 'cbpnet-paper', '--prediction',
      'stats'], 'cbpnet-paper fixes prediction=all'),
    (['--dataset', 'digits', '--tasks', '5', '--method', 'dualprompt', '--cbp', 'on'],
     'dualprompt fixes cbp_enabled=False'),
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


# ------------------------------------------------------------- closed-form baselines
def _blobs(seed=0, n=12, noise=8.0):
    """Four well separated colours: features far apart compared with their spread."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, rgb in COLOURS.items():
        imgs = np.clip(np.array(rgb, float) + rng.normal(0, noise, (n, 8, 8, 3)), 0, 255)
        out[name] = list(imgs.astype(np.uint8))
    return out


@pytest.mark.parametrize('cls, kwargs', [(StreamingLDA, {'shrinkage': 0.2}),
                                         (RandomProjectionRidge, {'projection_dim': 64,
                                                                  'ridge': 1e-3})])
def test_closed_form_baselines_are_exact_on_separable_data(cls, kwargs):
    train, test = _blobs(0), _blobs(1)
    model = cls(ColourMean(), device='cpu', **kwargs)
    model.learn_task(train['blue'] + train['green'], ['blue'] * 12 + ['green'] * 12)
    model.learn_task(train['red'] + train['yellow'], ['red'] * 12 + ['yellow'] * 12)
    names = list(COLOURS)
    x = [img for name in names for img in test[name]]
    y = [name for name in names for _ in test[name]]
    assert model.evaluate(x, y) == 1.0
    assert model.tasks == [['blue', 'green'], ['red', 'yellow']]


def test_streaming_lda_equals_lda_fitted_on_everything_at_once():
    train = _blobs(0, noise=30.0)
    one = StreamingLDA(ColourMean(), device='cpu')
    one.learn_task(train['blue'] + train['green'], ['blue'] * 12 + ['green'] * 12)
    one.learn_task(train['red'] + train['yellow'], ['red'] * 12 + ['yellow'] * 12)
    both = StreamingLDA(ColourMean(), device='cpu')
    both.learn_task([img for n in COLOURS for img in train[n]],
                    [n for n in COLOURS for _ in train[n]])
    probe = [img for n in COLOURS for img in _blobs(2, noise=30.0)[n]]
    order = [both.classes.index(c) for c in one.classes]
    assert torch.allclose(one.scores(one.features(probe)),
                          both.scores(both.features(probe))[:, order], atol=1e-4)


def test_auroc_matches_the_definition():
    assert auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert auroc([0.5, 0.5], [0.5]) == 0.5
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(size=50), rng.normal(0.5, size=40)
    brute = np.mean([[(p > n) + 0.5 * (p == n) for n in neg] for p in pos])
    assert auroc(neg, pos) == pytest.approx(brute)


# --------------------------------------------------------------------------- splits
def test_validation_split_never_contains_a_test_image():
    data = datasets.load_dataset('digits', seed=0)
    val = validation_split(data, 0.2, seed=0)
    assert val.name == 'digits[validation]'
    assert len(val.train_labels) + len(val.test_labels) == len(data.train_labels)
    train_rows = {img.tobytes() for img in data.train_images}
    test_rows = {img.tobytes() for img in data.test_images} - train_rows
    assert all(img.tobytes() in train_rows for img in val.test_images)
    assert not any(img.tobytes() in test_rows for img in val.train_images)
    assert not any(img.tobytes() in test_rows for img in val.test_images)
    counts = np.bincount(val.test_labels) / np.bincount(data.train_labels)
    assert np.allclose(counts, 0.2, atol=0.02)  # stratified


def test_validation_runs_never_pass_a_test_image_to_a_model(folder, tmp_path, monkeypatch):
    test_rows = set()
    real_load = datasets.load_dataset

    def load(*a, **kw):
        data = real_load(*a, **kw)
        test_rows.update(img.tobytes() for img in data.test_images)
        return data
    seen = []
    real_learn, real_eval = StreamingLDA.learn_task, StreamingLDA.evaluate
    monkeypatch.setattr(evaluate, 'load_dataset', load)
    monkeypatch.setattr(StreamingLDA, 'learn_task', lambda self, x, y, **kw: (
        seen.extend(x), real_learn(self, x, y, **kw))[1])
    monkeypatch.setattr(StreamingLDA, 'evaluate', lambda self, x, y, **kw: (
        seen.extend(x), real_eval(self, x, y, **kw))[1])
    out = tmp_path / 'val.json'
    assert main(['--dataset', f'folder:{folder}', '--tasks', '2', '--method', 'lda',
                 '--split', 'validation', '--image-size', '32', '--device', 'cpu',
                 '--quiet', '--out', str(out)]) == 0
    assert seen and test_rows
    assert not any(img.tobytes() in test_rows for img in seen)
    assert json.loads(out.read_text())['split'] == 'validation'


# ---------------------------------------------------------------- other protocols
def test_unknown_classes_are_held_out_and_scored(folder, tmp_path, monkeypatch):
    out = tmp_path / 'open.json'
    built = []  # the query layers of every Mahalanobis baseline the protocol builds
    real_init = StreamingLDA.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        built.append((self.query_layers, self.feature_dim))
    monkeypatch.setattr(StreamingLDA, '__init__', init)
    assert main(['--dataset', f'folder:{folder}', '--tasks', '1', '--unknown-classes', '2',
                 '--method', 'cbpnet', '--image-size', '32', '--device', 'cpu',
                 '--unknown-threshold', '3', '--quiet', '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['task_classes'] == [['blue', 'green']]
    assert r['unknown_classes'] == ['red', 'yellow']
    # Flat colours: untaught colours are far from both taught ones.
    assert r['unknown_auroc'] > 0.9 and r['mahalanobis_auroc'] > 0.5
    assert r['mahalanobis_query_auroc'] > 0.5
    # One baseline on the pre-logits feature, one on the learner's own (multi-layer) query.
    backbone = load_backbone('tf_efficientnet_lite0', 'random', image_size=32)
    query = backbone.default_query_layers()
    assert built == [(None, backbone.feature_dim), (query, backbone.query_dim(query))]
    assert r['unknown_threshold'] == 3.0
    assert 0.0 <= r['known_rejected_rate'] <= 0.2 and r['unknown_rejected_rate'] > 0.5


def test_joint_learns_all_seen_classes_at_once(folder, tmp_path):
    out = tmp_path / 'joint.json'
    assert main(['--dataset', f'folder:{folder}', '--tasks', '2', '--method', 'joint',
                 '--image-size', '32', '--device', 'cpu', '--quiet', '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['method'] == 'joint' and [len(row) for row in r['acc_matrix']] == [1, 2]
    assert r['average_accuracy'] >= 0.75


@pytest.mark.slow
def test_lifetime_protocol_reports_every_task(folder, tmp_path):
    out, plot = tmp_path / 'life.json', tmp_path / 'life.png'
    assert main(['--dataset', f'folder:{folder}', '--protocol', 'lifetime',
                 '--lifetime-tasks', '6', '--lifetime-train-per-class', '6',
                 '--lifetime-test-per-class', '4', '--method', 'cbpnet,lda',
                 '--prediction', 'task', '--epochs', '1', '--min-steps', '2',
                 '--image-size', '32', '--device', 'cpu', '--quiet', '--out', str(out),
                 '--plot', str(plot)]) == 0
    data = json.loads(out.read_text())
    learned, lda = data['runs']
    assert learned['protocol'] == 'lifetime' and len(learned['lifetime']) == 6
    for row in learned['lifetime']:
        assert len(row['classes']) == 2 and row['classes'][0] != row['classes'][1]
        assert 0.0 <= row['learning_accuracy'] <= 1.0
        assert 0.0 <= row['dormant_fraction'] <= 1.0
        assert 1.0 <= row['effective_rank'] <= row['hidden_units']
    # Flat colours under fresh labels: each new pair is told apart.
    assert lda['learning_accuracy'] > 0.9
    assert 'dormant_fraction' not in lda['lifetime'][0]
    assert plot.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_resume_keeps_finished_runs_and_reruns_the_rest(folder, tmp_path, monkeypatch):
    out = tmp_path / 'resume.json'
    argv = ['--dataset', f'folder:{folder}', '--tasks', '2', '--method', 'lda,ncm',
            '--seeds', '0,1', '--image-size', '32', '--device', 'cpu', '--quiet',
            '--out', str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    # A job killed after three runs, one of them marked so that a rerun would lose the mark.
    data['runs'] = data['runs'][:3]
    data['runs'][0]['marker'] = 'kept'
    data['partial'] = True
    out.write_text(json.dumps(data))
    calls = []
    real = evaluate.run_incremental
    monkeypatch.setattr(evaluate, 'run_incremental',
                        lambda method, *a, **kw: (calls.append(method), real(method, *a, **kw))[1])
    assert main(argv + ['--resume']) == 0
    runs = json.loads(out.read_text())['runs']
    assert calls == ['ncm']  # only seed 1's ncm was missing
    pairs = [(r['method'], r['seed']) for r in runs]
    assert pairs == [('lda', 0), ('ncm', 0), ('lda', 1), ('ncm', 1)]
    assert runs[0]['marker'] == 'kept'
    # Other options: nothing is reused.
    calls.clear()
    assert main(argv[:-2] + ['--lda-shrinkage', '0.3', '--out', str(out), '--resume']) == 0
    assert calls == ['lda', 'ncm', 'lda', 'ncm']


def test_paper_recipe_reports_task_selection_and_converged_keys(folder, tmp_path):
    """Four colours in two tasks: the paper recipe's keys converge to their optimum and pick
    each frame's own task; keys left at their random start (no key steps) do not."""
    def run(extra):
        out = tmp_path / f'paper{len(extra)}.json'
        assert main(['--dataset', f'folder:{folder}', '--tasks', '2', '--method',
                     'cbpnet-paper', '--image-size', '32', '--epochs', '1', '--min-steps', '0',
                     '--device', 'cpu', '--quiet', '--out', str(out)] + extra) == 0
        return json.loads(out.read_text())
    res = run([])
    assert res['method'] == 'cbpnet-paper' and res['config']['recipe'] == 'paper'
    assert len(res['task_selection_accuracy']) == 2 and len(res['key_query_cosine']) == 2
    assert [len(row) for row in res['task_selection_matrix']] == [1, 2]
    for cosine, best in res['key_query_cosine']:
        assert best - 0.01 <= cosine <= best + 1e-6
    assert min(res['task_selection_accuracy']) >= 0.9
    assert res['mean_task_selection_accuracy'] == pytest.approx(
        np.mean(res['task_selection_accuracy']))
    untrained = run(['--key-steps', '0'])
    assert all(cosine < best - 0.2 for cosine, best in untrained['key_query_cosine'])


def test_plasticity_protocol_runs_the_learned_parts_alone(folder, tmp_path):
    out, plot = tmp_path / 'plast.json', tmp_path / 'plast.png'
    assert main(['--dataset', f'folder:{folder}', '--protocol', 'plasticity',
                 '--lifetime-tasks', '4', '--lifetime-train-per-class', '6',
                 '--lifetime-test-per-class', '4', '--method', 'cbpnet,cbpnet-nocbp',
                 '--plasticity-prompts', 'true', '--epochs', '2', '--image-size', '32',
                 '--device', 'cpu', '--quiet', '--out', str(out), '--plot', str(plot)]) == 0
    on, off = json.loads(out.read_text())['runs']
    assert (on['cbp_enabled'], off['cbp_enabled']) == (True, False)
    assert on['protocol'] == 'plasticity' and on['prompts'] is True and len(on['lifetime']) == 4
    for row in on['lifetime']:
        assert 0.0 <= row['dormant_fraction_zero'] <= 1.0 and row['weight_magnitude'] > 0
    assert on['trainable_params'] > 2 * 64 * 1280  # the block and the prompts
    assert plot.read_bytes().startswith(PNG_MAGIC)
