"""A dependency-free text progress bar for terminals and logs (no ROS).

On a terminal the bar redraws in place (carriage return). When the stream is not a terminal
(CI logs, files, ``ros2 launch`` output) it prints a full line only about every 10 % and at
the end, so logs stay short.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, TextIO

__all__ = ['ProgressBar']


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f'{value:.3g}'
    return str(value)


class ProgressBar:
    """Text progress bar, e.g. ``train |#####-----| 12/40 loss=0.31 acc=0.92``.

    Usable as a context manager, which calls :meth:`close` on exit.

    Args:
        total: Number of steps expected (>= 0).
        prefix: Text before the bar.
        width: Number of bar characters.
        stream: Where to write; defaults to ``sys.stderr`` at construction time.
    """

    def __init__(self, total: int, prefix: str = '', width: int = 30,
                 stream: TextIO | None = None) -> None:
        if total < 0:
            raise ValueError(f'total must be >= 0, got {total}')
        if width < 1:
            raise ValueError(f'width must be >= 1, got {width}')
        self.total = int(total)
        self.prefix = prefix
        self.width = int(width)
        # Resolved here, not as a default argument, so pytest's capsys and redirections work.
        self.stream = sys.stderr if stream is None else stream
        self.count = 0
        self.postfix: dict[str, Any] = {}
        self._tty = self._isatty()
        self._last_decile = 0
        self._last_printed_count: int | None = None
        self._last_len = 0
        self._closed = False

    def _isatty(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    def render(self) -> str:
        """The current bar as one line, without carriage return or newline."""
        frac = 1.0 if self.total == 0 else min(max(self.count / self.total, 0.0), 1.0)
        filled = int(round(frac * self.width))
        parts = [self.prefix] if self.prefix else []
        parts.append(f'|{"#" * filled}{"-" * (self.width - filled)}|')
        parts.append(f'{self.count}/{self.total}')
        parts.extend(f'{k}={_format_value(v)}' for k, v in self.postfix.items())
        return ' '.join(parts)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` steps and set postfix values (they persist until overwritten).

        Args:
            n: Steps completed since the last call.
            **postfix: Values shown after the counter, e.g. ``loss=0.31``.
        """
        if self._closed:
            return
        self.count += n
        self.postfix.update(postfix)
        if self._tty:
            self._draw_tty()
            return
        decile = self._decile()
        if decile > self._last_decile or self.count >= self.total:
            if self._last_printed_count != self.count:
                self._write(self.render() + '\n')
                self._last_printed_count = self.count
            self._last_decile = decile

    def _decile(self) -> int:
        if self.total == 0:
            return 10
        return min(10, (10 * self.count) // self.total)

    def _draw_tty(self) -> None:
        line = self.render()
        # Pad so a shorter line fully overwrites the previous one.
        pad = ' ' * max(0, self._last_len - len(line))
        self._write('\r' + line + pad)
        self._last_len = len(line)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (ValueError, OSError):
            # A closed or broken stream must never crash training.
            pass

    def close(self) -> None:
        """Finish the bar: final newline on a terminal, final state line in a log."""
        if self._closed:
            return
        self._closed = True
        if self._tty:
            if self._last_len == 0:
                self._draw_tty()
            self._write('\n')
        elif self._last_printed_count != self.count:
            self._write(self.render() + '\n')
            self._last_printed_count = self.count

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
