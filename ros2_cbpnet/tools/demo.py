"""``cbpnet-demo``: a robot's experience replayed through the real node over ROS 2 topics.

The demo starts ``cbpnet_node`` as its own process (embedded backbone, a temporary checkpoint
directory, DDS on loopback), then plays a data set task by task as a robot would experience
it: the task's training images go out on ``/cbpnet/labelled_images`` (label in
``header.frame_id``); once the node's diagnostics show them buffered, ``/cbpnet/learn_task`` is
called while a progress bar follows ``/cbpnet/learning_progress``; then the test images of
every class seen so far are streamed on the camera topics and the predictions received on
``/cbpnet/predictions`` are scored. It prints the accuracy on every task after each task, and
at the end the accuracy matrix, average accuracy, forgetting and the node's CBP statistics
read from ``/diagnostics``; it writes a PNG plot and a JSON summary and stops the node with
SIGINT. Exit code 0 on success, 1 if the node died or nothing was predicted, 2 for bad
arguments.

``--restart-between-tasks`` stops and restarts the node after every task and checks that the
learned tasks come back from the checkpoint (same labels, same accuracy).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ..learning.datasets import DatasetError, ImageDataset, load_dataset, split_tasks, task_subset
from ..learning.metrics import format_matrix, summarize
from .node_runner import NodeProcess, node_command, node_environment

#: Cameras the demo streams test frames on; the node batches frames waiting on several.
NUM_CAMERAS = 4
NODE_NAME = 'cbpnet'


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='cbpnet-demo', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--dataset', default='digits',
                   help="digits, fashion-mnist or folder:PATH (one sub-folder per class)")
    p.add_argument('--tasks', type=int, default=5, help='number of tasks (classes split evenly)')
    p.add_argument('--train-per-class', type=int, default=None,
                   help='training images per class (default: all for digits, 200 otherwise)')
    p.add_argument('--test-per-class', type=int, default=None,
                   help='test images per class (default: all for digits, 60 otherwise)')
    p.add_argument('--image-size', type=int, default=64, help='node parameter image_size')
    p.add_argument('--epochs', type=int, default=None, help='node parameter epochs')
    p.add_argument('--recipe', choices=('custom', 'paper'), default=None,
                   help="node parameter recipe: paper = the published CBPNet (prompts, CBP "
                   "block, softmax head); default: the node's (statistics)")
    p.add_argument('--cbp', choices=('on', 'off'), default=None,
                   help='node parameter cbp_enabled (off with --recipe paper = DualPrompt)')
    p.add_argument('--seed', type=int, default=0, help='data split and learner seed')
    p.add_argument('--out-dir', default='demo_results', help='where the plot and JSON go')
    p.add_argument('--restart-between-tasks', action='store_true',
                   help='restart the node after every task (checkpoint round trip)')
    p.add_argument('--timeout-s', type=float, default=300.0,
                   help='longest wait for any one step (start, buffering, learning)')
    p.add_argument('--node-arg', action='append', default=[],
                   help='extra node parameter NAME:=VALUE (repeatable)')
    args = p.parse_args(argv)
    if args.tasks < 1:
        p.error('--tasks must be >= 1')
    return args


class DemoClient:
    """The replay side: a client node spun in a background thread."""

    def __init__(self, namespace: str = '') -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy)
        from sensor_msgs.msg import Image
        from std_msgs.msg import String
        from std_srvs.srv import Trigger

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(args=[], context=self.context)  # not our argv: no remap rules
        self.node = rclpy.create_node('cbpnet_demo', context=self.context)
        base = f'{namespace.rstrip("/")}/{NODE_NAME}'
        reliable = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                              history=HistoryPolicy.KEEP_LAST)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.camera_topics = [f'/cbpnet_demo/camera_{i}' for i in range(NUM_CAMERAS)]
        self.labelled_pub = self.node.create_publisher(Image, f'{base}/labelled_images',
                                                       reliable)
        self.camera_pubs = [self.node.create_publisher(Image, t, reliable)
                            for t in self.camera_topics]
        self.learn = self.node.create_client(Trigger, f'{base}/learn_task')
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.predictions: Dict[str, Dict[str, Any]] = {}
        self.progress: List[Dict[str, Any]] = []
        self.labels: Optional[Dict[str, Any]] = None
        self.diagnostics: Dict[str, Dict[str, Any]] = {}
        self.node.create_subscription(String, f'{base}/predictions', self._on_prediction,
                                      reliable)
        self.node.create_subscription(String, f'{base}/learning_progress', self._on_progress,
                                      reliable)
        self.node.create_subscription(String, f'{base}/labels', self._on_labels, latched)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics,
                                      reliable)
        self._Image, self._Trigger = Image, Trigger
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    # --------------------------------------------------------------- callbacks
    def _on_prediction(self, msg: Any) -> None:
        data = json.loads(msg.data)
        with self._cond:
            self.predictions[data.get('frame_id', '')] = data
            self._cond.notify_all()

    def _on_progress(self, msg: Any) -> None:
        with self._cond:
            self.progress.append(json.loads(msg.data))
            self._cond.notify_all()

    def _on_labels(self, msg: Any) -> None:
        with self._cond:
            self.labels = json.loads(msg.data)
            self._cond.notify_all()

    def _on_diagnostics(self, msg: Any) -> None:
        parsed = {}
        for status in msg.status:
            if status.name.startswith('cbpnet: '):
                values = {}
                for kv in status.values:
                    try:
                        values[kv.key] = json.loads(kv.value)
                    except ValueError:
                        values[kv.key] = kv.value
                parsed[status.name[len('cbpnet: '):]] = values
        if parsed:
            with self._cond:
                self.diagnostics.update(parsed)
                self._cond.notify_all()

    # ----------------------------------------------------------------- actions
    def wait_for(self, predicate: Any, timeout_s: float) -> bool:
        """Wait until ``predicate()`` (called under the lock) is true."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.2))
        return True

    def wait_for_node(self, node: NodeProcess, timeout_s: float) -> None:
        """Until the node's service, subscriptions and diagnostics are there."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not node.alive():
                raise RuntimeError(f'the node exited during start:\n{node.tail()}')
            matched = self.labelled_pub.get_subscription_count() > 0 and all(
                p.get_subscription_count() > 0 for p in self.camera_pubs)
            if matched and self.learn.service_is_ready() and 'learner' in self.diagnostics:
                return
            time.sleep(0.1)
        raise TimeoutError(f'the node did not come up in {timeout_s:.0f} s:\n{node.tail()}')

    def _image(self, rgb: np.ndarray, frame_id: str) -> Any:
        msg = self._Image()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.header.frame_id = frame_id
        msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
        msg.encoding, msg.is_bigendian = 'rgb8', 0
        msg.step = int(rgb.shape[1] * 3)
        msg.data = np.ascontiguousarray(rgb).tobytes()
        return msg

    def buffer_samples(self) -> int:
        """Buffered samples reported by the node's last diagnostics."""
        return int(self.diagnostics.get('learner', {}).get('buffer_samples', 0))

    def send_labelled(self, images: Sequence[np.ndarray], labels: Sequence[str],
                      timeout_s: float) -> None:
        """Publish training samples, then wait until the node has buffered all of them."""
        before = self.buffer_samples()
        for i, (img, label) in enumerate(zip(images, labels)):
            self.labelled_pub.publish(self._image(img, label))
            if i % 50 == 49:
                time.sleep(0.02)  # let the reliable writer drain on slow machines
        want = before + len(images)
        if not self.wait_for(lambda: self.buffer_samples() >= want, timeout_s):
            raise TimeoutError(f'the node buffered {self.buffer_samples()} of {want} samples')

    def learn_task(self, timeout_s: float, bar_prefix: str) -> Tuple[bool, Dict[str, Any]]:
        """Call ``learn_task`` and draw a progress bar per stage from ``learning_progress``
        (the frozen pass over the images, then the optimiser steps when the recipe trains)."""
        with self._cond:
            self.progress.clear()
        future = self.learn.call_async(self._Trigger.Request())
        bars: Dict[str, tqdm] = {}
        shown = 0
        deadline = time.monotonic() + timeout_s
        while not future.done():
            if time.monotonic() > deadline:
                raise TimeoutError('learn_task did not answer in time')
            self.wait_for(lambda: len(self.progress) > shown or future.done(), 0.5)
            with self._cond:
                new = self.progress[shown:]
            for p in new:
                _progress_bar(bars, p, bar_prefix)
            shown += len(new)
        for bar in bars.values():
            bar.close()
        response = future.result()
        try:
            reply = json.loads(response.message)
        except ValueError:
            reply = {'error': response.message}
        return bool(response.success), reply

    def classify(self, images: Sequence[np.ndarray], tag: str, timeout_s: float = 30.0
                 ) -> List[Optional[Dict[str, Any]]]:
        """Stream frames over the cameras, one per camera at a time; the prediction of each
        (None where none came)."""
        out: List[Optional[Dict[str, Any]]] = []
        for start in range(0, len(images), NUM_CAMERAS):
            batch = images[start:start + NUM_CAMERAS]
            ids = [f'{tag}:{start + i}' for i in range(len(batch))]
            for pub, img, frame_id in zip(self.camera_pubs, batch, ids):
                pub.publish(self._image(img, frame_id))
            self.wait_for(lambda: all(i in self.predictions for i in ids), timeout_s)
            with self._cond:
                out.extend(self.predictions.pop(i, None) for i in ids)
        return out

    def close(self) -> None:
        """Stop spinning, destroy the node, shut this context down (in that order)."""
        self.executor.shutdown(timeout_sec=5.0)
        self._thread.join(timeout=5.0)
        self.node.destroy_node()
        self._rclpy.shutdown(context=self.context)


