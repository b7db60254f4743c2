"""The node's camera input (in-process, private rclpy context, real DDS on loopback):
camera callbacks on their own thread (``ros2_cbpnet.ros.camera_input``), frames decoded to the
model input on arrival, several cameras in one model call, services answered while the model
runs, remapped camera topics, and the shutdown order.
"""
import threading
import time

import numpy as np
import pytest
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image

from ros2_cbpnet.ros.camera_input import CAMERA_THREAD_NAME
from ros2_cbpnet.ros.node import CBPNetNode
from ros_helpers import (RosClient, Spinner, noisy_images, node_in_process, ros_context,
                         wait_until)

pytestmark = [pytest.mark.ros]

RED, BLUE = (200, 40, 40), (40, 40, 200)
CAMS = ['cam0', 'cam1', 'cam2', 'cam3/compressed']
NS = 'camtest'


@pytest.fixture(scope='module')
def four(tmp_path_factory):
    """A node with four cameras (three raw, one JPEG) under /camtest, one task learned."""
    params = dict(prediction='task', min_steps=0, image_size=32, epochs=1, batch_size=4,
                  min_samples_per_class=3, diagnostics_period_s=0.2, image_qos='reliable',
                  image_topics=CAMS, checkpoint_dir='', top_k=2)
    with node_in_process(params, namespace=NS) as h:
        c = h.client
        rng = np.random.default_rng(0)
        c.teach_and_learn({'red': noisy_images(RED, 4, rng=rng),
                           'blue': noisy_images(BLUE, 4, rng=rng)})
        for topic in CAMS:
            msg_type = CompressedImage if topic.endswith('/compressed') else Image
            assert c.wait_for_subscribers(f'/{NS}/{topic}', msg_type, timeout=30), topic
        yield h


class Gate:
    """Wraps ``learner.predict``: records each batch's sources and size and the thread that
    ran it, and can hold the model (``hold``) until ``release``."""

    def __init__(self, node):
        self.node, self.real = node, node.learner.predict
        self.batches, self.entered = [], threading.Event()
        self._open = threading.Event()
        self._open.set()

    def __enter__(self):
        def predict(images, *args, **kwargs):
            self.batches.append(len(images))
            self.entered.set()
            assert self._open.wait(60), 'the test never released the model'
            return self.real(images, *args, **kwargs)
        self.node.learner.predict = predict  # instance attribute: shadows the method
        return self

    def __exit__(self, *exc):
        self._open.set()
        del self.node.learner.predict

    def hold(self):
        self._open.clear()
        self.entered.clear()

    def release(self):
        self._open.set()


def frame(client, rgb, frame_id, compressed=False):
    return client.image_msg(rgb, frame_id=frame_id, compressed=compressed)


def test_camera_callbacks_run_on_the_camera_thread_and_decode_to_the_model_input(four):
    node, c = four.node, four.client
    assert node._cameras.thread.name == CAMERA_THREAD_NAME and node._cameras.alive
    # The subscriptions are the node's own (graph and names unchanged), in the camera group.
    subs = dict(node.get_subscriber_names_and_types_by_node('cbpnet', f'/{NS}'))
    assert subs[f'/{NS}/cam0'] == ['sensor_msgs/msg/Image']
    assert subs[f'/{NS}/cam3/compressed'] == ['sensor_msgs/msg/CompressedImage']
    assert node._camera_topics == [f'/{NS}/{t}' for t in CAMS]

    seen = []
    real_submit = node._worker.submit

    def submit(source, item, *args, **kwargs):
        seen.append((threading.current_thread().name, source, item.rgb.shape, item.full))
        return real_submit(source, item, *args, **kwargs)

    node._worker.submit = submit
    try:
        rgb = noisy_images(RED, 1, size=96)[0]
        c.publish(f'/{NS}/cam1', frame(c, rgb, 'thread_raw'))
        c.publish(f'/{NS}/cam3/compressed', frame(c, rgb, 'thread_jpeg', compressed=True))
        assert wait_until(lambda: {s[1] for s in seen} >= {f'/{NS}/cam1',
                                                           f'/{NS}/cam3/compressed'}, 30)
    finally:
        del node._worker.submit
    assert {s[0] for s in seen} == {CAMERA_THREAD_NAME}
    # Decoded on arrival straight to the model's 32 x 32 input; no full frame kept (nobody
    # subscribes to ~/debug_image).
    assert {s[2] for s in seen} == {(32, 32, 3)} and all(s[3] is None for s in seen)


