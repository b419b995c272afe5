"""Export a training checkpoint as shipped pretrained weights (companion/pretrained/<name>.pt + .json).

Usage::

    python scripts/export_pretrained.py --checkpoint runs/concrete/final.pt --name concrete \\
        --command "python -m companion train --preset colab --out runs/concrete"

Writes float16 weights and a provenance record (command, preset and overrides, git commit,
iterations, training time, hardware, final loss terms, learned dropout rates, sha256) with
:func:`companion.pretrained.export`; refuses weights over 15 MiB.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a companion training checkpoint as pretrained weights (fp16 .pt + provenance .json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="training checkpoint (runs/NAME/final.pt or last.pt); its log.jsonl is read "
                             "from the same folder")
    parser.add_argument("--name", required=True,
                        help="model name, the file stem: concrete or baseline for the shipped models")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="target folder (default: the installed companion/pretrained/)")
    parser.add_argument("--command", default=None,
                        help="the command that trained the checkpoint, recorded verbatim in the .json")
    parser.add_argument("--log", type=Path, default=None,
                        help="the run's log.jsonl if it is not beside the checkpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from companion.pretrained import export

    args = build_parser().parse_args(argv)
    weights, info = export(args.checkpoint, args.name, args.out_dir, command=args.command, log=args.log)
    print(f"wrote {weights} ({weights.stat().st_size / 2**20:.2f} MiB) and {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
