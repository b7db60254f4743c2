"""The node's second-version contract in-process (real rclpy and DDS on loopback): status
names and levels, open world, refine/forget/undo, run-time parameters with their effect,
persistence off, logging to /rosout, and service callbacks that fail without taking the
executor down.

``harness`` is one node in namespace ``/v2`` that learns two tasks (red/blue, green/yellow)
at 64 px; tests run in file order and the last ones undo what was learned. ``bare`` nodes
have persistence off and nothing learned.
"""
import json
import logging
import threading
import time

import numpy as np
import pytest
from rcl_interfaces.msg import Log
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from ros2_cbpnet.ros import diagnostics as node_diagnostics
from ros2_cbpnet.learning.learner import UNDO_DEPTH
from ros_helpers import LATCHED, noisy_images, node_in_process, wait_until

pytestmark = [pytest.mark.ros]

NS = '/v2'
PREFIX = 'v2/cbpnet'
CAM = '/cbpnet_v2/cam/image_raw'
RED, BLUE, GREEN, YELLOW = (200, 40, 40), (40, 40, 200), (40, 190, 40), (210, 200, 40)
MIX = (120, 110, 90)


def params(**changes):
    values = dict(prediction='task', min_steps=0,  # the learned recipe
                  unknown_threshold=0.0,  # rejection off unless a test turns it on
                  image_size=64, epochs=3, batch_size=4, min_samples_per_class=3,
                  diagnostics_period_s=0.2, image_qos='reliable', image_topics=[CAM], top_k=5)
    values.update(changes)
    return values


def status(client, task, predicate=lambda level, v: True, *, prefix=PREFIX, timeout=30.0):
    """``(level, values)`` of status ``'<prefix>: <task>'`` satisfying ``predicate``."""
    found = client.wait_for_status(f'{prefix}: {task}', predicate, timeout)
    assert found is not None, f'no {prefix}: {task!r} status satisfying the condition'
    return found


def learner_values(client, predicate=lambda v: True, **kw):
    return status(client, 'learner', lambda level, v: predicate(v), **kw)[1]


def teach(client, colour, count, label, seed):
    client.publish_images('~/labelled_images',
                          noisy_images(colour, count, rng=np.random.default_rng(seed)), label)


def learn(client, timeout=180):
    reply = client.call_trigger('~/learn_task', timeout=timeout)
    return reply.success, json.loads(reply.message)


def collector(client, topic, *args, **kwargs):
    """One collector per topic for the client's lifetime: destroying subscriptions while the
    executor spins can make rclpy raise InvalidHandle in the spinner."""
    cache = client.__dict__.setdefault('_v2_collectors', {})
    if topic not in cache:
        cache[topic] = client.collect(topic, *args, **kwargs)
    return cache[topic]


def predict(client, rgb, tag):
    return client.classify(CAM, rgb, tag, collector(client, '~/predictions'))


def latest_labels(client, predicate, timeout=30.0):
    found = collector(client, '~/labels', qos=LATCHED).wait_for(predicate, timeout=timeout)
    assert found is not None, 'no ~/labels message satisfying the condition'
    return found


@pytest.fixture(scope='module')
def harness(tmp_path_factory):
    checkpoint_dir = tmp_path_factory.mktemp('v2_checkpoints')
    with node_in_process(params(checkpoint_dir=str(checkpoint_dir)), namespace=NS) as h:
        h.extra['checkpoint_dir'] = checkpoint_dir
        status(h.client, 'learner', timeout=60)
        yield h


@pytest.fixture(scope='module')
def two_tasks(harness):
    c = harness.client
    teach(c, RED, 10, 'red', 1)
    teach(c, BLUE, 10, 'blue', 2)
    learner_values(c, lambda v: int(v['buffer_samples']) == 20)
    first = learn(c)
    assert first[0], first
    teach(c, GREEN, 10, 'green', 3)
    teach(c, YELLOW, 10, 'yellow', 4)
    learner_values(c, lambda v: int(v['buffer_samples']) == 20)
    second = learn(c)
    assert second[0], second
    return first[1], second[1]


