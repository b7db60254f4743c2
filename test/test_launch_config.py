"""Launch file, config files and install layout.

``launch``/``launch_ros`` are not installable here (docs/environment.md), so a real
``ros2 launch`` is never run in CI. Instead the launch file runs against strict stand-ins of
those modules (test/launch_standins.py: the real signatures, type checks, and the command
line launch_ros builds) over an install tree laid out as ``setup.py`` and ``setup.cfg`` say a
colcon build installs the package. What the launch file asks for is then checked through what
the node would really get: its parameters after all ``--params-file`` rules, the camera topics
after remapping, its name, namespace and log level; and one test runs that command line.
"""
import ast
import configparser
import glob
import importlib
import importlib.util
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import pytest
import yaml
from rcl_interfaces.msg import ParameterType

import launch_standins as ls

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / 'launch' / 'cbpnet.launch.py'
CONFIGS = sorted((ROOT / 'config').glob('*.yaml'))
#: The launch arguments docs/interface.md promises, and those the README documents.
LAUNCH_ARGUMENTS = {'config', 'namespace', 'image_topic', 'backbone', 'device', 'image_qos',
                    'log_level', 'checkpoint_dir', 'recipe', 'lifecycle'}
PACKAGE = 'ros2_cbpnet'


def _node_api():
    """The node's parameter API; the node module re-exports it wherever it lives."""
    for name in ('ros2_cbpnet.ros.node', 'ros2_cbpnet.ros.parameters'):
        module = importlib.import_module(name)
        if all(hasattr(module, a) for a in ('DEFAULTS', 'PARAMETERS', 'check_parameters')):
            return module
    raise AssertionError('no module exports DEFAULTS, PARAMETERS and check_parameters')


API = _node_api()
DEFAULTS, PARAMETERS = API.DEFAULTS, API.PARAMETERS
ARRAY_ELEMENTS = {ParameterType.PARAMETER_STRING_ARRAY: str,
                  ParameterType.PARAMETER_INTEGER_ARRAY: int,
                  ParameterType.PARAMETER_DOUBLE_ARRAY: float,
                  ParameterType.PARAMETER_BOOL_ARRAY: bool}


def _setup_call():
    tree = ast.parse((ROOT / 'setup.py').read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, 'id', None) == 'setup']
    assert len(calls) == 1
    return {kw.arg: kw.value for kw in calls[0].keywords}


def _console_scripts():
    scripts = ast.literal_eval(_setup_call()['entry_points'])['console_scripts']
    return dict(s.replace(' ', '').split('=', 1) for s in scripts)


def _data_files():
    """setup.py's ``data_files`` with absolute source paths."""
    entries = eval(compile(ast.Expression(_setup_call()['data_files']), 'setup.py', 'eval'),
                   {'PACKAGE': PACKAGE, 'glob': lambda p: glob.glob(str(ROOT / p))})
    return [(dest, [str(ROOT / f) for f in files]) for dest, files in entries]


def _params(path):
    data = yaml.safe_load(Path(path).read_text())
    # Node name cbpnet in any namespace: a bare `cbpnet:` would not apply under namespace:=x.
    assert list(data) == ['/**/cbpnet'], list(data)
    return data['/**/cbpnet']['ros__parameters']


