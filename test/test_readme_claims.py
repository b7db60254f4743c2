"""Bounds on the README's measured figures, read from the README itself.

Each test re-measures one figure in a short run and asserts it stays within 2x of what the
README states, so a 2x regression fails while the noise of a shared 2-core machine passes:

- checkpoint size: the first checkpoint, and the growth per further task (deterministic);
- the load test: p95 latency receipt-to-publish and the frames lost in best-effort transport,
  four cameras at 60 Hz plus a labelled stream and service calls, as in the README's table
  (when other jobs already load the machine, these two bounds widen by the load per core
  that other jobs cause as the test starts: :func:`_busy_factor`);
- RSS in a short soak (as ``scripts/soak.py`` runs it): growth per task over four tasks after
  three warm-up tasks. RSS moves by +-20 MB between samples here, so a fixed bound of a few
  times the README's 10-minute figure (0.2 MB per task) would fail on noise alone. The bound is
  three times that figure plus what this run's own noise can explain (one-sided 99 %), and
  never more than 15 MB per task, which still fails on the leak the README describes (one glibc
  arena per executor thread, 37 MB per task): :func:`_soak_bound`. Growth over the four tasks
  stays within 5 %.
"""
import math
import os
import re
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


def _busy_factor(seconds=3.0):
    """How much busier than its cores other jobs keep the machine as the test starts: the
    mean number of runnable threads besides this one (``procs_running`` in /proc/stat,
    sampled every 0.1 s for ``seconds``) per core, at least 1.

    Called before the test starts anything. Not the 1-minute load average: that still holds
    the suite's own load (the nodes and training of the tests just before), which must not
    widen this test's bounds; at this moment the suite runs nothing but this sampler. CI runs
    the suite alone, where this is 1 and the bounds are 2x; on a development machine shared
    with other jobs the timing bounds widen by it."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with open('/proc/stat') as f:
            running = next(int(line.split()[1]) for line in f
                           if line.startswith('procs_running'))
        samples.append(running - 1)  # this thread, reading
        time.sleep(0.1)
    return max(1.0, statistics.mean(samples) / (os.cpu_count() or 1))


def _figure(pattern):
    """The first number a README regex captures (commas removed)."""
    match = re.search(pattern, README)
    assert match, f'README.md no longer states {pattern!r}: update this test with it'
    return float(match.group(1).replace(',', ''))


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_size_and_growth_per_task(tmp_path):
    from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig
    from ros_helpers import noisy_images

    first_mb = _figure(r'checkpoint size \| ([\d.]+) MB with 1 task')
    per_task_kb = _figure(r'MB with 1 task, \+([\d.]+) kB per further task')
    # The node's default model (LearnerConfig defaults at the node's 128 px); one epoch is
    # enough, the size does not depend on training.
    learner = ContinualLearner(LearnerConfig(image_size=128, epochs=1, batch_size=8, seed=0))
    rng = np.random.default_rng(0)
    sizes = []
    colours = [(200, 40, 40), (40, 40, 200), (40, 190, 40), (210, 200, 40), (150, 40, 180),
               (40, 190, 190), (90, 90, 90), (250, 250, 250)]
    for task in range(4):
        images, labels = [], []
        for k in range(2):
            images += noisy_images(colours[2 * task + k], 6, rng=rng)
            labels += [f'class{2 * task + k}'] * 6
        learner.learn_task(images, labels)
        path = learner.save_checkpoint(str(tmp_path / f'task{task}'))
        sizes.append(os.path.getsize(path))
    growth = [(b - a) / 1024 for a, b in zip(sizes, sizes[1:])]
    print(f'\ncheckpoint sizes {sizes} bytes, growth per task {growth} kB '
          f'(README: {first_mb} MB, +{per_task_kb} kB)')
    assert sizes[0] <= 2 * first_mb * 1e6, sizes
    assert all(0 < g <= 2 * per_task_kb for g in growth), growth


# ------------------------------------------------------------------------------ load
@pytest.mark.ros
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_load_p95_latency_and_transport_loss(tmp_path):
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from ros_helpers import (camera_frames, client_in_process, noisy_images, node_process,
                             read_log, wait_until, write_params_file)

    p95_ms = _figure(r'latency receipt-to-publish, p95 \| (\d+) ms')
    lost_pct = _figure(r'\((\d+) % lost in best-effort transport')
    duration = float(os.environ.get('CBPNET_CLAIMS_LOAD_S', '12'))
    busy = _busy_factor()
    p95_bound, lost_bound = 2 * p95_ms * busy, 2 * lost_pct * busy
    ns = f'claims{os.getpid()}'
    cams = [f'/{ns}/cam{i}/image_raw' for i in range(2)] + \
        [f'/{ns}/cam{i}/image_raw/compressed' for i in range(2, 4)]
    overrides = write_params_file(tmp_path / 'load.yaml', dict(
        image_topics=cams, epochs=2, batch_size=8, min_samples_per_class=3,
        max_samples_per_class=20, max_buffer_samples=50, diagnostics_period_s=0.5,
        checkpoint_dir=str(tmp_path / 'checkpoints')))
    # The shipped configuration (128 px, sensor_data camera QoS), then the overrides.
    with node_process([ROOT / 'config' / 'cbpnet.yaml', overrides],
                      ros_args=['-r', f'__ns:=/{ns}'], log_path=tmp_path / 'node.log') as proc, \
            client_in_process(f'/{ns}/cbpnet') as c:
        assert c.call_trigger('~/clear_buffer', timeout=180).success, read_log(proc)
        rng = np.random.default_rng(0)
        c.publish_images('~/labelled_images', noisy_images((200, 40, 40), 6, rng=rng), 'red')
        c.publish_images('~/labelled_images', noisy_images((40, 40, 200), 6, rng=rng), 'blue')
        assert c.wait_for_status('cbpnet: learner',
                                 lambda level, v: int(v['buffer_samples']) == 12, 60)
        assert c.call_trigger('~/learn_task', timeout=300).success
        messages = []
        for topic, msgs in camera_frames(cams):
            messages.append((c.publisher(topic, type(msgs[0]), qos_profile_sensor_data), msgs))
            assert c.wait_for_subscribers(topic, type(msgs[0]), timeout=60)
        labelled = [c.image_msg(img, frame_id=f'stream_{k % 3}')
                    for k, img in enumerate(noisy_images((40, 190, 40), 12, rng=rng))]
        stream_pub = c.create_publisher(Image, c.resolve('~/labelled_images'), QoSProfile(
            depth=2000, reliability=ReliabilityPolicy.RELIABLE))
        assert wait_until(lambda: stream_pub.get_subscription_count() > 0, 60)
        windows = []
        # A second window only when the first breaks a bound: other jobs on the 2 shared
        # cores can spoil one window, a real regression spoils both.
        for _ in range(2):
            windows.append(_load_window(c, messages, stream_pub, labelled, duration))
            if windows[-1]['p95_ms'] <= p95_bound and windows[-1]['lost_pct'] <= lost_bound:
                break
        assert proc.poll() is None, read_log(proc)
    print(f'\nload windows: {windows} (README: {lost_pct:.0f} % lost, p95 {p95_ms:.0f} ms; '
          f'machine busy x{busy:.1f} before the test)')
    assert all(w['classified'] > 0 for w in windows), windows
    best_p95 = min(w['p95_ms'] for w in windows)
    best_lost = min(w['lost_pct'] for w in windows)
    assert best_p95 <= p95_bound, \
        f'p95 latency {best_p95} ms > 2 x {busy:.1f} x the README figure {p95_ms} ms'
    assert best_lost <= lost_bound, \
        f'{best_lost:.1f} % lost > 2 x {busy:.1f} x the README figure {lost_pct} %'


def _load_window(c, messages, stream_pub, labelled, duration):
    """Four cameras at 60 Hz, a labelled stream at 20/s and a service call every 2 s for
    ``duration`` seconds; the node's counters and p95 latency over that window."""
    _, before = c.wait_for_status('cbpnet: inference', lambda level, v: True, 30)
    stop, published = threading.Event(), [0]

    def cameras():
        tick, k = time.monotonic(), 0
        while not stop.is_set():
            for pub, msgs in messages:
                pub.publish(msgs[k % len(msgs)])
                published[0] += 1
            k += 1
            tick += 1 / 60.0
            time.sleep(max(0.0, tick - time.monotonic()))

    def labelled_stream():
        k = 0
        while not stop.is_set():
            stream_pub.publish(labelled[k % len(labelled)])
            k += 1
            time.sleep(0.05)

    threads = [threading.Thread(target=f, daemon=True) for f in (cameras, labelled_stream)]
    for thread in threads:
        thread.start()
    try:
        t0, call = time.monotonic(), 0
        while time.monotonic() - t0 < duration:
            time.sleep(2.0)
            assert c.call_trigger(('~/clear_buffer', '~/save')[call % 2], timeout=30).success
            call += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    time.sleep(1.0)
    _, after = c.wait_for_status('cbpnet: inference', lambda level, v: True, 30)
    received = int(after['frames_received']) - int(before['frames_received'])
    return {'published': published[0], 'received': received,
            'lost_pct': round(100.0 * (published[0] - received) / published[0], 1),
            'p95_ms': float(after['latency_p95_ms']),
            'classified': int(after['frames_classified']) - int(before['frames_classified'])}


