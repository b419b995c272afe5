"""Tests of companion.training.losses against loop-based re-computations of eqs. (1)-(3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from looped_objective import looped_batched_loss, looped_concrete_regularizer, looped_weight_decay_penalty

from companion.data.targets import pad_instances
from companion.model.dropout import concrete_regularizer
from companion.model.unet import UNet, weight_decay_penalty
from companion.training.losses import (
    DiscriminativeTerms,
    ObjectiveTerms,
    batched_discriminative_loss,
    class_loss,
    discriminative_loss,
    instance_means,
    training_objective,
)


# ---------------------------------------------------------------------------------------------
# naive references (loops over pixels, Python floats)
# ---------------------------------------------------------------------------------------------
def naive_discriminative(
    embedding: np.ndarray,
    instances: np.ndarray,
    delta_d: float,
    weights: tuple[float, float, float],
    hinge: str,
) -> tuple[float, ...]:
    e_dim, height, width = embedding.shape
    centres = []
    for mask in instances:
        pixels = [embedding[:, y, x] for y in range(height) for x in range(width) if mask[y, x]]
        if pixels:
            centres.append((np.mean(pixels, axis=0), pixels))
    n = len(centres)
    if n == 0:
        return 0.0, 0.0, 0.0, 0.0
    var = 0.0
    for mu, pixels in centres:
        var += sum(float(np.sum((mu - x) ** 2)) for x in pixels) / len(pixels)
    var /= n
    dist = 0.0
    if n > 1:
        for a in range(n):
            for b in range(n):
                if a == b:
                    continue
                d2 = float(np.sum((centres[a][0] - centres[b][0]) ** 2))
                d = d2 if hinge == "squared" else math.sqrt(d2)
                dist += max(0.0, 2 * delta_d - d) ** 2
        dist /= n * (n - 1)
    reg = sum(float(np.sum(mu**2)) for mu, _ in centres) / n
    total = weights[0] * var + weights[1] * dist + weights[2] * reg
    return total, var, dist, reg


def random_overlapping_masks(rng: np.random.Generator, k: int, shape=(7, 9)) -> np.ndarray:
    """Random rectangles, forced to overlap pairwise in at least one pixel."""
    masks = np.zeros((k, *shape), dtype=bool)
    for i in range(k):
        y0, x0 = rng.integers(0, 3, size=2)
        y1, x1 = rng.integers(4, shape[0] + 1), rng.integers(4, shape[1] + 1)
        masks[i, y0:y1, x0:x1] = True
        masks[i, 3, 3] = True  # shared pixel: every worm covers it
    return masks


# ---------------------------------------------------------------------------------------------
# discriminative loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hinge", ["squared", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discriminative_loss_matches_loop_reference(hinge, seed):
    rng = np.random.default_rng(seed)
    masks = random_overlapping_masks(rng, k=4)
    assert (masks.sum(axis=0) >= 2).any()  # the test really has overlaps
    embedding = rng.normal(scale=1.5, size=(3, *masks.shape[1:]))
    weights = tuple(rng.uniform(0.1, 2.0, size=3))
    delta_d = float(rng.uniform(1.0, 5.0))
    terms = discriminative_loss(
        torch.from_numpy(embedding), torch.from_numpy(masks), delta_d=delta_d, weights=weights, hinge=hinge
    )
    expected = naive_discriminative(embedding, masks, delta_d, weights, hinge)
    assert isinstance(terms, DiscriminativeTerms)
    assert expected[2] > 0  # the push term is active for these inputs
    np.testing.assert_allclose([t.item() for t in terms], expected, rtol=1e-10, atol=1e-12)


def test_hinge_forms_differ_in_the_expected_band():
    # centres at distance 3: squared distance 9 > 2*delta_d = 8 (no push) but 3 < 8 (push)
    masks = np.zeros((2, 1, 2), dtype=bool)
    masks[0, 0, 0] = masks[1, 0, 1] = True
    embedding = np.array([[[0.0, 3.0]]])
    sq = discriminative_loss(torch.from_numpy(embedding), torch.from_numpy(masks), hinge="squared")
    eu = discriminative_loss(torch.from_numpy(embedding), torch.from_numpy(masks), hinge="euclidean")
    assert sq.dist.item() == 0.0
    assert eu.dist.item() == pytest.approx(
        naive_discriminative(embedding, masks, 4.0, (1, 1, 0.001), "euclidean")[2]
    )
    assert eu.dist.item() > 0


@pytest.mark.parametrize("hinge", ["squared", "euclidean"])
def test_gradcheck_float64(hinge):
    rng = np.random.default_rng(3)
    masks = torch.from_numpy(random_overlapping_masks(rng, k=3, shape=(5, 6)))
    embedding = torch.from_numpy(rng.normal(size=(2, 5, 6))).requires_grad_(True)

    def total(e):
        return discriminative_loss(e, masks, delta_d=2.0, weights=(1.0, 1.0, 0.1), hinge=hinge).total

    assert discriminative_loss(embedding, masks, delta_d=2.0, hinge=hinge).dist.item() > 0
    assert torch.autograd.gradcheck(total, (embedding,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("hinge", ["squared", "euclidean"])
def test_loss_vanishes_for_well_separated_clusters(hinge):
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, :, :3] = masks[1, :, 3:6] = masks[2, :, 6:] = True
    points = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])  # pairwise distance >= 10 > 2*delta_d
    embedding = np.einsum("khw,ke->ehw", masks.astype(float), points)
    terms = discriminative_loss(
        torch.from_numpy(embedding),
        torch.from_numpy(masks),
        delta_d=4.0,
        weights=(1.0, 1.0, 0.0),
        hinge=hinge,
    )
    assert terms.var.item() == pytest.approx(0.0, abs=1e-12)
    assert terms.dist.item() == 0.0
    assert terms.total.item() == pytest.approx(0.0, abs=1e-12)
    assert terms.reg.item() == pytest.approx(float(np.mean(np.sum(points**2, axis=1))))


def test_no_instance_gives_zeros_connected_to_graph():
    embedding = torch.randn(4, 5, 5, requires_grad=True)
    terms = discriminative_loss(embedding, torch.zeros(0, 5, 5, dtype=torch.bool))
    assert all(t.item() == 0.0 for t in terms)
    terms.total.backward()
    assert embedding.grad is not None and torch.count_nonzero(embedding.grad) == 0


def test_only_empty_masks_count_as_no_instance():
    terms = discriminative_loss(torch.randn(2, 4, 4), torch.zeros(3, 4, 4, dtype=torch.bool))
    assert all(t.item() == 0.0 for t in terms)


def test_single_instance_has_no_push():
    rng = np.random.default_rng(4)
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1:4, 2:6] = True
    embedding = rng.normal(size=(3, 6, 6))
    terms = discriminative_loss(torch.from_numpy(embedding), torch.from_numpy(masks))
    expected = naive_discriminative(embedding, masks, 4.0, (1.0, 1.0, 0.001), "squared")
    assert terms.dist.item() == 0.0
    assert terms.var.item() == pytest.approx(expected[1], rel=1e-10)
    assert terms.var.item() > 0


def test_empty_masks_are_ignored():
    rng = np.random.default_rng(5)
    masks = random_overlapping_masks(rng, k=3)
    with_empty = np.concatenate([masks[:1], np.zeros_like(masks[:1]), masks[1:]])
    embedding = torch.from_numpy(rng.normal(size=(2, *masks.shape[1:])))
    a = discriminative_loss(embedding, torch.from_numpy(masks))
    b = discriminative_loss(embedding, torch.from_numpy(with_empty))
    np.testing.assert_allclose([t.item() for t in a], [t.item() for t in b])


def test_overlap_pixel_is_pulled_to_both_centres():
    # one pixel shared by two one-dimensional worms: its pull gradient is the sum of both pulls
    masks = np.zeros((2, 1, 5), dtype=bool)
    masks[0, 0, :3] = True
    masks[1, 0, 2:] = True
    embedding = torch.tensor([[[0.0, 1.0, 5.0, 8.0, 9.0]]], dtype=torch.float64, requires_grad=True)
    discriminative_loss(embedding, torch.from_numpy(masks)).var.backward()
    x = embedding.detach()[0, 0].numpy()
    mu_a, mu_b = x[:3].mean(), x[2:].mean()
    # d var / d x_2 for var = 1/2 * sum_k 1/3 sum_i (x_i - mu_k)^2 (the mean's own gradient sums to 0)
    expected = 0.5 * (2 * (x[2] - mu_a) / 3 + 2 * (x[2] - mu_b) / 3)
    assert embedding.grad[0, 0, 2].item() == pytest.approx(expected)
    assert np.sign(x[2] - mu_a) != np.sign(x[2] - mu_b)  # pulled in opposite directions


def test_instance_means_equals_masked_mean():
    rng = np.random.default_rng(6)
    masks = random_overlapping_masks(rng, k=3)
    embedding = rng.normal(size=(4, *masks.shape[1:]))
    means = instance_means(torch.from_numpy(embedding), torch.from_numpy(masks)).numpy()
    for k, mask in enumerate(masks):
        np.testing.assert_allclose(means[k], embedding[:, mask].mean(axis=1))


def test_discriminative_loss_rejects_bad_shapes_and_options():
    with pytest.raises(ValueError, match=r"\(3, 4, 4\)"):
        discriminative_loss(torch.zeros(2, 5, 5), torch.zeros(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="hinge"):
        discriminative_loss(torch.zeros(2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool), hinge="abs")
    with pytest.raises(ValueError, match="embedding"):
        discriminative_loss(torch.zeros(4, 4), torch.zeros(1, 4, 4, dtype=torch.bool))


def test_batched_loss_is_mean_of_per_image_losses():
    rng = np.random.default_rng(7)
    stacks = [torch.from_numpy(random_overlapping_masks(rng, k=k)) for k in (3, 1, 0)]
    embeddings = torch.from_numpy(rng.normal(size=(3, 2, *stacks[0].shape[1:])))
    batched = batched_discriminative_loss(embeddings, stacks, delta_d=3.0, hinge="euclidean")
    singles = [
        naive_discriminative(e.numpy(), s.numpy(), 3.0, (1.0, 1.0, 0.001), "euclidean")
        for e, s in zip(embeddings, stacks)
    ]
    np.testing.assert_allclose([t.item() for t in batched], np.mean(singles, axis=0), rtol=1e-10)
    with pytest.raises(ValueError, match="batch of 3"):
        batched_discriminative_loss(embeddings, stacks[:2])


# ---------------------------------------------------------------------------------------------
# the batched loss against the looped one it replaced (tests/looped_objective.py)
# ---------------------------------------------------------------------------------------------
def _random_stacks(rng: np.random.Generator, counts, shape=(12, 15)) -> list[torch.Tensor]:
    stacks = []
    for k in counts:
        masks = rng.random((k, *shape)) < 0.3
        if k > 2:
            masks[1] = False  # a worm that left the crop
        stacks.append(torch.from_numpy(masks))
    return stacks


def _assert_same_loss(embeddings, stacks, rtol, **kwargs):
    reference_input = embeddings.detach().clone().requires_grad_()
    batched_input = embeddings.detach().clone().requires_grad_()
    reference = looped_batched_loss(reference_input, stacks, **kwargs)
    masks, valid = pad_instances(stacks)
    batched = batched_discriminative_loss(batched_input, masks, valid, **kwargs)
    torch.testing.assert_close(torch.stack(list(batched)), torch.stack(list(reference)), rtol=rtol, atol=rtol)
    reference.total.backward()
    batched.total.backward()
    scale = reference_input.grad.abs().max()
    torch.testing.assert_close(batched_input.grad / scale, reference_input.grad / scale, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("hinge", ["squared", "euclidean"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_batched_loss_equals_the_looped_reference(hinge, dtype, rtol):
    rng = np.random.default_rng(11)
    stacks = _random_stacks(rng, counts=(4, 0, 1, 6, 3))  # no worm, one worm, a left worm
    embeddings = torch.from_numpy(rng.normal(5.0, 3.0, size=(5, 8, 12, 15))).to(dtype)
    _assert_same_loss(embeddings, stacks, rtol, hinge=hinge, delta_d=3.0, weights=(1.0, 0.5, 0.01))


def test_batched_loss_equals_the_looped_reference_on_real_crops(bbbc010_root):
    from companion.data.augment import WormCropDataset
    from companion.data.bbbc010 import FIT_WELLS, load_bbbc010

    samples = load_bbbc010(bbbc010_root, FIT_WELLS[:4], skip_incomplete=True, progress=False)
    dataset = WormCropDataset(samples, crop_size=256, length=6, seed=3)
    stacks = [dataset[i]["instances"] for i in range(len(dataset))]
    assert max(len(s) for s in stacks) > 3
    torch.manual_seed(0)
    embeddings = torch.randn(len(stacks), 16, 256, 256) * 2.0 + 4.0  # magnitudes of a trained net
    _assert_same_loss(embeddings, stacks, 1e-4)


def test_padded_masks_lists_and_validity_agree():
    rng = np.random.default_rng(12)
    stacks = _random_stacks(rng, counts=(3, 2))
    embeddings = torch.from_numpy(rng.normal(size=(2, 4, 12, 15)))
    masks, valid = pad_instances(stacks, k_max=5)
    from_list = batched_discriminative_loss(embeddings, stacks)
    from_padding = batched_discriminative_loss(embeddings, masks, valid)
    torch.testing.assert_close(torch.stack(list(from_padding)), torch.stack(list(from_list)))
    hidden = valid.clone()
    hidden[0, 0] = False  # a real mask marked not valid counts as absent
    without = batched_discriminative_loss(embeddings, masks, hidden)
    expected = looped_batched_loss(embeddings, [stacks[0][1:], stacks[1]])
    torch.testing.assert_close(torch.stack(list(without)), torch.stack(list(expected)))
    with pytest.raises(ValueError, match="valid goes with a padded"):
        batched_discriminative_loss(embeddings, stacks, valid)


@pytest.mark.parametrize("dropout", [None, "concrete"])
def test_regularisers_equal_their_per_layer_references(dropout):
    torch.manual_seed(1)
    net = UNet(base_filters=4, dropout=dropout, init_dropout_rate=0.2)
    if dropout:
        got, expected = (
            concrete_regularizer(net, 7, 1e-3, 1e-2),
            looped_concrete_regularizer(net, 7, 1e-3, 1e-2),
        )
    else:
        got, expected = weight_decay_penalty(net), looped_weight_decay_penalty(net)
    torch.testing.assert_close(got, expected)
    got_grads = torch.autograd.grad(got, list(net.parameters()), allow_unused=True)
    expected_grads = torch.autograd.grad(expected, list(net.parameters()), allow_unused=True)
    for a, b in zip(got_grads, expected_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def _objective_operators(batch_size: int) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    rng = np.random.default_rng(13)
    stacks = _random_stacks(rng, counts=[3, 5, 0, 2] * (batch_size // 4), shape=(32, 32))
    masks, valid = pad_instances(stacks)
    net = UNet(base_filters=4, dropout="concrete")
    output = net(torch.rand(batch_size, 2, 32, 32))
    output = type(output)(*(t.detach().requires_grad_() for t in output))
    target = torch.zeros(batch_size, 32, 32, dtype=torch.long)
    batch = {"target": target, "instances": masks, "valid": valid}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        training_objective(net, output, batch, n_train=10).total.backward()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def test_the_objective_runs_a_fixed_set_of_operators_without_host_synchronisation():
    _objective_operators(4)  # the first call also builds the constants it keeps on the device
    small, large = _objective_operators(4), _objective_operators(8)
    assert len(small) == len(large)  # the work of a batch is not a loop over its crops or worms
    syncing = {
        "aten::nonzero",
        "aten::item",
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
        "aten::masked_select",
    }
    assert not syncing & set(large)


# ---------------------------------------------------------------------------------------------
# class loss and the full objective
# ---------------------------------------------------------------------------------------------
def test_class_loss_equals_mean_negative_log_softmax():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(2, 3, 4, 5))
    target = rng.integers(0, 3, size=(2, 4, 5))
    expected = 0.0
    for b in range(2):
        for y in range(4):
            for x in range(5):
                z = logits[b, :, y, x]
                expected -= z[target[b, y, x]] - math.log(np.exp(z).sum())
    expected /= target.size
    got = class_loss(torch.from_numpy(logits), torch.from_numpy(target)).item()
    assert got == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="do not match"):
        class_loss(torch.from_numpy(logits), torch.from_numpy(target[:, :3]))


def _synthetic_batch(n: int = 2, size: int = 64, seed: int = 0) -> dict:
    from companion.data.synthetic import make_sample
    from companion.data.targets import three_class_target

    samples = [make_sample(seed + i, shape=(size, size), n_worms=(3, 5)) for i in range(n)]
    instances = [torch.from_numpy(s.instances) for s in samples]
    return {
        "image": torch.from_numpy(np.stack([s.image for s in samples])).float(),
        "target": torch.stack([three_class_target(m) for m in instances]),
        "instances": instances,
    }


def test_training_objective_sums_its_terms_concrete_and_baseline():
    torch.manual_seed(0)
    batch = _synthetic_batch()
    concrete = UNet(base_filters=4, dropout="concrete")
    out = concrete(batch["image"])
    terms = training_objective(concrete, out, batch, n_train=50, length_scale_sq=1e-4, zeta=1e-2)
    assert isinstance(terms, ObjectiveTerms)
    disc = batched_discriminative_loss(out.embedding, batch["instances"])
    assert terms.var.item() == pytest.approx(disc.var.item())
    assert terms.ce.item() == pytest.approx(F.cross_entropy(out.logits, batch["target"]).item())
    assert terms.model_reg.item() == pytest.approx(
        concrete_regularizer(concrete, 50, length_scale_sq=1e-4, zeta=1e-2).item()
    )
    assert terms.total.item() == pytest.approx((disc.total + terms.ce + terms.model_reg).item(), rel=1e-6)

    baseline = UNet(base_filters=4)
    out = baseline(batch["image"])
    terms = training_objective(baseline, out, batch, n_train=50, weight_decay=1e-3)
    squares = sum(
        float((p.detach() ** 2).sum()) for name, p in baseline.named_parameters() if name.endswith("weight")
    )
    assert terms.model_reg.item() == pytest.approx(1e-3 * squares, rel=1e-5)
    with pytest.raises(ValueError, match="n_train"):
        training_objective(baseline, out, batch, n_train=0)


def test_disc_weight_scales_only_the_discriminative_part_of_the_total():
    torch.manual_seed(0)
    batch = _synthetic_batch()
    net = UNet(base_filters=4)
    out = net(batch["image"])
    full = training_objective(net, out, batch, n_train=50)
    warmup = training_objective(net, out, batch, n_train=50, disc_weight=0.0)
    half = training_objective(net, out, batch, n_train=50, disc_weight=0.5)
    assert warmup.total.item() == pytest.approx((full.ce + full.model_reg).item(), rel=1e-6)
    disc_total = (full.total - full.ce - full.model_reg).item()
    assert disc_total > 1  # the test would be vacuous if the discriminative part were ~0
    assert half.total.item() == pytest.approx(warmup.total.item() + 0.5 * disc_total, rel=1e-5)
    assert warmup.dist.item() == pytest.approx(full.dist.item())  # logged terms stay unweighted
    out.embedding.retain_grad()
    warmup.total.backward()
    assert out.embedding.grad is None or float(out.embedding.grad.abs().max()) == 0.0
    with pytest.raises(ValueError, match="disc_weight"):
        training_objective(net, out, batch, n_train=50, disc_weight=-1.0)


@pytest.mark.parametrize("dropout", [None, "concrete"])
def test_short_training_lowers_the_objective(dropout):
    torch.manual_seed(0)
    batch = _synthetic_batch(n=2, size=64, seed=10)
    model = UNet(base_filters=6, dropout=dropout)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(50):
        optimiser.zero_grad()
        terms = training_objective(model, model(batch["image"]), batch, n_train=10)
        terms.total.backward()
        optimiser.step()
        history.append(terms.total.item())
    model.eval()
    with torch.no_grad():
        final = training_objective(model, model(batch["image"]), batch, n_train=10)
    assert all(np.isfinite(history))
    assert final.total.item() < 0.5 * history[0]
    assert np.mean(history[-5:]) < np.mean(history[:5])


def test_overlap_weight_weights_the_overlap_pixels_terms():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, generator=gen)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 2
    target[0, 1] = 1
    per_pixel = F.cross_entropy(logits, target, reduction="none")[0]
    w = torch.ones(4, 4)
    w[target[0] == 2] = 5.0
    expected = (per_pixel * w).sum() / w.sum()  # the weighted mean, by hand
    assert torch.isclose(class_loss(logits, target, overlap_weight=5.0), expected)
    assert torch.isclose(class_loss(logits, target, overlap_weight=1.0), per_pixel.mean())
    with pytest.raises(ValueError, match="overlap_weight"):
        class_loss(logits, target, overlap_weight=0.0)