def ambiguous_frames():
    """Frames between the taught classes (and tasks): half one colour, half another, and
    noisy mixtures, where the prediction settings visibly change the outcome (on clear
    frames every mode says the same with probability 1.0)."""
    rng = np.random.default_rng(9)
    frames = noisy_images(MIX, 2, noise=60, rng=rng)
    for left, right in ((RED, GREEN), (BLUE, YELLOW), (GREEN, BLUE), (YELLOW, RED)):
        frame = noisy_images(left, 1, rng=rng)[0]
        frame[:, 32:] = noisy_images(right, 1, rng=rng)[0][:, 32:]
        frames.append(frame)
    return frames


class Held:
    """Holds learning at its first optimiser step, or the first chunk of its frozen pass
    (``stage='features'``), with an in-process hook on the progress callback, so a test can
    look at the node while a task is certainly being learned."""

    def __init__(self, node, stage='training'):
        self.node, self.held, self.release = node, threading.Event(), threading.Event()
        self.forward = node._model._on_progress
        self.stage = stage

    def _hold(self, progress):
        if progress.stage == self.stage and not self.held.is_set():
            self.held.set()
            self.release.wait(120)
        self.forward(progress)

    def __enter__(self):
        self.node._model._on_progress = self._hold
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.node._model._on_progress = self.forward


# ------------------------------------------------------------------------------ statuses
def test_status_names_carry_the_node_name_and_namespace(harness):
    array = harness.client.wait_for_diagnostics(
        lambda a: sum(s.name.startswith(f'{PREFIX}: ') for s in a.status) == 5,
        30, prefix=f'{PREFIX}:')
    assert array is not None
    ours = [s for s in array.status if s.name.startswith(f'{PREFIX}: ')]
    assert sorted(s.name for s in ours) == [f'{PREFIX}: {t}' for t in (
        'cbp block', 'fleet', 'inference', 'learner', 'prompts')]
    assert {s.hardware_id.split('@')[0] for s in ours} == {'/v2/cbpnet'}


# ------------------------------------------------------------------------------ learning
def test_two_tasks_reply_and_class_labels(harness, two_tasks):
    first, second = two_tasks
    assert (first['task_id'], first['new_classes'], first['refined_classes']) == (
        0, ['blue', 'red'], [])
    assert (second['task_id'], second['new_classes']) == (1, ['green', 'yellow'])
    assert second['model_version'] == first['model_version'] + 1
    assert second['checkpoint'].startswith(str(harness.extra['checkpoint_dir']))
    node = harness.node
    assert list(node.get_parameter('class_labels').value) == node.learner.classes == [
        'blue', 'red', 'green', 'yellow']
    refused = harness.client.set_parameters({'class_labels': ['cat']})[0]
    assert not refused.successful and 'node' in refused.reason
    assert list(node.get_parameter('class_labels').value) == node.learner.classes


def test_diagnostics_while_learning(harness, two_tasks):
    c, node = harness.client, harness.node
    teach(c, MIX, 6, 'grey', 5)
    learner_values(c, lambda v: int(v['buffer_samples']) == 6)
    version = node.learner.model_version
    with Held(node) as held:
        future = c.call_async(Trigger, '~/learn_task')
        assert held.held.wait(120)
        during = learner_values(c, lambda v: v['state'] == 'learning')
        assert int(during['model_version']) == version
        progress = json.loads(during['progress'])
        assert progress['task_id'] == 2 and progress['step'] == 1 and progress['steps'] >= 1
        level, inference = status(c, 'inference')
        held.release.set()
        reply = c.result(future, 180)
    assert reply.success, reply.message
    after = learner_values(c, lambda v: v['state'] == 'idle' and 'progress' not in v)
    assert int(after['model_version']) == version + 1
    assert json.loads(after['last_task'])['new_classes'] == ['grey']
    _, cbp = status(c, 'cbp block')
    assert int(cbp['replacements_total']) == node.learner.cbp_stats()['replacements_total']
    predict(c, noisy_images(MIX, 1, rng=np.random.default_rng(6))[0], 'grey_probe')
    _, prompts = status(c, 'prompts', lambda level, v: 'task_2' in v)
    assert int(prompts['e_prompts']) == 3
    assert sum(int(prompts[f'task_{t}']) for t in range(3)) == int(prompts['selections_total'])


