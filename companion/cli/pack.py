"""``python -m companion pack``: BBBC010 wells into one archive that ``--data-root`` accepts."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

#: The archive must travel with a copy of the working tree (e.g. to a GPU machine).
ARCHIVE_LIMIT_MIB = 64


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the ``pack`` subcommand."""
    p = commands.add_parser(
        "pack",
        help="pack BBBC010 wells into one file (see `python -m companion pack --help`)",
        description="Write BBBC010 wells losslessly into one LZMA-compressed .npz (44 MiB "
        "for the fitting, validation and complete test wells) that every command's --data-root "
        "accepts in place of the folder: for a machine that sees a copy of the working tree but "
        "not the data (companion.data.archive).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("archive", type=Path, help="the .npz file to write (replaced if it exists)")
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="BBBC010 folder (default: $BBBC010_ROOT, else the download cache)",
    )
    p.add_argument(
        "--wells",
        nargs="+",
        default=None,
        help="only these wells (default: the training and test wells, incomplete ones skipped)",
    )
    p.add_argument("--no-verify", action="store_true", help="do not read the archive back to compare")
    p.set_defaults(func=_run_pack)


def _same(samples: list, again: list) -> bool:
    import numpy as np

    return len(again) == len(samples) and all(
        a.well == b.well and np.array_equal(a.image, b.image) and np.array_equal(a.instances, b.instances)
        for a, b in zip(samples, again)
    )


def _run_pack(args: argparse.Namespace) -> int:
    from companion.data.archive import pack_samples, read_archive
    from companion.data.bbbc010 import TEST_WELLS, TRAIN_WELLS, load_bbbc010

    if args.archive.is_dir():
        print(f"error: {args.archive} is a folder; name the .npz file to write", file=sys.stderr)
        return 2
    wells = list(args.wells or (TRAIN_WELLS + TEST_WELLS))
    start = time.perf_counter()
    samples = load_bbbc010(args.data_root, wells, skip_incomplete=True, progress=True)
    skipped = [w for w in wells if w not in {s.well for s in samples}]
    size = pack_samples(samples, args.archive, note=f"skipped incomplete wells: {' '.join(skipped)}")
    print(
        f"packed {len(samples)} wells ({len(skipped)} incomplete skipped: {' '.join(skipped) or '-'}) "
        f"into {args.archive}: {size / 2**20:.1f} MiB in {time.perf_counter() - start:.0f} s"
    )
    if not args.no_verify and not _same(samples, read_archive(args.archive)):
        print(f"error: {args.archive} does not read back as the loaded wells", file=sys.stderr)
        return 1
    if size >= ARCHIVE_LIMIT_MIB * 2**20:
        print(
            f"warning: {args.archive} is {size / 2**20:.1f} MiB, more than the {ARCHIVE_LIMIT_MIB} MiB "
            f"that a copy of the working tree may carry to a GPU machine",
            file=sys.stderr,
        )
    return 0
