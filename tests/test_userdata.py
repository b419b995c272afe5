"""Tests of companion.data.userdata: reading your own images and masks, saving predictions."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from companion.data.bbbc010 import CHANNEL_MAX
from companion.data.userdata import (
    load_user_images,
    match_percentiles,
    read_image,
    read_instances,
    save_prediction,
)


@pytest.fixture
def raw():
    rng = np.random.default_rng(0)
    return rng.integers(0, 4096, (2, 12, 16)).astype(np.uint16)


@pytest.mark.parametrize("layout", ["first", "last"])
def test_read_image_two_channel_tiff_either_channel_axis(tmp_path, raw, layout):
    data = raw if layout == "first" else np.moveaxis(raw, 0, -1)
    tifffile.imwrite(tmp_path / "x.tif", data)
    image = read_image(tmp_path / "x.tif")
    assert image.shape == (2, 12, 16) and image.dtype == np.float32
    np.testing.assert_allclose(image, raw / np.array(CHANNEL_MAX)[:, None, None], rtol=1e-6)


def test_read_image_pair_of_16bit_pngs_with_own_scale(tmp_path, raw):
    for c in range(2):
        Image.fromarray(raw[c]).save(tmp_path / f"w{c + 1}.png")
    image = read_image([tmp_path / "w1.png", tmp_path / "w2.png"], scale=(4095.0, 2000.0))
    np.testing.assert_allclose(image[0], raw[0] / 4095.0, rtol=1e-6)
    np.testing.assert_allclose(image[1], np.clip(raw[1] / 2000.0, 0, 1), rtol=1e-6)
    assert image.max() <= 1.0 and image.min() >= 0.0


@pytest.mark.parametrize("shape", [(12, 16), (3, 12, 16), (12, 16, 3), (2, 2, 12, 16)])
def test_read_image_names_file_and_shape_when_it_does_not_fit(tmp_path, shape):
    tifffile.imwrite(tmp_path / "bad.tif", np.zeros(shape, np.uint16), photometric="minisblack")
    with pytest.raises(ValueError) as err:
        read_image(tmp_path / "bad.tif")
    assert "bad.tif" in str(err.value) and str(shape) in str(err.value)


def test_read_image_single_channel_with_fill_missing_is_brightfield(tmp_path, raw):
    tifffile.imwrite(tmp_path / "bf.tif", raw[1])
    image = read_image(tmp_path / "bf.tif", fill_missing=0.25)
    assert np.all(image[0] == np.float32(0.25))
    np.testing.assert_allclose(image[1], raw[1] / 4095.0, rtol=1e-6)


def test_read_image_pair_of_different_sizes_and_missing_file(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 5), np.uint16))
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((4, 6), np.uint16))
    with pytest.raises(ValueError, match=r"a\.tif.*\(4, 5\).*b\.tif.*\(4, 6\)"):
        read_image([tmp_path / "a.tif", tmp_path / "b.tif"])
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        read_image(tmp_path / "nope.tif")
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match="broken.tif"):
        read_image(tmp_path / "broken.tif")


def test_read_instances_label_image_stack_and_file_per_object(tmp_path):
    labels = np.zeros((6, 8), np.uint8)
    labels[:2, :3], labels[3:, 4:] = 3, 9
    Image.fromarray(labels).save(tmp_path / "labels.png")
    from_labels = read_instances(tmp_path / "labels.png", (6, 8))
    assert from_labels.shape == (2, 6, 8) and from_labels.dtype == bool
    assert from_labels.sum(axis=(1, 2)).tolist() == [6, 12]
    # overlapping objects: a stack keeps both
    stack = np.zeros((2, 6, 8), np.uint8)
    stack[0, :4, :4], stack[1, 2:, 2:] = 1, 255
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    from_stack = read_instances(tmp_path / "stack.tif", (6, 8))
    assert (from_stack[0] & from_stack[1]).sum() == 4
    for k in range(2):
        Image.fromarray(stack[k] * 255).save(tmp_path / f"obj{k}.png")
    from_files = read_instances([tmp_path / "obj0.png", tmp_path / "obj1.png"], (6, 8))
    np.testing.assert_array_equal(from_files, from_stack)
    empty = np.zeros((6, 8), np.uint8)
    Image.fromarray(empty).save(tmp_path / "empty.png")
    assert read_instances(tmp_path / "empty.png", (6, 8)).shape == (0, 6, 8)


def test_read_instances_names_file_and_both_shapes(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", np.zeros((6, 9), np.uint8))
    with pytest.raises(ValueError) as err:
        read_instances(tmp_path / "m.tif", (6, 8))
    assert "m.tif" in str(err.value) and "(6, 9)" in str(err.value) and "(6, 8)" in str(err.value)
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((2, 6, 8), np.uint8))
    with pytest.raises(ValueError, match=r"s\.tif.*\(2, 6, 8\)"):
        read_instances([tmp_path / "s.tif"], (6, 8))  # a stack is not a per-object mask


def test_load_user_images_builds_samples(tmp_path, raw):
    tifffile.imwrite(tmp_path / "one.tif", raw)
    tifffile.imwrite(tmp_path / "w1.tif", raw[0])
    tifffile.imwrite(tmp_path / "w2.tif", raw[1])
    labels = np.zeros((12, 16), np.uint16)
    labels[2:5, 2:9] = 1
    tifffile.imwrite(tmp_path / "one_labels.tif", labels)
    a, b = load_user_images(
        [tmp_path / "one.tif", (tmp_path / "w1.tif", tmp_path / "w2.tif")],
        [tmp_path / "one_labels.tif", None],
    )
    assert (a.well, b.well) == ("one", "w1")
    np.testing.assert_array_equal(a.image, b.image)
    assert a.instances.shape == (1, 12, 16) and b.instances.shape == (0, 12, 16)
    with pytest.raises(ValueError, match="2 images but 1"):
        load_user_images([tmp_path / "one.tif"] * 2, [None])
    assert load_user_images([tmp_path / "one.tif"], names=["mine"])[0].well == "mine"


def test_match_percentiles_maps_onto_the_reference_range():
    rng = np.random.default_rng(1)
    image = rng.random((2, 30, 30)).astype(np.float32) * 0.1  # a dim camera
    reference = 0.3 + 0.4 * rng.random((2, 20, 25)).astype(np.float32)
    out = match_percentiles(image, reference)
    for c in range(2):
        np.testing.assert_allclose(
            np.percentile(out[c], [1, 99]), np.percentile(reference[c], [1, 99]), atol=1e-5
        )
    assert out.min() >= 0 and out.max() <= 1
    flat = match_percentiles(np.zeros((2, 4, 4)), reference)  # a constant channel does not divide by 0
    assert np.isfinite(flat).all()
    with pytest.raises(ValueError):
        match_percentiles(image, reference[:1])


def test_save_prediction_round_trips(tmp_path):
    masks = np.zeros((3, 5, 6), bool)
    masks[0, :2], masks[1, 1:4, 1:3], masks[2, 4] = True, True, True
    unc = np.linspace(0, np.log(2), 30).reshape(5, 6)
    probs = masks * np.float32(0.8)
    paths = save_prediction(tmp_path / "out", "img", masks, unc, probs)
    labels = tifffile.imread(paths["instances"])
    assert labels.shape == (3, 5, 6) and labels.dtype == np.uint16
    np.testing.assert_array_equal(labels != 0, masks)
    assert labels.max(axis=(1, 2)).tolist() == [1, 2, 3]
    png = np.asarray(Image.open(paths["uncertainty"]))
    assert png.dtype == np.uint8 and png[0, 0] == 0 and png[-1, -1] == 255
    np.testing.assert_allclose(tifffile.imread(paths["probabilities"]), probs)
    with pytest.raises(ValueError, match="uncertainty map"):
        save_prediction(tmp_path, "bad", masks, unc[:4])


def test_load_user_images_refuses_a_bare_path_and_an_empty_list(tmp_path):
    with pytest.raises(ValueError, match=r"wrap it in a list, \['img.tif'\]"):
        load_user_images("img.tif")
    with pytest.raises(ValueError, match="images is empty"):
        load_user_images([])
    with pytest.raises(ValueError, match="masks must be a sequence"):
        load_user_images([tmp_path / "a.tif"], tmp_path / "a_mask.tif")


def test_save_prediction_checks_everything_before_writing(tmp_path):
    masks = np.zeros((2, 3, 4), bool)
    masks[0, 0] = True
    with pytest.raises(ValueError, match="uncertainty map has shape"):
        save_prediction(tmp_path / "out", "x", masks, np.zeros((5, 5)))
    with pytest.raises(ValueError, match="probs must be"):
        save_prediction(tmp_path / "out", "x", masks, probs=np.zeros((1, 2, 2)))
    assert not (tmp_path / "out").exists()  # nothing half-written
    for bad in ("../escaped", "a/b", "", ".."):
        with pytest.raises(ValueError, match="plain file-name stem"):
            save_prediction(tmp_path / "out", bad, masks)
    with pytest.raises(ValueError, match="65536 instances do not fit"):
        save_prediction(tmp_path / "out", "many", np.zeros((65536, 1, 1), bool))
    paths = save_prediction(tmp_path / "out", "x", masks, np.zeros((3, 4)), probs=np.zeros((1, 3, 4)))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())


def test_non_finite_pixels_and_settings_are_refused(tmp_path):
    import tifffile

    image = np.zeros((2, 4, 5), np.float32)
    image[1, 2, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", image)
    with pytest.raises(ValueError, match=r"nan.tif' holds 1 NaN or inf pixels"):
        read_image(tmp_path / "nan.tif")
    tifffile.imwrite(tmp_path / "ok.tif", np.zeros((2, 4, 5), np.uint16))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        read_image(tmp_path / "ok.tif", scale=float("nan"))
    tifffile.imwrite(tmp_path / "bf.tif", np.zeros((4, 5), np.uint16))
    with pytest.raises(ValueError, match="fill_missing must be a number in"):
        read_image(tmp_path / "bf.tif", fill_missing=float("nan"))


def test_a_truncated_file_is_named_as_truncated_or_unreadable(tmp_path):
    tifffile.imwrite(tmp_path / "cut.tif", np.zeros((2, 64, 80), np.uint16), photometric="minisblack")
    whole = (tmp_path / "cut.tif").read_bytes()
    for size in (len(whole) // 2, 100, 7):
        (tmp_path / "cut.tif").write_bytes(whole[:size])
        with pytest.raises(
            ValueError, match=r"cannot read image '.*cut\.tif': the file is truncated or unreadable"
        ):
            read_image(tmp_path / "cut.tif")
    noise = np.random.default_rng(0).integers(0, 256, (40, 50)).astype(np.uint8)  # incompressible
    Image.fromarray(noise).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut\.png': the file is truncated or unreadable"):
        read_image(tmp_path / "cut.png", fill_missing=0.0)


def test_an_empty_image_is_refused_naming_the_file_and_shape(tmp_path):
    with pytest.warns(UserWarning):  # tifffile: a zero-size array makes a nonconformant TIFF
        tifffile.imwrite(tmp_path / "none.tif", np.zeros((2, 0, 5), np.uint16), photometric="minisblack")
        tifffile.imwrite(tmp_path / "flat.tif", np.zeros((0, 5), np.uint16), photometric="minisblack")
    with pytest.raises(ValueError, match=r"none\.tif' holds an empty image of shape \(0, 5\)"):
        read_image(tmp_path / "none.tif")
    with pytest.raises(ValueError, match=r"flat\.tif' holds an empty image of shape \(0, 5\)"):
        read_image(tmp_path / "flat.tif", fill_missing=0.0)
    with pytest.raises(ValueError, match=r"flat\.tif, .*flat\.tif' holds an empty image"):
        read_image([tmp_path / "flat.tif", tmp_path / "flat.tif"])


def test_intensities_follow_the_file_type_and_odd_images_are_named(tmp_path):
    from companion.data.userdata import auto_scale

    rng = np.random.default_rng(1)
    counts = rng.integers(0, 4096, (2, 12, 16)).astype(np.uint16)  # a 12-bit camera, BBBC010's
    counts[1, 0, 0] = 4095
    tifffile.imwrite(tmp_path / "camera.tif", counts)
    tifffile.imwrite(tmp_path / "unit.tif", (counts / np.float32(4095)).astype(np.float32))
    tifffile.imwrite(tmp_path / "full16.tif", (counts.astype(np.uint32) * 16).astype(np.uint16))
    Image.fromarray((counts[1] // 16).astype(np.uint8)).save(tmp_path / "bf8.png")
    camera = read_image(tmp_path / "camera.tif")
    np.testing.assert_allclose(read_image(tmp_path / "unit.tif"), camera, atol=1e-6)  # floats as they are
    np.testing.assert_allclose(read_image(tmp_path / "full16.tif"), camera * 16 * 4095 / 65535, rtol=1e-5)
    eight = read_image(tmp_path / "bf8.png", fill_missing=0.0)
    np.testing.assert_allclose(eight[1], (counts[1] // 16) / 255.0, rtol=1e-6)
    assert [auto_scale(a) for a in (counts, counts * 16, np.float32(2.0), np.uint8(1))] == [
        4095,
        65535,
        1,
        255,
    ]
    with pytest.warns(UserWarning, match=r"full16\.tif: \d+% of its w2 brightfield pixels clip at 1\.0"):
        read_image(tmp_path / "full16.tif", scale=4095)  # 16-bit data as if 12-bit
    tifffile.imwrite(tmp_path / "dim.tif", (counts // 64).astype(np.uint16))
    with pytest.warns(
        UserWarning, match=r"dim\.tif: its brightfield is nearly black \(99th percentile 0\.01"
    ):
        read_image(tmp_path / "dim.tif")
    tifffile.imwrite(tmp_path / "flat.tif", np.full((2, 12, 16), 700, np.uint16))
    with pytest.warns(UserWarning, match=r"flat\.tif: its w1 fluorescence channel is constant"):
        read_image(tmp_path / "flat.tif")
    with pytest.raises(ValueError, match="scale must be 'auto'"):
        read_image(tmp_path / "camera.tif", scale="bright")


def test_a_segmenter_warns_about_unscaled_counts():
    import torch

    from companion.inference.recipes import Recipe
    from companion.inference.segmenter import Segmenter
    from companion.model.unet import UNet

    torch.manual_seed(0)
    net = UNet(base_filters=2, depth=2, embedding_dim=4)
    counts = np.full((2, 16, 16), 1200.0, np.float32)
    with pytest.warns(UserWarning, match=r"span \[1200, 1200\], the models expect \[0, 1\]"):
        Segmenter(net, Recipe(bandwidth=1.0, threshold=1.0))(counts)
