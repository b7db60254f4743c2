"""Where the node's time goes: py-spy ``--format raw --threads`` samples of ``cbpnet_node``,
grouped by thread and by stage of a frame's way from DDS to the prediction.

py-spy drops samples of threads that sleep (a blocked ``wait``, an idle thread pool), so the
samples are CPU time, not wall time; ``seconds`` per thread group is that CPU time over the
profiled window and ``ms_per_frame`` divides it by the frames classified meanwhile.

Each sample is one stack of one thread; its stage is the first rule (below) that matches a
frame, searching from the innermost frame outwards, so ``resize_batch`` called from
``predict`` counts as ``resize``, not as ``model``. Time in C code (OpenCV, torch kernels,
the rmw layer) is attributed to the innermost Python frame that called it. Samples are taken
whether or not the thread holds the GIL, so a thread waiting for the GIL shows under the
stage it is trying to run (the GIL is one lock for all threads: the stages of all threads
together show what competes for it).
"""
from __future__ import annotations

import collections
import re
from typing import Any, Dict, List, Tuple

#: (stage, substrings of a frame "function (file:line)"); first match, innermost frame first.
STAGES: List[Tuple[str, Tuple[str, ...]]] = [
    ('decode_raw_image', ('image_msg_to_rgb',)),
    ('decode_jpeg', ('compressed_msg_to_rgb',)),
    ('resize', ('resize_batch', 'resize_image')),
    ('to_tensor_normalise', ('preprocess (learner',)),
    ('model', ('predict_tensor', 'cbpnet.py', 'backbones.py', 'torch/')),
    ('topk_and_results', ('predict (learner',)),
    ('json_and_publish', ('json/', 'publish (')),
    ('debug_image', ('_publish_debug', 'draw_label')),
    ('camera_callback_queueing', ('callback (node.py',)),
    ('labelled_or_teach', ('_on_labelled', '_on_teach', '_maybe_teach')),
    ('learning', ('_learn_task', 'learn_task')),
    ('diagnostics', ('_publish_diagnostics', '_status (node', 'diagnostic')),
    ('waiting_for_frames', ('Condition.wait',)),
    ('rclpy_take_message', ('_take_subscription', 'take_message', '_take (')),
    ('rclpy_wait_for_work', ('wait_for_ready_callbacks', '_wait_for_ready_callbacks')),
    ('thread_pool_idle', ('_worker (concurrent/futures/thread.py', 'SimpleQueue.get',
                          'Queue.get')),
    ('rclpy_executor', ('rclpy/',)),
]

_LINE = re.compile(r'^thread \((?P<tid>[^)]*)\): (?P<stack>.*) (?P<count>\d+)$')


def thread_group(name: str) -> str:
    """The node's threads by role: main (executor loop), executor workers, inference, ..."""
    if name == 'MainThread':
        return 'main_executor_loop'
    if name.startswith('ThreadPoolExecutor'):
        return 'executor_workers'
    if name.startswith('cbpnet-inference'):
        return 'inference_thread'
    if name.startswith('cbpnet-cameras'):
        return 'camera_thread'
    if name.startswith('cbpnet-learn'):
        return 'learning_thread'
    return 'other'


def classify(frames: List[str]) -> str:
    """The stage of one stack (outermost frame first)."""
    for frame in reversed(frames):
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return 'other'


def breakdown_from_raw(path: str, rate_hz: float = 100.0, frames: int = 0
                       ) -> Dict[str, Any]:
    """Per thread group: sampled seconds, and per stage its fraction and, when ``frames``
    (classified in the window) is given, its milliseconds per classified frame.

    Returns:
        ``{'rate_hz', 'frames', 'threads': {group: {'threads', 'seconds', 'stages':
        {stage: fraction}, 'ms_per_frame': {stage: ms}}}}``, stages largest first.
    """
    counts: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    tids: Dict[str, set] = collections.defaultdict(set)
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            m = _LINE.match(line.rstrip('\n'))
            if not m:
                continue
            parts = m.group('stack').split(';')
            group = thread_group(parts[0])
            counts[group][classify(parts[1:])] += int(m.group('count'))
            tids[group].add(m.group('tid'))
    threads = {}
    for group, c in sorted(counts.items()):
        total = sum(c.values())
        threads[group] = {
            'threads': len(tids[group]),
            'seconds': round(total / rate_hz, 2),
            'stages': {k: round(v / total, 3) for k, v in c.most_common()},
        }
        if frames:
            threads[group]['ms_per_frame'] = {
                k: round(1000.0 * v / rate_hz / frames, 3) for k, v in c.most_common()}
    return {'rate_hz': rate_hz, 'frames': frames, 'threads': threads}