def _params_file(path: Path, args: argparse.Namespace, checkpoint_dir: Path,
                 cameras: Sequence[str]) -> None:
    params: Dict[str, Any] = {
        'image_topics': list(cameras), 'image_qos': 'reliable',
        'image_size': args.image_size, 'checkpoint_dir': str(checkpoint_dir),
        'min_samples_per_class': 2, 'max_samples_per_class': 100000,
        'max_buffer_samples': 1000000, 'diagnostics_period_s': 0.5, 'seed': args.seed,
    }
    if args.epochs is not None:
        params['epochs'] = args.epochs
    if args.recipe is not None:
        params['recipe'] = args.recipe
    if args.cbp is not None:
        params['cbp_enabled'] = args.cbp == 'on'
    lines = [f'{NODE_NAME}:', '  ros__parameters:']
    lines += [f'    {k}: {json.dumps(v)}' for k, v in params.items()]
    path.write_text('\n'.join(lines) + '\n')


def _best_taught(prediction: Optional[Dict[str, Any]]) -> Optional[str]:
    """The best taught class of a prediction, also when it was called unknown."""
    if not prediction:
        return None
    topk = prediction.get('topk') or []
    return topk[0]['label'] if topk else prediction.get('label')


def _progress_bar(bars: Dict[str, tqdm], p: Dict[str, Any], prefix: str) -> None:
    """Advance the bar of a ``learning_progress`` message's stage (created on first use)."""
    stage = p.get('stage', 'training')
    if stage == 'done':
        return
    features = stage == 'features'
    if stage not in bars:
        if features:
            bars[stage] = tqdm(total=int(p['total']), desc=f'{prefix}: frozen pass',
                               unit='img', dynamic_ncols=True)
        else:
            if 'features' in bars:
                bars.pop('features').close()
            bars[stage] = tqdm(total=int(p['steps']), desc=f'{prefix}: training',
                               unit='step', dynamic_ncols=True)
    bar = bars[stage]
    if features:
        bar.update(int(p['done']) - bar.n)
    else:
        bar.update(1)
        bar.set_postfix(epoch=f"{p['epoch']}/{p['epochs']}", loss=f"{p['loss']:.3f}",
                        acc=f"{p['accuracy']:.3f}", refresh=False)


