"""Tests of companion.evaluation.tuning: cross-validated grid search and foreground scores."""

from __future__ import annotations

import numpy as np
import pytest

from companion.evaluation.metrics import instance_metrics
from companion.evaluation.tuning import foreground_scores, grid_search


def _square(shift=0):
    m = np.zeros((1, 8, 8), bool)
    m[0, 2:6, 2 + shift : 6 + shift] = True
    return m


GTS = {w: _square() for w in ("a1", "a2", "b1", "b2")}
FOLDS = (("a1", "a2"), ("b1", "b2"))


def _stand_in(well, bandwidth, threshold):
    """Fold a is segmented right only with bandwidth 1, fold b only with bandwidth 2;
    the threshold shifts the mask by 0 (t=0.5) or 2 (t=0.7) pixels."""
    right = (bandwidth == 1) == well.startswith("a")
    mask = _square(0 if threshold == 0.5 else 2) if right else _square(2)
    return mask, np.array([0.5])


def test_grid_scores_and_cross_fold_choices():
    result = grid_search(_stand_in, GTS, [1, 2], [0.5, 0.7], folds=FOLDS, progress=False)
    for f, fold in enumerate(FOLDS):
        for i, bw in enumerate([1, 2]):
            for j, t in enumerate([0.5, 0.7]):
                preds, scores = zip(*(_stand_in(w, bw, t) for w in fold))
                assert (
                    result.scores[f, i, j]
                    == instance_metrics([GTS[w] for w in fold], list(preds), list(scores))["avAP"]
                )
    first, second = result.choices
    # chosen on fold b (bandwidth 2), applied to fold a, where it is wrong - and vice versa
    assert (first.tuned_on, first.applied_to, first.bandwidth, first.threshold) == (1, 0, 2.0, 0.5)
    assert (second.tuned_on, second.applied_to, second.bandwidth, second.threshold) == (0, 1, 1.0, 0.5)
    assert first.tuning_score == pytest.approx(1.0)
    wrong = instance_metrics([GTS[w] for w in FOLDS[0]], [_square(2)] * 2, [np.array([0.5])] * 2)
    assert first.test_metrics["avAP"] == wrong["avAP"]
    pooled = instance_metrics(list(GTS.values()), [_square(2)] * 4, [np.array([0.5])] * 4)
    assert result.pooled["avAP"] == pooled["avAP"]


def test_grid_search_validates_inputs():
    with pytest.raises(ValueError, match="at least 2 folds"):
        grid_search(_stand_in, GTS, [1], [0.5], folds=(("a1",),), progress=False)
    with pytest.raises(ValueError, match="no ground truth"):
        grid_search(_stand_in, GTS, [1], [0.5], folds=(("a1",), ("zz",)), progress=False)


def test_foreground_scores_is_mean_non_background_probability():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 5))
    masks = rng.random((2, 4, 5)) < 0.5
    p = np.exp(logits) / np.exp(logits).sum(axis=0)
    expected = [(1 - p[0])[m].mean() for m in masks]
    np.testing.assert_allclose(foreground_scores(masks, logits), expected)


def test_grid_search_with_the_real_segment_on_an_ideal_embedding():
    from companion.data.simulate import ideal_logits, simulate_embedding
    from companion.data.synthetic import make_sample
    from companion.inference.postprocess import segment

    samples = [make_sample(seed, shape=(96, 96), n_worms=2) for seed in range(2)]
    cache = {
        s.well: {
            "embedding": simulate_embedding(s.instances, dim=4, seed=i),
            "logits": ideal_logits(s.instances),
        }
        for i, s in enumerate(samples)
    }

    def predict(well, bandwidth, threshold):
        embedding, logits = cache[well]["embedding"], cache[well]["logits"]
        masks = segment(embedding, logits, bandwidth, threshold)
        return masks, foreground_scores(masks, logits)

    gts = {s.well: s.instances for s in samples}
    folds = ((samples[0].well,), (samples[1].well,))
    result = grid_search(predict, gts, [1.0], [1.5], folds=folds, progress=False)
    assert result.scores.shape == (2, 1, 1)
    # an ideal embedding (well separated centres) is segmented perfectly
    assert result.pooled["avAP"] == pytest.approx(1.0)
    assert [c.bandwidth for c in result.choices] == [1.0, 1.0]


def test_grid_search_segments_each_well_once_per_grid_point():
    calls = []

    def counting(well, bandwidth, threshold):
        calls.append((well, bandwidth, threshold))
        return _stand_in(well, bandwidth, threshold)

    result = grid_search(counting, GTS, [1, 2], [0.5, 0.7], folds=FOLDS, progress=False)
    assert len(calls) == len(set(calls)) == 4 * len(GTS)  # the chosen points are not segmented again
    reference = grid_search(_stand_in, GTS, [1, 2], [0.5, 0.7], folds=FOLDS, progress=False)
    assert result.pooled["avAP"] == reference.pooled["avAP"]
    assert [c[:5] for c in result.choices] == [c[:5] for c in reference.choices]
    # the kept predictions are those of each fold's chosen point
    for choice in result.choices:
        for well in FOLDS[choice.applied_to]:
            masks, scores = result.predictions[well]
            expected_masks, expected_scores = _stand_in(well, choice.bandwidth, choice.threshold)
            np.testing.assert_array_equal(masks, expected_masks)
            np.testing.assert_array_equal(scores, expected_scores)
    assert list(result.predictions) == [w for fold in FOLDS for w in fold]
