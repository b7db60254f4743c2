"""The node's ROS-free parts, without a node: parameter defaults (one source of truth),
diagnostics levels, the vision_msgs mapping (with stand-in message classes, since no
vision_msgs wheel exists), the log bridge, teaching and the inference thread."""
import dataclasses
import logging
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import yaml

from ros2_cbpnet.learning.learner import LearnerConfig, Prediction
from ros2_cbpnet.ros.node import prediction_record
from ros2_cbpnet.ros.counters import NodeStats
from ros2_cbpnet.ros.diagnostics import (ERROR, FAILING_AFTER, OK, STALE_INPUT_S, WARN,
                                         InferenceHealth, StatusBuilder, inference_health,
                                         status_prefix)
from ros2_cbpnet.ros.parameters import (DEFAULTS, LEARNER_PARAMS, NODE_DEFAULT_OVERRIDES,
                                        NOT_EXPOSED, PARAMETERS, check_parameters)
from ros2_cbpnet.ros.inference_worker import InferenceWorker
from ros2_cbpnet.ros.ros_logging import (PACKAGE_LOGGER, RosLogHandler, forward_package_logs,
                                         stop_forwarding)
from ros2_cbpnet.ros.teaching import TeachSession
from ros2_cbpnet.ros.vision_msgs_bridge import (VisionTypes, classification_message, hypotheses,
                                                load_vision_msgs, method_name,
                                                vision_info_message)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ parameters
def test_learner_defaults_come_from_learner_config():
    reference = LearnerConfig()
    for name in LEARNER_PARAMS:
        want = NODE_DEFAULT_OVERRIDES.get(name, getattr(reference, name))
        assert DEFAULTS[name] == want, name
    assert NODE_DEFAULT_OVERRIDES == {'image_size': 128}


def test_every_learner_config_field_is_exposed_or_deliberately_not():
    fields = {f.name for f in dataclasses.fields(LearnerConfig)}
    assert fields == set(LEARNER_PARAMS) | set(NOT_EXPOSED), (
        fields ^ (set(LEARNER_PARAMS) | set(NOT_EXPOSED)))
    assert set(LEARNER_PARAMS) <= set(PARAMETERS)


def test_shipped_yaml_follows_learner_config():
    params = yaml.safe_load((ROOT / 'config' / 'cbpnet.yaml').read_text())
    params = params['/**/cbpnet']['ros__parameters']
    reference = LearnerConfig()
    for name in LEARNER_PARAMS:
        assert params[name] == NODE_DEFAULT_OVERRIDES.get(name, getattr(reference, name)), name


@pytest.mark.parametrize('changes, words', [
    ({'unknown_label': ''}, 'unknown_label'),
    ({'unknown_label': 'a\nb'}, 'unknown_label'),
    ({'unknown_threshold': -1.0}, 'unknown_threshold'),
    ({'unknown_threshold': float('nan')}, 'unknown_threshold'),
])
def test_open_world_parameters_are_validated(changes, words):
    with pytest.raises(ValueError, match=words):
        check_parameters({**DEFAULTS, **changes})


# ------------------------------------------------------------------------------ diagnostics
def _health(**kw):
    base = dict(worker_alive=True, failed_batches=0, last_error='', seconds_since_frame=0.1,
                seconds_since_start=60.0, received_in_period=30, rejected_in_period=0,
                topics=['/cam'])
    base.update(kw)
    return inference_health(InferenceHealth(**base))


@pytest.mark.parametrize('changes, level, words', [
    ({}, OK, 'classifying'),
    ({'seconds_since_frame': None, 'seconds_since_start': 1.0}, OK, 'waiting'),
    ({'seconds_since_frame': None, 'seconds_since_start': STALE_INPUT_S + 1}, WARN,
     'no camera frame received since start'),
    ({'seconds_since_frame': STALE_INPUT_S + 2}, WARN, 'no camera frame for 7 s'),
    ({'rejected_in_period': 30}, WARN, 'every camera frame was rejected'),
    ({'rejected_in_period': 29}, OK, 'classifying'),
    ({'received_in_period': 0, 'rejected_in_period': 0}, OK, 'classifying'),
    ({'failed_batches': FAILING_AFTER, 'last_error': 'RuntimeError: x'}, ERROR, 'RuntimeError'),
    ({'failed_batches': FAILING_AFTER - 1}, OK, 'classifying'),
    ({'worker_alive': False, 'seconds_since_frame': STALE_INPUT_S + 2}, ERROR, 'stopped'),
])
def test_inference_health_levels(changes, level, words):
    got_level, message = _health(**changes)
    assert got_level == level and words in message, (got_level, message)