def test_parameter_changes_while_learning_apply_when_it_ends(harness, two_tasks):
    c, node = harness.client, harness.node
    teach(c, (120, 70, 30), 6, 'brown', 7)  # a new class: learning has optimiser steps
    learner_values(c, lambda v: int(v['buffer_samples']) == 6)
    with Held(node) as held:
        future = c.call_async(Trigger, '~/learn_task')
        assert held.held.wait(120)
        asked = time.monotonic()
        result = c.set_parameters({'prediction': 'all'})[0]
        assert result.successful and time.monotonic() - asked < 5.0  # never waits for learning
        values = learner_values(c, lambda v: json.loads(v['pending_parameters']) != [])
        assert json.loads(values['pending_parameters']) == ['prediction']
        assert node.learner.config.prediction == 'task'
        held.release.set()
        assert c.result(future, 180).success
    try:
        assert node.learner.config.prediction == 'all' and node.learner.state.prediction == 'all'
        learner_values(c, lambda v: json.loads(v['pending_parameters']) == [])
    finally:
        assert c.set_parameters({'prediction': 'task'})[0].successful
    assert node.learner.state.prediction == 'task'


# ------------------------------------------------------------------------------ parameters
def test_top_k_trims_to_the_classes_and_to_top_k(harness, two_tasks):
    c = harness.client
    rgb = noisy_images(RED, 1, rng=np.random.default_rng(8))[0]
    classes = harness.node.learner.classes
    try:
        assert c.set_parameters({'top_k': 2})[0].successful
        two = predict(c, rgb, 'top2')
        assert len(two['topk']) == 2 and two['topk'][0]['label'] == two['label'] == 'red'
        assert c.set_parameters({'top_k': 50})[0].successful
        every = predict(c, rgb, 'top50')
        assert sorted(t['label'] for t in every['topk']) == sorted(classes)
        scores = [t['score'] for t in every['topk']]
        assert scores == sorted(scores, reverse=True)
    finally:
        c.set_parameters({'top_k': 5})


@pytest.mark.parametrize('name, value', [('prediction', 'all'), ('prompt_selection', 'key')])
def test_prediction_settings_change_predictions_at_once(harness, two_tasks, name, value):
    c, node = harness.client, harness.node
    frames = ambiguous_frames()
    before = [predict(c, rgb, f'{name}_before_{i}') for i, rgb in enumerate(frames)]
    serving = node.learner.state
    default = getattr(node.learner.config, name)
    assert c.set_parameters({name: value})[0].successful
    try:
        assert getattr(node.learner.state, name) == value
        assert getattr(serving, name) == default  # a copy was swapped in, not edited
        after = [predict(c, rgb, f'{name}_after_{i}') for i, rgb in enumerate(frames)]
    finally:
        assert c.set_parameters({name: default})[0].successful

    def outcome(p):
        return p['task_id'], [(t['label'], round(t['score'], 4)) for t in p['topk']]
    assert any(outcome(b) != outcome(a) for b, a in zip(before, after)), (
        [outcome(b) for b in before], [outcome(a) for a in after])
    assert all(a['model_version'] == b['model_version'] for a, b in zip(after, before))


