"""Tests of companion.data.bbbc010: constants, layouts, the loader's errors, the download, and the real data."""

from __future__ import annotations

import functools
import http.server
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from companion.data import bbbc010 as data
from companion.data.bbbc010 import (
    CHANNEL_MAX,
    TEST_FOLDS,
    TEST_WELLS,
    TRAIN_WELLS,
    WELLS,
    CorruptFileError,
    IncompleteWellError,
    Sample,
    fetch_bbbc010,
    find_layout,
    load_bbbc010,
    normalize,
    resolve_root,
)

SHAPE = (12, 16)


# ---------------------------------------------------------------- fake copies written by the tests


def _raw(well: str, channel: str) -> np.ndarray:
    seed = WELLS.index(well) * 2 + (channel == "w2")
    return np.random.default_rng(seed).integers(80, 4096, SHAPE).astype(np.uint16)


def _mask(well: str, number: int) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[number % SHAPE[0], :] = True
    mask[:, (WELLS.index(well) + number) % SHAPE[1]] = True
    return mask


def write_copy(images: Path, masks: Path, wells: dict[str, list[int]], *, channels=("w1", "w2")) -> None:
    """BBBC010-like files: official-style TIFF names and ``<WELL>_NN_ground_truth.png`` masks."""
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for well, numbers in wells.items():
        for ch in channels:
            tifffile.imwrite(
                images / f"1649_1109_0003_Amp5-1_B_20070424_{well}_{ch}_0A1B2C.tif", _raw(well, ch)
            )
        for n in numbers:
            Image.fromarray(_mask(well, n).astype(np.uint8) * 255).save(
                masks / f"{well}_{n:02d}_ground_truth.png"
            )


@pytest.fixture
def flat_copy(tmp_path) -> Path:
    write_copy(tmp_path / "images", tmp_path / "masks_eachworm", {"A01": [1, 2, 10], "A02": [3], "B05": []})
    return tmp_path


# ---------------------------------------------------------------- constants


def test_well_constants():
    assert len(WELLS) == 100 == len(set(WELLS))
    assert WELLS[0] == "A01" and WELLS[23] == "A24" and WELLS[24] == "B01" and WELLS[-1] == "E04"
    rows = {"A": 24, "B": 24, "C": 24, "D": 24, "E": 4}
    assert all(sum(w[0] == r for w in WELLS) == n for r, n in rows.items())
    assert TRAIN_WELLS[-2:] == ("C01", "C02") and len(TRAIN_WELLS) == 50
    assert TEST_WELLS[0] == "C03" and len(TEST_WELLS) == 50
    assert set(TRAIN_WELLS).isdisjoint(TEST_WELLS) and set(TRAIN_WELLS) | set(TEST_WELLS) == set(WELLS)


def test_test_folds_partition_the_test_set():
    fold1, fold2 = TEST_FOLDS
    assert len(fold1) == len(fold2) == 25
    assert set(fold1).isdisjoint(fold2) and set(fold1) | set(fold2) == set(TEST_WELLS)
    assert fold1[:3] == ("C03", "C06", "C07") and fold2[-1] == "E04"


def test_normalize_uses_fixed_range():
    raw = np.array([[0, 2048, 4095, 65535]], dtype=np.uint16)
    for channel in (0, 1):
        out = normalize(raw, channel)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, np.clip(raw / CHANNEL_MAX[channel], 0, 1), rtol=1e-6)
    dim = np.full((2, 2), 100, np.uint16)
    assert normalize(dim, 0).max() < 0.05  # not stretched to 1 like a per-image min/max would


def test_sample_validates_shapes():
    with pytest.raises(ValueError, match=r"\(2, H, W\).*\(3, 4, 4\)"):
        Sample("X", np.zeros((3, 4, 4), np.float32), np.zeros((0, 4, 4), bool))
    with pytest.raises(ValueError, match=r"\(1, 4, 5\)"):
        Sample("X", np.zeros((2, 4, 4), np.float32), np.zeros((1, 4, 5), bool))
    assert "float32[2, 4, 4]" in repr(Sample("X", np.zeros((2, 4, 4), np.float32), np.zeros((0, 4, 4), bool)))


