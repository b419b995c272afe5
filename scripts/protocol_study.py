"""How much the definition of each Table 1 metric moves a peer's published numbers.

Usage::

    python scripts/protocol_study.py PATCHPERPIX_PREDICTIONS --out results/protocol

``PATCHPERPIX_PREDICTIONS`` is the folder ``wormbodies/03_results/setup08/`` of
Kainmueller-Lab/PatchPerPix_experiments (50 HDF5 files, one per test well; they carry no licence,
so they are read, never copied into this repository). Writes ``patchperpix.json`` (every
number of ``results/PROTOCOL.md``) and prints its tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

N_RANDOM_ORDERS = 20


def coco_by_ranking(ious: list[np.ndarray], areas: list[np.ndarray], seed: int = 0) -> dict:
    """COCO avAP / AP50 / AP75 of predictions without scores under several rankings."""
    from companion.evaluation.metrics import coco_ap

    best = [iou.max(axis=1) if iou.shape[1] else np.zeros(len(iou)) for iou in ious]  # (P,) per image
    orders = {
        "file order (unit scores)": [np.ones(len(i)) for i in ious],
        "reverse file order": [-np.arange(len(i), dtype=float) for i in ious],
        "larger instances first": areas,
        "best ranking (by IoU with the truth)": best,
        "worst ranking": [-b for b in best],
    }
    out = {}
    for name, scores in orders.items():
        ap = coco_ap(ious, scores)
        out[name] = dict(avAP=float(ap.mean()), AP50=float(ap[0]), AP75=float(ap[5]))
    per_image = np.array([coco_ap([iou], [np.ones(len(iou))]) for iou in ious if iou.shape[1]])
    out["file order, COCO AP per image averaged over images"] = dict(
        avAP=float(per_image.mean()), AP50=float(per_image[:, 0].mean()), AP75=float(per_image[:, 5].mean())
    )
    rng = np.random.default_rng(seed)
    random = np.array([coco_ap(ious, [rng.random(len(i)) for i in ious]) for _ in range(N_RANDOM_ORDERS)])
    for key, values in (("avAP", random.mean(axis=1)), ("AP50", random[:, 0]), ("AP75", random[:, 5])):
        out.setdefault(f"{N_RANDOM_ORDERS} random orders", {})[key] = dict(
            mean=float(values.mean()), min=float(values.min()), max=float(values.max())
        )
    return out


def readings(gts: list[np.ndarray], preds: list[np.ndarray]) -> dict:
    """Recall .8 and the DSB score under the readings the lab's code and ours allow."""
    from companion.evaluation.metrics import IOU_THRESHOLDS, iou_matrix, matched_pairs

    n_gt = sum(len(g) for g in gts)
    iou_hits, dice_hits, per_image_recall, s, prec_rec, pooled = (
        0,
        0,
        [],
        [],
        [],
        np.zeros((len(IOU_THRESHOLDS), 3)),
    )
    for gt, pred in zip(gts, preds):
        iou = iou_matrix(gt, pred)
        dice = 2 * iou / (1 + iou)
        hits = len(matched_pairs(iou, 0.8)[0])
        iou_hits += hits
        dice_hits += len(matched_pairs(dice, 0.8)[0])
        per_image_recall.append(hits / max(1, len(gt)))
        tp = np.array([len(matched_pairs(iou, t)[0]) for t in IOU_THRESHOLDS], float)
        s.append(tp / np.maximum(1, len(gt) + len(pred) - tp))
        prec_rec.append(tp / max(1, len(pred)) * tp / max(1, len(gt)))
        pooled += np.stack([tp, len(pred) - tp, len(gt) - tp], axis=1)
    return dict(
        recall80=dict(
            dice_pooled=dice_hits / n_gt,
            iou_pooled=iou_hits / n_gt,
            iou_per_image=float(np.mean(per_image_recall)),
        ),
        dsb=dict(
            per_image_S=float(np.mean(s)),
            pooled_S=float(np.mean(pooled[:, 0] / pooled.sum(axis=1))),
            per_image_precision_x_recall=float(np.mean(prec_rec)),
        ),
    )


def main(argv=None) -> int:
    from companion.data.bbbc010 import TEST_WELLS
    from companion.evaluation.metrics import iou_matrix
    from companion.evaluation.paper import PATCHPERPIX, PATCHPERPIX_S
    from companion.evaluation.prediction_files import read_predictions
    from companion.evaluation.scoring import INCOMPLETE_TEST_WELLS, ground_truth_masks, score_predictions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, default=None)
    args = parser.parse_args(argv)
    predictions = read_predictions(args.predictions)
    truths = ground_truth_masks(args.data_root)
    by_well = {p.well: p.masks for p in predictions}
    result = dict(
        source="Kainmueller-Lab/PatchPerPix_experiments, wormbodies/03_results/setup08 (ppp+dec), "
        f"{len(predictions)} files, dataset vote_instances",
        published=dict(table1=PATCHPERPIX, readme_S=PATCHPERPIX_S),
        rows=score_predictions(predictions, truths).rows,
    )
    for name, wells in (
        ("complete", [w for w in TEST_WELLS if w not in INCOMPLETE_TEST_WELLS]),
        ("all", list(TEST_WELLS)),
    ):
        gts, preds = [truths[w] for w in wells], [by_well[w] for w in wells]
        ious = [iou_matrix(g, p).T for g, p in zip(gts, preds)]
        result[name] = dict(
            coco_by_ranking=coco_by_ranking(ious, [p.sum(axis=(1, 2)).astype(float) for p in preds]),
            **readings(gts, preds),
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "patchperpix.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
