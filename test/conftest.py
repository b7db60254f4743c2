"""Test-wide settings, applied at import time, before any test module imports rclpy.

DDS must stay on this machine (docs/environment.md) and each test run gets ROS domains of its
own, locked for the run (:mod:`ros2_cbpnet.tools.ros_domain`), so concurrent runs on the same host
never see each other's nodes. Node processes that a test leaves running are killed after it, and
the Fast DDS shared memory of killed node processes is removed (``proc_cleanup``).
"""
import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


from ros2_cbpnet.tools import ros_domain  # noqa: E402 - light: file locks only

os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
# Two ids: ROS_DOMAIN_ID, and a spare one for tests that need a second, isolated domain
# (ros_helpers.spare_domain_id). Inherited ids are kept when `make test` locked them.
DOMAIN_IDS = ros_domain.ensure_domains(2)
# The PyPI ROS wheels do not set it; ament_index_python needs it.
os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)
# No model hub is reachable here; fail fast instead of waiting for network timeouts.
os.environ['HF_HUB_OFFLINE'] = '1'
# Let the tests import their shared helpers (test/ros_helpers.py) as a plain module.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_report_header(config):
    """Say which domains this run uses (to find its traffic, or a collision)."""
    return [f'ROS_DOMAIN_ID={os.environ["ROS_DOMAIN_ID"]} (locked ids {DOMAIN_IDS}, '
            f'{ros_domain.lock_path(DOMAIN_IDS[0])})']


def _descendants(pid):
    """Pids of all live descendants of ``pid`` (from /proc; zombies excluded)."""
    children = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if fields[0] != 'Z':
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace').strip()
    except OSError:
        return '?'


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """Kill every process a test started and left running (a node whose test failed before
    it could stop it), with a warning naming it, and clean its Fast DDS shared memory."""
    before = set(_descendants(os.getpid()))
    yield
    import proc_cleanup  # after conftest has set sys.path
    leaked = [p for p in _descendants(os.getpid()) if p not in before]
    if leaked:
        names = {p: _cmdline(p) for p in leaked}
        proc_cleanup.kill_and_clean(leaked)
        warnings.warn(f'killed processes the test left running: {names}')


@pytest.fixture(scope='module')
def digits():
    """scikit-learn's digits with the seed-0 split (shared by the learner and fleet tests)."""
    from ros2_cbpnet.learning.datasets import load_dataset
    return load_dataset('digits', seed=0)


def pytest_sessionfinish(session, exitstatus):
    """Last resort: no child survives the run, and no shared memory of our killed nodes."""
    import proc_cleanup
    proc_cleanup.kill_and_clean(_descendants(os.getpid()))
    proc_cleanup.sweep_shm()