def _cbp_line(cbp: Dict[str, Any], prompts: Dict[str, Any]) -> str:
    """The CBP block's and prompt selection's diagnostics in one line ('' when the block is
    not in use)."""
    if cbp.get('in_use') is not True:
        return ''
    selected = {k[5:]: v for k, v in prompts.items() if k.startswith('task_')}
    return (f"CBP block: {cbp.get('replacements_total')} replacements in total, utility "
            f"mean {float(cbp.get('utility_mean', 0)):.2e} (min "
            f"{float(cbp.get('utility_min', 0)):.2e}, max {float(cbp.get('utility_max', 0)):.2e})"
            f", dormant fraction {float(cbp.get('dormant_fraction', 0)):.2f}, mature units "
            f"{cbp.get('mature_units')}; E-prompts selected so far "
            + ', '.join(f'T{t}: {n}' for t, n in selected.items()))


def _score(client: DemoClient, ds: ImageDataset, tasks: List[List[int]], upto: int,
           tag: str) -> Tuple[List[float], int, int, int]:
    """Accuracy (of the best taught class) on each task 0..upto; frames sent; frames that got
    no prediction; taught-class frames the node called unknown."""
    row, sent, missing, unknown = [], 0, 0, 0
    for j in range(upto + 1):
        x, y = task_subset(ds.test_images, ds.test_labels, tasks[j])
        predicted = client.classify(list(x), f'{tag}-t{j}')
        missing += sum(p is None for p in predicted)
        unknown += sum(p is not None and p.get('known') is False for p in predicted)
        sent += len(predicted)
        truth = [ds.classes[i] for i in y]
        row.append(float(np.mean([_best_taught(p) == t for p, t in zip(predicted, truth)]))
                   if truth else 0.0)
    return row, sent, missing, unknown


