"""The continual learner with the embedded pretrained backbone, and its checkpoints."""
import os
import pickle
import re
import threading
import time

import numpy as np
import pytest
import torch

from ros2_cbpnet.learning import checkpoint as ckpt
from ros2_cbpnet.learning.datasets import task_subset
from ros2_cbpnet.learning.learner import (ContinualLearner, LearnerBusyError, LearnerConfig,
                                          LearningError)
from ros2_cbpnet.learning.model import load_backbone

#: The learned recipe (prompts, CBP block and head trained), small and quick.
FAST = dict(image_size=48, epochs=3, batch_size=16, learning_rate=0.01, prediction='task',
            min_steps=0)


@pytest.fixture(scope='module')
def backbone():
    return load_backbone('tf_efficientnet_lite0', image_size=48)


def _task(ds, class_ids, split='train', per_class=None):
    images = ds.train_images if split == 'train' else ds.test_images
    labels = ds.train_labels if split == 'train' else ds.test_labels
    x, y = task_subset(images, labels, class_ids)
    if per_class:
        keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in class_ids])
        x, y = x[keep], y[keep]
    return list(x), [ds.classes[i] for i in y]


def _learner(backbone, **kw):
    cfg = dict(FAST)
    cfg.update(kw)
    return ContinualLearner(LearnerConfig(**cfg), backbone=backbone)


@pytest.fixture(scope='module')
def two_tasks(backbone, digits):
    """A learner that learned digits {0,1,2} then {3,4,5}."""
    learner = _learner(backbone)
    progress = []
    results = [learner.learn_task(*_task(digits, cls), progress=progress.append)
               for cls in ([0, 1, 2], [3, 4, 5])]
    return learner, results, progress


@pytest.mark.slow
def test_two_digit_tasks_are_learned_well_above_chance(two_tasks, digits):
    learner, results, _ = two_tasks
    assert learner.classes == ['0', '1', '2', '3', '4', '5']
    assert learner.tasks == [{'task_id': 0, 'classes': ['0', '1', '2']},
                             {'task_id': 1, 'classes': ['3', '4', '5']}]
    assert learner.model_version == 2
    assert [r.task_id for r in results] == [0, 1]
    for cls in ([0, 1, 2], [3, 4, 5]):
        acc = learner.evaluate(*_task(digits, cls, 'test'))
        assert acc > 0.8, (cls, acc)  # chance over 6 classes is 0.17
    x, y = _task(digits, [0, 4], 'test', per_class=3)
    preds = learner.predict(x, top_k=3)
    assert all(isinstance(p.label, str) and p.label in learner.classes for p in preds)
    assert sum(p.label == t for p, t in zip(preds, y)) >= 5
    for p in preds:
        assert len(p.topk) == 3 and p.topk[0] == (p.label, p.score)
        assert 0.0 <= p.score <= 1.0 and p.task_id in (0, 1)