def test_status_names_and_hardware_id():
    assert status_prefix('/cbpnet') == 'cbpnet'
    assert status_prefix('/robot1/cbpnet') == 'robot1/cbpnet'
    builder = StatusBuilder('robot1/cbpnet', 'hw')
    status = builder.status('learner', WARN, 'm', {'a': 1, 'b': 'x', 'c': [1, 2]})
    assert status.name == 'robot1/cbpnet: learner' and status.hardware_id == 'hw'
    assert {kv.key: kv.value for kv in status.values} == {'a': '1', 'b': 'x', 'c': '[1, 2]'}


def test_inference_status_rates_and_counters():
    stats = NodeStats(now=100.0)
    stats.received, stats.classified, stats.dropped = 30, 20, 10
    stats.rejected['bad_step'] += 2
    stats.rejected_by_input['camera'] += 2
    stats.latencies_ms.extend([10.0, 20.0, 30.0])
    stats.last_frame_at = 101.5
    status = StatusBuilder('cbpnet', 'hw').inference(
        stats, 102.0, worker_alive=True, num_tasks=1, topics=['/cam'],
        static={'device': 'cpu'})
    values = {kv.key: kv.value for kv in status.values}
    assert status.level == OK and status.name == 'cbpnet: inference'
    assert values['input_rate_hz'] == '15.0' and values['classified_rate_hz'] == '10.0'
    assert values['rejected'] == '2' and values['rejected_bad_step'] == '2'
    assert values['rejected_camera'] == '2' and values['dropped_frames'] == '10'
    assert values['latency_mean_ms'] == '20.0' and values['seconds_since_frame'] == '0.5'
    assert values['device'] == 'cpu' and values['topics'] == '["/cam"]'
    assert stats.last_report == (102.0, 30, 20, 2)


# ------------------------------------------------------------------------------ vision_msgs
@dataclasses.dataclass
class _Header:
    stamp: object = None
    frame_id: str = ''


@dataclasses.dataclass
class _Hypothesis:  # vision_msgs/ObjectHypothesis (4.x)
    class_id: str = ''
    score: float = 0.0


@dataclasses.dataclass
class _Classification:  # vision_msgs/Classification
    header: _Header = dataclasses.field(default_factory=_Header)
    results: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _VisionInfo:  # vision_msgs/VisionInfo
    header: _Header = dataclasses.field(default_factory=_Header)
    method: str = ''
    database_location: str = ''
    database_version: int = 0


FAKE = VisionTypes(_Classification, _Hypothesis, _VisionInfo)


def test_hypotheses_follow_the_json_label():
    topk = [('cup', 0.7), ('mug', 0.2)]
    assert hypotheses('cup', 0.7, True, topk) == [('cup', 0.7), ('mug', 0.2)]
    assert hypotheses('unknown', 0.7, False, topk) == [('unknown', 0.7), ('cup', 0.7),
                                                       ('mug', 0.2)]


def test_classification_message_copies_header_and_hypotheses():
    header = _Header(stamp=(3, 4), frame_id='cam0_optical')
    msg = classification_message(header, [('cup', 0.7), ('mug', 0.2)], FAKE)
    assert msg.header is header
    assert [(h.class_id, h.score) for h in msg.results] == [('cup', 0.7), ('mug', 0.2)]
    assert all(isinstance(h, _Hypothesis) for h in msg.results)


def test_vision_info_message():
    config = LearnerConfig(prediction='task')
    msg = vision_info_message((5, 6), method_name(config), '/robot1/cbpnet/class_labels', 7,
                              FAKE)
    assert msg.header.stamp == (5, 6) and msg.database_version == 7
    assert msg.database_location == '/robot1/cbpnet/class_labels'
    assert msg.method == ('CBPNet on tf_efficientnet_lite0 (selection lda, prediction task, '
                          'CBP on)')
    assert vision_info_message(None, 'm', 'l', 2 ** 40, FAKE).database_version == 2 ** 31 - 1


