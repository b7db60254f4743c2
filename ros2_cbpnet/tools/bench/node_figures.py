"""Node figures of ``cbpnet-bench``: ``cbpnet_node`` as a subprocess, fed through real DDS.

The bench teaches the node one task through ``~/labelled_images`` and ``~/learn_task``, then
publishes cameras of 640x480 frames at 30 Hz each (evenly spread phases), raw ``bgr8``
``Image`` on ``/bench/cam<i>`` and JPEG ``CompressedImage`` on ``/bench/cam<i>/compressed``,
one configuration after the other (by default 1 raw camera, 4 raw, 4 compressed). For each
configuration and each camera: frames offered, the fraction classified, and the latency from
the image stamp (set at publishing) to the prediction's arrival here, p50/p95. With
``--node-profile DIR`` py-spy samples the node during every configuration and
:mod:`.node_profile` turns the samples into a per-thread breakdown.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..node_runner import log_tail, node_command, node_environment, stop_process
from .timing import (CAMERA_RATE_HZ, FRAME_HW, Pacer, log, percentiles, synthetic_frame,
                     synthetic_task)
from .memory import RSSSampler, proc_status_kb
from .node_profile import breakdown_from_raw

#: JPEG quality of the compressed camera frames (a typical camera driver setting).
JPEG_QUALITY = 80


class _NodeBench:
    """The bench side of the node measurement: an rclpy node in its own context."""

    def __init__(self, ns: str = '/cbpnet') -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from std_msgs.msg import String

        self.ns = ns
        self.context = rclpy.Context()
        rclpy.init(args=[], context=self.context)  # not our argv: no remap rules
        self.node = rclpy.create_node('cbpnet_bench', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.predictions: List[Tuple[float, str]] = []
        self.diagnostics: Dict[str, Dict[str, str]] = {}
        self._string = String
        self._thread = threading.Thread(target=self._spin, daemon=True, name='cbpnet-bench-spin')
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # noqa: BLE001 - shutdown races end the loop
                if self._stop.is_set():
                    return
                raise

    def _on_prediction(self, msg) -> None:
        # Parsed later: the receiving thread stays cheap, so it does not delay the next one.
        now = time.time()
        with self._lock:
            self.predictions.append((now, msg.data))

    def _on_diagnostics(self, msg) -> None:
        for st in msg.status:
            if st.name.startswith('cbpnet:'):
                self.diagnostics[st.name] = {kv.key: kv.value for kv in st.values}

    def subscribe_outputs(self, timeout_s: float) -> str:
        """Subscribe to the predictions with the publisher's reliability; returns it."""
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

        topic = f'{self.ns}/predictions'
        reliability = ReliabilityPolicy.RELIABLE
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            infos = self.node.get_publishers_info_by_topic(topic)
            if infos:
                if all(i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
                       for i in infos):
                    reliability = ReliabilityPolicy.BEST_EFFORT
                break
            time.sleep(0.1)
        qos = QoSProfile(depth=500, history=HistoryPolicy.KEEP_LAST, reliability=reliability)
        self.node.create_subscription(self._string, topic, self._on_prediction, qos)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        return reliability.name.lower()

    def take_predictions(self) -> List[Tuple[float, Dict[str, Any]]]:
        """Predictions received since the last call, as (arrival time, parsed JSON)."""
        with self._lock:
            raw, self.predictions = self.predictions, []
        out = []
        for now, text in raw:
            try:
                out.append((now, json.loads(text)))
            except ValueError:
                continue
        return out

    def close(self) -> None:
        """Stop spinning and shut this context down."""
        import rclpy

        self._stop.set()
        self._thread.join(timeout=5.0)
        with contextlib.suppress(Exception):
            self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        with contextlib.suppress(Exception):
            rclpy.shutdown(context=self.context)


def _wait(cond: Callable[[], bool], timeout_s: float, proc: subprocess.Popen, what: str,
          log_path: str, period_s: float = 0.05) -> float:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f'cbpnet_node exited ({proc.returncode}) while waiting for '
                               f'{what}; its log ends with:\n{log_tail(log_path)}')
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f'timed out after {timeout_s:.0f} s waiting for {what}; node log '
                               f'ends with:\n{log_tail(log_path)}')
        time.sleep(period_s)
    return time.monotonic() - t0


