"""Flat-kernel mean-shift clustering, the algorithm of :class:`sklearn.cluster.MeanShift`, in torch.

:func:`mean_shift` gives the same result as ``MeanShift(bandwidth, bin_seeding=True)`` but lets
all seeds climb together, each step two matrix products on a batch of seeds (on the GPU when
there is one). :func:`bin_seeds` places the seeds on a grid (at the cell centres as
scikit-learn, or at the mean of each cell's points); :func:`mean_shift_trajectories` records
the seeds' paths for figures. :func:`companion.inference.postprocess.segment` uses it to find one centre
per instance in the pixel embeddings.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "MeanShiftResult",
    "NoModesFoundError",
    "bin_seeds",
    "mean_shift",
    "mean_shift_trajectories",
]

from .._device import resolve_device


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


def _as_points(points: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate an (N, D) point array and return it as a CPU-or-device torch tensor."""
    tensor = points.detach() if isinstance(points, torch.Tensor) else torch.from_numpy(np.asarray(points))
    if tensor.ndim != 2:
        raise ValueError(f"points must be a 2-D (N, D) array, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(
            f"points must hold at least one point of at least one dimension, got shape {tuple(tensor.shape)}"
        )
    if not tensor.is_floating_point():
        tensor = tensor.double()
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("points contain NaN or inf values")
    return tensor


def _points_device(points: np.ndarray | torch.Tensor, device: str | torch.device | None) -> torch.device:
    if device is None and isinstance(points, torch.Tensor):
        return points.device
    return resolve_device(device)


def bin_seeds(
    points: np.ndarray | torch.Tensor,
    bandwidth: float,
    min_bin_freq: int = 1,
    *,
    at: str = "center",
    warn: bool = True,
) -> np.ndarray:
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
    cells, inverse, counts = torch.unique(
        torch.round(tensor / bandwidth), dim=0, return_inverse=True, return_counts=True
    )
    if len(cells) == tensor.shape[0] and min_bin_freq <= 1:
        if warn:
            warnings.warn(
                f"Binning data failed with bandwidth={bandwidth}: every point has a cell of its "
                "own, using the points as seeds.",
                stacklevel=2,
            )
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


def _shift_once(
    means: torch.Tensor, points: torch.Tensor, sq_norms: torch.Tensor, bandwidth: float, buffer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One flat-kernel mean-shift step for up to ``len(buffer)`` means.

    Returns the mean of the points within ``bandwidth`` (inclusive) of each mean and their
    number. ``buffer`` is a preallocated (chunk, N) work array: the only large allocation.
    """
    work = buffer[: len(means)]
    torch.addmm(sq_norms.unsqueeze(0), means, points.T, beta=1.0, alpha=-2.0, out=work)
    work += (means * means).sum(dim=1, keepdim=True)  # squared distances, (m, N)
    work.le_(bandwidth * bandwidth)  # 1.0 within the kernel, else 0.0
    counts = work.sum(dim=1)
    sums = work @ points
    return sums / counts.clamp(min=1).unsqueeze(1), counts.round().long()


def _climb(
    points: torch.Tensor, seeds: torch.Tensor, bandwidth: float, max_iter: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
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


def mean_shift(
    points: np.ndarray | torch.Tensor,
    bandwidth: float,
    *,
    bin_seeding: bool = True,
    min_bin_freq: int = 1,
    max_iter: int = 300,
    chunk_size: int = 512,
    seeds: np.ndarray | None = None,
    device: str | torch.device | None = None,
) -> MeanShiftResult:
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
        raise ValueError(
            f"need max_iter >= 0, chunk_size >= 1, min_bin_freq >= 1; got {max_iter}, "
            f"{chunk_size}, {min_bin_freq}"
        )
    target = _points_device(points, device)
    tensor = _as_points(points)
    if seeds is None:
        seeds = bin_seeds(tensor, bandwidth, min_bin_freq) if bin_seeding else tensor.cpu().double().numpy()
    seeds = np.asarray(seeds, dtype=np.float64)
    if seeds.ndim != 2 or seeds.shape[1] != tensor.shape[1]:
        raise ValueError(
            f"seeds must be (S, D) with D = {tensor.shape[1]} as points, got shape {seeds.shape}"
        )
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
        raise NoModesFoundError(
            f"No point was within bandwidth={bandwidth} of any seed; try a larger "
            "bandwidth or bin_seeding=False"
        )
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


def mean_shift_trajectories(
    points: np.ndarray, seeds: np.ndarray, bandwidth: float, n_steps: int = 20
) -> np.ndarray:
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
        raise ValueError(
            f"points (N, D) and seeds (S, D) must share D, got {tuple(pts.shape)} and {tuple(means.shape)}"
        )
    sq_norms = (pts * pts).sum(dim=1)
    buffer = torch.empty((len(means), len(pts)), dtype=pts.dtype)
    path = [means.clone()]
    for _ in range(n_steps):
        new, counts = _shift_once(means, pts, sq_norms, float(bandwidth), buffer)
        means = torch.where((counts == 0).unsqueeze(1), means, new)
        path.append(means.clone())
    return torch.stack(path).numpy()
