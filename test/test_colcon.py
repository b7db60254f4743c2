"""The package built with colcon the way a robot builds it, and its installed node run.

``make test`` prepares colcon in ``.venv-colcon`` (``make colcon-tools``; PyPI's
colcon-common-extensions, kept out of the project's venv). The test copies the tracked files
into ``<tmp>/ws/src/ros2_cbpnet``, runs ``colcon build`` there, checks the install tree and
the ament index, and starts the *installed* ``cbpnet_node`` with the *installed* config
until it answers a service over DDS.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ros_helpers import client_in_process, node_process, read_log, ros_env

pytestmark = [pytest.mark.ros]

ROOT = Path(__file__).resolve().parents[1]
COLCON = ROOT / '.venv-colcon' / 'bin' / 'colcon'
#: What colcon's Python build prints on stderr and why it is harmless: colcon runs setup.py
#: with byte-compiling off (so no .pyc lands in the source tree); Python compiles at import.
EXPLAINED = {'warning: build_py: byte-compiling is disabled, skipping.',
             'warning: install_lib: byte-compiling is disabled, skipping.'}


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    if not COLCON.exists():
        pytest.fail('colcon is missing: run `make colcon-tools` (make test does)')
    ws = tmp_path_factory.mktemp('colcon') / 'ws'
    src = ws / 'src' / 'ros2_cbpnet'
    tracked = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode().split('\0')
    for rel in filter(None, tracked):
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / rel).read_bytes())
        os.chmod(target, os.stat(ROOT / rel).st_mode)
    env = {k: v for k, v in os.environ.items() if not k.startswith(('AMENT', 'COLCON'))}
    build = subprocess.run([str(COLCON), 'build', '--event-handlers', 'console_direct-'],
                           cwd=ws, capture_output=True, text=True, timeout=600, env=env)
    assert build.returncode == 0, build.stdout + build.stderr
    return ws / 'install', build


def _installed_env(install):
    env = ros_env()
    prefix = install / 'ros2_cbpnet'
    site = prefix / 'lib' / f'python{sys.version_info.major}.{sys.version_info.minor}' \
        / 'site-packages'
    env['PYTHONPATH'] = os.pathsep.join([str(site)] + [p for p in env.get(
        'PYTHONPATH', '').split(os.pathsep) if p])
    env['AMENT_PREFIX_PATH'] = os.pathsep.join([str(prefix), env.get('AMENT_PREFIX_PATH',
                                                                     '')])
    return env


def test_build_has_no_unexplained_warning(workspace):
    _, build = workspace
    lines = {line.strip() for line in build.stderr.splitlines() if line.strip()}
    noise = {line for line in lines if line.startswith(('---', 'Starting', 'Finished',
                                                        'Summary', '1 package'))
             or line.endswith('ros2_cbpnet')}
    assert lines - noise <= EXPLAINED, lines - noise


def test_install_tree_is_what_ros2_tools_look_for(workspace):
    install, _ = workspace
    prefix = install / 'ros2_cbpnet'
    for exe in ('cbpnet_node', 'cbpnet-eval', 'cbpnet-bench', 'cbpnet-demo'):
        path = prefix / 'lib' / 'ros2_cbpnet' / exe
        assert path.is_file() and os.access(path, os.X_OK), exe
    share = prefix / 'share' / 'ros2_cbpnet'
    assert (share / 'package.xml').is_file()
    assert (share / 'launch' / 'cbpnet.launch.py').is_file()
    assert sorted(p.name for p in (share / 'config').glob('*.yaml')) == [
        'cbpnet.yaml', 'cbpnet_vit_b16.yaml']
    assert (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages'
            / 'ros2_cbpnet').is_file()


def test_ament_index_resolves_the_installed_package(workspace):
    install, _ = workspace
    code = ('from ament_index_python.packages import get_package_prefix, '
            'get_package_share_directory; import ros2_cbpnet; '
            "print(get_package_prefix('ros2_cbpnet')); "
            "print(get_package_share_directory('ros2_cbpnet')); print(ros2_cbpnet.__file__)")
    out = subprocess.run([sys.executable, '-c', code], env=_installed_env(install),
                         cwd=install, capture_output=True, text=True, check=True).stdout.split()
    prefix = install / 'ros2_cbpnet'
    assert out[0] == str(prefix) and out[1] == str(prefix / 'share' / 'ros2_cbpnet')
    assert out[2].startswith(str(prefix)), out[2]  # the installed copy, not the checkout


def test_installed_executable_answers_over_dds(workspace, tmp_path):
    install, _ = workspace
    prefix = install / 'ros2_cbpnet'
    config = prefix / 'share' / 'ros2_cbpnet' / 'config' / 'cbpnet.yaml'
    ns = f'colcon{os.getpid()}'
    with node_process(config, executable=prefix / 'lib' / 'ros2_cbpnet' / 'cbpnet_node',
                      ros_args=['-r', f'__ns:=/{ns}', '-p', f'checkpoint_dir:={tmp_path}',
                                '-p', 'image_size:=64'],
                      env=_installed_env(install), log_path=tmp_path / 'node.log') as proc, \
            client_in_process(f'/{ns}/cbpnet') as client:
        reply = client.call_trigger('~/clear_buffer', timeout=120)
        assert reply.success, read_log(proc)
        assert client.get_parameters(['backbone'])['backbone'] == 'tf_efficientnet_lite0'
