"""Teaching is not one-shot: refine, undo, forget, cancel, "unknown", run-time reconfiguration."""
import threading

import numpy as np
import pytest

from ros2_cbpnet.learning.datasets import task_subset
from ros2_cbpnet.learning.learner import (ContinualLearner, LearnerBusyError, LearnerConfig,
                                          LearningCancelled, LearningError)
from ros2_cbpnet.learning.model import load_backbone

FAST = dict(image_size=32, epochs=2, batch_size=16, learning_rate=0.01)


@pytest.fixture(scope='module')
def backbone():
    return load_backbone('tf_efficientnet_lite0', image_size=32)


def _task(ds, class_ids, split='train', start=0, per_class=None):
    images = ds.train_images if split == 'train' else ds.test_images
    labels = ds.train_labels if split == 'train' else ds.test_labels
    x, y = task_subset(images, labels, class_ids)
    keep = np.concatenate([np.flatnonzero(y == c)[start:start + per_class if per_class else None]
                           for c in class_ids])
    return list(x[keep]), [ds.classes[i] for i in y[keep]]


def _learner(backbone, **kw):
    return ContinualLearner(LearnerConfig(**dict(FAST, **kw)), backbone=backbone)


@pytest.fixture()
def learner(backbone, digits):
    """Digits {0,1} then {2,3}, 20 images per class."""
    lrn = _learner(backbone)
    lrn.learn_task(*_task(digits, [0, 1], per_class=20))
    lrn.learn_task(*_task(digits, [2, 3], per_class=20))
    return lrn


def _predict_labels(lrn, images):
    return [p.label for p in lrn.predict(images)]


def test_refine_only_adds_no_task_and_keeps_other_classes(learner, digits):
    others_x, others_y = _task(digits, [0, 1, 3], 'test')
    before = learner.evaluate(others_x, others_y)
    result = learner.learn_task(*_task(digits, [2], start=20, per_class=30))
    assert result.task_id is None
    assert result.new_classes == [] and result.refined_classes == ['2']
    assert learner.num_tasks == 2 and learner.model_version == 3
    assert learner.state.stats.class_count.tolist() == [20, 20, 50, 20]
    # Refining '2' must not cost the other classes accuracy (a 2-image tolerance).
    assert learner.evaluate(others_x, others_y) >= before - 2 / len(others_y)


def test_mixed_buffer_refines_known_and_adds_new(learner, digits):
    x1, y1 = _task(digits, [3], start=20, per_class=10)
    x2, y2 = _task(digits, [4, 5], per_class=20)
    result = learner.learn_task(x1 + x2, y1 + y2)
    assert result.task_id == 2
    assert result.new_classes == ['4', '5'] and result.refined_classes == ['3']
    assert result.classes == ['3', '4', '5']
    assert learner.tasks[-1] == {'task_id': 2, 'classes': ['4', '5']}
    acc = learner.evaluate(*_task(digits, [4, 5], 'test'))
    assert acc > 0.3, acc  # chance over 6 classes is 0.17; revisited with the new model


def test_undo_restores_the_model_from_before_the_last_task(backbone, digits):
    lrn = _learner(backbone)
    lrn.learn_task(*_task(digits, [0, 1], per_class=20))
    probe, _ = _task(digits, [0, 1, 2], 'test', per_class=5)
    before = lrn.predict(probe)
    lrn.learn_task(*_task(digits, [2, 3], per_class=20))
    assert lrn.can_undo
    reply = lrn.undo_last_task()
    assert reply == {'removed_task': 1, 'removed_classes': ['2', '3'], 'model_version': 3}
    assert lrn.classes == ['0', '1'] and lrn.num_tasks == 1
    after = lrn.predict(probe)
    assert [p.label for p in after] == [p.label for p in before]
    assert [p.score for p in after] == pytest.approx([p.score for p in before], abs=1e-5)
    assert all(p.model_version == 3 for p in after)
    reply = lrn.undo_last_task()
    assert reply['removed_classes'] == ['0', '1'] and lrn.classes == []
    with pytest.raises(LearningError, match='nothing to undo'):
        lrn.undo_last_task()


def test_undo_after_restart_uses_the_older_checkpoint(backbone, digits, tmp_path):
    lrn = _learner(backbone)
    for classes in ([0, 1], [2, 3]):  # saved after every task, as the node does
        lrn.learn_task(*_task(digits, classes, per_class=10))
        lrn.save_checkpoint(str(tmp_path))
    fresh = _learner(backbone)
    assert fresh.load_latest_checkpoint(str(tmp_path)).endswith('cbpnet-000002.pt')
    assert fresh.can_undo
    assert fresh.undo_last_task()['removed_classes'] == ['2', '3']
    assert fresh.classes == ['0', '1'] and fresh.model_version == 3
    lrn.forget('3')
    lrn.save_checkpoint(str(tmp_path))  # the older kept file now has the same tasks
    other = _learner(backbone)
    other.load_latest_checkpoint(str(tmp_path))
    assert not other.can_undo


