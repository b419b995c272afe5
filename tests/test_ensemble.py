"""Tests of companion.inference.ensemble: pooling draws of several models, ranking images for annotation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from companion.data.simulate import ideal_logits, simulate_embedding
from companion.inference.agglomerate import agglomerate
from companion.inference.ensemble import (
    annotation_order,
    ensemble_outputs,
    errors_caught,
    member_seed,
    pool_draws,
)
from companion.inference.outputs import ImageOutputs, compact_pass, image_outputs
from companion.inference.recipes import Recipe
from companion.inference.segmenter import Segmenter, segment_compact
from companion.model.unet import UNet


def _outputs(instances_per_draw, seed=0):
    """ImageOutputs whose draws are idealised network outputs of the given instance stacks."""
    passes = []
    for i, inst in enumerate(instances_per_draw):
        emb = simulate_embedding(inst, dim=4, seed=seed * 100 + i)
        passes.append(compact_pass(emb, ideal_logits(inst)))
    return ImageOutputs(passes[0], tuple(passes))


def _worms(shape=(32, 32)):
    a = np.zeros((2,) + shape, bool)
    a[0, 4:10, 2:28] = True
    a[1, 18:26, 4:30] = True
    return a


def test_pool_draws_takes_the_first_draws_of_each_member_in_order():
    inst = _worms()
    a, b = _outputs([inst] * 5, seed=1), _outputs([inst[:1]] * 3, seed=2)
    pooled = pool_draws([a, b], [4, 2])
    assert len(pooled.draws) == 6
    assert pooled.deterministic is a.deterministic
    assert all(p is q for p, q in zip(pooled.draws, a.draws[:4] + b.draws[:2]))


@pytest.mark.parametrize(
    "counts, message", [([6, 1], "holds 5 draws"), ([1], "2 members but 1"), ([0, 0], "no draw")]
)
def test_pool_draws_rejects_impossible_requests(counts, message):
    inst = _worms()
    with pytest.raises(ValueError, match=message):
        pool_draws([_outputs([inst] * 5), _outputs([inst] * 5)], counts)


def test_pool_draws_rejects_images_of_different_sizes():
    with pytest.raises(ValueError, match="image shape"):
        pool_draws([_outputs([_worms((32, 32))]), _outputs([_worms((32, 40))])], 1)


def test_pooled_ensemble_agglomerates_like_the_draws_it_holds():
    inst = _worms()
    # member 0 sees both worms, member 1 misses the second: it gets probability 1/2 in the pool
    pooled = pool_draws([_outputs([inst] * 2, seed=3), _outputs([inst[:1]] * 2, seed=4)], 2)
    recipe = Recipe(bandwidth=1.0, threshold=1.0, min_size=5, mc_draws=len(pooled.draws))
    masks, scores, _, _, agg, _ = Segmenter(
        UNet(base_filters=2, depth=2, dropout="concrete"), recipe
    ).segment(pooled)
    direct = agglomerate([segment_compact(d, 1.0, 1.0, min_size=5) for d in pooled.draws])
    np.testing.assert_array_equal(agg.probs, direct.probs)
    assert sorted(np.round(agg.probs.max(axis=(1, 2)), 3).tolist()) == [0.5, 1.0]
    assert len(masks) == 1 and len(scores) == 1  # only the worm all four draws agree on survives 0.75


def test_member_seed_matches_the_evaluation_for_member_zero_and_differs_otherwise():
    from companion.inference.outputs import _well_seed

    assert member_seed(3, 0, "C03") == _well_seed(3, "C03")
    seeds = {member_seed(3, m, "C03") for m in range(4)} | {member_seed(3, 1, "C04")}
    assert len(seeds) == 5
    with pytest.raises(ValueError):
        member_seed(0, -1)


def test_ensemble_outputs_runs_every_member_with_its_own_seed():
    torch.manual_seed(0)
    models = [
        UNet(base_filters=2, depth=2, embedding_dim=4, dropout="concrete", init_dropout_rate=0.3)
        for _ in range(2)
    ]
    image = np.random.default_rng(0).random((2, 24, 24), dtype=np.float32)
    members = ensemble_outputs(models, image, [3, 2], seed=5, well="X")
    assert [len(m.draws) for m in members] == [3, 2]
    again = image_outputs(models[0], image, draws=3, seed=member_seed(5, 0, "X"))
    for p, q in zip(members[0].draws, again.draws):
        np.testing.assert_array_equal(p.embedding, q.embedding)
    # the same model as member 1 draws other dropout masks than as member 0
    swapped = ensemble_outputs([models[0], models[0]], image, 2, seed=5, well="X")
    assert not np.array_equal(swapped[0].draws[0].embedding, swapped[1].draws[0].embedding)


def test_annotation_order_and_errors_caught():
    ap = np.array([0.9, 0.1, 0.5, 1.0])
    oracle = annotation_order(ap, descending=False)
    assert oracle.tolist() == [1, 2, 0, 3]
    curve = errors_caught(ap, oracle)
    assert curve[0] == 0 and curve[-1] == pytest.approx(1.0) and np.all(np.diff(curve) >= 0)
    np.testing.assert_allclose(curve, [0, 0.9 / 1.5, 1.4 / 1.5, 1.0, 1.0])  # errors 0.9, 0.5, 0.1, 0
    # the oracle's curve lies above every other order's
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert np.all(errors_caught(ap, rng.permutation(4)) <= curve + 1e-12)
    # on average a random order catches k/n of the errors
    mean = np.mean([errors_caught(ap, rng.permutation(4)) for _ in range(4000)], axis=0)
    np.testing.assert_allclose(mean, np.arange(5) / 4, atol=0.02)


def test_errors_caught_edge_cases():
    assert errors_caught([1.0, 1.0], [1, 0]).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="permutation"):
        errors_caught([0.5, 0.5], [0, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        errors_caught([-1.0, 0.5], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        annotation_order([0.1, np.nan])
