"""Tests of companion.data.targets: the three-class target against a per-pixel reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from companion.data.synthetic import make_sample
from companion.data.targets import BACKGROUND, FOREGROUND, OVERLAP, three_class_target, worm_probability


def _reference(instances: np.ndarray) -> np.ndarray:
    """Per-pixel loop: count the masks covering the pixel."""
    _, height, width = instances.shape
    out = np.empty((height, width), dtype=np.int64)
    for y in range(height):
        for x in range(width):
            n = int(sum(bool(m[y, x]) for m in instances))
            out[y, x] = BACKGROUND if n == 0 else FOREGROUND if n == 1 else OVERLAP
    return out


@pytest.fixture
def overlapping_instances() -> np.ndarray:
    sample = make_sample(3, shape=(48, 48), n_worms=5, radius_range=(3, 4), length_range=(20, 40))
    assert (sample.instances.sum(0) >= 2).any(), "fixture should contain overlaps"
    return sample.instances


def test_numpy_matches_reference(overlapping_instances):
    target = three_class_target(overlapping_instances)
    assert isinstance(target, np.ndarray) and target.dtype == np.int64
    np.testing.assert_array_equal(target, _reference(overlapping_instances))
    assert set(np.unique(target)) == {BACKGROUND, FOREGROUND, OVERLAP}


def test_torch_matches_numpy(overlapping_instances):
    target = three_class_target(torch.from_numpy(overlapping_instances))
    assert isinstance(target, torch.Tensor) and target.dtype == torch.int64
    np.testing.assert_array_equal(target.numpy(), three_class_target(overlapping_instances))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int64])
def test_numeric_masks(overlapping_instances, dtype):
    as_numbers = overlapping_instances.astype(dtype)
    np.testing.assert_array_equal(three_class_target(as_numbers), _reference(overlapping_instances))
    np.testing.assert_array_equal(
        three_class_target(torch.from_numpy(as_numbers)).numpy(), _reference(overlapping_instances)
    )


def test_many_overlapping_masks_stay_overlap():
    masks = np.ones((300, 2, 3), dtype=bool)  # more masks than a uint8 count could hold
    masks[:, 0, 0] = False
    target = three_class_target(masks)
    assert target[0, 0] == BACKGROUND and (target.ravel()[1:] == OVERLAP).all()


def test_no_instances_is_background():
    for masks in (np.zeros((0, 4, 5), bool), torch.zeros((0, 4, 5), dtype=torch.bool)):
        target = three_class_target(masks)
        assert tuple(target.shape) == (4, 5) and int(target.sum()) == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(K, H, W\).*\(4, 5\)"):
        three_class_target(np.zeros((4, 5), bool))
    with pytest.raises(TypeError, match="list"):
        three_class_target([[[True]]])


def test_worm_probability_is_one_minus_the_background_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    expected = 1.0 - np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)  # by hand, no shift
    got = worm_probability(logits)
    assert got.dtype == np.float32 and got.shape == (2, 4, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.isclose(worm_probability(np.array([[[1000.0]], [[0.0]], [[0.0]]]))[0, 0], 0.0)  # no overflow
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        worm_probability(np.zeros((2, 4, 5)))