@pytest.mark.slow
def test_progress_is_reported_every_step(two_tasks):
    """Stages in order: the frozen pass chunk by chunk, every optimiser step, one 'done'."""
    _, results, progress = two_tasks
    first = [p for p in progress if p.task_id == 0]
    stages = [p.stage for p in first]
    features = [p for p in first if p.stage == 'features']
    training = [p for p in first if p.stage == 'training']
    assert stages == ['features'] * len(features) + ['training'] * len(training) + ['done']
    assert features[-1].done == features[-1].total == results[0].num_samples
    assert [p.done for p in features] == sorted(p.done for p in features)
    assert features[0].steps == training[-1].steps  # the plan is known before training
    assert training[-1].step == training[-1].steps == len(training)
    assert training[-1].epoch == training[-1].epochs == FAST['epochs']
    assert first[-1].done == first[-1].total == results[0].num_samples
    assert all(np.isfinite(p.loss) for p in progress)
    assert results[0].train_accuracy > 0.8


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_predictions(two_tasks, backbone, digits, tmp_path):
    learner, _, _ = two_tasks
    path = learner.save_checkpoint(str(tmp_path))
    assert os.path.basename(path) == 'cbpnet-000002.pt'
    restored = _learner(backbone)
    assert restored.load_latest_checkpoint(str(tmp_path)) == path
    assert restored.classes == learner.classes and restored.tasks == learner.tasks
    assert restored.model_version == 2
    x, _ = _task(digits, [0, 1, 2, 3, 4, 5], 'test', per_class=4)
    a, b = learner.predict(x), restored.predict(x)
    assert [p.label for p in a] == [p.label for p in b]
    assert np.allclose([p.score for p in a], [p.score for p in b], atol=1e-6)
    assert [p.task_id for p in a] == [p.task_id for p in b]
    cbp_a, cbp_b = learner.state.cbp, restored.state.cbp
    assert torch.equal(cbp_a.age, cbp_b.age) and torch.equal(cbp_a.utility, cbp_b.utility)


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous(backbone, digits, tmp_path):
    learner = _learner(backbone, epochs=1)
    learner.learn_task(*_task(digits, [0, 1], per_class=15))
    first = learner.save_checkpoint(str(tmp_path))
    learner.learn_task(*_task(digits, [2, 3], per_class=15))
    newest = learner.save_checkpoint(str(tmp_path))
    assert ckpt.list_checkpoints(str(tmp_path)) == [newest, first]
    with open(newest, 'r+b') as f:
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.read_checkpoint(newest)
    restored = _learner(backbone, epochs=1)
    assert restored.load_latest_checkpoint(str(tmp_path)) == first
    assert restored.classes == ['0', '1'] and restored.model_version == 1


def test_checkpoint_of_another_backbone_or_schema_is_refused(tmp_path):
    payload = {'schema_version': ckpt.SCHEMA_VERSION, 'format': ckpt.FORMAT,
               'backbone': 'vit_base_patch16_224', 'model_version': 3, 'classes': ['a'],
               'tasks': [['a']], 'architecture': {}, 'state_dict': {}}
    path = ckpt.write_checkpoint(payload, str(tmp_path))
    with pytest.raises(ckpt.IncompatibleCheckpointError, match='backbone'):
        ckpt.load_newest_valid(str(tmp_path), 'tf_efficientnet_lite0')
    # ...and it is never overwritten by a model of another backbone.
    other = dict(payload, backbone='tf_efficientnet_lite0')
    with pytest.raises(ckpt.IncompatibleCheckpointError):
        ckpt.write_checkpoint(other, str(tmp_path))
    assert ckpt.read_checkpoint(path)['backbone'] == 'vit_base_patch16_224'
    newer = dict(payload, schema_version=ckpt.SCHEMA_VERSION + 1, model_version=4)
    ckpt.write_checkpoint(newer, str(tmp_path / 'b'))
    with pytest.raises(ckpt.IncompatibleCheckpointError, match='schema'):
        ckpt.load_newest_valid(str(tmp_path / 'b'), 'vit_base_patch16_224')


class _Exploit:
    def __reduce__(self):
        return (os.system, ('touch /tmp/cbpnet-pwned',))


def test_malicious_pickle_checkpoint_is_refused_without_running_code(tmp_path):
    marker = '/tmp/cbpnet-pwned'
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / 'cbpnet-000009.pt'
    torch.save({'format': ckpt.FORMAT, 'evil': _Exploit()}, str(path),
               pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ckpt.CheckpointError, match='weights-only'):
        ckpt.read_checkpoint(str(path))
    payload, found, problems = ckpt.load_newest_valid(str(tmp_path), 'tf_efficientnet_lite0')
    assert payload is None and found is None and len(problems) == 1
    assert not os.path.exists(marker)


