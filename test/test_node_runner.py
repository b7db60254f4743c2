"""The node-runner helpers of cbpnet-demo and cbpnet-bench (ros2_cbpnet.tools.node_runner):
the command line, an orderly stop that escalates only when needed, the log tail and the
environment (loopback DDS, a locked domain)."""
import os
import subprocess
import sys

from ros2_cbpnet.tools import node_runner

# Ignores SIGINT and SIGTERM: only SIGKILL stops it.
STUBBORN = ('import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); '
            'signal.signal(signal.SIGTERM, signal.SIG_IGN); print("up", flush=True); '
            'time.sleep(60)')


def test_command_line_takes_the_params_file_overrides_and_a_replacement_executable():
    cmd = node_runner.node_command('/p.yaml', extra_params=['a:=1', 'b:=x'])
    assert cmd[-7:] == ['--ros-args', '--params-file', '/p.yaml', '-p', 'a:=1', '-p', 'b:=x']
    assert cmd[0].endswith('cbpnet_node') or cmd[:3] == [sys.executable, '-m',
                                                         'ros2_cbpnet.ros.node']
    custom = node_runner.node_command('/p.yaml', 'taskset -c "1" cbpnet_node')
    assert custom == ['taskset', '-c', '1', 'cbpnet_node', '--ros-args', '--params-file',
                      '/p.yaml']


def test_stop_sends_sigint_first_and_escalates_only_for_a_stubborn_process(tmp_path):
    polite = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    stopped = node_runner.stop_process(polite, timeout_s=10)
    assert stopped['signal'] == 'SIGINT' and stopped['exit_code'] != 0
    assert node_runner.stop_process(polite)['signal'] is None  # already gone: nothing sent
    stubborn = subprocess.Popen([sys.executable, '-c', STUBBORN], stdout=subprocess.PIPE)
    assert stubborn.stdout.readline().strip() == b'up'  # its handlers are installed
    stopped = node_runner.stop_process(stubborn, timeout_s=0.5)
    assert stopped['signal'] == 'SIGKILL' and stopped['exit_code'] == -9


def test_node_process_logs_to_its_file_and_the_tail_is_the_end_of_it(tmp_path):
    log = tmp_path / 'node.log'
    script = 'print("\\n".join(f"line {i}" for i in range(50)))'
    node = node_runner.NodeProcess([sys.executable, '-c', script], log, dict(os.environ))
    node.proc.wait(30)
    assert not node.alive()
    assert node.tail(3) == 'line 47\nline 48\nline 49'
    assert node_runner.log_tail(tmp_path / 'missing.log') == ''


def test_environment_keeps_dds_on_loopback_in_the_callers_domain(monkeypatch):
    monkeypatch.setenv('ROS_DOMAIN_ID', '23')
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'SUBNET')
    env = node_runner.node_environment()
    assert env['ROS_DOMAIN_ID'] == '23' and env['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'LOCALHOST'
    assert env['PYTHONUNBUFFERED'] == '1' and env['HF_HUB_OFFLINE']
