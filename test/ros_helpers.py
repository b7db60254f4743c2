"""Helpers for tests that drive nodes over real rclpy and DDS (loopback only, see conftest).

- :func:`node_in_process`: a node in this process, in a private rclpy ``Context``, spun by a
  ``MultiThreadedExecutor`` in a background thread, with a :class:`RosClient` next to it;
  shut down in the order docs/environment.md asks for.
- :func:`node_process` / :func:`stop_process`: the ``cbpnet_node`` console script in a
  subprocess with a parameters file (:func:`write_params_file`); always stopped (killed if it
  must be) on exit, its Fast DDS shared memory removed when it could not remove it itself.
- A callback that raises in a :class:`Spinner` stops it; the error is printed at once, makes
  every wait of the :class:`RosClient` spun with it fail with that error as the cause (instead
  of a timeout with no reason), and is raised again when :func:`node_in_process` exits.
- :class:`RosClient`: a client node with helpers to publish images and labels, call
  ``std_srvs/Trigger`` services with timeouts, set parameters, collect (JSON) messages and
  wait for subscriptions to match.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.context import Context
from rclpy.exceptions import InvalidHandle
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter, parameter_value_to_python
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String
from std_srvs.srv import Trigger

from proc_cleanup import TrackedProcess, sweep_shm
from ros2_cbpnet.ros.image_codec import rgb_to_compressed_msg, rgb_to_image_msg
from ros2_cbpnet.tools.synthetic import camera_frame, scene

#: The console script installed in this interpreter's environment (the venv).
NODE_EXECUTABLE = Path(sys.executable).parent / 'cbpnet_node'

RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                      history=HistoryPolicy.KEEP_LAST)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


# ------------------------------------------------------------------------------ generic
def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes
    (returns the last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def _domain_ids() -> List[int]:
    ids = [int(x) for x in os.environ.get('ROS2_CBPNET_DOMAIN_IDS', '').split(',') if x]
    if not ids or str(ids[0]) != os.environ.get('ROS_DOMAIN_ID'):
        raise RuntimeError('no locked ROS domain: test/conftest.py must be loaded first '
                           '(run the tests with pytest from the repository root)')
    return ids


def spare_domain_id() -> int:
    """A second ROS domain id locked for this test run (ros2_cbpnet.tools.ros_domain), for a test
    that needs a domain where nothing else of the run is."""
    ids = _domain_ids()
    if len(ids) < 2:
        raise RuntimeError('this run locked only one ROS domain id')
    return ids[1]


def ros_env(**extra: str) -> Dict[str, str]:
    """``os.environ`` plus the settings every ROS process here needs (DDS on loopback, the
    test run's locked domain, offline model hub)."""
    env = dict(os.environ)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env['ROS_DOMAIN_ID'] = str(_domain_ids()[0])
    env.setdefault('AMENT_PREFIX_PATH', sys.prefix)
    env['HF_HUB_OFFLINE'] = '1'
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra)
    return env


def soak_module() -> Any:
    """``scripts/soak.py`` as a module, for its RSS reader and summary."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / 'scripts' / 'soak.py'
    spec = importlib.util.spec_from_file_location('cbpnet_soak', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def noisy_scene(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Gradients, sharp-edged discs and Gaussian noise (sigma 12), uint8: the hard case for
    resampling and compression (``channels`` 1: the green plane)."""
    img = scene(height, width, seed)
    return img if channels == 3 else np.ascontiguousarray(img[:, :, 1])


def camera_frames(topics: Sequence[str], count: int = 3) -> List[Tuple[str, List[Any]]]:
    """``count`` pre-built frames per camera topic, ``header.frame_id`` = ``cam<i>``: JPEG
    640x480 on ``.../compressed`` topics, raw rgb8 320x240 on the others."""
    out = []
    for i, topic in enumerate(topics):
        if topic.endswith('/compressed'):
            msgs = [rgb_to_compressed_msg(camera_frame(640, 480, 10 * i + k), 'jpeg')
                    for k in range(count)]
        else:
            msgs = [rgb_to_image_msg(camera_frame(320, 240, 10 * i + k), 'rgb8')
                    for k in range(count)]
        for m in msgs:
            m.header.frame_id = f'cam{i}'
        out.append((topic, msgs))
    return out


