"""A fleet of node processes in one ROS domain: classes taught to one robot reach the others,
exactly, over ROS 2 (the ``fleet_*`` parameters, README "Fleet").

Robot A is taught digits {0, 1} then {2, 3}, robot B {4, 5}; both export and import. Robot C
is taught all six locally with the fleet off: the model one robot would have learned from
all the images. After the exchange A's and B's statistics must equal C's (read from their
checkpoints), their predictions must agree with C's, a robot started afterwards must receive
everything, one with another input size must import nothing, a restarted robot must keep
what it imported, and malformed contributions must change nothing.
"""
import json
import os

import numpy as np
import pytest
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import UInt8MultiArray

from ros2_cbpnet.learning import checkpoint as ckpt
from ros2_cbpnet.learning import fleet
from ros2_cbpnet.learning.datasets import task_subset
from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig
from ros_helpers import client_in_process, node_process, read_log, wait_until, \
    write_params_file

pytestmark = [pytest.mark.ros, pytest.mark.slow]

TOPIC = f'/cbpnet_fleet_test_{os.getpid()}/classes'
KEEP_ALL = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
FLEET_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.TRANSIENT_LOCAL)
TASKS = {'a': ([0, 1], [2, 3]), 'b': ([4, 5],), 'c': ([0, 1], [2, 3], [4, 5])}


def _params(tmp_path, name, fleet_on, **extra):
    values = dict(image_size=64, checkpoint_dir=str(tmp_path / name),
                  diagnostics_period_s=0.3, min_samples_per_class=2, unknown_threshold=0.0,
                  fleet_export=fleet_on, fleet_import=fleet_on, fleet_topic=TOPIC,
                  robot_id=f'robot_{name}', image_topics=[f'/fleet_{name}/image'])
    values.update(extra)
    return write_params_file(tmp_path / f'{name}.yaml', values)


def _labels(client, name, predicate, timeout=60.0):
    from ros_helpers import LATCHED
    collector = client.__dict__.setdefault('_labels', {})
    if name not in collector:
        collector[name] = client.collect(f'/{name}/cbpnet/labels', qos=LATCHED)
    return collector[name].wait_for(predicate, timeout=timeout)


def _status(client, name, task, predicate, timeout=60.0):
    found = client.wait_for_status(f'{name}/cbpnet: {task}', predicate, timeout)
    assert found is not None, f'no {name}/cbpnet: {task} status satisfying the condition'
    return found[1]


def _teach(client, name, digits, classes):
    topic = f'/{name}/cbpnet/labelled_images'
    client.publisher(topic, Image, KEEP_ALL)
    x, y = task_subset(digits.train_images, digits.train_labels, classes)
    client.publish_images(topic, list(x), [digits.classes[i] for i in y])
    _status(client, name, 'learner', lambda level, v: int(v['buffer_samples']) == len(x))
    reply = client.call_trigger(f'/{name}/cbpnet/learn_task', timeout=300)
    assert reply.success, reply.message
    # (another robot's contribution may have been merged meanwhile: a refinement then)
    assert set(json.loads(reply.message)['classes']) == {str(c) for c in classes}


def _statistics(directory):
    payload, _, problems = ckpt.load_newest_valid(str(directory), 'tf_efficientnet_lite0')
    assert payload is not None, problems
    sd = payload['state_dict']
    return (payload['classes'], sd['stats.class_count'], sd['stats.query_mean'].double(),
            sd['stats.query_scatter'].double(), payload)


def _same_statistics(directory, reference):
    classes, counts, means, scatter, _ = _statistics(directory)
    r_classes, r_counts, r_means, r_scatter, _ = reference
    visible = [c for c, n in zip(r_classes, r_counts.tolist()) if n > 0]
    assert sorted(c for c, n in zip(classes, counts.tolist()) if n > 0) == sorted(visible)
    i = [classes.index(c) for c in visible]
    j = [r_classes.index(c) for c in visible]
    assert counts[i].tolist() == r_counts[j].tolist()
    assert float((means[i] - r_means[j]).norm() / r_means[j].norm()) < 1e-6
    assert float((scatter - r_scatter).norm() / r_scatter.norm()) < 1e-6


