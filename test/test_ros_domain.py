"""ROS domain ids locked per run (ros2_cbpnet.tools.ros_domain), and the cleanup helpers of
test/proc_cleanup.py: concurrent runs never share a domain, a dead run frees its ids, and
only shared memory of our own dead processes is removed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import proc_cleanup

ROOT = Path(__file__).resolve().parents[1]
#: The program: ``python -m ros2_cbpnet.tools.ros_domain [options] -- command``.
SCRIPT = ['-m', 'ros2_cbpnet.tools.ros_domain']
# Prints the ids the command sees, and whether conftest's logic keeps them (it must).
SHOW = ('import os, sys; from ros2_cbpnet.tools import ros_domain as m; '
        'env = os.environ["ROS_DOMAIN_ID"], os.environ["ROS2_CBPNET_DOMAIN_IDS"]; '
        'kept = m.ensure_domains(2); '
        'print(env[0], env[1], ",".join(map(str, kept)), flush=True); '
        'sys.stdin.read()')


def _start(*args, env=None):
    environ = dict(os.environ, **(env or {}))
    environ.pop('ROS2_CBPNET_DOMAIN_IDS', None)  # not the ids of the run testing this
    proc = subprocess.Popen([sys.executable, *SCRIPT, *args, '--', sys.executable, '-c',
                             SHOW], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=environ)
    first, ids, kept = proc.stdout.readline().split()
    return proc, int(first), [int(i) for i in ids.split(',')], [int(i) for i in kept.split(',')]


def _stop(proc):
    proc.stdin.close()
    proc.wait(30)


def test_this_run_holds_its_domains():
    ids = [int(i) for i in os.environ['ROS2_CBPNET_DOMAIN_IDS'].split(',')]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert os.environ['ROS_DOMAIN_ID'] == str(ids[0])
    assert all(1 <= i <= 101 for i in ids)
    for domain_id in ids:  # locked: nobody else can take them
        fd = os.open(f'/tmp/ros2_cbpnet_domain_{domain_id}.lock', os.O_RDWR)
        try:
            import fcntl
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_concurrent_runs_get_distinct_ids_and_keep_them_in_the_command():
    runs = [_start() for _ in range(3)]
    try:
        seen = []
        for _, first, ids, kept in runs:
            assert first == ids[0] and kept == ids  # the command (conftest) keeps them
            seen += ids
        mine = [int(i) for i in os.environ['ROS2_CBPNET_DOMAIN_IDS'].split(',')]
        assert len(set(seen + mine)) == len(seen + mine), (seen, mine)
    finally:
        for proc, *_ in runs:
            _stop(proc)


def test_a_killed_run_frees_its_ids_and_an_unlocked_env_id_is_not_trusted():
    proc, first, ids, _ = _start()
    proc.kill()
    proc.wait(30)
    # The kernel dropped the lock with the process: the ids can be taken again.
    import fcntl
    for domain_id in ids:
        fd = os.open(f'/tmp/ros2_cbpnet_domain_{domain_id}.lock', os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    # An inherited ROS_DOMAIN_ID that nobody locked (a person's shell) is replaced, unless
    # --keep-env asks for it (the tools, not the tests).
    taken = int(os.environ['ROS_DOMAIN_ID'])
    proc, first, ids, _ = _start(env={'ROS_DOMAIN_ID': str(taken)})
    try:
        assert first != taken
    finally:
        _stop(proc)
    proc = subprocess.Popen([sys.executable, *SCRIPT, '--keep-env', '--', sys.executable,
                             '-c', 'import os; print(os.environ["ROS_DOMAIN_ID"])'],
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, ROS_DOMAIN_ID='42'))
    assert proc.communicate(timeout=30)[0].strip() == '42'


def test_sweep_removes_only_unused_files_of_our_dead_processes(tmp_path):
    name = f'fastdds_cbpnet_test_{os.getpid()}_{time.monotonic_ns()}'
    path = Path('/dev/shm') / name
    other = Path('/dev/shm') / (name + '_other')
    # A child that maps one segment and holds it; a file nobody of ours ever used.
    code = ('import mmap, sys; f = open(sys.argv[1], "w+b"); f.write(b"x" * 4096); f.flush(); '
            'm = mmap.mmap(f.fileno(), 4096); print("ready", flush=True); sys.stdin.read()')
    child = proc_cleanup.TrackedProcess([sys.executable, '-c', code, str(path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    other.write_bytes(b'y')
    (Path('/dev/shm') / (name + '_el')).write_bytes(b'')
    try:
        assert child.stdout.readline().strip() == b'ready'
        # While a process maps it, it is in use: never removed.
        proc_cleanup.remember(child.pid)
        assert name not in proc_cleanup.sweep_shm() and path.exists()
        child.send_signal(signal.SIGKILL)  # remembers, then kills
        child.wait(30)
        removed = proc_cleanup.sweep_shm()
        assert name in removed and name + '_el' in removed and not path.exists()
        assert other.exists(), 'a file no process of ours used must stay'
    finally:
        if child.poll() is None:
            child.kill()
        for p in (path, other, Path('/dev/shm') / (name + '_el')):
            if p.exists():
                p.unlink()


def test_tools_keep_a_chosen_domain_and_lock_one_otherwise():
    from ros2_cbpnet.tools import ros_domain
    chosen = {'ROS_DOMAIN_ID': '17', 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET'}
    assert ros_domain.lock_unless_set(chosen) == 17
    assert chosen['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'LOCALHOST'  # never off this machine
    fresh = {}
    got = ros_domain.lock_unless_set(fresh)
    try:
        assert fresh['ROS_DOMAIN_ID'] == str(got)
        # This process holds the id's lock: nobody else can take it while the tool runs.
        assert ros_domain._try_lock(got) is None
    finally:
        ros_domain.release([got])
