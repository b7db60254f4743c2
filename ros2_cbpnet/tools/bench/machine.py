"""The machine the figures come from, and how busy other processes kept it meanwhile."""
from __future__ import annotations

import os
import platform
from typing import Any, Dict, Tuple

import numpy as np


def cpu_model() -> str:
    """The CPU's model name."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            for line in f:
                if line.lower().startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_times() -> Tuple[float, float, float]:
    """(busy seconds of all CPUs, stolen seconds, CPU seconds of this process and its
    waited-for children) for measuring how much else ran during the benchmark."""
    busy = steal = 0.0
    try:
        with open('/proc/stat', encoding='ascii') as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        tick = float(os.sysconf('SC_CLK_TCK'))
        busy = (vals[0] + vals[1] + vals[2] + vals[5] + vals[6]) / tick
        steal = (vals[7] if len(vals) > 7 else 0) / tick
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return busy, steal, t.user + t.system + t.children_user + t.children_system


def other_load(start: Tuple[float, float, float], elapsed: float) -> Dict[str, float]:
    """Cores that other processes kept busy (and steal) since ``start`` = :func:`cpu_times`."""
    end = cpu_times()
    other = (end[0] - start[0]) - (end[2] - start[2])
    return {'other_processes_cores_busy': round(max(other, 0.0) / elapsed, 2),
            'steal_cores': round((end[1] - start[1]) / elapsed, 2)}


def machine_info(device) -> Dict[str, Any]:
    """CPU, device, library versions and thread settings of this run."""
    import cv2
    import timm
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    info = {
        'cpu_model': cpu_model(), 'cpu_count': os.cpu_count(), 'cpu_affinity': affinity,
        'torch_threads': torch.get_num_threads(), 'device': str(device),
        'device_name': cpu_model(), 'torch_version': torch.__version__,
        'timm_version': timm.__version__, 'numpy_version': np.__version__,
        'opencv_version': cv2.__version__, 'python_version': platform.python_version(),
        'platform': platform.platform(),
        'omp_env': {k: os.environ[k] for k in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY',
                                               'MKL_NUM_THREADS') if k in os.environ},
        'loadavg_start': [round(v, 2) for v in os.getloadavg()],
    }
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device),
                    cuda_version=torch.version.cuda,
                    cuda_capability=f'{props.major}.{props.minor}',
                    cuda_memory_gb=round(props.total_memory / 2 ** 30, 1))
    return info
