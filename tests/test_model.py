"""Tests of companion.model.unet: U-Net shapes, Concrete Dropout sampling and its regulariser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from companion.model.dropout import (
    ConcreteDropout,
    ConcreteDropout2d,
    DropoutLayer,
    concrete_layers,
    concrete_regularizer,
    dropout_rates,
    mc_sampling,
    set_mc_sampling,
)
from companion.model.unet import UNet, UNetOutput, weight_decay_penalty


def small_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet(base_filters=4, **kwargs)


# ---------------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [None, "concrete"])
def test_unet_output_shapes(dropout):
    net = small_unet(dropout=dropout, embedding_dim=7)
    out = net(torch.rand(2, 2, 48, 80))
    assert isinstance(out, UNetOutput)
    assert out.embedding.shape == (2, 7, 48, 80)
    assert out.logits.shape == (2, 3, 48, 80)


def test_unet_widths_double_per_level():
    net = UNet(base_filters=19, depth=5)
    first_convs = [block[0].layer for block in net.encoder]
    assert [c.out_channels for c in first_convs] == [19 * 2**i for i in range(5)]
    assert [u.layer.kernel_size for u in net.upconvs] == [(2, 2)] * 4


@pytest.mark.parametrize("shape", [(1, 2, 40, 64), (1, 2, 64, 72), (1, 2, 520, 696)])
def test_unet_rejects_sizes_not_divisible_by_16(shape):
    net = small_unet()
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        net(torch.zeros(shape))


def test_unet_rejects_bad_options_and_ranks():
    with pytest.raises(ValueError, match="'gaussian'"):
        UNet(dropout="gaussian")
    with pytest.raises(ValueError, match="1.5"):
        UNet(dropout="concrete", init_dropout_rate=1.5)
    with pytest.raises(ValueError, match=r"\(2, 64, 64\)"):
        small_unet()(torch.zeros(2, 64, 64))


def test_one_concrete_layer_per_convolution():
    net = small_unet(dropout="concrete")
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    pairs = [m for m in net.modules() if isinstance(m, DropoutLayer)]
    assert len(concrete_layers(net)) == len(convs) == len(pairs) == 24
    assert all(isinstance(p.dropout, ConcreteDropout2d) for p in pairs)
    assert concrete_layers(small_unet()) == []
    assert dropout_rates(small_unet()) == []


def test_rates_match_init_and_lie_in_open_interval():
    net = small_unet(dropout="concrete", init_dropout_rate=0.25)
    rates = dropout_rates(net)
    assert all(0.0 < p < 1.0 for p in rates)
    np.testing.assert_allclose(rates, 0.25, rtol=1e-6)


def test_deterministic_mode_is_identity_and_equals_baseline():
    concrete = small_unet(dropout="concrete", init_dropout_rate=0.4).eval()
    baseline = small_unet().eval()
    missing, unexpected = baseline.load_state_dict(concrete.state_dict(), strict=False)
    assert missing == [] and all(k.endswith("p_logit") for k in unexpected)
    x = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        a, b, c = concrete(x), concrete(x), baseline(x)
    assert torch.equal(a.embedding, b.embedding)
    torch.testing.assert_close(a.embedding, c.embedding)
    torch.testing.assert_close(a.logits, c.logits)


def test_sampling_mode_is_stochastic_in_eval_and_restored():
    net = small_unet(dropout="concrete", init_dropout_rate=0.3).eval()
    x = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        with mc_sampling(net):
            first, second = net(x).embedding, net(x).embedding
        after = net(x).embedding, net(x).embedding
    assert not torch.allclose(first, second)
    assert torch.equal(*after)
    assert not net.training
    set_mc_sampling(net, True)
    assert all(layer.sampling for layer in concrete_layers(net))
    set_mc_sampling(net, False)
    assert not any(layer.sampling for layer in concrete_layers(net))


def test_train_mode_samples_and_trains_the_rates():
    net = small_unet(dropout="concrete", init_dropout_rate=0.3).train()
    x = torch.rand(2, 2, 32, 32)
    out = net(x)
    assert not torch.allclose(out.embedding, net(x).embedding)
    (out.embedding.pow(2).mean() + out.logits.pow(2).mean()).backward()
    grads = [layer.p_logit.grad for layer in concrete_layers(net)]
    assert all(g is not None and torch.isfinite(g) for g in grads)
    assert sum(float(g.abs()) for g in grads) > 0


# ---------------------------------------------------------------------------------------------
# Concrete Dropout layers
# ---------------------------------------------------------------------------------------------
def test_spatial_dropout_drops_whole_channels_at_rate_p():
    torch.manual_seed(1)
    drop = ConcreteDropout2d(init_rate=0.3).train()
    with torch.no_grad():
        y = drop(torch.ones(4000, 8, 3, 3))
    per_channel = y.amax(dim=(2, 3))
    assert torch.equal(per_channel, y.amin(dim=(2, 3)))
    dropped = (per_channel * 0.7 < 0.5).float().mean().item()  # P(relaxed drop > 1/2) = p
    assert dropped == pytest.approx(0.3, abs=0.02)
    assert (
        (per_channel * 0.7 > 0.05) & (per_channel * 0.7 < 0.95)
    ).float().mean() < 0.2  # t = 0.1: mostly near 0 or 1
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)  # inverted dropout keeps the mean


def test_dense_dropout_is_elementwise_with_unbiased_mean():
    torch.manual_seed(2)
    drop = ConcreteDropout(init_rate=0.5).train()
    with torch.no_grad():
        y = drop(torch.full((20000, 4), 3.0))
    assert y.mean().item() == pytest.approx(3.0, rel=0.02)
    assert (y * 0.5 < 1.5).float().mean().item() == pytest.approx(0.5, abs=0.02)  # P(relaxed drop > 1/2) = p
    with pytest.raises(ValueError, match=r"\(5, 4\)"):
        ConcreteDropout2d().train()(torch.ones(5, 4))


def test_lower_temperature_gives_harder_masks():
    torch.manual_seed(3)
    x = torch.ones(5000, 4)

    def undecided_fraction(t):
        with torch.no_grad():
            keep = ConcreteDropout(0.5, temperature=t).train()(x) * 0.5  # undo 1 / (1 - p)
        return ((keep > 0.05) & (keep < 0.95)).float().mean().item()

    assert undecided_fraction(0.01) < undecided_fraction(0.1) < undecided_fraction(1.0)


@pytest.mark.parametrize("logit", [-100.0, 100.0])
def test_extreme_logits_give_finite_outputs_regulariser_and_gradients(logit):
    layer = DropoutLayer(nn.Conv2d(3, 2, 3, padding=1), ConcreteDropout2d(0.5)).train()
    with torch.no_grad():
        layer.dropout.p_logit.fill_(logit)
    x = torch.rand(2, 3, 5, 5)
    out = layer(x)
    reg = concrete_regularizer(layer, n_train=10, length_scale_sq=1e-2, zeta=1e-2)
    (out.sum() + reg).backward()
    assert torch.isfinite(out).all() and torch.isfinite(reg)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert 0.0 <= layer.dropout.p <= 1.0


# ---------------------------------------------------------------------------------------------
# regulariser
# ---------------------------------------------------------------------------------------------
def _bernoulli_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.8])
def test_concrete_regulariser_matches_hand_computation(p):
    torch.manual_seed(4)
    layer = DropoutLayer(nn.Conv2d(3, 2, 3), ConcreteDropout2d(p))
    l2, zeta, n = 0.01, 0.002, 7
    w = layer.layer.weight.detach().double().numpy()
    b = layer.layer.bias.detach().double().numpy()
    expected = (
        l2 * np.sum(w**2) / (2 * (1 - p)) + l2 / 2 * np.sum(b**2) - zeta * 3 * _bernoulli_entropy(p)
    ) / n
    got = concrete_regularizer(layer, n_train=n, length_scale_sq=l2, zeta=zeta).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_inverted_weight_term_equals_non_inverted_form():
    # the same function written with non-inverted dropout has M = M_inv / (1 - p); Gal's
    # weight term (1 - p) l^2/2 ||M||^2 must equal ours, l^2/2 ||M_inv||^2 / (1 - p)
    p, l2 = 0.35, 1.0
    layer = DropoutLayer(nn.Linear(5, 3, bias=False), ConcreteDropout(p))
    m_non_inverted = layer.layer.weight.detach().double() / (1 - p)
    non_inverted = (1 - p) * l2 / 2 * float((m_non_inverted**2).sum())
    ours = concrete_regularizer(layer, n_train=1, length_scale_sq=l2, zeta=0.0).item()
    assert ours == pytest.approx(non_inverted, rel=1e-5)


def test_regulariser_sums_over_layers_and_entropy_pulls_towards_half():
    net = small_unet(dropout="concrete", init_dropout_rate=0.1)
    zeta = 0.5
    total = concrete_regularizer(net, n_train=3, length_scale_sq=0.0, zeta=zeta)
    in_features = [m.in_channels for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    expected = -zeta * sum(in_features) * _bernoulli_entropy(0.1) / 3
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    # p = 0.1 < 0.5: minimising -H(p) raises p, so d reg / d logit < 0
    assert all(layer.p_logit.grad.item() < 0 for layer in concrete_layers(net))


def test_regulariser_of_baseline_is_zero_and_rejects_bad_n():
    assert concrete_regularizer(small_unet(), n_train=5).item() == 0.0
    with pytest.raises(ValueError, match="n_train"):
        concrete_regularizer(small_unet(dropout="concrete"), n_train=0)


def test_weight_decay_penalty_sums_squared_weights_only():
    net = small_unet()
    expected = sum(
        float((m.weight.detach().double() ** 2).sum())
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
    )
    assert weight_decay_penalty(net).item() == pytest.approx(expected, rel=1e-5)


def test_heavy_weight_term_drives_the_rate_down():
    # 1 / (1 - p) grows with p: with a strong weight prior the regulariser alone shrinks p
    torch.manual_seed(5)
    layer = DropoutLayer(nn.Linear(10, 10), ConcreteDropout(0.5))
    optimiser = torch.optim.SGD([layer.dropout.p_logit], lr=0.5)
    for _ in range(100):
        optimiser.zero_grad()
        concrete_regularizer(layer, n_train=1, length_scale_sq=10.0, zeta=1e-3).backward()
        optimiser.step()
    assert layer.dropout.p < 0.1


def test_regulariser_passes_gradcheck_in_float64():
    torch.manual_seed(6)
    layer = DropoutLayer(nn.Conv2d(3, 2, 3), ConcreteDropout2d(0.3)).double()
    wrapped = _RegulariserModule(layer)

    def regulariser(logit, weight, bias):
        values = {"inner.dropout.p_logit": logit, "inner.layer.weight": weight, "inner.layer.bias": bias}
        return torch.func.functional_call(wrapped, values, args=())

    inputs = tuple(
        p.detach().clone().requires_grad_(True)
        for p in (layer.dropout.p_logit, layer.layer.weight, layer.layer.bias)
    )
    assert torch.autograd.gradcheck(regulariser, inputs, eps=1e-6, atol=1e-7)


class _RegulariserModule(nn.Module):
    """Wraps a layer so that torch.func.functional_call can evaluate its regulariser."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self) -> torch.Tensor:
        return concrete_regularizer(self.inner, n_train=3, length_scale_sq=0.1, zeta=0.05)


