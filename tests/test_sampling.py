"""Tests of companion.inference.sampling: deterministic and Monte-Carlo dropout inference on whole images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from companion.inference.sampling import FLIPS, MCDraws, mc_predict, pad_to_multiple, predict
from companion.model.dropout import concrete_layers, set_mc_sampling
from companion.model.unet import UNet


@pytest.fixture(scope="module")
def net() -> UNet:
    torch.manual_seed(0)
    return UNet(base_filters=4, dropout="concrete", init_dropout_rate=0.2)


@pytest.fixture
def image(rng) -> np.ndarray:
    return rng.random((2, 37, 50), dtype=np.float32)  # not a multiple of 16


def test_pad_to_multiple_reflects_and_crops_back():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    padded, (rows, cols) = pad_to_multiple(x, 4)
    assert padded.shape[-2:] == (8, 8)
    assert torch.equal(padded[..., rows, cols], x)
    top, left = rows.start, cols.start
    # reflect padding mirrors without repeating the edge row / column
    assert torch.equal(padded[..., top - 1, cols], x[..., 1, :])
    assert torch.equal(padded[..., rows, left + 7], x[..., :, 5])
    tiny, crop = pad_to_multiple(torch.ones(1, 1, 2, 3), 16)  # too small to mirror: replicate
    assert tiny.shape[-2:] == (16, 16) and torch.equal(tiny, torch.ones(1, 1, 16, 16))
    same, crop = pad_to_multiple(x[..., :4, :4], 4)
    assert same.shape == (1, 2, 4, 4) and crop == (slice(0, 4), slice(0, 4))
    with pytest.raises(ValueError, match=r"\(2, 5, 7\)"):
        pad_to_multiple(x[0], 4)


def test_predict_is_deterministic_and_cropped(net, image):
    set_mc_sampling(net, True)  # predict must switch sampling off ...
    net.train()
    first, second = predict(net, image), predict(net, torch.from_numpy(image), device="cpu")
    assert all(layer.sampling for layer in concrete_layers(net))  # ... and restore it afterwards
    assert net.training
    set_mc_sampling(net, False)
    net.eval()
    assert isinstance(first, MCDraws)
    assert first.embeddings.shape == (1, 16, 37, 50) and first.logits.shape == (1, 3, 37, 50)
    assert first.embeddings.dtype == np.float32
    np.testing.assert_array_equal(first.embeddings, second.embeddings)


def test_predict_equals_a_plain_forward_pass_when_no_padding_is_needed(net, rng):
    image = rng.random((2, 32, 48), dtype=np.float32)
    with torch.no_grad():
        reference = net.eval()(torch.from_numpy(image)[None])
    out = predict(net, image)
    np.testing.assert_allclose(
        out.logits, reference.logits.numpy(), atol=1e-5
    )  # NHWC kernels sum in another order
    np.testing.assert_allclose(out.embeddings, reference.embedding.numpy(), atol=1e-5)


def test_predict_crop_matches_a_manually_padded_forward_pass(net, image):
    x = torch.from_numpy(image)[None]
    manual = torch.nn.functional.pad(x, (7, 7, 5, 6), mode="reflect")  # 37 x 50 -> 48 x 64
    with torch.no_grad():
        reference = net.eval()(manual).logits[..., 5:42, 7:57]
    np.testing.assert_allclose(predict(net, image).logits, reference.numpy(), atol=1e-5)  # NHWC kernels


def test_mc_predict_draws_differ_and_are_seeded(net, image):
    state = torch.get_rng_state()
    draws = mc_predict(net, image, n_draws=5, batch=2, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert draws.embeddings.shape == (5, 16, 37, 50) and draws.logits.shape == (5, 3, 37, 50)
    assert draws.logits.dtype == np.float32
    for i in range(5):
        for j in range(i):
            assert not np.allclose(draws.logits[i], draws.logits[j])
    again = mc_predict(net, image, n_draws=5, batch=2, seed=3)
    np.testing.assert_array_equal(draws.logits, again.logits)
    other = mc_predict(net, image, n_draws=5, batch=2, seed=4)
    assert not np.allclose(draws.logits, other.logits)
    deterministic = predict(net, image)
    assert not np.allclose(draws.logits[0], deterministic.logits[0])


def test_mc_predict_batched_matches_a_reference_sampling_loop(net, rng):
    image = rng.random((2, 32, 32), dtype=np.float32)
    draws = mc_predict(net, image, n_draws=6, batch=4, seed=11)
    torch.manual_seed(11)
    set_mc_sampling(net, True)
    with torch.no_grad():
        x = torch.from_numpy(image)[None]
        reference = torch.cat([net.eval()(x.repeat(4, 1, 1, 1)).logits, net(x.repeat(2, 1, 1, 1)).logits])
    set_mc_sampling(net, False)
    np.testing.assert_allclose(
        draws.logits, reference.numpy(), rtol=1e-5, atol=1e-4
    )  # batched convolutions round differently


def test_mc_predict_restores_modes(net, image):
    net.train()
    mc_predict(net, image, n_draws=2, seed=0)
    assert net.training and not any(layer.sampling for layer in concrete_layers(net))
    net.eval()
    mc_predict(net, image, n_draws=2, seed=0)
    assert not net.training and not any(layer.sampling for layer in concrete_layers(net))


def test_mc_predict_without_dropout_gives_identical_draws(image):
    baseline = UNet(base_filters=4, dropout=None)
    draws = mc_predict(baseline, image, n_draws=3, batch=2)
    # equal up to float rounding (batched convolutions may sum in another order)
    np.testing.assert_allclose(draws.logits[0], draws.logits[2], atol=1e-5)
    np.testing.assert_allclose(draws.logits[0], predict(baseline, image).logits[0], atol=1e-5)


def test_invalid_inputs_are_rejected(net, image):
    with pytest.raises(ValueError, match=r"\(37, 50\)"):
        predict(net, image[0])
    with pytest.raises(ValueError, match="n_draws"):
        mc_predict(net, image, n_draws=0)


def test_a_network_with_nan_weights_is_an_error_not_an_empty_segmentation(image):
    torch.manual_seed(0)
    broken = UNet(base_filters=4, dropout="concrete")
    with torch.no_grad():
        next(p for p in broken.parameters() if p.dim() == 4)[0].fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite.*corrupt"):
        predict(broken, image)
    with pytest.raises(ValueError, match="not finite"):
        mc_predict(broken, image, n_draws=2, seed=0)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-3, keepdims=True))
    return e / e.sum(axis=-3, keepdims=True)


def test_flip_augmented_predict_averages_the_class_probabilities_of_the_four_flips(net, image):
    plain = predict(net, image)
    augmented = predict(net, image, flips=True)
    assert np.array_equal(augmented.embeddings, plain.embeddings)  # the unflipped embedding
    by_hand = np.zeros_like(plain.logits[0])
    for axes in [(), (-1,), (-2,), (-2, -1)]:
        view = np.flip(image, axes) if axes else image
        logits = predict(net, np.ascontiguousarray(view)).logits[0]
        by_hand += _softmax(np.flip(logits, axes) if axes else logits) / 4
    np.testing.assert_allclose(_softmax(augmented.logits[0]), by_hand, atol=1e-5)
    assert not np.allclose(_softmax(plain.logits[0]), by_hand, atol=1e-3)  # the flips matter


def test_flip_augmented_draws_cycle_through_the_flipped_views(image):
    torch.manual_seed(1)
    deterministic_net = UNet(base_filters=4, dropout=None)  # draws differ only by their view
    draws = mc_predict(deterministic_net, image, n_draws=6, flips=True)
    assert FLIPS == ((), (-1,), (-2,), (-2, -1))
    for d in range(6):
        axes = FLIPS[d % 4]
        view = np.ascontiguousarray(np.flip(image, axes)) if axes else image
        out = predict(deterministic_net, view)
        back = [np.flip(a[0], axes) if axes else a[0] for a in (out.embeddings, out.logits)]
        np.testing.assert_allclose(draws.embeddings[d], back[0], atol=1e-5)
        np.testing.assert_allclose(draws.logits[d], back[1], atol=1e-5)
    assert not np.allclose(draws.logits[0], draws.logits[1], atol=1e-3)
    batched = mc_predict(deterministic_net, image, n_draws=6, flips=True, batch=6)  # one pass per view
    np.testing.assert_allclose(batched.logits, draws.logits, atol=1e-4)  # same view for each draw


def test_flip_augmented_draws_are_seeded(net, image):
    first = mc_predict(net, image, n_draws=4, seed=3, flips=True)
    again = mc_predict(net, image, n_draws=4, seed=3, flips=True)
    assert np.array_equal(first.logits, again.logits)
    plain = mc_predict(net, image, n_draws=4, seed=3)
    assert np.array_equal(first.logits[0], plain.logits[0])  # draw 0 is the unflipped view
    assert not np.allclose(first.logits[1], plain.logits[1])


def test_outputs_can_stay_on_the_device_as_tensors_equal_to_the_numpy_ones(net, image):
    as_numpy = mc_predict(net, image, n_draws=3, seed=2, flips=True)
    as_tensors = mc_predict(net, image, n_draws=3, seed=2, flips=True, as_tensors=True)
    assert isinstance(as_tensors.embeddings, torch.Tensor) and as_tensors.logits.device == torch.device("cpu")
    assert np.array_equal(as_tensors.logits.numpy(), as_numpy.logits)
    assert np.array_equal(as_tensors.embeddings.numpy(), as_numpy.embeddings)
    flipped = predict(net, image, flips=True, as_tensors=True)
    assert np.array_equal(flipped.logits.numpy(), predict(net, image, flips=True).logits)


def test_mixed_precision_inference_is_close_to_float32(image):
    from companion.inference.sampling import inference_dtype

    torch.manual_seed(0)
    net = UNet(base_filters=4, depth=3, dropout="concrete")
    exact = predict(net, image)
    mixed = predict(net, image, amp=True)  # bf16 autocast on the CPU, outputs float32
    assert mixed.embeddings.dtype == np.float32 and not np.array_equal(mixed.embeddings, exact.embeddings)
    scale = np.abs(exact.embeddings).max()
    assert np.abs(mixed.embeddings - exact.embeddings).max() < 0.05 * scale
    agree = (mixed.logits.argmax(axis=1) == exact.logits.argmax(axis=1)).mean()
    assert agree > 0.95
    assert inference_dtype(torch.device("cpu")) is None  # float32 on the CPU unless asked
    assert inference_dtype(torch.device("cpu"), amp=False) is None
