"""Tests of companion.data.augment: geometry against references, mask consistency, dataset and speed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from companion.data.augment import (
    MIN_PIXELS,
    WormCropDataset,
    _bilinear,
    _pad_channels_last,
    _sample_masks,
    augment_sample,
    collate_crops,
    elastic_displacement,
    encode_masks,
)
from companion.data.synthetic import make_dataset, make_sample
from companion.data.targets import three_class_target

OFF = dict(rotate=False, flip=False, elastic=False)


@pytest.fixture(scope="module")
def sample():
    return make_sample(4, shape=(96, 128), n_worms=6)


def _find_window(big: np.ndarray, small: np.ndarray) -> list[tuple[int, int]]:
    """All (y, x) where ``small`` (C, h, w) equals a window of ``big`` (brute force)."""
    _, h, w = small.shape
    return [
        (y, x)
        for y in range(big.shape[1] - h + 1)
        for x in range(big.shape[2] - w + 1)
        if np.array_equal(big[:, y : y + h, x : x + w], small)
    ]


def test_bilinear_matches_scipy():
    rng = np.random.default_rng(0)
    image = rng.random((2, 20, 30)).astype(np.float32)
    cy = rng.uniform(-4, 24, (50, 60)).astype(np.float32)
    cx = rng.uniform(-4, 34, (50, 60)).astype(np.float32)
    ours = _bilinear(_pad_channels_last(image), image.shape[1:], cy, cx)
    ref = np.stack(
        [ndimage.map_coordinates(c, [cy, cx], order=1, mode="grid-constant", cval=0.0) for c in image]
    )
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize(
    "k, words_shape, dtype",
    [
        (0, (1, 99), np.uint8),
        (8, (1, 99), np.uint8),
        (15, (1, 99), np.uint16),
        (33, (1, 99), np.uint64),
        (70, (2, 99), np.uint64),
    ],
)
def test_mask_encoding_roundtrip(k, words_shape, dtype):
    rng = np.random.default_rng(1)
    masks = rng.random((k, 9, 11)) < 0.3
    words = encode_masks(masks)
    assert words.shape == words_shape and words.dtype == dtype
    iy, ix = np.mgrid[-1:10, -1:12]  # includes a ring outside the image
    out = _sample_masks(words, k, (9, 11), iy, ix)
    np.testing.assert_array_equal(out[:, 1:-1, 1:-1], masks)
    assert not out[:, 0].any() and not out[:, -1].any() and not out[:, :, 0].any() and not out[:, :, -1].any()


def test_plain_crop_is_a_window(sample):
    image, masks = augment_sample(
        sample.image, sample.instances, np.random.default_rng(3), crop_size=(40, 56), **OFF
    )
    assert image.shape == (2, 40, 56) and image.dtype == np.float32
    ((y, x),) = _find_window(sample.image, image)
    window = sample.instances[:, y : y + 40, x : x + 56]
    expected = window[
        window.reshape(len(window), -1).sum(1) >= MIN_PIXELS
    ]  # left or tiny instances are dropped
    np.testing.assert_array_equal(masks, expected)


def test_crop_larger_than_image_is_zero_padded(sample):
    image, masks = augment_sample(
        sample.image, sample.instances, np.random.default_rng(0), crop_size=160, **OFF
    )
    assert image.shape == (2, 160, 160)
    ((y, x),) = [w for w in _find_window(image, sample.image)]
    padding = np.ones(image.shape[1:], bool)
    padding[y : y + 96, x : x + 128] = False
    assert not image[:, padding].any() and not masks[:, padding].any()
    np.testing.assert_array_equal(masks[:, y : y + 96, x : x + 128], sample.instances)


def test_flip_gives_one_of_four_flips(sample):
    seen = set()
    for seed in range(12):
        image, masks = augment_sample(
            sample.image,
            sample.instances,
            np.random.default_rng(seed),
            crop_size=(96, 128),
            rotate=False,
            elastic=False,
            flip=True,
        )
        for code, (fy, fx) in enumerate([(1, 1), (1, -1), (-1, 1), (-1, -1)]):
            if np.array_equal(image, sample.image[:, ::fy, ::fx]):
                np.testing.assert_array_equal(masks, sample.instances[:, ::fy, ::fx])
                seen.add(code)
                break
        else:
            pytest.fail("flipped crop is none of the four flips")
    assert len(seen) >= 3


def test_rotation_preserves_area_and_is_random():
    disk = np.zeros((1, 80, 80), bool)
    yy, xx = np.mgrid[0:80, 0:80]
    disk[0] = (yy - 39.5) ** 2 + (xx - 39.5) ** 2 <= 15**2
    bar = np.zeros((1, 80, 80), bool)
    bar[0, 38:42, 10:70] = True
    image = np.stack([disk[0], bar[0]]).astype(np.float32)
    outs = [
        augment_sample(
            image,
            np.concatenate([disk, bar]),
            np.random.default_rng(s),
            crop_size=80,
            rotate=True,
            flip=False,
            elastic=False,
        )
        for s in range(4)
    ]
    for img, masks in outs:
        assert masks.dtype == bool and len(masks) == 2
        assert abs(int(masks[0].sum()) - int(disk.sum())) <= 0.03 * disk.sum()
        assert abs(int(masks[1].sum()) - int(bar.sum())) <= 0.1 * bar.sum()
        assert abs(float(img[0].sum()) - float(disk.sum())) <= 0.03 * disk.sum()
    assert len({tuple(np.flatnonzero(m[1])[:5]) for _, m in outs}) > 1  # different angles


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_and_masks_move_together(sample, seed):
    union = sample.instances.any(0).astype(np.float32)
    image = np.stack([union, sample.image[1]])
    out_image, masks = augment_sample(
        image, sample.instances, np.random.default_rng(seed), crop_size=(64, 80), min_pixels=0
    )
    assert len(masks) == len(sample.instances)
    predicted, actual = out_image[0] > 0.5, masks.any(0)
    iou = (predicted & actual).sum() / max((predicted | actual).sum(), 1)
    assert actual.sum() > 0 and iou > 0.9, iou


def test_deterministic_given_rng(sample):
    a = augment_sample(sample.image, sample.instances, np.random.default_rng(7), crop_size=64)
    b = augment_sample(sample.image, sample.instances, np.random.default_rng(7), crop_size=64)
    c = augment_sample(sample.image, sample.instances, np.random.default_rng(8), crop_size=64)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.instances, b.instances)
    assert not np.array_equal(a.image, c.image)


def test_tiny_instances_are_dropped():
    instances = np.zeros((2, 32, 32), bool)
    instances[0, 0:3, 0:3] = True  # 9 pixels
    instances[1, 10:20, 10:20] = True
    image = np.zeros((2, 32, 32), np.float32)
    _, kept = augment_sample(image, instances, np.random.default_rng(0), crop_size=32, **OFF)
    np.testing.assert_array_equal(kept, instances[1:])
    _, all_kept = augment_sample(
        image, instances, np.random.default_rng(0), crop_size=32, min_pixels=1, **OFF
    )
    np.testing.assert_array_equal(all_kept, instances)
    _, none = augment_sample(image, instances[:0], np.random.default_rng(0), crop_size=16)
    assert none.shape == (0, 16, 16)


def test_elastic_displacement_is_smooth():
    field = elastic_displacement((128, 96), np.random.default_rng(0), spacing=32, sigma=4)
    assert field.shape == (2, 128, 96) and field.dtype == np.float32
    assert 1.0 < field.std() < 8.0
    assert np.abs(np.diff(field, axis=1)).max() < 1.0 and np.abs(np.diff(field, axis=2)).max() < 1.0
    assert not elastic_displacement((16, 16), np.random.default_rng(0), sigma=0).any()
    with pytest.raises(ValueError, match="spacing"):
        elastic_displacement((16, 16), np.random.default_rng(0), spacing=0)


def test_bad_inputs(sample):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"\(C, H, W\).*\(96, 128\)"):
        augment_sample(sample.image[0], sample.instances, rng)
    with pytest.raises(ValueError, match=r"\(3, 96, 127\)"):
        augment_sample(sample.image, np.zeros((3, 96, 127), bool), rng)
    with pytest.raises(ValueError, match="crop_size"):
        augment_sample(sample.image, sample.instances, rng, crop_size=0)


def test_dataset_items_and_determinism():
    samples = make_dataset(3, seed=0, shape=(64, 64), n_worms=(2, 4))
    ds = WormCropDataset(samples, crop_size=32, length=7, seed=5)
    assert len(ds) == 7 and len(WormCropDataset(samples)) == 3
    item = ds[4]
    assert item["image"].shape == (2, 32, 32) and item["image"].dtype == torch.float32
    assert item["instances"].dtype == torch.bool and item["instances"].shape[1:] == (32, 32)
    assert item["target"].dtype == torch.int64
    torch.testing.assert_close(item["target"], three_class_target(item["instances"]))
    again = WormCropDataset(samples, crop_size=32, length=7, seed=5)[4]
    torch.testing.assert_close(item["image"], again["image"])
    torch.testing.assert_close(item["instances"], again["instances"])
    torch.testing.assert_close(ds[-3]["image"], item["image"])
    other_seed = WormCropDataset(samples, crop_size=32, length=7, seed=6)[4]
    assert not torch.equal(item["image"], other_seed["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[4]["image"], item["image"])
    with pytest.raises(IndexError):
        ds[7]
    with pytest.raises(ValueError, match="empty"):
        WormCropDataset([])


def test_dataset_without_augmentation_is_plain_crops():
    samples = make_dataset(1, seed=3, shape=(48, 48))
    item = WormCropDataset(samples, crop_size=32, augment=False)[0]
    assert len(_find_window(samples[0].image, item["image"].numpy())) == 1


def test_dataloader_workers_reproduce_direct_indexing():
    samples = make_dataset(2, seed=1, shape=(48, 48))
    ds = WormCropDataset(samples, crop_size=32, length=4, seed=2)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=2, collate_fn=collate_crops, multiprocessing_context="fork"
    )
    batches = list(loader)
    direct = collate_crops([ds[i] for i in range(2)])
    torch.testing.assert_close(batches[0]["image"], direct["image"])
    torch.testing.assert_close(batches[0]["target"], direct["target"])


def test_collate_crops():
    ds = WormCropDataset(make_dataset(3, shape=(64, 64)), crop_size=32, length=6)
    items = [ds[0], ds[1]]
    batch = collate_crops(items)
    assert batch["image"].shape == (2, 2, 32, 32) and batch["target"].shape == (2, 32, 32)
    counts = [len(item["instances"]) for item in items]
    assert counts[0] != counts[1]  # padding is exercised
    assert batch["instances"].shape == (2, max(counts), 32, 32) and batch["instances"].dtype == torch.bool
    assert batch["valid"].sum(dim=1).tolist() == counts
    for b, item in enumerate(items):
        torch.testing.assert_close(batch["image"][b], item["image"])
        assert torch.equal(batch["instances"][b, : counts[b]], item["instances"])
        assert not batch["instances"][b, counts[b] :].any()
    with pytest.raises(ValueError, match="empty"):
        collate_crops([])