def test_cbp_status_says_when_no_frame_passes_the_block(harness, two_tasks):
    c = harness.client
    # The harness runs the learned recipe: the block is in use.
    _, values = status(c, 'cbp block')
    assert values['in_use'] == 'true'
    assert c.set_parameters({'prediction': 'stats'})[0].successful
    try:
        _, values = status(c, 'cbp block', lambda level, v: v['in_use'] == 'false')
    finally:
        assert c.set_parameters({'prediction': 'task'})[0].successful
    assert 0.0 <= float(values['dormant_fraction']) <= 1.0  # still reported, for the record
    _, values = status(c, 'cbp block', lambda level, v: v['in_use'] == 'true')


PAPER = {'prediction': 'all', 'prompt_selection': 'key', 'feature_replay_coeff': 0.0,
         'g_prompt_first_task_only': False, 'train_cbp_block': True}


def test_recipe_paper_is_one_parameter_and_holds_its_fields(harness, two_tasks):
    """`recipe: paper` gives every part of the published method, the parameters read back
    what the learner uses, and a field it fixes cannot be changed behind its back."""
    c, node = harness.client, harness.node
    before = c.get_parameters(list(PAPER))
    assert before['prediction'] == 'task'  # the harness's own recipe
    assert c.set_parameters({'recipe': 'paper'})[0].successful
    try:
        assert wait_until(lambda: c.get_parameters(list(PAPER)) == PAPER, 10), \
            c.get_parameters(list(PAPER))
        assert {k: getattr(node.learner.config, k) for k in PAPER} == PAPER
        assert (node.learner.state.prediction, node.learner.state.prompt_selection) == (
            'all', 'key')
        refused = c.set_parameters({'prediction': 'stats'})[0]
        assert not refused.successful and "recipe 'paper' fixes prediction=all" in refused.reason
        assert c.get_parameters(['prediction'])['prediction'] == 'all'
        # Frames pass the prompts and the block: its diagnostics are live.
        _, values = status(c, 'cbp block', lambda level, v: v['in_use'] == 'true')
        predict(c, noisy_images(RED, 1, rng=np.random.default_rng(5))[0], 'paper_red')
    finally:
        assert c.set_parameters({'recipe': 'custom'})[0].successful
        for name, value in before.items():
            assert c.set_parameters({name: value})[0].successful, name
    assert c.get_parameters(list(PAPER)) == before


def test_diagnostics_period_changes_the_rate(harness):
    c = harness.client
    collector = c.diagnostics()

    def rate(seconds=1.5):
        start, started = len(collector), time.monotonic()
        time.sleep(seconds)
        ours = [a for a in collector.snapshot()[start:]
                if any(s.name.startswith(f'{PREFIX}:') for s in a.status)]
        return len(ours) / (time.monotonic() - started)

    try:
        assert c.set_parameters({'diagnostics_period_s': 0.05})[0].successful
        time.sleep(0.3)
        fast = rate()
        assert c.set_parameters({'diagnostics_period_s': 0.5})[0].successful
        time.sleep(0.6)
        slow = rate(2.0)
    finally:
        c.set_parameters({'diagnostics_period_s': 0.2})
    assert fast >= 8.0 and slow <= 3.0, (fast, slow)


def test_shrinking_buffer_caps_drops_the_oldest(harness):
    c = harness.client
    assert c.call_trigger('~/clear_buffer').success
    before = learner_values(c)
    teach(c, RED, 10, 'x', 10)
    teach(c, BLUE, 2, 'y', 11)
    learner_values(c, lambda v: int(v['buffer_samples']) == 12)
    try:
        assert c.set_parameters({'max_samples_per_class': 4})[0].successful
        values = learner_values(c, lambda v: int(v['buffer_samples']) == 6)
        assert json.loads(values['buffer_per_class']) == {'x': 4, 'y': 2}
        assert int(values['buffer_dropped']) == int(before['buffer_dropped']) + 6
        assert json.loads(values['buffer_limits']) == [4, 5000]
        assert c.set_parameters({'max_buffer_samples': 3})[0].successful
        values = learner_values(c, lambda v: int(v['buffer_samples']) == 3)
        assert sum(json.loads(values['buffer_per_class']).values()) == 3
        assert int(values['buffer_dropped']) == int(before['buffer_dropped']) + 9
    finally:
        c.set_parameters({'max_samples_per_class': 500, 'max_buffer_samples': 5000})
        assert c.call_trigger('~/clear_buffer').success


