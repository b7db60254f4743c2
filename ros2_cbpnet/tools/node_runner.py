"""The node as a subprocess, for the tools that drive it over DDS (``cbpnet-demo``,
``cbpnet-bench``): its environment, command line, log and an orderly stop.

DDS stays on loopback in a ROS domain locked for this run (:mod:`.ros_domain`), unless the
caller set ``ROS_DOMAIN_ID``.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

from . import ros_domain

__all__ = ['NodeProcess', 'log_tail', 'node_command', 'node_environment', 'stop_process']


def node_environment() -> Dict[str, str]:
    """Environment for the node and the tool's own client: loopback DDS, a locked domain,
    no model-hub traffic unless the caller allowed it, unbuffered logs."""
    ros_domain.lock_unless_set()
    env = dict(os.environ)
    env.setdefault('AMENT_PREFIX_PATH', sys.prefix)
    env.setdefault('HF_HUB_OFFLINE', '1')
    env['PYTHONUNBUFFERED'] = '1'
    return env


def node_command(params_file: Union[str, Path], command: str = '',
                 extra_params: Sequence[str] = ()) -> List[str]:
    """The command line that starts the node with ``params_file``.

    ``command`` (split like a shell line) replaces the executable, e.g. ``taskset -c 1
    cbpnet_node``; by default the ``cbpnet_node`` console script next to this Python, or the
    module when it is not installed. ``extra_params`` are ``NAME:=VALUE`` overrides.
    """
    ros_args = ['--ros-args', '--params-file', str(params_file)]
    for item in extra_params:
        ros_args += ['-p', item]
    if command.strip():
        return shlex.split(command) + ros_args
    exe = os.path.join(os.path.dirname(sys.executable), 'cbpnet_node')
    if os.access(exe, os.X_OK):
        return [exe] + ros_args
    return [sys.executable, '-m', 'ros2_cbpnet.ros.node'] + ros_args


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> Dict[str, Any]:
    """SIGINT, wait; escalate to SIGTERM and SIGKILL only if it will not stop.

    Returns ``exit_code``, the last ``signal`` sent (None if it had already exited) and
    ``stop_s``.
    """
    if proc.poll() is not None:
        return {'exit_code': proc.returncode, 'signal': None, 'stop_s': 0.0}
    t0 = time.monotonic()
    for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 5.0),
                        (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            return {'exit_code': proc.returncode, 'signal': signal.Signals(sig).name,
                    'stop_s': round(time.monotonic() - t0, 2)}
        except subprocess.TimeoutExpired:
            continue
    return {'exit_code': proc.poll(), 'signal': 'SIGKILL',
            'stop_s': round(time.monotonic() - t0, 2)}


def log_tail(path: Union[str, Path], lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' when it cannot be read)."""
    try:
        with open(path, encoding='utf-8', errors='replace') as fh:
            return ''.join(fh.readlines()[-lines:]).rstrip('\n')
    except OSError:
        return ''


class NodeProcess:
    """The node in a subprocess of its own session, its output appended to ``log_path``."""

    def __init__(self, command: Sequence[str], log_path: Union[str, Path],
                 env: Dict[str, str]) -> None:
        self.command = list(command)
        self.log_path = Path(log_path)
        with open(self.log_path, 'ab') as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        """The node's process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> Dict[str, Any]:
        """Stop it as :func:`stop_process` does."""
        return stop_process(self.proc, timeout_s)

    def tail(self, lines: int = 15) -> str:
        """The last lines of the node's log."""
        return log_tail(self.log_path, lines)
