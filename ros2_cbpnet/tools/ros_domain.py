"""ROS domain ids that no concurrent run on this machine is using.

Two test runs (or a test run and a demo) in the same ROS domain see each other's nodes and
topics. Deriving the id from a pid (``pid % 90``) collides as soon as two pids agree modulo
90, so ids are handed out with a lock instead: id ``N`` belongs to whoever holds an exclusive
``flock`` on ``/tmp/ros2_cbpnet_domain_<N>.lock``. The kernel releases the lock when the last
file descriptor of that open file is closed, i.e. when the holder exits, even on SIGKILL, so
a crashed run never keeps its ids.

As a program, it takes the lock and ``exec``\\ s a command that inherits it (the Makefile's
targets run through it)::

    python -m ros2_cbpnet.tools.ros_domain [--count N] [--keep-env] -- COMMAND [ARG...]

The command gets ``ROS_DOMAIN_ID`` (the first id) and ``ROS2_CBPNET_DOMAIN_IDS`` (all ids,
comma-separated; the extra ones are for tests that need a second, isolated domain). With
``--keep-env`` an explicit ``ROS_DOMAIN_ID`` in the environment is used as it is (for demos a
person watches from another terminal). ``test/conftest.py`` calls :func:`ensure_domains`,
which reuses ids whose lock this process already holds (inherited from the program) and
otherwise takes new ones, so ``pytest`` run directly gets the same protection.

Valid ids are 1..101: Fast DDS derives its UDP ports from the id, and above 101 they can
fall into Linux's ephemeral port range (ROS 2 documentation, "The ROS_DOMAIN_ID").
"""
from __future__ import annotations

import argparse
import fcntl
import os
import sys
from typing import Dict, List, Optional, Sequence

#: Domain ids that are safe on Linux.
VALID_IDS = range(1, 102)
#: Where the lock files live (shared by every user of the machine).
LOCK_DIR = '/tmp'
#: All ids a process holds, comma-separated; the first is ``ROS_DOMAIN_ID``.
IDS_VARIABLE = 'ROS2_CBPNET_DOMAIN_IDS'

# fd of each id this process holds; kept open (and so locked) until the process exits.
_held: Dict[int, int] = {}


def lock_path(domain_id: int) -> str:
    """The lock file of ``domain_id``."""
    return os.path.join(LOCK_DIR, f'ros2_cbpnet_domain_{domain_id}.lock')


def _inherited() -> Dict[int, int]:
    """Ids whose lock file this process has open (an fd inherited across ``exec``)."""
    found = {}
    fd_dir = '/proc/self/fd'
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue  # the fd of the listing itself, already closed
        for domain_id in VALID_IDS:
            if target == lock_path(domain_id):
                found[domain_id] = int(name)
    return found


def _try_lock(domain_id: int) -> Optional[int]:
    """An fd holding the exclusive lock of ``domain_id``, or None when someone else has it."""
    fd = os.open(lock_path(domain_id), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    try:
        os.fchmod(fd, 0o666)  # another user's run must be able to open it, too
    except OSError:
        pass
    return fd


def acquire(count: int = 1) -> List[int]:
    """Lock ``count`` free domain ids for the lifetime of this process and return them.

    The scan starts at a pid-dependent id so concurrent runs rarely race for the same lock.

    Raises:
        RuntimeError: when fewer than ``count`` ids are free.
    """
    ids = list(VALID_IDS)
    start = os.getpid() % len(ids)
    got: List[int] = []
    for domain_id in ids[start:] + ids[:start]:
        if len(got) == count:
            break
        if domain_id in _held:
            continue
        fd = _try_lock(domain_id)
        if fd is not None:
            _held[domain_id] = fd
            got.append(domain_id)
    if len(got) < count:
        release(got)
        raise RuntimeError(f'only {len(got)} of {count} ROS domain ids are free on this machine '
                           f'(locks {lock_path(0)[:-6]}*.lock are held by other runs)')
    return got


def release(ids: Sequence[int]) -> None:
    """Give back ids taken with :func:`acquire`."""
    for domain_id in ids:
        fd = _held.pop(domain_id, None)
        if fd is not None:
            os.close(fd)


def ensure_domains(count: int = 2, environ: Optional[Dict[str, str]] = None) -> List[int]:
    """Make ``environ`` (default ``os.environ``) name ``count`` domain ids this process holds.

    Ids listed in ``ROS2_CBPNET_DOMAIN_IDS`` whose lock file this process has open (inherited
    from ``python -m ros2_cbpnet.tools.ros_domain``) are kept; otherwise new ones are locked.
    ``ROS_DOMAIN_ID`` is set to the first id: an inherited value that nobody locked is not
    trusted.
    """
    environ = os.environ if environ is None else environ
    inherited = _inherited()
    _held.update({i: fd for i, fd in inherited.items() if i not in _held})
    listed = [int(x) for x in environ.get(IDS_VARIABLE, '').split(',') if x.strip().isdigit()]
    ids = [i for i in listed if i in _held][:count]
    if len(ids) < count:
        ids += acquire(count - len(ids))
    environ[IDS_VARIABLE] = ','.join(map(str, ids))
    environ['ROS_DOMAIN_ID'] = str(ids[0])
    return ids


def lock_unless_set(environ: Optional[Dict[str, str]] = None) -> int:
    """The ROS domain id a tool runs in: the caller's ``ROS_DOMAIN_ID`` when one is set (a
    user who picked a domain means it), else one locked for this process's lifetime (a
    pid-derived id collides with other runs). DDS discovery is kept on loopback either way.
    """
    environ = os.environ if environ is None else environ
    environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    chosen = environ.get('ROS_DOMAIN_ID', '').strip()
    if chosen:
        return int(chosen)
    return ensure_domains(1, environ)[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Lock domain ids and exec the command with them (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--count', type=int, default=2, help='ids to lock (default 2)')
    parser.add_argument('--keep-env', action='store_true',
                        help='use an explicit ROS_DOMAIN_ID from the environment as it is')
    parser.add_argument('command', nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command:
        parser.error('no command given')
    if args.keep_env and os.environ.get('ROS_DOMAIN_ID', '').strip():
        os.execvp(command[0], command)
    ensure_domains(args.count)
    for fd in _held.values():
        os.set_inheritable(fd, True)  # the lock lives on in the command
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == '__main__':
    sys.exit(main())
