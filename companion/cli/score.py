"""``python -m companion score``: any tool's predictions scored like Table 1, once per protocol."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the ``score`` subcommand."""
    from companion.evaluation.scoring import PROTOCOLS

    p = commands.add_parser(
        "score",
        help="score predictions of any tool on the test wells (see `python -m companion score --help`)",
        description="Score instance predictions (one file per test well, the well id in its name: "
        "HDF5 label layers as PatchPerPix writes them, label or mask-stack TIFFs, the .npz files of "
        "`python -m companion predict`) against the BBBC010 ground truth with every Table 1 "
        "metric, once per protocol: "
        + "; ".join(f"{k}: {v}" for k, v in PROTOCOLS.items())
        + ". Writes OUT/results.json, table1.csv and per_image.csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("predictions", nargs="+", type=Path, help="prediction files, or folders of them")
    p.add_argument("--out", type=Path, required=True, help="folder for the result files")
    p.add_argument(
        "--data-root", type=Path, default=None, help="BBBC010 folder (default: $BBBC010_ROOT, else the cache)"
    )
    p.add_argument(
        "--dataset", default=None, help="HDF5 dataset or .npz key (default: vote_instances, masks, ...)"
    )
    p.add_argument(
        "--protocols", nargs="+", choices=sorted(PROTOCOLS), default=list(PROTOCOLS), help="test-well sets"
    )
    p.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from companion.evaluation.prediction_files import read_predictions
    from companion.evaluation.scoring import ground_truth_masks, score_predictions, write_scores

    started = time.time()
    predictions = read_predictions(args.predictions, dataset=args.dataset)
    result = score_predictions(predictions, ground_truth_masks(args.data_root), protocols=args.protocols)
    info = dict(
        command="python -m companion score " + " ".join(args.argv),
        predictions=[p.path.name for p in predictions],
        wall_time_s=round(time.time() - started, 1),
    )
    write_scores(result, args.out, info=info)
    for row in result.rows:
        print(
            f"{row['name']} ({row['wells']} wells): avAP {row['avAP']:.3f}  AP50 {row['AP50']:.3f}  "
            f"AP75 {row['AP75']:.3f}  recall80 {row['recall80']:.3f} (IoU: {row['recall80_iou']:.3f})  "
            f"DSB {row['avAP_dsb']:.3f}  avS {row['avS']:.3f}"
        )
    if result.missing:
        print(
            f"no prediction for {len(result.missing)} test well(s): {', '.join(result.missing)}",
            file=sys.stderr,
        )
    print(f"wrote {args.out}/results.json, table1.csv, per_image.csv")
    return 0