# ---------------------------------------------------------------- loading a fake copy


def test_load_flat_layout(flat_copy):
    samples = load_bbbc010(flat_copy, wells=["A02", "A01", "B05"], progress=False)
    assert [s.well for s in samples] == ["A02", "A01", "B05"]
    a01 = samples[1]
    assert a01.image.dtype == np.float32 and a01.image.shape == (2,) + SHAPE
    np.testing.assert_allclose(a01.image[0], _raw("A01", "w1") / CHANNEL_MAX[0], rtol=1e-6)
    np.testing.assert_allclose(a01.image[1], _raw("A01", "w2") / CHANNEL_MAX[1], rtol=1e-6)
    assert a01.instances.dtype == bool
    np.testing.assert_array_equal(
        a01.instances, np.stack([_mask("A01", n) for n in (1, 2, 10)])
    )  # numeric order
    assert samples[2].instances.shape == (0,) + SHAPE  # a well without masks


def test_load_official_nested_layout(tmp_path):
    write_copy(
        tmp_path / "x.unzip" / "BBBC010_v2_images",
        tmp_path / "y.unzip" / "BBBC010_v1_foreground_eachworm",
        {"C03": [1, 2]},
    )
    layout = find_layout(tmp_path)
    assert layout.images.name == "BBBC010_v2_images" and layout.masks.name == "BBBC010_v1_foreground_eachworm"
    (sample,) = load_bbbc010(tmp_path, wells=["C03"])
    assert sample.instances.shape == (2,) + SHAPE


def test_foreground_folder_is_not_a_mask_folder(tmp_path):
    write_copy(tmp_path / "images", tmp_path / "foreground", {"A01": [1]})
    with pytest.raises(FileNotFoundError, match="masks_eachworm"):
        find_layout(tmp_path)


