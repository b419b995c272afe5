"""The numbers Rumberger, Mais and Kainmueller (2020) report, to print beside ours.

Only what the paper states is here; every number the book computes comes from the code.

Examples
--------
>>> TABLE1["concrete"]["avAP"], TABLE1["baseline"]["AP50"]
(0.77, 0.963)
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "TABLE1_KEYS",
    "ROW_KEYS",
    "TABLE1",
    "PATCHPERPIX",
    "PATCHPERPIX_S",
    "FIGURE1_WELLS",
    "FIGURE2_AT_005",
    "TABLE2",
    "published",
]


#: The columns of Table 1, in the paper's order (the metrics of a Table 1 row).
TABLE1_KEYS: tuple[str, ...] = ("avAP", "AP50", "AP75", "recall80", "avAP_dsb")

#: The columns of an evaluated row: Table 1's, and Recall .8 read at IoU >= 0.8 (``recall80_iou``,
#: the reading that reproduces the paper's PatchPerPix row; ``results/PROTOCOL.md``).
ROW_KEYS: tuple[str, ...] = (*TABLE1_KEYS, "recall80_iou")

#: Table 1 of the paper: BBBC010 test split; the concrete model's agglomerated Monte-Carlo
#: probabilities binarised at 0.75, the baseline's single deterministic prediction.
TABLE1: dict[str, dict[str, float]] = {
    "baseline": dict(avAP=0.761, AP50=0.963, AP75=0.879, recall80=0.81, avAP_dsb=0.686),
    "concrete": dict(avAP=0.770, AP50=0.974, AP75=0.883, recall80=0.81, avAP_dsb=0.703),
}

#: Table 1's PatchPerPix row (Hirsch, Mais and Kainmueller 2020; its test split has all 50 test
#: wells and its predictions carry no confidence score, see ``results/PROTOCOL.md``).
PATCHPERPIX: dict[str, float] = dict(avAP=0.775, AP50=0.939, AP75=0.891, recall80=0.895, avAP_dsb=0.727)

#: PatchPerPix's own README (Kainmueller-Lab/PatchPerPix, ppp+dec on BBBC010): S = TP / (TP + FP +
#: FN) per image at IoU 0.5, 0.6, ..., 0.9, averaged over images, and their mean ``avS``.
PATCHPERPIX_S: dict[str, float] = dict(S50=0.960, S60=0.955, S70=0.931, S80=0.805, S90=0.428, avS=0.816)

#: Figure 2 of the paper at the entropy threshold 0.05 (its text): the probability that a certain
#: 4 x 4 patch is accurate, and that an inaccurate one is flagged uncertain.
FIGURE2_AT_005: dict[str, float] = dict(
    threshold=0.05, p_accurate_given_certain=0.962, p_uncertain_given_inaccurate=0.559
)

#: The test wells of the paper's Figure 1 (predictions and uncertainties of its Concrete model).
FIGURE1_WELLS: tuple[str, ...] = ("C10", "C04", "D21")

#: Table 2 of the paper: the Concrete model's metrics after 0, 5, ..., 20 simulated corrections
#: at the highest uncertainty peaks (its Recall .8 read at IoU 0.8, see ``published``).
TABLE2: dict[int, dict[str, float]] = {
    0: dict(avAP=0.770, AP50=0.974, AP75=0.883, recall80=0.81, avAP_dsb=0.703),
    5: dict(avAP=0.779, AP50=0.977, AP75=0.883, recall80=0.82, avAP_dsb=0.714),
    10: dict(avAP=0.782, AP50=0.978, AP75=0.896, recall80=0.83, avAP_dsb=0.719),
    15: dict(avAP=0.786, AP50=0.980, AP75=0.897, recall80=0.83, avAP_dsb=0.725),
    20: dict(avAP=0.791, AP50=0.982, AP75=0.903, recall80=0.84, avAP_dsb=0.735),
}


def published(row: Mapping[str, float]) -> dict[str, float | None]:
    """A published Table 1 row in the evaluated columns (:data:`ROW_KEYS`): its Recall .8 is the
    IoU reading, ``recall80_iou`` (``results/PROTOCOL.md``); the Dice reading is unknown.

    >>> published(TABLE1["concrete"])["recall80_iou"], published(TABLE1["concrete"])["recall80"]
    (0.81, None)
    """
    return {**row, "recall80": None, "recall80_iou": row["recall80"]}