def test_atomic_write_leaves_no_temporary_files_and_keeps_two(tmp_path):
    base = {'schema_version': ckpt.SCHEMA_VERSION, 'format': ckpt.FORMAT, 'backbone': 'b',
            'classes': [], 'tasks': [], 'architecture': {}, 'state_dict': {}}
    (tmp_path / '.cbpnet-000001.pt.tmp-999').write_bytes(b'half written')
    for v in range(1, 5):
        ckpt.write_checkpoint(dict(base, model_version=v), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['cbpnet-000003.pt', 'cbpnet-000004.pt']


@pytest.mark.slow
def test_diverging_task_is_rolled_back(backbone, digits):
    learner = _learner(backbone, epochs=1)
    learner.learn_task(*_task(digits, [0, 1], per_class=15))
    probe, _ = _task(digits, [0, 1], 'test', per_class=5)
    before = learner.predict(probe)
    learner.config = learner.config.replace(learning_rate=1e30, grad_clip_norm=1e30)
    with pytest.raises(LearningError, match='rolled back'):
        learner.learn_task(*_task(digits, [2, 3], per_class=15))
    assert learner.classes == ['0', '1'] and learner.num_tasks == 1
    after = learner.predict(probe)
    assert [p.label for p in before] == [p.label for p in after]
    assert np.allclose([p.score for p in before], [p.score for p in after])


@pytest.mark.slow
def test_second_learn_call_is_refused_while_learning_and_prediction_continues(backbone, digits):
    learner = _learner(backbone, epochs=2)
    learner.learn_task(*_task(digits, [0, 1], per_class=10))
    started, release = threading.Event(), threading.Event()

    def slow_progress(_):
        started.set()
        release.wait(timeout=30)

    worker = threading.Thread(target=learner.learn_task,
                              args=_task(digits, [2, 3], per_class=10),
                              kwargs=dict(progress=slow_progress))
    worker.start()
    try:
        assert started.wait(timeout=60)
        assert learner.is_learning
        with pytest.raises(LearnerBusyError):
            learner.learn_task(*_task(digits, [4, 5], per_class=10))
        probe, _ = _task(digits, [0, 1], 'test', per_class=2)
        preds = learner.predict(probe)  # the old model keeps serving
        assert {p.label for p in preds} <= {'0', '1'}
    finally:
        release.set()
        worker.join(timeout=120)
    assert learner.classes == ['0', '1', '2', '3']


@pytest.mark.parametrize('images,labels,match', [
    ([], [], 'at least 2'),
    ([np.zeros((8, 8, 3), np.uint8)] * 2, ['a'], 'labels'),
    ([np.zeros((8, 8, 3), np.uint8)] * 2, ['a', ' '], 'empty'),
    ([np.zeros((8, 8, 3), np.float32)] * 2, ['a', 'b'], 'bad training image'),
])
def test_bad_learning_input_is_refused(backbone, images, labels, match):
    learner = _learner(backbone)
    with pytest.raises(LearningError, match=match):
        learner.learn_task(images, labels)
    assert learner.num_tasks == 0


@pytest.mark.slow
def test_predict_before_any_task_raises(backbone):
    with pytest.raises(RuntimeError, match='no task'):
        _learner(backbone).predict([np.zeros((8, 8, 3), np.uint8)])


@pytest.mark.parametrize('field,value', [
    ('learning_rate', -1.0), ('epochs', 0), ('cbp_replacement_rate', 2.0),
    ('cbp_decay_rate', 1.0), ('device', 'tpu'), ('prompt_selection', 'vote'),
    ('image_size', 5), ('precision', 'int8'),
])
def test_invalid_config_is_refused_with_the_field_named(field, value):
    # The whole name, as the message starts with it ("cbp" alone would match either cbp
    # field's message).
    with pytest.raises(ValueError, match=rf'^{re.escape(field)} must '):
        LearnerConfig(**{field: value}).validate()


def test_learning_with_a_tiny_vit_mixes_prompts_per_sample():
    """ViT mechanics end to end (random weights: no ViT weights exist offline)."""
    torch.manual_seed(0)
    bb = load_backbone('vit_tiny_patch16_224', 'random', image_size=32,
                       model_kwargs=dict(depth=5))
    learner = ContinualLearner(LearnerConfig(
        backbone='vit_tiny_patch16_224', backbone_checkpoint='random', image_size=32,
        epochs=2, learning_rate=0.01, prompt_selection='class_mean'), backbone=bb)
    rng = np.random.default_rng(0)

    def blobs(colour, n):
        base = np.array(colour, np.float32)
        return [np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                for _ in range(n)]
    learner.learn_task(blobs((250, 0, 0), 8) + blobs((0, 250, 0), 8), ['r'] * 8 + ['g'] * 8)
    learner.learn_task(blobs((0, 0, 250), 8) + blobs((250, 250, 250), 8), ['b'] * 8 + ['w'] * 8)
    assert learner.state.first_layer == 0 and learner.state.prompts.e_prompt_layers == [2, 3, 4]
    preds = learner.predict(blobs((250, 0, 0), 2) + blobs((0, 0, 250), 2))
    assert [p.task_id for p in preds] == [0, 0, 1, 1]
    assert len({p.label for p in preds}) >= 2


def test_parameter_counts_exclude_the_imagenet_classifier(backbone):
    counts = _learner(backbone).parameter_counts()
    classifier = sum(p.numel() for p in backbone.model.get_classifier().parameters())
    total = sum(p.numel() for p in backbone.model.parameters())
    assert counts['backbone_params'] == total - classifier
    assert 0 < counts['trainable_params'] < counts['backbone_params']


def test_prediction_threads_see_a_consistent_model_while_tasks_are_swapped_in(backbone,
                                                                              digits):
    """Predictions made while other threads learn tasks always come from one whole model:
    each names only classes of the model version it reports."""
    learner = _learner(backbone, prediction='stats')
    learner.learn_task(*_task(digits, [0, 1], per_class=10))
    classes_of = {learner.model_version: set(learner.classes)}
    x, _ = _task(digits, [0, 2, 4, 6, 8], 'test', per_class=2)
    stop, errors, versions = threading.Event(), [], set()

    def predictor():
        try:
            while not stop.is_set():
                for p in learner.predict(x, top_k=3):
                    versions.add(p.model_version)
                    names = {p.label if p.known else p.topk[0][0]} | {c for c, _ in p.topk}
                    assert names <= classes_of[p.model_version], (p, p.model_version)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
    threads = [threading.Thread(target=predictor) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for classes in ([2, 3], [4, 5], [6, 7]):
            # Registered before the swap, so a reader never meets an unknown version.
            classes_of[learner.model_version + 1] = set(learner.classes) | {
                digits.classes[c] for c in classes}
            learner.learn_task(*_task(digits, classes, per_class=10))
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:1]
    assert len(versions) >= 3  # the readers really saw models being swapped in


def test_statistics_recipe_trains_nothing_and_learns_from_statistics(backbone, digits):
    """The default recipe: a task only updates the class statistics (no optimiser step), and
    predictions come from the closed-form LDA over the multi-layer query."""
    learner = ContinualLearner(LearnerConfig(image_size=48), backbone=backbone)
    assert learner.config.prediction == 'stats'
    assert learner.config.query_layers == backbone.default_query_layers() == [3, 4, 5, 6, 7]
    before = {k: v.clone() for k, v in learner.state.cbp.state_dict().items()}
    steps = []
    result = learner.learn_task(*_task(digits, [0, 1, 2], per_class=30),
                                progress=steps.append)
    assert [p.stage for p in steps] == ['features'] * (len(steps) - 1) + ['done']
    assert result.epochs == 0 and result.replaced_units == 0
    assert result.train_accuracy > 0.9  # how the statistics classify what was taught
    after = learner.state.cbp.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not bool(learner.state.task_trained[0])
    learner.learn_task(*_task(digits, [3, 4, 5], per_class=30))
    acc = learner.evaluate(*_task(digits, [0, 1, 2, 3, 4, 5], 'test'))
    assert acc > 0.9, acc


def test_precision_auto_is_fp32_on_a_cpu(backbone):
    learner = ContinualLearner(LearnerConfig(image_size=48, device='cpu', precision='auto'),
                               backbone=backbone)
    assert learner.config.precision == 'fp32'
    assert not learner.training_precision.uses_grad_scaler
    with pytest.raises(ValueError, match='CUDA'):
        ContinualLearner(LearnerConfig(image_size=48, device='cpu', precision='fp16'),
                         backbone=backbone)
