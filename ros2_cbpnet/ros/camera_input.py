"""The camera subscriptions of ``cbpnet_node``, executed on a thread of their own.

Why: rclpy's ``MultiThreadedExecutor`` rebuilds its wait set and hands every ready callback to
a thread pool, in Python; for camera frames that cost more CPU than the model itself
(``scripts/ros_receive_overhead.py``: 7.8 ms of CPU per received 640x480 frame with 10 threads,
1.5 ms with a ``SingleThreadedExecutor``).

How, without a second node: the camera subscriptions stay the node's own (same names,
namespace, remapping, graph entry), in a :class:`ThreadBoundCallbackGroup`. rclpy executors
only wait on entities whose callback group ``can_execute`` them, and this group answers yes
only on the camera thread, so whatever executor spins the node (``cbpnet_node``'s
``MultiThreadedExecutor``, a test's, a launch container's) leaves the cameras alone. The
camera thread runs a ``SingleThreadedExecutor`` of its own over the same node, restricted to
that group, through rclpy's public ``wait_for_ready_callbacks(nodes=[node])``: it is never
the node's executor (``node.executor`` stays the one that spins everything else).

Shutdown order (docs/environment.md): :meth:`CameraInput.stop` stops and joins the thread
(no camera callback runs after it returns), :meth:`CameraInput.destroy` then shuts the camera
executor down; the owner destroys the node and shuts rclpy down after that.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from rclpy.callback_groups import CallbackGroup
from rclpy.executors import (ExternalShutdownException, ShutdownException,
                             SingleThreadedExecutor, TimeoutException)
from rclpy.node import Node
from rclpy.qos import QoSProfile

try:
    from rclpy.exceptions import InvalidHandle
except ImportError:  # pragma: no cover - older rclpy keeps it in the binding only
    from rclpy._rclpy_pybind11 import InvalidHandle  # type: ignore[no-redef]

__all__ = ['CAMERA_THREAD_NAME', 'CameraInput', 'ThreadBoundCallbackGroup']

#: Name of the thread that runs every camera callback.
CAMERA_THREAD_NAME = 'cbpnet-cameras'
#: Seconds one wait of the camera executor may last, so a stop is noticed without a wake-up.
_SPIN_TIMEOUT_S = 0.5


class ThreadBoundCallbackGroup(CallbackGroup):
    """A callback group whose entities only one thread, :attr:`thread`, waits on and runs.

    Every rclpy executor asks an entity's group ``can_execute`` before it puts the entity
    into its wait set and ``beginning_execution`` before it runs the callback; both are
    false on every other thread. Callbacks of the group never run concurrently (one thread).
    """

    def __init__(self) -> None:
        super().__init__()
        #: The only thread that executes this group (None: no thread does).
        self.thread: Optional[threading.Thread] = None

    def can_execute(self, entity: Any) -> bool:
        """True on :attr:`thread` only."""
        return threading.current_thread() is self.thread

    def beginning_execution(self, entity: Any) -> bool:
        """True on :attr:`thread` only."""
        return threading.current_thread() is self.thread

    def ending_execution(self, entity: Any) -> None:
        """Nothing to release: one thread runs the group."""


class _GroupExecutor(SingleThreadedExecutor):
    """A ``SingleThreadedExecutor`` that waits on the entities of one callback group only."""

    def __init__(self, group: CallbackGroup, *, context: Any) -> None:
        super().__init__(context=context)
        self._group = group

    def can_execute(self, entity: Any) -> bool:
        return entity.callback_group is self._group and super().can_execute(entity)


class CameraInput:
    """Camera subscriptions of ``owner`` whose callbacks run on one thread of their own.

    Args:
        owner: the node the subscriptions belong to.
        logger: where errors of the camera thread go (``error`` with
            ``throttle_duration_sec``); default the owner's logger.
        thread_name: the camera thread's name.
    """

    def __init__(self, owner: Node, *, logger: Any = None,
                 thread_name: str = CAMERA_THREAD_NAME) -> None:
        self._node = owner
        self._log = logger if logger is not None else owner.get_logger()
        self.group = ThreadBoundCallbackGroup()
        self._executor = _GroupExecutor(self.group, context=owner.context)
        self._stop = threading.Event()
        self._destroyed = False
        self._subscriptions: list = []
        self._thread = threading.Thread(target=self._spin, name=thread_name, daemon=True)
        self.group.thread = self._thread

    def subscribe(self, msg_type: Any, topic: str, callback: Callable[[Any], None],
                  qos: QoSProfile) -> Any:
        """``owner.create_subscription`` in the camera group: the name is resolved by the
        owner as any of its topics (namespace, ``~``, remapping); ``callback`` runs on the
        camera thread."""
        sub = self._node.create_subscription(msg_type, topic, callback, qos,
                                             callback_group=self.group)
        self._subscriptions.append(sub)
        return sub

    def start(self) -> None:
        """Start the camera thread (once)."""
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The thread that runs the camera callbacks."""
        return self._thread

    @property
    def alive(self) -> bool:
        """True while the camera thread runs."""
        return self._thread.is_alive()

    def _spin(self) -> None:
        context = self._node.context
        nodes = [self._node]
        # Until stop() or the context's shutdown; a BaseException ends the thread, which the
        # node's diagnostics report as ERROR.
        while not self._stop.is_set() and context.ok():
            try:
                handler, _, _ = self._executor.wait_for_ready_callbacks(
                    timeout_sec=_SPIN_TIMEOUT_S, nodes=nodes)
            except TimeoutException:
                continue
            except (ExternalShutdownException, ShutdownException):
                return
            except InvalidHandle:
                # A subscription destroyed during the wait (shutdown races): rclpy's own
                # executors retry the same way.
                if self._stop.is_set() or not context.ok():
                    return
                continue
            except Exception as exc:  # noqa: BLE001 - camera input must outlive a bad wait
                if self._stop.is_set() or not context.ok():
                    return
                self._log.error(f'camera executor failed: {type(exc).__name__}: {exc}',
                                throttle_duration_sec=5.0)
                self._stop.wait(0.1)  # no busy loop if it keeps failing
                continue
            handler()
            error = handler.exception()
            if error is not None:  # the node's callbacks catch their own; this is a bug
                self._log.error(f'camera callback failed: {type(error).__name__}: {error}',
                                throttle_duration_sec=5.0)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the camera thread and join it (idempotent): no camera callback runs after."""
        self._stop.set()
        if not self._destroyed:
            try:
                self._executor.wake()
            except Exception:  # noqa: BLE001 - the context is shut down: nothing to wake
                pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def destroy(self) -> None:
        """Stop, destroy the camera subscriptions, shut the camera executor down (idempotent;
        before the owner is destroyed)."""
        self.stop()
        if not self._destroyed:
            self._destroyed = True
            for sub in self._subscriptions:
                self._node.destroy_subscription(sub)
            self._subscriptions = []
            self._executor.shutdown(timeout_sec=5.0)
