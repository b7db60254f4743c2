"""The README stays true: its parameter table is the node's declarations (names, defaults,
run-time changeability), and every interface name is documented."""
import ast
import importlib
import inspect
import json
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


def _declared():
    """``(DEFAULTS, PARAMETERS)`` of the node. The node module re-exports them; should they
    live in a module of their own, that is looked up too, so the test follows the code."""
    for name in ('ros2_cbpnet.ros.node', 'ros2_cbpnet.ros.parameters', 'ros2_cbpnet.parameters'):
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


def _node_interface_names():
    """Every topic and service name the node creates, read from the source of
    ``CBPNetNode._create_interfaces`` (where all of them are made; ``~/x`` and absolute
    names), and the names of its diagnostics statuses (``StatusBuilder.status('<task>', ...)``
    in ros2_cbpnet/ros/diagnostics.py). Read from the code, so a new interface cannot be
    left out of this test."""
    from ros2_cbpnet.ros import diagnostics as node_diagnostics
    from ros2_cbpnet.ros.node import CBPNetNode
    tree = ast.parse(textwrap.dedent(inspect.getsource(CBPNetNode._create_interfaces)))
    # Strings compared with a name (``.endswith('/compressed')``) are not names themselves.
    compared = {id(arg) for call in ast.walk(tree) if isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr in ('endswith', 'startswith') for arg in call.args}
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
             and id(n) not in compared and isinstance(n.value, str)
             and re.fullmatch(r'~?/[a-z_]+(/[a-z_]+)*', n.value)}
    statuses = set(re.findall(r"self\.status\('([^']+)'",
                              inspect.getsource(node_diagnostics.StatusBuilder)))
    return names, {f'cbpnet: {task}' for task in statuses}


def test_readme_documents_every_topic_and_service():
    names, statuses = _node_interface_names()
    # The reading above works (would it find nothing, this test would check nothing).
    assert {'~/labelled_images', '~/learn_task', '~/predictions', '/diagnostics'} <= names
    assert len(names) >= 16 and len(statuses) >= 5, (names, statuses)
    interface = README.split('\n## Interface', 1)[1].split('\n## ', 1)[0]
    missing = sorted(n for n in names | statuses if f'`{n}`' not in interface)
    assert not missing, f'the Interface section of README.md does not document {missing}'


def _section(title):
    return README.split(f'\n## {title}\n', 1)[1].split('\n## ', 1)[0]


def test_readme_shows_the_two_commands():
    block = re.search(r'```bash\n(.*?)```', _section('Two commands'), re.S)
    assert block, 'README.md "## Two commands" has no bash block'
    commands = [line.split('#', 1)[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == ['make demo', 'make test']
    makefile = (ROOT / 'Makefile').read_text()
    for target in ('demo', 'test'):
        assert re.search(rf'^{target}:', makefile, re.M), f'Makefile has no {target} target'