def test_forget_removes_a_class_for_good(learner, digits, tmp_path):
    x, _ = _task(digits, [2], 'test')
    assert '2' in _predict_labels(learner, x)
    reply = learner.forget('2')
    assert reply == {'forgotten': '2', 'model_version': 3}
    assert learner.classes == ['0', '1', '3']
    assert learner.tasks[1] == {'task_id': 1, 'classes': ['3']}
    labels = _predict_labels(learner, x)
    assert '2' not in labels
    assert all('2' not in [c for c, _ in p.topk] for p in learner.predict(x))
    with pytest.raises(LearningError, match='unknown class'):
        learner.forget('2')
    with pytest.raises(LearningError, match='forgotten'):
        learner.learn_task(*_task(digits, [2], per_class=5))
    path = learner.save_checkpoint(str(tmp_path))
    restored = _learner(learner.backbone)
    assert restored.load_latest_checkpoint(str(tmp_path)) == path
    assert restored.classes == ['0', '1', '3']
    assert '2' not in _predict_labels(restored, x)


def test_forgetting_every_class_means_nothing_to_predict(backbone, digits):
    lrn = _learner(backbone)
    lrn.learn_task(*_task(digits, [0, 1], per_class=10))
    lrn.forget('0')
    lrn.forget('1')
    with pytest.raises(RuntimeError, match='no task'):
        lrn.predict([np.zeros((8, 8, 3), np.uint8)])


def test_cancel_keeps_the_previous_model(learner, digits):
    probe, _ = _task(digits, [0, 1, 2, 3], 'test', per_class=3)
    before = learner.predict(probe)
    learner.reconfigure(prediction='task', min_steps=0)  # a recipe with optimiser steps
    cancel = threading.Event()
    steps = []

    def progress(p):
        if p.stage == 'training':
            steps.append(p.step)
        if p.step == 2:
            cancel.set()
    with pytest.raises(LearningCancelled, match='cancelled'):
        learner.learn_task(*_task(digits, [4, 5], per_class=30), progress=progress,
                           cancel=cancel)
    assert steps == [1, 2]
    assert learner.num_tasks == 2 and learner.model_version == 2
    learner.reconfigure(prediction='stats')
    after = learner.predict(probe)
    assert [p.score for p in after] == pytest.approx([p.score for p in before], abs=1e-6)
    assert not learner.is_learning
    # The statistics recipe has no optimiser step: it stops between chunks of the frozen pass.
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(LearningCancelled):
        learner.learn_task(*_task(digits, [4, 5], per_class=30), cancel=cancel)
    assert learner.num_tasks == 2 and learner.model_version == 2


def test_undo_and_forget_refused_while_learning_but_reconfigure_is_not(learner, digits):
    learner.reconfigure(prediction='task', min_steps=0)  # a recipe with optimiser steps
    started, release = threading.Event(), threading.Event()
    errors = []

    def progress(p):
        started.set()
        release.wait(10)
    worker = threading.Thread(target=lambda: learner.learn_task(
        *_task(digits, [4, 5], per_class=10), progress=progress))
    worker.start()
    try:
        assert started.wait(30)
        for call in (learner.undo_last_task, lambda: learner.forget('0')):
            try:
                call()
            except LearnerBusyError as exc:
                errors.append(str(exc))
        learner.reconfigure(top_k=2, head_weight=0.5)  # never waits for learning
        assert learner.config.top_k == 2 and learner.is_learning
    finally:
        release.set()
        worker.join(60)
    assert len(errors) == 2
    assert learner.num_tasks == 3
    # The settings changed during learning are in the model that was swapped in.
    assert learner.state.head_weight == 0.5


def test_novelty_marks_untaught_classes_unknown(learner, digits):
    taught_x, _ = _task(digits, [0, 1, 2, 3], 'test', per_class=15)
    novel_x, _ = _task(digits, [6, 7, 8, 9], 'test', per_class=15)
    taught = [p.novelty for p in learner.predict(taught_x)]
    novel = [p.novelty for p in learner.predict(novel_x)]
    # Standardised: a taught class's frames sit around 0, untaught ones clearly above.
    assert -2.0 < float(np.median(taught)) < 1.5
    # AUROC of novelty between untaught and taught frames.
    auroc = np.mean([[n > t for t in taught] for n in novel])
    assert auroc > 0.75, auroc
    threshold = float(np.quantile(taught, 0.9))
    learner.reconfigure(unknown_threshold=threshold, unknown_label='nothing I know')
    preds = learner.predict(novel_x)
    unknown = [p for p in preds if not p.known]
    assert unknown and all(p.label == 'nothing I know' for p in unknown)
    assert all(p.topk[0][0] in learner.classes and p.score == p.topk[0][1] for p in unknown)
    assert all(p.known == (p.novelty <= threshold) for p in preds)
    learner.reconfigure(unknown_threshold=0.0)
    assert all(p.known for p in learner.predict(novel_x))


def test_reconfigure_swaps_a_copy_and_refuses_architecture(learner, digits):
    old_state = learner.state
    learner.reconfigure(prediction='all', top_k=2)
    assert learner.state is not old_state
    assert old_state.prediction == 'stats' and learner.state.prediction == 'all'
    assert learner.config.top_k == 2
    assert len(learner.predict(_task(digits, [0], 'test', per_class=1)[0])[0].topk) == 2
    with pytest.raises(ValueError, match='cannot change'):
        learner.reconfigure(cbp_hidden_units=8)
    with pytest.raises(ValueError, match='top_k'):
        learner.reconfigure(top_k=0)
    assert learner.config.top_k == 2