@pytest.fixture(scope='module')
def fleet_run(tmp_path_factory, digits):
    tmp = tmp_path_factory.mktemp('fleet')
    procs = {}
    with client_in_process('/a/cbpnet') as client, \
            node_process(_params(tmp, 'a', True), ros_args=['-r', '__ns:=/a'],
                         log_path=tmp / 'a.log') as a, \
            node_process(_params(tmp, 'b', True), ros_args=['-r', '__ns:=/b'],
                         log_path=tmp / 'b.log') as b, \
            node_process(_params(tmp, 'c', False), ros_args=['-r', '__ns:=/c'],
                         log_path=tmp / 'c.log') as c:
        procs.update(a=a, b=b, c=c)
        for name in 'abc':
            _status(client, name, 'learner', lambda level, v: True, timeout=120)
        for name in 'abc':
            for classes in TASKS[name]:
                _teach(client, name, digits, classes)
        everything = {str(k) for k in range(6)}
        for name in 'ab':
            assert _labels(client, name, lambda m: set(m['classes']) == everything), \
                read_log(procs[name])
        yield {'tmp': tmp, 'client': client, 'procs': procs, 'digits': digits}


def test_each_robot_predicts_every_class_with_one_robots_statistics(fleet_run):
    tmp, client = fleet_run['tmp'], fleet_run['client']
    for name in 'ab':
        _status(client, name, 'learner', lambda level, v: v['state'] == 'idle')
    reference = _statistics(tmp / 'c')
    _same_statistics(tmp / 'a', reference)
    _same_statistics(tmp / 'b', reference)
    labels = _labels(client, 'b', lambda m: True)
    assert labels['origins']['0'] == ['robot_a'] and labels['origins']['4'] == ['robot_b']
    fleet_a = _status(client, 'a', 'fleet', lambda level, v: int(v['imported']) >= 1)
    assert int(fleet_a['exported']) == 2 and fleet_a['refused'] == '0'
    assert json.loads(fleet_a['peers_seen']) == {'robot_b': 1}


def test_predictions_agree_with_the_robot_taught_everything(fleet_run):
    """The models the robots serve (their checkpoints) on every test image of the six
    digits, and a live prediction of an imported class."""
    tmp, digits = fleet_run['tmp'], fleet_run['digits']
    x, _ = task_subset(digits.test_images, digits.test_labels, list(range(6)))
    predictions = {}
    for name in 'abc':
        learner = ContinualLearner(LearnerConfig(image_size=64, device='cpu'))
        assert learner.load_latest_checkpoint(str(tmp / name))
        predictions[name] = [p.topk[0][0] for p in learner.predict(list(x))]
    for name in 'ab':
        agree = np.mean([p == q for p, q in zip(predictions[name], predictions['c'])])
        assert agree >= 0.99, (name, agree)
    client = fleet_run['client']
    five = task_subset(digits.test_images, digits.test_labels, [5])[0]
    learner = ContinualLearner(LearnerConfig(image_size=64, device='cpu'))
    learner.load_latest_checkpoint(str(tmp / 'a'))
    probe = next(img for img in five if learner.predict([img])[0].topk[0][0] == '5')
    found = client.classify('/fleet_a/image', probe, 'imported_five',
                            client.collect('/a/cbpnet/predictions'))
    assert found['label'] == '5', found  # taught to B only


