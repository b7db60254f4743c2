"""The ``cbpnet_node`` console script in its own process, driven over DDS from this one."""
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from ros_helpers import (NODE_EXECUTABLE, client_in_process, noisy_images, node_process,
                         read_log, stop_process, write_params_file)

pytestmark = [pytest.mark.ros, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / 'config' / 'cbpnet.yaml'
CAM = '/cbpnet_proc/cam/image_raw'
RED, BLUE = (200, 40, 40), (40, 40, 200)


def test_console_script_is_installed():
    assert NODE_EXECUTABLE.is_file() and os.access(NODE_EXECUTABLE, os.X_OK), (
        f'{NODE_EXECUTABLE} missing: pip install -e . (setup.py console_scripts)')


def test_console_script_learns_predicts_and_stops_on_sigint(tmp_path):
    # The shipped config first, then small/fast overrides (later params files win).
    overrides = write_params_file(tmp_path / 'overrides.yaml', dict(
        prediction='task', min_steps=0,  # the learned recipe: it trains
        unknown_threshold=0.0,  # synthetic colours: rejection off
        image_size=64, epochs=3, batch_size=4, min_samples_per_class=3,
        diagnostics_period_s=0.3, image_topics=[CAM],
        checkpoint_dir=str(tmp_path / 'checkpoints')))
    with node_process([DEFAULT_CONFIG, overrides], ros_args=['-r', '__ns:=/proc']) as proc, \
            client_in_process('/proc/cbpnet') as client:
        cleared = client.call_trigger('~/clear_buffer', timeout=120)
        assert cleared.success, read_log(proc)
        progress = client.collect('~/learning_progress')
        rng = np.random.default_rng(0)
        client.publish_images('~/labelled_images', noisy_images(RED, 8, rng=rng), 'red')
        client.publish_images('~/labelled_images/compressed', noisy_images(BLUE, 8, rng=rng),
                              'blue', compressed=True)
        # Status names carry the node's name with its namespace (as diagnostic_updater).
        found = client.wait_for_diagnostics(lambda a: any(
            s.name == 'proc/cbpnet: learner' and {kv.key: kv.value for kv in s.values}[
                'buffer_samples'] == '16' for s in a.status), timeout=60, prefix='proc/cbpnet:')
        assert found is not None, read_log(proc)
        assert {s.hardware_id for s in found.status} == {
            f'/proc/cbpnet@{socket.gethostname()} (tf_efficientnet_lite0 on cpu)'}
        response = client.call_trigger('~/learn_task', timeout=300)
        assert response.success, response.message
        reply = json.loads(response.message)
        assert reply['classes'] == ['blue', 'red'] and reply['num_samples'] == 16
        assert reply['checkpoint'] and os.path.isfile(reply['checkpoint'])
        assert Path(reply['checkpoint']).parent == tmp_path / 'checkpoints'  # overrides applied
        assert progress.wait_count(1, timeout=10)

        # Default camera QoS is sensor_data (best effort): classify() re-publishes.
        predictions = client.collect('~/predictions')
        for name, colour in (('red', RED), ('blue', BLUE)):
            got = client.classify(CAM, noisy_images(colour, 1, rng=rng)[0], f'proc_{name}',
                                  predictions, stamp=(42, 7))
            assert got['label'] == name, got
            assert got['source'] == CAM and got['stamp'] == {'sec': 42, 'nanosec': 7}
            assert got['model_version'] == 1

        code = stop_process(proc, timeout=20)
        assert code == 0, f'exit code {code}\n{read_log(proc)}'


def test_console_script_exits_2_on_invalid_parameter(tmp_path):
    bad = write_params_file(tmp_path / 'bad.yaml', {'learning_rate': -1.0,
                                                    'checkpoint_dir': ''})
    with node_process(bad) as proc:
        code = proc.wait(120)
    log = read_log(proc)
    assert code == 2, log
    assert 'learning_rate' in log
