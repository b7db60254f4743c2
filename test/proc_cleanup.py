"""Processes and Fast DDS shared memory that tests leave behind (no ROS import here).

A node process that is killed (SIGKILL, or a test that fails before stopping it) cannot
remove its Fast DDS shared-memory files from /dev/shm (``fastdds_*``, ``fastrtps_*``,
``fast_datasharing_*`` and their ``*_el`` lock and ``sem.*_mutex`` companions). Only files
that one of *our* processes had mapped or open are candidates (read from
``/proc/<pid>/maps`` and ``/proc/<pid>/fd`` before it is signalled), and a candidate is
removed only once no live process on the machine maps or opens it: the port segments
(``fastdds_port<N>``) are shared by every participant of a domain, and a concurrent run may
still use them.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Iterable, List, Set

SHM_DIR = '/dev/shm'
_PREFIXES = ('fastdds_', 'fastrtps_', 'fast_datasharing_')
_candidates: Set[str] = set()
_lock = threading.Lock()


def _is_dds(name: str) -> bool:
    return name.startswith(_PREFIXES) or name.startswith(tuple('sem.' + p for p in _PREFIXES))


def _base(name: str) -> str:
    """The segment a lock or mutex file belongs to (``sem.X_mutex`` / ``X_el`` -> ``X``)."""
    if name.startswith('sem.'):
        name = name[4:]
    for suffix in ('_mutex', '_el'):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
    return name


def _shm_files_of(pid: int) -> Set[str]:
    """Names under /dev/shm that process ``pid`` maps or has open (empty if it is gone)."""
    names = set()
    try:
        with open(f'/proc/{pid}/maps') as maps:
            for line in maps:
                path = line.rstrip('\n').split(maxsplit=5)[-1]
                if path.startswith(SHM_DIR + '/'):
                    names.add(path[len(SHM_DIR) + 1:].replace(' (deleted)', ''))
    except OSError:
        pass
    try:
        for fd in os.listdir(f'/proc/{pid}/fd'):
            try:
                target = os.readlink(f'/proc/{pid}/fd/{fd}')
            except OSError:
                continue
            if target.startswith(SHM_DIR + '/'):
                names.add(target[len(SHM_DIR) + 1:])
    except OSError:
        pass
    return names


def remember(pid: int) -> Set[str]:
    """Note the Fast DDS files of ``pid`` (call while it is alive) as cleanup candidates."""
    mine = {_base(n) for n in _shm_files_of(pid) if _is_dds(n)}
    with _lock:
        _candidates.update(mine)
    return mine


def _in_use() -> Set[str]:
    used: Set[str] = set()
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            used.update(_base(n) for n in _shm_files_of(int(entry)) if _is_dds(n))
    return used


def sweep_shm() -> List[str]:
    """Remove the candidate files that no live process uses any more; returns their names."""
    with _lock:
        if not _candidates:
            return []
        used = _in_use()
        removed = []
        for base in sorted(_candidates - used):
            for name in (base, base + '_el', f'sem.{base}_mutex'):
                try:
                    os.unlink(os.path.join(SHM_DIR, name))
                    removed.append(name)
                except FileNotFoundError:
                    pass
                except OSError:
                    pass  # another user's file: not ours to remove
            _candidates.discard(base)
        return removed


def _alive(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def kill_and_clean(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGKILL ``pids`` (noting their shared memory first), reap them, sweep /dev/shm."""
    pids = list(pids)
    for pid in pids:
        remember(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:  # not our child: wait for it to vanish
                if not _alive(pid):
                    break
            time.sleep(0.02)
    sweep_shm()


#: util-linux's setpriv sets PR_SET_PDEATHSIG and execs, so no Python runs between fork and
#: exec (a preexec_fn is unsafe in a threaded test process).
_SETPRIV = shutil.which('setpriv')


class TrackedProcess(subprocess.Popen):
    """A Popen that notes the child's Fast DDS files before every signal it sends it and
    dies with the test process (``PR_SET_PDEATHSIG``: a hard-killed pytest leaves no
    orphaned node behind in its domain)."""

    def __init__(self, *args, **kwargs) -> None:
        # The death signal follows the *thread* that forked; only the main thread lives as
        # long as the run.
        args = list(args)
        cmd = args[0] if args else kwargs.pop('args')
        if (_SETPRIV and threading.current_thread() is threading.main_thread()
                and not kwargs.get('shell') and not isinstance(cmd, (str, bytes))):
            cmd = [_SETPRIV, '--pdeathsig', 'KILL', '--'] + [str(c) for c in cmd]
        super().__init__(cmd, *args[1:], **kwargs)

    def send_signal(self, sig: int) -> None:
        """Remember the shared memory, then signal (``kill()`` and ``terminate()`` too)."""
        if self.poll() is None:
            remember(self.pid)
        super().send_signal(sig)
