"""argparse value types shared by the command-line tools (``cbpnet-eval``, ``cbpnet-bench``).

Each turns a bad value into an ``argparse.ArgumentTypeError`` whose message says what was
expected, so every tool refuses ``--epochs -1`` or ``--lr nan`` the same way.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, TypeVar

__all__ = ['fraction', 'non_negative_float', 'non_negative_int', 'positive_float',
           'positive_int']

_N = TypeVar('_N', int, float)


def _number(cast: Callable[[str], _N], accept: Callable[[_N], bool], expected: str,
            name: str) -> Callable[[str], _N]:
    """An argparse type: ``cast`` the text, then require ``accept`` of the value."""
    def parse(text: str) -> _N:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}') from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}')
        return value
    # argparse names the type in its own messages ("invalid positive_int value").
    parse.__name__ = name
    return parse


positive_int = _number(int, lambda v: v >= 1, 'a positive integer', 'positive_int')
non_negative_int = _number(int, lambda v: v >= 0, 'an integer >= 0', 'non_negative_int')
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, 'a positive number',
                         'positive_float')
non_negative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, 'a number >= 0',
                             'non_negative_float')
fraction = _number(float, lambda v: 0.0 <= v <= 1.0, 'a number in [0, 1]', 'fraction')