# ------------------------------------------------------------------------------ open world
def test_unknown_label_and_threshold_through_the_node(harness, two_tasks):
    c = harness.client
    rgb = noisy_images(RED, 1, rng=np.random.default_rng(12))[0]
    known = predict(c, rgb, 'open_known')
    assert known['known'] is True and known['label'] == 'red'
    # Random pixels look like nothing taught: far higher novelty than a red frame.
    odd_rgb = np.random.default_rng(7).integers(0, 256, rgb.shape, dtype=np.uint8)
    odd = predict(c, odd_rgb, 'open_odd')
    assert odd['known'] is True  # rejection is off by default in these tests
    assert odd['novelty'] > max(known['novelty'], 0.0) + 0.5, (known, odd)
    threshold = max(known['novelty'], 0.0) + 0.25
    _, before = status(c, 'inference')
    try:
        assert c.set_parameters({'unknown_threshold': threshold,
                                 'unknown_label': 'no idea'})[0].successful
        unknown = predict(c, odd_rgb, 'open_unknown')
        assert unknown['label'] == 'no idea' and unknown['known'] is False
        assert unknown['topk'][0]['label'] in harness.node.learner.classes  # taught ones
        assert unknown['score'] == pytest.approx(unknown['topk'][0]['score'])
        assert predict(c, rgb, 'open_still_known')['label'] == 'red'
        status(c, 'inference', lambda level, v: int(v['unknown_frames'])
               > int(before['unknown_frames']))
    finally:
        c.set_parameters({'unknown_threshold': 0.0, 'unknown_label': 'unknown'})
    assert predict(c, odd_rgb, 'open_known_again')['known'] is True


# ------------------------------------------------------------------------------ refine, forget
def test_refine_through_the_node(harness, two_tasks):
    c, node = harness.client, harness.node
    tasks = node.learner.num_tasks
    teach(c, (220, 60, 50), 5, 'red', 13)
    teach(c, (50, 200, 60), 5, 'green', 14)
    learner_values(c, lambda v: int(v['buffer_samples']) == 10)
    ok, reply = learn(c)
    assert ok, reply
    assert reply['task_id'] is None and reply['new_classes'] == []
    assert reply['refined_classes'] == ['green', 'red'] and reply['num_samples'] == 10
    assert node.learner.num_tasks == tasks
    assert predict(c, noisy_images(RED, 1, rng=np.random.default_rng(15))[0],
                   'after_refine')['label'] == 'red'


def test_forget_then_teaching_that_label_again_is_refused(harness, two_tasks):
    c, node = harness.client, harness.node
    c.publish('~/forget', String(data='yellow'))
    message = latest_labels(c, lambda m: 'yellow' not in m['classes'])
    assert message['model_version'] == node.learner.model_version
    assert 'yellow' not in node.get_parameter('class_labels').value
    values = learner_values(c, lambda v: json.loads(v['forgotten']) == ['yellow'])
    assert json.loads(values['last_change'])['checkpoint']
    teach(c, YELLOW, 5, 'yellow', 16)
    learner_values(c, lambda v: int(v['buffer_samples']) == 5)
    ok, reply = learn(c)
    assert not ok and 'forgotten' in reply['error'], reply
    assert c.call_trigger('~/clear_buffer').success


