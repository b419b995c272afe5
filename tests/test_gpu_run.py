"""Tests of scripts/gpu_run.py: the data archive, the budget, and a smoke run end to end on the CPU."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from companion.data import CHANNEL_MAX, FIT_WELLS, TEST_FOLDS, VAL_WELLS, Sample, load_bbbc010, normalize
from companion.synthetic import make_dataset
from scripts import gpu_run
from tests.conftest import real_data_root


def _camera_samples(n: int = 2, shape: tuple[int, int] = (24, 40)) -> list[Sample]:
    """Synthetic wells whose images are raw counts / CHANNEL_MAX, as BBBC010's are."""
    out = []
    for s in make_dataset(n, seed=3, shape=shape):
        raw = np.rint(s.image * CHANNEL_MAX[0]).astype(np.uint16)
        out.append(Sample(s.well, np.stack([normalize(r, c) for c, r in enumerate(raw)]), s.instances))
    out.append(Sample("EMPTY", out[0].image, np.zeros((0,) + shape, bool)))
    return out


def _same(a: Sample, b: Sample) -> bool:
    return (
        a.well == b.well
        and a.image.dtype == b.image.dtype
        and np.array_equal(a.image, b.image)
        and a.instances.dtype == b.instances.dtype
        and np.array_equal(a.instances, b.instances)
    )


def test_the_archive_reads_back_exactly(tmp_path):
    samples = _camera_samples()
    path = tmp_path / "pack.npz"
    size = gpu_run.pack_samples(samples, path)
    assert size == path.stat().st_size
    assert gpu_run.pack_wells(path) == [s.well for s in samples]
    assert all(_same(a, b) for a, b in zip(samples, gpu_run.read_pack(path)))
    picked = gpu_run.read_pack(path, [samples[1].well, samples[0].well])
    assert [s.well for s in picked] == [samples[1].well, samples[0].well]
    with pytest.raises(KeyError, match="holds no well A01"):
        gpu_run.read_pack(path, ["A01"])
    with np.load(path, allow_pickle=False) as archive:  # plain numpy reads it, no pickles
        assert archive[f"{samples[0].well}_image"].dtype == np.uint8


def test_only_camera_counts_are_packed_and_only_archives_are_read(tmp_path):
    with pytest.raises(ValueError, match="losslessly"):
        gpu_run.pack_samples(make_dataset(1, shape=(16, 16)), tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError, match="gpu_run.py pack"):
        gpu_run.read_pack(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(2))
    with pytest.raises(ValueError, match="not a companion data archive"):
        gpu_run.read_pack(other)


@pytest.mark.realdata
def test_real_wells_round_trip(bbbc010_root, tmp_path):
    samples = load_bbbc010(bbbc010_root, ["A01", "C03"], progress=False)
    gpu_run.pack_samples(samples, tmp_path / "real.npz")
    assert all(_same(a, b) for a, b in zip(samples, gpu_run.read_pack(tmp_path / "real.npz")))


def _run(tmp_path, budget_s: float = 60.0) -> gpu_run.Run:
    (tmp_path / "out").mkdir()
    return gpu_run.Run(tmp_path / "out", tmp_path / "work", budget_s, time.monotonic())


def test_training_stops_at_a_checkpoint_when_its_time_is_up(tmp_path):
    run = _run(tmp_path)
    settings = dataclasses.replace(gpu_run.settings_for(True, "cpu"), max_iterations=None, min_iterations=20)
    data = gpu_run._synthetic_data(settings)
    checkpoint = gpu_run.train_one(run, data, settings, "baseline", batch=1, it_per_s=1.0, seconds=0.0)
    info = run.summary["models"]["baseline"]["training"]
    assert checkpoint.name == "last.pt" and info["stopped_early"]
    assert info["planned_iterations"] == 20 and info["iterations"] == 2  # the first checkpoint (every 10 %)
    assert run.summary["phases"]["train baseline"]["status"] == "stopped"
    config = gpu_run.train_config(settings, "concrete", 1000, 4)
    assert (config.dropout_lr_scale, config.disc_warmup, config.lr_warmup, config.gpu_augment) == (
        10.0,
        60,
        40,
        True,
    )


