"""Tests of companion.inference.postprocess: mean-shift against scikit-learn, segment on idealised outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import MeanShift, get_bin_seeds
from sklearn.metrics import adjusted_rand_score

from companion.data import synthetic
from companion.data.simulate import ideal_logits, simulate_embedding
from companion.data.targets import OVERLAP, three_class_target
from companion.inference import postprocess as pp


def embedding_blobs(
    seed: int,
    n: int = 3000,
    dim: int = 16,
    n_blobs: int = 8,
    spread: float = 0.25,
    outlier_fraction: float = 0.02,
) -> np.ndarray:
    """Points like a trained discriminative embedding: tight blobs >= 4 (mostly 4-6) apart, a few outliers."""
    rng = np.random.default_rng(seed)
    centers = np.empty((0, dim))
    while len(centers) < n_blobs:
        candidate = rng.normal(0.0, 5.0 / np.sqrt(2 * dim), size=dim)
        if len(centers) == 0 or np.linalg.norm(centers - candidate, axis=1).min() >= min(4.0, 2.0 * dim):
            centers = np.vstack([centers, candidate])
    points = centers[rng.integers(0, n_blobs, n)] + rng.normal(0.0, spread, size=(n, dim))
    n_out = int(outlier_fraction * n)
    points[:n_out] = rng.uniform(points.min(), points.max(), size=(n_out, dim))
    return points.astype(np.float32)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.int64), b.reshape(len(b), -1).astype(np.int64)
    inter = a @ b.T
    return inter / np.maximum(a.sum(1)[:, None] + b.sum(1)[None, :] - inter, 1)


# ------------------------------------------------------------------------------------ mean-shift
@pytest.mark.parametrize("seed,bandwidth", [(0, 1.5), (1, 2.0), (2, 2.5), (3, 3.0)])
def test_mean_shift_matches_sklearn(seed, bandwidth):
    points = embedding_blobs(seed)
    ours = pp.mean_shift(points, bandwidth, device="cpu")
    ref = MeanShift(bandwidth=bandwidth, bin_seeding=True).fit(points)
    assert adjusted_rand_score(ref.labels_, ours.labels) >= 0.99
    assert ours.centers.shape == ref.cluster_centers_.shape
    np.testing.assert_allclose(ours.centers, ref.cluster_centers_, atol=1e-3)


def test_mean_shift_without_bin_seeding_matches_sklearn():
    points = embedding_blobs(5, n=400, dim=4, n_blobs=4)
    ours = pp.mean_shift(points, 1.5, bin_seeding=False, device="cpu")
    ref = MeanShift(bandwidth=1.5, bin_seeding=False).fit(points)
    assert adjusted_rand_score(ref.labels_, ours.labels) >= 0.99
    np.testing.assert_allclose(ours.centers, ref.cluster_centers_, atol=1e-3)


def test_bin_seeds_match_sklearn_in_order():
    points = embedding_blobs(7, n=2000).astype(np.float64)
    for min_bin_freq in (1, 3):
        np.testing.assert_allclose(
            pp.bin_seeds(points, 2.0, min_bin_freq), get_bin_seeds(points, 2.0, min_bin_freq)
        )


def test_mean_bin_seeds_are_cell_means_near_their_points():
    points = embedding_blobs(8, n=1500).astype(np.float64)
    seeds = pp.bin_seeds(points, 2.0, at="mean")
    cells = np.round(points / 2.0)
    _, first, inverse = np.unique(cells, axis=0, return_index=True, return_inverse=True)
    naive = np.array([points[inverse.ravel() == g].mean(0) for g in np.argsort(first)])
    np.testing.assert_allclose(seeds, naive, atol=1e-9)
    nearest = np.sqrt(((seeds[:, None] - points[None]) ** 2).sum(-1)).min(1)
    assert (nearest <= 2.0).all()


def test_mean_shift_chunking_and_torch_input_do_not_change_the_result():
    points = embedding_blobs(4, n=2000)
    big = pp.mean_shift(points, 2.0, chunk_size=4096, device="cpu")
    small = pp.mean_shift(torch.from_numpy(points), 2.0, chunk_size=7)
    np.testing.assert_allclose(big.centers, small.centers, atol=1e-5)
    np.testing.assert_array_equal(big.labels, small.labels)


def test_mean_shift_is_deterministic_and_labels_nearest_centre():
    points = embedding_blobs(9, n=1500)
    first, second = pp.mean_shift(points, 2.0), pp.mean_shift(points, 2.0)
    np.testing.assert_array_equal(first.centers, second.centers)
    np.testing.assert_array_equal(first.labels, second.labels)
    distances = ((points[:, None, :].astype(np.float64) - first.centers[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(first.labels, distances.argmin(1))


def test_mean_shift_finds_separated_blobs_sorted_by_size():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.2, (300, 3)), rng.normal(6, 0.2, (100, 3))])
    result = pp.mean_shift(points, 1.5)
    np.testing.assert_allclose(result.centers, [points[:300].mean(0), points[300:].mean(0)], atol=0.05)
    np.testing.assert_array_equal(np.bincount(result.labels), [300, 100])


@pytest.mark.parametrize(
    "points,bandwidth,message",
    [
        (np.array([[0.0, np.nan]]), 1.0, "NaN"),
        (np.zeros(5), 1.0, "shape"),
        (np.zeros((0, 3)), 1.0, "shape"),
        (np.zeros((4, 2)), 0.0, "bandwidth"),
    ],
)
def test_mean_shift_rejects_bad_input(points, bandwidth, message):
    with pytest.raises(ValueError, match=message):
        pp.mean_shift(points, bandwidth)


def test_mean_shift_without_any_mode_raises_like_sklearn():
    points = np.zeros((5, 2))
    far = np.array([[10.0, 10.0]])
    with pytest.raises(pp.NoModesFoundError):
        pp.mean_shift(points, 1.0, seeds=far)
    with pytest.raises(ValueError):
        MeanShift(bandwidth=1.0, seeds=far).fit(points)


def test_trajectories_follow_the_flat_kernel_mean():
    points = embedding_blobs(3, n=300, dim=2, n_blobs=3)
    seeds = points[:5].astype(np.float64)
    path = pp.mean_shift_trajectories(points, seeds, 1.0, n_steps=3)
    assert path.shape == (4, 5, 2)
    np.testing.assert_allclose(path[0], seeds)
    for s in range(5):
        within = np.linalg.norm(points - seeds[s], axis=1) <= 1.0
        np.testing.assert_allclose(path[1, s], points[within].mean(0), atol=1e-5)


# ------------------------------------------------------------------------------- overlap heuristic
def test_fill_overlap_adds_touching_overlap_and_drops_fragments():
    instance = np.zeros((9, 9), bool)
    instance[1:4, 1:4] = True  # main body
    instance[7, 7] = True  # stray fragment
    overlap = np.zeros((9, 9), bool)
    overlap[4, 1:4] = True  # touches the body
    overlap[0, 7] = True  # elsewhere
    filled = pp.fill_overlap(instance, overlap)
    expected = np.zeros((9, 9), bool)
    expected[1:5, 1:4] = True
    np.testing.assert_array_equal(filled, expected)
    assert not pp.fill_overlap(np.zeros((9, 9), bool), overlap).any()


# --------------------------------------------------------------------------------------- segment
def oracle_heuristic(instances: np.ndarray) -> np.ndarray:
    """What segment should return for a perfect embedding: each instance without the overlap
    pixels (they lie between centres), then the overlap heuristic."""
    overlap = three_class_target(instances) == OVERLAP
    return np.stack([pp.fill_overlap(inst & ~overlap, overlap) for inst in instances])


@pytest.fixture(scope="module")
def synthetic_cases():
    cases = []
    for seed in range(6):
        instances = synthetic.make_sample(seed).instances
        embedding = simulate_embedding(instances, seed=seed)
        cases.append((instances, embedding, ideal_logits(instances)))
    return cases


def test_segment_reproduces_the_heuristic_on_ideal_output(synthetic_cases):
    for instances, embedding, logits in synthetic_cases:
        predicted = pp.segment(embedding, logits, bandwidth=2.0, threshold=1.5)
        expected = oracle_heuristic(instances)
        expected = expected[expected.sum((1, 2)) >= pp.DEFAULT_MIN_SIZE]
        iou = pairwise_iou(expected, predicted)
        rows, cols = linear_sum_assignment(-iou)
        assert len(predicted) == len(expected)
        assert (iou[rows, cols] > 0.95).all(), iou[rows, cols]


def test_segment_recovers_instances_the_heuristic_can_represent(synthetic_cases):
    representable = [
        case
        for case in synthetic_cases
        if (pairwise_iou(case[0], oracle_heuristic(case[0])).diagonal() > 0.99).all()
    ]
    assert len(representable) >= 2
    for instances, embedding, logits in representable:
        predicted = pp.segment(embedding, logits, bandwidth=2.0, threshold=1.5)
        assert pairwise_iou(instances, predicted).max(1).min() > 0.9


def test_segment_subsampling_and_torch_input(synthetic_cases):
    instances, embedding, logits = synthetic_cases[0]
    full = pp.segment(embedding, logits, 2.0, 1.5)
    sub = pp.segment(torch.from_numpy(embedding), torch.from_numpy(logits), 2.0, 1.5, max_points=500, seed=1)
    assert len(sub) == len(full)
    iou = pairwise_iou(full, sub)
    assert iou.max(1).min() > 0.95


def test_segment_is_deterministic(synthetic_cases):
    _, embedding, logits = synthetic_cases[1]
    np.testing.assert_array_equal(
        pp.segment(embedding, logits, 2.0, 1.5, max_points=800),
        pp.segment(embedding, logits, 2.0, 1.5, max_points=800),
    )


def test_segment_without_foreground_is_empty():
    logits = np.zeros((3, 20, 30), np.float32)
    logits[0] = 1.0
    out = pp.segment(np.random.default_rng(0).normal(size=(4, 20, 30)), logits, 2.0, 1.5)
    assert out.shape == (0, 20, 30) and out.dtype == bool


def test_segment_drops_instances_below_min_size():
    instances = np.zeros((2, 40, 40), bool)
    instances[0, 5:15, 5:35] = True  # 300 pixels
    instances[1, 30:33, 5:15] = True  # 30 pixels
    embedding = simulate_embedding(instances, dim=8, seed=0)
    out = pp.segment(embedding, ideal_logits(instances), 2.0, 1.5, min_size=50)
    assert len(out) == 1
    assert pairwise_iou(instances[:1], out)[0, 0] > 0.95
    assert len(pp.segment(embedding, ideal_logits(instances), 2.0, 1.5, min_size=10)) == 2


def test_segment_rejects_nan_and_mismatched_shapes():
    logits = np.zeros((3, 8, 8), np.float32)
    bad = np.zeros((4, 8, 8), np.float32)
    bad[0, 2, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        pp.segment(bad, logits, 2.0, 1.5)
    with pytest.raises(ValueError, match=r"\(3, 8, 9\).*\(4, 8, 8\)"):
        pp.segment(np.zeros((4, 8, 8)), np.zeros((3, 8, 9)), 2.0, 1.5)
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        pp.segment(np.zeros((8, 8)), logits, 2.0, 1.5)


# ------------------------------------------------------------------------------ idealised output
def test_simulated_embedding_places_pixels_at_their_centres():
    instances = np.zeros((3, 30, 30), bool)
    instances[0, 2:10, :] = True
    instances[1, :, 2:10] = True
    instances[2, 20:28, 15:28] = True
    embedding = simulate_embedding(instances, dim=16, spread=0.1, separation=5.0, seed=3)
    assert embedding.shape == (16, 30, 30) and embedding.dtype == np.float32
    only = [inst & ~np.delete(instances, k, 0).any(0) for k, inst in enumerate(instances)]
    centres = np.array([embedding[:, m].mean(1) for m in only])
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(3, 1)]
    assert (gaps >= 5.0 - 0.1).all()
    shared = instances[0] & instances[1]
    np.testing.assert_allclose(embedding[:, shared].mean(1), centres[:2].mean(0), atol=0.05)
    np.testing.assert_array_equal(embedding, simulate_embedding(instances, dim=16, spread=0.1, seed=3))


def test_ideal_logits_argmax_is_the_three_class_target():
    instances = synthetic.make_sample(2, shape=(64, 64)).instances
    np.testing.assert_array_equal(ideal_logits(instances).argmax(0), three_class_target(instances))


def test_claim_pixels_matches_a_naive_distance_check():
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(3, 6, 7))
    mask = rng.random((6, 7)) > 0.3
    centers = rng.normal(size=(4, 3))
    claimed = pp.claim_pixels(embedding, mask, centers, 1.2)
    naive = np.array(
        [
            [
                [mask[y, x] and np.linalg.norm(embedding[:, y, x] - c) <= 1.2 for x in range(7)]
                for y in range(6)
            ]
            for c in centers
        ]
    )
    np.testing.assert_array_equal(claimed, naive)
    assert claimed.any() and not claimed.all()
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        pp.claim_pixels(embedding, mask, centers[:, :2], 1.2)


def test_segment_does_not_warn_when_every_pixel_is_its_own_seed():
    import warnings

    instances = np.zeros((2, 30, 30), bool)
    instances[0, 2:12, 2:28] = True
    instances[1, 16:26, 2:28] = True
    embedding = simulate_embedding(instances, dim=16, seed=0)  # 16-d: bins of 0.05 hold one pixel each
    with pytest.warns(UserWarning, match="Binning data failed"):
        pp.bin_seeds(embedding[:, instances.any(0)].T, 0.05, at="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = pp.segment(embedding, ideal_logits(instances), bandwidth=0.05, threshold=1.5, min_size=1)
    assert masks.ndim == 3


def test_component_clustering_separates_distant_worms_with_one_embedding():
    instances = np.zeros((3, 60, 60), bool)
    instances[0, 5:15, 5:55] = True
    instances[1, 40:50, 5:55] = True
    instances[2, 30:60, 30:34] = True  # crosses worm 1: same component, other embedding
    embedding = simulate_embedding(instances, dim=4, seed=0)
    embedding[:, instances[1] & ~instances[2]] = embedding[:, instances[0]].mean(axis=1, keepdims=True)
    logits = ideal_logits(instances)
    merged = pp.segment(embedding, logits, 2.0, 1.5)
    split = pp.segment(embedding, logits, 2.0, 1.5, clustering="components", single_below=0)
    assert len(merged) == 2  # the paper's global clustering merges worms 0 and 1 (one is lost)
    assert len(split) == 3
    ious = [max((m & t).sum() / (m | t).sum() for m in split) for t in instances]
    assert min(ious) > 0.9


def test_component_clustering_takes_small_components_whole_and_checks_its_name():
    instances = np.zeros((2, 40, 40), bool)
    instances[0, 5:10, 5:30] = True
    instances[1, 20:25, 5:30] = True
    embedding = np.zeros((4, 40, 40))  # useless embedding: every pixel alike
    masks = pp.segment(
        embedding, ideal_logits(instances), 1.0, 1.0, clustering="components", single_below=1000
    )
    assert sorted(m.sum() for m in masks) == [125, 125]
    with pytest.raises(ValueError, match="clustering"):
        pp.segment(embedding, ideal_logits(instances), 1.0, 1.0, clustering="local")


def test_segment_reuses_the_modes_across_thresholds(monkeypatch):
    instances = np.zeros((2, 40, 40), bool)
    instances[0, 5:10, 5:30] = True
    instances[1, 20:25, 5:30] = True
    embedding = simulate_embedding(instances, dim=4, seed=1)
    logits = ideal_logits(instances)
    pp._CENTRES_CACHE.clear()
    fresh = [pp.segment(embedding, logits, 1.5, t, min_size=1) for t in (1.0, 2.0)]
    calls = []
    real = pp.mean_shift
    monkeypatch.setattr(pp, "mean_shift", lambda *a, **k: calls.append(1) or real(*a, **k))
    pp._CENTRES_CACHE.clear()
    cached = [pp.segment(embedding, logits, 1.5, t, min_size=1) for t in (1.0, 2.0)]
    assert len(calls) == 1  # one mean-shift for both thresholds
    assert all(np.array_equal(a, b) for a, b in zip(fresh, cached))
    pp.segment(embedding + 1e-3, logits, 1.5, 1.0, min_size=1)  # other points: clustered anew
    pp.segment(embedding, logits, 2.5, 1.0, min_size=1)  # other bandwidth: clustered anew
    assert len(calls) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(threshold=-1.0), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(bandwidth=0.0), "bandwidth"),
        (dict(max_points=-1), "max_points"),
        (dict(max_points=0), "max_points"),
        (dict(min_size=-5), "min_size"),
    ],
)
def test_segment_rejects_bad_settings_early(kwargs, match):
    instances = np.zeros((1, 20, 20), bool)
    instances[0, 5:10, 5:15] = True
    embedding = simulate_embedding(instances, dim=4, seed=0)
    settings = {"bandwidth": 1.0, "threshold": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        pp.segment(embedding, ideal_logits(instances), **settings)


def test_segment_rejects_nan_logits():
    instances = np.zeros((1, 20, 20), bool)
    instances[0, 5:10, 5:15] = True
    logits = ideal_logits(instances).astype(float)
    logits[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="class_logits contain NaN"):
        pp.segment(simulate_embedding(instances, dim=4, seed=0), logits, 1.0, 1.0)