# ------------------------------------------------------------------------------ robustness
def test_rosout_receives_the_package_log(harness):
    c = harness.client
    rosout = collector(c, '/rosout', Log, QoSProfile(
        depth=1000, reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL), decode_json=False)
    assert wait_until(lambda: harness.node.count_subscribers('/rosout') >= 1, 30)
    marker = f'checkpoint marker {time.monotonic_ns()}'
    logging.getLogger('ros2_cbpnet.learning.checkpoint').warning('%s', marker)
    found = rosout.wait_for(lambda m: marker in m.msg, timeout=30)
    assert found is not None, 'the package log did not reach /rosout'
    assert found.name == 'v2.cbpnet' and found.msg == f'[ros2_cbpnet.learning.checkpoint] {marker}'
    assert found.level == Log.WARN


def test_service_failures_answer_and_never_stop_the_executor(harness, two_tasks, monkeypatch):
    c, learner = harness.client, harness.node.learner

    def boom(*args, **kwargs):
        raise ZeroDivisionError('simulated bug')

    monkeypatch.setattr(learner, 'save_checkpoint', boom)
    monkeypatch.setattr(learner, 'undo_last_task', boom)
    saved = c.call_trigger('~/save')
    assert not saved.success and 'ZeroDivisionError' in json.loads(saved.message)['error']
    undone = c.call_trigger('~/undo_last_task')
    assert not undone.success and 'simulated bug' in json.loads(undone.message)['error']
    monkeypatch.setattr(learner, 'learn_task', boom)
    teach(c, RED, 3, 'red', 17)
    learner_values(c, lambda v: int(v['buffer_samples']) == 3)
    ok, reply = learn(c)
    assert not ok and 'simulated bug' in reply['error']
    monkeypatch.undo()
    # Everything still answers, and the learner reports the failure.
    assert c.call_trigger('~/clear_buffer').success
    values = learner_values(c, lambda v: 'simulated bug' in v['last_error'])
    assert values['state'] == 'idle'
    assert predict(c, noisy_images(BLUE, 1, rng=np.random.default_rng(18))[0],
                   'after_failures')['label'] == 'blue'


def test_undo_until_nothing_is_left_to_undo(harness, two_tasks):
    c, node = harness.client, harness.node
    learner = node.learner
    undone = []
    while True:
        classes, forgotten = learner.classes, learner.forgotten_classes
        tasks, version = learner.tasks, learner.model_version
        reply = c.call_trigger('~/undo_last_task')
        if not reply.success:
            assert json.loads(reply.message) == {'error': 'nothing to undo'}
            assert (learner.classes, learner.model_version) == (classes, version)
            break
        result = json.loads(reply.message)
        assert result['model_version'] == learner.model_version == version + 1
        assert result['checkpoint']
        # The last learned task goes, with exactly its (not forgotten) classes.
        removed = result['removed_classes']
        assert learner.num_tasks == result['removed_task'] < len(tasks)
        assert removed == [name for task in tasks[result['removed_task']:]
                           for name in task['classes']]
        assert removed and set(removed) <= set(classes)
        # The classes shrink by those: the others stay, in order; only a class forgotten
        # after that task can come back (the model from before the task did not forget it).
        after = learner.classes
        assert [name for name in after if name in classes] == [
            name for name in classes if name not in removed], (classes, removed, after)
        assert set(after) - set(classes) <= set(forgotten), (forgotten, after)
        # ~/labels and the class_labels parameter follow at once.
        labels = latest_labels(c, lambda m, v=result['model_version']: m['model_version'] == v)
        assert labels['classes'] == after
        assert [t['task_id'] for t in labels['tasks']] == list(range(result['removed_task']))
        assert list(node.get_parameter('class_labels').value) == after
        undone.append(result)
        assert len(undone) < 10
    assert undone, 'nothing could be undone'
    # The undo history is UNDO_DEPTH models deep; at least that many tasks were learned.
    assert len(undone) == UNDO_DEPTH, undone
    values = learner_values(c, lambda v: int(v['model_version']) == learner.model_version)
    assert values['can_undo'] == 'false'
    assert json.loads(values['classes']) == learner.classes