def noisy_images(mean_rgb: Sequence[int], count: int, *, size: int = 64, noise: float = 30.0,
                 rng: Optional[np.random.Generator] = None) -> List[np.ndarray]:
    """``count`` RGB uint8 images of one colour plus Gaussian noise (a synthetic class)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    return [np.clip(rng.normal(mean_rgb, noise, (size, size, 3)), 0, 255).astype(np.uint8)
            for _ in range(count)]


# ------------------------------------------------------------------------------ contexts
@contextlib.contextmanager
def ros_context(args: Optional[List[str]] = None) -> Iterator[Context]:
    """A private, initialised rclpy ``Context`` (no signal handlers), shut down on exit."""
    context = Context()
    rclpy.init(args=args, context=context)
    try:
        yield context
    finally:
        context.try_shutdown()


class SpinnerError(AssertionError):
    """A callback raised in a :class:`Spinner`, which stopped spinning."""


class Spinner:
    """A ``MultiThreadedExecutor`` spinning some nodes in a background thread.

    rclpy re-raises a callback's exception from ``spin()``, which ends the spin thread: every
    later wait would time out with no cause. The exception is kept in :attr:`errors`, printed
    with its traceback at once, and :meth:`check` raises it (as the cause) for the waits of
    the :class:`RosClient` it spins and when the owner stops it.
    """

    def __init__(self, context: Context, *nodes: Node, num_threads: int = 10) -> None:
        self.executor = MultiThreadedExecutor(num_threads=num_threads, context=context)
        self.errors: List[BaseException] = []
        self._stopping = False
        for node in nodes:
            self.add(node)
        self.thread = threading.Thread(target=self._spin, name='test-spin', daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        while True:
            try:
                self.executor.spin()
                return
            except InvalidHandle:
                # A subscription or client destroyed (e.g. Collector.close) while the executor
                # waited on it: rclpy's own race, not an error of the code under test. rclpy
                # handles it the same way in its executors; the next spin starts a new wait.
                if self._stopping or not self.executor.context.ok():
                    return
            except Exception as exc:  # noqa: BLE001 - recorded, reported by check()
                if self._stopping or not self.executor.context.ok():
                    return  # shut down under us: the normal end
                self.errors.append(exc)
                print('\n*** test spinner stopped: a callback raised ***', file=sys.stderr)
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
                return

    def add(self, node: Node) -> None:
        """Spin one more node."""
        self.executor.add_node(node)
        if isinstance(node, RosClient):
            node.spinner = self

    def check(self) -> None:
        """Raise :class:`SpinnerError` (from the callback's exception) if spinning failed."""
        if self.errors:
            first = self.errors[0]
            raise SpinnerError(f'a callback raised in the test spinner, which stopped: '
                               f'{type(first).__name__}: {first}') from first

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the executor and join its thread (before nodes are destroyed)."""
        self._stopping = True
        self.executor.shutdown(timeout_sec=timeout)
        self.thread.join(timeout)


@dataclass
class NodeHarness:
    """What :func:`node_in_process` yields."""

    node: Node
    client: 'RosClient'
    context: Context
    spinner: Spinner
    extra: Dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def node_in_process(parameters: Optional[Dict[str, Any]] = None, *, namespace: str = '',
                    node_factory: Optional[Callable[..., Node]] = None,
                    num_threads: int = 10) -> Iterator[NodeHarness]:
    """Start a node (default ``CBPNetNode``) in a private context, spinning, with a client.

    Shutdown order: the node's own threads (``node.stop()`` if it has one), the executor and
    its thread, the nodes, the context.
    """
    if node_factory is None:
        from ros2_cbpnet.ros.node import CBPNetNode
        node_factory = CBPNetNode
    overrides = [Parameter(k, value=v) for k, v in (parameters or {}).items()]
    with ros_context() as context:
        node = node_factory(context=context, namespace=namespace,
                            parameter_overrides=overrides)
        client = spinner = None
        try:
            client = RosClient(context, target=node.get_fully_qualified_name())
            spinner = Spinner(context, node, client, num_threads=num_threads)
            yield NodeHarness(node, client, context, spinner)
        finally:
            if hasattr(node, 'stop'):
                node.stop()
            if spinner is not None:
                spinner.stop()
            if client is not None:
                client.destroy_node()
            node.destroy_node()
        spinner.check()  # only when the test itself passed: its own failure comes first


@contextlib.contextmanager
def client_in_process(target: str = '/cbpnet') -> Iterator[RosClient]:
    """A spinning :class:`RosClient` in a private context (for nodes in other processes)."""
    with ros_context() as context:
        client = RosClient(context, target=target)
        spinner = Spinner(context, client, num_threads=4)
        try:
            yield client
        finally:
            spinner.stop()
            client.destroy_node()
        spinner.check()


# ------------------------------------------------------------------------------ processes
def write_params_file(path: Union[str, Path], params: Dict[str, Any],
                      node_name: str = '/**') -> Path:
    """Write a ROS 2 parameters YAML for ``node_name`` (default every node of the process;
    note that a bare name such as ``cbpnet`` only matches that node outside namespaces)."""
    path = Path(path)
    path.write_text(yaml.safe_dump({node_name: {'ros__parameters': params}}))
    return path


PathLike = Union[str, Path]


@contextlib.contextmanager
def node_process(params_files: Union[PathLike, Sequence[PathLike], None] = None, *,
                 ros_args: Sequence[str] = (), executable: PathLike = NODE_EXECUTABLE,
                 log_path: Optional[PathLike] = None,
                 env: Optional[Dict[str, str]] = None,
                 command: Optional[Sequence[str]] = None) -> Iterator[subprocess.Popen]:
    """Run the console script with ``--ros-args --params-file FILE...`` (later files win)
    and ``ros_args``; output goes to ``log_path`` (a temporary file by default;
    ``proc.log_path`` says where); ``command`` replaces the whole command line (e.g. one
    that a launch file produced). SIGINT, then SIGKILL, on exit if it is still running,
    also when the test failed; Fast DDS files a killed node left in /dev/shm are removed."""
    if log_path is None:
        fd, log_name = tempfile.mkstemp(prefix='cbpnet_node-', suffix='.log')
        os.close(fd)
        log_path = log_name
    if params_files is None:
        params_files = []
    elif isinstance(params_files, (str, Path)):
        params_files = [params_files]
    cmd = [str(executable), '--ros-args']
    for path in params_files:
        cmd += ['--params-file', str(path)]
    cmd += list(ros_args)
    if command is not None:
        cmd = [str(c) for c in command]
    with open(log_path, 'wb') as log:
        proc = TrackedProcess(cmd, env=env or ros_env(), stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc.log_path = str(log_path)  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        try:
            if proc.poll() is None:
                stop_process(proc, timeout=15.0)
        finally:
            if proc.poll() is None:  # even an interrupted stop must not leave it running
                proc.kill()
                proc.wait(10)
            sweep_shm()


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> Optional[int]:
    """SIGINT and wait; SIGKILL after ``timeout``. Returns the exit code after SIGINT, or None
    when it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None


def read_log(proc: subprocess.Popen, tail: int = 4000) -> str:
    """The end of a :func:`node_process` log, for assertion messages."""
    try:
        return Path(proc.log_path).read_text(errors='replace')[-tail:]  # type: ignore
    except (OSError, AttributeError):
        return ''


# ------------------------------------------------------------------------------ client
class Collector:
    """Messages received on one topic (JSON-decoded for ``std_msgs/String`` if asked)."""

    def __init__(self, node: Node, topic: str, msg_type: Any, qos: QoSProfile,
                 decode_json: bool) -> None:
        self._node = node
        self._cond = threading.Condition()
        self.messages: List[Any] = []
        self.times: List[float] = []
        self._decode = decode_json
        self.topic = topic
        self.subscription = node.create_subscription(
            msg_type, topic, self._callback, qos, callback_group=ReentrantCallbackGroup())

    def _callback(self, msg: Any) -> None:
        item = json.loads(msg.data) if self._decode else msg
        with self._cond:
            self.messages.append(item)
            self.times.append(time.monotonic())
            self._cond.notify_all()

    def _check_spinner(self) -> None:
        spinner = getattr(self._node, 'spinner', None)
        if spinner is not None:
            spinner.check()

    def wait_for(self, predicate: Callable[[Any], bool] = lambda m: True,
                 timeout: float = 30.0, start: int = 0) -> Optional[Any]:
        """The first message from index ``start`` on that satisfies ``predicate``, or None.

        Raises :class:`SpinnerError` as soon as the spinner delivering them has died."""
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.messages):
                    if predicate(self.messages[index]):
                        return self.messages[index]
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._check_spinner()
                self._cond.wait(min(remaining, 0.5))

    def wait_count(self, count: int, timeout: float = 30.0) -> bool:
        """True once at least ``count`` messages have arrived (False after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._check_spinner()
                self._cond.wait(min(remaining, 0.5))
            return True

    def snapshot(self) -> List[Any]:
        """A copy of the messages so far."""
        with self._cond:
            return list(self.messages)

    def __len__(self) -> int:
        return len(self.messages)

    def close(self) -> None:
        """Destroy the subscription."""
        self._node.destroy_subscription(self.subscription)


def diagnostic_status(array: DiagnosticArray, name: str) -> Optional[Tuple[int, Dict[str, str]]]:
    """``(level, {key: value})`` of the status called ``name`` in a DiagnosticArray."""
    for status in array.status:
        if status.name == name:
            level = status.level if isinstance(status.level, int) else ord(status.level)
            return level, {kv.key: kv.value for kv in status.values}
    return None


class RosClient(Node):
    """A test-side node that talks to one target node (``target`` = its full name)."""

    _count = 0

    def __init__(self, context: Context, *, target: str = '/cbpnet',
                 name: Optional[str] = None) -> None:
        RosClient._count += 1
        super().__init__(name or f'cbpnet_test_client_{os.getpid()}_{RosClient._count}',
                         context=context)
        self.target = target.rstrip('/')
        self._group = ReentrantCallbackGroup()
        self._publisher_cache: Dict[Tuple[str, Any], Any] = {}
        self._client_cache: Dict[Tuple[str, Any], Any] = {}
        self._diagnostics: Optional[Collector] = None
        #: The :class:`Spinner` that spins this client (set by :meth:`Spinner.add`).
        self.spinner: Optional[Spinner] = None

    def resolve(self, name: str) -> str:
        """``~/x`` -> ``<target>/x``; other names unchanged."""
        return self.target + name[1:] if name.startswith('~/') else name

    # ------------------------------------------------------------------ publishing
    def publisher(self, topic: str, msg_type: Any, qos: QoSProfile = RELIABLE) -> Any:
        """A cached publisher."""
        key = (self.resolve(topic), msg_type)
        if key not in self._publisher_cache:
            self._publisher_cache[key] = self.create_publisher(msg_type, key[0], qos)
        return self._publisher_cache[key]

    def wait_for_subscribers(self, topic: str, msg_type: Any, count: int = 1,
                             timeout: float = 30.0) -> bool:
        """Wait until ``count`` subscriptions match our publisher (discovery takes ~1 s)."""
        pub = self.publisher(topic, msg_type)
        return bool(wait_until(lambda: pub.get_subscription_count() >= count, timeout))

    def publish(self, topic: str, msg: Any, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Publish, first waiting for a matching subscriber unless ``wait`` is False."""
        if wait and not self.wait_for_subscribers(topic, type(msg), timeout=timeout):
            raise TimeoutError(f'no subscriber on {self.resolve(topic)} after {timeout} s')
        self.publisher(topic, type(msg)).publish(msg)

    def image_msg(self, rgb: np.ndarray, *, frame_id: str = '', compressed: bool = False,
                  encoding: str = 'rgb8', stamp: Optional[Tuple[int, int]] = None) -> Any:
        """An Image (or CompressedImage JPEG) message of ``rgb`` with a header."""
        msg = rgb_to_compressed_msg(rgb, 'jpeg') if compressed else rgb_to_image_msg(
            rgb, encoding)
        msg.header.frame_id = frame_id
        if stamp is None:
            msg.header.stamp = self.get_clock().now().to_msg()
        else:
            msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
        return msg

    def publish_images(self, topic: str, images: Sequence[np.ndarray],
                       labels: Union[str, Sequence[str]] = '', *, compressed: bool = False,
                       interval_s: float = 0.0) -> None:
        """Publish images, the label (one for all, or one each) in ``header.frame_id``."""
        if isinstance(labels, str):
            labels = [labels] * len(images)
        for rgb, label in zip(images, labels):
            self.publish(topic, self.image_msg(rgb, frame_id=label, compressed=compressed))
            if interval_s:
                time.sleep(interval_s)

    def classify(self, topic: str, rgb: np.ndarray, frame_id: str, predictions: Collector,
                 *, compressed: bool = False, stamp: Optional[Tuple[int, int]] = (123, 456),
                 timeout: float = 60.0, every_s: float = 0.3) -> Dict[str, Any]:
        """Publish a camera frame (again every ``every_s``: a frame may be replaced by a newer
        one, or lost with best-effort QoS) until ``predictions`` holds a prediction for
        ``frame_id``; returns that prediction."""
        msg = self.image_msg(rgb, frame_id=frame_id, compressed=compressed, stamp=stamp)
        start = len(predictions.messages)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.publish(topic, msg)
            found = predictions.wait_for(lambda p: p.get('frame_id') == frame_id, every_s,
                                         start)
            if found is not None:
                return found
        raise TimeoutError(f'no prediction for {frame_id!r} from {topic} within {timeout} s')

    # ------------------------------------------------------------------ receiving
    def collect(self, topic: str, msg_type: Any = String, qos: QoSProfile = RELIABLE,
                decode_json: Optional[bool] = None) -> Collector:
        """Start collecting messages of a topic (String payloads JSON-decoded by default)."""
        if decode_json is None:
            decode_json = msg_type is String
        return Collector(self, self.resolve(topic), msg_type, qos, decode_json)

    def diagnostics(self) -> Collector:
        """The (shared) collector of ``/diagnostics``."""
        if self._diagnostics is None:
            self._diagnostics = self.collect('/diagnostics', DiagnosticArray,
                                             QoSProfile(depth=50))
        return self._diagnostics

    def status_name(self, name: str) -> str:
        """The target's own name for a status: diagnostics are named after the node's full
        name (``'cbpnet: learner'`` is ``'robot1/cbpnet: learner'`` under ``/robot1``)."""
        if name.startswith('cbpnet:'):
            return self.target.lstrip('/') + name[len('cbpnet'):]
        return name

    def wait_for_diagnostics(self, predicate: Callable[[DiagnosticArray], bool] = lambda a: True,
                             timeout: float = 30.0, prefix: str = 'cbpnet:'
                             ) -> Optional[DiagnosticArray]:
        """The next DiagnosticArray (from now on) with a ``prefix`` status (of the target,
        see :meth:`status_name`) satisfying ``predicate``."""
        collector = self.diagnostics()
        prefix = self.status_name(prefix)
        return collector.wait_for(
            lambda a: any(s.name.startswith(prefix) for s in a.status) and predicate(a),
            timeout=timeout, start=len(collector.messages))

    def wait_for_status(self, name: str, predicate: Callable[[int, Dict[str, str]], bool],
                        timeout: float = 30.0) -> Optional[Tuple[int, Dict[str, str]]]:
        """The next ``(level, values)`` of diagnostic status ``name`` (of the target, see
        :meth:`status_name`) satisfying ``predicate(level, values)``."""
        name = self.status_name(name)

        def check(array: DiagnosticArray) -> bool:
            found = diagnostic_status(array, name)
            return found is not None and bool(predicate(*found))
        # Filter by the status's own node (a test may watch another node than the target).
        array = self.wait_for_diagnostics(check, timeout, prefix=name.split(':')[0] + ':')
        return diagnostic_status(array, name) if array is not None else None

    # ------------------------------------------------------------------ services
    def _client(self, srv_type: Any, name: str) -> Any:
        key = (self.resolve(name), srv_type)
        if key not in self._client_cache:
            self._client_cache[key] = self.create_client(
                srv_type, key[0], callback_group=self._group)
        return self._client_cache[key]

    def call_async(self, srv_type: Any, name: str, request: Any = None,
                   timeout: float = 60.0) -> Any:
        """Send a request once the service is there; returns the rclpy Future."""
        client = self._client(srv_type, name)
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f'service {self.resolve(name)} not available after {timeout} s')
        return client.call_async(request if request is not None else srv_type.Request())

    def result(self, future: Any, timeout: float) -> Any:
        """Wait for a Future (spun by the executor) and return its result; raises
        :class:`SpinnerError` at once if the spinner died, TimeoutError after ``timeout``."""
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        deadline = time.monotonic() + timeout
        while not done.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
            if self.spinner is not None:
                self.spinner.check()
            if time.monotonic() >= deadline:
                raise TimeoutError(f'no service response after {timeout} s')
        return future.result()

    def call_trigger(self, name: str, timeout: float = 60.0) -> Trigger.Response:
        """Call a ``std_srvs/Trigger`` service and wait for the answer."""
        return self.result(self.call_async(Trigger, name, timeout=timeout), timeout)

    def teach_and_learn(self, images: Dict[str, Sequence[np.ndarray]],
                        topic: str = '~/labelled_images',
                        timeout: float = 180.0) -> Trigger.Response:
        """Publish each label's images on ``topic``, wait until the node has buffered every
        one of them, then learn them as one task; asserts that ``learn_task`` succeeded."""
        for label, batch in images.items():
            self.publish_images(topic, batch, label)
        total = sum(len(batch) for batch in images.values())
        assert self.wait_for_status('cbpnet: learner',
                                    lambda level, v: int(v['buffer_samples']) == total, 60), \
            f'the node never buffered the {total} images'
        reply = self.call_trigger('~/learn_task', timeout=timeout)
        assert reply.success, reply.message
        return reply

    def get_parameters(self, names: Sequence[str], node: Optional[str] = None,
                       timeout: float = 30.0) -> Dict[str, Any]:
        """Values of parameters of ``node`` (default the target) over its get_parameters
        service, as ``ros2 param get`` reads them (an unset one is None)."""
        request = GetParameters.Request()
        request.names = list(names)
        service = f'{node or self.target}/get_parameters'
        reply = self.result(self.call_async(GetParameters, service, request, timeout), timeout)
        return dict(zip(request.names, (parameter_value_to_python(v) for v in reply.values)))

    def set_parameters(self, values: Dict[str, Any], node: Optional[str] = None,
                       timeout: float = 30.0) -> List[SetParametersResult]:
        """Set parameters of ``node`` (default the target) one by one, as ``ros2 param set``
        does; returns one result per parameter."""
        request = SetParameters.Request()
        request.parameters = [Parameter(k, value=v).to_parameter_msg()
                              for k, v in values.items()]
        service = f'{node or self.target}/set_parameters'
        return list(self.result(self.call_async(SetParameters, service, request, timeout),
                                timeout).results)
