#!/usr/bin/env python3
"""Figures of the fleet (README, "Fleet"): bytes on the wire, merge time and memory at the
default feature, and a simulated fleet of nodes on this machine.

``--part wire`` (no ROS): the embedded Lite0 at the node's 128 px (1,984-d multi-layer
query); for tasks of two classes with N images per class, the bytes of the contribution in
its compact exact form and with the full packed scatter, per task and per class, the time
one ``import_contribution`` takes on another learner, and the resident memory it adds.

``--part fleet`` (ROS 2, loopback, a locked domain): ``--robots`` node processes (fleet
export and import on), each taught two classes of its own (noisy colour images), all
``learn_task`` calls at once; the time until every robot predicts every class, and the bytes
every robot published.

Example::

    .venv/bin/python scripts/fleet_figures.py --part wire --out results/fleet_wire.json
    .venv/bin/python scripts/fleet_figures.py --part fleet --robots 10 --out results/fleet.json
"""
from __future__ import annotations

import os
import sys


if __name__ == '__main__':  # a locked domain of its own, DDS on loopback
    from ros2_cbpnet.tools import ros_domain
    ros_domain.lock_unless_set()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List  # noqa: E402

import numpy as np  # noqa: E402


def _rss_mb() -> float:
    with open('/proc/self/status', encoding='ascii') as fh:
        for line in fh:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def _colour_task(rng: np.random.Generator, classes: List[str], per_class: int, first: int,
                 size: int = 96):
    images, labels = [], []
    for k, name in enumerate(classes):
        hue = (first + k) * 0.137 % 1.0
        colour = 255 * np.array([abs(np.sin(6.28 * hue)), abs(np.cos(6.28 * hue)), hue])
        for _ in range(per_class):
            images.append(np.clip(rng.normal(colour, 40.0, (size, size, 3)), 0, 255)
                          .astype(np.uint8))
            labels.append(name)
    return images, labels


def wire_part(args: argparse.Namespace) -> Dict[str, Any]:
    """Bytes per task and class, merge time and memory at the default feature."""
    import torch

    from ros2_cbpnet.learning import fleet
    from ros2_cbpnet.learning.learner import ContinualLearner, LearnerConfig
    from ros2_cbpnet.learning.model import load_backbone

    torch.set_num_threads(args.threads)
    backbone = load_backbone('tf_efficientnet_lite0', image_size=128)
    rng = np.random.default_rng(0)
    rows = []
    for k, per_class in enumerate(args.per_class):
        sender = ContinualLearner(LearnerConfig(image_size=128, device='cpu'), backbone=backbone)
        images, labels = _colour_task(rng, [f'c{k}a', f'c{k}b'], per_class, 2 * k)
        c = sender.learn_task(images, labels, export=('robot_a', 1)).contribution
        compact = fleet.encode(c)
        packed = fleet.encode(dataclasses.replace(c, scatter_form='packed',
                                                  scatter=_packed(c)))
        receiver = ContinualLearner(LearnerConfig(image_size=128, device='cpu'),
                                    backbone=backbone)
        before = _rss_mb()
        started = time.perf_counter()
        decoded = fleet.decode(compact)
        receiver.import_contribution(decoded)
        merge_s = time.perf_counter() - started
        rows.append({
            'images_per_class': per_class, 'classes': 2, 'scatter_form': c.scatter_form,
            'factor_rows': int(c.scatter.shape[0]) if c.scatter_form == 'factor' else None,
            'bytes_per_task': len(compact), 'bytes_per_class': len(compact) // 2,
            'bytes_per_task_packed': len(packed), 'decode_and_merge_s': round(merge_s, 3),
            'rss_added_mb': round(_rss_mb() - before, 1)})
        print(f"{per_class:>6} images/class: {len(compact):>10,} bytes ({c.scatter_form}), "
              f"packed {len(packed):>10,}; decode + merge {merge_s:.2f} s", flush=True)
    return {'feature_dim': int(backbone.query_dim(backbone.default_query_layers())),
            'image_size': 128, 'rows': rows}


def _packed(c: Any) -> np.ndarray:
    from ros2_cbpnet.learning import fleet
    d = c.dim
    return fleet.scatter_matrix(c)[np.triu_indices(d)].astype(np.float32)