# ------------------------------------------------------------------------------ soak
#: Tasks before memory is expected to be flat: the first tasks allocate the training state,
#: the undo copy of the model and the allocator's pools (measured: +150 MB over three tasks,
#: flat within +-20 MB over the next six).
WARMUP_TASKS = 3


@pytest.mark.ros
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_short_soak_memory_per_task(tmp_path):
    """What ``scripts/soak.py`` does, shortened: two cameras (raw and JPEG 320x240) at 30 Hz
    best effort and a task of two new classes every 6 s; RSS sampled every second. After
    :data:`WARMUP_TASKS`, the median RSS between two tasks is fitted against the task count:
    that slope is the growth per task."""
    from rclpy.qos import qos_profile_sensor_data

    from ros2_cbpnet.ros.image_codec import rgb_to_compressed_msg, rgb_to_image_msg
    from ros2_cbpnet.tools.synthetic import camera_frame
    from ros_helpers import (client_in_process, node_process, read_log, soak_module,
                             write_params_file)

    soak = soak_module()
    per_task_mb = _figure(r'\+0\.\d+ %\*\* \(peak \+[\d.]+ %, ([\d.]+) MB per task learned')
    measured_tasks = int(os.environ.get('CBPNET_CLAIMS_SOAK_TASKS', '4'))
    ns = f'soaktest{os.getpid()}'
    cams = [f'/{ns}/cam0/image_raw', f'/{ns}/cam1/image_raw/compressed']
    overrides = write_params_file(tmp_path / 'soak.yaml', dict(
        image_topics=cams, epochs=2, diagnostics_period_s=1.0,
        checkpoint_dir=str(tmp_path / 'checkpoints')))
    samples, tasks = [], 0  # (tasks learned so far, RSS MB)
    with node_process([ROOT / 'config' / 'cbpnet.yaml', overrides],
                      ros_args=['-r', f'__ns:=/{ns}'], log_path=tmp_path / 'node.log') as proc, \
            client_in_process(f'/{ns}/cbpnet') as c:
        assert c.call_trigger('~/clear_buffer', timeout=180).success, read_log(proc)
        streams = []
        for i, topic in enumerate(cams):
            images = [camera_frame(320, 240, 100 * i + k) for k in range(4)]
            msgs = [rgb_to_compressed_msg(img, 'jpeg') if topic.endswith('/compressed')
                    else rgb_to_image_msg(img, 'rgb8') for img in images]
            streams.append((c.publisher(topic, type(msgs[0]), qos_profile_sensor_data), msgs))
        stop = threading.Event()

        def cameras():
            tick, k = time.monotonic(), 0
            while not stop.is_set():
                for pub, msgs in streams:
                    pub.publish(msgs[k % len(msgs)])
                k += 1
                tick += 1 / 30.0
                time.sleep(max(0.0, tick - time.monotonic()))

        streamer = threading.Thread(target=cameras, daemon=True)
        streamer.start()
        rng = np.random.default_rng(0)
        next_learn = time.monotonic() + 3.0
        try:
            while tasks < WARMUP_TASKS + measured_tasks or \
                    sum(1 for k, _ in samples if k == tasks) < 4:
                samples.append((tasks, soak.rss_kb(proc.pid) / 1024))
                if time.monotonic() >= next_learn and tasks < WARMUP_TASKS + measured_tasks:
                    for k in range(2):
                        c.publish_images('~/labelled_images', soak.class_images(
                            rng.integers(20, 236, 3), 10, rng), f'soak_{tasks:03d}_{k}')
                    assert c.wait_for_status('cbpnet: learner', lambda level, v: int(
                        v['buffer_samples']) == 20, 60), read_log(proc)
                    reply = c.call_trigger('~/learn_task', timeout=300)
                    assert reply.success, reply.message
                    tasks += 1
                    next_learn = time.monotonic() + 6.0
                time.sleep(1.0)
        finally:
            stop.set()
            streamer.join(10)
        assert proc.poll() is None, read_log(proc)
    by_task = {k: statistics.median(mb for t, mb in samples if t == k)
               for k in range(WARMUP_TASKS, tasks + 1)}
    slope, stderr = _growth_per_task(by_task)
    bound_mb = _soak_bound(per_task_mb, stderr, len(by_task))
    growth_pct = 100.0 * (by_task[tasks] - by_task[WARMUP_TASKS]) / by_task[WARMUP_TASKS]
    print(f'\nsoak: median RSS MB after each task {[round(by_task.get(k, 0)) for k in by_task]}'
          f' (first {WARMUP_TASKS} tasks: warm-up, '
          f'{[round(statistics.median(mb for t, mb in samples if t == k)) for k in range(3)]}); '
          f'{slope:+.1f} +- {stderr:.1f} MB per task, bound {bound_mb:.1f} MB, '
          f'{growth_pct:+.1f} % (README: {per_task_mb} MB per task over 10 min)')
    assert min(by_task.values()) > 100  # really the node's RSS
    assert slope <= bound_mb, f'RSS grows {slope:.1f} MB per task (bound {bound_mb:.1f} MB)'
    assert growth_pct <= 5.0, f'RSS grew {growth_pct:.1f} % over {measured_tasks} tasks'


