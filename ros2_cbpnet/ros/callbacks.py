"""Small helpers of the node's callbacks: no exception ever leaves one, Trigger replies are
JSON, and memory freed after a rare big peak goes back to the OS."""
from __future__ import annotations

import ctypes
import functools
import json
from typing import Any, Callable, Dict

__all__ = ['answer', 'error_reply', 'guarded_callback', 'guarded_service', 'quiet_opencv',
           'release_memory']


def error_reply(exc: BaseException) -> str:
    """``Type: message`` of an exception."""
    return f'{type(exc).__name__}: {exc}'


def guarded_service(name: str) -> Callable:
    """Wrap a Trigger callback: any exception becomes ``success=false`` with the error, never
    an exception in the executor (which would stop spinning for every callback)."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def callback(self: Any, request: Any, response: Any) -> Any:
            try:
                return method(self, request, response)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                self.get_logger().error(f'{name} failed: {error_reply(exc)}')
                response.success = False
                response.message = json.dumps({'error': f'{name} failed: {error_reply(exc)}'})
                return response
        return callback
    return wrap


def guarded_callback(name: str) -> Callable:
    """Wrap a subscription callback: exceptions are logged (throttled), never raised."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def callback(self: Any, *args: Any) -> None:
            try:
                method(self, *args)
            except Exception as exc:  # noqa: BLE001 - keep the executor spinning
                if not self.context.ok():
                    # Shutting down (SIGINT): a callback still running finds the handles it
                    # touches gone. Not a fault; the inference worker treats it the same way.
                    return
                self.get_logger().error(f'{name} failed: {error_reply(exc)}',
                                        throttle_duration_sec=5.0)
        return callback
    return wrap


def answer(response: Any, ok: bool, reply: Dict[str, Any]) -> Any:
    """Fill a ``std_srvs/Trigger`` response: ``success`` and ``message`` as JSON."""
    response.success = bool(ok)
    response.message = json.dumps(reply)
    return response


_LIBC: Any = None


def release_memory() -> None:
    """Give freed heap memory back to the OS after a big, rare allocation peak (learning,
    saving), via glibc's ``malloc_trim``; a no-op where that does not exist."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL('libc.so.6')
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


def quiet_opencv() -> None:
    """Silence OpenCV's own [WARN]/[ERROR] console lines (the process is ours).

    OpenCV prints one line per undecodable frame (e.g. "PNG input buffer is incomplete"),
    unthrottled, so a stream of garbage would flood the log; the node already counts every
    rejection and logs it throttled. (libjpeg/libpng print some warnings themselves, e.g.
    "Corrupt JPEG data", which no OpenCV setting reaches.)
    """
    try:
        import cv2
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)
    except Exception:  # noqa: BLE001 - an OpenCV build without the logging API
        pass
