"""Tests of scripts/gpu_run.py: package commands composed within a budget, end to end on the CPU."""

from __future__ import annotations

import json
import math

import pytest

from companion.data.archive import pack_samples
from companion.data.bbbc010 import FIT_WELLS, TEST_FOLDS, VAL_WELLS, load_bbbc010
from scripts import gpu_run
from tests.conftest import real_data_root


def _args(*argv: str):
    args = gpu_run.build_parser().parse_args(["--out", "o", *argv])
    args.argv = ["--out", "o", *argv]
    return args


def test_a_smoke_run_continues_one_shipped_model(tmp_path):
    from companion.training.checkpoint import shipped_model_file

    if shipped_model_file("baseline") is None:
        pytest.skip("the shipped models are not in this copy of the package")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--work", str(tmp_path / "work"), "--smoke"]
    argv += ["--init-from", "baseline", "--models", "baseline", "--downsample", "1"]
    assert gpu_run.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and "concrete" not in summary["models"]
    assert all(c["returncode"] == 0 for c in summary["commands"]), summary["commands"]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["baseline.json", "baseline.pt", "baseline_run.zip", "run.log", "summary.json"]
    assert all((out / f).stat().st_size < gpu_run.MAX_OUT_BYTES for f in files)
    training = summary["models"]["baseline"]["training"]
    assert training["iterations"] == 6 and training["selection"]["scores"][0]["iteration"] == 0
    provenance = json.loads((out / "baseline.json").read_text())
    config = provenance["config"]
    assert config["init_from"] == "baseline" and config["base_filters"] == 19 and config["disc_warmup"] == 0
    assert config["batch_size"] == 16 and config["lr"] == pytest.approx(3e-4 * 4)
    assert config["overlap_weight"] == 5.0 and config["time_budget"] > 0 and config["downsample"] == 1
    assert provenance["iterations"] == training["selection"]["best"]["iteration"]
    assert "/tmp" not in provenance["command"] and provenance["command"].startswith(
        "python scripts/gpu_run.py"
    )
    assert provenance["earlier_stages"], "the shipped model's stages are its history"
    rows = summary["models"]["baseline"]["rows"]
    assert set(rows) == {"baseline", "baseline_components", "baseline_components_flips"}
    assert {r["name"] for r in rows["baseline_components_flips"]} == {"deterministic", "flips_agglomerated"}


def test_a_run_that_does_not_beat_its_start_exports_nothing(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    scores = [dict(iteration=0, avAP=0.6), dict(iteration=50, avAP=0.55), dict(iteration=90, avAP=0.6)]
    (folder / "selection.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    chosen = gpu_run.selection_of(folder)
    assert not chosen["improved"] and chosen["best"]["iteration"] == 0  # ties keep the start
    scores.append(dict(iteration=120, avAP=0.605))  # within the noise of the protocol
    (folder / "selection.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    assert not gpu_run.selection_of(folder)["improved"] and gpu_run.selection_of(folder, 0.0)["improved"]
    scores.append(dict(iteration=150, avAP=0.6 + gpu_run.MIN_GAIN))
    (folder / "selection.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    assert (
        gpu_run.selection_of(folder)["best"]["iteration"] == 150 and gpu_run.selection_of(folder)["improved"]
    )
    assert gpu_run.selection_of(tmp_path)["improved"] is False  # no scores at all


def test_the_commands_a_full_run_composes(tmp_path):
    args = _args("--data", str(tmp_path / "wells.npz"), "--batch", "8")
    plan = gpu_run.plan_for(args)
    argv = gpu_run.train_argv(args, plan, "concrete", 2.5, tmp_path / "t")
    assert argv[1:4] == ["-m", "companion", "train"]
    value = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    assert value["--init-from"] == "concrete" and float(value["--lr"]) == pytest.approx(
        3e-4 * math.sqrt(8), rel=1e-3
    )
    assert value["--dropout-lr-scale"] == "10" and value["--select-every"] == "60"
    assert value["--time-budget"] == "2.500" and value["--data-root"] == str(tmp_path / "wells.npz")
    export = gpu_run.export_argv(args, plan, "concrete", tmp_path / "best.pt", tmp_path / "m")
    assert export[export.index("--calibrate") + 1] == "10" and "--calibrate-draws" in export
    rows = dict(gpu_run.evaluate_argvs(plan, "concrete", tmp_path / "m", tmp_path))
    assert list(rows)[0] == "concrete_components_flips"  # the best row first
    flips = rows["concrete_components_flips"]
    assert flips.count("--pretrained") == 1 and flips[flips.index("--pretrained-dir") + 1] == str(
        tmp_path / "m"
    )
    assert flips[flips.index("--out") + 1] == str(tmp_path / "concrete" / "concrete_components_flips")
    assert "--flips" in flips and "results/" not in " ".join(flips)
    scratch = gpu_run.train_argv(_args("--init-from", "scratch"), plan, "baseline", 1.0, tmp_path)
    assert "--init-from" not in scratch and "--lr" not in scratch


def test_refusals_are_one_line_errors(tmp_path, capsys):
    assert gpu_run.main(["--out", str(tmp_path / "o"), "--data", str(tmp_path / "none.npz")]) == 2
    assert "companion pack" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert gpu_run.main(["--out", str(tmp_path / "full"), "--smoke"]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_a_smoke_run_on_an_archive_of_real_wells(tmp_path):
    root = real_data_root()
    if root is None:
        pytest.skip("real BBBC010 data not found")
    wells = list(FIT_WELLS[:3]) + [VAL_WELLS[0], TEST_FOLDS[0][0], TEST_FOLDS[1][0]]
    archive = tmp_path / "tiny.npz"
    pack_samples(load_bbbc010(root, wells, progress=False), archive)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--work", str(tmp_path / "w"), "--smoke", "--data", str(archive)]
    assert gpu_run.main(argv + ["--models", "concrete", "--budget-min", "6"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert all(c["returncode"] == 0 for c in summary["commands"]), summary["commands"]
    if summary["models"]["concrete"]["training"]["selection"]["improved"]:
        provenance = json.loads((out / "concrete.json").read_text())
        assert provenance["calibration"]["wells"] == [VAL_WELLS[0]]
