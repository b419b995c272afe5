"""Pretrained weights: export (scripts/export_pretrained.py) and companion.pretrained.load."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from companion import pretrained
from companion.book import chapters
from companion.data.synthetic import make_dataset
from companion.model.dropout import dropout_rates
from companion.training import export as export_module
from companion.training.checkpoint import load_model
from companion.training.config import TrainConfig
from companion.training.run_folder import TERM_NAMES, read_log
from companion.training.train import train


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "export_pretrained", REPO_ROOT / "scripts" / "export_pretrained.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_main = _load_script().main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig.preset("quick", iterations=4, crop_size=32, checkpoint_every=2, log_every=2)
    train(config, make_dataset(2, seed=0, shape=(96, 96)), out, progress=False)
    return out


@pytest.fixture(scope="module")
def shelf(run_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shelf")
    assert (
        export_main(
            [
                "--checkpoint",
                str(run_dir / "final.pt"),
                "--name",
                "concrete",
                "--out-dir",
                str(folder),
                "--command",
                "python -m companion train --preset quick",
            ]
        )
        == 0
    )
    return folder


def _outputs(model, seed=0):
    x = torch.from_numpy(np.random.default_rng(seed).random((1, 2, 64, 48), dtype=np.float32))
    with torch.no_grad():
        return model(x)


def test_loaded_model_computes_what_the_trained_one_does_to_fp16_precision(run_dir, shelf):
    original = load_model(run_dir / "final.pt")
    loaded = pretrained.load("concrete", directory=shelf)
    assert not loaded.training and all(p.dtype == torch.float32 for p in loaded.parameters())
    # exactly the trained weights rounded to float16 ...
    rounded = load_model(run_dir / "final.pt")
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    for a, b in zip(_outputs(loaded), _outputs(rounded)):
        assert torch.equal(a, b)
    # ... which changes the outputs by float16 rounding only
    for a, b in zip(_outputs(loaded), _outputs(original)):
        assert not torch.equal(a, b)
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * float(b.abs().max()))


def test_provenance_records_the_run(run_dir, shelf):
    record = pretrained.provenance("concrete", shelf)
    weights = shelf / "concrete.pt"
    assert record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["size_bytes"] == weights.stat().st_size < export_module.MAX_BYTES
    assert record["iterations"] == 4 and record["dtype"] == "float16"
    assert record["command"] == "python -m companion train --preset quick"
    assert record["preset"] == "quick" and record["overrides"] == {
        "iterations": 4,
        "crop_size": 32,
        "checkpoint_every": 2,
    }
    log = read_log(run_dir)
    assert record["final_loss_terms"] == {k: log[-1][k] for k in TERM_NAMES}
    assert record["training_time_s"] == pytest.approx(sum(2 / r["it_per_s"] for r in log))
    assert record["dropout_rates"] == pytest.approx(dropout_rates(load_model(run_dir / "final.pt")))
    assert len(record["dropout_rates"]) > 0 and record["model"] == "concrete"
    assert record["parameters"] == sum(p.numel() for p in load_model(run_dir / "final.pt").parameters())
    assert {"platform", "torch_threads", "cuda"} <= set(record["hardware"])
    assert record["git_commit"] is None or len(record["git_commit"]) == 40
    assert (weights.stat().st_mode & 0o044) and ((shelf / "concrete.json").stat().st_mode & 0o044)


def test_available_lists_complete_pairs_only(shelf, tmp_path):
    assert pretrained.available(shelf) == ["concrete"]
    assert pretrained.available(tmp_path) == [] and pretrained.available(tmp_path / "absent") == []
    (tmp_path / "baseline.pt").write_bytes(b"x")  # no .json beside it
    assert pretrained.available(tmp_path) == []
    assert isinstance(pretrained.available(), list)  # the package's own folder, maybe empty


def test_a_modified_file_fails_the_checksum(shelf, tmp_path):
    for name in ("concrete.pt", "concrete.json"):
        (tmp_path / name).write_bytes((shelf / name).read_bytes())
    with open(tmp_path / "concrete.pt", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match=r"concrete\.pt: sha256 .* differs"):
        pretrained.load("concrete", directory=tmp_path)


def test_unknown_name_lists_the_available_models(shelf):
    with pytest.raises(
        ValueError, match=r"unknown pretrained model 'bayesian'.*\['concrete', 'baseline'\].*concrete"
    ):
        pretrained.load("bayesian", directory=shelf)


def test_missing_files_explain_how_to_get_a_model(shelf):
    with pytest.raises(FileNotFoundError, match="not been shipped.*python -m companion train") as err:
        pretrained.load("baseline", directory=shelf)
    assert "baseline.pt" in str(err.value)
    with pytest.raises(FileNotFoundError):
        pretrained.provenance("baseline", directory=shelf)


def test_export_refuses_oversized_weights_and_leaves_nothing(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "MAX_BYTES", 1000)
    with pytest.raises(ValueError, match="over the"):
        export_module.export(run_dir / "final.pt", "concrete", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_exporting_the_same_checkpoint_twice_gives_the_same_file(run_dir, tmp_path):
    (first, _), (second, _) = (
        export_module.export(run_dir / "final.pt", "concrete", tmp_path / d) for d in "ab"
    )
    assert first.read_bytes() == second.read_bytes()
    assert (
        pretrained.provenance("concrete", directory=tmp_path / "a")["sha256"]
        == pretrained.provenance("concrete", directory=tmp_path / "b")["sha256"]
    )


def test_new_weights_drop_the_recipes_of_the_old_ones(run_dir, tmp_path):
    from companion.inference.recipes import read_recipe, recipe_path
    from companion.inference.segmenter import Segmenter

    (tmp_path / "concrete.recipe.json").write_text("{}")  # the recipes of earlier weights
    export_module.export(run_dir / "final.pt", "concrete", tmp_path)
    assert not recipe_path("concrete", tmp_path).exists()
    assert (
        read_recipe("concrete", directory=tmp_path)
        == Segmenter.pretrained("concrete", directory=tmp_path).recipe
    )


def test_export_rejects_a_bad_name(run_dir, tmp_path):
    with pytest.raises(ValueError, match="file stem"):
        export_module.export(run_dir / "final.pt", "../evil", tmp_path)


def test_the_evaluate_cli_loads_pretrained_weights(shelf, tmp_path):
    from companion.cli import main

    out = tmp_path / "res"
    assert (
        main(
            [
                "evaluate",
                "--pretrained",
                "concrete",
                "--pretrained-dir",
                str(shelf),
                "--synthetic",
                "2",
                "--synthetic-size",
                "64",
                "--draws",
                "2",
                "--bandwidths",
                "1",
                "--thresholds",
                "1",
                "--no-progress",
                "--no-cache",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads((out / "results.json").read_text())
    assert (
        doc["model"]["source"] == "pretrained"
        and doc["model"]["sha256"] == pretrained.provenance("concrete", shelf)["sha256"]
    )
    assert not (out / "cache").exists()


def test_results_reads_the_committed_evaluation_and_explains_when_missing(tmp_path):
    (tmp_path / "concrete").mkdir()
    (tmp_path / "concrete" / "results.json").write_text(json.dumps({"rows": [{"name": "mc", "avAP": 0.5}]}))
    assert chapters.results("concrete", tmp_path)["rows"][0]["avAP"] == 0.5
    with pytest.raises(FileNotFoundError, match="python -m companion evaluate --pretrained baseline"):
        chapters.results("baseline", tmp_path)


def test_training_budget_states_iterations_crops_and_time(shelf):
    line = chapters.training_budget("concrete", shelf)
    record = pretrained.provenance("concrete", shelf)
    assert line.startswith(f"concrete: {record['iterations']:,} iterations of 32 x 32 crops")
    assert "lr 0.001" in line and line.endswith(f"on a {record['hardware']['cpu_count']}-core CPU")
    assert "starting from" not in line


def test_load_or_train_loads_the_shipped_model_or_trains_a_quick_one(shelf, monkeypatch):
    model, text = chapters.load_or_train("concrete", directory=shelf)
    assert not model.training and text.startswith("shipped model concrete:")
    samples = make_dataset(2, seed=1, shape=(96, 96))
    monkeypatch.setattr("companion.book.chapters.load_bbbc010", lambda root, wells, progress: samples)
    model, text = chapters.load_or_train("baseline", retrain=True, quick=True, directory=shelf)
    assert not model.training and not dropout_rates(model)  # a baseline: no Concrete Dropout
    assert "baseline model trained here (quick configuration): 30 iterations" in text
    with pytest.raises(ValueError, match="retrain knows"):
        chapters.load_or_train("other", retrain=True, directory=shelf)


def test_export_folds_a_background_shift_into_the_weights_and_records_it(run_dir, tmp_path):
    calibration = dict(method="test", wells=["A01"], shifts=[0.0, 1.0], f1=[0.5, 0.7])
    export_module.export(
        run_dir / "final.pt", "concrete", tmp_path, background_shift=1.0, calibration=calibration
    )
    shifted = pretrained.load("concrete", directory=tmp_path)
    original = load_model(run_dir / "final.pt")
    delta = original.class_head.layer.bias.detach() - shifted.class_head.layer.bias.detach()
    assert delta[0].item() == pytest.approx(1.0, abs=1e-2) and delta[1:].abs().max().item() < 1e-2  # fp16
    record = pretrained.provenance("concrete", tmp_path)
    assert record["background_shift"] == 1.0 and record["calibration"] == calibration


def test_results_summary_puts_our_rows_beside_the_papers_with_the_budget(shelf, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "results_summary", REPO_ROOT / "scripts" / "results_summary.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = dict(avAP=0.25, AP50=0.5, AP75=0.125, recall80=0.2, recall80_iou=0.15, avAP_dsb=0.3)
    doc = dict(
        rows=[dict(name="mc", **row), dict(name="deterministic", **row)],
        wells=["C03", "C04"],
        settings=dict(draws=8, binarize_at=0.75),
        skipped_wells=["C13"],
        pavpu=[
            dict(threshold=0.0, p_uncertain_given_inaccurate=1.0, pavpu=0.1),
            dict(threshold=0.05, p_uncertain_given_inaccurate=0.5, pavpu=0.25),
        ],
    )
    (tmp_path / "concrete").mkdir()
    (tmp_path / "concrete" / "results.json").write_text(json.dumps(doc))
    assert module.main(["--results-dir", str(tmp_path), "--pretrained-dir", str(shelf)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert (
        "| ours, concrete: 8 MC draws agglomerated, p >= 0.75 | 0.250 | 0.500 | 0.125 | 0.200 | 0.150 | 0.300 |"
        in text
    )
    assert "| paper, concrete | 0.770 | 0.974 | 0.883 | - | 0.810 | 0.703 |" in text  # Recall .8 at IoU
    assert chapters.training_budget("concrete", shelf) in text and "skipped as incomplete: C13" in text
    assert "baseline:" not in text.split("Training budgets")[1]  # no results for it: no budget line
    assert "p(uncertain | inaccurate) = 0.500 (paper: 0.559), PAvPU = 0.250" in text
    assert "per-component clustering" not in text.split("## Table 1")[1].split("paper, concrete")[0]
    (tmp_path / "concrete_components").mkdir()
    doc["rows"][1]["avAP"] = 0.375
    (tmp_path / "concrete_components" / "results.json").write_text(json.dumps(doc))
    assert module.main(["--results-dir", str(tmp_path), "--pretrained-dir", str(shelf)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "| ours, concrete: one deterministic pass, per-component clustering | 0.375 | 0.500 |" in text
    assert text.count(chapters.training_budget("concrete", shelf)) == 1  # one budget line per model
    (tmp_path / "concrete_components_flips").mkdir()
    doc["rows"][1]["avAP"] = 0.4375
    (tmp_path / "concrete_components_flips" / "results.json").write_text(json.dumps(doc))
    assert module.main(["--results-dir", str(tmp_path), "--pretrained-dir", str(shelf)]) == 0
    text = (tmp_path / "README.md").read_text()
    flips_row = "| ours, concrete: one deterministic pass, per-component clustering, 4 flips | 0.438 |"
    assert flips_row in text and text.index(flips_row) < text.index("| paper, concrete")


def test_training_can_start_from_an_exported_model(shelf, tmp_path):
    from companion.data.synthetic import make_dataset
    from companion.training.checkpoint import init_weights
    from companion.training.config import TrainConfig
    from companion.training.step import build_model
    from companion.training.train import train

    exported = pretrained.load("concrete", directory=shelf)
    cfg = TrainConfig.preset("quick", iterations=3, checkpoint_every=3, log_every=1)
    fresh = build_model(cfg)
    init_weights(fresh, shelf / "concrete.pt")  # the float16 file: weights come back as float32
    ours = fresh.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in exported.state_dict().items() if k in ours)
    final = train(
        TrainConfig.preset(
            "quick", iterations=2, checkpoint_every=2, log_every=1, init_from=str(shelf / "concrete.pt")
        ),
        make_dataset(2, seed=0, shape=(96, 96)),
        tmp_path / "run",
        progress=False,
    )
    assert final.exists()
    _, info = export_module.export(final, "continued", tmp_path / "shelf")
    record = json.loads(info.read_text())
    stage = f"{shelf.name}/concrete.pt"  # the stage it started from, not the absolute path it had
    assert record["config"]["init_from"] == record["overrides"]["init_from"] == stage
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        init_weights(fresh, tmp_path / "junk.pt")


def _copy_with(shelf, folder, payload=None, weights=None):
    """A copy of the shelf's concrete model whose .pt is replaced; its .json records the new sha256."""
    if payload is not None:
        torch.save(payload, folder / "concrete.pt")
    else:
        (folder / "concrete.pt").write_bytes(weights)
    record = json.loads((shelf / "concrete.json").read_text())
    record["sha256"] = hashlib.sha256((folder / "concrete.pt").read_bytes()).hexdigest()
    (folder / "concrete.json").write_text(json.dumps(record))
    return folder


