"""Tests of companion.data.augment_torch: exact geometry, binary masks, agreement with the scipy path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from companion.data.augment import MIN_PIXELS, WormCropDataset
from companion.data.augment_torch import (
    CropParams,
    DeviceCropLoader,
    DeviceCropSource,
    augment_batch,
    batch_seed,
)
from companion.data.synthetic import make_dataset, make_sample
from companion.data.targets import three_class_target
from companion.training.batches import make_loader, uses_gpu_augment
from companion.training.config import TrainConfig
from companion.training.train import train

OFF = dict(rotate=False, flip=False, elastic=False)


@pytest.fixture(scope="module")
def sample():
    return make_sample(3, shape=(64, 64), n_worms=6)


def _params(
    n: int = 1, *, cy: float, cx: float, angle: float = 0.0, flip_y: float = 1.0, flip_x: float = 1.0
) -> CropParams:
    def full(value: float) -> torch.Tensor:
        return torch.full((n,), float(value), dtype=torch.float64)

    return CropParams(
        torch.zeros(n, dtype=torch.int64), full(cy), full(cx), full(flip_y), full(flip_x), full(angle), None
    )


def _one(source: DeviceCropSource, params: CropParams) -> tuple[np.ndarray, np.ndarray]:
    batch = source.crops([0], params=params)
    return batch["image"][0].numpy(), batch["instances"][0].numpy()


def test_identity_parameters_reproduce_the_input_exactly(sample):
    source = DeviceCropSource([sample], crop_size=64, min_pixels=0, **OFF)
    image, masks = _one(source, _params(cy=31.5, cx=31.5))
    np.testing.assert_array_equal(image, sample.image)
    np.testing.assert_array_equal(masks, sample.instances)


@pytest.mark.parametrize("angle, k", [(math.pi / 2, -1), (math.pi, 2), (3 * math.pi / 2, 1)])
def test_rotations_by_multiples_of_90_degrees_equal_rot90(sample, angle, k):
    source = DeviceCropSource([sample], crop_size=64, min_pixels=0, **OFF)
    image, masks = _one(source, _params(cy=31.5, cx=31.5, angle=angle))
    np.testing.assert_array_equal(image, np.rot90(sample.image, k, axes=(1, 2)))
    np.testing.assert_array_equal(masks, np.rot90(sample.instances, k, axes=(1, 2)))
    rotated = torch.rot90(torch.from_numpy(sample.image), k, dims=(1, 2)).numpy()
    np.testing.assert_array_equal(image, rotated)


@pytest.mark.parametrize("flip_y, flip_x", [(-1, 1), (1, -1), (-1, -1)])
def test_flips_equal_numpy_flips(sample, flip_y, flip_x):
    source = DeviceCropSource([sample], crop_size=64, min_pixels=0, **OFF)
    image, masks = _one(source, _params(cy=31.5, cx=31.5, flip_y=flip_y, flip_x=flip_x))
    axes = tuple(a for a, f in ((1, flip_y), (2, flip_x)) if f < 0)
    np.testing.assert_array_equal(image, np.flip(sample.image, axes))
    np.testing.assert_array_equal(masks, np.flip(sample.instances, axes))


def test_plain_random_crops_are_windows_and_zero_padded_outside():
    big = make_sample(5, shape=(48, 80), n_worms=5)
    source = DeviceCropSource([big], crop_size=(32, 40), min_pixels=0, **OFF)
    batch = source.crops([0] * 6, torch.Generator().manual_seed(1))
    for image in batch["image"].numpy():
        hits = [
            (y, x)
            for y in range(17)
            for x in range(41)
            if np.array_equal(big.image[:, y : y + 32, x : x + 40], image)
        ]
        assert len(hits) == 1
    small = DeviceCropSource([big], crop_size=(64, 96), min_pixels=0, **OFF)
    image = small.crops([0], torch.Generator().manual_seed(2))["image"][0].numpy()
    assert np.isclose(image.sum(), big.image.sum(), rtol=1e-5)  # the whole image, zeros around it
    assert (image == 0).sum() >= 2 * (64 * 96 - 48 * 80)


def test_masks_stay_binary_and_the_target_is_recomputed_from_kept_instances():
    data = make_dataset(3, seed=1, shape=(96, 96))
    source = DeviceCropSource(data, crop_size=48)
    batch = source.crops([0, 1, 2, 0, 1, 2], torch.Generator().manual_seed(0))
    assert batch["instances"].shape == (6, source.k_max, 48, 48) and batch["valid"].shape == (6, source.k_max)
    dropped = 0
    for target, masks, valid in zip(batch["target"], batch["instances"], batch["valid"]):
        assert masks.dtype == torch.bool
        assert (masks[valid].flatten(1).sum(1) >= MIN_PIXELS).all()
        assert not masks[~valid].any()  # dropped instances and padding are empty
        assert torch.equal(target, three_class_target(masks[valid]))
        dropped += int((~valid).sum())
    assert dropped > 0  # the batch has dropped or padded masks, so the checks above bite
    assert batch["target"].dtype == torch.int64 and set(batch["target"].unique().tolist()) <= {0, 1, 2}


def test_all_mask_bits_unpack_at_once_as_one_at_a_time():
    sample = make_sample(3, shape=(40, 40), n_worms=5)
    many = np.concatenate([sample.instances] * 11)  # 55 masks: three words of 24 bits
    source = DeviceCropSource(
        [type(sample)(sample.well, sample.image, many)], crop_size=40, min_pixels=0, **OFF
    )
    assert source.n_words == 3
    batch = source.crops([0], params=_params(1, cy=19.5, cx=19.5))
    assert torch.equal(batch["instances"][0], torch.from_numpy(many))
    assert batch["valid"].all()


def test_image_and_masks_move_together():
    sample = make_sample(7, shape=(96, 96), n_worms=6)
    union = sample.instances.any(axis=0).astype(np.float32)
    marked = type(sample)(sample.well, np.stack([union, sample.image[1]]), sample.instances)
    batch = DeviceCropSource([marked], crop_size=64, min_pixels=1).crops(
        [0] * 4, torch.Generator().manual_seed(3)
    )
    for image, target in zip(batch["image"], batch["target"]):
        agree = ((image[0] > 0.5) == (target > 0)).float().mean()
        assert agree > 0.97


def test_seeded_crops_are_reproducible_and_seeds_differ():
    data = make_dataset(2, seed=0, shape=(96, 96))
    source = DeviceCropSource(data, crop_size=48)
    first = source.crops([0, 1], torch.Generator().manual_seed(5))
    again = source.crops([0, 1], torch.Generator().manual_seed(5))
    other = source.crops([0, 1], torch.Generator().manual_seed(6))
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["target"], again["target"])
    assert torch.equal(first["instances"], again["instances"]) and torch.equal(first["valid"], again["valid"])
    assert not torch.equal(first["image"], other["image"])


def test_worm_pixels_per_crop_match_the_scipy_path():
    data = make_dataset(4, seed=0, shape=(128, 128))
    n = 400
    dataset = WormCropDataset(data, crop_size=64, length=n, seed=0)
    scipy_items = [dataset[i] for i in range(n)]
    scipy_fraction = np.array([(item["target"] > 0).float().mean().item() for item in scipy_items])
    scipy_worms = np.array([len(item["instances"]) for item in scipy_items])
    loader = DeviceCropLoader(DeviceCropSource(data, crop_size=64), start=0, stop=n // 50, batch_size=50)
    batches = list(loader)
    torch_fraction = torch.cat([(b["target"] > 0).float().mean(dim=(1, 2)) for b in batches]).numpy()
    torch_worms = torch.cat([b["valid"].sum(dim=1) for b in batches]).numpy()
    assert abs(torch_fraction.mean() - scipy_fraction.mean()) < 0.1 * scipy_fraction.mean()
    assert abs(torch_fraction.std() - scipy_fraction.std()) < 0.15 * scipy_fraction.std()
    assert stats.ks_2samp(scipy_fraction, torch_fraction).statistic < 0.12
    assert abs(torch_worms.mean() - scipy_worms.mean()) < 0.1 * scipy_worms.mean()


def test_augment_batch_crops_each_image_of_a_batch():
    data = make_dataset(2, seed=2, shape=(64, 64))
    images = torch.from_numpy(np.stack([s.image for s in data]))
    out = augment_batch(images, [s.instances for s in data], torch.Generator().manual_seed(0), crop_size=32)
    assert out["image"].shape == (2, 2, 32, 32) and out["target"].shape == (2, 32, 32)
    same = augment_batch(images, [s.instances for s in data], torch.Generator().manual_seed(0), crop_size=32)
    assert torch.equal(out["image"], same["image"])
    with pytest.raises(ValueError, match="one instance stack each"):
        augment_batch(images, [data[0].instances], crop_size=32)


def test_many_masks_span_several_words():
    rng = np.random.default_rng(0)
    masks = rng.random((30, 16, 16)) < 0.5
    sample = type(make_sample(0, shape=(16, 16)))("X", rng.random((2, 16, 16)).astype(np.float32), masks)
    source = DeviceCropSource([sample], crop_size=16, min_pixels=0, **OFF)
    assert source.n_words == 2
    np.testing.assert_array_equal(_one(source, _params(cy=7.5, cx=7.5))[1], masks)


def test_loader_batches_are_a_function_of_the_iteration():
    source = DeviceCropSource(make_dataset(3, seed=0, shape=(64, 64)), crop_size=32)
    full = list(DeviceCropLoader(source, start=0, stop=3, batch_size=2, seed=4))
    resumed = list(DeviceCropLoader(source, start=2, stop=3, batch_size=2, seed=4))
    assert torch.equal(full[2]["image"], resumed[0]["image"])
    rank1 = DeviceCropLoader(source, start=0, stop=1, batch_size=2, seed=4, rank=1, world_size=2).batch(0)
    assert torch.equal(
        rank1["image"], DeviceCropLoader(source, start=0, stop=2, batch_size=2, seed=4).batch(1)["image"]
    )
    assert batch_seed(4, 0) != batch_seed(5, 0)


def test_bad_inputs():
    data = make_dataset(1, shape=(32, 32))
    with pytest.raises(ValueError, match="samples is empty"):
        DeviceCropSource([], crop_size=16)
    with pytest.raises(ValueError, match="crop_size"):
        DeviceCropSource(data, crop_size=0)
    with pytest.raises(ValueError, match="indices in"):
        DeviceCropSource(data, crop_size=16).crops([1])
    with pytest.raises(ValueError, match="rank"):
        DeviceCropLoader(DeviceCropSource(data, crop_size=16), start=0, stop=1, batch_size=1, rank=1)


def test_training_selects_the_torch_path_on_request(tmp_path):
    data = make_dataset(2, seed=0, shape=(96, 96))
    cpu = TrainConfig.preset("quick", iterations=2)
    assert not uses_gpu_augment(cpu, torch.device("cpu")) and uses_gpu_augment(cpu, torch.device("cuda"))
    assert not uses_gpu_augment(TrainConfig.preset("quick", gpu_augment=False), "cuda")
    assert isinstance(make_loader(data, cpu), torch.utils.data.DataLoader)  # the default on the CPU
    config = TrainConfig.preset("quick", iterations=2, gpu_augment=True, checkpoint_every=2, log_every=1)
    loader = make_loader(data, config, start=1)
    assert isinstance(loader, DeviceCropLoader) and [tuple(b["image"].shape) for b in loader] == [
        (2, 2, 64, 64)
    ]
    final = train(config, data, tmp_path / "run", progress=False)
    assert final.is_file()
    assert TrainConfig.from_dict(TrainConfig.preset("cpu", gpu_augment=True).to_dict()).gpu_augment is True
    with pytest.raises(ValueError, match="gpu_augment"):
        TrainConfig(gpu_augment="yes")
