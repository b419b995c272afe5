"""Export a training checkpoint as shipped pretrained weights (companion/pretrained/<name>.pt + .json).

Usage::

    python scripts/export_pretrained.py --checkpoint runs/concrete/final.pt --name concrete \\
        --command "python -m companion train --preset colab --out runs/concrete"

Writes float16 weights and a provenance record (command, preset and overrides, git commit,
iterations, training time, hardware, final loss terms, learned dropout rates, sha256) with
:func:`companion.training.export.export`; refuses weights over 15 MiB.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a companion training checkpoint as pretrained weights (fp16 .pt + provenance .json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="training checkpoint (runs/NAME/final.pt or last.pt); its log.jsonl is read "
        "from the same folder",
    )
    parser.add_argument(
        "--name", required=True, help="model name, the file stem: concrete or baseline for the shipped models"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="target folder (default: the installed companion/pretrained/)",
    )
    parser.add_argument(
        "--command",
        default=None,
        help="the command that trained the checkpoint, recorded verbatim in the .json",
    )
    parser.add_argument(
        "--log", type=Path, default=None, help="the run's log.jsonl if it is not beside the checkpoint"
    )
    parser.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help="choose a shift of the background logit on the first N validation wells "
        "(companion.data.bbbc010.VAL_WELLS, held out from training) by the foreground pixel F1 and fold it "
        "into the weights (companion.training.calibration; not in the paper). 0: no shift",
    )
    parser.add_argument(
        "--calibrate-draws",
        type=int,
        default=0,
        metavar="D",
        help="with --calibrate: choose the shift on D Monte-Carlo draws per well (the "
        "pixels foreground in >= --agreement of them) instead of the deterministic "
        "pass; for a Concrete Dropout model whose draws are agglomerated",
    )
    parser.add_argument(
        "--agreement",
        type=float,
        default=0.75,
        help="with --calibrate-draws: the fraction of draws that must call a pixel "
        "foreground (the binarisation threshold of the agglomeration)",
    )
    parser.add_argument(
        "--earlier-stage",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a stage this run continued from (init_from), oldest first: an exported "
        "model's .json provenance or a training checkpoint; repeatable",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="BBBC010 folder for --calibrate (default: $BBBC010_ROOT, else the cache)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from companion.training.export import export, stage_summary

    args = build_parser().parse_args(argv)
    shift, calibration = 0.0, None
    if args.calibrate:
        from companion.data.bbbc010 import VAL_WELLS, load_bbbc010
        from companion.training.calibration import choose_background_shift
        from companion.training.checkpoint import load_model

        wells = list(VAL_WELLS[: args.calibrate])
        choice = choose_background_shift(
            load_model(args.checkpoint),
            load_bbbc010(args.data_root, wells=wells),
            draws=args.calibrate_draws,
            agreement=args.agreement,
            progress=True,
        )
        shift = choice.shift
        method = "foreground pixel F1 on validation wells"
        if args.calibrate_draws:
            method += (
                f", of the pixels foreground in >= {args.agreement:g} of {args.calibrate_draws} "
                f"Monte-Carlo draws (seed 0)"
            )
        calibration = dict(
            method=method,
            wells=choice.wells,
            shifts=choice.shifts.tolist(),
            f1=[round(float(f), 5) for f in choice.f1],
        )
        print(
            f"background shift {shift} (foreground F1 {choice.f1.max():.3f}; "
            f"{choice.f1[0]:.3f} without a shift) on {len(wells)} validation wells"
        )
    weights, info = export(
        args.checkpoint,
        args.name,
        args.out_dir,
        command=args.command,
        log=args.log,
        background_shift=shift,
        calibration=calibration,
        earlier_stages=[s for path in args.earlier_stage for s in stage_summary(path)],
    )
    print(f"wrote {weights} ({weights.stat().st_size / 2**20:.2f} MiB) and {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