#: One-sided 99 % quantiles of Student's t by degrees of freedom (10 and more: 10's, which
#: is larger than theirs, so on the safe side).
T99 = {1: 31.82, 2: 6.965, 3: 4.541, 4: 3.747, 5: 3.365, 6: 3.143, 7: 2.998, 8: 2.896,
       9: 2.821, 10: 2.764}
#: The soak bound never exceeds this (MB per task): what +-20 MB of noise between samples
#: allows at worst over four tasks (12 MB), and well below the leak the README describes
#: (one glibc arena per executor thread, 37 MB per task).
SOAK_BOUND_CAP_MB = 15.0


def _growth_per_task(by_task):
    """Least-squares slope of RSS MB against the task count, and its standard error."""
    x = np.array(list(by_task), float)
    y = np.array(list(by_task.values()), float)
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (slope * x + intercept)
    dof = max(len(x) - 2, 1)
    stderr = math.sqrt(float(residuals @ residuals) / dof / float(((x - x.mean()) ** 2).sum()))
    return float(slope), stderr


def _soak_bound(per_task_mb, stderr, points):
    """MB per task the fitted slope may reach: three times the README's figure (a 10-minute
    run's, which this short run does not repeat) plus what this run's own noise can add to
    a slope (one-sided 99 %, t with ``points - 2`` degrees of freedom), at most
    :data:`SOAK_BOUND_CAP_MB`. A quiet run thus fails at a few MB per task; a run whose RSS
    jumps by +-20 MB between samples still fails on a leak like the README's."""
    t = T99[min(max(points - 2, 1), 10)]
    return min(SOAK_BOUND_CAP_MB, 3 * per_task_mb + t * stderr)


