"""The test helpers themselves: a callback that raises in the spinner is reported with its
cause (it used to be swallowed, and later waits timed out with no reason)."""
import time

import pytest
from rclpy.node import Node
from std_msgs.msg import String

from ros_helpers import RELIABLE, SpinnerError, node_in_process

pytestmark = [pytest.mark.ros]


class _Faulty(Node):
    """A node whose subscription callback raises on the message 'boom'."""

    def __init__(self, **kwargs):
        super().__init__('faulty_test_node', **kwargs)
        self.create_subscription(String, '~/in', self._callback, RELIABLE)

    def _callback(self, msg):
        if msg.data == 'boom':
            raise ValueError('callback failed on purpose')


def test_a_raising_callback_fails_the_waits_and_the_harness_with_its_cause():
    with pytest.raises(SpinnerError) as at_exit:
        with node_in_process(node_factory=_Faulty) as harness:
            client = harness.client
            collector = client.collect('/never_published')
            client.publish('~/in', String(data='boom'))
            started = time.monotonic()
            with pytest.raises(SpinnerError) as in_wait:
                collector.wait_for(timeout=30)
            # Fails at once with the cause, not after the 30 s timeout.
            assert time.monotonic() - started < 10
            assert isinstance(in_wait.value.__cause__, ValueError)
    assert 'callback failed on purpose' in str(at_exit.value)
