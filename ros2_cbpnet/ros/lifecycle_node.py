"""``cbpnet_lifecycle_node``: the same node as a managed (lifecycle) node, for bring-ups that
drive their nodes through the ROS 2 lifecycle (Nav2's lifecycle manager, yolo_ros).

Transitions (``ros2 lifecycle set /cbpnet configure`` etc., or ``~/change_state``):

- **configure**: reads the parameters, loads the backbone and the newest checkpoint, creates
  the services, the labelled-image, teach and forget subscriptions, the publishers and
  ``/diagnostics``; learning works from here on. Read-only parameters are fixed at the first
  configure (a parameter never reads back a value the node is not using), so change them before it.
- **activate**: subscribes the cameras and starts the inference thread.
- **deactivate**: unsubscribes the cameras and stops classifying; everything learned stays,
  and learning, undo, forget and the fleet keep working.
- **cleanup**: releases the model and every interface configure created (back to
  unconfigured); a later configure loads the checkpoint again.
- **shutdown**: cleans up from any state.

Topics, services, parameters and their meaning are those of ``cbpnet_node``.
"""
from __future__ import annotations

from typing import Any, List, Optional

from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn

from .callbacks import error_reply
from .node import run
from .node_core import NodeCore
from .node_inputs import InputsMixin
from .node_outputs import OutputsMixin
from .parameters import ConfigError, declare_parameters, plain_value
from .ros_logging import forward_package_logs, stop_forwarding

__all__ = ['CBPNetLifecycleNode', 'main']


class CBPNetLifecycleNode(NodeCore, InputsMixin, OutputsMixin, LifecycleNode):
    """``cbpnet_node`` as a managed node: configure loads, activate classifies."""

    def __init__(self, *, node_name: str = 'cbpnet', **kwargs: Any) -> None:
        """Create the node, unconfigured, with its parameters declared; ``kwargs`` go to
        ``rclpy.lifecycle.Node``."""
        super().__init__(node_name, **kwargs)
        self._init_core()
        self._log_handler: Optional[Any] = forward_package_logs(self.get_logger())
        self._declared = declare_parameters(self)

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        """Load the backbone and the checkpoint; create every interface but the cameras."""
        try:
            values = {name: self._declared_value(name) for name in self._declared}
            loaded = self._configure(values)
        except (ConfigError, ValueError) as exc:
            self.get_logger().error(f'configure failed: {exc}')
            self._cleanup()
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info('configured: ' + self._ready_message(loaded))
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        """Subscribe the cameras and classify."""
        try:
            self._activate()
        except Exception as exc:  # noqa: BLE001 - a failed transition, not a dead node
            self.get_logger().error(f'activate failed: {error_reply(exc)}')
            self._deactivate()
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f'active: cameras {self._camera_topics}')
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        """Stop classifying; keep everything learned."""
        self._deactivate()
        self.get_logger().info('inactive: cameras unsubscribed, the model is kept')
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        """Release the model and the interfaces."""
        self._cleanup()
        self.get_logger().info('cleaned up: the model is released')
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        """Clean up from any state."""
        if self._configured:
            self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    @property
    def _configured(self) -> bool:
        """True between a successful configure and cleanup (the model exists)."""
        return self._model is not None

    def _declared_value(self, name: str) -> Any:
        return plain_value(self.get_parameter(name).value)

    def destroy_node(self) -> None:
        """Clean up, then destroy the node."""
        if self._configured:
            self._cleanup()
        if self._log_handler is not None:
            stop_forwarding(self._log_handler)
            self._log_handler = None
        super().destroy_node()


def main(args: Optional[List[str]] = None) -> int:
    """``cbpnet_lifecycle_node``: run the managed node until SIGINT (it starts unconfigured)."""
    return run(CBPNetLifecycleNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
