"""Tests of companion.evaluation.uncertainty: entropy, patch table, PAvPU counts on hand-built examples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from companion.evaluation.uncertainty import (
    PatchTable,
    bernoulli_entropy,
    hungarian_partners,
    patch_table,
    pavpu,
    pavpu_from_patches,
    pavpu_references,
)


def _h(p):
    return float(scipy_entropy([p, 1 - p]))  # nats


def test_bernoulli_entropy_matches_scipy_and_is_safe_at_0_and_1():
    p = np.array([0.0, 1e-12, 0.1, 0.5, 0.75, 1.0])
    expected = [_h(x) for x in p]
    np.testing.assert_allclose(bernoulli_entropy(p), expected, atol=1e-12)
    assert np.isfinite(bernoulli_entropy(p)).all()
    assert bernoulli_entropy(0.5) == pytest.approx(np.log(2))


def _hand_example():
    """8x8 image, one gt worm on rows 0-3 (patches A = cols 0-3, B = cols 4-7).

    The prediction is 0.9 on A (accurate), 0.5 on B (below 0.75: missed, inaccurate) and
    0.8 on 4 pixels of patch C (rows 4-7, cols 0-3), where there is no worm: C has 12 of 16
    pixels accurate (0.75 >= 0.5, accurate) and mean entropy H(0.8) * 4 / 16.
    """
    gt = np.zeros((1, 8, 8), bool)
    gt[0, :4, :] = True
    prob = np.zeros((1, 8, 8))
    prob[0, :4, :4] = 0.9
    prob[0, :4, 4:] = 0.5
    prob[0, 4:6, 0:2] = 0.8
    return gt, prob


def test_patch_table_hand_example():
    gt, prob = _hand_example()
    t = patch_table([gt], [prob])
    rows = sorted(zip(t.y.tolist(), t.x.tolist(), t.accuracy.tolist(), t.entropy.tolist()))
    assert [(y, x) for y, x, _, _ in rows] == [(0, 0), (0, 4), (4, 0)]  # patch D is untouched
    assert [a for _, _, a, _ in rows] == [1.0, 0.0, 0.75]
    np.testing.assert_allclose([e for *_, e in rows], [_h(0.9), _h(0.5), _h(0.8) / 4])


def test_pavpu_counts_hand_example():
    gt, prob = _hand_example()
    # entropies: A 0.325 (accurate), B 0.693 (inaccurate), C 0.125 (accurate)
    r = pavpu([gt], [prob], [0.0, 0.2, 0.4, 0.7])
    assert r.n_ac.tolist() == [0, 1, 2, 2]  # t=0: all uncertain; 0.2: C certain; 0.4: A, C
    assert r.n_au.tolist() == [2, 1, 0, 0]
    assert r.n_ic.tolist() == [0, 0, 0, 1]  # B turns certain only at 0.7 > 0.693
    assert r.n_iu.tolist() == [1, 1, 1, 0]
    np.testing.assert_allclose(r.pavpu, [1 / 3, 2 / 3, 1.0, 2 / 3])
    np.testing.assert_allclose(r.p_accurate_given_certain[1:], [1.0, 1.0, 2 / 3])
    assert np.isnan(r.p_accurate_given_certain[0])  # nothing certain at t = 0
    np.testing.assert_allclose(r.p_uncertain_given_inaccurate, [1.0, 1.0, 1.0, 0.0])


def test_unmatched_prediction_is_inaccurate_and_missing_gt_is_ignored():
    gt = np.zeros((1, 8, 8), bool)
    gt[0, 4:, 4:] = True  # a worm nobody predicted: contributes no patch
    prob = np.zeros((1, 8, 8))
    prob[0, :4, :4] = 1.0  # a confident false positive, no overlap with the worm
    r = pavpu([gt], [prob], [0.1])
    assert (r.n_ac[0], r.n_au[0], r.n_ic[0], r.n_iu[0]) == (0, 0, 1, 0)


def test_hungarian_partners_one_to_one_and_order():
    a = np.zeros((3, 6, 6), bool)
    a[0, 0, :] = True
    a[1, :, 0] = True  # overlaps a[0] in one pixel
    a[2, 5, 5] = True
    pred = a[[1, 0]]
    assert hungarian_partners(pred, a).tolist() == [1, 0]
    assert hungarian_partners(a[2:], a[:2]).tolist() == [-1]  # disjoint: no partner
    assert hungarian_partners(a[:0], a).tolist() == []


def _naive_patch_rows(gt, prob, patch=4, binarize_at=0.75):
    """Full-image reference: pad to whole patches, average over pixels inside the image."""
    binary = prob >= binarize_at
    partner = hungarian_partners(binary, gt)
    h, w = gt.shape[1:]
    hp, wp = -(-h // patch) * patch, -(-w // patch) * patch
    rows = []
    for k in range(len(prob)):
        g = gt[partner[k]] if partner[k] >= 0 else np.zeros((h, w), bool)
        for y in range(0, hp, patch):
            for x in range(0, wp, patch):
                b_, g_, p_ = (
                    binary[k, y : y + patch, x : x + patch],
                    g[y : y + patch, x : x + patch],
                    prob[k, y : y + patch, x : x + patch],
                )
                if (b_ | g_).any():
                    rows.append(
                        (k, y, x, float((b_ == g_).mean()), float(np.mean([_h(v) for v in p_.ravel()])))
                    )
    return sorted(rows)


@pytest.mark.parametrize("seed", [0, 1])
def test_patch_table_equals_full_image_reference(seed):
    rng = np.random.default_rng(seed)
    shape = (10, 14)  # not a multiple of 4: partial patches at the border
    gt = np.zeros((3,) + shape, bool)
    for k in range(3):
        y, x = rng.integers(0, 8), rng.integers(0, 12)
        gt[k, y : y + rng.integers(2, 6), x : x + rng.integers(2, 7)] = True
    prob = np.clip(
        gt[[2, 0, 1]] * rng.uniform(0.6, 1.0, shape)
        + rng.uniform(0, 0.3, (3,) + shape) * (rng.random((3,) + shape) < 0.2),
        0,
        1,
    )
    t = patch_table([gt], [prob])
    ours = sorted(
        zip(t.instance.tolist(), t.y.tolist(), t.x.tolist(), t.accuracy.tolist(), t.entropy.tolist())
    )
    ref = _naive_patch_rows(gt, prob)
    assert [r[:3] for r in ours] == [r[:3] for r in ref]
    np.testing.assert_allclose([r[3:] for r in ours], [r[3:] for r in ref], atol=1e-12)


def test_vectorised_thresholds_equal_loop():
    rng = np.random.default_rng(4)
    n = 200
    table = PatchTable(*[np.zeros(n, int)] * 4, rng.random(n), rng.random(n) * 0.7)
    thresholds = np.linspace(0, 0.7, 15)
    r = pavpu_from_patches(table, thresholds)
    for i, t in enumerate(thresholds):
        acc, unc = table.accuracy >= 0.5, table.entropy >= t
        assert r.n_ac[i] == np.sum(acc & ~unc) and r.n_au[i] == np.sum(acc & unc)
        assert r.n_ic[i] == np.sum(~acc & ~unc) and r.n_iu[i] == np.sum(~acc & unc)


def test_input_validation():
    with pytest.raises(ValueError, match="differ in length"):
        pavpu([np.zeros((1, 4, 4), bool)], [], [0.1])
    with pytest.raises(ValueError, match=r"image 0"):
        pavpu([np.zeros((1, 4, 4), bool)], [np.zeros((1, 4, 5))], [0.1])


def test_pavpu_references_by_hand_and_against_random_flags():
    # 4 accurate patches (entropies 0.1-0.4), 2 inaccurate (0.5, 0.6); at t = 0.35, 3 patches are uncertain
    table = PatchTable(
        *[np.zeros(6, int)] * 4, np.array([1, 1, 1, 1, 0, 0.0]), np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    )
    curves = pavpu_from_patches(table, [0.35])
    refs = pavpu_references(curves)
    assert refs.all_certain.tolist() == [4 / 6]
    assert refs.random_p_uncertain_given_inaccurate.tolist() == [0.5]
    assert np.isclose(refs.random_pavpu[0], 4 / 6 * 0.5 + 2 / 6 * 0.5)
    assert curves.pavpu[0] == pytest.approx(5 / 6)  # this uncertainty beats random: informative
    # the random reference is the mean over random choices of 3 uncertain patches out of 6
    rng = np.random.default_rng(0)
    accurate = table.accuracy >= 0.5
    hits = [np.mean(accurate != np.isin(np.arange(6), rng.choice(6, 3, replace=False))) for _ in range(20000)]
    assert np.mean(hits) == pytest.approx(refs.random_pavpu[0], abs=0.01)


def test_pavpu_references_are_nan_without_patches():
    refs = pavpu_references(
        pavpu_from_patches(PatchTable(*[np.zeros(0, int)] * 4, np.zeros(0), np.zeros(0)), [0.1])
    )
    assert np.isnan(refs.all_certain).all() and np.isnan(refs.random_pavpu).all()