def _stamp(msg) -> None:
    ns = time.time_ns()
    msg.header.stamp.sec, msg.header.stamp.nanosec = ns // 1_000_000_000, ns % 1_000_000_000


def _write_params(path: str, params: Dict[str, Any]) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.write('cbpnet:\n  ros__parameters:\n')
        for k, v in params.items():
            f.write(f'    {k}: {json.dumps(v)}\n')  # JSON scalars/lists are YAML flow values


class _Profiler:
    """py-spy sampling the node during one camera configuration (``--node-profile``)."""

    def __init__(self, directory: str, pid: int, py_spy: str) -> None:
        self.directory, self.pid, self.py_spy = directory, pid, py_spy
        self.proc: Optional[subprocess.Popen] = None
        self.path = ''
        self.rate_hz = 100.0

    def start(self, name: str, seconds: float) -> None:
        self.path = os.path.join(self.directory, f'{name}.raw.txt')
        cmd = [self.py_spy, 'record', '--pid', str(self.pid), '--duration',
               str(max(1, int(seconds))), '--rate', str(int(self.rate_hz)), '--format',
               'raw', '--threads', '--nonblocking', '--output', self.path]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)

    def finish(self, frames: int) -> Optional[Dict[str, Any]]:
        if self.proc is None:
            return None
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            return {'error': 'py-spy did not finish'}
        self.proc = None
        if not os.path.exists(self.path):
            return {'error': f'py-spy wrote nothing: {err.decode(errors="replace")[-300:]}'}
        return {'raw': self.path, **breakdown_from_raw(self.path, self.rate_hz, frames)}


def _camera_msgs(cams: int) -> Tuple[List[List[Any]], List[List[Any]], int]:
    """Two alternating frames per camera, raw bgr8 and JPEG; and the mean JPEG bytes."""
    from ...ros.image_codec import rgb_to_compressed_msg, rgb_to_image_msg

    rng = np.random.default_rng(2)
    # Mild sensor noise: JPEG of heavy uniform noise would be far larger than a camera's.
    frames = [[synthetic_frame(rng, FRAME_HW, 300 + 2 * c + j, noise=12) for j in range(2)]
              for c in range(cams)]
    raw = [[rgb_to_image_msg(f, 'bgr8') for f in fs] for fs in frames]
    jpeg = [[rgb_to_compressed_msg(f, 'jpeg', quality=JPEG_QUALITY) for f in fs]
            for fs in frames]
    jpeg_bytes = int(np.mean([len(m.data) for ms in jpeg for m in ms]))
    return raw, jpeg, jpeg_bytes