def run(args: argparse.Namespace) -> int:
    """The demo; returns the process exit code."""
    os.environ.update(node_environment())
    digits = args.dataset == 'digits'
    train_n = args.train_per_class if args.train_per_class is not None \
        else (None if digits else 200)
    test_n = args.test_per_class if args.test_per_class is not None else (None if digits else 60)
    try:
        ds = load_dataset(args.dataset, seed=args.seed, train_per_class=train_n,
                          test_per_class=test_n)
        tasks = split_tasks(len(ds.classes), args.tasks)
    except (DatasetError, ValueError) as exc:
        print(f'cbpnet-demo: {exc}', file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix='cbpnet-demo-'))
    checkpoint_dir = work / 'checkpoints'
    params = work / 'params.yaml'
    client = DemoClient()
    _params_file(params, args, checkpoint_dir, client.camera_topics)
    env = node_environment()
    node = NodeProcess(node_command(params, extra_params=args.node_arg), out_dir / 'node.log',
                       env)
    print(f'cbpnet-demo: {args.dataset}, {len(ds.classes)} classes in {len(tasks)} tasks, '
          f'{len(ds.train_images)} training and {len(ds.test_images)} test images; node log '
          f'{out_dir / "node.log"}; ROS_DOMAIN_ID={env["ROS_DOMAIN_ID"]}', flush=True)
    acc: List[List[float]] = []
    results: List[Dict[str, Any]] = []
    restarts: List[Dict[str, Any]] = []
    sent_total, missing_total, unknown_total = 0, 0, 0
    code = 0
    started = time.monotonic()
    try:
        client.wait_for_node(node, args.timeout_s)
        for t, class_ids in enumerate(tasks):
            names = [ds.classes[c] for c in class_ids]
            x, y = task_subset(ds.train_images, ds.train_labels, class_ids)
            print(f'\ntask {t}: classes {names}, {len(x)} labelled images -> '
                  '/cbpnet/labelled_images', flush=True)
            client.send_labelled(list(x), [ds.classes[i] for i in y], args.timeout_s)
            ok, reply = client.learn_task(args.timeout_s, f'  learning task {t}')
            if not ok:
                raise RuntimeError(f'learn_task failed: {reply.get("error", reply)}')
            results.append(reply)
            print(f"  learned in {reply['duration_s']:.1f} s, train accuracy "
                  f"{reply['train_accuracy']:.3f}, {reply['replaced_units']} CBP "
                  f"replacements, checkpoint {reply.get('checkpoint')}", flush=True)
            if reply.get('key_query_cosine') is not None:
                print(f"  key-query cosine {reply['key_query_cosine']:.3f} (the most a key "
                      f"reaches on these images: {reply['key_query_cosine_max']:.3f})",
                      flush=True)
            row, sent, missing, unknown = _score(client, ds, tasks, t, f'after{t}')
            sent_total += sent
            missing_total += missing
            unknown_total += unknown
            acc.append(row)
            print('  accuracy per task so far: ' + '  '.join(
                f'T{j}={a:.3f}' for j, a in enumerate(row)) + f'  (mean {np.mean(row):.3f}); '
                f'{unknown} of {sent} taught-class frames called unknown', flush=True)
            block = _cbp_line(client.diagnostics.get('cbp block', {}),
                              client.diagnostics.get('prompts', {}))
            if block:
                print(f'  {block}', flush=True)
            if args.restart_between_tasks and t < len(tasks) - 1:
                node, report = _restart(client, node, params, out_dir, env, args, ds, tasks,
                                        t, row)
                restarts.append(report)
    except (RuntimeError, TimeoutError) as exc:
        print(f'\ncbpnet-demo: {exc}', file=sys.stderr)
        code = 1
    finally:
        cbp = dict(client.diagnostics.get('cbp block', {}))
        prompts_diag = dict(client.diagnostics.get('prompts', {}))
        learner_diag = dict(client.diagnostics.get('learner', {}))
        inference = dict(client.diagnostics.get('inference', {}))
        node_alive = node.alive()
        exit_code = node.stop()['exit_code']
        client.close()
    if code == 0 and not node_alive:
        print('cbpnet-demo: the node died', file=sys.stderr)
        code = 1
    if code == 0 and (not acc or missing_total == sent_total):
        print('cbpnet-demo: nothing was predicted', file=sys.stderr)
        code = 1
    summary: Dict[str, Any] = {
        'dataset': args.dataset, 'tasks': [[ds.classes[c] for c in t] for t in tasks],
        'acc_matrix': acc, 'task_results': results, 'missing_predictions': missing_total,
        'frames_scored': sent_total, 'taught_frames_called_unknown': unknown_total,
        'cbp': cbp, 'learner': {k: learner_diag.get(k) for k in ('tasks', 'classes',
                                                                 'model_version')},
        'inference': {k: inference.get(k) for k in (
            'frames_classified', 'dropped_frames', 'rejected', 'latency_mean_ms',
            'latency_p95_ms', 'device', 'backbone', 'image_size')},
        'restarts': restarts, 'node_exit_code': exit_code,
        'wall_seconds': round(time.monotonic() - started, 1), 'method': 'cbpnet (node)',
    }
    if acc:
        summary.update(summarize(acc))
        print('\naccuracy matrix (row = after learning task i, column = task j):')
        print(format_matrix(acc))
        print(f"average accuracy {summary['average_accuracy']:.3f}, forgetting "
              f"{summary['forgetting']:.3f}, learning accuracy "
              f"{summary['learning_accuracy']:.3f}")
        print(f'{unknown_total} of {sent_total} taught-class test frames called unknown '
              '(accuracy above counts their best taught class)')
        if cbp.get('in_use') is False:
            print('CBP block: not in use (prediction: stats, the default)')
        else:
            print(_cbp_line(cbp, prompts_diag))
        if missing_total:
            print(f'{missing_total} test frames got no prediction (counted as wrong)')
        try:
            from ..learning.plotting import plot_accuracy_curves
            plot = plot_accuracy_curves([summary], str(out_dir / 'demo_accuracy.png'),
                                        title=f'cbpnet-demo on {args.dataset}')
            summary['plot'] = plot
            print(f'plot: {plot}')
        except Exception as exc:  # noqa: BLE001 - a missing plot must not fail the demo
            print(f'cbpnet-demo: could not draw the plot: {exc}', file=sys.stderr)
    json_path = out_dir / 'demo_summary.json'
    json_path.write_text(json.dumps(summary, indent=2))
    print(f'summary: {json_path}\nnode exit code {exit_code}; demo exit code {code}',
          flush=True)
    return code