def test_a_budget_too_small_keeps_a_summary_and_skips_the_rest(tmp_path):
    out = tmp_path / "out"
    assert (
        gpu_run.main(
            ["--out", str(out), "--work", str(tmp_path / "work"), "--smoke", "--synthetic", "--budget-s", "1"]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "partial" and summary["phases"]["benchmarks"]["status"] == "skipped"
    assert (out / "run.log").is_file()


def test_refusals_are_one_line_errors(tmp_path, capsys):
    assert gpu_run.main(["--out", str(tmp_path / "o"), "--pack", str(tmp_path / "none.npz")]) == 2
    assert "gpu_run.py pack" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert gpu_run.main(["--out", str(tmp_path / "full"), "--smoke", "--synthetic"]) == 2
    assert "not empty" in capsys.readouterr().err


def _tiny_pack(tmp_path):
    """A pack of 3 fitting, 1 validation and 2 test wells of the real data, else None."""
    root = real_data_root()
    if root is None:
        return None
    wells = list(FIT_WELLS[:3]) + [VAL_WELLS[0], TEST_FOLDS[0][0], TEST_FOLDS[1][0]]
    path = tmp_path / "tiny.npz"
    gpu_run.pack_samples(load_bbbc010(root, wells, progress=False), path)
    return path


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    pack = _tiny_pack(tmp_path)
    out = tmp_path / "out"
    data = ["--pack", str(pack)] if pack else ["--synthetic"]
    start = time.monotonic()
    assert gpu_run.main(["--out", str(out), "--work", str(tmp_path / "work"), "--smoke", *data]) == 0
    assert time.monotonic() - start < 180
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete", summary["phases"]
    assert summary["data"]["source"] == ("pack" if pack else "synthetic")
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "baseline.json",
        "baseline.pt",
        "baseline_run.zip",
        "concrete.json",
        "concrete.pt",
        "concrete_run.zip",
        "run.log",
        "summary.json",
    ]
    assert all((out / f).stat().st_size < 16 * 2**20 for f in files)
    bench = summary["benchmarks"]
    assert {"augmentation", "training", "mc_sampling"} <= set(bench)
    assert bench["training"]["fp32_it_per_s"] > 0 and bench["mc_sampling"]["batched_s"] > 0
    for name in ("baseline", "concrete"):
        model = summary["models"][name]
        assert model["training"]["iterations"] >= 2 and model["evaluation"]["status"] == "done"
        assert {r["name"] for r in model["evaluation"]["rows"]} == (
            {"deterministic"} if name == "baseline" else {"mc", "deterministic"}
        )
    provenance = json.loads((out / "concrete.json").read_text())
    assert provenance["config"]["dropout_lr_scale"] == 10.0 and provenance["calibration"]["wells"]


def test_a_smoke_run_continues_one_shipped_model(tmp_path):
    from companion.checkpoint import shipped_model_file

    if shipped_model_file("baseline") is None:
        pytest.skip("the shipped models are not in this copy of the package")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--work", str(tmp_path / "work"), "--smoke", "--synthetic"]
    argv += ["--init-from", "baseline", "--models", "baseline", "--downsample", "1"]
    assert gpu_run.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete", summary["phases"]
    assert summary["plan"]["models"] == ["baseline"] and "concrete" not in summary["models"]
    config = summary["models"]["baseline"]["training"]["config"]
    assert config["init_from"] == "baseline" and config["base_filters"] == 19 and config["disc_warmup"] == 0
    assert config["time_budget"] > 0  # the run sizes its own schedule to its share of the budget
    assert config["downsample"] == 1  # the shipped weights continued at full resolution
    assert sorted(p.name for p in out.iterdir()) == [
        "baseline.json",
        "baseline.pt",
        "baseline_run.zip",
        "run.log",
        "summary.json",
    ]
    settings = gpu_run.settings_for(True, "cpu")
    assert gpu_run.train_config(settings, "concrete", 100, 4, init_from="concrete").lr == pytest.approx(6e-4)
    assert gpu_run.init_source_of("shipped", "concrete") == "concrete"
    assert gpu_run.init_source_of("scratch", "concrete") is None