def node_section(args) -> Dict[str, Any]:
    """cbpnet_node in a subprocess, fed by real DDS from this process."""
    env = node_environment()
    if args.threads:
        env['OMP_NUM_THREADS'] = str(args.threads)
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image
    from std_srvs.srv import Trigger

    from ...ros.image_codec import rgb_to_image_msg

    runs: List[Tuple[int, str]] = [(n, 'raw') for n in args.node_cameras]
    runs += [(n, 'compressed') for n in args.node_compressed_cameras]
    cams = max(n for n, _ in runs)
    raw_topics = [f'/bench/cam{i}' for i in range(cams)]
    jpeg_topics = [f'/bench/cam{i}/compressed' for i in range(cams)]
    used = set()
    for n, kind in runs:
        used.update((raw_topics if kind == 'raw' else jpeg_topics)[:n])
    topics = [t for t in raw_topics + jpeg_topics if t in used]
    tmp = tempfile.mkdtemp(prefix='cbpnet-bench-node-')
    params = {
        'backbone': args.backbone, 'device': args.device, 'image_size': args.image_size,
        'image_topics': topics, 'image_qos': args.node_image_qos,
        'checkpoint_dir': os.path.join(tmp, 'checkpoints'), 'epochs': 1,
        'min_samples_per_class': 2, 'diagnostics_period_s': 1.0,
        'runtime': getattr(args, 'runtime', 'auto'),
    }
    if args.threads:
        params['inference_threads'] = args.threads
    if args.backbone_checkpoint:
        params['backbone_checkpoint'] = args.backbone_checkpoint
    if args.precision != 'fp32':
        params['precision'] = args.precision
    params_file = os.path.join(tmp, 'params.yaml')
    _write_params(params_file, params)
    log_path = os.path.join(tmp, 'node.log')
    cmd = node_command(params_file, args.node_command)
    out: Dict[str, Any] = {'params': params, 'command': cmd, 'log': log_path,
                           'ros_domain_id': int(env['ROS_DOMAIN_ID'])}
    profiler_exe = ''
    if args.node_profile:
        profiler_exe = shutil.which(args.py_spy) or ''
        if not profiler_exe:
            raise RuntimeError(f'--node-profile needs py-spy; {args.py_spy!r} was not found '
                               '(pip install py-spy, or give --py-spy PATH)')
        os.makedirs(args.node_profile, exist_ok=True)
    log(f'starting {" ".join(cmd)} (ROS_DOMAIN_ID={env["ROS_DOMAIN_ID"]}, log {log_path})')
    t_start = time.monotonic()
    with open(log_path, 'wb') as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    sampler = RSSSampler(proc.pid)
    sampler.start()
    bench = None
    try:
        bench = _NodeBench()
        node = bench.node
        client = node.create_client(Trigger, '/cbpnet/learn_task')
        _wait(lambda: client.service_is_ready(), args.node_timeout_s, proc,
              'the /cbpnet/learn_task service', log_path)
        out['startup_s'] = round(time.monotonic() - t_start, 2)
        out['predictions_qos'] = bench.subscribe_outputs(5.0)

        # ---- teach one task through the topics and the service
        sampler.phase = 'learning'
        rng = np.random.default_rng(1)
        per_class = 20
        images, labels = synthetic_task(rng, ['bench_a', 'bench_b'], 2 * per_class, FRAME_HW,
                                        distinct_per_class=per_class)
        teach_qos = QoSProfile(depth=len(images), history=HistoryPolicy.KEEP_LAST,
                               reliability=ReliabilityPolicy.RELIABLE,
                               durability=DurabilityPolicy.VOLATILE)
        teach_pub = node.create_publisher(Image, '/cbpnet/labelled_images', teach_qos)
        _wait(lambda: teach_pub.get_subscription_count() > 0, 30.0, proc,
              'the labelled_images subscription', log_path)
        time.sleep(0.3)  # the match is seen here before the reader is fully set up
        for img, label in zip(images, labels):
            msg = rgb_to_image_msg(img, 'bgr8')
            msg.header.frame_id = label
            _stamp(msg)
            teach_pub.publish(msg)
            time.sleep(0.01)
        time.sleep(1.0)
        reply, t_learn = None, time.monotonic()
        for attempt in range(10):
            future = client.call_async(Trigger.Request())
            _wait(future.done, args.node_timeout_s, proc, 'the learn_task reply', log_path)
            reply = future.result()
            if reply.success:
                break
            log(f'learn_task attempt {attempt + 1}: {reply.message}; retrying')
            time.sleep(1.0)
        if reply is None or not reply.success:
            raise RuntimeError(f'learn_task failed: {reply.message if reply else "no reply"}')
        out['learn_task_s'] = round(time.monotonic() - t_learn, 2)
        try:
            out['learn_task'] = json.loads(reply.message)
        except ValueError:
            out['learn_task'] = reply.message
        out['teach_images'] = len(images)

        # ---- cameras
        cam_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE)
        raw_msgs, jpeg_msgs, jpeg_bytes = _camera_msgs(cams)
        pubs = {t: node.create_publisher(CompressedImage if t.endswith('/compressed') else Image,
                                         t, cam_qos) for t in topics}
        _wait(lambda: all(p.get_subscription_count() > 0 for p in pubs.values()), 30.0, proc,
              'the camera subscriptions', log_path)
        time.sleep(0.3)
        out['jpeg_bytes_mean'] = jpeg_bytes
        out['jpeg_quality'] = JPEG_QUALITY
        out['runs'] = {}
        warm_s = min(3.0, max(1.0, args.node_seconds / 5))
        profiler = _Profiler(args.node_profile, proc.pid, profiler_exe) if profiler_exe \
            else None
        for n_cams, kind in runs:
            name = f'{n_cams}_{kind}'
            sampler.phase = f'inference_{name}'
            names = (raw_topics if kind == 'raw' else jpeg_topics)[:n_cams]
            msgs = raw_msgs if kind == 'raw' else jpeg_msgs
            run = _run_cameras(bench, [pubs[t] for t in names], names, msgs, warm_s,
                               args.node_seconds, proc, log_path, profiler, name)
            run['kind'] = kind
            out['runs'][name] = run
            log(f'node, {n_cams} {kind} camera(s): {run["classified_fraction"]:.3f} of '
                f'{run["published_fps"]:.1f} frames/s classified')
        out['diagnostics'] = bench.diagnostics
        out['node_vm_hwm_mb'] = round((proc_status_kb(proc.pid, 'VmHWM') or 0) / 1024, 1)
    finally:
        sampler.stop()
        out['stop'] = stop_process(proc)
        if bench is not None:
            bench.close()
    out['node_rss_peak_mb'] = {k: round(v / 1024, 1) for k, v in sampler.peaks_kb.items()}
    if out['stop']['signal'] != 'SIGINT' or out['stop']['exit_code'] not in (0, -2, 130):
        out['log_tail'] = log_tail(log_path, 20)
    return out


