"""Instance-segmentation metrics for overlapping instances: COCO mask AP, recall80, DSB AP.

Ground truth and predictions are stacks of binary masks ``(K, H, W)`` (worms overlap, so a
label image cannot hold them). All metrics start from one matrix of pairwise IoUs per image,
:func:`iou_matrix`, computed with a single matrix product over the flattened masks.

Readings (how each number in the book's Table 1 is defined):

``avAP``, ``AP50``, ``AP75``
    COCO mask average precision exactly as ``pycocotools.cocoeval.COCOeval`` computes it for
    ``iouType="segm"``, one category, ``iscrowd=0``, area range "all" and ``maxDets=100``:
    per image the predictions are sorted by descending score (stable sort) and cut to the
    first 100; at each IoU threshold :math:`t \\in \\{0.50, 0.55, \\dots, 0.95\\}` each
    prediction in turn is matched greedily to the unmatched ground-truth instance of highest
    IoU among those with IoU :math:`\\ge t` (ties go to the later instance, as in COCOeval).
    True and false positives of all images are pooled, sorted by score, and precision is
    made monotone and read at the 101 recall points 0, 0.01, ..., 1. ``AP50``/``AP75`` are
    the means over the recall points at t = 0.5/0.75, ``avAP`` the mean over all ten
    thresholds. With no ground truth at all the value is -1, as in COCOeval.
``recall80``
    Share of ground-truth instances (pooled over images) that get a one-to-one partner
    (Hungarian matching) whose pixel F1 score (Dice) is at least 0.8; nan without any gt.
``recall80_iou``
    The same with IoU >= 0.8 instead of Dice >= 0.8 (Dice 0.8 is IoU 0.67, so this is the
    stricter reading): the one that reproduces the paper's PatchPerPix "Recall .8" from
    PatchPerPix's published predictions (``results/PROTOCOL.md``).
``avAP_dsb``
    The Data Science Bowl 2018 score: per image and threshold t, TP / (TP + FP + FN) with a
    one-to-one (Hungarian) matching that counts pairs with IoU >= t; averaged over the ten
    thresholds, then over images. An image with neither ground truth nor predictions scores 1.
    ``dsb_per_threshold`` keeps the ten per-threshold means over images (PatchPerPix's
    README reports those at 0.5, 0.6, ..., 0.9 and their mean).

Examples
--------
>>> import numpy as np
>>> gt = np.zeros((1, 8, 8), bool); gt[0, 2:6, 2:6] = True
>>> result = instance_metrics([gt], [gt.copy()], [np.array([0.9])])
>>> round(result["avAP"], 6), result["recall80"], result["avAP_dsb"]
(1.0, 1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse
from scipy.optimize import linear_sum_assignment

__all__ = [
    "IOU_THRESHOLDS",
    "RECALL_POINTS",
    "Overlaps",
    "overlaps",
    "iou_matrix",
    "matched_pairs",
    "PRCurve",
    "precision_recall_curve",
    "coco_ap",
    "dsb_score",
    "instance_metrics",
]

#: IoU thresholds 0.50:0.05:0.95, built exactly like pycocotools' ``Params.iouThrs``.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
#: Recall points 0:0.01:1 of the 101-point interpolated precision (pycocotools' ``recThrs``).
RECALL_POINTS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETECTIONS = 100

#: Above this mean share of pixels per mask the dense float32 product beats the sparse one
#: (crossover measured at 5-10 % on 520 x 696 images; a BBBC010 worm covers about 1 %).
_DENSE_ABOVE_FILL = 0.05


class Overlaps(NamedTuple):
    """Pixel counts between two mask stacks: ``intersection`` (K, L), ``area_a`` (K,), ``area_b`` (L,)."""

    intersection: np.ndarray
    area_a: np.ndarray
    area_b: np.ndarray


def _as_stack(masks: np.ndarray, name: str) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"{name} must be a (K, H, W) stack of masks, got shape {masks.shape}")
    if masks.dtype != bool and masks.size and not np.isin(masks, (0, 1)).all():
        raise ValueError(
            f"{name} must hold binary masks (bool or 0/1), got {masks.dtype} values such as "
            f"{masks[~np.isin(masks, (0, 1))].flat[0]!r}: binarise probability maps first "
            f"(e.g. companion.inference.agglomerate.binarize)"
        )
    return masks.astype(bool, copy=False)


def _sparse_rows(masks: np.ndarray) -> scipy.sparse.csr_matrix:
    """The stack as a (K, H*W) CSR matrix of ones, built straight from ``np.flatnonzero``."""
    n, n_pixels = len(masks), masks.shape[1] * masks.shape[2]
    flat_index = np.flatnonzero(masks)  # sorted: mask by mask, pixel by pixel
    indptr = np.searchsorted(flat_index, np.arange(n + 1) * n_pixels)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    data = np.ones(len(flat_index), np.float32)
    return scipy.sparse.csr_matrix((data, flat_index - rows * n_pixels, indptr), shape=(n, n_pixels))


def overlaps(a: np.ndarray, b: np.ndarray, *, dense: bool | None = None) -> Overlaps:
    """Intersections and areas of all pairs of masks of two stacks, in one matrix product.

    Parameters
    ----------
    a, b : ndarray of bool, shapes (K, H, W) and (L, H, W)
    dense : bool, optional
        Force the dense float32 product (True) or the sparse CSR one (False). By default the
        sparse product is used unless the masks cover more than 5 % of the image on average:
        worms cover about 1 % each, where ``benchmarks/bench_metrics.py`` shows the sparse
        product about five times faster.

    Returns
    -------
    Overlaps
        ``intersection[k, l] = |a_k ∩ b_l|`` (int64) and the areas of each mask.

    Examples
    --------
    >>> a = np.zeros((1, 4, 4), bool); a[0, :2] = True
    >>> b = np.zeros((2, 4, 4), bool); b[0, :1] = True; b[1] = True
    >>> overlaps(a, b).intersection
    array([[4, 8]])
    """
    a, b = _as_stack(a, "a"), _as_stack(b, "b")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"mask stacks differ in image size: a {a.shape}, b {b.shape}")
    if dense is None:
        n_pixels = a.shape[1] * a.shape[2]
        fill = np.count_nonzero(a) + np.count_nonzero(b)
        dense = fill > _DENSE_ABOVE_FILL * max((len(a) + len(b)) * n_pixels, 1)
    if dense:
        fa = a.reshape(len(a), a.shape[1] * a.shape[2]).astype(np.float32)
        fb = b.reshape(len(b), b.shape[1] * b.shape[2]).astype(np.float32)
        area_a, area_b, product = fa.sum(axis=1), fb.sum(axis=1), fa @ fb.T
    else:
        sa, sb = _sparse_rows(a), _sparse_rows(b)
        area_a, area_b = np.diff(sa.indptr), np.diff(sb.indptr)
        product = (sa @ sb.T).toarray()
    # float32 sums of 0/1 values are exact below 2**24 pixels per image
    as_int = lambda x: np.rint(x).astype(np.int64)  # noqa: E731
    return Overlaps(as_int(product), as_int(area_a), as_int(area_b))


def _iou_from(ov: Overlaps) -> np.ndarray:
    union = ov.area_a[:, None] + ov.area_b[None, :] - ov.intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, ov.intersection / np.maximum(union, 1), 0.0)
    return iou.astype(np.float64)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every mask of ``a`` with every mask of ``b``.

    Parameters
    ----------
    a, b : ndarray of bool, shapes (K, H, W) and (L, H, W)

    Returns
    -------
    ndarray of float64, shape (K, L)
        Intersection over union; 0 where both masks are empty.

    Examples
    --------
    >>> a = np.zeros((1, 4, 4), bool); a[0, :2] = True
    >>> b = np.zeros((1, 4, 4), bool); b[0, 1:3] = True
    >>> iou_matrix(a, b)
    array([[0.33333333]])
    """
    return _iou_from(overlaps(a, b))


