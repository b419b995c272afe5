"""companion.inference.segmenter (Recipe, Segmenter), the shipped recipes and the `predict` command."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from companion.cli import main
from companion.evaluation.metrics import instance_metrics
from companion.inference.agglomerate import agglomerate, uncertainty_map
from companion.inference.outputs import image_outputs
from companion.inference.recipes import Recipe, read_recipe, read_recipes, recipe_path, save_recipes
from companion.inference.recipes import rows as recipe_rows
from companion.inference.segmenter import Segmenter, segment_compact
from companion.model.unet import UNet


@pytest.fixture
def tiny_concrete():
    torch.manual_seed(0)
    return UNet(base_filters=2, depth=3, embedding_dim=4, dropout="concrete").eval()


def test_deterministic_prediction_is_the_evaluation_path(tiny_concrete):
    image = np.random.default_rng(0).random((2, 32, 48), dtype=np.float32)
    segmenter = Segmenter(tiny_concrete, Recipe(bandwidth=1.0, threshold=1.0))
    result = segmenter(image)
    direct = segment_compact(image_outputs(tiny_concrete, image, draws=0).deterministic, 1.0, 1.0)
    assert np.array_equal(result.masks, direct) and len(result.scores) == len(direct)
    assert result.probabilities is None and result.uncertainty is None and result.passes == ()


def test_flip_augmented_prediction_is_the_flip_augmented_evaluation_path(tiny_concrete):
    image = np.random.default_rng(1).random((2, 32, 48), dtype=np.float32)
    result = Segmenter(tiny_concrete, Recipe(bandwidth=1.0, threshold=1.0, views=4))(image)
    outputs = image_outputs(tiny_concrete, image, draws=0, flips=True)
    assert np.array_equal(result.masks, segment_compact(outputs.deterministic, 1.0, 1.0))
    plain = image_outputs(tiny_concrete, image, draws=0).deterministic
    same_classes = np.array_equal(outputs.deterministic.classes, plain.classes)
    assert not (same_classes and np.array_equal(outputs.deterministic.foreground, plain.foreground))


def test_mc_prediction_returns_probabilities_that_binarise_to_the_masks(tiny_concrete):
    image = np.random.default_rng(1).random((2, 32, 48), dtype=np.float32)
    recipe = Recipe(bandwidth=1.0, threshold=1.0, mc_draws=3, binarize_at=0.6)
    result = Segmenter(tiny_concrete, recipe)(image)
    assert result.probabilities.dtype == np.float16
    assert result.probabilities.shape == result.masks.shape
    assert np.array_equal(result.probabilities >= np.float16(0.6), result.masks)
    assert len(result.passes) == 3 and result.uncertainty.shape == (32, 48)
    assert np.array_equal(result.uncertainty, uncertainty_map(result.agglomeration.probs))


def test_the_steps_are_the_call(tiny_concrete):
    image = np.random.default_rng(3).random((2, 32, 48), dtype=np.float32)
    segmenter = Segmenter(tiny_concrete, Recipe(bandwidth=1.0, threshold=1.0, mc_draws=2))
    outputs = segmenter.network_outputs(image, "C03")
    assert len(outputs.draws) == 2
    seeded = image_outputs(tiny_concrete, image, draws=2, seed=segmenter.recipe.seed_for("C03"))
    assert all(np.array_equal(a.foreground, b.foreground) for a, b in zip(outputs.draws, seeded.draws))
    stepwise, called = segmenter.segment(outputs, "C03"), segmenter(image, "C03")
    assert np.array_equal(stepwise.masks, called.masks) and np.array_equal(stepwise.scores, called.scores)
    with pytest.raises(ValueError, match="agglomerates 3 passes, the outputs hold 2"):
        segmenter.with_recipe(mc_draws=3).segment(outputs)


def test_a_well_of_a_fold_gets_that_folds_settings():
    folds = ((("C03",), 1.0, 2.0), (("C04",), 3.0, 4.0))
    recipe = Recipe(bandwidth=1.5, threshold=1.5, folds=folds)
    assert (recipe.for_image("C04").bandwidth, recipe.for_image("C04").threshold) == (3.0, 4.0)
    assert recipe.for_image("my_image") is recipe and recipe.for_image(None) is recipe
    assert recipe.seed_for("C03") != recipe.seed_for("C04")
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(bandwidth=0.0), "bandwidth=0.0"),
        (dict(views=2), "views=2"),
        (dict(mc_draws=2.5), "mc_draws=2.5"),
        (dict(clustering="kmeans"), "clustering='kmeans'"),
        (dict(binarize_at=1.5), "binarize_at=1.5"),
    ],
)
def test_a_recipe_out_of_range_is_refused_naming_the_setting(changes, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        Recipe(**changes)


def test_a_recipe_file_with_an_unknown_setting_names_it():
    with pytest.raises(ValueError, match=r"x.json: unknown recipe setting\(s\) \['draws'\]"):
        Recipe.from_dict(dict(draws=8), where="x.json")


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
        Segmenter(tiny_concrete)(bad)


def test_draws_need_concrete_dropout_and_views_agglomerate_without_it(tiny_concrete):
    with pytest.raises(ValueError, match="mc_draws=2 needs a model with Concrete Dropout"):
        Segmenter(UNet(base_filters=2, depth=2), Recipe(mc_draws=2))
    with pytest.raises(ValueError, match="agglomerate_views agglomerates the flipped views"):
        Segmenter(tiny_concrete, Recipe(views=4, agglomerate_views=True))


def _committed_line(evaluation: str, row: str, well: str) -> dict:
    with open(REPO_ROOT / "results" / evaluation / "per_image.csv") as f:
        return next(r for r in csv.DictReader(f) if r["row"] == row and r["well"] == well)


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["baseline", "concrete"])
def test_every_shipped_recipe_reproduces_its_committed_per_image_line(bbbc010_root, name):
    from companion.data.bbbc010 import load_bbbc010

    sample = load_bbbc010(bbbc010_root, ["C04"], progress=False)[0]
    shipped = recipe_rows(name)
    assert len(shipped) >= 2 and all("/" in row for row in shipped)
    for row in shipped:
        result = Segmenter.pretrained(name, row)(sample.image, sample.well)
        scored = instance_metrics([sample.instances], [result.masks], [result.scores])["per_image"][0]
        line = _committed_line(*row.split("/"), sample.well)
        assert scored["n_pred"] == int(line["n_pred"]), row
        for key in ("AP50", "avAP", "avAP_dsb"):
            assert scored[key] == pytest.approx(float(line[key]), abs=1e-12), (row, key)


@pytest.mark.parametrize("name", ["baseline", "concrete"])
def test_the_shipped_recipes_are_those_of_the_committed_evaluations(tmp_path, name):
    for results_file in sorted((REPO_ROOT / "results").glob(f"{name}*/results.json")):
        save_recipes(name, json.loads(results_file.read_text()), results_file.parent.name, tmp_path)
    assert json.loads(recipe_path(name, tmp_path).read_text()) == json.loads(recipe_path(name).read_text())
    record = read_recipes(name)
    best = max(record["rows"], key=lambda row: record["rows"][row]["metrics"]["avAP"])
    assert record["best"] == best == recipe_rows(name)[0] and read_recipe(name) == read_recipe(name, best)


def test_an_unknown_row_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"no recipe for row 'nope'; rows: \['baseline_components_flips/"):
        read_recipe("baseline", "nope")


def test_predict_command_uses_the_best_rows_recipe(bbbc010_root, tmp_path, capsys):
    argv = ["predict", "--pretrained", "baseline", "--wells", "C04", "--data-root", str(bbbc010_root)]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    best = recipe_rows("baseline")[0]
    assert f"row {best}" in capsys.readouterr().out
    saved = np.load(tmp_path / "C04.npz")
    assert (tmp_path / "C04.overlay.png").is_file() and "probabilities" in saved  # best row agglomerates
    assert len(saved["masks"]) == int(_committed_line(*best.split("/"), "C04")["n_pred"])


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
    outputs = image_outputs(net, image, draws=8, flips=True)
    hook.remove()
    assert len(outputs.draws) == 4  # the four distinct views, not eight copies
    assert len(calls) == 4  # the same four passes also make the flip-averaged deterministic pass
    averaged = image_outputs(net, image, draws=0, flips=True).deterministic
    for field in ("classes", "embedding", "foreground"):
        assert np.array_equal(getattr(outputs.deterministic, field), getattr(averaged, field))
    assert image_outputs(net, image, draws=8, flips=False).draws == ()
    plain = image_outputs(net, image, draws=0).deterministic  # view 0: the image itself
    assert np.array_equal(outputs.draws[0].classes, plain.classes)
    assert np.array_equal(outputs.draws[0].embedding, plain.embedding)
    mirrored = image_outputs(net, np.ascontiguousarray(image[:, :, ::-1]), draws=0).deterministic
    assert np.array_equal(outputs.draws[1].classes, mirrored.classes[:, ::-1])  # view 1, flipped back
    recipe = Recipe(bandwidth=1.0, threshold=1.0, views=4, agglomerate_views=True)
    result = Segmenter(net, recipe)(image)
    direct = agglomerate([segment_compact(d, 1.0, 1.0) for d in outputs.draws])
    assert np.array_equal(result.agglomeration.probs, direct.probs) and recipe.passes == 4
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

    from companion.training.run_folder import lock_run_folder

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
