"""argparse ``type`` converters shared by the commands: one-line usage errors for bad values."""

from __future__ import annotations

import argparse


def checked(convert, accept, expected: str):
    """An argparse ``type`` converting with ``convert`` and refusing values ``accept`` rejects."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked(float, lambda v: v > 0, "a positive number")
probability = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
