"""Agglomerate Monte-Carlo instance segmentations into per-instance probability maps.

Each Monte-Carlo draw of the network, once post-processed, is a stack of binary instance
masks ``(K_i, H, W)``. The draws disagree: an instance may be missing, split in two, merged
with a neighbour, or just a little thicker. Agglomeration (Rumberger et al. 2020, Sec. 2.3)
matches the instances of all draws to each other and averages them, giving for every
instance ``k`` a probability map ``p_k(x)`` = the fraction of draws in which pixel ``x``
belonged to (the draw's version of) instance ``k``.

The algorithm of :func:`agglomerate`:

1. The draw with the most instances is the *base*: its instances are the first entries of
   the result.
2. Every further draw is matched one-to-one to the base's current instances by the
   assignment of maximal summed IoU (Hungarian algorithm,
   :func:`scipy.optimize.linear_sum_assignment`). A base instance is represented by its
   *mean mask* over the draws that contributed to it so far, and compared with the soft
   (fuzzy) IoU ``sum(min(p, m)) / sum(max(p, m))``, which equals the ordinary IoU for binary
   masks. A pair counts as matched only if its IoU is at least ``min_iou``: two worms that
   do not overlap are never merged.
3. A matched mask is added to its base instance's pixel counts; an unmatched one becomes a
   new instance.
4. The counts are divided by the number of draws: ``probs`` ``(K, H, W)`` in ``[0, 1]``.

The per-instance ``score`` (the mean probability over the instance's support, ``p > 0``) is
a confidence usable for average precision; :func:`binarize` thresholds the maps (the paper
uses 0.75).

:func:`companion.data.simulate.perturb_instances` simulates the disagreements of Monte-Carlo draws
from a ground-truth stack, so agglomeration can be explored without a trained network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "Agglomeration",
    "agglomerate",
    "binarize",
    "binarized_indices",
    "binarize_with_scores",
    "instance_scores",
    "Matching",
    "match_draw_to_base",
    "soft_iou_matrix",
    "BINARIZE_AT",
    "bernoulli_entropy",
    "uncertainty_map",
    "image_uncertainty",
]

#: The paper's binarisation: pixels with agglomerated probability >= 0.75 form a mask.
BINARIZE_AT = 0.75
#: Default minimal IoU for a base instance and a draw's instance to count as the same object.
DEFAULT_MIN_IOU = 0.3


class Agglomeration(NamedTuple):
    """Result of :func:`agglomerate`.

    Attributes
    ----------
    probs : np.ndarray
        float32 ``(K, H, W)`` in ``[0, 1]``: per-instance probability maps.
    scores : np.ndarray
        float64 ``(K,)``: mean probability over each instance's support (``probs > 0``).
    """

    probs: np.ndarray
    scores: np.ndarray


def soft_iou_matrix(soft: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Fuzzy IoU of every soft mask with every binary mask, via one matrix product.

    For ``p`` in ``[0, 1]`` and binary ``m``: ``sum(min(p, m)) = p . m`` and
    ``sum(max(p, m)) = sum(p) + sum(m) - p . m``, so the fuzzy Jaccard index
    ``sum(min) / sum(max)`` of all pairs needs a single ``(K, N) @ (N, L)`` product.
    For binary ``soft`` it is the ordinary IoU.

    Parameters
    ----------
    soft : np.ndarray
        ``(K, H, W)`` values in ``[0, 1]`` (bool allowed).
    masks : np.ndarray
        ``(L, H, W)`` bool.

    Returns
    -------
    np.ndarray
        float64 ``(K, L)``; 0 where both masks are empty.

    Examples
    --------
    >>> a = np.zeros((1, 2, 2)); a[0, 0] = 1.0          # top row
    >>> b = np.zeros((1, 2, 2), bool); b[0, :, 0] = True  # left column
    >>> float(soft_iou_matrix(a, b)[0, 0])                # 1 shared pixel of 3
    0.3333333333333333
    """
    soft = np.asarray(soft)
    masks = np.asarray(masks)
    if soft.ndim != 3 or masks.ndim != 3 or soft.shape[1:] != masks.shape[1:]:
        raise ValueError(
            f"expected (K, H, W) and (L, H, W) stacks, got shapes {soft.shape} and {masks.shape}"
        )
    n_pixels = int(np.prod(soft.shape[1:]))
    p = soft.reshape(len(soft), n_pixels).astype(np.float32)
    m = masks.reshape(len(masks), n_pixels).astype(np.float32)
    intersection = (p @ m.T).astype(np.float64)
    union = p.sum(1, dtype=np.float64)[:, None] + m.sum(1, dtype=np.float64)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


