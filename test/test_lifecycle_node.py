"""``cbpnet_lifecycle_node`` as its own process, driven through the lifecycle services over
DDS as a lifecycle manager drives it: unconfigured until configure, classifying only while
active, keeping what it learned across deactivate, releasing it on cleanup."""
import json

import numpy as np
import pytest
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.node import NodeNameNonExistentError

from ros_helpers import (LATCHED, NODE_EXECUTABLE, client_in_process, node_process,
                         noisy_images, read_log, wait_until, write_params_file)

pytestmark = [pytest.mark.ros]

NS = '/managed'
CAM = '/managed_cam/image_raw'
RED, BLUE = (200, 40, 40), (40, 40, 200)


def _state(client):
    reply = client.result(client.call_async(GetState, '~/get_state', GetState.Request(),
                                            timeout=120), 60)
    return reply.current_state.id


def _change(client, transition):
    request = ChangeState.Request()
    request.transition.id = transition
    return client.result(client.call_async(ChangeState, '~/change_state', request,
                                           timeout=60), 120).success


def _node_services(client, name):
    """The node's own services called ``name`` (a client's proxies are not counted).

    Waits until the graph lists the node with its lifecycle services, so an empty answer
    means the service is absent, not that discovery has not caught up yet."""
    def own():
        try:
            return [n for n, _ in client.get_service_names_and_types_by_node('cbpnet', NS)]
        except NodeNameNonExistentError:
            return []
    assert wait_until(lambda: any(n.endswith('/get_state') for n in own()), 30), \
        'the node and its lifecycle services never appeared in the ROS graph'
    return [n for n in own() if n.endswith('/' + name)]


def _learner(client, predicate, timeout=60):
    found = client.wait_for_status('cbpnet: learner', lambda level, v: predicate(v), timeout)
    assert found is not None, 'no learner status satisfying the condition'
    return found[1]


def test_configure_activate_deactivate_cleanup_over_dds(tmp_path):
    params = write_params_file(tmp_path / 'params.yaml', dict(
        image_size=64, checkpoint_dir=str(tmp_path / 'checkpoints'), image_topics=[CAM],
        image_qos='reliable', min_samples_per_class=3, unknown_threshold=0.0,
        diagnostics_period_s=0.2))
    executable = NODE_EXECUTABLE.parent / 'cbpnet_lifecycle_node'
    command = [str(executable), '--ros-args', '--params-file', str(params),
               '-r', f'__ns:={NS}']
    with node_process(command=command, log_path=tmp_path / 'node.log') as proc, \
            client_in_process(f'{NS}/cbpnet') as c:
        assert _state(c) == State.PRIMARY_STATE_UNCONFIGURED, read_log(proc)
        # Unconfigured: parameters only; no service of the node's own yet.
        assert not _node_services(c, 'learn_task')
        assert _change(c, Transition.TRANSITION_CONFIGURE), read_log(proc)
        assert _state(c) == State.PRIMARY_STATE_INACTIVE
        # Inactive: learning works, nothing is classified, the cameras are not subscribed.
        rng = np.random.default_rng(0)
        c.teach_and_learn({'red': noisy_images(RED, 4, rng=rng),
                           'blue': noisy_images(BLUE, 4, rng=rng)})
        labels = c.collect('~/labels', qos=LATCHED)
        assert labels.wait_for(lambda m: m['classes'] == ['blue', 'red'], timeout=30)
        assert c.count_subscribers(CAM) == 0
        found = c.wait_for_status('cbpnet: inference', lambda level, v: True, 30)
        assert found is not None and found[0] == 0  # OK: inactive is not a fault
        assert _change(c, Transition.TRANSITION_ACTIVATE)
        assert _state(c) == State.PRIMARY_STATE_ACTIVE
        assert wait_until(lambda: c.count_subscribers(CAM) == 1, 30)
        predictions = c.collect('~/predictions')
        red = c.classify(CAM, noisy_images(RED, 1, rng=rng)[0], 'active_red', predictions)
        assert red['label'] == 'red'
        # Deactivate: the cameras go, the model stays; activate again classifies as before.
        assert _change(c, Transition.TRANSITION_DEACTIVATE)
        assert wait_until(lambda: c.count_subscribers(CAM) == 0, 30)
        assert c.call_trigger('~/save').success
        assert _change(c, Transition.TRANSITION_ACTIVATE)
        again = c.classify(CAM, noisy_images(BLUE, 1, rng=rng)[0], 'again_blue', predictions)
        assert again['label'] == 'blue' and again['model_version'] == red['model_version']
        # Cleanup releases the model; configure loads it back from the checkpoint.
        assert _change(c, Transition.TRANSITION_DEACTIVATE)
        assert _change(c, Transition.TRANSITION_CLEANUP)
        assert _state(c) == State.PRIMARY_STATE_UNCONFIGURED
        assert wait_until(lambda: not _node_services(c, 'learn_task'), 30)
        assert _change(c, Transition.TRANSITION_CONFIGURE)
        _learner(c, lambda v: json.loads(v['classes']) == ['blue', 'red'])
        log = read_log(proc)
        assert 'configured: ready' in log and 'cleaned up' in log, log
