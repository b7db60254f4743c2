"""Launch file, config files and install layout.

``launch``/``launch_ros`` are not installable here (docs/environment.md), so the launch file
is checked statically and then run against small stand-ins for those modules.
"""
import ast
import configparser
import glob
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import yaml

from ros2_cbpnet.node import DEFAULTS, PARAMETERS, check_parameters

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / 'launch' / 'cbpnet.launch.py'
CONFIGS = sorted((ROOT / 'config').glob('*.yaml'))
LAUNCH_ARGUMENTS = {'config', 'namespace', 'image_topic', 'backbone', 'device'}


def _setup_call():
    tree = ast.parse((ROOT / 'setup.py').read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, 'id', None) == 'setup']
    assert len(calls) == 1
    return {kw.arg: kw.value for kw in calls[0].keywords}


def _console_scripts():
    scripts = ast.literal_eval(_setup_call()['entry_points'])['console_scripts']
    return dict(s.replace(' ', '').split('=', 1) for s in scripts)


def _params(path):
    data = yaml.safe_load(path.read_text())
    # Node name cbpnet in any namespace: a bare `cbpnet:` would not apply under namespace:=x.
    assert list(data) == ['/**/cbpnet'], list(data)
    return data['/**/cbpnet']['ros__parameters']


# ------------------------------------------------------------------------------ launch
def test_launch_file_names_the_console_script():
    tree = ast.parse(LAUNCH_FILE.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    nodes = [c for c in calls if getattr(c.func, 'id', None) == 'Node']
    assert len(nodes) == 1
    kwargs = {kw.arg: kw.value for kw in nodes[0].keywords}
    assert ast.literal_eval(kwargs['package']) == 'ros2_cbpnet'
    assert ast.literal_eval(kwargs['name']) == 'cbpnet'
    executable = ast.literal_eval(kwargs['executable'])
    assert _console_scripts().get(executable) == 'ros2_cbpnet.node:main'
    declared = {ast.literal_eval(c.args[0]) for c in calls
                if getattr(c.func, 'id', None) == 'DeclareLaunchArgument'}
    assert declared == LAUNCH_ARGUMENTS


def _stub_modules(monkeypatch, share_dir):
    """Minimal stand-ins for launch, launch_ros and ament_index_python."""
    class Record:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class LaunchConfiguration:
        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return context.launch_configurations[self.name]

    modules = {
        'launch': {'LaunchDescription': type('LaunchDescription', (Record,), {})},
        'launch.actions': {'DeclareLaunchArgument': type('DeclareLaunchArgument', (Record,), {}),
                           'OpaqueFunction': type('OpaqueFunction', (Record,), {})},
        'launch.substitutions': {'LaunchConfiguration': LaunchConfiguration},
        'launch_ros': {},
        'launch_ros.actions': {'Node': type('Node', (Record,), {})},
        'ament_index_python': {},
        'ament_index_python.packages': {
            'get_package_share_directory': lambda package: f'{share_dir}/{package}'},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


def _load_launch(monkeypatch):
    _stub_modules(monkeypatch, '/opt/share')
    spec = importlib.util.spec_from_file_location('cbpnet_launch_under_test', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate_launch_description()


def _run(description, **arguments):
    defaults = {a.args[0]: a.kwargs['default_value'] for a in description.args[0]
                if type(a).__name__ == 'DeclareLaunchArgument'}
    context = types.SimpleNamespace(launch_configurations={**defaults, **arguments})
    opaque = [a for a in description.args[0] if type(a).__name__ == 'OpaqueFunction']
    assert len(opaque) == 1
    (node,) = opaque[0].kwargs['function'](context)
    return node.kwargs


def test_launch_defaults_use_the_package_config(monkeypatch):
    node = _run(_load_launch(monkeypatch))
    assert node['executable'] == 'cbpnet_node' and node['name'] == 'cbpnet'
    assert node['namespace'] == ''
    assert node['parameters'] == ['/opt/share/ros2_cbpnet/config/cbpnet.yaml']


def test_launch_arguments_override_the_config(monkeypatch):
    node = _run(_load_launch(monkeypatch), config='/tmp/my.yaml', namespace='robot1',
                image_topic='/front/image_raw/compressed', backbone='vit_small_patch16_224',
                device='cpu')
    assert node['namespace'] == 'robot1'
    assert node['parameters'] == ['/tmp/my.yaml', {
        'image_topics': ['/front/image_raw/compressed'], 'backbone': 'vit_small_patch16_224',
        'device': 'cpu'}]


# ------------------------------------------------------------------------------ install
def test_setup_installs_launch_and_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    data_files = eval(compile(ast.Expression(_setup_call()['data_files']), 'setup.py', 'eval'),
                      {'PACKAGE': 'ros2_cbpnet', 'glob': glob.glob})
    installed = {dest: sorted(files) for dest, files in data_files}
    assert installed['share/ros2_cbpnet/launch'] == ['launch/cbpnet.launch.py']
    assert installed['share/ros2_cbpnet/config'] == sorted(
        str(p.relative_to(ROOT)) for p in CONFIGS)
    assert 'package.xml' in installed['share/ros2_cbpnet']
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / 'setup.cfg')
    # `ros2 run ros2_cbpnet cbpnet_node` looks in lib/<package>.
    assert cfg['install']['install_scripts'] == '$base/lib/ros2_cbpnet'


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_config_keys_are_the_declared_parameters(path):
    params = _params(path)
    assert set(params) == set(PARAMETERS), set(params) ^ set(PARAMETERS)
    for name, value in params.items():
        default = DEFAULTS[name]
        # rclpy types are strict: 5 is not a double, so the YAML must match the declaration.
        assert type(value) is type(default), f'{path.name}: {name}={value!r}'
        if isinstance(value, list):
            element = str if name == 'image_topics' else int
            assert all(type(v) is element for v in value), f'{path.name}: {name}'
    check_parameters(params)  # valid as a whole (raises ValueError otherwise)


def test_default_config_is_the_node_defaults():
    assert _params(ROOT / 'config' / 'cbpnet.yaml') == DEFAULTS


def test_vit_config_is_the_papers():
    params = _params(ROOT / 'config' / 'cbpnet_vit_b16.yaml')
    assert params['backbone'] == 'vit_base_patch16_224.augreg_in21k'
    assert params['image_size'] == 224
    assert (params['g_prompt_length'], params['g_prompt_layers']) == (5, [0, 1])
    assert (params['e_prompt_length'], params['e_prompt_layers']) == (5, [2, 3, 4])
    assert params['pull_constraint_coeff'] == 1.0
    assert params['learning_rate'] == pytest.approx(0.03 * 24 / 256)
    assert (params['batch_size'], params['epochs']) == (24, 5)
    assert (params['prompt_selection'], params['prediction']) == ('key', 'all')


@pytest.mark.ros
@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize('namespace', ['', '/robot1'])
def test_config_loads_through_rcl_into_the_declared_parameters(path, namespace):
    """rcl's own YAML parser (not PyYAML) feeds the node's declarations: types must match
    (``[]`` arrives as "not set" and must read back as an empty list), in any namespace."""
    from rclpy.node import Node

    from ros2_cbpnet.node import declare_parameters
    from ros_helpers import ros_context

    with ros_context(['--ros-args', '--params-file', str(path)]) as context:
        node = Node('cbpnet', context=context, namespace=namespace)
        try:
            values = declare_parameters(node)
        finally:
            node.destroy_node()
    assert values == _params(path)
