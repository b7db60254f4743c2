"""The launch arguments added for robots: the camera by remapping, its QoS, the log level, and
a ``config:=`` path that does not exist.

Run against the strict stand-ins of ``launch_standins`` (a real ``ros2 launch`` is not run
here: launch/launch_ros have no PyPI wheels); the command line they build is checked, and
then given to the real node executable with rcl's own argument parser, so the remapping
and the QoS override are checked where they take effect.
"""
import importlib.util
import os
from pathlib import Path

import pytest

import launch_standins

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / 'launch' / 'cbpnet.launch.py'


@pytest.fixture
def prefix(tmp_path):
    """An install prefix laid out as colcon installs the package (setup.py/setup.cfg)."""
    share = tmp_path / 'share'
    (share / 'ament_index' / 'resource_index' / 'packages').mkdir(parents=True)
    (share / 'ament_index' / 'resource_index' / 'packages' / 'ros2_cbpnet').write_text('')
    (share / 'ros2_cbpnet' / 'config').mkdir(parents=True)
    (share / 'ros2_cbpnet' / 'config' / 'cbpnet.yaml').write_text(
        (ROOT / 'config' / 'cbpnet.yaml').read_text())
    lib = tmp_path / 'lib' / 'ros2_cbpnet'
    lib.mkdir(parents=True)
    (lib / 'cbpnet_node').write_text('#!/bin/sh\n')
    os.chmod(lib / 'cbpnet_node', 0o755)
    return tmp_path


def _launch(monkeypatch, prefix, **arguments):
    launch_standins.install(monkeypatch, [str(prefix)])
    spec = importlib.util.spec_from_file_location('cbpnet_launch_args_under_test',
                                                  LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return launch_standins.launch(module.generate_launch_description(), arguments,
                                  tmp_dir=str(prefix))


def _args_after(cmd, flag):
    return [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == flag]


def test_defaults_no_remapping_info_level_package_config(monkeypatch, prefix):
    launched = _launch(monkeypatch, prefix)
    (process,) = launched.processes
    cmd = process.cmd
    assert cmd[0] == str(prefix / 'lib' / 'ros2_cbpnet' / 'cbpnet_node')
    assert _args_after(cmd, '--params-file') == [
        str(prefix / 'share' / 'ros2_cbpnet' / 'config' / 'cbpnet.yaml')]
    assert _args_after(cmd, '--log-level') == ['info']
    assert _args_after(cmd, '-r') == ['__node:=cbpnet', '__ns:=/']  # no remapping of image
    assert not launched.warnings


def test_image_topic_remaps_the_relative_default_and_qos_overrides(monkeypatch, prefix):
    launched = _launch(monkeypatch, prefix, image_topic='/front/image_raw/compressed',
                       image_qos='reliable', log_level='debug', namespace='robot1')
    cmd = launched.processes[0].cmd
    assert 'image:=/front/image_raw/compressed' in _args_after(cmd, '-r')
    assert '__ns:=/robot1' in _args_after(cmd, '-r')
    assert _args_after(cmd, '--log-level') == ['debug']
    files = _args_after(cmd, '--params-file')
    assert len(files) == 2  # the config, then the overrides (later files win)
    overrides = Path(files[1]).read_text()
    assert 'image_qos: reliable' in overrides and 'image_topics' not in overrides


@pytest.mark.parametrize('name, value', [('image_qos', 'best_effort'), ('log_level', 'loud')])
def test_launch_arguments_refuse_values_outside_their_choices(monkeypatch, prefix, name,
                                                              value):
    with pytest.raises(launch_standins.LaunchError, match=name):
        _launch(monkeypatch, prefix, **{name: value})


def test_missing_config_file_fails_with_a_clear_message(monkeypatch, prefix, tmp_path):
    missing = tmp_path / 'nope' / 'my_cbpnet.yaml'
    with pytest.raises(FileNotFoundError, match=r"config:='.*my_cbpnet\.yaml' is not a file"):
        _launch(monkeypatch, prefix, config=str(missing))


@pytest.mark.ros
def test_the_launched_command_line_reaches_the_node(monkeypatch, prefix):
    """rcl parses the ``--ros-args`` the launch file builds: the remapped camera is a
    CompressedImage subscription (type from the name after remapping), the QoS override and
    the namespace apply."""
    from ros2_cbpnet.ros.node import CBPNetNode
    from ros_helpers import ros_context

    launched = _launch(monkeypatch, prefix, image_topic='/front/image_raw/compressed',
                       image_qos='reliable', namespace='robot1')
    cmd = launched.processes[0].cmd
    ros_args = cmd[cmd.index('--ros-args'):]
    # The test's own, fast settings go after the launch file's (later files win).
    fast = prefix / 'fast.yaml'
    fast.write_text("/**:\n  ros__parameters:\n    image_size: 32\n    checkpoint_dir: ''\n"
                    "    backbone_checkpoint: random\n")
    with ros_context(ros_args + ['--params-file', str(fast)]) as context:
        node = CBPNetNode(context=context, cli_args=ros_args + ['--params-file', str(fast)])
        try:
            assert node.get_fully_qualified_name() == '/robot1/cbpnet'
            assert node.get_parameter('image_qos').value == 'reliable'
            assert node.get_parameter('image_topics').value == ['image']
            subs = {name: types for name, types in node.get_subscriber_names_and_types_by_node(
                'cbpnet', '/robot1')}
            assert subs.get('/front/image_raw/compressed') == ['sensor_msgs/msg/CompressedImage']
        finally:
            node.destroy_node()
