"""Simulated network outputs: teaching and testing devices, not models.

Two stand-ins let the book and the tests explore the pipeline without a trained network:

* :func:`simulate_embedding` and :func:`ideal_logits` build the *idealised* output of a
  perfectly trained network from ground-truth masks (an embedding that clusters each worm
  around its own centre, and confident class logits), the input of
  :func:`companion.inference.postprocess.segment`;
* :func:`perturb_instances` simulates the disagreements of Monte-Carlo draws (thickening /
  thinning, false splits, false merges, missing instances) from a ground-truth stack, so that
  :func:`companion.inference.agglomerate.agglomerate` can be studied.

Examples
--------
>>> instances = np.zeros((2, 8, 8), bool); instances[0, :4] = True; instances[1, 4:] = True
>>> simulate_embedding(instances, dim=3, seed=0).shape, ideal_logits(instances).shape
((3, 8, 8), (3, 8, 8))
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .targets import three_class_target

__all__ = ["simulate_embedding", "ideal_logits", "perturb_instances"]


# --------------------------------------------------------------------------------------------
# an idealised network output
# --------------------------------------------------------------------------------------------
def _spread_centers(n: int, dim: int, separation: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` random points in R^dim, pairwise at least ``separation`` apart (rejection sampling)."""
    sigma = 1.2 * separation / np.sqrt(2.0 * dim)  # N(0, sigma^2 I) points lie ~ sigma sqrt(2 dim) apart
    centers: list[np.ndarray] = []
    for _ in range(1000 * max(n, 1)):
        if len(centers) == n:
            break
        candidate = rng.normal(0.0, sigma, size=dim)
        if all(np.linalg.norm(candidate - c) >= separation for c in centers):
            centers.append(candidate)
    if len(centers) < n:
        raise ValueError(f"could not place {n} centres {separation} apart in {dim} dimensions")
    return np.array(centers).reshape(n, dim)


def simulate_embedding(
    instances: np.ndarray, dim: int = 16, *, spread: float = 0.25, separation: float = 5.0, seed: int = 0
) -> np.ndarray:
    """An idealised embedding, as a well-trained network would predict it for ``instances``.

    **A teaching and testing device, not a model.** Each instance gets a random centre in
    R^dim (pairwise at least ``separation`` apart, like the discriminative loss's push margin);
    a pixel of one instance is its centre plus Gaussian noise of standard deviation ``spread``
    per dimension. A pixel shared by several instances sits at the mean of their centres (the
    pull term drags it towards each of them) plus noise; background pixels are noise around
    the origin.

    Parameters
    ----------
    instances : (K, H, W) bool
        Ground-truth masks, possibly overlapping.
    dim : int
        Embedding dimension E.
    spread : float
        Noise standard deviation per dimension (a pixel lies about ``spread * sqrt(dim)`` from
        its centre).
    separation : float
        Least distance between instance centres.
    seed : int

    Returns
    -------
    np.ndarray
        (E, H, W) float32.

    Examples
    --------
    >>> instances = np.zeros((2, 8, 8), bool); instances[0, :4] = True; instances[1, 2:] = True
    >>> simulate_embedding(instances, dim=3, seed=0).shape
    (3, 8, 8)
    """
    instances = _check_instances(instances)
    rng = np.random.default_rng(seed)
    n, height, width = instances.shape
    centers = _spread_centers(n, dim, separation, rng)
    members = instances.reshape(n, -1).T.astype(np.float64)  # (H*W, K)
    counts = members.sum(axis=1, keepdims=True)
    means = members @ centers / np.maximum(counts, 1.0)  # background -> origin
    noise = rng.normal(0.0, spread, size=means.shape)
    return (means + noise).T.reshape(dim, height, width).astype(np.float32)


def ideal_logits(instances: np.ndarray, confidence: float = 5.0) -> np.ndarray:
    """Class logits of a perfectly confident network: ``confidence`` for the true class of
    :func:`companion.data.targets.three_class_target`, 0 for the others.

    Parameters
    ----------
    instances : (K, H, W) bool
    confidence : float

    Returns
    -------
    np.ndarray
        (3, H, W) float32.

    Examples
    --------
    >>> instances = np.zeros((2, 1, 3), bool); instances[0, 0, :2] = True; instances[1, 0, 1:] = True
    >>> ideal_logits(instances, confidence=1.0).argmax(axis=0)
    array([[1, 2, 1]])
    """
    target = np.asarray(three_class_target(_check_instances(instances)))
    return (confidence * np.eye(3, dtype=np.float32)[target]).transpose(2, 0, 1).copy()


def _check_instances(instances: np.ndarray) -> np.ndarray:
    instances = np.asarray(instances)
    if instances.ndim != 3:
        raise ValueError(f"instances must be a (K, H, W) stack of masks, got shape {instances.shape}")
    return instances.astype(bool, copy=False)