def test_vision_info_method_names_the_parts_in_use():
    """The default uses neither prompts nor the block: the method must not say 'CBP on'."""
    default = method_name(LearnerConfig())
    assert 'not in use' in default and 'CBP on' not in default
    assert method_name(LearnerConfig(recipe='paper')).startswith('CBPNet, paper recipe')
    assert 'CBP on' in method_name(LearnerConfig(recipe='paper'))
    assert method_name(LearnerConfig(recipe='paper', cbp_enabled=False)).startswith(
        'DualPrompt')
    assert 'untrained' in method_name(LearnerConfig(prediction='all', train_cbp_block=False))


def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def test_load_vision_msgs_says_why_when_missing(monkeypatch):
    try:
        from vision_msgs.msg import Classification, ObjectHypothesis, VisionInfo
    except ImportError as exc:  # no vision_msgs wheel on PyPI: this project's machines
        assert load_vision_msgs() == (None, f'vision_msgs is not installed ({exc})')
        assert str(exc) == "No module named 'vision_msgs'"
    else:  # an apt/colcon ROS install: the real message classes, with 4.x field names
        assert load_vision_msgs() == (
            VisionTypes(Classification, ObjectHypothesis, VisionInfo), '')
    # Whatever is installed: a 4.x package gives its three classes, in that order ...
    monkeypatch.setitem(sys.modules, 'vision_msgs', _module('vision_msgs'))
    monkeypatch.setitem(sys.modules, 'vision_msgs.msg', _module(
        'vision_msgs.msg', Classification=_Classification, ObjectHypothesis=_Hypothesis,
        VisionInfo=_VisionInfo))
    assert load_vision_msgs() == (FAKE, '')
    # ... and a 3.x one (ObjectHypothesis.id, no class_id) is refused, saying why.
    old = _module('vision_msgs.msg', Classification=_Classification, VisionInfo=_VisionInfo,
                  ObjectHypothesis=type('ObjectHypothesis', (), {'id': '', 'score': 0.0}))
    monkeypatch.setitem(sys.modules, 'vision_msgs.msg', old)
    assert load_vision_msgs() == (
        None, 'vision_msgs is older than 4.0 (no ObjectHypothesis.class_id)')


def test_prediction_record_is_the_json_contract():
    pred = Prediction('unknown', 0.6, 1, [('cup', 0.6), ('mug', 0.3)], novelty=4.5,
                      known=False, model_version=3, runtime='onnxruntime',
                      provider='CPUExecutionProvider')
    header = types.SimpleNamespace(stamp=types.SimpleNamespace(sec=1, nanosec=2),
                                   frame_id='f')
    assert prediction_record(pred, header, '/cam', 12.5) == {
        'stamp': {'sec': 1, 'nanosec': 2}, 'frame_id': 'f', 'source': '/cam',
        'label': 'unknown', 'score': 0.6, 'known': False, 'novelty': 4.5, 'task_id': 1,
        'topk': [{'label': 'cup', 'score': 0.6}, {'label': 'mug', 'score': 0.3}],
        'latency_ms': 12.5, 'model_version': 3, 'runtime': 'onnxruntime',
        'provider': 'CPUExecutionProvider'}


# ------------------------------------------------------------------------------ logging
class _FakeRosLogger:
    def __init__(self):
        self.calls = []

    def __getattr__(self, level):
        if level not in ('debug', 'info', 'warning', 'error', 'fatal'):
            raise AttributeError(level)
        return lambda message: self.calls.append((level, message))


def test_package_log_records_are_forwarded_with_their_level_and_name():
    ros = _FakeRosLogger()
    handler = forward_package_logs(ros)
    try:
        log = logging.getLogger(PACKAGE_LOGGER + '.learner')
        log.debug('d')
        log.info('i %s', 1)
        log.warning('w')
        log.error('e')
        log.critical('c')
        logging.getLogger('someone_else').error('not ours')
    finally:
        stop_forwarding(handler)
    assert ros.calls == [
        ('debug', '[ros2_cbpnet.learner] d'), ('info', '[ros2_cbpnet.learner] i 1'),
        ('warning', '[ros2_cbpnet.learner] w'), ('error', '[ros2_cbpnet.learner] e'),
        ('fatal', '[ros2_cbpnet.learner] c')]
    assert logging.getLogger(PACKAGE_LOGGER).propagate  # restored
    logging.getLogger(PACKAGE_LOGGER).error('after')
    assert len(ros.calls) == 5


