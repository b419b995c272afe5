"""Tests of companion.tuning: cross-validated grid search, output cache, segmenter."""
from __future__ import annotations

import numpy as np
import pytest

from companion.agglomerate import agglomerate, binarize
from companion.metrics import evaluate
from companion.tuning import cached_outputs, foreground_scores, grid_search, segmenter


def _square(shift=0):
    m = np.zeros((1, 8, 8), bool)
    m[0, 2:6, 2 + shift:6 + shift] = True
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
                assert result.scores[f, i, j] == evaluate([GTS[w] for w in fold], list(preds), list(scores))["avAP"]
    first, second = result.choices
    # chosen on fold b (bandwidth 2), applied to fold a, where it is wrong - and vice versa
    assert (first.tuned_on, first.applied_to, first.bandwidth, first.threshold) == (1, 0, 2.0, 0.5)
    assert (second.tuned_on, second.applied_to, second.bandwidth, second.threshold) == (0, 1, 1.0, 0.5)
    assert first.tuning_score == pytest.approx(1.0)
    wrong = evaluate([GTS[w] for w in FOLDS[0]], [_square(2)] * 2, [np.array([0.5])] * 2)
    assert first.test_metrics["avAP"] == wrong["avAP"]
    pooled = evaluate(list(GTS.values()), [_square(2)] * 4, [np.array([0.5])] * 4)
    assert result.pooled["avAP"] == pooled["avAP"]


def test_grid_search_validates_inputs():
    with pytest.raises(ValueError, match="at least 2 folds"):
        grid_search(_stand_in, GTS, [1], [0.5], folds=(("a1",),), progress=False)
    with pytest.raises(ValueError, match="no ground truth"):
        grid_search(_stand_in, GTS, [1], [0.5], folds=(("a1",), ("zz",)), progress=False)


def test_cached_outputs_compute_each_well_once(tmp_path):
    calls = []

    def compute(well):
        calls.append(well)
        return {"embedding": np.full((2, 3, 3), len(calls), np.float32), "logits": np.zeros((3, 3, 3))}

    path = tmp_path / "sub" / "outputs.npz"
    first = cached_outputs(path, ["A01", "A02"], compute, progress=False)
    again = cached_outputs(path, ["A01", "A02"], compute, progress=False)
    more = cached_outputs(path, ["A02", "A03"], compute, progress=False)
    assert calls == ["A01", "A02", "A03"]
    np.testing.assert_array_equal(again["A02"]["embedding"], first["A02"]["embedding"])
    assert set(more) == {"A02", "A03"} and more["A03"]["embedding"][0, 0, 0] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["outputs.npz"]  # no temp file left
    with pytest.raises(ValueError, match="__"):
        cached_outputs(path, ["A__1"], compute, progress=False)


def test_foreground_scores_is_mean_non_background_probability():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 5))
    masks = rng.random((2, 4, 5)) < 0.5
    p = np.exp(logits) / np.exp(logits).sum(axis=0)
    expected = [(1 - p[0])[m].mean() for m in masks]
    np.testing.assert_allclose(foreground_scores(masks, logits), expected)


def test_segmenter_deterministic_and_monte_carlo_paths():
    logits = np.zeros((3, 8, 8))
    logits[1, 2:6, 2:6] = 5.0

    def fake_segment(embedding, class_logits, bandwidth, threshold):
        # the "instance" is where the first embedding channel exceeds the threshold
        return (embedding[0] > threshold)[None]

    emb = np.zeros((2, 8, 8))
    emb[0, 2:6, 2:6] = 1.0
    predict = segmenter({"w": {"embedding": emb, "logits": logits}}, fake_segment)
    masks, scores = predict("w", 1.0, 0.5)
    np.testing.assert_array_equal(masks, _square())
    np.testing.assert_allclose(scores, foreground_scores(masks, logits))
    # Monte-Carlo: 4 draws, the last one shifted; agglomerated and binarised at 0.75
    draws = np.stack([emb, emb, emb, np.roll(emb, 1, axis=2)])
    predict_mc = segmenter({"w": {"embedding": draws, "logits": np.stack([logits] * 4)}}, fake_segment)
    masks_mc, scores_mc = predict_mc("w", 1.0, 0.5)
    agg = agglomerate([fake_segment(d, None, 1.0, 0.5) for d in draws])
    np.testing.assert_array_equal(masks_mc, binarize(agg.probs, 0.75))
    np.testing.assert_allclose(scores_mc, agg.scores)
    with pytest.raises(ValueError, match="embedding must be"):
        segmenter({"w": {"embedding": emb[0], "logits": logits}}, fake_segment)("w", 1.0, 0.5)


def test_grid_search_with_the_real_segment_on_an_ideal_embedding():
    from companion.simulate import ideal_logits, simulate_embedding
    from companion.synthetic import make_sample

    samples = [make_sample(seed, shape=(96, 96), n_worms=2) for seed in range(2)]
    cache = {s.well: {"embedding": simulate_embedding(s.instances, dim=4, seed=i),
                      "logits": ideal_logits(s.instances)} for i, s in enumerate(samples)}
    gts = {s.well: s.instances for s in samples}
    folds = ((samples[0].well,), (samples[1].well,))
    result = grid_search(cache, gts, [1.0], [1.5], folds=folds, progress=False)
    assert result.scores.shape == (2, 1, 1)
    # an ideal embedding (well separated centres) is segmented perfectly
    assert result.pooled["avAP"] == pytest.approx(1.0)
    assert [c.bandwidth for c in result.choices] == [1.0, 1.0]
