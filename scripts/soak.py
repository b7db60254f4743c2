#!/usr/bin/env python3
"""Soak test of ``cbpnet_node``: memory over time while cameras stream and tasks are learned.

Runs the node as a subprocess (the shipped ``config/cbpnet.yaml`` plus a few overrides) for
``--minutes``, streams synthetic camera frames on ``--cameras`` topics (raw and JPEG
alternately) at ``--rate-hz``, and every ``--learn-every-s`` seconds teaches two new classes
through ``~/labelled_images`` and calls ``~/learn_task`` (small tasks, new classes each time).
The node's resident memory (VmRSS from /proc/<pid>/status) is sampled every
``--sample-every-s`` seconds.

Reported: RSS over time, the growth after warm-up (the first 2 minutes, or the first third of
runs shorter than 6 minutes) in percent, its slope, the tasks learned and the node's counters.
Each learned task legitimately adds a little memory (one E-prompt and key, head rows and
class statistics, a few kB to a few hundred kB), so the growth per learned task is reported
too. Results go to ``--out`` (JSON) and, with ``--plot``, to a PNG.

Exit status: 0; 1 when the node died (or did not stop cleanly); 3 when ``--max-growth-pct``
is given and exceeded.

DDS stays on this machine (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) in a ROS domain of its
own, locked for the run by :mod:`ros2_cbpnet.tools.ros_domain` (so two runs never share one),
unless ROS_DOMAIN_ID is set. The node runs under the namespace ``/soak<pid>``, so its diagnostics
statuses are named ``soak<pid>/cbpnet: <task>`` (``node_diagnostics.status_prefix``).
Example: ``make soak SOAK_ARGS="--minutes 10 --plot results/soak.png"``.
"""
from __future__ import annotations

import os
import sys


# Before rclpy is imported: loopback discovery, a domain of our own (docs/environment.md).
if __name__ == '__main__':  # importing the module (tests use its helpers) changes nothing
    from ros2_cbpnet.tools import ros_domain
    ros_domain.lock_unless_set()  # held until this process exits; the node inherits the id
os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)
os.environ['HF_HUB_OFFLINE'] = '1'

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
import yaml  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.callback_groups import ReentrantCallbackGroup  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import (QoSProfile, ReliabilityPolicy, qos_profile_sensor_data)  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from ros2_cbpnet.ros.image_codec import rgb_to_compressed_msg, rgb_to_image_msg  # noqa: E402
from ros2_cbpnet.ros.diagnostics import status_prefix  # noqa: E402
from ros2_cbpnet.tools.synthetic import camera_frame  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = f'/soak{os.getpid()}'
#: The node's status names start with this and ': ' (``soak<pid>/cbpnet: learner``).
STATUS_PREFIX = status_prefix(f'{NAMESPACE}/cbpnet')


