"""Post-processing: from pixel embeddings and class logits to a stack of instance masks.

The network predicts, for every pixel, an embedding vector and three class logits
(background, foreground, overlap). Instances are recovered as in Rumberger et al. (2020):

1. :func:`mean_shift` clusters the embeddings of the foreground pixels; each mode of the
   embedding density is one instance centre. It is a flat-kernel mean-shift that gives the
   same result as :class:`sklearn.cluster.MeanShift` with ``bin_seeding=True``, written in
   torch so that all seeds climb together (on the GPU when there is one).
2. :func:`segment` turns every centre into a mask: all foreground pixels whose embedding lies
   within ``threshold`` of the centre. A pixel may join several masks; that is how overlaps
   arise. The predicted overlap map then fills each mask's share of the crossings (the
   paper's overlap heuristic).

:func:`companion.simulate.simulate_embedding` and :func:`companion.simulate.ideal_logits` build
an *idealised* network output from ground-truth masks, a teaching and testing device.
"""
from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage

__all__ = [
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
_CENTRES_CACHE: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_CENTRES_CACHE_SIZE = 512


def _cached_modes(points: np.ndarray, bandwidth: float, device) -> np.ndarray:
    """``mean_shift(points, bandwidth, seeds=bin_seeds(..., at="mean")).centers``, memoised."""
    key = (hashlib.sha1(np.ascontiguousarray(points).tobytes()).hexdigest(), points.shape,
           str(points.dtype), float(bandwidth), str(device))
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


class MeanShiftResult(NamedTuple):
    """Result of :func:`mean_shift`.

    Attributes
    ----------
    centers : np.ndarray
        (C, D) float64 cluster centres (the modes), most populated first.
    labels : np.ndarray
        (N,) int64 index of the nearest centre for every point.
    """

    centers: np.ndarray
    labels: np.ndarray


class NoModesFoundError(ValueError):
    """No seed of :func:`mean_shift` had a point within ``bandwidth`` (as in scikit-learn)."""


# --------------------------------------------------------------------------------------------
# mean-shift
# --------------------------------------------------------------------------------------------
def _as_points(points: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate an (N, D) point array and return it as a CPU-or-device torch tensor."""
    tensor = points.detach() if isinstance(points, torch.Tensor) else torch.from_numpy(np.asarray(points))
    if tensor.ndim != 2:
        raise ValueError(f"points must be a 2-D (N, D) array, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"points must hold at least one point of at least one dimension, got shape "
                         f"{tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.double()
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("points contain NaN or inf values")
    return tensor


def _resolve_device(points: np.ndarray | torch.Tensor, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(points, torch.Tensor):
        return points.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bin_seeds(points: np.ndarray | torch.Tensor, bandwidth: float, min_bin_freq: int = 1, *,
              at: str = "center", warn: bool = True) -> np.ndarray:
    """Seeds for mean-shift: one per occupied cell of a grid of spacing ``bandwidth``.

    Every point is rounded to the grid ``bandwidth * round(x / bandwidth)``; cells holding at
    least ``min_bin_freq`` points become seeds, in the order in which the points first reach
    them (as :func:`sklearn.cluster.get_bin_seeds`). If every point has a cell of its own,
    binning failed and the points themselves are the seeds (scikit-learn warns then, so do we).

    ``at="center"`` (scikit-learn's choice) seeds at the cell centres. In many dimensions a
    cell centre can lie far from all of the cell's points (up to ``bandwidth * sqrt(D) / 2``:
    twice the bandwidth in 16-d), so a seed may see no point at all and a small cluster may
    get no centre. ``at="mean"`` seeds at the mean of each cell's points instead, which always
    lies among them.

    Parameters
    ----------
    points : (N, D) array
    bandwidth : float
        Grid spacing, the mean-shift bandwidth.
    min_bin_freq : int
        Least number of points in a cell for it to seed.
    at : {"center", "mean"}
        Seed at the cell centre (scikit-learn) or at the mean of the cell's points.
    warn : bool
        Warn when binning failed (as scikit-learn does); :func:`segment` turns it off.

    Returns
    -------
    np.ndarray
        (S, D) seeds, float64.

    Examples
    --------
    >>> bin_seeds(np.array([[0.1, 0.0], [0.2, 0.1], [3.9, 4.2]]), bandwidth=2.0)
    array([[0., 0.],
           [4., 4.]])
    """
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    if at not in ("center", "mean"):
        raise ValueError(f"at must be 'center' or 'mean', got {at!r}")
    tensor = _as_points(points).cpu().double()
    cells, inverse, counts = torch.unique(torch.round(tensor / bandwidth), dim=0,
                                          return_inverse=True, return_counts=True)
    if len(cells) == tensor.shape[0] and min_bin_freq <= 1:
        if warn:
            warnings.warn(f"Binning data failed with bandwidth={bandwidth}: every point has a cell of its "
                          "own, using the points as seeds.", stacklevel=2)
        return tensor.numpy().copy()
    if at == "mean":
        sums = torch.zeros_like(cells).index_add_(0, inverse, tensor)
        cells = sums / counts.unsqueeze(1)
    else:
        cells = cells * bandwidth
    first_seen = torch.full((len(cells),), tensor.shape[0], dtype=torch.long)
    first_seen.scatter_reduce_(0, inverse, torch.arange(tensor.shape[0]), reduce="amin")
    keep = counts >= min_bin_freq
    return cells[keep][torch.argsort(first_seen[keep])].numpy()


def _shift_once(means: torch.Tensor, points: torch.Tensor, sq_norms: torch.Tensor, bandwidth: float,
                buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One flat-kernel mean-shift step for up to ``len(buffer)`` means.

    Returns the mean of the points within ``bandwidth`` (inclusive) of each mean and their
    number. ``buffer`` is a preallocated (chunk, N) work array: the only large allocation.
    """
    work = buffer[: len(means)]
    torch.addmm(sq_norms.unsqueeze(0), means, points.T, beta=1.0, alpha=-2.0, out=work)
    work += (means * means).sum(dim=1, keepdim=True)   # squared distances, (m, N)
    work.le_(bandwidth * bandwidth)                     # 1.0 within the kernel, else 0.0
    counts = work.sum(dim=1)
    sums = work @ points
    return sums / counts.clamp(min=1).unsqueeze(1), counts.round().long()


def _climb(points: torch.Tensor, seeds: torch.Tensor, bandwidth: float, max_iter: int,
           chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Iterate all seeds to their modes, as ``sklearn.cluster._mean_shift_single_seed`` does.

    A seed stops when it moved at most ``1e-3 * bandwidth`` or after ``max_iter + 1`` updates
    (scikit-learn's count); converged seeds are frozen and drop out of later batches.
    Returns the final means and, per seed, the number of points within ``bandwidth`` of the
    position before the last update (scikit-learn's "intensity"; 0 when the seed saw none).
    """
    stop_shift = 1e-3 * bandwidth
    means = seeds.clone()
    intensity = torch.zeros(len(seeds), dtype=torch.long, device=points.device)
    sq_norms = (points * points).sum(dim=1)
    buffer = torch.empty((min(chunk_size, len(seeds)), len(points)), dtype=points.dtype, device=points.device)
    active = torch.arange(len(seeds), device=points.device)
    for step in range(max_iter + 1):
        still_active = []
        for batch in torch.split(active, chunk_size):
            old = means[batch]
            new, counts = _shift_once(old, points, sq_norms, bandwidth, buffer)
            empty = counts == 0
            new = torch.where(empty.unsqueeze(1), old, new)
            means[batch] = new
            intensity[batch] = counts
            moved = torch.linalg.vector_norm(new - old, dim=1)
            done = empty | (moved <= stop_shift) | (step == max_iter)
            still_active.append(batch[~done])
        active = torch.cat(still_active)
        if len(active) == 0:
            break
    return means, intensity


def _suppress_duplicates(centers: np.ndarray, bandwidth: float) -> np.ndarray:
    """Greedy suppression: keep a centre unless a kept, more intense one lies within ``bandwidth``.

    ``centers`` must be sorted by decreasing intensity; returns a boolean keep mask.
    """
    keep = np.ones(len(centers), dtype=bool)
    for i in range(len(centers)):
        if keep[i]:
            near = np.sum((centers - centers[i]) ** 2, axis=1) <= bandwidth * bandwidth
            keep[near] = False
            keep[i] = True
    return keep


def _nearest(points: torch.Tensor, centers: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Index of the nearest centre for every point, ``chunk_size * C`` distances at a time."""
    labels = [torch.cdist(chunk, centers).argmin(dim=1) for chunk in torch.split(points, chunk_size)]
    return torch.cat(labels)


def mean_shift(points: np.ndarray | torch.Tensor, bandwidth: float, *, bin_seeding: bool = True,
               min_bin_freq: int = 1, max_iter: int = 300, chunk_size: int = 512,
               seeds: np.ndarray | None = None, device: str | torch.device | None = None) -> MeanShiftResult:
    """Flat-kernel mean-shift clustering, the algorithm of :class:`sklearn.cluster.MeanShift`.

    Seeds (see :func:`bin_seeds`, or every point when ``bin_seeding=False``) move to the mean
    of the points within ``bandwidth`` until they move less than ``1e-3 * bandwidth``. The
    resulting centres are sorted by the number of points around them (most first; ties by
    coordinates, as scikit-learn); a centre closer than ``bandwidth`` to a kept one is a
    duplicate and dropped. Every point gets the label of its nearest centre.

    Unlike scikit-learn, all seeds climb together: each step is two matrix products on a
    batch of seeds, in float32, on ``device``. Seeds that converged are frozen.

    Parameters
    ----------
    points : (N, D) np.ndarray or torch.Tensor
        Points to cluster, finite.
    bandwidth : float
        Radius of the flat kernel (and grid spacing of the seeds).
    bin_seeding : bool
        Seed from the occupied grid cells (True) or from every point (False, slow).
    min_bin_freq : int
        Least number of points in a grid cell for it to seed.
    max_iter : int
        Most iterations per seed.
    seeds : (S, D) array, optional
        Start here instead (``bin_seeding`` is then ignored), e.g.
        ``bin_seeds(points, bandwidth, at="mean")``.
    chunk_size : int
        Seeds per batch. Peak extra memory is one ``chunk_size x N`` float32 array
        (``4 * chunk_size * N`` bytes: 61 MB for the default 512 and N = 30,000) plus O(N * D).
    device : str or torch.device, optional
        Where to compute. Default: the device of a tensor input, else CUDA when available,
        else the CPU.

    Returns
    -------
    MeanShiftResult
        ``centers`` (C, D) float64, ``labels`` (N,) int64.

    Raises
    ------
    ValueError
        For a malformed ``points`` array, NaN/inf values or a non-positive bandwidth.
    NoModesFoundError
        When no seed has a point within ``bandwidth`` (a :class:`ValueError`, as scikit-learn's).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> points = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(5, 0.1, (30, 2))])
    >>> result = mean_shift(points, bandwidth=1.0, device="cpu")
    >>> np.abs(result.centers.round(1))
    array([[0., 0.],
           [5., 5.]])
    >>> np.bincount(result.labels)
    array([50, 30])
    """
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    if max_iter < 0 or chunk_size < 1 or min_bin_freq < 1:
        raise ValueError(f"need max_iter >= 0, chunk_size >= 1, min_bin_freq >= 1; got {max_iter}, "
                         f"{chunk_size}, {min_bin_freq}")
    target = _resolve_device(points, device)
    tensor = _as_points(points)
    if seeds is None:
        seeds = bin_seeds(tensor, bandwidth, min_bin_freq) if bin_seeding else tensor.cpu().double().numpy()
    seeds = np.asarray(seeds, dtype=np.float64)
    if seeds.ndim != 2 or seeds.shape[1] != tensor.shape[1]:
        raise ValueError(f"seeds must be (S, D) with D = {tensor.shape[1]} as points, got shape {seeds.shape}")
    if len(seeds) == 0:
        raise NoModesFoundError(f"no seeds to start from (min_bin_freq={min_bin_freq} too large?)")

    # Centre the data before going to float32: squared distances by the dot-product identity
    # lose precision far from the origin. Mean-shift commutes with the translation.
    offset = tensor.double().mean(dim=0).cpu()
    work_points = (tensor.double().cpu() - offset).to(device=target, dtype=torch.float32)
    work_seeds = (torch.from_numpy(seeds) - offset).to(device=target, dtype=torch.float32)
    means, intensity = _climb(work_points, work_seeds, float(bandwidth), max_iter, chunk_size)

    centers = (means.double().cpu() + offset).numpy()
    intensity = intensity.cpu().numpy()
    found = intensity > 0
    if not found.any():
        raise NoModesFoundError(f"No point was within bandwidth={bandwidth} of any seed; try a larger "
                                "bandwidth or bin_seeding=False")
    centers, intensity = _deduplicate_exact(centers[found], intensity[found])
    order = np.lexsort(tuple(centers[:, ::-1].T) + (intensity,))[::-1]
    centers = centers[order]
    centers = centers[_suppress_duplicates(centers, bandwidth)]

    labels = _nearest(work_points, (torch.from_numpy(centers) - offset).to(work_points), chunk_size)
    return MeanShiftResult(centers=centers, labels=labels.cpu().numpy().astype(np.int64))


def _deduplicate_exact(centers: np.ndarray, intensity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge seeds that ended on exactly the same point; the later seed's intensity wins
    (scikit-learn keeps its centres in a dict keyed by the coordinates)."""
    unique, inverse = np.unique(centers, axis=0, return_inverse=True)
    last = np.full(len(unique), -1)
    np.maximum.at(last, inverse.ravel(), np.arange(len(centers)))
    return unique, intensity[last]


def mean_shift_trajectories(points: np.ndarray, seeds: np.ndarray, bandwidth: float,
                            n_steps: int = 20) -> np.ndarray:
    """Positions of ``seeds`` during ``n_steps`` flat-kernel mean-shift steps (for figures).

    A seed that has no point within ``bandwidth`` stays where it is.

    Parameters
    ----------
    points : (N, D) array
    seeds : (S, D) array
    bandwidth : float
    n_steps : int

    Returns
    -------
    np.ndarray
        (n_steps + 1, S, D) float64; row 0 holds the seeds.

    Examples
    --------
    >>> points = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    >>> mean_shift_trajectories(points, np.array([[0.9, 0.2]]), bandwidth=1.5, n_steps=2)[:, 0]
    array([[0.9, 0.2],
           [0.5, 0. ],
           [0.5, 0. ]])
    """
    pts = torch.from_numpy(np.asarray(points, dtype=np.float64))
    means = torch.from_numpy(np.asarray(seeds, dtype=np.float64))
    if pts.ndim != 2 or means.ndim != 2 or pts.shape[1] != means.shape[1]:
        raise ValueError(f"points (N, D) and seeds (S, D) must share D, got {tuple(pts.shape)} and "
                         f"{tuple(means.shape)}")
    sq_norms = (pts * pts).sum(dim=1)
    buffer = torch.empty((len(means), len(pts)), dtype=pts.dtype)
    path = [means.clone()]
    for _ in range(n_steps):
        new, counts = _shift_once(means, pts, sq_norms, float(bandwidth), buffer)
        means = torch.where((counts == 0).unsqueeze(1), means, new)
        path.append(means.clone())
    return torch.stack(path).numpy()


# --------------------------------------------------------------------------------------------
# instances from embeddings
# --------------------------------------------------------------------------------------------
def _check_network_output(embedding: np.ndarray, class_logits: np.ndarray) -> None:
    if embedding.ndim != 3:
        raise ValueError(f"embedding must be (E, H, W), got shape {embedding.shape}")
    if class_logits.ndim != 3 or class_logits.shape[0] != 3 or class_logits.shape[1:] != embedding.shape[1:]:
        raise ValueError(f"class_logits must be (3, H, W) matching embedding (E, H, W); got class_logits "
                         f"{class_logits.shape} and embedding {embedding.shape}")
    if not np.isfinite(embedding).all():
        raise ValueError("embedding contains NaN or inf values")
    if not np.isfinite(class_logits).all():
        raise ValueError("class_logits contain NaN or inf values")


def _check_segment_settings(bandwidth: float, threshold: float, min_size: int,
                            max_points: int | None) -> None:
    for name, value in (("bandwidth", bandwidth), ("threshold", threshold)):
        if not (np.isscalar(value) and np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")
    if max_points is not None and (isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer))
                                   or max_points < 1):
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


def segment(embedding: np.ndarray | torch.Tensor, class_logits: np.ndarray | torch.Tensor, bandwidth: float,
            threshold: float, *, min_size: int = DEFAULT_MIN_SIZE, max_points: int | None = None,
            cluster_overlap: bool = False, seed: int = 0,
            device: str | torch.device | None = None, clustering: str = "global",
            single_below: int = DEFAULT_SINGLE_BELOW) -> np.ndarray:
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
    >>> from companion.simulate import ideal_logits, simulate_embedding
    >>> instances = np.zeros((2, 40, 40), bool)
    >>> instances[0, 5:15, 5:35] = True; instances[1, 25:35, 5:35] = True
    >>> embedding = simulate_embedding(instances, dim=4, seed=0)
    >>> segment(embedding, ideal_logits(instances), bandwidth=2.0, threshold=1.5).shape
    (2, 40, 40)
    """
    embedding, class_logits = _to_numpy(embedding), _to_numpy(class_logits)
    _check_network_output(embedding, class_logits)
    _check_segment_settings(bandwidth, threshold, min_size, max_points)
    if clustering not in ("global", "components"):
        raise ValueError(f"clustering must be 'global' or 'components', got {clustering!r}")
    classes = np.argmax(class_logits, axis=0)
    foreground, overlap = classes != 0, classes == 2
    options = dict(bandwidth=bandwidth, threshold=threshold, min_size=min_size,
                   max_points=max_points, cluster_overlap=cluster_overlap, seed=seed, device=device)
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
                parts = _cluster_region(embedding[(slice(None),) + box] * region, region,
                                        overlap[box] & region, **options)
            for part in parts:
                mask = np.zeros(foreground.shape, dtype=bool)
                mask[box] = part
                masks.append(mask)
        masks.sort(key=lambda m: -int(m.sum()))
    return np.stack(masks) if masks else np.zeros((0,) + foreground.shape, dtype=bool)


def _cluster_region(embedding: np.ndarray, foreground: np.ndarray, overlap: np.ndarray, *,
                    bandwidth: float, threshold: float, min_size: int, max_points: int | None,
                    cluster_overlap: bool, seed: int, device) -> list[np.ndarray]:
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


def claim_pixels(embedding: np.ndarray, mask: np.ndarray, centers: np.ndarray, threshold: float) -> np.ndarray:
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
        raise ValueError(f"need embedding (E, H, W), mask (H, W), centers (C, E); got {embedding.shape}, "
                         f"{mask.shape}, {centers.shape}")
    points = embedding[:, mask].T.astype(np.float64)
    sq_dist = (centers ** 2).sum(1)[:, None] - 2.0 * centers @ points.T + (points ** 2).sum(1)[None, :]
    claimed = np.zeros((len(centers),) + mask.shape, dtype=bool)
    claimed[:, mask] = sq_dist <= threshold * threshold
    return claimed
