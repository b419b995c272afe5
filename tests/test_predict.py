"""companion.predict.predict_instances and the `predict` command."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from companion.cli import main
from companion.metrics import instance_metrics
from companion.model import UNet
from companion.outputs import well_outputs
from companion.predict import predict_agglomerated, predict_deterministic, predict_instances


@pytest.fixture
def tiny_concrete():
    torch.manual_seed(0)
    return UNet(base_filters=2, depth=3, embedding_dim=4, dropout="concrete").eval()


def test_deterministic_prediction_is_the_evaluation_path(tiny_concrete):
    image = np.random.default_rng(0).random((2, 32, 48), dtype=np.float32)
    result = predict_instances(tiny_concrete, image, bandwidth=1.0, threshold=1.0)
    masks, scores = predict_deterministic(well_outputs(tiny_concrete, image, draws=0), 1.0, 1.0)
    assert np.array_equal(result.masks, masks) and np.allclose(result.scores, scores)
    assert result.probabilities is None


def test_flip_augmented_prediction_is_the_flip_augmented_evaluation_path(tiny_concrete):
    image = np.random.default_rng(1).random((2, 32, 48), dtype=np.float32)
    result = predict_instances(tiny_concrete, image, bandwidth=1.0, threshold=1.0, flips=True)
    outputs = well_outputs(tiny_concrete, image, draws=0, flips=True)
    masks, scores = predict_deterministic(outputs, 1.0, 1.0)
    assert np.array_equal(result.masks, masks) and np.allclose(result.scores, scores)
    plain = well_outputs(tiny_concrete, image, draws=0).deterministic
    same_classes = np.array_equal(outputs.deterministic.classes, plain.classes)
    assert not (same_classes and np.array_equal(outputs.deterministic.foreground, plain.foreground))


def test_mc_prediction_returns_probabilities_that_binarise_to_the_masks(tiny_concrete):
    image = np.random.default_rng(1).random((2, 32, 48), dtype=np.float32)
    result = predict_instances(tiny_concrete, image, bandwidth=1.0, threshold=1.0, draws=3, binarize_at=0.6)
    assert result.probabilities.dtype == np.float16
    assert result.probabilities.shape == result.masks.shape
    assert np.array_equal(result.probabilities >= np.float16(0.6), result.masks)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((3, 8, 8)), r"shape \(3, 8, 8\), but the model expects a \(2, H, W\) array.*2 channels"),
        (np.zeros((8, 8, 2)), r"shape \(8, 8, 2\), but the model expects a \(2, H, W\)"),
        (np.zeros((2, 0, 8)), r"shape \(2, 0, 8\), but the model expects .* H, W >= 1"),
        (np.zeros((2, 0, 0)), r"shape \(2, 0, 0\)"),
        (np.zeros((0,)), r"shape \(0,\)"),
        (np.full((2, 8, 8), np.nan), "NaN"),
    ],
)
def test_bad_images_are_refused(tiny_concrete, bad, match):
    with pytest.raises(ValueError, match=match):
        predict_instances(tiny_concrete, bad, bandwidth=1.0, threshold=1.0)


def test_draws_need_concrete_dropout():
    with pytest.raises(ValueError, match="Concrete Dropout"):
        predict_instances(
            UNet(base_filters=2, depth=2),
            np.zeros((2, 8, 8), np.float32),
            bandwidth=1.0,
            threshold=1.0,
            draws=2,
        )


@pytest.mark.parametrize("folder", ["baseline", "baseline_components_flips"])
def test_predict_command_reproduces_the_committed_per_image_line(bbbc010_root, tmp_path, folder):
    results = json.loads((REPO_ROOT / "results" / folder / "results.json").read_text())
    assert results["settings"].get("flips", False) is folder.endswith("_flips")  # both paths covered
    row = max(results["rows"], key=lambda r: r["avAP"])["name"]
    with open(REPO_ROOT / "results" / folder / "per_image.csv") as f:
        line = next(r for r in csv.DictReader(f) if r["row"] == row and r["well"] == "C03")
    assert (
        main(
            [
                "predict",
                "--pretrained",
                "baseline",
                "--results",
                str(REPO_ROOT / "results" / folder / "results.json"),
                "--wells",
                "C03",
                "--data-root",
                str(bbbc010_root),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    saved = np.load(tmp_path / "C03.npz")
    assert (tmp_path / "C03.overlay.png").is_file()
    from companion.data import load_bbbc010

    gt = load_bbbc010(bbbc010_root, ["C03"], progress=False)[0].instances
    scored = instance_metrics([gt], [saved["masks"]], [saved["scores"]])["per_image"][0]
    assert len(saved["masks"]) == int(line["n_pred"])
    assert scored["AP50"] == pytest.approx(float(line["AP50"]), abs=1e-9)


def test_predict_command_names_an_unknown_row(bbbc010_root, tmp_path, capsys):
    assert (
        main(
            ["predict", "--pretrained", "baseline", "--row", "nope", "--wells", "C03", "--out", str(tmp_path)]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["three channels", "rgb", "empty", "truncated"])
def test_predict_command_refuses_an_unusable_image_file_in_one_line(tmp_path, capsys, case):
    import tifffile

    path = tmp_path / f"{case.replace(' ', '_')}.tif"
    if case == "three channels":
        tifffile.imwrite(path, np.zeros((3, 12, 16), np.uint16), photometric="minisblack")
        expected = r"\(3, 12, 16\); expected a two-channel image"
    elif case == "rgb":
        tifffile.imwrite(path, np.zeros((12, 16, 3), np.uint8), photometric="rgb")
        expected = r"\(12, 16, 3\); expected a two-channel image"
    elif case == "empty":
        with pytest.warns(UserWarning):  # tifffile: a zero-size array makes a nonconformant TIFF
            tifffile.imwrite(path, np.zeros((2, 0, 16), np.uint16), photometric="minisblack")
        expected = r"empty image of shape \(0, 16\)"
    else:
        tifffile.imwrite(path, np.zeros((2, 64, 80), np.uint16), photometric="minisblack")
        path.write_bytes(path.read_bytes()[:5000])
        expected = "the file is truncated or unreadable"
    assert (
        main(["predict", "--pretrained", "baseline", "--images", str(path), "--out", str(tmp_path / "out")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and path.name in err and err.count("\n") == 1, err
    assert re.search(expected, err), err
    assert not list((tmp_path / "out").glob("*.npz"))


def test_flipped_passes_of_a_model_without_dropout_take_the_place_of_draws():
    torch.manual_seed(0)
    net = UNet(base_filters=2, depth=3, embedding_dim=4).eval()  # no dropout
    image = np.random.default_rng(2).random((2, 32, 48), dtype=np.float32)
    calls = []
    hook = net.register_forward_hook(lambda *_: calls.append(1))
    outputs = well_outputs(net, image, draws=8, flips=True)
    hook.remove()
    assert len(outputs.draws) == 4  # the four distinct views, not eight copies
    assert len(calls) == 4  # the same four passes also make the flip-averaged deterministic pass
    averaged = well_outputs(net, image, draws=0, flips=True).deterministic
    for field in ("classes", "embedding", "foreground"):
        assert np.array_equal(getattr(outputs.deterministic, field), getattr(averaged, field))
    assert well_outputs(net, image, draws=8, flips=False).draws == ()
    plain = well_outputs(net, image, draws=0).deterministic  # view 0: the image itself
    assert np.array_equal(outputs.draws[0].classes, plain.classes)
    assert np.array_equal(outputs.draws[0].embedding, plain.embedding)
    mirrored = well_outputs(net, np.ascontiguousarray(image[:, :, ::-1]), draws=0).deterministic
    assert np.array_equal(outputs.draws[1].classes, mirrored.classes[:, ::-1])  # view 1, flipped back
    result = predict_instances(net, image, bandwidth=1.0, threshold=1.0, draws=4, flips=True)
    masks, scores, _ = predict_agglomerated(outputs, 1.0, 1.0)
    assert np.array_equal(result.masks, masks) and np.allclose(result.scores, scores)
    assert result.probabilities is not None and result.probabilities.shape == result.masks.shape


def test_predict_command_never_overwrites_an_input_or_another_output(tmp_path, capsys):
    import tifffile

    image = np.zeros((2, 32, 48), np.uint16)
    for name in ("a/x.tif", "b/x.tif", "y.tif", "y.tiff"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / name, image, photometric="minisblack")
    before = (tmp_path / "y.tif").read_bytes()
    for inputs in (["a/x.tif", "b/x.tif"], ["y.tif", "y.tiff"]):
        argv = ["predict", "--pretrained", "baseline", "--out", str(tmp_path / "out")]
        assert main(argv + ["--images", *(str(tmp_path / p) for p in inputs)]) == 2
        err = capsys.readouterr().err
        assert "share the name" in err and err.count("\n") == 1, err
    argv = [
        "predict",
        "--pretrained",
        "baseline",
        "--images",
        str(tmp_path / "y.tif"),
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0  # into the input's own folder
    assert (tmp_path / "y.tif").read_bytes() == before and (tmp_path / "y.overlay.png").is_file()
    assert sorted(p.name for p in tmp_path.glob("y.*")) == ["y.npz", "y.overlay.png", "y.tif", "y.tiff"]


def test_a_busy_output_folder_is_refused_in_one_line(tmp_path, capsys):
    import os

    import tifffile

    from companion.run_folder import lock_run_folder

    tifffile.imwrite(tmp_path / "x.tif", np.zeros((2, 32, 48), np.uint16), photometric="minisblack")
    out = tmp_path / "out"
    with lock_run_folder(out, purpose="evaluation"):  # another command writes there
        argv = ["predict", "--pretrained", "baseline", "--images", str(tmp_path / "x.tif"), "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out} is in use by another prediction process (pid {os.getpid()}")
        assert main(["evaluate", "--pretrained", "baseline", "--synthetic", "2", "--out", str(out)]) == 2
        assert "in use by another evaluation process" in capsys.readouterr().err
    assert not list(out.glob("*.npz"))


def test_an_interrupt_ends_a_command_in_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("companion.cli.evaluate._evaluate_locked", interrupted)
    assert main(["evaluate", "--pretrained", "baseline", "--synthetic", "2", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted;") and "results.json" in err and err.count("\n") == 1
