"""The README stays true: its parameter table is the node's declarations (names, defaults,
run-time changeability), and every interface name is documented."""
import importlib
import json
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / 'README.md').read_text()


def _declared():
    """``(DEFAULTS, PARAMETERS)`` of the node. The node module re-exports them; should they
    live in a module of their own, that is looked up too, so the test follows the code."""
    for name in ('ros2_cbpnet.node', 'ros2_cbpnet.node_parameters', 'ros2_cbpnet.parameters'):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        defaults = getattr(module, 'DEFAULTS', None)
        parameters = getattr(module, 'PARAMETERS', None)
        if isinstance(defaults, dict) and isinstance(parameters, dict):
            return defaults, parameters
    raise AssertionError('no module of ros2_cbpnet exports DEFAULTS and PARAMETERS')


DEFAULTS, PARAMETERS = _declared()


def _parameter_table():
    """``{name: (default text, run-time text)}`` from the README's "### Parameters" table."""
    section = README.split('### Parameters', 1)[1].split('\n## ', 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r'\|\s*`([^`]+)`\s*\|\s*`([^`]*)`\s*\|\s*([^|]+?)\s*\|', line)
        if match:
            name, default, runtime = match.groups()
            assert name not in rows, f'README lists parameter {name} twice'
            rows[name] = (default, runtime)
    return rows


TABLE = _parameter_table()


def test_readme_table_lists_exactly_the_declared_parameters():
    missing = sorted(set(PARAMETERS) - set(TABLE))
    stale = sorted(set(TABLE) - set(PARAMETERS))
    assert not missing, f'README.md lacks parameters {missing} (scripts/param_table.py)'
    assert not stale, f'README.md lists parameters the node does not declare: {stale}'


@pytest.mark.parametrize('name', sorted(PARAMETERS))
def test_readme_default_is_the_declared_default(name):
    if name not in TABLE:
        pytest.fail(f'README.md has no row for {name}')
    text, runtime = TABLE[name]
    documented = json.loads(text)
    declared = DEFAULTS[name]
    # Type too: `5` and `5.0` are different ROS parameter types (rclpy refuses the other).
    assert (documented, type(documented)) == (declared, type(declared)), \
        f'README default of {name} is {text}, the node declares {declared!r}'
    read_only = bool(getattr(PARAMETERS[name], 'read_only', False))
    assert runtime.startswith('no') == read_only, \
        f'README says {name} at run time: "{runtime}", the node has read_only={read_only}'


def test_readme_documents_every_topic_and_service():
    for name in ('~/labelled_images', '~/labelled_images/compressed', '~/teach',
                 '~/learn_task', '~/clear_buffer', '~/save', '~/predictions',
                 '~/learning_progress', '~/labels', '~/debug_image', '/diagnostics',
                 'cbpnet: inference', 'cbpnet: learner', 'cbpnet: cbp block', 'cbpnet: prompts'):
        assert name in README, name


def test_readme_shows_the_two_commands():
    assert 'make demo' in README and 'make test' in README
