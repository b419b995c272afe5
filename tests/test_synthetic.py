"""Tests of companion.data.synthetic: format, determinism, geometry and speed of synthetic worms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from companion.data.bbbc010 import Sample
from companion.data.synthetic import make_dataset, make_sample, rasterize_worm, worm_centerline


def test_sample_format():
    s = make_sample(0)
    assert isinstance(s, Sample) and s.well == "SYN-0"
    assert s.image.shape == (2, 256, 256) and s.image.dtype == np.float32
    assert s.image.min() >= 0.0 and s.image.max() <= 1.0
    assert s.instances.dtype == bool and s.instances.shape[1:] == (256, 256)
    assert 3 <= len(s.instances) <= 8
    assert all(m.sum() >= 30 for m in s.instances)


def test_deterministic_and_seed_dependent():
    a, b, c = make_sample(5, (64, 80)), make_sample(5, (64, 80)), make_sample(6, (64, 80))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.instances, b.instances)
    assert a.image.shape == c.image.shape and not np.array_equal(a.image, c.image)


def test_fixed_worm_count_and_overlaps():
    samples = [make_sample(seed, n_worms=6) for seed in range(6)]
    assert all(len(s.instances) == 6 for s in samples)
    overlap_pixels = [int((s.instances.sum(0) >= 2).sum()) for s in samples]
    assert sum(p > 0 for p in overlap_pixels) >= 4, overlap_pixels


def test_channels_look_like_bbbc010():
    s = make_sample(1)
    worm = s.instances.any(0)
    fluo, bright = s.image
    around = ndimage.binary_dilation(worm, iterations=6) & ~worm
    assert bright[worm].mean() < bright[around].mean() - 0.1  # worms are darker than the well in brightfield
    assert bright[:5, :5].mean() < 0.1  # dark outside the well ...
    center = (slice(100, 156), slice(100, 156))
    assert np.median(bright[center][~worm[center]]) > 0.3  # ... bright inside
    assert fluo[worm].mean() > fluo[~worm].mean()  # and glow (some of them) in fluorescence
    assert fluo[~worm].mean() < 0.1  # dark fluorescence background


def test_make_dataset_is_make_sample_per_seed():
    data = make_dataset(3, seed=7, shape=(48, 64), n_worms=(2, 3))
    assert [s.well for s in data] == ["SYN-7", "SYN-8", "SYN-9"]
    for i, s in enumerate(data):
        ref = make_sample(7 + i, (48, 64), n_worms=(2, 3))
        np.testing.assert_array_equal(s.image, ref.image)
        np.testing.assert_array_equal(s.instances, ref.instances)
    assert make_dataset(0) == []


def test_centerline_is_a_smooth_unit_step_curve():
    pts = worm_centerline(np.random.default_rng(0), 100.0, np.array([50.0, 60.0]))
    assert pts.shape == (100, 2)
    np.testing.assert_allclose(pts[0], [50.0, 60.0])
    np.testing.assert_allclose(np.linalg.norm(np.diff(pts, axis=0), axis=1), 1.0, rtol=1e-9)
    headings = np.unwrap(np.arctan2(*np.diff(pts, axis=0).T))
    assert np.abs(np.diff(headings)).max() < 0.2  # no kinks


def test_rasterize_constant_radius_matches_brute_force():
    rng = np.random.default_rng(2)
    line = worm_centerline(rng, 40.0, np.array([20.0, 10.0]))
    radius = np.full(len(line), 3.5)
    mask = rasterize_worm(line, radius, (40, 50))
    yy, xx = np.mgrid[0:40, 0:50]
    centers = np.round(line).astype(int)
    dist = np.sqrt((yy[..., None] - centers[:, 0]) ** 2 + (xx[..., None] - centers[:, 1]) ** 2).min(-1)
    np.testing.assert_array_equal(mask, dist <= 3.5)


def test_rasterize_outside_image_is_empty():
    line = np.stack([np.full(10, -50.0), np.arange(10.0)], axis=1)
    assert not rasterize_worm(line, np.full(10, 3.0), (20, 20)).any()


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        make_sample(0, shape=(8, 8))
    with pytest.raises(ValueError, match="n_worms"):
        make_sample(0, n_worms=(5, 2))
    with pytest.raises(ValueError, match="n must be"):
        make_dataset(-1)