def test_a_robot_that_joins_later_receives_everything_and_another_feature_nothing(
        fleet_run):
    tmp, client = fleet_run['tmp'], fleet_run['client']
    with node_process(_params(tmp, 'd', True), ros_args=['-r', '__ns:=/d'],
                      log_path=tmp / 'd.log') as d, \
            node_process(_params(tmp, 'e', True, image_size=48), ros_args=['-r', '__ns:=/e'],
                         log_path=tmp / 'e.log') as e:
        everything = {str(k) for k in range(6)}
        assert _labels(client, 'd', lambda m: set(m['classes']) == everything, 120), \
            read_log(d)
        refused = _status(client, 'e', 'fleet',
                          lambda level, v: int(v['refused_fingerprint']) >= 3, 120)
        assert refused['imported'] == '0', read_log(e)
        assert _labels(client, 'e', lambda m: True)['classes'] == []
    _same_statistics(tmp / 'd', _statistics(tmp / 'c'))


def test_a_restarted_robot_keeps_what_it_imported(fleet_run):
    tmp, client, procs = fleet_run['tmp'], fleet_run['client'], fleet_run['procs']
    before = _statistics(tmp / 'b')[4]['model_version']
    procs['b'].send_signal(2)
    assert procs['b'].wait(timeout=60) == 0
    with node_process(_params(tmp, 'b', True), ros_args=['-r', '__ns:=/b'],
                      log_path=tmp / 'b2.log') as b:
        everything = {str(k) for k in range(6)}
        labels = _labels(client, 'b', lambda m: set(m['classes']) == everything
                         and m['model_version'] == before, 120)
        assert labels is not None, read_log(b)
        # A's contributions arrive again (transient-local) and change nothing.
        values = _status(client, 'b', 'fleet', lambda level, v: int(v['duplicates']) >= 2, 60)
        assert values['imported'] == '0'
        assert _statistics(tmp / 'b')[4]['model_version'] == before


def test_malformed_contributions_change_nothing_and_the_robot_keeps_serving(fleet_run):
    tmp, client, digits = fleet_run['tmp'], fleet_run['client'], fleet_run['digits']
    version = _statistics(tmp / 'a')[4]['model_version']
    good = fleet.decode(open(sorted((tmp / 'b' / 'fleet').iterdir())[0], 'rb').read())
    rng = np.random.default_rng(3)
    blobs = [fleet.encode(good)[:k] for k in rng.integers(0, 2000, 60)]
    for k in range(60):
        data = bytearray(fleet.encode(good))
        data[int(rng.integers(9, len(data)))] ^= 0xFF
        blobs.append(bytes(data))
    wrong = fleet.decode(fleet.encode(good))
    wrong.sequence, wrong.robot_id = 10 ** 6, 'robot_x'
    for counts in ([5, -1], [0, 3]):
        wrong.counts = np.array(counts)
        blobs.append(fleet.encode(wrong))
    wrong.counts = good.counts
    wrong.fingerprint = 'f' * 64
    blobs.append(fleet.encode(wrong))
    blobs += [os.urandom(int(n)) for n in rng.integers(1, 5000, 77)]
    assert len(blobs) >= 200
    publisher = client.create_publisher(UInt8MultiArray, TOPIC, FLEET_QOS)
    assert wait_until(lambda: publisher.get_subscription_count() >= 1, 30)
    for blob in blobs:
        publisher.publish(UInt8MultiArray(data=blob))
    values = _status(client, 'a', 'fleet', lambda level, v: int(v['refused']) >= len(blobs), 120)
    assert int(values['refused_malformed']) + int(values['refused_checksum']) >= 190, values
    assert values['imported'] == '1'  # B's task, from the exchange before
    assert int(values['refused_fingerprint']) == 1 and int(values['refused_inconsistent']) == 2
    x, _ = task_subset(digits.test_images, digits.test_labels, [3])
    found = client.classify('/fleet_a/image', x[0], 'after_fuzz',
                            client.collect('/a/cbpnet/predictions'))
    assert found is not None and found['model_version'] == version
    assert _statistics(tmp / 'a')[4]['model_version'] == version
