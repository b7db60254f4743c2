"""The layout keeps its promises: the learning side imports nothing of ROS, data flows from the
ROS side to the learning side and never back, and no source file is too long to read."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'ros2_cbpnet'
LEARNING = sorted((PACKAGE / 'learning').rglob('*.py'))
#: The evaluation tool runs without ROS too (README, "Learning quality").
ROS_FREE = LEARNING + [PACKAGE / 'tools' / name for name in (
    'evaluate.py', 'eval_methods.py', 'eval_protocols.py', 'eval_plasticity.py',
    'cli_types.py', 'ros_domain.py')]
ROS_MODULES = ('rclpy', 'rcl_interfaces', 'std_msgs', 'sensor_msgs', 'std_srvs',
               'diagnostic_msgs', 'lifecycle_msgs', 'vision_msgs', 'launch', 'launch_ros',
               'ament_index_python', 'builtin_interfaces')
MAX_LINES = 600


def _imports(path):
    """Absolute names of every module ``path`` imports (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    package = '.'.join(path.relative_to(ROOT).with_suffix('').parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:len(package.split('.')) - node.level + 1]
                names.append('.'.join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return names


@pytest.mark.parametrize('path', ROS_FREE, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_learning_side_imports_nothing_of_ros(path):
    for name in _imports(path):
        assert name.split('.')[0] not in ROS_MODULES, f'{path.name} imports {name}'
        assert not name.startswith('ros2_cbpnet.ros'), f'{path.name} imports {name}'


def test_the_learning_side_and_the_evaluation_import_with_ros_unavailable():
    """Import them in a Python where every ROS package raises ImportError."""
    modules = ['ros2_cbpnet.' + '.'.join(p.relative_to(PACKAGE).with_suffix('').parts)
               for p in ROS_FREE]
    modules = [m[:-len('.__init__')] if m.endswith('.__init__') else m for m in modules]
    code = ('import sys\n'
            f'for name in {ROS_MODULES!r}:\n'
            '    sys.modules[name] = None\n'
            f'for module in {modules!r}:\n'
            '    __import__(module)\n'
            'print("ok", len(sys.modules))\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith('ok'), result.stderr[-3000:]


def test_no_source_file_is_longer_than_a_reader_holds_in_mind():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob('*.py')
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_node_side_and_the_tools_are_where_the_layout_says():
    assert {p.name for p in (PACKAGE / 'ros').glob('*.py')} >= {
        'node.py', 'lifecycle_node.py', 'parameters.py', 'diagnostics.py', 'camera_input.py',
        'inference_worker.py', 'model_changes.py', 'image_codec.py', 'fleet_link.py'}
    assert not [p.name for p in PACKAGE.glob('*.py') if p.name != '__init__.py'], \
        'modules belong to ros2_cbpnet/learning, ros2_cbpnet/ros or ros2_cbpnet/tools'