def _restart(client: DemoClient, node: NodeProcess, params: Path, out_dir: Path,
             env: Dict[str, str], args: argparse.Namespace, ds: ImageDataset,
             tasks: List[List[int]], t: int, row: List[float]
             ) -> Tuple[NodeProcess, Dict[str, Any]]:
    """Stop the node, start it again on the same checkpoint_dir, check nothing was lost."""
    code = node.stop()['exit_code']
    print(f'  restarting the node (exit code {code}) ...', flush=True)
    with client._cond:
        client.labels = None
        client.diagnostics.clear()
    node = NodeProcess(node_command(params, extra_params=args.node_arg), out_dir / 'node.log',
                       env)
    client.wait_for_node(node, args.timeout_s)
    if not client.wait_for(lambda: client.labels is not None, args.timeout_s):
        raise RuntimeError('the restarted node did not publish ~/labels')
    labels = client.labels or {}
    again, _, _, _ = _score(client, ds, tasks, t, f'restart{t}')
    same = labels.get('model_version') == t + 1 and len(labels.get('tasks', [])) == t + 1
    print(f"  after restart: model_version {labels.get('model_version')}, "
          f"{len(labels.get('tasks', []))} tasks, accuracy "
          + '  '.join(f'T{j}={a:.3f}' for j, a in enumerate(again)), flush=True)
    if not same:
        raise RuntimeError(f'tasks were lost across the restart: {labels}')
    return node, {'after_task': t, 'exit_code': code, 'labels': labels,
                  'accuracy_before': row, 'accuracy_after': again}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point."""
    return run(_parse(argv))


if __name__ == '__main__':
    sys.exit(main())