# --------------------------------------------------------------------------------------------
# simulated Monte-Carlo disagreements
# --------------------------------------------------------------------------------------------


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return yy**2 + xx**2 <= radius**2


def _morph(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate (radius > 0) or erode (radius < 0) one mask by a disk, on its padded bounding box."""
    if radius == 0:
        return mask.copy()
    r = abs(radius)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1 = max(rows[0] - r - 1, 0), min(rows[-1] + r + 2, mask.shape[0])
    x0, x1 = max(cols[0] - r - 1, 0), min(cols[-1] + r + 2, mask.shape[1])
    op = ndimage.binary_dilation if radius > 0 else ndimage.binary_erosion
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = op(mask[y0:y1, x0:x1], structure=_disk(r), border_value=0)
    return out


def _split_along_principal_axis(mask: np.ndarray) -> list[np.ndarray]:
    """Cut a mask in two halves at the median of its projection on its principal axis."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 2:
        return [mask]
    coords = np.stack([ys, xs], 1).astype(np.float64)
    coords -= coords.mean(0)
    _, vectors = np.linalg.eigh(coords.T @ coords)
    projection = coords @ vectors[:, -1]
    first = projection < np.median(projection)
    if first.all() or not first.any():
        return [mask]
    halves = [np.zeros_like(mask), np.zeros_like(mask)]
    halves[0][ys[first], xs[first]] = True
    halves[1][ys[~first], xs[~first]] = True
    return halves


def perturb_instances(
    instances: np.ndarray,
    rng: np.random.Generator,
    *,
    max_radius: int = 2,
    p_split: float = 0.1,
    p_merge: float = 0.1,
    p_drop: float = 0.05,
) -> np.ndarray:
    """Simulate one Monte-Carlo draw from a ground-truth stack (a teaching device).

    Each instance independently is dropped (probability ``p_drop``), or else eroded or
    dilated by a disk of random radius in ``[-max_radius, max_radius]``, then split in two
    across its principal axis (``p_split``: a *false split*). Finally, with probability
    ``p_merge`` per instance, it is united with a touching or overlapping neighbour
    (a *false merge*). Instances emptied by erosion disappear.

    This is *not* what a network does; it produces plausible, controllable disagreements so
    :func:`agglomerate` can be studied without a trained model.

    Parameters
    ----------
    instances : np.ndarray
        bool ``(K, H, W)``.
    rng : np.random.Generator
        Source of randomness (seed it for reproducibility).
    max_radius : int
        Largest erosion/dilation radius in pixels (0 keeps the shapes).
    p_split, p_merge, p_drop : float
        Per-instance probabilities of a false split, a false merge and a missing instance.

    Returns
    -------
    np.ndarray
        bool ``(K', H, W)``.

    Examples
    --------
    >>> gt = np.zeros((2, 8, 8), bool); gt[0, 1:3] = True; gt[1, 5:7] = True
    >>> draw = perturb_instances(gt, np.random.default_rng(0), max_radius=0, p_split=0, p_merge=0, p_drop=0)
    >>> bool((draw == gt).all())
    True
    """
    instances = np.asarray(instances)
    if instances.ndim != 3:
        raise ValueError(f"instances must be a (K, H, W) stack, got shape {instances.shape}")
    for name, p in (("p_split", p_split), ("p_merge", p_merge), ("p_drop", p_drop)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    if max_radius < 0:
        raise ValueError(f"max_radius must be >= 0, got {max_radius}")
    masks: list[np.ndarray] = []
    for mask in instances.astype(bool):
        if not mask.any() or rng.random() < p_drop:
            continue
        mask = _morph(mask, int(rng.integers(-max_radius, max_radius + 1)))
        if not mask.any():
            continue
        masks.extend(_split_along_principal_axis(mask) if rng.random() < p_split else [mask])
    masks = _false_merges(masks, rng, p_merge)
    return np.stack(masks) if masks else np.zeros((0, *instances.shape[1:]), bool)


def _false_merges(masks: list[np.ndarray], rng: np.random.Generator, p_merge: float) -> list[np.ndarray]:
    """Unite, with probability ``p_merge`` each, instances with a touching or overlapping partner."""
    masks = list(masks)
    k = 0
    while k < len(masks):
        if rng.random() < p_merge:
            grown = _morph(masks[k], 1)
            partners = [j for j in range(len(masks)) if j != k and (grown & masks[j]).any()]
            if partners:
                j = partners[int(rng.integers(len(partners)))]
                masks[k] = masks[k] | masks[j]
                del masks[j]
                if j < k:
                    k -= 1
        k += 1
    return masks