def matched_pairs(scores: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching that maximises the number of pairs with ``score >= threshold``.

    Hungarian matching (``scipy.optimize.linear_sum_assignment``) on a cost that counts the
    pairs above the threshold first and breaks ties by the sum of scores (the cost used by
    stardist's ``matching``). Only pairs with ``score >= threshold`` are returned.

    Parameters
    ----------
    scores : ndarray, shape (K, L)
        E.g. an IoU matrix, rows ground truth, columns predictions.
    threshold : float

    Returns
    -------
    rows, cols : ndarray of int
        Indices of the matched pairs.

    Examples
    --------
    >>> matched_pairs(np.array([[0.9, 0.6], [0.7, 0.0]]), 0.5)
    (array([0, 1]), array([1, 0]))
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-d matrix, got shape {scores.shape}")
    if scores.size == 0:
        return np.zeros(0, int), np.zeros(0, int)
    above = scores >= threshold
    n_max = min(scores.shape)
    cost = -above.astype(np.float64) - scores / (2.0 * n_max)
    rows, cols = linear_sum_assignment(cost)
    keep = above[rows, cols]
    return rows[keep], cols[keep]


def _sort_and_cut(scores: np.ndarray) -> np.ndarray:
    """Indices of the first ``MAX_DETECTIONS`` predictions by descending score (stable)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")[:MAX_DETECTIONS]


def _greedy_coco_matches(iou: np.ndarray) -> np.ndarray:
    """COCOeval's greedy matching for all thresholds at once.

    ``iou`` is (D, G) with predictions already in score order. Returns a bool array (T, D):
    whether each prediction is a true positive at each threshold.
    """
    n_dt, n_gt = iou.shape
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[:, None]
    matched_gt = np.zeros((len(IOU_THRESHOLDS), n_gt), bool)
    is_tp = np.zeros((len(IOU_THRESHOLDS), n_dt), bool)
    if n_gt == 0:
        return is_tp
    reversed_cols = np.arange(n_gt)[::-1]
    for d in range(n_dt):
        candidate = (~matched_gt) & (iou[d][None, :] >= thresholds)
        masked = np.where(candidate, iou[d][None, :], -np.inf)
        # COCOeval keeps the *last* gt among equal best IoUs: argmax over reversed columns
        best = reversed_cols[np.argmax(masked[:, ::-1], axis=1)]
        found = candidate.any(axis=1)
        matched_gt[np.flatnonzero(found), best[found]] = True
        is_tp[:, d] = found
    return is_tp


class PRCurve(NamedTuple):
    """Pooled precision-recall curves, one row per IoU threshold of :data:`IOU_THRESHOLDS`.

    ``scores`` (N,) are the predictions' scores in the pooled ranking; ``recall`` and
    ``precision`` (T, N) the raw curves after each prediction; ``interpolated`` (T, 101) the
    monotone precision read at :data:`RECALL_POINTS`; ``n_gt`` the number of gt instances.
    """

    scores: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    interpolated: np.ndarray
    n_gt: int


def _interpolated_precision(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """101-point interpolated precision of one threshold (COCOeval's ``accumulate``)."""
    monotone = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at any higher recall
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = np.zeros(len(RECALL_POINTS))
    valid = idx < len(monotone)
    sampled[valid] = monotone[idx[valid]]
    return sampled


def precision_recall_curve(
    iou_per_image: Sequence[np.ndarray], scores_per_image: Sequence[np.ndarray]
) -> PRCurve:
    """COCO's pooled precision-recall curves from per-image IoU matrices.

    Parameters
    ----------
    iou_per_image : sequence of ndarray, shapes (D_i, G_i)
        IoU of each prediction (rows, in the caller's order) with each gt instance.
    scores_per_image : sequence of ndarray, shapes (D_i,)

    Returns
    -------
    PRCurve

    Examples
    --------
    >>> curve = precision_recall_curve([np.array([[0.8], [0.0]])], [np.array([0.9, 0.1])])
    >>> curve.recall[0].tolist(), curve.precision[0].round(3).tolist()
    ([1.0, 1.0], [1.0, 0.5])
    """
    all_scores, all_tp = [], []
    n_gt = 0
    for iou, scores in zip(iou_per_image, scores_per_image, strict=True):
        n_dt, g = iou.shape
        if n_dt == 0 and g == 0:
            continue  # COCOeval skips images with neither
        order = _sort_and_cut(scores)
        n_gt += g
        all_scores.append(np.asarray(scores, dtype=np.float64)[order])
        all_tp.append(_greedy_coco_matches(iou[order]))
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    tp = np.concatenate(all_tp, axis=1) if all_tp else np.zeros((len(IOU_THRESHOLDS), 0), bool)
    order = np.argsort(-scores, kind="mergesort")
    tp = tp[:, order]
    tp_sum = np.cumsum(tp, axis=1).astype(float)
    fp_sum = np.cumsum(~tp, axis=1).astype(float)
    recall = tp_sum / max(n_gt, 1)
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    interpolated = np.array([_interpolated_precision(p, r) for p, r in zip(precision, recall)])
    return PRCurve(scores[order], recall, precision, interpolated.reshape(len(IOU_THRESHOLDS), -1), n_gt)


def coco_ap(iou_per_image: Sequence[np.ndarray], scores_per_image: Sequence[np.ndarray]) -> np.ndarray:
    """COCO average precision per IoU threshold from per-image IoU matrices.

    Parameters
    ----------
    iou_per_image : sequence of ndarray, shapes (D_i, G_i)
        IoU of each prediction (rows, in the caller's order) with each gt instance.
    scores_per_image : sequence of ndarray, shapes (D_i,)

    Returns
    -------
    ndarray, shape (10,)
        AP at each of :data:`IOU_THRESHOLDS`; all -1 when there is no gt instance.

    Examples
    --------
    >>> coco_ap([np.array([[0.8], [0.0]])], [np.array([0.9, 0.1])])[[0, 7]].round(6)
    array([1., 0.])
    """
    curve = precision_recall_curve(iou_per_image, scores_per_image)
    if curve.n_gt == 0:
        return -np.ones(len(IOU_THRESHOLDS))
    return curve.interpolated.mean(axis=1)


def dsb_score(iou: np.ndarray) -> np.ndarray:
    """Data Science Bowl score TP / (TP + FP + FN) of one image at each IoU threshold.

    Parameters
    ----------
    iou : ndarray, shape (G, D)
        IoU of gt instances (rows) with predictions (columns).

    Returns
    -------
    ndarray, shape (10,)
        One value per threshold in :data:`IOU_THRESHOLDS`; 1 for an empty image with no predictions.

    Examples
    --------
    >>> dsb_score(np.array([[0.7, 0.2]]))[[0, 4]]  # one TP and one FP at 0.5; at 0.7 still one TP
    array([0.5, 0.5])
    """
    n_gt, n_pred = iou.shape
    if n_gt == 0 and n_pred == 0:
        return np.ones(len(IOU_THRESHOLDS))
    values = []
    for t in IOU_THRESHOLDS:
        n_tp = len(matched_pairs(iou, t)[0])
        values.append(n_tp / (n_gt + n_pred - n_tp))
    return np.array(values)


def _recalled_at_dice(ov: Overlaps, min_dice: float) -> int:
    """Number of gt instances with a one-to-one partner of Dice >= ``min_dice``."""
    if ov.intersection.size == 0:
        return 0
    total = ov.area_a[:, None] + ov.area_b[None, :]
    dice = np.where(total > 0, 2.0 * ov.intersection / np.maximum(total, 1), 0.0)
    return len(matched_pairs(dice, min_dice)[0])


def instance_metrics(
    gts: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    *,
    min_dice: float = 0.8,
) -> dict:
    """All of Table 1's metrics for a list of images (see the module docstring for the readings).

    Parameters
    ----------
    gts : sequence of ndarray of bool, shapes (K_i, H, W)
        Ground-truth instances per image.
    preds : sequence of ndarray of bool, shapes (L_i, H, W)
        Predicted instances per image.
    scores : sequence of ndarray, shapes (L_i,)
        Confidence of each prediction (only the COCO AP uses it).
    min_dice : float
        Dice needed for a gt instance to count as recalled in ``recall80`` (and the IoU in
        ``recall80_iou``).

    Returns
    -------
    dict
        ``avAP``, ``AP50``, ``AP75``, ``recall80``, ``avAP_dsb``, ``recall80_iou`` (floats),
        ``dsb_per_threshold`` (10 floats) and ``per_image``: one dict per image with ``index``,
        ``n_gt``, ``n_pred``, ``n_recalled80``, ``n_recalled80_iou``, ``AP50``
        and ``avAP`` (COCO AP of that image alone, -1 without gt), ``avAP_dsb``, ``dsb50``.

    Examples
    --------
    >>> gt = np.zeros((3, 6, 6), bool); gt[0, :2] = True; gt[1, 2:4] = True; gt[2, 4:] = True
    >>> merged = gt.any(axis=0, keepdims=True)  # a false merge: IoU 1/3 with each instance
    >>> r = instance_metrics([gt], [merged], [np.array([1.0])])
    >>> r["AP50"], r["recall80"]
    (0.0, 0.0)
    """
    if not (len(gts) == len(preds) == len(scores)):
        raise ValueError(f"gts, preds and scores differ in length: {len(gts)}, {len(preds)}, {len(scores)}")
    ious, per_image, dsb_values = [], [], []
    n_gt_total = n_recalled = n_recalled_iou = 0
    for i, (gt, pred, score) in enumerate(zip(gts, preds, scores)):
        gt, pred = _as_stack(gt, f"gts[{i}]"), _as_stack(pred, f"preds[{i}]")
        score = np.asarray(score, dtype=np.float64).reshape(-1)
        if len(score) != len(pred):
            raise ValueError(f"image {i}: {len(pred)} predictions but {len(score)} scores")
        ov = overlaps(gt, pred)
        iou = _iou_from(ov)  # (G, D)
        ious.append(iou.T)
        recalled, recalled_iou = _recalled_at_dice(ov, min_dice), len(matched_pairs(iou, min_dice)[0])
        n_gt_total += len(gt)
        n_recalled += recalled
        n_recalled_iou += recalled_iou
        dsb = dsb_score(iou)
        dsb_values.append(dsb)
        ap = coco_ap([iou.T], [score])
        per_image.append(
            dict(
                index=i,
                n_gt=len(gt),
                n_pred=len(pred),
                n_recalled80=recalled,
                n_recalled80_iou=recalled_iou,
                AP50=float(ap[0]),
                avAP=float(ap.mean()) if ap[0] >= 0 else -1.0,
                avAP_dsb=float(dsb.mean()),
                dsb50=float(dsb[0]),
            )
        )
    ap = coco_ap(ious, scores)
    has_gt = ap[0] >= 0
    return dict(
        avAP=float(ap.mean()) if has_gt else -1.0,
        AP50=float(ap[0]),
        AP75=float(ap[5]),
        recall80=n_recalled / n_gt_total if n_gt_total else float("nan"),
        avAP_dsb=float(np.mean([p["avAP_dsb"] for p in per_image])) if per_image else float("nan"),
        recall80_iou=n_recalled_iou / n_gt_total if n_gt_total else float("nan"),
        dsb_per_threshold=np.mean(dsb_values, axis=0).tolist() if dsb_values else [],
        per_image=per_image,
    )
