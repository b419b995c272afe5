"""Tests of companion.evaluation.proofreading on tiny hand-built examples."""

from __future__ import annotations

import numpy as np
import pytest

from companion.evaluation.metrics import instance_metrics
from companion.evaluation.proofreading import (
    Peaks,
    correct_at_peaks,
    find_peaks,
    patch_means,
    simulate_proofreading,
    uncertainty_map,
)
from companion.inference.agglomerate import bernoulli_entropy, instance_scores


def _worm(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows, cols] = True
    return m


def test_uncertainty_map_is_max_entropy_and_zero_without_instances():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 5, 6))
    expected = np.max(
        [[[bernoulli_entropy(probs[k, y, x]) for x in range(6)] for y in range(5)] for k in range(3)], axis=0
    )
    np.testing.assert_allclose(uncertainty_map(probs), expected)
    np.testing.assert_array_equal(uncertainty_map(np.zeros((0, 5, 6))), np.zeros((5, 6)))


def test_patch_means_with_partial_border_patches():
    image = np.arange(30.0).reshape(5, 6)
    means = patch_means(image, 4)
    assert means.shape == (2, 2)
    assert means[0, 0] == image[:4, :4].mean() and means[1, 1] == image[4:, 4:].mean()


def test_find_peaks_suppresses_neighbours_only_in_the_same_image():
    a = np.zeros((32, 64))
    a[0:4, 0:4] = 0.6  # best peak
    a[0:4, 16:20] = 0.5  # 16 px away: suppressed (<= 16)
    a[0:4, 20:24] = 0.45  # 20 px away: a peak
    b = np.zeros((32, 64))
    b[0:4, 4:8] = 0.55  # other image, close in coordinates: a peak
    peaks = find_peaks([a, b], 10)
    assert list(zip(peaks.image.tolist(), peaks.x.tolist())) == [(0, 0), (1, 4), (0, 20)]
    np.testing.assert_allclose(peaks.value, [0.6, 0.55, 0.45])
    assert len(find_peaks([a, b], 2).image) == 2


def _two_worm_scene():
    """Image 0: a confident correct worm (left) and a half-found uncertain worm (right)."""
    shape = (32, 48)
    left, right = _worm(shape, slice(4, 28), slice(2, 8)), _worm(shape, slice(4, 28), slice(30, 36))
    gt = np.stack([left, right])
    probs = np.zeros((2,) + shape, np.float32)
    probs[0][left] = 1.0
    probs[1][right] = 0.5  # uncertain: below 0.75 ...
    probs[1, 4:16, 30:36] = 0.8  # ... except the top half, which is predicted
    return gt, probs


def test_wrong_instance_at_the_most_uncertain_place_gets_fixed():
    gt, probs = _two_worm_scene()
    table = simulate_proofreading([gt], [probs], (0, 1))
    first = table.peaks
    assert first.image[0] == 0 and 30 - 4 <= first.x[0] <= 36  # peak on the right worm
    before, after = table.rows
    assert before["avAP"] < 1.0
    for key in ("avAP", "AP50", "AP75", "recall80", "avAP_dsb"):
        assert after[key] == pytest.approx(1.0), key
    fix = table.corrections[1]
    assert fix.n_replaced == 1 and fix.n_removed == 0 and fix.n_added == 0
    (changed,) = fix.changed[0]
    np.testing.assert_array_equal(fix.preds[0][changed], gt[1])
    untouched = [k for k in range(len(fix.preds[0])) if k != changed]
    np.testing.assert_array_equal(fix.preds[0][untouched[0]], gt[0])  # the confident worm kept


def test_zero_corrections_equals_plain_evaluate():
    gt, probs = _two_worm_scene()
    rng = np.random.default_rng(1)
    probs2 = np.clip(probs + 0.3 * rng.random(probs.shape) * (probs > 0), 0, 1).astype(np.float32)
    table = simulate_proofreading([gt, gt], [probs, probs2], (0,))
    preds = [p >= 0.75 for p in (probs, probs2)]
    keep = [b.any(axis=(1, 2)) for b in preds]
    plain = instance_metrics(
        [gt, gt],
        [b[k] for b, k in zip(preds, keep)],
        [instance_scores(p)[k] for p, k in zip((probs, probs2), keep)],
    )
    for key in ("avAP", "AP50", "AP75", "recall80", "avAP_dsb"):
        assert table.rows[0][key] == plain[key], key


def test_false_positive_removed_and_missed_worm_added():
    shape = (24, 48)
    worm = _worm(shape, slice(4, 20), slice(4, 10))
    gt = worm[None]
    fp = _worm(shape, slice(4, 20), slice(30, 36))
    # prediction 0: a false positive, core 0.8 (kept), rim 0.5 (uncertain); the worm itself
    # has probability 0.4 (missed after binarisation, but uncertain)
    probs = np.zeros((2,) + shape, np.float32)
    probs[0][fp] = 0.5
    probs[0, 6:18, 31:35] = 0.8
    probs[1][worm] = 0.4
    table = simulate_proofreading([gt], [probs], (0, 1, 2))
    assert table.rows[0]["recall80"] == 0.0
    last = table.corrections[2]
    assert last.n_removed == 1 and last.n_added == 1
    assert len(last.preds[0]) == 1
    np.testing.assert_array_equal(last.preds[0][0], worm)
    assert table.rows[2]["avAP"] == pytest.approx(1.0)


def test_correct_at_peaks_leaves_other_images_alone():
    gt, probs = _two_worm_scene()
    preds = [probs >= 0.75, probs >= 0.75]
    preds = [p[p.any(axis=(1, 2))] for p in preds]
    peaks = Peaks(np.array([1]), np.array([8]), np.array([32]), np.array([0.69]))
    fix = correct_at_peaks([gt, gt], preds, [np.ones(2), np.ones(2)], peaks)
    assert fix.preds[0] is preds[0] and len(fix.changed[0]) == 0
    assert len(fix.changed[1]) == 1


def test_worm_seen_at_the_peak_is_fixed_even_if_its_prediction_ends_elsewhere():
    shape = (12, 48)
    worm = _worm(shape, slice(4, 8), slice(0, 40))
    probs = np.zeros((1,) + shape, np.float32)
    probs[0, 4:8, 0:12] = 1.0  # predicted part, far from the peak
    probs[0, 4:8, 12:24] = 0.3  # missing part, somewhat uncertain
    probs[0, 4:8, 24:40] = 0.5  # missing part, most uncertain: the peak is here
    table = simulate_proofreading([worm[None]], [probs], (0, 1))
    assert table.peaks.x[0] >= 24
    fix = table.corrections[1]
    assert fix.n_replaced == 1 and fix.n_added == 0
    np.testing.assert_array_equal(fix.preds[0], worm[None])


def test_image_uncertainty_is_zero_when_certain_and_log2_when_undecided():
    from companion.inference.agglomerate import image_uncertainty

    certain = np.zeros((2, 6, 6))
    certain[0, :3], certain[1, 3:] = 1.0, 1.0
    assert image_uncertainty(certain) == 0.0
    undecided = certain * 0.5
    assert image_uncertainty(undecided) == pytest.approx(np.log(2))
    assert image_uncertainty(np.zeros((0, 6, 6))) == 0.0
    assert image_uncertainty(np.zeros((1, 6, 6))) == 0.0  # an instance with no pixel: no area
    # a more uncertain rim raises it
    rim = certain.copy()
    rim[0, 2] = 0.6
    assert 0 < image_uncertainty(rim) < image_uncertainty(undecided)
