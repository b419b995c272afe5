"""Tests of companion.inference.agglomerate: matching Monte-Carlo instance draws into probability maps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage, stats
from skimage.draw import ellipse

from companion.data.simulate import perturb_instances
from companion.inference.agglomerate import (
    Agglomeration,
    agglomerate,
    bernoulli_entropy,
    binarize,
    binarize_with_scores,
    binarized_indices,
    instance_scores,
    match_draw_to_base,
    soft_iou_matrix,
)

SHAPE = (48, 64)


def random_worms(rng: np.random.Generator, n: int, shape=SHAPE) -> np.ndarray:
    """``n`` random elongated ellipses (they may overlap), bool (n, H, W)."""
    masks = np.zeros((n, *shape), bool)
    for k in range(n):
        r, c = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8)
        rr, cc = ellipse(
            r, c, rng.uniform(2, 4), rng.uniform(8, 14), shape=shape, rotation=rng.uniform(0, np.pi)
        )
        masks[k, rr, cc] = True
    return masks


def random_draws(seed: int, n_draws: int = 4, n_worms: int = 4, p_split: float = 0.2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = random_worms(rng, n_worms)
    return [
        perturb_instances(gt, rng, max_radius=1, p_split=p_split, p_merge=0.2, p_drop=0.15)
        for _ in range(n_draws)
    ]


def same_instances_any_order(a: np.ndarray, b: np.ndarray) -> bool:
    """True if the stacks hold the same maps, possibly in another order."""
    if a.shape != b.shape:
        return False
    unused = list(range(len(b)))
    for mask in a:
        hit = next((j for j in unused if np.array_equal(mask, b[j])), None)
        if hit is None:
            return False
        unused.remove(hit)
    return True


# --- reference implementation: plain loops, brute-force assignment -------------------------


def naive_soft_iou(p: np.ndarray, m: np.ndarray) -> float:
    union = np.maximum(p, m).sum()
    return float(np.minimum(p, m).sum() / union) if union > 0 else 0.0


def naive_best_assignment(iou: np.ndarray) -> list[tuple[int, int]]:
    """The one-to-one pairing of maximal summed IoU, by trying every injection."""
    k, n = iou.shape
    best, best_pairs = -1.0, []
    if k >= n:
        for rows in itertools.permutations(range(k), n):
            total = sum(iou[r, c] for c, r in enumerate(rows))
            if total > best:
                best, best_pairs = total, [(r, c) for c, r in enumerate(rows)]
    else:
        for cols in itertools.permutations(range(n), k):
            total = sum(iou[r, c] for r, c in enumerate(cols))
            if total > best:
                best, best_pairs = total, list(enumerate(cols))
    return best_pairs


def naive_agglomerate(draws, min_iou):
    draws = [d[d.any(axis=(1, 2))] for d in draws]
    base = max(range(len(draws)), key=lambda i: (len(draws[i]), -i))
    counts = [m.astype(float) for m in draws[base]]
    hits = [1] * len(counts)
    for i, draw in enumerate(draws):
        if i == base or len(draw) == 0:
            continue
        matched = set()
        if counts:
            iou = np.array([[naive_soft_iou(c / h, m) for m in draw] for c, h in zip(counts, hits)])
            for r, c in naive_best_assignment(iou):
                if iou[r, c] >= min_iou:
                    counts[r] = counts[r] + draw[c]
                    hits[r] += 1
                    matched.add(c)
        for c in range(len(draw)):
            if c not in matched:
                counts.append(draw[c].astype(float))
                hits.append(1)
    return np.array(counts) / len(draws)


# --- soft IoU -------------------------------------------------------------------------------


def test_soft_iou_matches_loops_for_soft_and_binary_masks(rng):
    for _ in range(5):
        soft = rng.random((3, 10, 12)) * (rng.random((3, 10, 12)) < 0.5)
        binary = rng.random((4, 10, 12)) < 0.4
        got = soft_iou_matrix(soft, binary)
        want = np.array([[naive_soft_iou(p, m) for m in binary] for p in soft])
        np.testing.assert_allclose(got, want, rtol=1e-5)
        got_binary = soft_iou_matrix(binary[:2], binary)
        want_binary = np.array([[(a & b).sum() / (a | b).sum() for b in binary] for a in binary[:2]])
        np.testing.assert_allclose(got_binary, want_binary, rtol=1e-6)


def test_soft_iou_agrees_with_metrics_iou_matrix(rng):
    metrics = pytest.importorskip("companion.evaluation.metrics")
    a, b = random_worms(rng, 5), random_worms(rng, 3)
    np.testing.assert_allclose(soft_iou_matrix(a, b), metrics.iou_matrix(a, b), rtol=1e-6)


def test_soft_iou_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4, 4\)"):
        soft_iou_matrix(np.zeros((2, 4, 4)), np.zeros((1, 4, 5), bool))


# --- one matching step ---------------------------------------------------------------------


def test_match_draw_to_base_is_the_best_assignment_above_min_iou():
    for seed in range(10):
        rng = np.random.default_rng(seed)
        base = random_worms(rng, int(rng.integers(1, 5))).astype(np.float32) * rng.uniform(0.3, 1.0)
        new = random_worms(rng, int(rng.integers(1, 5)))
        matching = match_draw_to_base(base, new, min_iou=0.1)
        iou = np.array([[naive_soft_iou(b, m) for m in new] for b in base])
        np.testing.assert_allclose(matching.iou, iou, rtol=1e-5)
        expected = sorted((r, c) for r, c in naive_best_assignment(iou) if iou[r, c] >= 0.1)
        assert sorted(map(tuple, matching.pairs.tolist())) == expected
        assert sorted(matching.unmatched.tolist()) == sorted(set(range(len(new))) - {c for _, c in expected})


def test_match_draw_to_base_with_nothing_to_match():
    masks = random_worms(np.random.default_rng(0), 3)
    none_yet = match_draw_to_base(np.zeros((0, *SHAPE)), masks)
    assert none_yet.pairs.shape == (0, 2) and none_yet.unmatched.tolist() == [0, 1, 2]
    empty_draw = match_draw_to_base(masks, np.zeros((0, *SHAPE), bool))
    assert empty_draw.pairs.shape == (0, 2) and empty_draw.unmatched.size == 0


# --- agglomerate: properties ----------------------------------------------------------------


def test_agglomerate_matches_bruteforce_reference():
    for seed in range(12):
        draws = random_draws(seed, n_draws=4, n_worms=3)
        got = agglomerate(draws, min_iou=0.3)
        want = naive_agglomerate(draws, min_iou=0.3)
        assert got.probs.shape == want.shape
        np.testing.assert_allclose(got.probs, want, atol=1e-6)


def test_identical_draws_give_certain_copies_of_the_instances(rng):
    for _ in range(5):
        masks = random_worms(rng, int(rng.integers(1, 6)))
        result = agglomerate([masks] * 5)
        assert set(np.unique(result.probs)) <= {0.0, 1.0}
        assert same_instances_any_order(result.probs.astype(bool), masks)
        np.testing.assert_array_equal(result.scores, np.ones(len(masks)))


def test_permuting_instances_inside_a_draw_only_reorders_the_output():
    # No false splits here: the two equal halves of a split worm can tie exactly in IoU, and
    # exact ties are broken by instance order (documented in agglomerate).
    for seed in range(8):
        draws = random_draws(seed, p_split=0.0)
        reference = agglomerate(draws)
        rng = np.random.default_rng(100 + seed)
        shuffled = [d[rng.permutation(len(d))] for d in draws]
        result = agglomerate(shuffled)
        assert same_instances_any_order(result.probs, reference.probs)
        assert sorted(result.scores.tolist()) == pytest.approx(sorted(reference.scores.tolist()))


def test_probabilities_are_valid_and_cover_every_foreground_pixel():
    for seed in range(8):
        draws = random_draws(seed, n_draws=5)
        result = agglomerate(draws)
        assert result.probs.dtype == np.float32
        assert result.probs.min() >= 0.0 and result.probs.max() <= 1.0
        foreground = np.any([d.any(0) for d in draws], axis=0)
        np.testing.assert_array_equal((result.probs > 0).any(0), foreground)
        # mass conservation: every mask pixel of every draw is counted exactly once
        total_pixels = sum(int(d.sum()) for d in draws)
        assert result.probs.sum(dtype=np.float64) * len(draws) == pytest.approx(total_pixels, rel=1e-6)


def test_scores_are_the_mean_probability_over_the_support():
    result = agglomerate(random_draws(3, n_draws=5))
    for prob, score in zip(result.probs, result.scores):
        assert score == pytest.approx(prob[prob > 0].mean(), rel=1e-6)
    assert (result.scores > 0).all() and (result.scores <= 1).all()


def test_base_is_the_draw_with_most_instances(rng):
    masks = random_worms(rng, 4)
    masks = masks[[not (m & masks[:i]).any() for i, m in enumerate(masks)]]  # keep disjoint ones
    result = agglomerate([masks[:1], masks, masks[:1]])
    np.testing.assert_array_equal(result.probs.astype(bool), masks)
    expected_first = np.where(masks[0], 1.0, 0.0)
    np.testing.assert_array_equal(result.probs[0], expected_first)
    for k in range(1, len(masks)):
        np.testing.assert_allclose(result.probs[k][masks[k]], 1 / 3)


def test_disjoint_worms_are_never_merged():
    a = np.zeros((1, *SHAPE), bool)
    a[0, 10:14, 5:30] = True
    b = np.zeros((1, *SHAPE), bool)
    b[0, 30:34, 5:30] = True
    result = agglomerate([a, b, a, b], min_iou=1e-9)
    assert len(result.probs) == 2
    np.testing.assert_allclose(result.probs.max(axis=(1, 2)), [0.5, 0.5])


def test_empty_draws_are_handled():
    masks = random_worms(np.random.default_rng(1), 2)
    empty = np.zeros((0, *SHAPE), bool)
    result = agglomerate([masks, empty])
    assert same_instances_any_order(result.probs, masks * np.float32(0.5))
    blank_instance = np.zeros((1, *SHAPE), bool)
    nothing = agglomerate([empty, blank_instance, empty])
    assert nothing.probs.shape == (0, *SHAPE) and nothing.scores.shape == (0,)


def test_invalid_draws_are_rejected():
    with pytest.raises(ValueError, match="at least one draw"):
        agglomerate([])
    with pytest.raises(ValueError, match=r"draw 1 .*\(40, 64\).*\(48, 64\)"):
        agglomerate([np.zeros((1, *SHAPE), bool), np.zeros((2, 40, 64), bool)])
    with pytest.raises(ValueError, match=r"draw 0 .*\(48, 64\)"):
        agglomerate([np.zeros(SHAPE, bool)])
    with pytest.raises(ValueError, match="min_iou"):
        agglomerate([np.zeros((1, *SHAPE), bool)], min_iou=0.0)


# --- binarize, entropy --------------------------------------------------------------------


def test_binarize_thresholds_and_drops_empty_instances(rng):
    probs = rng.random((6, 9, 11)).astype(np.float32)
    probs[2] *= 0.5  # no pixel reaches 0.75
    binary = binarize(probs, 0.75)
    keep = [k for k in range(6) if (probs[k] >= 0.75).any()]
    assert 2 not in keep
    np.testing.assert_array_equal(binarized_indices(probs, 0.75), keep)
    np.testing.assert_array_equal(binary, np.array([probs[k] >= 0.75 for k in keep]))
    assert binarize(np.zeros((0, 3, 3)), 0.75).shape == (0, 3, 3)
    with pytest.raises(ValueError, match="threshold"):
        binarize(probs, 1.5)
    scores = np.arange(6, dtype=float)
    masks, kept_scores = binarize_with_scores(Agglomeration(probs, scores), 0.75)
    np.testing.assert_array_equal(masks, binary)
    np.testing.assert_array_equal(kept_scores, scores[keep])


def test_instance_scores_of_hand_made_maps():
    probs = np.zeros((2, 2, 2), np.float32)
    probs[0] = [[1.0, 0.5], [0.0, 0.0]]
    assert instance_scores(probs).tolist() == [0.75, 0.0]


def test_bernoulli_entropy_matches_scipy(rng):
    p = np.concatenate([[0.0, 1.0, 0.5], rng.random(50)])
    np.testing.assert_allclose(bernoulli_entropy(p), stats.bernoulli(p).entropy(), atol=1e-12)


# --- perturb_instances (teaching device) ----------------------------------------------------


def test_perturb_without_perturbations_is_the_identity(rng):
    masks = random_worms(rng, 5)
    same = perturb_instances(masks, rng, max_radius=0, p_split=0, p_merge=0, p_drop=0)
    np.testing.assert_array_equal(same, masks)


def test_perturb_is_seeded_and_changes_shapes():
    masks = random_worms(np.random.default_rng(2), 5)
    a = perturb_instances(masks, np.random.default_rng(7))
    b = perturb_instances(masks, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    draws = [perturb_instances(masks, np.random.default_rng(s), max_radius=2) for s in range(5)]
    assert any(d.shape != masks.shape or not np.array_equal(d, masks) for d in draws)
    assert all(d.dtype == bool and d.shape[1:] == masks.shape[1:] for d in draws)


def test_perturb_drop_split_and_merge(rng):
    masks = random_worms(rng, 4)
    assert perturb_instances(masks, rng, p_drop=1.0).shape == (0, *SHAPE)
    split = perturb_instances(masks, rng, max_radius=0, p_split=1.0, p_merge=0, p_drop=0)
    assert len(split) == 2 * len(masks)
    for k in range(len(masks)):  # halves are disjoint and reassemble the worm
        halves = split[2 * k : 2 * k + 2]
        assert not (halves[0] & halves[1]).any()
        np.testing.assert_array_equal(halves[0] | halves[1], masks[k])
    touching = np.zeros((2, *SHAPE), bool)
    touching[0, 10:20, 10:20] = True
    touching[1, 10:20, 20:30] = True
    merged = perturb_instances(touching, rng, max_radius=0, p_split=0, p_merge=1.0, p_drop=0)
    np.testing.assert_array_equal(merged, touching.any(0, keepdims=True))
    apart = touching.copy()
    apart[1] = np.roll(apart[1], 10, axis=1)  # a 10-pixel gap: nothing to merge with
    np.testing.assert_array_equal(
        perturb_instances(apart, rng, max_radius=0, p_split=0, p_merge=1.0, p_drop=0), apart
    )


def test_perturb_dilation_and_erosion_stay_near_the_original(rng):
    masks = random_worms(rng, 3)
    for seed in range(4):
        draw = perturb_instances(
            masks, np.random.default_rng(seed), max_radius=2, p_split=0, p_merge=0, p_drop=0
        )
        for original, changed in zip(masks, draw):
            grown = ndimage.binary_dilation(original, iterations=2)
            shrunk = ndimage.binary_erosion(original, iterations=2)
            assert (shrunk <= changed).all() and (changed <= grown).all()
            assert (changed <= original).all() or (original <= changed).all()
    with pytest.raises(ValueError, match="p_drop"):
        perturb_instances(masks, rng, p_drop=2.0)
    with pytest.raises(ValueError, match=r"\(48, 64\)"):
        perturb_instances(masks[0], rng)