def test_soak_bound_tells_growth_from_noise():
    """The soak analysis on made-up medians of four tasks after warm-up (the real soak is a
    slow test): noise of the size seen here passes, a steady growth of a few MB per task
    and the README's arena leak fail."""
    per_task_mb = _figure(r'\+0\.\d+ %\*\* \(peak \+[\d.]+ %, ([\d.]+) MB per task learned')
    noise = [0.0, 14.0, -12.0, 16.0, -9.0]  # +-20 MB class noise, no trend

    def verdict(per_task, jitter):
        by_task = {3 + k: 950.0 + per_task * k + jitter[k] for k in range(5)}
        slope, stderr = _growth_per_task(by_task)
        return slope <= _soak_bound(per_task_mb, stderr, len(by_task))
    assert verdict(0.2, noise)  # the README's figure, under that noise
    assert verdict(0.2, [0.0, 0.3, -0.2, 0.1, -0.3])  # and on a quiet run
    assert not verdict(3.0, [0.0, 0.3, -0.2, 0.1, -0.3])  # 15x the claim, clearly measured
    assert not verdict(37.0, noise)  # the arena leak, under noise
    assert not verdict(37.0, [5 * v for v in noise])  # and under far more
    assert _soak_bound(per_task_mb, 100.0, 5) == SOAK_BOUND_CAP_MB
