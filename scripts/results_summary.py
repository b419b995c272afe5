"""Write results/README.md: Table 1 of the shipped models beside the paper's, with their training budget.

Usage::

    python scripts/results_summary.py            # reads results/*/results.json and the provenance records

Every number in the file comes from ``results/<name>/results.json`` (written by
``python -m companion evaluate``), ``companion/pretrained/<name>.json`` (written by
``scripts/export_pretrained.py``) or :data:`companion.evaluation.paper.TABLE1`; re-run it after a new evaluation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


#: The columns of results/README.md's Table 1: the paper's, Recall .8 under both readings.
COLUMNS = ("avAP", "AP50", "AP75", "recall80", "recall80_iou", "avAP_dsb")
HEADERS = ("avAP", "AP50", "AP75", "Recall .8 (Dice)", "Recall .8 (IoU)", "DSB avAP")


def _metrics_line(label: str, metrics: dict) -> str:
    values = (metrics.get(k) for k in COLUMNS)
    return f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + " |"


def _peer_lines(results_dir: Path) -> list[str]:
    """PatchPerPix: the paper's row, and its published predictions scored here."""
    import json

    from companion.evaluation.paper import PATCHPERPIX, published

    lines = [_metrics_line("paper, PatchPerPix (50 test wells)", published(PATCHPERPIX))]
    study = results_dir / "protocol" / "patchperpix.json"
    if study.is_file():
        for row in json.loads(study.read_text())["rows"]:
            lines.append(
                _metrics_line(
                    f"PatchPerPix's published predictions scored here ({row['wells']} wells, no scores)", row
                )
            )
    return lines


def _figure2_and_table2_lines(results_dir: Path) -> list[str]:
    """Figure 2 at entropy 0.05 beside the paper's, and Table 2's first and last rows (concrete)."""
    from companion.book import chapters
    from companion.evaluation.paper import FIGURE2_AT_005

    try:
        doc = chapters.results("concrete", results_dir)
    except FileNotFoundError:
        return []
    lines = []
    at = [r for r in doc.get("pavpu") or [] if abs(r["threshold"] - FIGURE2_AT_005["threshold"]) < 1e-9]
    if at and at[0]["p_uncertain_given_inaccurate"] is not None:
        lines += [
            "",
            f"Figure 2 at entropy {FIGURE2_AT_005['threshold']}: p(uncertain | inaccurate) = "
            f"{at[0]['p_uncertain_given_inaccurate']:.3f} (paper: "
            f"{FIGURE2_AT_005['p_uncertain_given_inaccurate']:.3f}), PAvPU = {at[0]['pavpu']:.3f}.",
        ]
    rows = doc.get("proofreading") or []
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        lines += [
            "",
            f"Table 2 (simulated guided proofreading, concrete): avAP {first['avAP']:.3f} with "
            f"{first['n_corrections']} corrections, {last['avAP']:.3f} with {last['n_corrections']}.",
        ]
    return lines


def summary(results_dir: Path, pretrained_dir: Path | None = None) -> str:
    """The Markdown text of results/README.md."""
    from companion.book import chapters
    from companion.evaluation.paper import TABLE1, published

    lines = [
        "# Evaluation of the shipped models on the BBBC010 test wells",
        "",
        "Written by `python scripts/results_summary.py` from the files in this folder (each folder's",
        "`results.json` comes from `python -m companion evaluate --pretrained <name> --out results/<name>`;",
        "`--save-recipe` stores each row's inference recipe beside the weights, where",
        "`Segmenter.pretrained(name, row)` and `python -m companion predict` read it).",
        "",
        "## Table 1",
        "",
        "| model | " + " | ".join(HEADERS) + " |",
        "|---|" + "---|" * len(HEADERS),
    ]
    budgets = []
    for name in ("concrete", "baseline"):
        for folder, clustering in (
            (name, ""),
            (f"{name}_components", ", per-component clustering"),
            (f"{name}_components_flips", ", per-component clustering, 4 flips"),
        ):
            try:
                doc = chapters.results(folder, results_dir)
            except FileNotFoundError:
                continue
            for row in doc["rows"]:
                label = {
                    "mc": f"ours, {name}: {doc['settings']['draws']} MC draws agglomerated, p >= "
                    f"{doc['settings']['binarize_at']}",
                    "flips_agglomerated": f"ours, {name}: {doc['settings']['draws']} flipped passes "
                    f"agglomerated, p >= {doc['settings']['binarize_at']}",
                    "deterministic": f"ours, {name}: one deterministic pass",
                }[row["name"]]
                lines.append(_metrics_line(label + clustering, row))
            if not clustering:
                budgets.append(
                    f"* {chapters.training_budget(name, pretrained_dir)}; evaluated on "
                    f"{len(doc['wells'])} test wells (skipped as incomplete: "
                    f"{', '.join(doc.get('skipped_wells') or []) or 'none'})."
                )
    for name in ("concrete", "baseline"):
        lines.append(_metrics_line(f"paper, {name}", published(TABLE1[name])))
    lines += _peer_lines(results_dir)
    lines += [
        "",
        "Our rows: the 47 complete test wells; COCO AP pooled over them, ranked by each mask's score.",
        "Recall .8 under two readings: a one-to-one partner with Dice >= 0.8 (this project's first",
        "reading) or with IoU >= 0.8 (stricter; the reading that reproduces the paper's PatchPerPix",
        "Recall .8 from PatchPerPix's published predictions, so the paper's Recall .8 values stand in",
        "that column). What the published predictions can and cannot settle: `results/PROTOCOL.md`.",
    ]
    lines += _figure2_and_table2_lines(results_dir)
    lines += [
        "",
        "Training budgets (the paper: 800 000 iterations of 512 x 512 crops on a GPU; its batch size is not stated):",
        "",
        *budgets,
        "",
        "Rows without a clustering note use the paper's global mean-shift, its bandwidth and",
        "threshold chosen by 2-fold cross-validation on the test folds. Per-component rows",
        "(`*_components/`, not in the paper) use the bandwidth and threshold chosen on the validation wells",
        "(`companion.data.bbbc010.VAL_WELLS`), so no test well took part in their choice. Rows with",
        '"4 flips" (`*_components_flips/`, not in the paper) add test-time augmentation: the',
        "deterministic pass averages the class probabilities of the image's four flips, and the",
        "Monte-Carlo draws cycle through the flips (`evaluate --flips`); the baseline, which has",
        "no draws, also gets its four flipped passes segmented one by one and agglomerated like",
        'Monte-Carlo draws ("flipped passes agglomerated").',
        "",
        "Per-image numbers: `*/per_image.csv`; the choice of bandwidth and",
        "threshold: `*/tuning.csv`; the Figure 2 curves: `concrete/pavpu.csv` and `concrete/pavpu.png`;",
        "Table 2 (simulated proofreading): `concrete/proofreading.csv`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--pretrained-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    from companion._io import atomic_write_bytes

    text = summary(args.results_dir, args.pretrained_dir)
    atomic_write_bytes(args.results_dir / "README.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