def test_a_truncated_or_foreign_weights_file_is_a_value_error_naming_it(shelf, tmp_path):
    data = (shelf / "concrete.pt").read_bytes()
    _copy_with(shelf, tmp_path, weights=data[: len(data) // 2])  # truncated, but signed as such
    with pytest.raises(
        ValueError, match=r"concrete\.pt is not a readable exported companion model \(truncated"
    ):
        pretrained.load("concrete", directory=tmp_path)
    payload = torch.load(shelf / "concrete.pt", weights_only=True)
    payload["model_kwargs"] = {**payload["model_kwargs"], "base_filters": 7}  # another architecture
    _copy_with(shelf, tmp_path, payload=payload)
    with pytest.raises(ValueError, match=r"concrete\.pt: its weights do not fit the architecture"):
        pretrained.load("concrete", directory=tmp_path)
    _copy_with(shelf, tmp_path, payload={"format": pretrained.FORMAT, "model_kwargs": {}})
    with pytest.raises(ValueError, match=r"concrete\.pt is not an exported companion model: it lacks"):
        pretrained.load("concrete", directory=tmp_path)


def test_a_corrupt_provenance_file_is_a_value_error_naming_it(shelf, tmp_path):
    (tmp_path / "concrete.pt").write_bytes((shelf / "concrete.pt").read_bytes())
    (tmp_path / "concrete.json").write_text((shelf / "concrete.json").read_text()[:40])  # truncated
    for call in (pretrained.load, pretrained.provenance):
        with pytest.raises(ValueError, match=r"concrete\.json is not a readable provenance record"):
            call("concrete", directory=tmp_path)
    (tmp_path / "concrete.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"concrete\.json is not a provenance record: .* list"):
        pretrained.load("concrete", directory=tmp_path)


def test_a_gpu_location_without_cuda_says_so_and_does_not_blame_the_file(shelf, run_dir, monkeypatch):
    from companion.training.checkpoint import read_checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for location in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match="CUDA is not available") as err:
            pretrained.load("concrete", directory=shelf, map_location=location)
        assert "concrete.pt" not in str(err.value) and "corrupt" not in str(err.value)
    with pytest.raises(ValueError, match="CUDA is not available"):
        chapters.load_or_train("concrete", directory=shelf, device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):  # a training checkpoint too
        read_checkpoint(run_dir / "final.pt", map_location="cuda")
    with pytest.raises(ValueError, match="'banana' is not a torch device"):
        pretrained.load("concrete", directory=shelf, map_location="banana")


def test_a_model_trained_in_stages_records_each_and_their_totals(run_dir, shelf, tmp_path):
    first = pretrained.provenance("concrete", shelf)
    stages = export_module.stage_summary(shelf / "concrete.json") + export_module.stage_summary(
        run_dir / "final.pt"
    )
    assert [s["iterations"] for s in stages] == [first["iterations"]] * 2
    assert stages[0]["source"] == "concrete.json" and stages[1]["source"] == "final.pt"
    export_module.export(run_dir / "final.pt", "baseline", tmp_path, earlier_stages=stages)
    record = pretrained.provenance("baseline", tmp_path)
    assert record["total_iterations"] == 3 * first["iterations"]
    assert record["total_training_time_s"] == pytest.approx(
        sum(s["training_time_s"] for s in stages) + record["training_time_s"]
    )
    line = chapters.training_budget("baseline", tmp_path)
    assert line.startswith(f"baseline: {3 * first['iterations']:,} iterations of 32 x 32 crops")
    assert "in 3 stages: " in line and line.count(", then ") == 2
    # a continuation of an exported model lists the stages of that model before its own
    assert len(export_module.stage_summary(tmp_path / "baseline.json")) == 3
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="broken.json: not a provenance record"):
        export_module.stage_summary(tmp_path / "broken.json")