# ------------------------------------------------------------------------------ install tree
@pytest.fixture(scope='module')
def prefix(tmp_path_factory):
    """An install prefix as colcon/setuptools lay it out from setup.py and setup.cfg: the
    data files, and each console script in setup.cfg's ``install_scripts`` directory."""
    prefix = tmp_path_factory.mktemp('install')
    for dest, files in _data_files():
        (prefix / dest).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copy(name, prefix / dest / Path(name).name)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / 'setup.cfg')
    scripts_dir = Path(cfg['install']['install_scripts'].replace('$base', str(prefix)))
    scripts_dir.mkdir(parents=True, exist_ok=True)
    for name, target in _console_scripts().items():
        module, function = target.split(':')
        script = scripts_dir / name
        # What pip/setuptools write for a console script (run by this interpreter).
        script.write_text(f'#!{sys.executable}\nimport sys\nfrom {module} import {function}\n'
                          f'sys.exit({function}())\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return prefix


def _launch(monkeypatch, prefix, tmp_path, **arguments):
    ls.install(monkeypatch, [str(prefix)])
    spec = importlib.util.spec_from_file_location('cbpnet_launch_under_test', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ls.launch(module.generate_launch_description(), arguments, tmp_dir=str(tmp_path))


def _the_node(launched):
    assert launched.shutdown is None, launched.shutdown
    assert len(launched.processes) == 1, launched.processes
    return launched.processes[0]


# ------------------------------------------------------------------------------ what rcl sees
def _ros_args(cmd):
    """Everything after the first ``--ros-args`` (launch_ros puts the node's there)."""
    return cmd[cmd.index('--ros-args') + 1:]


def _pattern_matches(pattern, full_name):
    if not pattern.startswith('/'):
        pattern = '/' + pattern
    regex = ''.join('(/.*)?' if part == '/**' else re.escape(part).replace(r'\*', '[^/]*')
                    for part in re.split(r'(/\*\*)', pattern))
    return re.fullmatch(regex, full_name) is not None


def effective(process):
    """The node's parameters (params files in order, later rules winning), remapping rules,
    log level, and camera topics after remapping, as rcl would resolve them."""
    args = [a for a in _ros_args(process.cmd) if a != '--ros-args']
    full_name = process.namespace.rstrip('/') + '/' + process.node_name
    params, remaps, log_level, i = {}, [], None, 0
    while i < len(args):
        flag, value = args[i], args[i + 1]
        if flag == '--params-file':
            for pattern, body in yaml.safe_load(Path(value).read_text()).items():
                if _pattern_matches(pattern, full_name):
                    params.update(body['ros__parameters'])
        elif flag == '-p':
            key, text = value.split(':=', 1)
            params[key] = yaml.safe_load(text)
        elif flag == '-r':
            remaps.append(value.split(':=', 1))
        elif flag == '--log-level':
            log_level = value
        else:
            raise AssertionError(f'unexpected ROS argument {flag} in {process.cmd}')
        i += 2

    def resolve(name):
        if name.startswith('~/'):
            return full_name + name[1:]
        return name if name.startswith('/') else process.namespace.rstrip('/') + '/' + name

    def remap(name):
        for src, dst in remaps:
            if not src.startswith('__') and resolve(src) == resolve(name):
                return resolve(dst)
        return resolve(name)

    topics = [remap(t) for t in params.get('image_topics', [])]
    return params, remaps, log_level, topics


# ------------------------------------------------------------------------------ the stand-ins
def _raises(exc, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_standins_reject_what_the_real_launch_api_rejects():
    """The stand-ins are only worth something if a wrong launch file fails against them."""
    assert 'executible' in _raises(TypeError, ls.Node, executable='x', executible='x')
    assert 'parameter' in _raises(TypeError, ls.Node, executable='x', parameter=[])
    _raises(TypeError, ls.Node, package=PACKAGE)                      # executable is required
    _raises(TypeError, ls.Node, executable='x', namespace=5)          # not a substitution
    _raises(TypeError, ls.Node, executable='x', parameters='a.yaml')  # a list, not a str
    _raises(TypeError, ls.Node, executable='x', parameters=[{'p': object()}])
    _raises(TypeError, ls.Node, executable='x', remappings=[('image',)])
    _raises(TypeError, ls.Node, executable='x', remappings=['image:=/cam'])
    _raises(TypeError, ls.Node, executable='x', arguments='--ros-args')
    _raises(TypeError, ls.Node, executable='x', output='screan')
    _raises(TypeError, ls.Node, executable='x', emulate_tty='yes')
    _raises(TypeError, ls.Node, executable='x', cmd=['x'])
    _raises(TypeError, ls.Node, 'x')                                  # keyword-only
    _raises(TypeError, ls.DeclareLaunchArgument, 'x', default='1')
    _raises(TypeError, ls.DeclareLaunchArgument, 'x', default_value=1)
    _raises(TypeError, ls.DeclareLaunchArgument, name='x', descripton='d')
    _raises(ls.LaunchError, ls.DeclareLaunchArgument, 'x', default_value='a', choices=['b'])
    _raises(TypeError, ls.OpaqueFunction, func=print)
    _raises(TypeError, ls.OpaqueFunction, function='print')
    _raises(TypeError, ls.LaunchConfiguration, 'x', default_value='1')
    _raises(TypeError, ls.PathJoinSubstitution, 'a/b')
    _raises(TypeError, ls.LaunchDescription, ['not an action'])
    _raises(TypeError, ls.LaunchDescription, [], deprecated='x')
    context = ls.LaunchContext({})
    _raises(ls.SubstitutionFailure, ls.LaunchConfiguration('nope').perform, context)
    assert ls.LaunchConfiguration('nope', default='d').perform(context) == 'd'


def test_standins_find_only_installed_executables(monkeypatch, prefix, tmp_path):
    ls.install(monkeypatch, [str(prefix)])
    for executable in ('cbpnet-node', 'cbpnet_node.py', 'ros2_cbpnet/node.py'):
        description = ls.LaunchDescription([ls.Node(package=PACKAGE, executable=executable)])
        assert 'not found' in _raises(ls.LaunchError, ls.launch, description, {},
                                      tmp_dir=str(tmp_path))
    description = ls.LaunchDescription([ls.Node(package='ros2_cbpnet_typo', executable='x')])
    _raises(ls.PackageNotFoundError, ls.launch, description, {}, tmp_dir=str(tmp_path))
    required = ls.LaunchDescription([ls.DeclareLaunchArgument('needed')])
    assert 'needed' in _raises(ls.LaunchError, ls.launch, required, {}, tmp_dir=str(tmp_path))
    choices = ls.LaunchDescription([ls.DeclareLaunchArgument('q', default_value='a',
                                                             choices=['a', 'b'])])
    _raises(ls.LaunchError, ls.launch, choices, {'q': 'c'}, tmp_dir=str(tmp_path))


# ------------------------------------------------------------------------------ launch file
def test_launch_file_names_the_console_script():
    tree = ast.parse(LAUNCH_FILE.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    nodes = [c for c in calls if getattr(c.func, 'id', None) == 'Node']
    assert len(nodes) == 1
    kwargs = {kw.arg: kw.value for kw in nodes[0].keywords}
    assert ast.literal_eval(kwargs['package']) == PACKAGE
    assert ast.literal_eval(kwargs['name']) == 'cbpnet'
    # executable='cbpnet_lifecycle_node' if managed else 'cbpnet_node'
    choice = kwargs['executable']
    assert isinstance(choice, ast.IfExp)
    managed, plain = ast.literal_eval(choice.body), ast.literal_eval(choice.orelse)
    assert _console_scripts().get(plain) == 'ros2_cbpnet.ros.node:main'
    assert _console_scripts().get(managed) == 'ros2_cbpnet.ros.lifecycle_node:main'


def test_lifecycle_argument_starts_the_managed_node(monkeypatch, prefix, tmp_path):
    node = _the_node(_launch(monkeypatch, prefix, tmp_path, lifecycle='true'))
    assert node.cmd[0] == str(prefix / 'lib' / PACKAGE / 'cbpnet_lifecycle_node')
    assert (node.node_name, node.namespace) == ('cbpnet', '/')


def test_launch_defaults_run_the_installed_node_with_the_package_config(
        monkeypatch, prefix, tmp_path):
    launched = _launch(monkeypatch, prefix, tmp_path)
    assert LAUNCH_ARGUMENTS <= set(launched.declared), set(launched.declared)
    node = _the_node(launched)
    # The executable setup.cfg installs (lib/<package>) for the console script of the node.
    assert node.cmd[0] == str(prefix / 'lib' / PACKAGE / 'cbpnet_node')
    assert (node.node_name, node.namespace) == ('cbpnet', '/')
    assert node.output in ('screen', 'both'), 'node output must reach the terminal'
    assert not launched.warnings, launched.warnings
    params, _, _, topics = effective(node)
    # Exactly the installed config/cbpnet.yaml: nothing overridden by default.
    assert params == _params(prefix / 'share' / PACKAGE / 'config' / 'cbpnet.yaml')
    assert all(t.startswith('/') for t in topics) and len(topics) == len(
        params['image_topics'])


def test_launch_arguments_reach_the_node(monkeypatch, prefix, tmp_path):
    config = dict(_params(ROOT / 'config' / 'cbpnet.yaml'), top_k=3)
    config_file = tmp_path / 'my.yaml'
    config_file.write_text(yaml.safe_dump({'/**/cbpnet': {'ros__parameters': config}}))
    arguments = dict(config=str(config_file), namespace='robot1',
                     image_topic='/front/image_raw/compressed',
                     backbone='vit_small_patch16_224', device='cpu',
                     checkpoint_dir=str(tmp_path / 'moved'), recipe='paper')
    launched = _launch(monkeypatch, prefix, tmp_path, **arguments)
    node = _the_node(launched)
    assert node.namespace == '/robot1' and node.node_name == 'cbpnet'
    params, _, _, topics = effective(node)
    assert topics == ['/front/image_raw/compressed']
    assert params['backbone'] == 'vit_small_patch16_224' and params['device'] == 'cpu'
    assert params['checkpoint_dir'] == str(tmp_path / 'moved') and params['recipe'] == 'paper'
    assert params['top_k'] == 3  # the rest comes from the given config
    unchanged = {k: v for k, v in params.items()
                 if k not in ('backbone', 'device', 'image_topics', 'checkpoint_dir', 'recipe')}
    assert unchanged == {k: v for k, v in config.items() if k in unchanged}
    API.check_parameters(dict(params, backbone=DEFAULTS['backbone']))


@pytest.mark.parametrize('argument, value, check', [
    ('image_qos', 'reliable', lambda params, level: params['image_qos'] == 'reliable'),
    ('log_level', 'debug', lambda params, level: level is not None and
     level.split(':=')[-1].lower() == 'debug'),
])
def test_qos_and_log_level_arguments_reach_the_node(monkeypatch, prefix, tmp_path, argument,
                                                    value, check):
    node = _the_node(_launch(monkeypatch, prefix, tmp_path, **{argument: value}))
    params, _, level, _ = effective(node)
    assert check(params, level), node.cmd


def test_launch_with_a_missing_config_fails_instead_of_running_without_it(
        monkeypatch, prefix, tmp_path):
    """launch_ros only warns about a parameter file that does not exist and starts the node
    without it: on a robot, a typo in config:= would silently run the defaults."""
    missing = str(tmp_path / 'no_such.yaml')
    try:
        launched = _launch(monkeypatch, prefix, tmp_path, config=missing)
    except (ls.LaunchError, ls.SubstitutionFailure, RuntimeError, OSError, ValueError) as exc:
        assert 'no_such.yaml' in str(exc), str(exc)
        return
    started = [p for p in launched.processes]
    assert launched.shutdown is not None and not started, (
        f'config:={missing} started {started} (warnings: {launched.warnings})')
    assert 'no_such.yaml' in launched.shutdown + ' '.join(launched.log)


@pytest.mark.ros
def test_the_launched_command_line_starts_the_node_as_asked(monkeypatch, prefix, tmp_path):
    """Run the exact command line the launch file produces (through the installed console
    script of the stand-in prefix) and ask the running node what it got."""
    from rcl_interfaces.srv import GetParameters
    from rclpy.parameter import parameter_value_to_python

    from ros_helpers import client_in_process, node_process, read_log, wait_until

    ns = f'launch{os.getpid()}'
    camera = f'/{ns}_front/image_raw/compressed'
    arguments = dict(namespace=ns, image_topic=camera, device='cpu', log_level='debug')
    node = _the_node(_launch(monkeypatch, prefix, tmp_path, **arguments))
    params, _, _, topics = effective(node)
    checkpoints = tmp_path / 'checkpoints'
    extra = tmp_path / 'test.yaml'  # small and quick; no writes to ~/.ros
    extra.write_text(yaml.safe_dump({'/**': {'ros__parameters': {
        'image_size': 64, 'checkpoint_dir': str(checkpoints)}}}))
    cmd = node.cmd + ['--params-file', str(extra)]
    with node_process(command=cmd, log_path=tmp_path / 'node.log') as proc, \
            client_in_process(f'/{ns}/cbpnet') as client:
        request = GetParameters.Request()
        request.names = ['device', 'image_topics', 'image_size', 'top_k']
        reply = client.result(client.call_async(GetParameters, f'/{ns}/cbpnet/get_parameters',
                                                request, timeout=120), 60)
        got = dict(zip(request.names, (parameter_value_to_python(v) for v in reply.values)))
        assert got['device'] == 'cpu' and got['image_size'] == 64, read_log(proc)
        assert got['top_k'] == params['top_k']
        # The camera subscription is on the topic asked for, after rcl's remapping.
        assert topics == [camera]
        assert wait_until(lambda: client.count_subscribers(camera) == 1, 60), read_log(proc)
        # log_level:=debug reaches the node's own logger, not only rcl's.
        assert wait_until(lambda: any('[DEBUG]' in line and f'{ns}.cbpnet]: parameters:' in
                                      line for line in read_log(proc, 100000).splitlines()),
                          30), read_log(proc)


# ------------------------------------------------------------------------------ install
def test_setup_installs_launch_and_config():
    installed = {dest: sorted(str(Path(f).relative_to(ROOT)) for f in files)
                 for dest, files in _data_files()}
    assert installed['share/ros2_cbpnet/launch'] == ['launch/cbpnet.launch.py']
    assert installed['share/ros2_cbpnet/config'] == sorted(
        str(p.relative_to(ROOT)) for p in CONFIGS)
    assert 'package.xml' in installed['share/ros2_cbpnet']
    assert installed['share/ament_index/resource_index/packages'] == ['resource/ros2_cbpnet']
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / 'setup.cfg')
    # `ros2 run ros2_cbpnet cbpnet_node` and launch_ros look in lib/<package>.
    assert cfg['install']['install_scripts'] == '$base/lib/ros2_cbpnet'
    assert cfg['develop']['script_dir'] == '$base/lib/ros2_cbpnet'


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
            element = ARRAY_ELEMENTS[PARAMETERS[name].type]
            assert all(type(v) is element for v in value), f'{path.name}: {name}'
    API.check_parameters(params)  # valid as a whole (raises ValueError otherwise)


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

    from ros_helpers import ros_context

    with ros_context(['--ros-args', '--params-file', str(path)]) as context:
        node = Node('cbpnet', context=context, namespace=namespace)
        try:
            values = API.declare_parameters(node)
        finally:
            node.destroy_node()
    assert values == _params(path)
