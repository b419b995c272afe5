"""Uncertainty-guided proofreading, simulated (the paper's Table 2).

A human proofreader has time for a few corrections. The uncertainty tells where to look: the
*uncertainty map* of an image is, per pixel, the largest Bernoulli entropy over all predicted
instances' probability maps, averaged over 4 x 4 patches. The most uncertain patches of the
whole test set, with non-maximum suppression so that no two *peaks* of one image lie within
16 px of each other, are shown to the proofreader in order.

The simulated proofreader, at a peak patch, fixes every predicted instance (binarised at 0.75)
that touches the *region*, the patch and its one-patch border: an instance matched to a
ground-truth worm (Hungarian matching on IoU, pairs with IoU > 0) is replaced by that worm, an
unmatched one is deleted. Every ground-truth worm touching the region is fixed too: the
prediction matched to it is replaced by it even when that prediction lies outside the region
(say, the part of a worm predicted too short ends before the peak), and a worm that no
prediction matches is added.
Corrected and added instances get score 1 (a human vouches for them). The metrics of
:func:`companion.evaluation.metrics.instance_metrics` are then recomputed for n = 0, 5, 10, 15, 20 corrections.

Examples
--------
>>> gt = np.zeros((1, 16, 16), bool); gt[0, 2:10, 2:10] = True
>>> probs = np.zeros((1, 16, 16), np.float32); probs[0, 2:10, 2:6] = 0.8; probs[0, 2:10, 6:10] = 0.5
>>> table = simulate_proofreading([gt], [probs], (0, 1))
>>> [round(row["avAP"], 3) for row in table.rows]  # half the worm (IoU 0.5), then the whole
[0.1, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from companion.inference.agglomerate import BINARIZE_AT, instance_scores, uncertainty_map

from .metrics import instance_metrics
from .uncertainty import hungarian_partners, masked_patch_means

__all__ = [
    "patch_means",
    "Peaks",
    "find_peaks",
    "Correction",
    "correct_at_peaks",
    "ProofreadingTable",
    "simulate_proofreading",
    "TABLE2_CORRECTIONS",
]

#: Numbers of corrections in the paper's Table 2.
TABLE2_CORRECTIONS = (0, 5, 10, 15, 20)


def patch_means(image: np.ndarray, patch_size: int = 4) -> np.ndarray:
    """Means over non-overlapping ``patch_size`` squares (partial border patches over their pixels).

    Examples
    --------
    >>> patch_means(np.arange(16.0).reshape(4, 4), 2).tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-d, got shape {image.shape}")
    h, w = image.shape
    hp, wp = -(-h // patch_size), -(-w // patch_size)
    padded = np.zeros((hp * patch_size, wp * patch_size))
    valid = np.zeros_like(padded)
    padded[:h, :w], valid[:h, :w] = image, 1.0
    return masked_patch_means(padded, valid, patch_size)


class Peaks(NamedTuple):
    """Peak patches in descending uncertainty: image index, top-left pixel (y, x), patch mean."""

    image: np.ndarray
    y: np.ndarray
    x: np.ndarray
    value: np.ndarray


def find_peaks(
    maps: Sequence[np.ndarray],
    n_peaks: int,
    *,
    patch_size: int = 4,
    min_distance: float = 16.0,
) -> Peaks:
    """The ``n_peaks`` most uncertain patches over all images, with non-maximum suppression.

    Patches are visited in descending order of their mean (ties: image, then row-major order);
    a patch is accepted unless an accepted peak of the same image lies within ``min_distance``
    pixels (Euclidean distance of the patch corners, ``<= min_distance``). Patches with mean 0
    are never peaks.

    Parameters
    ----------
    maps : sequence of ndarray, shapes (H, W)
        Pixel uncertainty maps (:func:`uncertainty_map`).
    n_peaks : int
    patch_size : int
    min_distance : float

    Returns
    -------
    Peaks
        At most ``n_peaks`` entries.

    Examples
    --------
    >>> m = np.zeros((8, 40)); m[:4, 0:4] = 0.6; m[:4, 4:8] = 0.5; m[:4, 36:40] = 0.4
    >>> find_peaks([m], 3).x.tolist()  # the patch at x=4 is suppressed by the one at x=0
    [0, 36]
    """
    if n_peaks < 0:
        raise ValueError(f"n_peaks must be >= 0, got {n_peaks}")
    images, ys, xs, values = [], [], [], []
    for i, m in enumerate(maps):
        means = patch_means(m, patch_size)
        py, px = np.nonzero(means > 0)
        images.append(np.full(len(py), i)), ys.append(py * patch_size), xs.append(px * patch_size)
        values.append(means[py, px])
    if not images:
        return Peaks(*(np.zeros(0, int),) * 3, np.zeros(0))
    image, y, x, value = (np.concatenate(a) for a in (images, ys, xs, values))
    order = np.argsort(-value, kind="stable")
    accepted: list[int] = []
    for j in order:
        if len(accepted) == n_peaks:
            break
        same = [a for a in accepted if image[a] == image[j]]
        if same and np.min(np.hypot(y[same] - y[j], x[same] - x[j])) <= min_distance:
            continue
        accepted.append(int(j))
    idx = np.array(accepted, dtype=int)
    return Peaks(image[idx], y[idx], x[idx], value[idx])


class Correction(NamedTuple):
    """Predictions after proofreading, per image, and what changed.

    ``changed[i]`` indexes the instances of ``preds[i]`` that the proofreader replaced or added;
    ``n_replaced``, ``n_removed``, ``n_added`` count over all images.
    """

    preds: list
    scores: list
    changed: list
    n_replaced: int
    n_removed: int
    n_added: int


def _peak_region(shape: tuple[int, int], ys, xs, patch_size: int) -> np.ndarray:
    region = np.zeros(shape, bool)
    for y, x in zip(ys, xs):
        region[max(y - patch_size, 0) : y + 2 * patch_size, max(x - patch_size, 0) : x + 2 * patch_size] = (
            True
        )
    return region


def correct_at_peaks(
    gts: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    peaks: Peaks,
    *,
    patch_size: int = 4,
) -> Correction:
    """Apply the simulated proofreader at the given peaks (see the module docstring).

    Parameters
    ----------
    gts, preds : sequences of ndarray of bool, shapes (K_i, H, W) and (L_i, H, W)
    scores : sequence of ndarray, shapes (L_i,)
    peaks : Peaks
        Peak patches to visit (all of them).
    patch_size : int

    Returns
    -------
    Correction

    Examples
    --------
    >>> gt = np.zeros((1, 12, 12), bool); gt[0, :6, :6] = True
    >>> wrong = np.zeros((1, 12, 12), bool); wrong[0, :3, :6] = True
    >>> fixed = correct_at_peaks([gt], [wrong], [np.ones(1)], Peaks(np.array([0]), np.array([0]), np.array([0]), np.ones(1)))
    >>> bool((fixed.preds[0] == gt).all()), fixed.n_replaced
    (True, 1)
    """
    out_preds, out_scores, changed = [], [], []
    n_replaced = n_removed = n_added = 0
    for i, (gt, pred, score) in enumerate(zip(gts, preds, scores)):
        gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
        score = np.asarray(score, dtype=np.float64)
        at = peaks.image == i
        if not at.any():
            out_preds.append(pred), out_scores.append(score), changed.append(np.zeros(0, int))
            continue
        region = _peak_region(gt.shape[1:], peaks.y[at], peaks.x[at], patch_size)
        partner = hungarian_partners(pred, gt)
        gt_touched = (gt & region).any(axis=(1, 2))
        # the proofreader fixes what they see: predictions in the region, and the predictions
        # of true worms in the region even where those predictions lie outside it
        touched = (pred & region).any(axis=(1, 2)) | ((partner >= 0) & gt_touched[np.maximum(partner, 0)])
        keep_masks, keep_scores, new = [], [], []
        for k in range(len(pred)):
            if not touched[k]:
                keep_masks.append(pred[k]), keep_scores.append(score[k])
            elif partner[k] >= 0:
                new.append(len(keep_masks))
                keep_masks.append(gt[partner[k]]), keep_scores.append(1.0)
                n_replaced += 1
            else:
                n_removed += 1
        unmatched_gt = np.setdiff1d(np.flatnonzero(gt_touched), partner[partner >= 0])
        for g in unmatched_gt:
            new.append(len(keep_masks))
            keep_masks.append(gt[g]), keep_scores.append(1.0)
            n_added += 1
        stack = np.stack(keep_masks) if keep_masks else np.zeros((0,) + gt.shape[1:], bool)
        out_preds.append(stack), out_scores.append(np.array(keep_scores, dtype=np.float64))
        changed.append(np.array(new, dtype=int))
    return Correction(out_preds, out_scores, changed, n_replaced, n_removed, n_added)


class ProofreadingTable(NamedTuple):
    """Table 2: ``rows`` (one dict of metrics per number of corrections), the peaks visited
    (all, in order) and the :class:`Correction` of each row."""

    rows: list
    peaks: Peaks
    corrections: list


def simulate_proofreading(
    gts: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    n_corrections: Sequence[int] = TABLE2_CORRECTIONS,
    *,
    binarize_at: float = BINARIZE_AT,
    scores: Sequence[np.ndarray] | None = None,
    patch_size: int = 4,
    min_distance: float = 16.0,
) -> ProofreadingTable:
    """Metrics after proofreading the ``n`` most uncertain places, for each ``n`` (Table 2).

    Parameters
    ----------
    gts : sequence of ndarray of bool, shapes (K_i, H, W)
    probs : sequence of ndarray of float, shapes (L_i, H, W)
        Per-instance probability maps (e.g. ``Agglomeration.probs``).
    n_corrections : sequence of int
        Numbers of peaks to correct (the first ``n`` of one global ranking, so rows are nested).
    binarize_at : float
        Predictions are ``probs >= binarize_at``; instances left empty are dropped.
    scores : sequence of ndarray, optional
        Scores of the instances of ``probs``; default the mean probability over each map's
        support (:func:`companion.inference.agglomerate.instance_scores`).
    patch_size, min_distance : see :func:`find_peaks`.

    Returns
    -------
    ProofreadingTable
        ``rows[j]`` has ``n_corrections``, ``avAP``, ``AP50``, ``AP75``, ``recall80``,
        ``avAP_dsb``, ``n_replaced``, ``n_removed``, ``n_added``. ``n = 0`` equals plain
        :func:`companion.evaluation.metrics.instance_metrics` of the binarised predictions.
    """
    if len(gts) != len(probs):
        raise ValueError(f"gts and probs differ in length: {len(gts)} vs {len(probs)}")
    if scores is not None and len(scores) != len(probs):
        raise ValueError(f"scores and probs differ in length: {len(scores)} vs {len(probs)}")
    preds, pred_scores = [], []
    for i, p in enumerate(probs):
        p = np.asarray(p)
        binary = p >= binarize_at
        keep = binary.any(axis=(1, 2))
        s = instance_scores(p) if scores is None else np.asarray(scores[i], dtype=np.float64)
        preds.append(binary[keep]), pred_scores.append(s[keep])
    n_max = max(n_corrections, default=0)
    peaks = find_peaks(
        [uncertainty_map(p) for p in probs], n_max, patch_size=patch_size, min_distance=min_distance
    )
    rows, corrections = [], []
    for n in n_corrections:
        first = Peaks(*(a[:n] for a in peaks))
        fix = correct_at_peaks(gts, preds, pred_scores, first, patch_size=patch_size)
        result = instance_metrics(gts, fix.preds, fix.scores)
        rows.append(
            dict(
                n_corrections=int(n),
                **{k: result[k] for k in ("avAP", "AP50", "AP75", "recall80", "avAP_dsb")},
                n_replaced=fix.n_replaced,
                n_removed=fix.n_removed,
                n_added=fix.n_added,
            )
        )
        corrections.append(fix)
    return ProofreadingTable(rows, peaks, corrections)
