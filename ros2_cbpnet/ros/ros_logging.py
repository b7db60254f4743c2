"""Forward Python ``logging`` records to an rclpy logger, so they reach ``/rosout``.

The learner and checkpoint code log with Python's ``logging`` under the name
``ros2_cbpnet`` (they must not import ROS). Without this bridge those records only go to
stderr (or nowhere), never to ``/rosout``, ``ros2 topic echo /rosout`` or rqt_console.
"""
from __future__ import annotations

import logging
from typing import Any

__all__ = ['PACKAGE_LOGGER', 'RosLogHandler', 'forward_package_logs', 'stop_forwarding']

#: The Python logger the package's ROS-free code logs under (children: .learner, .checkpoint).
PACKAGE_LOGGER = 'ros2_cbpnet'


class RosLogHandler(logging.Handler):
    """A ``logging.Handler`` that re-emits records through an rclpy logger.

    The record's logger name is kept as a ``[name]`` prefix, since all records share the
    node's rclpy logger (child rclpy loggers only reach ``/rosout`` from ROS 2 Iron on).

    Args:
        ros_logger: what ``node.get_logger()`` returns (anything with ``debug``, ``info``,
            ``warning``, ``error`` and ``fatal`` methods taking a message string).
    """

    def __init__(self, ros_logger: Any) -> None:
        super().__init__(level=logging.DEBUG)
        self._ros_logger = ros_logger

    def emit(self, record: logging.LogRecord) -> None:
        """Send one record; never raises (a logging failure must not break the caller)."""
        try:
            message = f'[{record.name}] {self.format(record)}'
            if record.levelno >= logging.CRITICAL:
                self._ros_logger.fatal(message)
            elif record.levelno >= logging.ERROR:
                self._ros_logger.error(message)
            elif record.levelno >= logging.WARNING:
                self._ros_logger.warning(message)
            elif record.levelno >= logging.INFO:
                self._ros_logger.info(message)
            else:
                self._ros_logger.debug(message)
        except Exception:  # noqa: BLE001 - e.g. the context is already shut down
            self.handleError(record)


def forward_package_logs(ros_logger: Any) -> RosLogHandler:
    """Attach a :class:`RosLogHandler` to the ``ros2_cbpnet`` Python logger.

    The Python logger is set to pass DEBUG and up (the rclpy logger's own level, e.g.
    ``--log-level``, then decides what is printed and published) and stops propagating to
    the root logger, so records are not printed twice. Undo with :func:`stop_forwarding`
    when the node goes away.
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    handler = RosLogHandler(ros_logger)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return handler


def stop_forwarding(handler: RosLogHandler) -> None:
    """Detach ``handler``; with no bridge left, records propagate to the root logger again."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.removeHandler(handler)
    if not any(isinstance(h, RosLogHandler) for h in logger.handlers):
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