def test_frames_of_four_cameras_share_one_model_call(four):
    node, c = four.node, four.client
    predictions = c.collect('~/predictions')
    rng = np.random.default_rng(3)
    rgb = noisy_images(RED, 1, size=64, rng=rng)[0]
    with Gate(node) as gate:
        gate.hold()
        c.publish(f'/{NS}/cam0', frame(c, rgb, 'first'))
        assert gate.entered.wait(30), 'the first frame never reached the model'
        # While the model holds the first batch, one frame per camera arrives and waits.
        for i, topic in enumerate(CAMS):
            c.publish(f'/{NS}/{topic}', frame(c, rgb, f'batched_{i}',
                                              compressed=topic.endswith('/compressed')))
        assert wait_until(lambda: len(node._worker._pending) == 4, 30), node._worker._pending
        gate.release()
        # Wait for these frames by name: a late prediction of an earlier test's frame may
        # arrive in between, so a count of messages is not enough.
        wanted = {'first'} | {f'batched_{i}' for i in range(4)}
        assert wait_until(lambda: wanted <= {p['frame_id'] for p in predictions.snapshot()},
                          30), predictions.snapshot()
    got = {p['frame_id']: p['source'] for p in predictions.snapshot()}
    predictions.close()
    assert {got[f'batched_{i}'] for i in range(4)} == {f'/{NS}/{t}' for t in CAMS}
    assert 4 in gate.batches[1:], gate.batches  # the four waiting frames: one model call


def test_services_are_answered_while_the_model_runs(four):
    """Inference runs on its own thread, cameras on theirs: a service call is answered while
    a batch is still inside the model."""
    node, c = four.node, four.client
    with Gate(node) as gate:
        gate.hold()
        c.publish(f'/{NS}/cam2', frame(c, noisy_images(BLUE, 1, size=48)[0], 'busy'))
        assert gate.entered.wait(30)
        reply = c.call_trigger('~/clear_buffer', timeout=30)
        assert reply.success and not gate._open.is_set()  # answered with the model held
        # Camera frames are still received (and counted) meanwhile.
        before = node._stats.received
        c.publish(f'/{NS}/cam1', frame(c, noisy_images(RED, 1, size=48)[0], 'during'))
        assert wait_until(lambda: node._stats.received > before, 30)
        gate.release()


def test_remapped_camera_topics_are_the_nodes(tmp_path):
    """Process-wide, node-specific (``cbpnet:``) and the node's own remapping rules, ``~``
    and the namespace all apply to camera topics as to any other topic of the node; the
    type follows the remapped name; frames on the remapped names are received."""
    global_args = ['--ros-args', '-r', 'cam_a:=/remapped/a',
                   '-r', 'cbpnet:cam_b:=/remapped/b/compressed']
    node_args = ['--ros-args', '-r', 'cam_c:=/remapped/c']
    topics = ['cam_a', 'cam_b', 'cam_c', '~/own', 'plain']
    params = dict(image_size=32, checkpoint_dir='', image_qos='reliable', image_topics=topics,
                  backbone_checkpoint='random', diagnostics_period_s=0.5)
    with ros_context(global_args) as context:
        node = CBPNetNode(context=context, namespace='remaptest', cli_args=node_args,
                          parameter_overrides=[Parameter(k, value=v)
                                               for k, v in params.items()])
        client = RosClient(context, target=node.get_fully_qualified_name())
        spinner = Spinner(context, node, client)
        try:
            expected = ['/remapped/a', '/remapped/b/compressed', '/remapped/c',
                        '/remaptest/cbpnet/own', '/remaptest/plain']
            assert node._camera_topics == expected
            subs = dict(node.get_subscriber_names_and_types_by_node('cbpnet', '/remaptest'))
            for topic in expected:
                want = 'CompressedImage' if topic.endswith('/compressed') else 'Image'
                assert subs.get(topic) == [f'sensor_msgs/msg/{want}'], (topic, subs)
            assert '/remaptest/cam_a' not in subs and '/remaptest/cam_c' not in subs

            seen = []
            real_submit = node._worker.submit
            node._worker.submit = lambda source, item, *a, **k: (
                seen.append((threading.current_thread().name, source)),
                real_submit(source, item, *a, **k))
            rgb = noisy_images(RED, 1, size=40)[0]
            client.publish('/remapped/c', client.image_msg(rgb, frame_id='c'))
            client.publish('/remapped/b/compressed',
                           client.image_msg(rgb, frame_id='b', compressed=True))
            assert wait_until(lambda: {s[1] for s in seen} >= {'/remapped/c',
                                                               '/remapped/b/compressed'}, 30)
            assert {s[0] for s in seen} == {CAMERA_THREAD_NAME}
            spinner.check()
        finally:
            node.stop()
            assert not node._cameras.alive  # stopped and joined before the executor goes
            spinner.stop()
            client.destroy_node()
            node.destroy_node()


