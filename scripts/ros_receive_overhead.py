#!/usr/bin/env python3
"""What does receiving camera frames cost a Python node, per rclpy executor?

Publishes ``--cameras`` 640x480 bgr8 cameras at ``--rate-hz`` (reliable, as ``cbpnet-bench``
does) to a subscriber process that keeps only the newest message per camera, exactly like
``cbpnet_node``'s camera callbacks, and measures the subscriber's CPU time per received
message for each executor: ``multi`` (MultiThreadedExecutor with 10 threads, the node's
today), ``single`` (SingleThreadedExecutor), ``events`` (rclpy.experimental.EventsExecutor),
each also with ``raw=True`` subscriptions (serialized CDR bytes: no conversion of the 921 kB
``data`` field into a Python object). ``events`` is not in the default list: with the PyPI
Kilted wheels on this project's machine it received no message at all.

DDS stays on loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) in a domain of its own.
Example: ``.venv/bin/python scripts/ros_receive_overhead.py --seconds 10``.
"""
from __future__ import annotations

import os
import sys

from ros2_cbpnet.tools import ros_domain  # noqa: E402

ros_domain.lock_unless_set()  # a locked id: a pid-derived one collides with other runs

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

VARIANTS = ('multi', 'multi_raw', 'single', 'single_raw')


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def subscriber(variant: str, cameras: int, seconds: float) -> None:
    """Receive for ``seconds`` after the first message; print one JSON line."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node('receive_overhead')
    lock = threading.Lock()
    newest = {}
    count = [0]
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE,
                     history=HistoryPolicy.KEEP_LAST)
    raw = variant.endswith('_raw')

    def callback(i: int):
        # One parameter only: rclpy passes message info to two-parameter callbacks.
        def cb(msg):
            with lock:
                newest[i] = msg
                count[0] += 1
        return cb

    for i in range(cameras):
        node.create_subscription(Image, f'/overhead/cam{i}', callback(i), qos, raw=raw)
    kind = variant.split('_')[0]
    if kind == 'multi':
        executor = MultiThreadedExecutor(num_threads=10)
    elif kind == 'single':
        executor = SingleThreadedExecutor()
    else:
        from rclpy.experimental import EventsExecutor
        executor = EventsExecutor()
    executor.add_node(node)

    def measure() -> None:
        deadline = time.monotonic() + 30.0
        while count[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)  # past discovery and the first burst
        c0, n0, t0 = _cpu_s(), count[0], time.perf_counter()
        time.sleep(seconds)
        c1, n1, t1 = _cpu_s(), count[0], time.perf_counter()
        print(json.dumps({
            'variant': variant, 'received_per_s': round((n1 - n0) / (t1 - t0), 1),
            'cpu_cores': round((c1 - c0) / (t1 - t0), 3),
            'cpu_ms_per_message': round(1000 * (c1 - c0) / max(n1 - n0, 1), 3)}), flush=True)
        os._exit(0)  # no orderly teardown needed; the executor spins in the main thread

    threading.Thread(target=measure, daemon=True).start()
    executor.spin()  # some executors (EventsExecutor) want the main thread


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--cameras', type=int, default=4)
    p.add_argument('--rate-hz', type=float, default=30.0)
    p.add_argument('--seconds', type=float, default=10.0)
    p.add_argument('--variants', default=','.join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)}, events, events_raw")
    p.add_argument('--role', default='pub', help=argparse.SUPPRESS)
    p.add_argument('--variant', default='multi', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == 'sub':
        subscriber(args.variant, args.cameras, args.seconds)
        return 0

    import numpy as np
    import rclpy
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from ros2_cbpnet.tools.bench.timing import Pacer

    rclpy.init()
    node = rclpy.create_node('receive_overhead_pub')
    qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     history=HistoryPolicy.KEEP_LAST)
    pubs = [node.create_publisher(Image, f'/overhead/cam{i}', qos) for i in range(args.cameras)]
    msg = Image(height=480, width=640, encoding='bgr8', step=640 * 3)
    msg.data = np.random.default_rng(0).integers(0, 255, 480 * 640 * 3, dtype=np.uint8).tobytes()
    results = []
    for variant in args.variants.split(','):
        sub = subprocess.Popen([sys.executable, __file__, '--role', 'sub', '--variant', variant,
                                '--cameras', str(args.cameras), '--seconds', str(args.seconds)],
                               stdout=subprocess.PIPE, text=True)
        while any(pub.get_subscription_count() == 0 for pub in pubs):
            time.sleep(0.05)
        time.sleep(0.3)
        pacer, k = Pacer(args.rate_hz, args.cameras), 0
        while sub.poll() is None:
            pubs[k % args.cameras].publish(msg)
            k += 1
            pacer.wait()
        line = sub.stdout.read().strip().splitlines()
        result = json.loads(line[-1]) if line else {'variant': variant, 'error': 'no output'}
        results.append(result)
        print(json.dumps(result), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
