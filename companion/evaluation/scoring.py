"""Any tool's predictions scored against the BBBC010 ground truth, under each protocol.

Table 1 puts our numbers beside the paper's and PatchPerPix's; they are comparable only if they
were computed the same way. :func:`score_predictions` scores predictions read by
:mod:`companion.evaluation.prediction_files` (PatchPerPix's HDF5 label layers, TIFFs, ``predict``'s
``.npz``) with every reading of :func:`companion.evaluation.metrics.instance_metrics`, once per
protocol (:data:`PROTOCOLS`: which test wells count), so that one table shows how much each
choice moves a number (``results/PROTOCOL.md``). ``python -m companion score`` writes the table.

Predictions without scores (other tools' label images) rank in file order for the COCO AP:
its value then depends on that order (``results/PROTOCOL.md`` measures by how much).

Examples
--------
>>> import warnings
>>> from companion.evaluation.prediction_files import Prediction
>>> truths = {well: np.zeros((0, 6, 6), bool) for well in TEST_WELLS}  # no worms, but in C03:
>>> gt = np.zeros((2, 6, 6), bool); gt[0, :3] = True; gt[1, 3:] = True; truths["C03"] = gt
>>> found = Prediction("C03", gt[:1].copy(), None, None)  # one of two worms, exactly
>>> with warnings.catch_warnings(action="ignore"):  # the other wells have no prediction
...     row = score_predictions([found], truths, protocols=("complete",)).rows[0]
>>> round(row["AP50"], 3), row["recall80_iou"], round(row["S50"] * 47, 6)  # C03: S = 1 / 2
(0.505, 0.5, 46.5)
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from companion.data.bbbc010 import TEST_WELLS

from .._io import atomic_write_bytes
from .metrics import IOU_THRESHOLDS, instance_metrics
from .prediction_files import Prediction
from .report import _csv_bytes

__all__ = [
    "PROTOCOLS",
    "INCOMPLETE_TEST_WELLS",
    "ScoreResult",
    "score_predictions",
    "write_scores",
    "ground_truth_masks",
]

#: Test wells whose images lack a channel in BBBC010 v1 (their masks are whole).
INCOMPLETE_TEST_WELLS: tuple[str, ...] = ("C13", "C14", "D24")
#: Which test wells a protocol scores.
PROTOCOLS: dict[str, str] = {
    "complete": "the 47 test wells with both image channels (this project's Table 1)",
    "all": "all 50 test wells (C13, C14 and D24 scored from their masks; PatchPerPix's test set)",
}
#: The IoU thresholds of PatchPerPix's per-threshold table and its mean ``avS``.
S_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
#: The columns of a row: Table 1's, the strict Recall .8, and the per-threshold scores.
COLUMNS: tuple[str, ...] = (
    ("avAP", "AP50", "AP75", "recall80", "avAP_dsb", "recall80_iou")
    + tuple(f"S{round(100 * t)}" for t in S_THRESHOLDS)
    + ("avS",)
)


class ScoreResult(NamedTuple):
    """``rows``: one per protocol (name, description, wells, scores, every column);
    ``per_image``: one per protocol and well; ``missing``: test wells without a prediction
    (scored as empty predictions)."""

    rows: list[dict]
    per_image: list[dict]
    missing: list[str]


def _protocol_wells(name: str) -> list[str]:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return [w for w in TEST_WELLS if name == "all" or w not in INCOMPLETE_TEST_WELLS]


def _row(name: str, wells: Sequence[str], metrics: dict, scored: bool) -> dict:
    curve = dict(zip(np.round(IOU_THRESHOLDS, 2).tolist(), metrics["dsb_per_threshold"]))
    values = {k: metrics[k] for k in COLUMNS[:6]}
    values.update({f"S{round(100 * t)}": curve[t] for t in S_THRESHOLDS})
    values["avS"] = float(np.mean([curve[t] for t in S_THRESHOLDS]))
    ranking = "the files' scores" if scored else "none in the files: unit scores, file order"
    return dict(name=name, description=PROTOCOLS[name], wells=len(wells), scores=ranking, **values)


def score_predictions(
    predictions: Sequence[Prediction],
    truths: Mapping[str, np.ndarray],
    *,
    protocols: Sequence[str] = tuple(PROTOCOLS),
) -> ScoreResult:
    """Score ``predictions`` against ``truths`` (well -> bool ``(K, H, W)``) per protocol.

    A test well without a prediction counts as an empty one (its worms all missed) and is
    named in ``missing``; a prediction of a well that is not a test well raises ``ValueError``;
    a protocol needing a well ``truths`` lacks raises ``KeyError`` naming it.
    """
    by_well = {p.well: p for p in predictions}
    foreign = sorted(set(by_well) - set(TEST_WELLS))
    if foreign:
        raise ValueError(f"predictions of wells outside the test split: {', '.join(foreign)}")
    rows, per_image, missing = [], [], set()
    scored = all(p.scores is not None for p in predictions)
    for name in protocols:
        wells = _protocol_wells(name)
        lacking = [w for w in wells if w not in truths]
        if lacking:
            raise KeyError(f"no ground truth for well(s) {', '.join(lacking)} (protocol {name!r})")
        gts = [np.asarray(truths[w], bool) for w in wells]
        preds, scores = [], []
        for well, gt in zip(wells, gts):
            found = by_well.get(well)
            if found is None:
                missing.add(well)
            masks = found.masks if found is not None else np.zeros((0, *gt.shape[1:]), bool)
            if masks.shape[1:] != gt.shape[1:]:
                raise ValueError(
                    f"{found.path}: masks of shape {masks.shape[1:]}, well {well}'s are {gt.shape[1:]}"
                )
            preds.append(masks)
            scores.append(
                found.scores if found is not None and found.scores is not None else np.ones(len(masks))
            )
        metrics = instance_metrics(gts, preds, scores)
        rows.append(_row(name, wells, metrics, scored))
        for well, image in zip(wells, metrics["per_image"]):
            per_image.append(
                dict(protocol=name, well=well, **{k: v for k, v in image.items() if k != "index"})
            )
    if missing:
        warnings.warn(
            f"no prediction for test well(s) {', '.join(sorted(missing))}: scored as empty", stacklevel=2
        )
    return ScoreResult(rows, per_image, sorted(missing))


def write_scores(result: ScoreResult, out: str | os.PathLike, *, info: Mapping | None = None) -> list[Path]:
    """``results.json`` (rows, missing wells, ``info``), ``table1.csv`` and ``per_image.csv``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    document = dict(info or {}, rows=result.rows, missing_wells=result.missing)
    written = [
        atomic_write_bytes(out / "results.json", (json.dumps(document, indent=1) + "\n").encode()),
        atomic_write_bytes(out / "table1.csv", _csv_bytes(result.rows, list(result.rows[0]))),
        atomic_write_bytes(out / "per_image.csv", _csv_bytes(result.per_image, list(result.per_image[0]))),
    ]
    return written


def ground_truth_masks(
    root: str | os.PathLike | None = None, wells: Sequence[str] = TEST_WELLS
) -> dict[str, np.ndarray]:
    """The ground-truth masks of test wells from a BBBC010 folder, incomplete wells included."""
    from companion.data.bbbc010 import _check_wells, find_layout, load_masks, resolve_root

    wells = _check_wells(wells)
    root = resolve_root(root)
    if root.is_file():
        raise ValueError(
            f"{root} is an archive of wells; scoring needs the BBBC010 folder (the archive lacks the "
            f"incomplete wells)"
        )
    layout = find_layout(root)
    return {w: load_masks(layout, w) for w in wells}