def rss_kb(pid: int) -> Optional[int]:
    """VmRSS of a process in kB, None when it is gone."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def class_images(colour: np.ndarray, count: int, rng: np.random.Generator,
                 size: int = 64) -> List[np.ndarray]:
    return [np.clip(rng.normal(colour, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            for _ in range(count)]


class Client(Node):
    """Publishers, service clients and the latest diagnostics of the node under test."""

    def __init__(self, context: Context, target: str, cameras: List[str]) -> None:
        super().__init__(f'cbpnet_soak_client_{os.getpid()}', context=context)
        self.target = target
        group = ReentrantCallbackGroup()
        self.camera_pubs = [self.create_publisher(
            CompressedImage if t.endswith('/compressed') else Image, t,
            qos_profile_sensor_data) for t in cameras]
        self.labelled_pub = self.create_publisher(Image, f'{target}/labelled_images', QoSProfile(
            depth=2000, reliability=ReliabilityPolicy.RELIABLE))
        self.clients_ = {name: self.create_client(Trigger, f'{target}/{name}',
                                                  callback_group=group)
                         for name in ('learn_task', 'clear_buffer', 'save')}
        self.lock = threading.Lock()
        self.status: Dict[str, Dict[str, str]] = {}
        self.create_subscription(DiagnosticArray, '/diagnostics', self._diagnostics,
                                 QoSProfile(depth=20), callback_group=group)

    def _diagnostics(self, msg: DiagnosticArray) -> None:
        with self.lock:
            for status in msg.status:
                if status.name.startswith(f'{STATUS_PREFIX}:'):
                    self.status[status.name] = {kv.key: kv.value for kv in status.values}

    def value(self, status: str, key: str, default: Any = None) -> Any:
        with self.lock:
            return self.status.get(f'{STATUS_PREFIX}: {status}', {}).get(key, default)

    def call(self, name: str, timeout: float) -> Optional[Trigger.Response]:
        client = self.clients_[name]
        if not client.wait_for_service(timeout_sec=timeout):
            return None
        future = client.call_async(Trigger.Request())
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout):
            return None
        return future.result()


def start_node(args: argparse.Namespace, cameras: List[str], checkpoint_dir: str,
               workdir: Path, log_path: Path) -> subprocess.Popen:
    overrides = {
        'image_topics': cameras, 'checkpoint_dir': checkpoint_dir, 'epochs': args.epochs,
        'batch_size': 8, 'min_samples_per_class': 3, 'diagnostics_period_s': 1.0,
    }
    if args.image_size:
        overrides['image_size'] = args.image_size
    params = workdir / 'soak_params.yaml'
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': overrides}}))
    executable = Path(sys.executable).parent / 'cbpnet_node'
    cmd = [str(executable)] if executable.exists() else [sys.executable, '-m',
                                                         'ros2_cbpnet.ros.node']
    cmd += ['--ros-args', '--params-file', str(args.config), '--params-file', str(params),
            '-r', f'__ns:={NAMESPACE}']
    log = open(log_path, 'wb')
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(os.environ,
                                                                   PYTHONUNBUFFERED='1'))
    finally:
        log.close()


def analyse(samples: List[Dict[str, Any]], duration_s: float, warmup_s: float
            ) -> Dict[str, Any]:
    """Growth of RSS after warm-up: final (median of the last 3 samples) against the end of
    warm-up (median of the last 3 samples of it), the maximum, and a least-squares slope."""
    warm = [s for s in samples if s['t'] <= warmup_s]
    after = [s for s in samples if s['t'] > warmup_s]
    if len(warm) < 1 or len(after) < 2:
        return {'error': 'too few samples after warm-up'}
    base = statistics.median(s['rss_mb'] for s in warm[-3:])
    final = statistics.median(s['rss_mb'] for s in after[-3:])
    peak = max(s['rss_mb'] for s in after)
    t = np.array([s['t'] for s in after]) / 60.0
    slope = float(np.polyfit(t, [s['rss_mb'] for s in after], 1)[0]) if len(after) > 2 else 0.0
    tasks_in_window = after[-1]['tasks'] - warm[-1]['tasks']
    growth_mb = final - base
    return {
        'warmup_s': warmup_s, 'rss_mb_start': samples[0]['rss_mb'],
        'rss_mb_after_warmup': round(base, 1), 'rss_mb_final': round(final, 1),
        'rss_mb_peak_after_warmup': round(peak, 1),
        'growth_mb': round(growth_mb, 1), 'growth_pct': round(100.0 * growth_mb / base, 2),
        'peak_growth_pct': round(100.0 * (peak - base) / base, 2),
        'slope_mb_per_min': round(slope, 3),
        'tasks_after_warmup': tasks_in_window,
        'growth_mb_per_task_after_warmup': round(growth_mb / tasks_in_window, 2)
        if tasks_in_window else None,
    }


def plot(samples: List[Dict[str, Any]], learns: List[Dict[str, Any]], summary: Dict[str, Any],
         path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.plot([s['t'] / 60 for s in samples], [s['rss_mb'] for s in samples], label='node RSS')
    for i, learn in enumerate(learns):
        ax.axvline(learn['t'] / 60, color='grey', alpha=0.3, lw=0.8,
                   label='learn_task' if i == 0 else None)
    ax.axvspan(0, summary['warmup_s'] / 60, color='orange', alpha=0.1, label='warm-up')
    ax.set_xlabel('minutes')
    ax.set_ylabel('MB')
    ax.set_title(f"cbpnet_node soak: {summary.get('growth_pct', '?')} % after warm-up, "
                 f"{len(learns)} tasks")
    ax.legend(loc='lower right')
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--minutes', type=float, default=10.0, help='length of the run')
    parser.add_argument('--learn-every-s', type=float, default=60.0,
                        help='a learn_task (2 new classes) this often')
    parser.add_argument('--cameras', type=int, default=2, help='camera topics')
    parser.add_argument('--rate-hz', type=float, default=30.0, help='frames/s per camera')
    parser.add_argument('--width', type=int, default=320)
    parser.add_argument('--height', type=int, default=240)
    parser.add_argument('--samples-per-class', type=int, default=10)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--image-size', type=int, default=0,
                        help='network input size; 0 = the config file\'s')
    parser.add_argument('--sample-every-s', type=float, default=5.0, help='RSS sampling')
    parser.add_argument('--config', default=str(ROOT / 'config' / 'cbpnet.yaml'))
    parser.add_argument('--checkpoint-dir', default='',
                        help='default: a temporary directory, removed afterwards')
    parser.add_argument('--out', default=str(ROOT / 'results' / 'soak.json'))
    parser.add_argument('--plot', default='', help='PNG of RSS over time')
    parser.add_argument('--log', default='', help='node output (default: next to --out)')
    parser.add_argument('--max-growth-pct', type=float, default=None,
                        help='exit 3 when the growth after warm-up exceeds this')
    args = parser.parse_args(argv)

    duration = args.minutes * 60.0
    warmup = 120.0 if duration >= 360.0 else duration / 3.0
    workdir = Path(tempfile.mkdtemp(prefix='cbpnet-soak-'))
    checkpoint_dir = args.checkpoint_dir or str(workdir / 'checkpoints')
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log) if args.log else out.with_suffix('.log')
    cameras = [f'{NAMESPACE}/cam{i}/image_raw' + ('/compressed' if i % 2 else '')
               for i in range(args.cameras)]
    print(f'soak: {args.minutes} min, {args.cameras} cameras at {args.rate_hz} Hz, learn every '
          f'{args.learn_every_s} s, ROS_DOMAIN_ID={os.environ["ROS_DOMAIN_ID"]}, node log '
          f'{log_path}', flush=True)

    proc = start_node(args, cameras, checkpoint_dir, workdir, log_path)
    context = Context()
    rclpy.init(context=context)
    client = Client(context, f'{NAMESPACE}/cbpnet', cameras)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    executor.add_node(client)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    stop = threading.Event()
    samples: List[Dict[str, Any]] = []
    learns: List[Dict[str, Any]] = []
    published = {'frames': 0}
    died = False
    code: Optional[int] = None
    try:
        if client.call('clear_buffer', timeout=300) is None:
            print('soak: the node did not come up', file=sys.stderr)
            died = True
            return 1
        frames = []
        for i, topic in enumerate(cameras):
            images = [camera_frame(args.width, args.height, 100 * i + k) for k in range(4)]
            msgs = [rgb_to_compressed_msg(img, 'jpeg') if topic.endswith('/compressed')
                    else rgb_to_image_msg(img, 'rgb8') for img in images]
            for msg in msgs:
                msg.header.frame_id = f'cam{i}'
            frames.append(msgs)

        def stream() -> None:
            period, tick, k = 1.0 / args.rate_hz, time.monotonic(), 0
            while not stop.is_set():
                for pub, msgs in zip(client.camera_pubs, frames):
                    msg = msgs[k % len(msgs)]
                    msg.header.stamp = client.get_clock().now().to_msg()
                    pub.publish(msg)
                    published['frames'] += 1
                k += 1
                tick += period
                delay = tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    tick = time.monotonic()  # cannot keep up: do not burst to catch up

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        rng = np.random.default_rng(0)
        t0 = time.monotonic()
        next_sample, next_learn, task = t0, t0 + min(10.0, args.learn_every_s), 0
        while time.monotonic() - t0 < duration:
            now = time.monotonic()
            if proc.poll() is not None:
                died = True
                print(f'soak: the node died (exit code {proc.returncode})', file=sys.stderr)
                break
            if now >= next_sample:
                kb = rss_kb(proc.pid)
                if kb is not None:
                    samples.append({'t': round(now - t0, 1), 'rss_mb': round(kb / 1024, 1),
                                    'tasks': int(client.value('learner', 'tasks', 0) or 0)})
                    print(f"soak: t={now - t0:6.0f} s rss={kb / 1024:7.1f} MB tasks="
                          f"{samples[-1]['tasks']}", flush=True)
                next_sample += args.sample_every_s
            if now >= next_learn:
                labels = [f'soak_{task:03d}_{c}' for c in 'ab']
                for label in labels:
                    colour = rng.integers(20, 236, 3)
                    for img in class_images(colour, args.samples_per_class, rng):
                        msg = rgb_to_image_msg(img, 'rgb8')
                        msg.header.frame_id = label
                        client.labelled_pub.publish(msg)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # until the samples are buffered
                    if int(client.value('learner', 'buffer_samples', 0) or 0) >= \
                            2 * args.samples_per_class:
                        break
                    time.sleep(0.2)
                started = time.monotonic()
                reply = client.call('learn_task', timeout=600)
                ok = reply is not None and reply.success
                learns.append({'t': round(started - t0, 1), 'task': task, 'success': ok,
                               'duration_s': round(time.monotonic() - started, 2),
                               'message': reply.message[:300] if reply else 'no answer'})
                print(f"soak: learn_task {labels}: {'ok' if ok else 'FAILED'} in "
                      f"{learns[-1]['duration_s']} s", flush=True)
                if not ok:
                    client.call('clear_buffer', timeout=30)
                task += 1
                next_learn = time.monotonic() + args.learn_every_s
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        time.sleep(2.0)  # one more diagnostics period, so the counters below are current
        counters = {k: client.value('inference', k) for k in (
            'frames_received', 'frames_classified', 'dropped_frames', 'rejected',
            'latency_p95_ms')}
        counters.update({k: client.value('learner', k) for k in (
            'tasks', 'buffer_samples', 'buffer_dropped')})
        executor.shutdown(timeout_sec=10)
        spin.join(10)
        client.destroy_node()
        rclpy.try_shutdown(context=context)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:  # did not stop cleanly: counts as a failure
                proc.kill()
                proc.wait(10)
                code = -signal.SIGKILL
        else:
            code = proc.returncode
    if not args.checkpoint_dir:
        shutil.rmtree(workdir, ignore_errors=True)

    summary = analyse(samples, elapsed, warmup)
    summary.update({
        'minutes': round(elapsed / 60, 2), 'died': died, 'exit_code': code,
        'learn_tasks': len(learns), 'learn_failures': sum(not x['success'] for x in learns),
        'published_fps': round(published['frames'] / max(elapsed, 1e-6), 1),
        'node_counters': counters,
    })
    result = {'args': vars(args), 'summary': summary, 'samples': samples, 'learns': learns}
    out.write_text(json.dumps(result, indent=1))
    if args.plot and samples and 'warmup_s' in summary:
        plot(samples, learns, summary, args.plot)
    print('soak summary: ' + json.dumps(summary), flush=True)
    print(f'soak: wrote {out}' + (f' and {args.plot}' if args.plot else ''), flush=True)
    if died or code not in (0, None):
        return 1
    if args.max_growth_pct is not None and summary.get('growth_pct', 0) > args.max_growth_pct:
        return 3
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