class Matching(NamedTuple):
    """Result of :func:`match_draw_to_base`.

    Attributes
    ----------
    iou : np.ndarray
        float64 ``(K, L)`` fuzzy IoU of every base instance with every new instance.
    pairs : np.ndarray
        int ``(M, 2)`` matched ``(base index, new index)`` pairs, all with IoU >= ``min_iou``.
    unmatched : np.ndarray
        int ``(U,)`` indices of the new instances left unmatched (they become new instances).
    """

    iou: np.ndarray
    pairs: np.ndarray
    unmatched: np.ndarray


def match_draw_to_base(base: np.ndarray, masks: np.ndarray, *, min_iou: float = DEFAULT_MIN_IOU) -> Matching:
    """One step of :func:`agglomerate`: match a draw's instances to the current base instances.

    The one-to-one assignment maximising the summed IoU (Hungarian algorithm,
    :func:`scipy.optimize.linear_sum_assignment` on ``-IoU``) is computed on all pairs; only
    the assigned pairs with IoU ``>= min_iou`` count as matched.

    Parameters
    ----------
    base : np.ndarray
        ``(K, H, W)`` base instances, soft (mean masks in ``[0, 1]``) or binary.
    masks : np.ndarray
        bool ``(L, H, W)`` instances of the new draw.
    min_iou : float
        Smallest IoU of a matched pair.

    Returns
    -------
    Matching

    Examples
    --------
    >>> base = np.zeros((2, 4, 8), bool); base[0, :, :3] = True; base[1, :, 5:] = True
    >>> new = base[::-1].copy(); new[1, :, 3] = True   # same worms, other order, one thicker
    >>> m = match_draw_to_base(base, new)
    >>> m.pairs.tolist(), m.unmatched.tolist()
    ([[0, 1], [1, 0]], [])
    """
    iou = soft_iou_matrix(base, masks)
    rows, cols = linear_sum_assignment(-iou) if iou.size else (np.zeros(0, int), np.zeros(0, int))
    good = iou[rows, cols] >= min_iou
    pairs = np.stack([rows[good], cols[good]], axis=1).astype(np.intp).reshape(-1, 2)
    unmatched = np.setdiff1d(np.arange(len(masks)), pairs[:, 1]).astype(np.intp)
    return Matching(iou, pairs, unmatched)


