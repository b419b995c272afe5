"""Seeded synthetic worms in the BBBC010 format, for tests and for chapters that need no download.

Each worm is a smooth random curve (a random walk of the heading angle, smoothed) thickened
with a tapering, slightly wavy radius profile. Worms are placed so that many of them cross,
like in BBBC010. The image has the two BBBC010 channels:

* channel 0, fluorescence-like: dark background, "dead" worms bright, "live" worms dim;
* channel 1, brightfield-like: a bright, unevenly lit well (a rounded square, dark outside, as
  in BBBC010's transmitted-light images), every worm darker with a darker rim.

Both channels get a little blur and Gaussian noise. Everything is drawn from one
:func:`numpy.random.default_rng` seeded with ``seed``, so a sample is a pure function of its
arguments.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .bbbc010 import Sample

__all__ = ["worm_centerline", "rasterize_worm", "make_sample", "make_dataset"]


def worm_centerline(
    rng: np.random.Generator, length: float, start: np.ndarray, *, curviness: float = 0.015, step: float = 1.0
) -> np.ndarray:
    """A smooth random curve of about ``length`` pixels starting at ``start`` (y, x).

    The heading angle changes by a smooth random curvature (Gaussian noise smoothed over an
    eighth of the body, scaled to a standard deviation of ``curviness`` radians per pixel),
    giving C- and S-shaped bodies.

    Returns
    -------
    np.ndarray
        ``(N, 2)`` float array of (y, x) points spaced ``step`` pixels apart.

    Examples
    --------
    >>> pts = worm_centerline(np.random.default_rng(0), 50.0, np.array([10.0, 10.0]))
    >>> pts.shape
    (50, 2)
    """
    n = max(int(round(length / step)), 2)
    curvature = ndimage.gaussian_filter1d(rng.normal(0.0, 1.0, n), sigma=max(n / 8, 1.0), mode="nearest")
    turns = curvature * (curviness * step / max(float(np.std(curvature)), 1e-6))
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(turns)
    steps = step * np.stack([np.sin(heading), np.cos(heading)], axis=1)
    return start + np.cumsum(steps, axis=0) - steps[0]


def rasterize_worm(centerline: np.ndarray, radius: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Binary mask of the tube of ``radius[i]`` around ``centerline[i]``, clipped to ``shape``.

    Each pixel is inside if its distance to the nearest centerline pixel is at most that
    pixel's radius (one Euclidean distance transform on the worm's bounding box).

    Examples
    --------
    >>> line = np.stack([np.full(20, 10.0), np.arange(5.0, 25.0)], axis=1)
    >>> mask = rasterize_worm(line, np.full(20, 3.0), (32, 32))
    >>> bool(mask[10, 15]), bool(mask[20, 15])
    (True, False)
    """
    height, width = shape
    pad = int(np.ceil(radius.max())) + 2
    lo = np.floor(centerline.min(axis=0)).astype(int) - pad
    hi = np.ceil(centerline.max(axis=0)).astype(int) + pad + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, (height, width))
    mask = np.zeros(shape, dtype=bool)
    if np.any(hi <= lo):
        return mask
    box = tuple(hi - lo)
    idx = np.round(centerline).astype(int) - lo
    inside = np.all((idx >= 0) & (idx < box), axis=1)
    if not inside.any():
        return mask
    idx, rad = idx[inside], radius[inside]
    seeds = np.ones(box, dtype=bool)
    radius_map = np.zeros(box, dtype=np.float32)
    seeds[idx[:, 0], idx[:, 1]] = False
    radius_map[idx[:, 0], idx[:, 1]] = rad
    dist, (iy, ix) = ndimage.distance_transform_edt(seeds, return_indices=True)
    mask[lo[0] : hi[0], lo[1] : hi[1]] = dist <= radius_map[iy, ix]
    return mask


def _radius_profile(rng: np.random.Generator, n: int, max_radius: float) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)
    taper = np.sin(np.pi * np.clip(t, 0.02, 0.98)) ** 0.5  # round body, tapered ends
    wobble = 1.0 + 0.08 * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 2 * np.pi))
    return np.maximum(max_radius * taper * wobble, 1.0)


def _draw_worms(
    rng: np.random.Generator,
    well: np.ndarray,
    n_worms: int,
    length_range: tuple[float, float],
    radius_range: tuple[float, float],
    overlap_prob: float,
    min_pixels: int,
) -> list[np.ndarray]:
    shape = well.shape
    inside_well = well > 0.5
    height, width = shape
    masks: list[np.ndarray] = []
    lines: list[np.ndarray] = []
    for _ in range(20 * n_worms):
        if len(masks) == n_worms:
            break
        length = rng.uniform(*length_range)
        if lines and rng.random() < overlap_prob:
            # start a short way before a point of an existing worm, so the new one crosses it
            other = lines[rng.integers(len(lines))]
            anchor = other[rng.integers(len(other))]
            start = anchor + rng.normal(0.0, length / 6, 2)
        else:
            margin = 0.15 * np.array([height, width])
            start = rng.uniform(margin, np.array([height, width]) - margin)
        line = worm_centerline(rng, length, start)
        radius = _radius_profile(rng, len(line), rng.uniform(*radius_range))
        mask = rasterize_worm(line, radius, shape)
        if (
            mask.sum() >= min_pixels and (mask & ~inside_well).sum() <= 0.1 * mask.sum()
        ):  # worms swim in the well
            masks.append(mask)
            lines.append(line)
    return masks