def test_input_features_of_each_layer_kind():
    assert DropoutLayer(nn.Conv2d(5, 3, 3)).in_features == 5
    assert DropoutLayer(nn.ConvTranspose2d(6, 3, 2, stride=2)).in_features == 6
    assert DropoutLayer(nn.Linear(7, 2)).in_features == 7


def test_mc_sampling_restores_previous_state():
    net = small_unet(dropout="concrete")
    set_mc_sampling(net, True)
    with mc_sampling(net):
        pass
    assert all(layer.sampling for layer in concrete_layers(net))


def test_input_standardization_is_applied_and_validated():
    torch.manual_seed(0)
    plain = UNet(base_filters=2, depth=2)
    scaled = UNet(base_filters=2, depth=2, input_mean=[1.0, 2.0], input_std=[2.0, 4.0])
    scaled.load_state_dict(plain.state_dict())  # the statistics are not in the state dict
    x = torch.rand(1, 2, 8, 8)
    expected = plain(
        (x - torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)) / torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    )
    assert torch.allclose(scaled(x).embedding, expected.embedding, atol=1e-6)
    with pytest.raises(ValueError, match="input_std"):
        UNet(input_mean=[0.0, 0.0], input_std=[1.0, 0.0])


def test_transposed_convolutions_keep_the_activation_scale():
    torch.manual_seed(0)
    up = UNet(base_filters=16, depth=2).upconvs[0].layer
    x = torch.relu(torch.randn(4, 32, 16, 16))
    ratio = float(up(x).pow(2).mean() / x.pow(2).mean())
    assert 1.4 < ratio < 2.6  # He: E[y^2] = 2 E[x^2] for ReLU inputs (half-He gave ~0.5)


def test_downsample_runs_the_network_on_pooled_input_and_resizes_back():
    torch.manual_seed(0)
    full = UNet(base_filters=2, depth=2)
    half = UNet(base_filters=2, depth=2, downsample=2)
    half.load_state_dict(full.state_dict())  # same weights: only the resolution differs
    assert (full.divisor, half.divisor) == (2, 4)
    x = torch.rand(1, 2, 8, 12)
    inner = full(torch.nn.functional.avg_pool2d(x, 2))
    out = half(x)
    assert tuple(out.embedding.shape) == (1, 16, 8, 12) and tuple(out.logits.shape) == (1, 3, 8, 12)
    expected = torch.nn.functional.interpolate(inner.embedding, size=(8, 12), mode="bilinear")
    assert torch.allclose(out.embedding, expected, atol=1e-6)
    assert not torch.allclose(out.embedding, full(x).embedding, atol=1e-3)
    with pytest.raises(ValueError, match="divisible by 4"):
        half(torch.rand(1, 2, 8, 10))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="downsample"):
            UNet(downsample=bad)
