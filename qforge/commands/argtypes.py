"""Argument types the commands share: a number read from a flag, checked, with argparse's one-line error."""
from __future__ import annotations

import argparse
from typing import Callable


def checked(kind: type, ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: `kind(text)` that satisfies `ok`, else "expected <expected>, got TEXT"."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value
    parse.__name__ = expected  # what argparse names in its "invalid ... value" line
    return parse


positive_int = checked(int, lambda v: v >= 1, "a whole number >= 1")
port_number = checked(int, lambda v: 0 <= v <= 65535, "a port number 0-65535")
positive_seconds = checked(float, lambda v: v > 0, "a number of seconds > 0")
fraction = checked(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
non_negative_int = checked(int, lambda v: v >= 0, "a whole number >= 0")
fraction_0_1 = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