def _well_region(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Soft rounded-square mask of the well (1 inside, 0 outside), like BBBC010's brightfield."""
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    half = rng.uniform(0.42, 0.47) * min(height, width)
    corner = 0.3 * half
    dy = np.maximum(np.abs(yy - (height - 1) / 2) - (half - corner), 0)
    dx = np.maximum(np.abs(xx - (width - 1) / 2) - (half - corner), 0)
    inside = (np.hypot(dy, dx) <= corner).astype(np.float32)
    return ndimage.gaussian_filter(inside, 1.5)


def _render(rng: np.random.Generator, masks: list[np.ndarray], well: np.ndarray, noise: float) -> np.ndarray:
    height, width = well.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    vignette = 1.0 - 0.5 * (((yy - cy) / height) ** 2 + ((xx - cx) / width) ** 2)
    fluo = np.full(well.shape, 0.02, dtype=np.float32)
    bright = 0.03 + (0.6 + rng.uniform(-0.05, 0.05)) * vignette * well
    for mask in masks:
        dead = rng.random() < 0.4
        fluo += mask * np.float32(rng.uniform(0.15, 0.35) if dead else rng.uniform(0.005, 0.02))
        body = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)
        rim = body * (1.0 - body) * 4.0  # peaks at the edge of the worm
        bright = bright * (1.0 - np.float32(rng.uniform(0.45, 0.6)) * body - np.float32(0.15) * rim)
    fluo = ndimage.gaussian_filter(fluo, 1.0)
    image = np.stack([fluo, bright]).astype(np.float32)
    image += rng.normal(0.0, noise, image.shape).astype(np.float32) * np.float32([[[0.25]], [[1.0]]])
    return np.clip(image, 0.0, 1.0)


def make_sample(
    seed: int,
    shape: tuple[int, int] = (256, 256),
    n_worms: tuple[int, int] | int = (3, 8),
    *,
    length_range: tuple[float, float] | None = None,
    radius_range: tuple[float, float] | None = None,
    overlap_prob: float = 0.6,
    noise: float = 0.02,
    min_pixels: int = 30,
) -> Sample:
    """One synthetic well: overlapping worms rendered in two BBBC010-like channels.

    Parameters
    ----------
    seed : int
        Seed of the random generator; the sample is fully determined by the arguments.
    shape : (int, int)
        Image height and width.
    n_worms : (int, int) or int
        Number of worms, drawn uniformly from the inclusive range (or fixed). Worms whose mask
        inside the image has fewer than ``min_pixels`` pixels, or more than 10 % outside the well, are redrawn.
    length_range, radius_range : (float, float), optional
        Worm length and maximal half-width in pixels; default scales with the image
        (``0.25 .. 0.5`` and ``0.015 .. 0.025`` times the smaller side; BBBC010's worms are
        about 100-200 x 10-15 pixels in 520 x 696 images; synthetic ones are a bit thicker so
        that small test images stay learnable).
    overlap_prob : float
        Probability that a worm starts next to an earlier one, so that they cross.
    noise : float
        Standard deviation of the Gaussian noise of the brightfield channel (a quarter of it
        on the fluorescence channel).
    min_pixels : int
        Minimal mask size of a worm.

    Returns
    -------
    Sample
        ``well = "SYN-<seed>"``, ``image`` float32 ``(2, H, W)`` in ``[0, 1]``, ``instances``
        bool ``(K, H, W)``.

    Examples
    --------
    >>> s = make_sample(0)
    >>> s.well, s.image.shape, s.instances.dtype
    ('SYN-0', (2, 256, 256), dtype('bool'))
    """
    height, width = shape
    if height < 16 or width < 16:
        raise ValueError(f"shape must be at least (16, 16), got {shape}")
    lo, hi = (n_worms, n_worms) if np.isscalar(n_worms) else n_worms
    if not 0 <= lo <= hi:
        raise ValueError(f"n_worms must be a count or an increasing (min, max) range, got {n_worms}")
    side = min(height, width)
    length_range = length_range or (0.25 * side, 0.5 * side)
    radius_range = radius_range or (max(0.015 * side, 2.0), max(0.025 * side, 2.5))
    rng = np.random.default_rng(seed)
    well = _well_region(rng, (height, width))
    masks = _draw_worms(
        rng, well, int(rng.integers(lo, hi + 1)), length_range, radius_range, overlap_prob, min_pixels
    )
    instances = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
    image = _render(rng, masks, well, noise)
    return Sample(well=f"SYN-{seed}", image=image, instances=instances)


def make_dataset(n: int, seed: int = 0, shape: tuple[int, int] = (256, 256), **kwargs) -> list[Sample]:
    """``n`` synthetic samples: ``[make_sample(seed + i, shape, **kwargs) for i in range(n)]``.

    Examples
    --------
    >>> [s.well for s in make_dataset(3, seed=10, shape=(64, 64))]
    ['SYN-10', 'SYN-11', 'SYN-12']
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_sample(seed + i, shape, **kwargs) for i in range(n)]
