"""``cbpnet_node``: the rclpy node that learns new image classes on the robot and classifies
camera frames (the contract is docs/interface.md; the README's "Interface" section lists it).

Every topic, service and parameter is created in :meth:`CBPNetNode._create_interfaces` and
:mod:`ros2_cbpnet.ros.parameters` (``~`` = ``/<namespace>/cbpnet``):

- subscribes: each topic of ``image_topics`` (default the relative ``image``; ``Image``, or
  ``CompressedImage`` when the resolved name ends in ``/compressed``) with the QoS of
  ``image_qos``; ``~/labelled_images`` (Image) and ``~/labelled_images/compressed``
  (CompressedImage), label in ``header.frame_id``, reliable keep-all; ``~/teach`` and
  ``~/forget`` (String).
- services (``std_srvs/Trigger``, ``message`` is always JSON, ``{"error": ...}`` on failure):
  ``~/learn_task``, ``~/cancel_learning``, ``~/undo_last_task``, ``~/clear_buffer``,
  ``~/save``.
- publishes: ``~/predictions`` and ``~/learning_progress`` (JSON Strings), ``~/labels``
  (JSON String, transient-local), ``~/debug_image`` (bgr8, only while subscribed),
  ``~/classification`` and ``~/vision_info`` (vision_msgs, when installed),
  ``/diagnostics`` (:mod:`ros2_cbpnet.ros.diagnostics`).

The node class is the ROS wiring; the work is in modules without ROS imports:
:mod:`~ros2_cbpnet.ros.inference_worker` (the newest frame per camera, classified in batches on
one thread; frames arrive decoded and resized to the model input by
:mod:`~ros2_cbpnet.ros.image_codec` on the camera thread), :mod:`~ros2_cbpnet.ros.model_changes`
(learn on one dedicated thread while the service callback waits, cancel, undo, forget, save:
one change at a time, each followed by a checkpoint and ``~/labels``),
:mod:`~ros2_cbpnet.ros.teaching`, and the ROS-facing helpers :mod:`~ros2_cbpnet.ros.parameters`,
:mod:`~ros2_cbpnet.ros.diagnostics`, :mod:`~ros2_cbpnet.ros.vision_msgs_bridge` and
:mod:`~ros2_cbpnet.ros.ros_logging` (the package's Python logger goes to ``/rosout``). Inference
keeps using the previous model while a task is learned (the learner swaps models
atomically). The camera subscriptions are run by a ``SingleThreadedExecutor`` on a thread
of their own, whatever executor spins the node (:mod:`~ros2_cbpnet.ros.camera_input`: a
multi-threaded executor cost more CPU per frame than the model); labelled images, teach,
forget, learn_task (reentrant: a second call is refused at once), cancel, the other services
and diagnostics each have their own callback group on the executor that spins the node; no
exception leaves a callback.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, List, Optional

import rclpy
import rclpy.logging
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node

from .callbacks import error_reply, quiet_opencv
from .node_core import NodeCore
from .node_inputs import InputsMixin, prediction_record
from .node_outputs import OutputsMixin
from .parameters import (DEFAULTS, PARAMETERS, ConfigError, check_parameters,
                         declare_parameters)
from .ros_logging import forward_package_logs, stop_forwarding

__all__ = ['CBPNetNode', 'ConfigError', 'DEFAULTS', 'EXECUTOR_THREADS', 'PARAMETERS',
           'check_parameters', 'declare_parameters', 'main', 'prediction_record', 'run']

#: Seconds main() waits, after SIGINT, for a cancelled task to stop before exiting anyway.
EXIT_WAIT_S = 3.0
#: Executor threads: learn_task (+1 to refuse a concurrent call), labelled images, teach,
#: forget, services, cancel, diagnostics, parameter services, and one spare. (The cameras
#: have a thread of their own: :mod:`ros2_cbpnet.ros.camera_input`.)
EXECUTOR_THREADS = 10


class CBPNetNode(NodeCore, InputsMixin, OutputsMixin, Node):
    """Learns new image classes from labelled images on the robot and classifies camera frames."""

    def __init__(self, *, node_name: str = 'cbpnet', **kwargs: Any) -> None:
        """Create, configure and activate the node; ``kwargs`` go to ``rclpy.node.Node``
        (``context``, ``namespace``, ``parameter_overrides``, ``cli_args``...).

        Raises:
            ConfigError: invalid parameters, unknown backbone or an incompatible checkpoint in
                ``checkpoint_dir`` (the node is destroyed before raising).
        """
        super().__init__(node_name, **kwargs)
        self._init_core()
        # From the start, so what the learner logs while loading checkpoints reaches /rosout.
        self._log_handler: Optional[Any] = forward_package_logs(self.get_logger())
        try:
            loaded = self._configure(declare_parameters(self))
            self._activate()
            self.get_logger().info(self._ready_message(loaded))
        except BaseException:
            self.destroy_node()
            raise

    def destroy_node(self) -> None:
        """Stop the threads, shut the camera executor down, then destroy the ROS entities."""
        self.stop()
        if self._cameras is not None:
            self._cameras.destroy()
        if self._log_handler is not None:
            stop_forwarding(self._log_handler)
            self._log_handler = None
        super().destroy_node()


def run(make_node: Callable[[], Any], args: Optional[List[str]] = None) -> int:
    """Spin a node made by ``make_node`` until SIGINT; the exit code (2: configuration)."""
    # Until the node forwards the package logger to rclpy (and after it is gone).
    logging.basicConfig(level=logging.INFO, format='[%(levelname)s] [%(name)s]: %(message)s')
    quiet_opencv()
    rclpy.init(args=args)
    node: Optional[Any] = None
    executor: Optional[MultiThreadedExecutor] = None
    code = 0
    try:
        node = make_node()
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
        executor.add_node(node)
        executor.spin()
    except ConfigError as exc:
        rclpy.logging.get_logger('cbpnet').fatal(str(exc))
        code = 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:  # noqa: BLE001 - report, then exit non-zero
        rclpy.logging.get_logger('cbpnet').fatal(error_reply(exc))
        code = 1
    finally:
        # Order matters (docs/environment.md): stop our threads (this cancels learning, so
        # the executor's callbacks end at once), then the executor, then destroy the node,
        # then shut rclpy down.
        if node is not None:
            node.stop()
        if executor is not None:
            executor.shutdown(timeout_sec=10.0)
        learning = node is not None and not node.wait_for_learning(EXIT_WAIT_S)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    if learning:
        # The learner checks its cancel flag between chunks and optimiser steps; a chunk of a
        # large frozen pass can still take a while on a small board. Nothing of an unfinished
        # task is ever persisted (checkpoints are written atomically after learning), so
        # leave without joining the learning thread.
        rclpy.logging.get_logger('cbpnet').warning(
            f'a task was still being learned {EXIT_WAIT_S:.0f} s after the stop; exiting '
            'without it (the previous model is what the checkpoint holds)')
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(args: Optional[List[str]] = None) -> int:
    """``cbpnet_node``: run the node until SIGINT. Returns the exit code: 0, 2 for a
    configuration error."""
    return run(CBPNetNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
