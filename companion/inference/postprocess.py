"""Post-processing: from pixel embeddings and class logits to a stack of instance masks.

The network predicts, for every pixel, an embedding vector and three class logits
(background, foreground, overlap). Instances are recovered as in Rumberger et al. (2020):

1. :func:`companion.inference.meanshift.mean_shift` clusters the embeddings of the foreground pixels;
   each mode of the embedding density is one instance centre. It is a flat-kernel mean-shift
   that gives the same result as :class:`sklearn.cluster.MeanShift` with ``bin_seeding=True``,
   written in torch so that all seeds climb together (on the GPU when there is one). The
   mean-shift names are re-exported here (``postprocess.mean_shift``), as chapter 05 uses them.
2. :func:`segment` turns every centre into a mask: all foreground pixels whose embedding lies
   within ``threshold`` of the centre. A pixel may join several masks; that is how overlaps
   arise. The predicted overlap map then fills each mask's share of the crossings (the
   paper's overlap heuristic).

:func:`companion.data.simulate.simulate_embedding` and :func:`companion.data.simulate.ideal_logits` build
an *idealised* network output from ground-truth masks, a teaching and testing device.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
from scipy import ndimage

from .meanshift import MeanShiftResult, NoModesFoundError, bin_seeds, mean_shift, mean_shift_trajectories

__all__ = [
    "segment_classes",
    "MeanShiftResult",
    "NoModesFoundError",
    "bin_seeds",
    "claim_pixels",
    "mean_shift",
    "mean_shift_trajectories",
    "fill_overlap",
    "segment",
]

#: Instances (and fragments) smaller than this many pixels are dropped by :func:`segment`.
#: A BBBC010 worm covers roughly 500-3000 pixels; 50 pixels is a short stub of one.
DEFAULT_MIN_SIZE = 50
#: With per-component clustering, a foreground component smaller than this many pixels is
#: taken as one worm without clustering (a BBBC010 worm covers ~500-3000 pixels, so a
#: component under 1000 pixels rarely holds two).
DEFAULT_SINGLE_BELOW = 1000

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

#: Mean-shift centres of recently clustered point sets, keyed by the points' bytes and the
#: bandwidth: a grid search segments each image once per threshold with the same points, and
#: the centres do not depend on the threshold.
_CENTRES_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
_CENTRES_CACHE_SIZE = 512


def _cached_modes(points: np.ndarray, bandwidth: float, device) -> np.ndarray:
    """``mean_shift(points, bandwidth, seeds=bin_seeds(..., at="mean")).centers``, memoised."""
    key = (
        hashlib.sha1(np.ascontiguousarray(points).tobytes()).hexdigest(),
        points.shape,
        str(points.dtype),
        float(bandwidth),
        str(device),
    )
    if key in _CENTRES_CACHE:
        _CENTRES_CACHE.move_to_end(key)
        return _CENTRES_CACHE[key].copy()
    # in 16-d a trained network's clusters are often wider than the grid, so every pixel
    # gets a cell of its own; seeding from the pixels is then the expected path, not news
    seeds = bin_seeds(points, bandwidth, at="mean", warn=False)
    centers = mean_shift(points, bandwidth, seeds=seeds, device=device).centers
    _CENTRES_CACHE[key] = centers
    while len(_CENTRES_CACHE) > _CENTRES_CACHE_SIZE:
        _CENTRES_CACHE.popitem(last=False)
    return centers.copy()


# --------------------------------------------------------------------------------------------
# instances from embeddings
# --------------------------------------------------------------------------------------------
def _check_network_output(embedding: np.ndarray, class_logits: np.ndarray) -> None:
    if embedding.ndim != 3:
        raise ValueError(f"embedding must be (E, H, W), got shape {embedding.shape}")
    if class_logits.ndim != 3 or class_logits.shape[0] != 3 or class_logits.shape[1:] != embedding.shape[1:]:
        raise ValueError(
            f"class_logits must be (3, H, W) matching embedding (E, H, W); got class_logits "
            f"{class_logits.shape} and embedding {embedding.shape}"
        )
    if not np.isfinite(embedding).all():
        raise ValueError("embedding contains NaN or inf values")
    if not np.isfinite(class_logits).all():
        raise ValueError("class_logits contain NaN or inf values")


def _check_segment_settings(
    bandwidth: float, threshold: float, min_size: int, max_points: int | None
) -> None:
    for name, value in (("bandwidth", bandwidth), ("threshold", threshold)):
        if not (np.isscalar(value) and np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")
    if max_points is not None and (
        isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)) or max_points < 1
    ):
        raise ValueError(f"max_points must be None or an integer >= 1, got {max_points!r}")


def _to_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def fill_overlap(instance: np.ndarray, overlap: np.ndarray) -> np.ndarray:
    """The paper's overlap heuristic for one instance mask.

    Adds the overlap map to the mask, labels the connected components (8-connectivity) of the
    union and returns the component with the largest IoU with the mask alone: the mask plus
    the crossings it touches, without stray fragments.

    Parameters
    ----------
    instance, overlap : (H, W) bool

    Returns
    -------
    np.ndarray
        (H, W) bool; all False when ``instance`` is empty.

    Examples
    --------
    >>> instance = np.zeros((1, 7), bool); instance[0, [0, 1, 5]] = True
    >>> overlap = np.zeros((1, 7), bool); overlap[0, 2] = True
    >>> fill_overlap(instance, overlap).astype(int)
    array([[1, 1, 1, 0, 0, 0, 0]])
    """
    components, n = ndimage.label(instance | overlap, structure=_EIGHT_CONNECTED)
    if n == 0 or not instance.any():
        return np.zeros_like(instance, dtype=bool)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    shared = np.bincount(components[instance], minlength=n + 1)
    iou = shared / (sizes + instance.sum() - shared)
    iou[0] = -1.0  # the background of the union
    return components == int(np.argmax(iou))


def segment(
    embedding: np.ndarray | torch.Tensor,
    class_logits: np.ndarray | torch.Tensor,
    bandwidth: float,
    threshold: float,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    max_points: int | None = None,
    cluster_overlap: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    clustering: str = "global",
    single_below: int = DEFAULT_SINGLE_BELOW,
) -> np.ndarray:
    """Instance masks from one image's pixel embeddings and class logits.

    1. Foreground: pixels whose most likely class is not background (0); the overlap map
       holds those whose most likely class is overlap (2).
    2. :func:`mean_shift` on the embeddings of the foreground pixels gives one centre per
       instance. By default the overlap pixels are left out of the clustering: the
       discriminative loss pulls them towards *all* their instances, so they sit between
       centres and could form a spurious mode of their own (``cluster_overlap=True`` keeps
       them). At most ``max_points`` pixels, drawn at random with ``seed``, are clustered.
       Seeds are the means of the occupied grid cells (:func:`bin_seeds` with ``at="mean"``),
       not scikit-learn's cell centres, which in 16-d can miss a small instance entirely; when
       every pixel has a cell of its own the pixels are the seeds (silently, unlike
       :func:`bin_seeds`: with real embeddings this is common and harmless).
    3. Each centre claims every foreground pixel (overlap included) whose embedding lies
       within ``threshold`` of it; a pixel may join several instances.
    4. :func:`fill_overlap` adds the overlap map and keeps the connected component that best
       matches the instance. Masks smaller than ``min_size`` pixels are dropped.

    ``clustering="global"`` is the paper's: one mean-shift over the whole image, so two distant
    worms that the network happens to embed alike merge into one instance.
    ``clustering="components"`` (beyond the paper) runs steps 2-4 inside each 8-connected
    component of the foreground (overlap pixels included, so crossing worms share a
    component): worms that do not touch can never merge, and the embedding only has to
    separate worms that touch, which is what the push term sees in training crops. A
    component of fewer than ``single_below`` pixels (too small to hold two worms) is taken as
    one instance without clustering.

    Parameters
    ----------
    embedding : (E, H, W) array
    class_logits : (3, H, W) array
        Logits (or probabilities) of background, foreground, overlap.
    bandwidth : float
        Mean-shift bandwidth.
    threshold : float
        Largest embedding distance of a pixel to its instance centre.
    min_size : int
        Smallest instance kept, in pixels (default :data:`DEFAULT_MIN_SIZE` = 50).
    max_points : int, optional
        Cluster a random subset of at most this many pixels (all pixels are still assigned).
    cluster_overlap : bool
        Also cluster the overlap pixels' embeddings.
    seed : int
        Seed of the subset drawn for ``max_points``.
    device : str or torch.device, optional
        Passed to :func:`mean_shift`.
    clustering : {"global", "components"}
        Cluster the whole image at once (the paper) or each connected foreground component.
    single_below : int
        With ``clustering="components"``: components smaller than this are one instance.

    Returns
    -------
    np.ndarray
        (K, H, W) bool, instances in order of decreasing mode population; (0, H, W) when
        there is no foreground.

    Raises
    ------
    ValueError
        For mismatched shapes (both are named), NaN/inf in the embedding or the logits, a
        bandwidth or threshold that is not a finite number > 0, ``min_size < 0`` or
        ``max_points < 1``.

    Examples
    --------
    >>> from companion.data.simulate import ideal_logits, simulate_embedding
    >>> instances = np.zeros((2, 40, 40), bool)
    >>> instances[0, 5:15, 5:35] = True; instances[1, 25:35, 5:35] = True
    >>> embedding = simulate_embedding(instances, dim=4, seed=0)
    >>> segment(embedding, ideal_logits(instances), bandwidth=2.0, threshold=1.5).shape
    (2, 40, 40)
    """
    embedding, class_logits = _to_numpy(embedding), _to_numpy(class_logits)
    _check_network_output(embedding, class_logits)
    return segment_classes(
        embedding,
        np.argmax(class_logits, axis=0),
        bandwidth,
        threshold,
        min_size=min_size,
        max_points=max_points,
        cluster_overlap=cluster_overlap,
        seed=seed,
        device=device,
        clustering=clustering,
        single_below=single_below,
    )


def segment_classes(
    embedding: np.ndarray,
    classes: np.ndarray,
    bandwidth: float,
    threshold: float,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    max_points: int | None = None,
    cluster_overlap: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    clustering: str = "global",
    single_below: int = DEFAULT_SINGLE_BELOW,
) -> np.ndarray:
    """:func:`segment` of a class map ``(H, W)`` (0 background, 1 foreground, 2 overlap) instead
    of class logits: what the compact network outputs hold (:mod:`companion.inference.outputs`).

    >>> classes = np.zeros((6, 6), np.uint8); classes[1:3, :] = 1
    >>> segment_classes(np.ones((2, 6, 6), np.float32), classes, 1.0, 1.0, min_size=1).shape
    (1, 6, 6)
    """
    classes = np.asarray(classes)
    if classes.shape != embedding.shape[1:]:
        raise ValueError(f"classes {classes.shape} do not match embedding {embedding.shape}")
    _check_segment_settings(bandwidth, threshold, min_size, max_points)
    if clustering not in ("global", "components"):
        raise ValueError(f"clustering must be 'global' or 'components', got {clustering!r}")
    foreground, overlap = classes != 0, classes == 2
    options = dict(
        bandwidth=bandwidth,
        threshold=threshold,
        min_size=min_size,
        max_points=max_points,
        cluster_overlap=cluster_overlap,
        seed=seed,
        device=device,
    )
    if clustering == "global":
        masks = _cluster_region(embedding, foreground, overlap, **options)
    else:
        masks = []
        components, n = ndimage.label(foreground, structure=_EIGHT_CONNECTED)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            region = components[box] == index
            size = int(region.sum())
            if size < min_size:
                continue
            if size < single_below:
                parts = [region]
            else:
                parts = _cluster_region(
                    embedding[(slice(None),) + box] * region, region, overlap[box] & region, **options
                )
            for part in parts:
                mask = np.zeros(foreground.shape, dtype=bool)
                mask[box] = part
                masks.append(mask)
        masks.sort(key=lambda m: -int(m.sum()))
    return np.stack(masks) if masks else np.zeros((0,) + foreground.shape, dtype=bool)


def _cluster_region(
    embedding: np.ndarray,
    foreground: np.ndarray,
    overlap: np.ndarray,
    *,
    bandwidth: float,
    threshold: float,
    min_size: int,
    max_points: int | None,
    cluster_overlap: bool,
    seed: int,
    device,
) -> list[np.ndarray]:
    """Steps 2-4 of :func:`segment` on one region: mean-shift, claim, fill overlap."""
    clustered = foreground if cluster_overlap or not (foreground & ~overlap).any() else foreground & ~overlap
    if not clustered.any():
        return []
    points = embedding[:, clustered].T
    if max_points is not None and len(points) > max_points:
        chosen = np.random.default_rng(seed).choice(len(points), size=max_points, replace=False)
        points = points[np.sort(chosen)]
    try:
        centers = _cached_modes(points, bandwidth, device)
    except NoModesFoundError:
        return []
    masks = []
    for instance in claim_pixels(embedding, foreground, centers, threshold):
        if instance.sum() < min_size:
            continue
        filled = fill_overlap(instance, overlap)
        if filled.sum() >= min_size:
            masks.append(filled)
    return masks


def claim_pixels(
    embedding: np.ndarray, mask: np.ndarray, centers: np.ndarray, threshold: float
) -> np.ndarray:
    """For each centre, the pixels of ``mask`` whose embedding lies within ``threshold`` of it.

    Parameters
    ----------
    embedding : (E, H, W) array
    mask : (H, W) bool
        Pixels that may be claimed (the foreground).
    centers : (C, E) array
    threshold : float

    Returns
    -------
    np.ndarray
        (C, H, W) bool; a pixel may be claimed by several centres.

    Examples
    --------
    >>> embedding = np.array([[[0.0, 1.0, 5.0]]])
    >>> claim_pixels(embedding, np.ones((1, 3), bool), np.array([[0.5], [5.0]]), 1.0).astype(int)
    array([[[1, 1, 0]],
    <BLANKLINE>
           [[0, 0, 1]]])
    """
    centers = np.asarray(centers, dtype=np.float64)
    if centers.ndim != 2 or centers.shape[1] != embedding.shape[0] or mask.shape != embedding.shape[1:]:
        raise ValueError(
            f"need embedding (E, H, W), mask (H, W), centers (C, E); got {embedding.shape}, "
            f"{mask.shape}, {centers.shape}"
        )
    points = embedding[:, mask].T.astype(np.float64)
    sq_dist = (centers**2).sum(1)[:, None] - 2.0 * centers @ points.T + (points**2).sum(1)[None, :]
    claimed = np.zeros((len(centers),) + mask.shape, dtype=bool)
    claimed[:, mask] = sq_dist <= threshold * threshold
    return claimed
