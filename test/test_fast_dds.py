"""Cross-process DDS in the fast tier: the node, a camera and the test are three processes.

Every other non-slow ROS test runs the node in the test's own process with reliable camera
QoS. Here the node runs as its console script with the default camera QoS (``sensor_data``:
best effort), a separate process publishes JPEG ``CompressedImage`` frames as a camera driver
does, and the test process teaches the node over ``~/labelled_images`` and reads
``~/predictions``: the path a robot uses, over Fast DDS between processes (loopback only).
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rclpy.qos import ReliabilityPolicy

from ros_helpers import (TrackedProcess, client_in_process, noisy_images, node_process,
                         read_log, ros_env, wait_until, write_params_file)
from test_readme import DEFAULTS

pytestmark = [pytest.mark.ros]

HERE = Path(__file__).resolve().parent
RED, BLUE = (200, 40, 40), (40, 40, 200)


def test_jpeg_camera_in_another_process_is_classified_at_the_default_qos(tmp_path):
    assert DEFAULTS['image_qos'] == 'sensor_data'  # the default is what this test runs
    ns = f'fastdds{os.getpid()}'
    camera = f'/{ns}_cam/image_raw/compressed'
    params = write_params_file(tmp_path / 'params.yaml', dict(
        unknown_threshold=0.0,  # synthetic colours: rejection off, labels checked
        image_size=64, epochs=2, batch_size=4, min_samples_per_class=3,
        diagnostics_period_s=0.3, image_topics=[camera],
        checkpoint_dir=str(tmp_path / 'checkpoints')))  # image_qos left at its default
    with node_process(params, ros_args=['-r', f'__ns:=/{ns}'],
                      log_path=tmp_path / 'node.log') as node, \
            client_in_process(f'/{ns}/cbpnet') as client:
        assert client.call_trigger('~/clear_buffer', timeout=120).success, read_log(node)
        rng = np.random.default_rng(0)
        client.publish_images('~/labelled_images', noisy_images(RED, 5, rng=rng), 'red')
        client.publish_images('~/labelled_images/compressed', noisy_images(BLUE, 5, rng=rng),
                              'blue', compressed=True)
        assert client.wait_for_status('cbpnet: learner',
                                      lambda level, v: int(v['buffer_samples']) == 10, 60), \
            read_log(node)
        progress = client.collect('~/learning_progress')
        reply = client.call_trigger('~/learn_task', timeout=180)
        assert reply.success, reply.message
        # The default learner trains nothing: its progress is the frozen pass, then done.
        assert wait_until(lambda: progress.snapshot() and
                          progress.snapshot()[-1]['stage'] == 'done', 10), progress.snapshot()
        stages = [p['stage'] for p in progress.snapshot()]
        assert stages == ['features'] * (len(stages) - 1) + ['done'], stages
        assert progress.snapshot()[-2]['done'] == progress.snapshot()[-2]['total'] == 10
        # The frozen pass runs in ONNX Runtime (runtime auto), cached in the checkpoint dir.
        _, inference = client.wait_for_status('cbpnet: inference', lambda level, v: True, 30)
        assert (inference['runtime'], inference['provider']) == (
            'onnxruntime', 'CPUExecutionProvider'), inference
        assert any(n.startswith('frozen-query-') and n.endswith('.onnx')
                   for n in os.listdir(tmp_path / 'checkpoints' / 'onnx'))

        # The node subscribes best effort: what a camera driver offers.
        infos = wait_until(lambda: client.get_subscriptions_info_by_topic(camera), 30)
        assert infos and all(i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
                             for i in infos), infos
        predictions = client.collect('~/predictions')
        camera_proc = TrackedProcess(
            [sys.executable, str(HERE / 'camera_publisher.py'), camera, '10',
             'cam_red=200,40,40', 'cam_blue=40,40,200'],
            env=ros_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert camera_proc.stdout.readline().strip() == 'ready'
            started = time.monotonic()
            got = wait_until(lambda: {p['frame_id'] for p in predictions.snapshot()
                                      if p['source'] == camera} >= {'cam_red', 'cam_blue'}
                             and len(predictions) >= 6, 60)
            elapsed = time.monotonic() - started
        finally:
            out = camera_proc.communicate(timeout=30)[0]  # closes stdin: the camera stops
        assert got, (predictions.snapshot(), read_log(node))
        assert camera_proc.returncode == 0, out
        sent = int(out.split()[-1])
    for p in predictions.snapshot():
        assert p['source'] == camera
        assert p['label'] == p['frame_id'][4:], p  # cam_red -> red
        assert 0.5 < p['score'] <= 1.0 and p['model_version'] == 1
        assert (p['runtime'], p['provider']) == ('onnxruntime', 'CPUExecutionProvider')
        assert p['stamp']['sec'] > 0  # copied from the camera's header
    print(f'\n{len(predictions)} predictions from {sent} JPEG frames sent best effort '
          f'at 10 Hz by another process, first of both classes after {elapsed:.1f} s')