def test_stop_joins_the_camera_thread_and_destroy_is_clean():
    """stop() joins the camera thread at once (idempotent); destroy_node() after it shuts
    the camera executor down without an error."""
    params = dict(image_size=32, checkpoint_dir='', backbone_checkpoint='random',
                  image_topics=['cam'])
    with ros_context() as context:
        node = CBPNetNode(context=context, namespace='stoptest',
                          parameter_overrides=[Parameter(k, value=v)
                                               for k, v in params.items()])
        thread = node._cameras.thread
        assert thread.is_alive()
        started = time.monotonic()
        node.stop()
        node.stop()
        assert not thread.is_alive() and time.monotonic() - started < 5.0
        node.destroy_node()
        node._cameras.destroy()  # again: idempotent


def test_a_dead_camera_thread_is_an_error_in_diagnostics():
    from diagnostic_msgs.msg import DiagnosticStatus

    from ros2_cbpnet.ros.diagnostics import InferenceHealth, inference_health
    health = dict(worker_alive=True, failed_batches=0, last_error='', seconds_since_frame=0.1,
                  seconds_since_start=10.0, received_in_period=5, rejected_in_period=0)
    assert inference_health(InferenceHealth(**health))[0] == DiagnosticStatus.OK
    level, message = inference_health(InferenceHealth(**health, camera_thread_alive=False))
    assert level == DiagnosticStatus.ERROR and 'camera thread' in message


@pytest.mark.slow
def test_sigint_while_cameras_stream_exits_cleanly(tmp_path):
    """The console script, two cameras streaming at 30 Hz (raw and JPEG, reliable) into the
    camera thread: SIGINT stops it with exit code 0 and nothing on its log but its own
    lines (no traceback, no rclpy error from a camera callback racing the shutdown)."""
    from ros_helpers import (client_in_process, node_process, read_log, stop_process,
                             write_params_file)

    ns = f'camsig{__import__("os").getpid()}'
    cams = [f'/{ns}/cam0', f'/{ns}/cam1/compressed']
    params = write_params_file(tmp_path / 'params.yaml', dict(
        image_size=32, checkpoint_dir='', backbone_checkpoint='random', image_qos='reliable',
        image_topics=cams, diagnostics_period_s=0.2))
    with node_process(params, ros_args=['-r', f'__ns:=/{ns}']) as proc, \
            client_in_process(f'/{ns}/cbpnet') as client:
        assert client.call_trigger('~/clear_buffer', timeout=120).success, read_log(proc)
        rgb = noisy_images(RED, 1, size=160)[0]
        msgs = [client.image_msg(rgb, frame_id='sig'),
                client.image_msg(rgb, frame_id='sig', compressed=True)]
        for topic, msg in zip(cams, msgs):
            assert client.wait_for_subscribers(topic, type(msg), timeout=30), topic
        stop = threading.Event()

        def stream():
            while not stop.is_set():
                for topic, msg in zip(cams, msgs):
                    client.publisher(topic, type(msg)).publish(msg)
                time.sleep(1 / 30)

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        try:
            assert client.wait_for_status(
                'cbpnet: inference', lambda level, v: int(v['frames_received']) >= 30, 60), \
                read_log(proc)
            code = stop_process(proc, timeout=20)  # SIGINT while frames keep arriving
        finally:
            stop.set()
            streamer.join(5)
        log = read_log(proc, tail=20000)
        assert code == 0, f'exit code {code}\n{log}'
        for bad in ('Traceback', 'camera callback failed', 'camera executor failed',
                    'InvalidHandle', 'ERROR'):
            assert bad not in log, log


@pytest.mark.parametrize('context_ok, logged', [(True, 1), (False, 0)])
def test_a_failing_callback_is_logged_unless_the_node_is_shutting_down(context_ok, logged):
    from ros2_cbpnet.ros.callbacks import guarded_callback

    class Stand:  # what the guard uses of a node: its context and its logger
        errors = []
        context = type('Context', (), {'ok': staticmethod(lambda: context_ok)})()

        def get_logger(self):
            return type('Logger', (), {'error': lambda _, text, **kw: Stand.errors.append(text)})()

    @guarded_callback('camera')
    def callback(self, msg):
        raise RuntimeError("publisher's context is invalid")

    callback(Stand(), object())  # never raises
    assert len(Stand.errors) == logged
    if logged:
        assert Stand.errors[0].startswith('camera failed: RuntimeError')
