"""companion.predict.predict_instances and the `predict` command."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from companion.__main__ import main
from companion.evaluate import predict_deterministic, well_outputs
from companion.metrics import evaluate as instance_metrics
from companion.model import UNet
from companion.predict import predict_instances
from conftest import REPO_ROOT


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


def test_mc_prediction_returns_probabilities_that_binarise_to_the_masks(tiny_concrete):
    image = np.random.default_rng(1).random((2, 32, 48), dtype=np.float32)
    result = predict_instances(tiny_concrete, image, bandwidth=1.0, threshold=1.0, draws=3,
                               binarize_at=0.6)
    assert result.probabilities.dtype == np.float16
    assert result.probabilities.shape == result.masks.shape
    assert np.array_equal(result.probabilities >= np.float16(0.6), result.masks)


@pytest.mark.parametrize("bad, match", [(np.zeros((3, 8, 8)), "shape"), (np.zeros((2, 0, 8)), "shape"),
                                        (np.full((2, 8, 8), np.nan), "NaN")])
def test_bad_images_are_refused(tiny_concrete, bad, match):
    with pytest.raises(ValueError, match=match):
        predict_instances(tiny_concrete, bad, bandwidth=1.0, threshold=1.0)


def test_draws_need_concrete_dropout():
    with pytest.raises(ValueError, match="Concrete Dropout"):
        predict_instances(UNet(base_filters=2, depth=2), np.zeros((2, 8, 8), np.float32),
                          bandwidth=1.0, threshold=1.0, draws=2)


def test_predict_command_reproduces_the_committed_per_image_line(bbbc010_root, tmp_path):
    results = json.loads((REPO_ROOT / "results" / "baseline" / "results.json").read_text())
    row = max(results["rows"], key=lambda r: r["avAP"])["name"]
    with open(REPO_ROOT / "results" / "baseline" / "per_image.csv") as f:
        line = next(r for r in csv.DictReader(f) if r["row"] == row and r["well"] == "C03")
    assert main(["predict", "--pretrained", "baseline", "--wells", "C03", "--data-root",
                 str(bbbc010_root), "--out", str(tmp_path)]) == 0
    saved = np.load(tmp_path / "C03.npz")
    assert (tmp_path / "C03.png").is_file()
    from companion.data import load_bbbc010

    gt = load_bbbc010(bbbc010_root, ["C03"], progress=False)[0].instances
    scored = instance_metrics([gt], [saved["masks"]], [saved["scores"]])["per_image"][0]
    assert len(saved["masks"]) == int(line["n_pred"])
    assert scored["AP50"] == pytest.approx(float(line["AP50"]), abs=1e-9)


def test_predict_command_names_an_unknown_row(bbbc010_root, tmp_path, capsys):
    assert main(["predict", "--pretrained", "baseline", "--row", "nope", "--wells", "C03",
                 "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
