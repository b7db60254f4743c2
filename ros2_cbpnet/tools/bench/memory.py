"""Resident memory of this process and of the node process (Linux /proc), for
``cbpnet-bench``; CUDA peak memory lives in :class:`.timing.DeviceClock`."""
from __future__ import annotations

import ctypes
import gc
import resource
import threading
from typing import Any, Dict, Optional


def proc_status_kb(pid: Any, field: str) -> Optional[int]:
    """A ``kB`` field (VmRSS, VmHWM, ...) of ``/proc/<pid>/status``; None when unreadable."""
    try:
        with open(f'/proc/{pid}/status', encoding='ascii') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def settled_rss_mb(trim: bool = False) -> Optional[float]:
    """This process's VmRSS in MiB after a garbage collection (None where unreadable).

    ``trim``: first give freed heap back to the OS with glibc's ``malloc_trim`` (a no-op
    without glibc), as ``cbpnet_node`` does after every learned task. Without it, glibc keeps
    freed memory in its arenas and the figure jumps by hundreds of MB with allocation history
    rather than with what is live.
    """
    gc.collect()
    if trim:
        _malloc_trim()
    kb = proc_status_kb('self', 'VmRSS')
    return round(kb / 1024, 1) if kb is not None else None


def _malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL('libc.so.6').malloc_trim(0))
    except (OSError, AttributeError):
        return False


class PeakRSS:
    """Peak resident memory of this process over a phase.

    Linux resets VmHWM to the current RSS when '5' is written to ``/proc/self/clear_refs``;
    where that is impossible, ``ru_maxrss`` (the lifetime peak) is reported and marked so.
    """

    def __init__(self) -> None:
        self.source = 'VmHWM'
        self.start_kb = proc_status_kb('self', 'VmRSS') or 0
        try:
            with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
                f.write('5')
        except OSError:
            self.source = 'ru_maxrss (lifetime peak)'

    def peak_kb(self) -> int:
        """The peak since construction, in kB."""
        if self.source == 'VmHWM':
            hwm = proc_status_kb('self', 'VmHWM')
            if hwm is not None:
                return hwm
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def report(self) -> Dict[str, Any]:
        """rss_before_mb, peak_rss_mb, peak_increase_mb and the source of the peak."""
        peak = self.peak_kb()
        return {'rss_before_mb': round(self.start_kb / 1024, 1),
                'peak_rss_mb': round(peak / 1024, 1),
                'peak_increase_mb': round(max(peak - self.start_kb, 0) / 1024, 1),
                'source': self.source}


class RSSSampler(threading.Thread):
    """Samples a process's VmRSS every ``period_s``; keeps the peak per phase."""

    def __init__(self, pid: int, period_s: float = 0.2) -> None:
        super().__init__(daemon=True, name='cbpnet-bench-rss')
        self.pid, self.period_s = pid, period_s
        self.phase = 'startup'
        self.peaks_kb: Dict[str, int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period_s):
            kb = proc_status_kb(self.pid, 'VmRSS')
            if kb is None:
                return
            self.peaks_kb[self.phase] = max(self.peaks_kb.get(self.phase, 0), kb)

    def stop(self) -> None:
        """Stop sampling and join."""
        self._stop_event.set()
        self.join(timeout=2.0)