def test_root_without_layout(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(FileNotFoundError, match=r"BBBC010_v2_images.*masks_eachworm"):
        load_bbbc010(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_layout(tmp_path / "missing")


def test_unknown_well(flat_copy):
    with pytest.raises(ValueError, match=r"unknown well id\(s\) \['Z99'\].*A01, A02"):
        load_bbbc010(flat_copy, wells=["A01", "Z99"])
    with pytest.raises(ValueError, match="wells is empty"):
        load_bbbc010(flat_copy, wells=[])


def test_missing_channel_raises_or_skips(tmp_path):
    write_copy(
        tmp_path / "images", tmp_path / "masks_eachworm", {"A01": [1], "D24": [1, 2]}, channels=("w1",)
    )
    write_copy(tmp_path / "images", tmp_path / "masks_eachworm", {"A01": [1]}, channels=("w2",))
    with pytest.raises(IncompleteWellError, match=r"D24.*w2.*\*_D24_w2_\*\.tif"):
        load_bbbc010(tmp_path, wells=["A01", "D24"], progress=False)
    assert issubclass(IncompleteWellError, FileNotFoundError)
    with pytest.warns(UserWarning, match="D24"):
        samples = load_bbbc010(tmp_path, wells=["A01", "D24"], skip_incomplete=True, progress=False)
    assert [s.well for s in samples] == ["A01"]


def test_corrupt_tiff_names_the_file(flat_copy):
    path = next((flat_copy / "images").glob("*_A01_w2_*.tif"))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(CorruptFileError, match=path.name):
        load_bbbc010(flat_copy, wells=["A01"])


def test_tiff_with_wrong_dimensions(flat_copy):
    path = next((flat_copy / "images").glob("*_A01_w1_*.tif"))
    tifffile.imwrite(path, np.zeros((3,) + SHAPE, np.uint16), photometric="minisblack")
    with pytest.raises(CorruptFileError, match=r"2-D.*\(3, 12, 16\)"):
        load_bbbc010(flat_copy, wells=["A01"])


def test_corrupt_png_names_the_file(flat_copy):
    path = flat_copy / "masks_eachworm" / "A01_02_ground_truth.png"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(CorruptFileError, match="A01_02_ground_truth.png"):
        load_bbbc010(flat_copy, wells=["A01"])


def test_mask_shape_mismatch_gives_both_shapes(flat_copy):
    Image.fromarray(np.zeros((10, 16), np.uint8)).save(
        flat_copy / "masks_eachworm" / "A02_03_ground_truth.png"
    )
    with pytest.raises(ValueError, match=r"A02_03_ground_truth.png.*\(10, 16\).*\(12, 16\)"):
        load_bbbc010(flat_copy, wells=["A02"])


def test_root_resolution(flat_copy, tmp_path_factory, monkeypatch):
    other = tmp_path_factory.mktemp("other")
    monkeypatch.setenv("BBBC010_ROOT", str(flat_copy))
    assert resolve_root() == flat_copy
    assert resolve_root(other) == other  # the argument wins over the environment
    assert load_bbbc010(wells=["A02"])[0].instances.shape == (1,) + SHAPE
    monkeypatch.delenv("BBBC010_ROOT")
    monkeypatch.setattr(data, "default_cache_dir", lambda: other / "cache")
    with pytest.raises(FileNotFoundError):
        resolve_root(download=False)


# ---------------------------------------------------------------- download from a local server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def zip_server(tmp_path):
    """Serve BBBC010-shaped zips of two wells from 127.0.0.1; yields (base_url, request log)."""
    src = tmp_path / "src"
    write_copy(src / "BBBC010_v2_images", src / "BBBC010_v1_foreground_eachworm", {"A01": [1, 2], "E04": [5]})
    site = tmp_path / "site" / "bbbc"
    site.mkdir(parents=True)
    for archive, folder in (
        (data.IMAGES_ZIP, "BBBC010_v2_images"),
        (data.MASKS_ZIP, "BBBC010_v1_foreground_eachworm"),
    ):
        with zipfile.ZipFile(site / archive, "w") as zf:
            for f in sorted((src / folder).iterdir()):
                zf.write(f, f"{folder}/{f.name}")
    handler = type("Handler", (_QuietHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path / "site"))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/bbbc/", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_fetch_downloads_unzips_and_caches(zip_server, tmp_path):
    base_url, requests = zip_server
    cache = tmp_path / "cache"
    root = fetch_bbbc010(cache, base_url, progress=False)
    assert sorted(requests) == sorted(["/bbbc/" + data.IMAGES_ZIP, "/bbbc/" + data.MASKS_ZIP])
    samples = load_bbbc010(root, wells=["A01", "E04"], progress=False)
    np.testing.assert_array_equal(samples[0].instances, np.stack([_mask("A01", 1), _mask("A01", 2)]))
    np.testing.assert_allclose(samples[1].image[1], _raw("E04", "w2") / CHANNEL_MAX[1], rtol=1e-6)
    fetch_bbbc010(cache, base_url.rstrip("/"), progress=False)
    assert len(requests) == 2  # cached: nothing downloaded again


def test_load_without_root_downloads_to_cache(zip_server, tmp_path, monkeypatch):
    base_url, requests = zip_server
    monkeypatch.delenv("BBBC010_ROOT", raising=False)
    monkeypatch.setattr(data, "default_cache_dir", lambda: tmp_path / "oscache")
    monkeypatch.setattr(data, "BASE_URL", base_url)
    (sample,) = load_bbbc010(wells=["E04"], progress=False)
    assert sample.instances.shape == (1,) + SHAPE and len(requests) == 2
    assert resolve_root() == tmp_path / "oscache"  # now found in the cache without a download
    assert len(requests) == 2


def test_fetch_failure_names_the_url_and_the_way_out(zip_server, tmp_path):
    base_url, requests = zip_server
    missing = base_url + "nowhere/"  # the server answers 404
    with pytest.raises(data.BBBC010DownloadError, match=r"nowhere/BBBC010_v2_images\.zip.*BBBC010_ROOT"):
        fetch_bbbc010(tmp_path / "cache", missing, progress=False)
    assert requests == ["/bbbc/nowhere/" + data.IMAGES_ZIP]
    assert not (tmp_path / "cache" / data.IMAGES_ZIP).exists()  # nothing half-written is left


# ---------------------------------------------------------------- the real BBBC010 copy

INCOMPLETE = ("C13", "C14", "D24")


@pytest.mark.realdata
def test_real_data_acceptance(bbbc010_root):
    layout = find_layout(bbbc010_root)
    all_masks = sorted(layout.masks.glob("*_ground_truth.png"))
    skipped_masks = [p for p in all_masks if p.name[:3] in INCOMPLETE]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = load_bbbc010(bbbc010_root, skip_incomplete=True, progress=False)
    assert any(all(w in str(c.message) for w in INCOMPLETE) for c in caught)
    assert len(samples) == 97 and not {s.well for s in samples} & set(INCOMPLETE)
    assert sum(len(s.instances) for s in samples) == len(all_masks) - len(skipped_masks)
    assert all(s.image.shape == (2, 520, 696) and s.image.dtype == np.float32 for s in samples)
    assert all(0.0 <= s.image.min() and s.image.max() <= 1.0 for s in samples)
    assert all(s.instances.dtype == bool and s.instances.shape[1:] == (520, 696) for s in samples)


@pytest.mark.realdata
def test_real_well_matches_files(bbbc010_root):
    (a01,) = load_bbbc010(bbbc010_root, wells=["A01"])
    layout = find_layout(bbbc010_root)
    raw = tifffile.imread(next(layout.images.glob("*_A01_w1_*.tif")))
    np.testing.assert_allclose(a01.image[0], raw / CHANNEL_MAX[0], rtol=1e-6)
    pngs = sorted(layout.masks.glob("A01_*_ground_truth.png"))
    expected = np.stack([np.asarray(Image.open(p)) > 0 for p in pngs])
    np.testing.assert_array_equal(a01.instances, expected)
    # the worms are visible: darker in brightfield than the well around them
    worms = a01.instances.any(0)
    around = ndimage.binary_dilation(worms, iterations=8) & ~worms
    assert a01.image[1][worms].mean() < a01.image[1][around].mean() - 0.1


@pytest.mark.realdata
@pytest.mark.parametrize("well, channel", [("C13", "w1"), ("D24", "w2")])
def test_real_incomplete_wells_raise(bbbc010_root, well, channel):
    with pytest.raises(IncompleteWellError, match=f"{well}.*{channel}"):
        load_bbbc010(bbbc010_root, wells=[well])


def test_progress_bar_only_when_asked(flat_copy, capsys):
    load_bbbc010(flat_copy, wells=["A01", "A02"], progress=True)
    assert "loading BBBC010" in capsys.readouterr().err
    load_bbbc010(flat_copy, wells=["A01", "A02"], progress=False)
    assert "loading BBBC010" not in capsys.readouterr().err


def test_a_nan_pixel_in_a_float_tiff_names_the_file(flat_copy):
    path = next((flat_copy / "images").glob("*_A02_w1_*.tif"))
    raw = tifffile.imread(path).astype(np.float32)
    raw[0, 0] = np.nan
    tifffile.imwrite(path, raw)
    with pytest.raises(CorruptFileError, match=r"A02_w1.*holds 1 NaN or inf pixels"):
        load_bbbc010(flat_copy, wells=["A02"], progress=False)


def test_an_all_zero_mask_is_dropped_with_a_warning_naming_it(flat_copy):
    empty = flat_copy / "masks_eachworm" / "A01_02_ground_truth.png"
    Image.fromarray(np.zeros(SHAPE, np.uint8)).save(empty)
    with pytest.warns(
        UserWarning, match=r"A01_02_ground_truth\.png' is all zero \(no worm pixel\): dropped from well A01"
    ):
        (a01,) = load_bbbc010(flat_copy, wells=["A01"], progress=False)
    np.testing.assert_array_equal(a01.instances, np.stack([_mask("A01", n) for n in (1, 10)]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # wells with only drawn masks load silently
        assert len(load_bbbc010(flat_copy, wells=["A02"], progress=False)[0].instances) == 1


def test_a_truncated_tiff_says_so(flat_copy):
    path = next((flat_copy / "images").glob("*_A02_w1_*.tif"))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match=rf"{path.name}': the file is truncated or unreadable"):
        load_bbbc010(flat_copy, wells=["A02"], progress=False)
