"""Validation learning curves of training runs: avAP / AP50 of each iteration snapshot against CPU minutes.

Usage::

    python scripts/learning_curve.py --runs runs/baseline_v2 runs/concrete_v2 \\
        --out results/curves

For every ``iter_<N>.pt`` (``--snapshot-every``) and ``final.pt`` of each run, the deterministic
pass on the validation wells (:data:`companion.data.bbbc010.VAL_WELLS`, never the test wells) is
calibrated (background-logit shift chosen on the first 5 validation wells, as the export does)
and segmented with per-component clustering over a small grid (2-fold, as the evaluation), and
the run's ``log.jsonl`` gives the wall-clock minutes and loss terms at that iteration. Writes
``curves.csv`` and ``curves.png`` (one row of panels: val avAP, val AP50, var and dist terms).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="training run folders")
    parser.add_argument("--out", type=Path, required=True, help="folder for curves.csv and curves.png")
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[3.0, 4.0])
    parser.add_argument("--clustering", choices=("global", "components"), default="components")
    parser.add_argument("--max-points", type=int, default=8000)
    parser.add_argument("--wells", nargs="+", default=None, help="default: companion.data.bbbc010.VAL_WELLS")
    parser.add_argument("--data-root", default=None)
    parser.add_argument(
        "--start-minutes",
        type=float,
        nargs="+",
        default=None,
        help="CPU minutes spent before each run's first iteration (its earlier training "
        "stages), one per --runs entry; added to cpu_minutes (default: 0)",
    )
    return parser


def _minutes_at(log: list[dict], iteration: int) -> tuple[float, dict]:
    """Training minutes up to ``iteration`` (summed over logged windows, so pauses between
    sessions do not count) and the last log record at or before it."""
    seconds, record, previous = 0.0, log[0], 0
    for current in log:
        if current["iteration"] > iteration:
            break
        rate = current.get("it_per_s") or float("nan")
        seconds += (current["iteration"] - previous) / rate if rate > 0 else 0.0
        previous, record = current["iteration"], current
    return seconds / 60.0, record


def calibrated_validation(
    model, samples, *, bandwidths, thresholds, clustering: str = "components", max_points: int = 8000
) -> tuple[float, dict]:
    """``(shift, Table 1 row)`` of a model's deterministic pass on validation wells.

    As ``export_pretrained.py --calibrate`` does for the shipped models (the class head of a short
    run under-predicts worms; a background-logit shift fixes most of it), the shift is chosen on
    the first 5 wells and folded into ``model``; then the wells are segmented over the grid,
    2-fold over the wells, as the evaluation does.
    """
    from companion.evaluation.evaluate import evaluate_model
    from companion.inference.recipes import Recipe
    from companion.training.calibration import choose_background_shift, shift_background_logit

    shift = choose_background_shift(model, samples[:5], progress=False).shift
    shift_background_logit(model, shift)
    wells = [s.well for s in samples]
    result = evaluate_model(
        model,
        samples,
        recipe=Recipe(clustering=clustering, max_points=max_points),
        folds=[wells[0::2], wells[1::2]],
        bandwidths=bandwidths,
        thresholds=thresholds,
        progress=False,
    )
    return shift, result.rows[0]


def run_snapshots(run: Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of a run's ``iter_*.pt`` and ``final.pt``, in order, one per iteration."""
    from companion.training.checkpoint import read_checkpoint

    paths = sorted(run.glob("iter_*.pt")) + [p for p in [run / "final.pt"] if p.is_file()]
    found: dict[int, Path] = {}
    for path in paths:
        found.setdefault(int(read_checkpoint(path)["iteration"]), path)
    return list(found.items())


def snapshot_rows(run: Path, samples, args, start_minutes: float = 0.0) -> list[dict]:
    from companion.training.checkpoint import load_model
    from companion.training.run_folder import read_log

    log = read_log(run)
    rows = []
    for iteration, path in run_snapshots(run):
        shift, scores = calibrated_validation(
            load_model(path),
            samples,
            bandwidths=args.bandwidths,
            thresholds=args.thresholds,
            clustering=args.clustering,
            max_points=args.max_points,
        )
        minutes, record = _minutes_at(log, iteration)
        row = dict(
            run=run.name,
            iteration=iteration,
            cpu_minutes=round(start_minutes + minutes, 1),
            background_shift=shift,
            val_avAP=scores["avAP"],
            val_AP50=scores["AP50"],
            var=record.get("var"),
            dist=record.get("dist"),
            ce=record.get("ce"),
        )
        print(
            " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
            flush=True,
        )
        rows.append(row)
    return rows


def plot(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        x = [r["cpu_minutes"] for r in mine]
        for ax, key in zip(axes, ("val_avAP", "val_AP50", "var", "dist")):
            ax.plot(x, [r[key] for r in mine], "o-", label=run)
            ax.set_xlabel("CPU minutes (1 thread)")
            ax.set_ylabel(key)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    from companion._io import atomic_write_bytes
    from companion.data.bbbc010 import VAL_WELLS, load_bbbc010

    args = build_parser().parse_args(argv)
    starts = args.start_minutes or [0.0] * len(args.runs)
    if len(starts) != len(args.runs):
        print(f"error: --start-minutes has {len(starts)} values for {len(args.runs)} runs", file=sys.stderr)
        return 2
    samples = load_bbbc010(args.data_root, args.wells or list(VAL_WELLS), progress=False)
    rows = [row for run, start in zip(args.runs, starts) for row in snapshot_rows(run, samples, args, start)]
    if not rows:
        print("error: no snapshots (iter_*.pt or final.pt) in the given runs", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(args.out / "curves.csv", text.getvalue().encode())
    buffer = io.BytesIO()
    plot(rows).savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(args.out / "curves.png", buffer.getvalue())
    print(f"wrote {args.out / 'curves.csv'} and curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
