"""Foreground calibration: a shift of the background logit chosen by pixel F1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from companion.data.synthetic import make_dataset
from companion.model.unet import UNet
from companion.training.calibration import choose_background_shift, foreground_f1, shift_background_logit


def test_foreground_f1_counts_pixels_and_names_bad_shapes():
    logits = np.zeros((3, 2, 2), np.float32)
    logits[0] = [[3.0, 0.5], [-1.0, 3.0]]
    truth = np.array([[True, True], [False, False]])
    assert foreground_f1(logits, truth) == (0, 1, 2)  # argmax: only (1, 0) is foreground
    assert foreground_f1(logits, truth, shift=1.0) == (1, 1, 1)
    assert foreground_f1(logits, truth, shift=5.0) == (2, 2, 0)
    with pytest.raises(ValueError, match=r"\(3, 2, 2\) and \(3, 3\)"):
        foreground_f1(logits, np.zeros((3, 3), bool))


def test_choose_background_shift_undoes_a_known_bias(monkeypatch):
    samples = make_dataset(2, seed=0, shape=(64, 64))
    truths = [np.asarray(s.instances).any(0) for s in samples]

    def fake_predict(model, image, device=None):  # logits that say "worm" by 1.0 but background by 2.5
        index = next(i for i, s in enumerate(samples) if s.image is image)
        logits = np.zeros((1, 3) + truths[index].shape, np.float32)
        logits[0, 1][truths[index]] = 1.0
        logits[0, 0] = 2.5
        return type("Out", (), {"logits": torch.from_numpy(logits)})

    monkeypatch.setattr("companion.training.calibration.predict", fake_predict)
    choice = choose_background_shift(None, samples, shifts=[0.0, 1.0, 2.0, 3.0])
    assert choice.shift == 2.0  # the smallest shift that makes worm pixels win
    assert choice.f1[0] == 0.0 and choice.f1[2] == pytest.approx(1.0)
    assert choice.f1[3] < 1.0  # a larger shift calls the background worm too
    assert choice.wells == [s.well for s in samples]
    with pytest.raises(ValueError, match="at least one sample"):
        choose_background_shift(None, [])


def test_shift_changes_only_the_background_logit():
    net = UNet(base_filters=2, depth=2).eval()
    x = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        before = net(x).logits
        shift_background_logit(net, 0.75)
        after = net(x).logits
    assert torch.allclose(before[:, 0] - 0.75, after[:, 0], atol=1e-6)
    assert torch.equal(before[:, 1:], after[:, 1:])
    with pytest.raises(ValueError, match="3-class head"):
        shift_background_logit(torch.nn.Linear(2, 2), 1.0)


def test_shift_on_mc_draws_asks_for_the_agreement_of_the_binarisation(monkeypatch):
    samples = make_dataset(1, seed=0, shape=(48, 48))
    truth = np.asarray(samples[0].instances).any(0)
    biases = [2.5, 2.5, 2.5, 4.5]  # three draws lean to background by 2.5, one by 4.5

    def fake_mc_predict(model, image, n_draws, device=None, seed=None):
        assert n_draws == len(biases) and seed == 7
        logits = np.zeros((n_draws, 3) + truth.shape, np.float32)
        logits[:, 1][:, truth] = 1.0
        logits[:, 0] = np.asarray(biases)[:, None, None]
        return type("Draws", (), {"logits": logits})

    monkeypatch.setattr("companion.training.calibration.mc_predict", fake_mc_predict)
    shifts = [0.0, 1.0, 2.0, 3.0, 4.0]
    # 3 of 4 draws see every worm pixel from shift 2 on (worm 1 > 2.5 - 2); the background stays
    choice = choose_background_shift(None, samples, shifts, draws=4, agreement=0.75, seed=7)
    assert choice.shift == 2.0 and choice.f1[2] == pytest.approx(1.0) and choice.f1[1] == 0.0
    # all 4 must agree: only shift 4 gets the last draw's worm, while its background (4 > 2.5
    # in three draws only) stays below unanimity
    assert choose_background_shift(None, samples, shifts, draws=4, agreement=1.0, seed=7).shift == 4.0
    with pytest.raises(ValueError, match="draws must be"):
        choose_background_shift(None, samples, shifts, draws=-1)
    with pytest.raises(ValueError, match="agreement must"):
        choose_background_shift(None, samples, shifts, draws=4, agreement=0.0)