def _run_cameras(bench: _NodeBench, pubs: Sequence[Any], names: Sequence[str], msgs,
                 warm_s: float, measure_s: float, proc: subprocess.Popen, log_path: str,
                 profiler: Optional[_Profiler], run_name: str) -> Dict[str, Any]:
    """Publish ``len(pubs)`` staggered cameras at 30 Hz; count predictions of the window."""
    n_cams = len(pubs)
    published = [0] * n_cams
    bench.take_predictions()
    t_begin = time.perf_counter()
    t_measure = t_begin + warm_s
    t_end = t_measure + measure_s
    pacer, k = Pacer(CAMERA_RATE_HZ, n_cams), 0
    wall_measure = wall_end = None
    while True:
        now = time.perf_counter()
        if now >= t_end:
            wall_end = time.time()
            break
        if wall_measure is None and now >= t_measure:
            wall_measure = time.time()
            published = [0] * n_cams
            if profiler is not None:
                profiler.start(run_name, measure_s)
        cam = k % n_cams
        msg = msgs[cam][(k // n_cams) % 2]
        _stamp(msg)
        msg.header.frame_id = f'cam{cam}:{k // n_cams}'
        pubs[cam].publish(msg)
        published[cam] += 1
        k += 1
        pacer.wait()
        if k % 30 == 0 and proc.poll() is not None:
            raise RuntimeError(f'cbpnet_node exited ({proc.returncode}); log:\n'
                               f'{log_tail(log_path)}')
    time.sleep(1.5)  # let the predictions of the last frames arrive
    preds = bench.take_predictions()
    duration = wall_end - wall_measure
    per_cam: Dict[str, Dict[str, List[float]]] = {}
    late = 0
    for recv, p in preds:
        stamp = p.get('stamp') or {}
        t_stamp = float(stamp.get('sec', 0)) + float(stamp.get('nanosec', 0)) * 1e-9
        if not wall_measure <= t_stamp < wall_end:
            continue  # a warm-up frame, or not one of ours
        d = per_cam.setdefault(str(p.get('source', '?')), {'node': [], 'e2e': []})
        if isinstance(p.get('latency_ms'), (int, float)):
            d['node'].append(float(p['latency_ms']))
        d['e2e'].append((recv - t_stamp) * 1000.0)
        late += recv > wall_end
    cameras = {}
    for i, topic in enumerate(names):
        d = per_cam.get(topic, {'node': [], 'e2e': []})
        cameras[topic] = {
            'offered_fps': round(published[i] / duration, 2),
            'classified_fps': round(len(d['e2e']) / duration, 2),
            'classified_fraction': round(len(d['e2e']) / published[i], 3) if published[i]
            else 0.0,
            'e2e_latency_ms': percentiles(d['e2e']),
            'node_latency_ms': percentiles(d['node']),
        }
    classified = sum(len(d['e2e']) for d in per_cam.values())
    total_pub = sum(published)
    all_e2e = [x for d in per_cam.values() for x in d['e2e']]
    all_node = [x for d in per_cam.values() for x in d['node']]
    out = {
        'cameras': n_cams, 'seconds': round(duration, 2),
        'published_fps': round(total_pub / duration, 2),
        'classified_fps': round(classified / duration, 2),
        'classified_fraction': round(classified / total_pub, 3) if total_pub else 0.0,
        'per_camera': cameras,
        'node_latency_ms': percentiles(all_node),
        'e2e_latency_ms': percentiles(all_e2e),
        'predictions_after_window': late,
    }
    if profiler is not None:
        out['profile'] = profiler.finish(classified)
    return out