# ------------------------------------------------------------------------------ bare nodes
@pytest.fixture
def bare(tmp_path, monkeypatch):
    """A node with nothing learned and persistence off; no camera frame arrives until the
    test sends one; input goes stale after 1 s instead of 5."""
    monkeypatch.setattr(node_diagnostics, 'STALE_INPUT_S', 1.0)
    with node_in_process(params(checkpoint_dir='', diagnostics_period_s=0.1),
                         namespace='/bare') as h:
        yield h


def test_cancel_stops_a_long_frozen_pass_over_dds(bare):
    """The statistics recipe has no optimiser step: ~/cancel_learning stops it between
    chunks of the frozen pass, and ~/learning_progress shows that pass."""
    c, node = bare.client, bare.node
    assert c.set_parameters({'prediction': 'stats'})[0].successful
    count = 300  # two chunks of the frozen pass at 64 px
    teach(c, RED, count // 2, 'red', 30)
    teach(c, BLUE, count // 2, 'blue', 31)
    status(c, 'learner', lambda level, v: int(v['buffer_samples']) == count,
           prefix='bare/cbpnet')
    progress = c.collect('~/learning_progress')
    with Held(node, stage='features') as held:
        future = c.call_async(Trigger, '~/learn_task')
        assert held.held.wait(120)
        cancelling = c.call_async(Trigger, '~/cancel_learning')
        time.sleep(0.5)  # the cancel is asked for while the first chunk is held
        held.release.set()
        cancelled = c.result(cancelling, 60)
    reply = c.result(future, 60)
    assert cancelled.success, cancelled.message
    assert not reply.success and json.loads(reply.message) == {'error': 'cancelled'}
    assert wait_until(lambda: len(progress) >= 1, 10)
    seen = progress.snapshot()
    assert {p['stage'] for p in seen} == {'features'}, seen
    assert seen[-1]['done'] < seen[-1]['total'] == count
    assert node.learner.num_tasks == 0
    values = learner_values(c, lambda v: v['state'] == 'idle', prefix='bare/cbpnet')
    assert int(values['buffer_samples']) == count  # kept for a later learn_task


def test_persistence_off_save_refused_and_learn_answers_checkpoint_null(bare, tmp_path):
    c = bare.client
    saved = c.call_trigger('~/save')
    assert not saved.success and 'persistence is off' in json.loads(saved.message)['error']
    teach(c, RED, 3, 'red', 20)
    teach(c, BLUE, 3, 'blue', 21)
    status(c, 'learner', lambda level, v: int(v['buffer_samples']) == 6, prefix='bare/cbpnet')
    ok, reply = learn(c)
    assert ok and reply['checkpoint'] is None, reply
    undone = c.call_trigger('~/undo_last_task')
    assert undone.success and json.loads(undone.message)['checkpoint'] is None


def test_save_before_any_task_is_refused(tmp_path):
    # Also: a node started with recipe paper reads back the recipe's values, whatever the
    # parameters file said for them.
    with node_in_process(params(checkpoint_dir=str(tmp_path), recipe='paper',
                                prediction='stats', feature_replay_coeff=2.0),
                         namespace='/fresh') as h:
        assert h.client.get_parameters(list(PAPER)) == PAPER
        assert h.node.learner.config.prediction == 'all'
        saved = h.client.call_trigger('~/save')
        assert not saved.success
        assert 'no task has been learned' in json.loads(saved.message)['error']
    # Nothing but the cached export of the frozen pass (runtime auto).
    assert [p.name for p in tmp_path.iterdir()] == ['onnx']


def test_inference_levels_follow_the_input(bare):
    c = bare.client
    _, values = status(c, 'inference', lambda level, v: level == 1, prefix='bare/cbpnet')
    assert values['seconds_since_frame'] == '-1.0'  # WARN: no camera frame since start
    good = c.image_msg(noisy_images(RED, 1, rng=np.random.default_rng(22))[0], frame_id='ok')
    bad = Image(width=64, height=64, step=7, encoding='rgb8', data=b'\0' * 448)

    def stream(msg, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            c.publish(CAM, msg)
            time.sleep(0.03)

    stream(good, 0.5)
    status(c, 'inference', lambda level, v: level == 0, prefix='bare/cbpnet')  # OK
    streamer = threading.Thread(target=stream, args=(bad, 1.5), daemon=True)
    streamer.start()
    # WARN while frames arrive but every one is rejected (not stale: they keep coming)
    _, values = status(c, 'inference', lambda level, v: level == 1 and float(
        v['seconds_since_frame']) < 0.5, prefix='bare/cbpnet')
    assert int(values['rejected_bad_step']) > 0
    streamer.join()
    # WARN again once the camera is quiet for longer than the stale limit (1 s here)
    _, values = status(c, 'inference', lambda level, v: level == 1 and float(
        v['seconds_since_frame']) >= 1.0, prefix='bare/cbpnet')


def test_a_dead_inference_thread_is_an_error(bare):
    class Fatal(BaseException):
        pass

    def die(frames):
        raise Fatal('simulated crash')

    c, node = bare.client, bare.node
    node._worker._process = die
    previous = threading.excepthook
    threading.excepthook = lambda args: None  # the dying thread's traceback is expected
    try:
        c.publish(CAM, c.image_msg(noisy_images(RED, 1)[0], frame_id='last'))
        level, values = status(c, 'inference', lambda level, v: level == 2,
                               prefix='bare/cbpnet')
    finally:
        threading.excepthook = previous
    assert not node._worker.alive


def test_parameter_dump_answers_every_parameter_and_a_checkpoint_layout_reads_back(tmp_path):
    """What `ros2 param dump` does (list_parameters, then get_parameters of every name) gets
    a value for every declared parameter, empty lists included; a layout parameter that a
    loaded checkpoint overrules reads back the value in use, not the configured one."""
    from rcl_interfaces.msg import ParameterType
    from rcl_interfaces.srv import GetParameters, ListParameters

    from ros2_cbpnet.ros.parameters import PARAMETERS
    with node_in_process(params(checkpoint_dir=str(tmp_path), prediction='stats'),
                         namespace='/dump') as h:
        c = h.client
        teach(c, RED, 3, 'red', 40)
        teach(c, BLUE, 3, 'blue', 41)
        status(c, 'learner', lambda level, v: int(v['buffer_samples']) == 6,
               prefix='dump/cbpnet')
        assert learn(c)[0]
        listed = c.result(c.call_async(ListParameters, '~/list_parameters'), 30).result.names
        request = GetParameters.Request()
        request.names = list(listed)
        values = c.result(c.call_async(GetParameters, '~/get_parameters', request), 30).values
        assert set(PARAMETERS) <= set(listed)
        assert len(values) == len(listed)
        unset = [n for n, v in zip(listed, values) if v.type == ParameterType.PARAMETER_NOT_SET]
        assert not unset, unset
        assert c.get_parameters(['query_layers', 'fleet_peers']) == {
            'query_layers': [], 'fleet_peers': []}
    with node_in_process(params(checkpoint_dir=str(tmp_path), prediction='stats',
                                cbp_hidden_units=32), namespace='/dump') as h:
        assert h.node.learner.config.cbp_hidden_units == 64  # the checkpoint's layout
        assert h.client.get_parameters(['cbp_hidden_units']) == {'cbp_hidden_units': 64}
        refused = h.client.set_parameters({'cbp_hidden_units': 32})[0]
        assert not refused.successful and 'read-only' in refused.reason
