"""Is the uncertainty informative? Patch accuracy vs patch uncertainty (PAvPU) for instances.

The paper (Rumberger et al. 2020, eqs. 6-8, after Mukhoti & Gal 2018) asks whether the
network is uncertain where it is wrong. For every predicted instance with probability map
:math:`P` (from Monte-Carlo agglomeration):

1. binarise :math:`B = [P \\ge 0.75]` and match :math:`B` one-to-one to a ground-truth worm
   :math:`G` (Hungarian matching on IoU, only pairs with IoU > 0; an unmatched prediction gets
   an empty :math:`G`);
2. a pixel is *accurate* when :math:`B = G` there, and its uncertainty is the Bernoulli
   entropy :math:`H(P) = -P \\log P - (1 - P) \\log (1 - P)` (nats);
3. the image is cut into non-overlapping :math:`4 \\times 4` patches; only patches touching
   :math:`B` or :math:`G` are kept. A patch is *accurate* when at least half of its pixels
   are, and *uncertain* when its mean entropy is at least the threshold :math:`t`.

Counting the patches of all instances and images gives :math:`n_{ac}, n_{au}, n_{ic},
n_{iu}` (accurate/inaccurate x certain/uncertain), and

.. math::

    p(\\text{accurate} \\mid \\text{certain}) = \\frac{n_{ac}}{n_{ac} + n_{ic}}, \\quad
    p(\\text{uncertain} \\mid \\text{inaccurate}) = \\frac{n_{iu}}{n_{ic} + n_{iu}}, \\quad
    \\mathrm{PAvPU} = \\frac{n_{ac} + n_{iu}}{n_{ac} + n_{au} + n_{ic} + n_{iu}}.

Patch means are computed once; the counts for all thresholds come from sorted entropies.

Examples
--------
>>> gt = np.zeros((1, 8, 8), bool); gt[0, :4, :4] = True
>>> r = pavpu([gt], [gt * 0.9], [0.1, 0.5])
>>> r.n_ac.tolist(), r.n_au.tolist()  # one accurate patch, entropy H(0.9) = 0.33
([0, 1], [1, 0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from companion.inference.agglomerate import BINARIZE_AT, bernoulli_entropy

from .metrics import iou_matrix

__all__ = [
    "PatchTable",
    "patch_table",
    "PAvPU",
    "hungarian_partners",
    "pavpu",
    "pavpu_from_patches",
    "PAvPUReferences",
    "pavpu_references",
    "masked_patch_means",
]


class PatchTable(NamedTuple):
    """One row per kept patch (of one predicted instance): where it is and what it holds.

    ``image`` and ``instance`` index the inputs; ``y``, ``x`` are the patch's top-left pixel;
    ``accuracy`` and ``entropy`` are the patch means of pixel accuracy and of :math:`H(P)`.
    """

    image: np.ndarray
    instance: np.ndarray
    y: np.ndarray
    x: np.ndarray
    accuracy: np.ndarray
    entropy: np.ndarray


def hungarian_partners(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """For each predicted mask, the index of its Hungarian partner in ``gt`` (IoU > 0), else -1.

    Examples
    --------
    >>> a = np.zeros((2, 4, 4), bool); a[0, 0] = True; a[1, 3] = True
    >>> hungarian_partners(a[::-1], a[:1]).tolist()
    [-1, 0]
    """
    partner = np.full(len(pred), -1)
    if len(pred) == 0 or len(gt) == 0:
        return partner
    iou = iou_matrix(pred, gt)
    rows, cols = linear_sum_assignment(-iou)
    keep = iou[rows, cols] > 0
    partner[rows[keep]] = cols[keep]
    return partner


def masked_patch_means(values: np.ndarray, valid: np.ndarray, patch_size: int) -> np.ndarray:
    """Mean of ``values`` over the valid pixels of each ``patch_size`` square (arrays whose sides
    are multiples of ``patch_size``; a patch without a valid pixel gives 0).

    >>> masked_patch_means(np.arange(4.0).reshape(2, 2), np.array([[1, 1], [0, 1]]), 2).tolist()
    [[2.0]]
    """
    h, w = values.shape
    shape = (h // patch_size, patch_size, w // patch_size, patch_size)
    sums = values.reshape(shape).sum(axis=(1, 3))
    counts = valid.reshape(shape).sum(axis=(1, 3))
    return sums / np.maximum(counts, 1)


def _instance_patches(prob: np.ndarray, binary: np.ndarray, gt: np.ndarray, patch_size: int):
    """Patch rows (y, x, accuracy, entropy) of one instance, on its patch-aligned bounding box."""
    support = binary | gt
    rows, cols = np.flatnonzero(support.any(axis=1)), np.flatnonzero(support.any(axis=0))
    if len(rows) == 0:
        return None
    y0, x0 = rows[0] // patch_size * patch_size, cols[0] // patch_size * patch_size
    y1 = -(-(rows[-1] + 1) // patch_size) * patch_size
    x1 = -(-(cols[-1] + 1) // patch_size) * patch_size
    shape = (y1 - y0, x1 - x0)

    def crop(a, fill=0):
        out = np.full(shape, fill, dtype=a.dtype)
        part = a[y0:y1, x0:x1]
        out[: part.shape[0], : part.shape[1]] = part
        return out

    valid = crop(np.ones(prob.shape, bool), False)
    accurate = (crop(binary) == crop(gt)) & valid
    entropy = bernoulli_entropy(crop(prob)) * valid
    touched = masked_patch_means(crop(support).astype(np.float64), valid, patch_size) > 0
    acc = masked_patch_means(accurate.astype(np.float64), valid, patch_size)[touched]
    ent = masked_patch_means(entropy, valid, patch_size)[touched]
    py, px = np.nonzero(touched)
    return y0 + py * patch_size, x0 + px * patch_size, acc, ent


def patch_table(
    gts: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    *,
    patch_size: int = 4,
    binarize_at: float = BINARIZE_AT,
) -> PatchTable:
    """Patch accuracy and patch entropy of every predicted instance of every image.

    Parameters
    ----------
    gts : sequence of ndarray of bool, shapes (K_i, H, W)
    probs : sequence of ndarray of float, shapes (L_i, H, W)
        Per-instance probability maps (e.g. ``Agglomeration.probs``).
    patch_size : int
        Side of the square patches (partial patches at the right/bottom border are averaged
        over their pixels inside the image).
    binarize_at : float
        A pixel belongs to instance ``B`` when ``P >= binarize_at``.

    Returns
    -------
    PatchTable

    Examples
    --------
    >>> gt = np.zeros((1, 8, 8), bool); gt[0, :4, :8] = True
    >>> t = patch_table([gt], [np.where(gt, 0.9, 0.0)])
    >>> t.x.tolist(), t.accuracy.tolist()
    ([0, 4], [1.0, 1.0])
    """
    if len(gts) != len(probs):
        raise ValueError(f"gts and probs differ in length: {len(gts)} vs {len(probs)}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    columns: list[list[np.ndarray]] = [[] for _ in range(6)]
    for i, (gt, prob) in enumerate(zip(gts, probs)):
        gt, prob = np.asarray(gt, bool), np.asarray(prob, np.float64)
        if gt.ndim != 3 or prob.ndim != 3 or gt.shape[1:] != prob.shape[1:]:
            raise ValueError(
                f"image {i}: expected (K, H, W) stacks of one size, got gts {gt.shape}, probs {prob.shape}"
            )
        binary = prob >= binarize_at
        partner = hungarian_partners(binary, gt)
        empty = np.zeros(gt.shape[1:], bool)
        for k in range(len(prob)):
            rows = _instance_patches(
                prob[k], binary[k], gt[partner[k]] if partner[k] >= 0 else empty, patch_size
            )
            if rows is None:
                continue
            y, x, acc, ent = rows
            for col, values in zip(columns, (np.full(len(y), i), np.full(len(y), k), y, x, acc, ent)):
                col.append(values)
    arrays = [np.concatenate(c) if c else np.zeros(0) for c in columns]
    ints = [a.astype(np.int64) for a in arrays[:4]]
    return PatchTable(*ints, arrays[4].astype(np.float64), arrays[5].astype(np.float64))


class PAvPU(NamedTuple):
    """PAvPU and its parts over thresholds (all arrays have one entry per threshold)."""

    thresholds: np.ndarray
    p_accurate_given_certain: np.ndarray
    p_uncertain_given_inaccurate: np.ndarray
    pavpu: np.ndarray
    n_ac: np.ndarray
    n_au: np.ndarray
    n_ic: np.ndarray
    n_iu: np.ndarray


def pavpu_from_patches(table: PatchTable, thresholds: Sequence[float]) -> PAvPU:
    """Counts and ratios of :func:`pavpu` from a :class:`PatchTable` (nan where undefined).

    Examples
    --------
    >>> t = PatchTable(*[np.zeros(2, int)] * 4, np.array([1.0, 0.0]), np.array([0.1, 0.6]))
    >>> pavpu_from_patches(t, [0.5]).pavpu.tolist()  # accurate & certain, inaccurate & uncertain
    [1.0]
    """
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    accurate = table.accuracy >= 0.5
    ent_acc = np.sort(table.entropy[accurate])
    ent_inacc = np.sort(table.entropy[~accurate])
    # certain: entropy < t, so the count of certain patches is a left searchsorted
    n_ac = np.searchsorted(ent_acc, thresholds, side="left")
    n_ic = np.searchsorted(ent_inacc, thresholds, side="left")
    n_au, n_iu = len(ent_acc) - n_ac, len(ent_inacc) - n_ic

    def ratio(num, den):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    return PAvPU(
        thresholds,
        ratio(n_ac, n_ac + n_ic),
        ratio(n_iu, n_ic + n_iu),
        ratio(n_ac + n_iu, n_ac + n_au + n_ic + n_iu),
        n_ac,
        n_au,
        n_ic,
        n_iu,
    )


class PAvPUReferences(NamedTuple):
    """What PAvPU would be for the same patches with an uninformative uncertainty.

    ``all_certain``: an uncertainty that calls every patch certain (PAvPU = the share of
    accurate patches, p(uncertain | inaccurate) = 0). ``random_*``: the expectation for an
    uncertainty that flags as many patches as the measured one at each threshold, but at random
    (p(uncertain | inaccurate) = the share of uncertain patches).
    """

    all_certain: np.ndarray
    random_pavpu: np.ndarray
    random_p_uncertain_given_inaccurate: np.ndarray


def pavpu_references(curves: PAvPU) -> PAvPUReferences:
    """Reference values for :func:`pavpu` curves (arrays over the same thresholds).

    An uncertainty is informative where the measured PAvPU and p(uncertain | inaccurate) lie
    above the random ones.

    Examples
    --------
    >>> c = PAvPU(np.array([0.1]), *[np.array([np.nan])] * 3, *[np.array([n]) for n in (6, 2, 1, 1)])
    >>> r = pavpu_references(c)  # 8 accurate, 2 inaccurate patches; 3 of 10 uncertain
    >>> r.all_certain.tolist(), r.random_pavpu.round(2).tolist(), r.random_p_uncertain_given_inaccurate.tolist()
    ([0.8], [0.62], [0.3])
    """
    n_acc = np.asarray(curves.n_ac + curves.n_au, dtype=np.float64)
    n_inacc = np.asarray(curves.n_ic + curves.n_iu, dtype=np.float64)
    total = n_acc + n_inacc
    with np.errstate(invalid="ignore", divide="ignore"):
        uncertain = np.where(total > 0, (curves.n_au + curves.n_iu) / np.maximum(total, 1), np.nan)
        all_certain = np.where(total > 0, n_acc / np.maximum(total, 1), np.nan)
    random_pavpu = all_certain * (1 - uncertain) + (1 - all_certain) * uncertain
    return PAvPUReferences(all_certain, random_pavpu, uncertain)


def pavpu(
    gts: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    thresholds: Sequence[float],
    *,
    patch_size: int = 4,
    binarize_at: float = BINARIZE_AT,
) -> PAvPU:
    """Patch accuracy vs patch uncertainty of predicted instances (see the module docstring).

    Parameters
    ----------
    gts : sequence of ndarray of bool, shapes (K_i, H, W)
    probs : sequence of ndarray of float, shapes (L_i, H, W)
        Per-instance probability maps.
    thresholds : sequence of float
        Entropy thresholds (nats); a patch is uncertain when its mean entropy is >= threshold.
    patch_size, binarize_at : see :func:`patch_table`.

    Returns
    -------
    PAvPU
        Arrays over ``thresholds``; ratios are nan where their denominator is 0.

    Examples
    --------
    >>> gt = np.zeros((1, 4, 4), bool); gt[0, :, :2] = True
    >>> r = pavpu([gt], [np.where(gt, 0.8, 0.0)], [0.0, 0.7])
    >>> r.pavpu.tolist()  # accurate patch: uncertain at t=0 (wrong), certain at t=0.7 (right)
    [0.0, 1.0]
    """
    return pavpu_from_patches(
        patch_table(gts, probs, patch_size=patch_size, binarize_at=binarize_at), thresholds
    )
