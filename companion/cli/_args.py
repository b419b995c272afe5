"""argparse ``type`` converters shared by the commands: one-line usage errors for bad values."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def add_data_source(parser: argparse.ArgumentParser, synthetic_help: str) -> None:
    """``--data-root`` (the BBBC010 copy) or ``--synthetic N`` (worms made up), not both."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder with the BBBC010 copy, or an archive of its wells written by `python -m "
        "companion pack` (default: $BBBC010_ROOT, else the download cache, downloading the data "
        "there if needed)",
    )
    source.add_argument("--synthetic", type=positive_int, default=None, metavar="N", help=synthetic_help)