# ------------------------------------------------------------------------------ fleet
def fleet_part(args: argparse.Namespace) -> Dict[str, Any]:
    """Robots as node processes, two classes each, until every robot knows every class."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from ros2_cbpnet.ros.image_codec import rgb_to_image_msg

    work = tempfile.mkdtemp(prefix='cbpnet-fleet-')
    topic = f'/cbpnet_fleet_sim_{os.getpid()}/classes'
    exe = os.path.join(os.path.dirname(sys.executable), 'cbpnet_node')
    procs = []
    names = [f'r{i}' for i in range(args.robots)]
    for name in names:
        params = os.path.join(work, f'{name}.yaml')
        with open(params, 'w', encoding='utf-8') as fh:
            fh.write('/**:\n  ros__parameters:\n' + ''.join(
                f'    {k}: {json.dumps(v)}\n' for k, v in {
                    'image_size': args.image_size, 'fleet_export': True,
                    'fleet_import': True, 'fleet_topic': topic, 'robot_id': name,
                    'checkpoint_dir': os.path.join(work, name), 'min_samples_per_class': 2,
                    'image_topics': [f'/sim_{name}/image'], 'diagnostics_period_s': 1.0,
                    'inference_threads': 1}.items()))
        log = open(os.path.join(work, f'{name}.log'), 'wb')
        procs.append(subprocess.Popen(
            [exe, '--ros-args', '--params-file', params, '-r', f'__ns:=/{name}'],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    rclpy.init()
    node = rclpy.create_node('cbpnet_fleet_sim')
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    known: Dict[str, int] = {name: 0 for name in names}
    done_at: Dict[str, float] = {}
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    total = 2 * args.robots

    def on_labels(name: str):
        def callback(msg: Any) -> None:
            known[name] = len(json.loads(msg.data)['classes'])
            if known[name] == total and name not in done_at:
                done_at[name] = time.monotonic()
        return callback
    for name in names:
        node.create_subscription(String, f'/{name}/cbpnet/labels', on_labels(name), latched)
    keep_all = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
    rng = np.random.default_rng(1)
    clients = {name: node.create_client(Trigger, f'/{name}/cbpnet/learn_task') for name in names}
    try:
        started = time.monotonic()
        for name, client in clients.items():
            if not client.wait_for_service(timeout_sec=600):
                raise RuntimeError(f'{name} did not start (log in {work})')
        print(f'{args.robots} nodes up after {time.monotonic() - started:.0f} s', flush=True)
        for k, name in enumerate(names):
            pub = node.create_publisher(Image, f'/{name}/cbpnet/labelled_images', keep_all)
            while pub.get_subscription_count() == 0:
                time.sleep(0.1)
            time.sleep(0.3)
            images, labels = _colour_task(rng, [f'{name}_x', f'{name}_y'], args.images, 2 * k)
            for img, label in zip(images, labels):
                msg = rgb_to_image_msg(img, 'rgb8')
                msg.header.frame_id = label
                pub.publish(msg)
        time.sleep(3.0)  # the samples reach the buffers
        t0 = time.monotonic()
        futures = {name: c.call_async(Trigger.Request()) for name, c in clients.items()}
        while not all(f.done() for f in futures.values()):
            time.sleep(0.05)
        learned_s = time.monotonic() - t0
        failed = {n: f.result().message for n, f in futures.items() if not f.result().success}
        if failed:
            raise RuntimeError(f'learn_task failed: {failed}')
        while len(done_at) < args.robots and time.monotonic() - t0 < args.timeout_s:
            time.sleep(0.1)
        published = {name: sum(os.path.getsize(os.path.join(work, name, 'fleet', f))
                               for f in os.listdir(os.path.join(work, name, 'fleet')))
                     for name in names}
        result = {
            'robots': args.robots, 'classes': total, 'images_per_class': args.images,
            'image_size': args.image_size,
            'every_robot_knows_every_class': len(done_at) == args.robots,
            'seconds_until_all_know_all': round(max(done_at.values()) - t0, 2)
            if len(done_at) == args.robots else None,
            'seconds_until_first_knows_all': round(min(done_at.values()) - t0, 2)
            if done_at else None,
            'learn_task_calls_s': round(learned_s, 2), 'known_classes': known,
            'bytes_published_per_robot': published,
            'bytes_published_total': sum(published.values()),
            'bytes_received_per_robot': sum(published.values()) - min(published.values()),
        }
        print(json.dumps({k: v for k, v in result.items() if k != 'known_classes'}, indent=1),
              flush=True)
        return result
    finally:
        for proc in procs:
            proc.send_signal(2)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown()


def main(argv: List[str] = None) -> int:
    """Run the chosen part; write ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--part', choices=('wire', 'fleet'), required=True)
    p.add_argument('--per-class', default='10,50,250,1000',
                   help='wire: images per class of each measured task')
    p.add_argument('--robots', type=int, default=10, help='fleet: node processes')
    p.add_argument('--images', type=int, default=20, help='fleet: images per class')
    p.add_argument('--image-size', type=int, default=128, help='fleet: the nodes\' image_size')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--timeout-s', type=float, default=600.0)
    p.add_argument('--out', default=None)
    args = p.parse_args(argv)
    args.per_class = [int(x) for x in args.per_class.split(',')]
    result = wire_part(args) if args.part == 'wire' else fleet_part(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w', encoding='utf-8') as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