def _validated_draws(draws: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Bool ``(K_i, H, W)`` stacks, empty instances removed; ValueError on bad shapes."""
    if len(draws) == 0:
        raise ValueError("agglomerate needs at least one draw, got an empty sequence")
    out = []
    for i, draw in enumerate(draws):
        draw = np.asarray(draw)
        if draw.ndim != 3:
            raise ValueError(f"draw {i} must be a (K, H, W) mask stack, got shape {draw.shape}")
        if out and draw.shape[1:] != out[0].shape[1:]:
            raise ValueError(f"draw {i} has image shape {draw.shape[1:]}, but draw 0 has {out[0].shape[1:]}")
        draw = draw.astype(bool, copy=False)
        out.append(draw[draw.any(axis=(1, 2))])
    return out


def agglomerate(draws: Sequence[np.ndarray], *, min_iou: float = DEFAULT_MIN_IOU) -> Agglomeration:
    """Match the instances of several segmentations and average them into probability maps.

    Parameters
    ----------
    draws : sequence of np.ndarray
        Bool ``(K_i, H, W)`` instance stacks, one per Monte-Carlo draw, all of the same
        ``(H, W)``. Instances may overlap; empty instances are ignored; a draw may hold no
        instance at all (``(0, H, W)``) — it still counts in the denominator.
    min_iou : float
        Minimal (fuzzy) IoU between a base instance's mean mask and a draw's instance for
        the two to be merged. Must lie in ``(0, 1]``, so disjoint masks are never merged.

    Returns
    -------
    Agglomeration
        ``probs`` float32 ``(K, H, W)``: for instance ``k``, the fraction of draws whose
        matched instance covers each pixel; ``scores`` ``(K,)``: the mean of ``probs[k]``
        over its support. The base draw's instances come first, in their order, then the
        unmatched instances in the order they were met. Exact ties in the assignment (e.g.
        the two equal halves of a split worm) are broken by instance order.

    Examples
    --------
    >>> a = np.zeros((1, 4, 4), bool); a[0, :2] = True
    >>> b = np.zeros((1, 4, 4), bool); b[0, :3] = True
    >>> result = agglomerate([a, a, b, b])
    >>> result.probs[0, :, 0].tolist()
    [1.0, 1.0, 0.5, 0.0]
    >>> round(float(result.scores[0]), 3)
    0.833
    """
    if not 0.0 < min_iou <= 1.0:
        raise ValueError(f"min_iou must lie in (0, 1], got {min_iou}")
    stacks = _validated_draws(draws)
    height, width = stacks[0].shape[1:]
    base_index = int(np.argmax([len(s) for s in stacks]))
    counts = [m.astype(np.int32) for m in stacks[base_index]]  # summed masks per instance
    hits = [1] * len(counts)  # draws contributing to each
    for i, stack in enumerate(stacks):
        if i == base_index or len(stack) == 0:
            continue
        mean_masks = (
            np.stack(counts) / np.asarray(hits, np.float32)[:, None, None]
            if counts
            else np.zeros((0, height, width), np.float32)
        )
        matching = match_draw_to_base(mean_masks, stack, min_iou=min_iou)
        for r, c in matching.pairs:
            counts[r] += stack[c]
            hits[r] += 1
        for c in matching.unmatched:
            counts.append(stack[c].astype(np.int32))
            hits.append(1)
    if not counts:
        return Agglomeration(np.zeros((0, height, width), np.float32), np.zeros(0))
    probs = (np.stack(counts) / np.float32(len(stacks))).astype(np.float32)
    return Agglomeration(probs, instance_scores(probs))


def instance_scores(probs: np.ndarray) -> np.ndarray:
    """Mean probability of each map over its support (``probs > 0``); 0 for an empty map.

    Examples
    --------
    >>> instance_scores(np.array([[[1.0, 0.5, 0.0]]])).tolist()
    [0.75]
    """
    probs = np.asarray(probs)
    flat = probs.reshape(len(probs), int(np.prod(probs.shape[1:])))
    support = (flat > 0).sum(1)
    total = flat.sum(1, dtype=np.float64)
    return np.divide(total, support, out=np.zeros(len(flat)), where=support > 0)


def binarized_indices(probs: np.ndarray, threshold: float = BINARIZE_AT) -> np.ndarray:
    """Indices of the instances that keep at least one pixel ``>= threshold``.

    Use it to keep the matching ``scores``: ``scores[binarized_indices(probs)]``.

    Examples
    --------
    >>> binarized_indices(np.array([[[0.9]], [[0.5]]])).tolist()
    [0]
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must be (K, H, W), got shape {probs.shape}")
    return np.flatnonzero((probs >= threshold).any(axis=(1, 2)))


def binarize(probs: np.ndarray, threshold: float = BINARIZE_AT) -> np.ndarray:
    """Threshold per-instance probability maps (``probs >= threshold``), dropping empty instances.

    Parameters
    ----------
    probs : np.ndarray
        ``(K, H, W)`` probabilities, e.g. :attr:`Agglomeration.probs`.
    threshold : float
        The paper uses 0.75: a pixel belongs to an instance if at least 3/4 of the draws agree.

    Returns
    -------
    np.ndarray
        bool ``(K', H, W)`` with ``K' <= K``; the kept instances are
        :func:`binarized_indices` (same order).

    Examples
    --------
    >>> binarize(np.array([[[0.9, 0.5]], [[0.1, 0.2]]])).tolist()
    [[[True, False]]]
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    probs = np.asarray(probs)
    keep = binarized_indices(probs, threshold)
    return probs[keep] >= threshold


def binarize_with_scores(
    agglomeration: Agglomeration, threshold: float = BINARIZE_AT
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`binarize` an agglomeration and keep the scores of the instances that survive.

    Returns
    -------
    masks : np.ndarray
        bool ``(K', H, W)``, as :func:`binarize`.
    scores : np.ndarray
        ``(K',)`` the agglomeration's scores of those instances, in the same order.

    Examples
    --------
    >>> agg = Agglomeration(np.array([[[0.9]], [[0.5]]], np.float32), np.array([0.9, 0.5]))
    >>> masks, scores = binarize_with_scores(agg)
    >>> masks.shape, scores.tolist()
    ((1, 1, 1), [0.9])
    """
    masks = binarize(agglomeration.probs, threshold)
    return masks, agglomeration.scores[binarized_indices(agglomeration.probs, threshold)]


# --------------------------------------------------------------------------------------------
# Uncertainty of an agglomeration
# --------------------------------------------------------------------------------------------
def bernoulli_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of Bernoulli variables with success probability ``p``.

    Safe at 0 and 1 (where it is 0); maximal, ``log 2``, at ``p = 0.5``.

    Examples
    --------
    >>> bernoulli_entropy(np.array([0.0, 0.5, 1.0])).round(4).tolist()
    [0.0, 0.6931, 0.0]
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    q = 1.0 - p
    return p * np.log(1.0 / np.where(p > 0, p, 1.0)) + q * np.log(1.0 / np.where(q > 0, q, 1.0))


def uncertainty_map(probs: np.ndarray) -> np.ndarray:
    """Per-pixel uncertainty: the largest Bernoulli entropy over the instances' probability maps.

    Parameters
    ----------
    probs : ndarray of float, shape (K, H, W)

    Returns
    -------
    ndarray of float64, shape (H, W)
        Zeros when ``K = 0``.

    Examples
    --------
    >>> uncertainty_map(np.array([[[0.5, 1.0]], [[0.1, 0.0]]])).round(3).tolist()
    [[0.693, 0.0]]
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must be a (K, H, W) stack, got shape {probs.shape}")
    if len(probs) == 0:
        return np.zeros(probs.shape[1:])
    # H(p) grows with min(p, 1 - p): take the max of that first, one entropy per pixel
    return bernoulli_entropy(np.minimum(probs, 1 - probs).max(axis=0))


def image_uncertainty(probs: np.ndarray) -> float:
    """One uncertainty per image: the mean of :func:`uncertainty_map` over the predicted worm area.

    The area is every pixel that at least one instance claims with probability > 0 (in at
    least one Monte-Carlo draw), so a confidently segmented image scores near 0 and an image
    whose draws disagree everywhere near ``log 2``. An image without instances scores 0.
    Used to rank images for annotation (active learning).

    Examples
    --------
    >>> round(image_uncertainty(np.array([[[1.0, 1.0, 0.5, 0.0]]])), 3)  # (0 + 0 + log 2) / 3
    0.231
    """
    probs = np.asarray(probs)
    entropy = uncertainty_map(probs)
    area = probs.max(axis=0) > 0 if len(probs) else np.zeros(probs.shape[1:], bool)
    return float(entropy[area].mean()) if area.any() else 0.0