def test_a_failing_ros_logger_does_not_raise(monkeypatch, capsys):
    tried = []

    class Broken:
        def error(self, message):
            tried.append(message)
            raise RuntimeError('context gone')
    monkeypatch.setattr(logging, 'raiseExceptions', False)
    handler = RosLogHandler(Broken())
    handled = []
    handle_error = handler.handleError
    monkeypatch.setattr(handler, 'handleError',
                        lambda record: (handled.append(record), handle_error(record)))
    record = logging.LogRecord('ros2_cbpnet', logging.ERROR, __file__, 1, 'x', (), None)
    handler.emit(record)  # returns: the failure goes to logging's own handleError
    assert tried == ['[ros2_cbpnet] x']  # the record did reach the ROS logger
    assert handled == [record]
    assert capsys.readouterr() == ('', '')  # and, with raiseExceptions off, stays silent


# ------------------------------------------------------------------------------ teaching
def test_teach_session_rate_timeout_and_stop():
    s = TeachSession()
    assert s.take_sample(0.0, 5.0) is None and s.current(0.0) == (None, None)
    s.start('cup', timeout_s=1.0, now=10.0)
    assert s.take_sample(10.0, 5.0) == 'cup'
    assert s.take_sample(10.1, 5.0) is None  # faster than 5 Hz
    assert s.take_sample(10.25, 5.0) == 'cup'
    assert s.current(10.5) == ('cup', None)
    assert s.take_sample(11.5, 5.0) is None  # past the deadline
    assert s.current(11.5) == (None, 'cup') and s.current(11.6) == (None, None)
    s.start('mug', timeout_s=10.0, now=20.0)
    assert s.stop() == 'mug' and s.stop() is None


# ------------------------------------------------------------------------------ inference
class _Log:
    def __init__(self):
        self.lines = []

    def error(self, message, **kwargs):
        self.lines.append(('error', message))

    def fatal(self, message, **kwargs):
        self.lines.append(('fatal', message))


def test_inference_worker_keeps_the_newest_frame_and_counts_failures():
    stats, log, batches = NodeStats(), _Log(), []
    gate = threading.Event()

    def process(frames):
        gate.wait(10)
        batches.append(frames)
        if 'bad' in frames:
            raise ValueError('bad frame')

    worker = InferenceWorker(process, stats, log)
    worker.start()
    try:
        worker.submit('/a', 'a1')
        assert _until(lambda: stats.received == 1 and not worker._pending)  # taken, blocked
        worker.submit('/a', 'a2')
        worker.submit('/a', 'a3')  # replaces a2 before the thread saw it
        worker.submit('/b', 'b1')
        gate.set()
        assert _until(lambda: stats.frames_processed == 3)
        assert batches == [['a1'], ['a3', 'b1']] and stats.dropped == 1
        for _ in range(FAILING_AFTER):
            worker.submit('/a', 'bad')
            assert _until(lambda: not worker._pending and len(batches) and batches[-1] ==
                          ['bad'] and stats.failed_batches >= 1)
        assert _until(lambda: stats.failed_batches == FAILING_AFTER)
        assert 'ValueError: bad frame' in stats.last_inference_error
        worker.submit('/a', 'good')
        assert _until(lambda: stats.failed_batches == 0)
        assert worker.alive
    finally:
        worker.stop()
    assert not worker.alive


def test_inference_worker_death_is_visible():
    class Fatal(BaseException):
        pass

    def process(frames):
        raise Fatal('out of memory, say')

    stats, log = NodeStats(), _Log()
    worker = InferenceWorker(process, stats, log)
    previous = threading.excepthook
    threading.excepthook = lambda args: None  # the thread's traceback is expected here
    try:
        worker.start()
        worker.submit('/a', 'x')
        assert _until(lambda: not worker.alive)
    finally:
        threading.excepthook = previous
    assert log.lines and log.lines[-1][0] == 'fatal' and 'Fatal' in log.lines[-1][1]


def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False
