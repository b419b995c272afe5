"""The evaluation pipeline (companion.evaluation.evaluate) and ``python -m companion evaluate``."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from companion._io import file_sha256
from companion.data.simulate import ideal_logits, simulate_embedding
from companion.data.synthetic import make_dataset
from companion.data.targets import worm_probability
from companion.evaluation.evaluate import _ScaledCounts, _to_counts, evaluate_model
from companion.evaluation.paper import TABLE1_KEYS
from companion.evaluation.report import write_report
from companion.evaluation.tuning import foreground_scores
from companion.evaluation.uncertainty import pavpu
from companion.inference.agglomerate import agglomerate, binarize
from companion.inference.outputs import (
    CompactPass,
    _well_seed,
    cached_image_outputs,
    compact_pass,
    compact_scores,
    embedding_map,
)
from companion.inference.postprocess import segment
from companion.inference.recipes import Recipe, views_recipe
from companion.inference.sampling import mc_predict
from companion.inference.segmenter import segment_compact
from companion.model.dropout import ConcreteDropout2d
from companion.model.unet import UNet, UNetOutput

SIZE = 128  # a multiple of 16: the stand-in network sees the images unpadded


def _key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()


def _ideal_outputs(gt: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if len(gt) == 0:
        return np.zeros((dim,) + gt.shape[1:], np.float32), ideal_logits(np.zeros((1,) + gt.shape[1:], bool))
    return simulate_embedding(gt, dim, seed=0), ideal_logits(gt)


class OracleNet(nn.Module):
    """Stand-in for a trained U-Net: the ideal outputs of known samples (looked up by image).

    It holds a Concrete Dropout layer, so the pipeline treats it as a Concrete Dropout model; in
    sampling mode every draw loses each worm with probability ``p_drop`` (torch RNG, so
    ``mc_predict``'s seed applies).
    """

    def __init__(self, samples, dim: int = 8, p_drop: float = 0.3):
        super().__init__()
        self.drop = ConcreteDropout2d(init_rate=0.1)
        self.divisor, self.dim, self.p_drop = 16, dim, p_drop
        self.table = {_key(s.image): s.instances for s in samples}
        self.calls = 0

    def forward(self, x: torch.Tensor) -> UNetOutput:
        self.calls += 1
        embeddings, logits = [], []
        for image in x:
            gt = self.table[_key(image.cpu().numpy())]
            if self.drop.sampling:
                gt = gt[(torch.rand(len(gt)) >= self.p_drop).numpy()]
            e, lg = _ideal_outputs(gt, self.dim)
            embeddings.append(torch.from_numpy(e)), logits.append(torch.from_numpy(lg))
        return UNetOutput(torch.stack(embeddings), torch.stack(logits))


@pytest.fixture(scope="module")
def samples():
    return make_dataset(4, seed=7, shape=(SIZE, SIZE))


@pytest.fixture(scope="module")
def folds(samples):
    wells = [s.well for s in samples]
    return [wells[0::2], wells[1::2]]


@pytest.fixture(scope="module")
def oracle_run(samples, folds, tmp_path_factory):
    torch.manual_seed(0)
    model = OracleNet(samples)
    cache = tmp_path_factory.mktemp("cache")
    result = evaluate_model(
        model,
        samples,
        folds=folds,
        bandwidths=[1.0, 2.0],
        thresholds=[1.0, 3.0],
        recipe=views_recipe(model, mc_draws=4, flips=False, max_points=None),
        cache_dir=cache,
        progress=False,
    )
    return model, result, cache


def _by_well(samples) -> dict:
    return {s.well: s for s in samples}


def _fp16(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float16).astype(np.float32)


# --------------------------------------------------------------------------------------------
# compact outputs
# --------------------------------------------------------------------------------------------
def test_compact_pass_segments_exactly_like_the_full_outputs(samples):
    gt = samples[0].instances
    embedding, logits = simulate_embedding(gt, 8, seed=1), ideal_logits(gt)
    logits = logits + np.random.default_rng(0).normal(0, 2.0, logits.shape).astype(np.float32)  # not one-hot
    compact = compact_pass(embedding, logits)
    assert compact.classes.dtype == np.uint8 and compact.embedding.dtype == np.float16
    assert len(compact.embedding) == (logits.argmax(0) != 0).sum()
    expected = segment(_fp16(embedding), logits, 2.0, 1.5)
    got = segment_compact(compact, 2.0, 1.5)
    assert len(expected) > 0 and np.array_equal(got, expected)
    # the scores need the foreground probability of the real logits, not of the one-hot ones
    np.testing.assert_allclose(compact_scores(compact, got), foreground_scores(got, logits), atol=2e-3)
    full_embedding = embedding_map(compact)  # what segment_classes clusters beside the class map
    assert np.array_equal(compact.classes, logits.argmax(0))
    assert np.array_equal(
        full_embedding[:, logits.argmax(0) == 0], np.zeros((8, (logits.argmax(0) == 0).sum()))
    )


def test_compact_pass_of_tensors_equals_that_of_arrays():
    rng = np.random.default_rng(3)
    embedding = rng.normal(size=(5, 20, 30)).astype(np.float32)
    logits = rng.normal(size=(3, 20, 30)).astype(np.float32)
    logits[:, :2] = 0.0  # ties: the first class (background) wins either way
    from_arrays = compact_pass(embedding, logits)
    from_tensors = compact_pass(torch.from_numpy(embedding), torch.from_numpy(logits))
    classes = np.argmax(logits, axis=0).astype(np.uint8)  # by hand, on the whole image
    mask = classes != 0
    by_hand = (
        classes,
        embedding[:, mask].T.astype(np.float16),
        worm_probability(logits)[mask].astype(np.float16),
    )
    assert 0 < mask.mean() < 1
    for a, b, c in zip(from_arrays, from_tensors, by_hand):
        assert a.dtype == b.dtype == c.dtype and np.array_equal(a, b) and np.array_equal(a, c)


def test_embedding_map_rejects_an_embedding_that_does_not_fit_the_class_map():
    bad = CompactPass(np.ones((2, 2), np.uint8), np.zeros((3, 4), np.float16), np.zeros(3, np.float16))
    with pytest.raises(ValueError, match="4 non-background pixels"):
        embedding_map(bad)
    with pytest.raises(ValueError, match=r"logits \(2, 3, 3\)"):
        compact_pass(np.zeros((4, 3, 3)), np.zeros((2, 3, 3)))


def test_scaled_counts_give_back_the_agglomerated_probabilities_exactly(samples):
    rng = np.random.default_rng(0)
    gt = samples[1].instances
    draws = [gt[rng.random(len(gt)) > 0.3] for _ in range(7)]
    probs = agglomerate(draws).probs
    lazy = _ScaledCounts([_to_counts(probs, 7)], 7)
    assert len(lazy) == 1 and lazy[0].dtype == np.float32
    assert np.array_equal(lazy[0], probs) and np.array_equal(list(lazy)[0], probs)


# --------------------------------------------------------------------------------------------
# the pipeline, with a stand-in network whose outputs we know
# --------------------------------------------------------------------------------------------
def test_rows_have_the_table1_metrics_in_range(oracle_run):
    _, result, _ = oracle_run
    assert [r["name"] for r in result.rows] == ["mc", "deterministic"]
    for row in result.rows:
        assert all(0.0 <= row[k] <= 1.0 for k in TABLE1_KEYS), row
    # ideal network outputs must be segmented (nearly) perfectly; a mix-up of wells would give ~0
    assert result.rows[1]["avAP"] > 0.8 and result.rows[1]["recall80"] > 0.8


def test_deterministic_row_is_the_cross_validated_grid_search(oracle_run, samples, folds):
    _, result, _ = oracle_run
    tuning = result.tuning
    for k in TABLE1_KEYS:
        assert result.rows[1][k] == pytest.approx(tuning.pooled[k])
    for f, choice in enumerate(tuning.choices):
        other = tuning.scores[1 - f]
        i, j = np.unravel_index(np.argmax(other), other.shape)
        assert choice.applied_to == f and (choice.bandwidth, choice.threshold) == (
            tuning.bandwidths[i],
            tuning.thresholds[j],
        )
        # each well's prediction is segment() of its ideal outputs with the other fold's choice
        for well in folds[f]:
            index = result.wells.index(well)
            embedding, logits = _ideal_outputs(_by_well(samples)[well].instances, 8)
            expected = segment(_fp16(embedding), logits, choice.bandwidth, choice.threshold)
            assert np.array_equal(result.predictions["deterministic"][index], expected)


def _independent_agglomerations(model, samples, result, draws=4):
    chosen = {c.applied_to: (c.bandwidth, c.threshold) for c in result.tuning.choices}
    fold_of = {w: f for f, fold in enumerate(result.folds) for w in fold}
    aggs = []
    for sample in (_by_well(samples)[w] for w in result.wells):
        mc = mc_predict(model, sample.image, n_draws=draws, seed=_well_seed(0, sample.well))
        bw, th = chosen[fold_of[sample.well]]
        aggs.append(agglomerate([segment(_fp16(e), lg, bw, th) for e, lg in zip(mc.embeddings, mc.logits)]))
    return aggs


def test_mc_row_pavpu_and_proofreading_match_an_independent_run(oracle_run, samples):
    model, result, _ = oracle_run
    aggs = _independent_agglomerations(model, samples, result)
    for agg, got in zip(aggs, result.predictions["mc"]):
        assert np.array_equal(binarize(agg.probs, 0.75), got)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(result.predictions["mc"], result.predictions["deterministic"])
    )
    gts = [_by_well(samples)[w].instances for w in result.wells]
    expected = pavpu(gts, [a.probs for a in aggs], result.settings["pavpu_thresholds"])
    np.testing.assert_array_equal(result.pavpu.n_ac, expected.n_ac)
    np.testing.assert_array_equal(result.pavpu.n_iu, expected.n_iu)
    first = result.proofreading[0]
    assert first["n_corrections"] == 0
    for k in TABLE1_KEYS:  # no correction: the proofreading table starts at the MC row
        assert first[k] == pytest.approx(result.rows[0][k])
    assert [r["n_corrections"] for r in result.proofreading] == [0, 5, 10, 15, 20]


def test_per_image_rows_count_the_predictions(oracle_run, samples, folds):
    _, result, _ = oracle_run
    assert result.wells == folds[0] + folds[1]  # fold by fold, as the pooled metrics
    assert len(result.per_image) == 2 * len(samples)
    for p in result.per_image:
        index = result.wells.index(p["well"])
        assert p["n_pred"] == len(result.predictions[p["row"]][index])
        assert p["n_gt"] == len(_by_well(samples)[p["well"]].instances)
        assert p["well"] in result.folds[p["fold"]]
        # the MC rows carry the image's uncertainty, in [0, log 2]; the deterministic ones none
        assert ("uncertainty" in p) == (p["row"] == "mc")
        if p["row"] == "mc":
            assert 0.0 <= p["uncertainty"] <= np.log(2) + 1e-12


def test_cache_is_reused_and_invalidated(oracle_run, samples):
    model, result, cache = oracle_run
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s.well}.npz" for s in samples)
    before = model.calls
    again = cached_image_outputs(model, samples, cache, draws=4, progress=False)
    assert model.calls == before  # nothing recomputed
    fresh = cached_image_outputs(model, samples[:1], None, draws=4, progress=False)
    first = again[samples[0].well]
    assert np.array_equal(first.deterministic.embedding, fresh[samples[0].well].deterministic.embedding)
    assert all(
        np.array_equal(a.classes, b.classes) for a, b in zip(first.draws, fresh[samples[0].well].draws)
    )
    cached_image_outputs(model, samples[:1], cache, draws=2, progress=False)  # other settings
    assert model.calls > before
    (cache / f"{samples[1].well}.npz").write_bytes(b"not an npz")  # a broken file is recomputed
    calls = model.calls
    with pytest.warns(UserWarning, match="unreadable.*recomputing"):
        out = cached_image_outputs(model, samples[1:2], cache, draws=4, progress=False)
    assert model.calls > calls and len(out[samples[1].well].draws) == 4
    path = cache / f"{samples[1].well}.npz"
    path.write_bytes(path.read_bytes()[:200])  # truncated zip (BadZipFile): recomputed too
    calls = model.calls
    with pytest.warns(UserWarning, match="BadZipFile"):
        cached_image_outputs(model, samples[1:2], cache, draws=4, progress=False)
    assert model.calls > calls
    with torch.no_grad():
        model.drop.p_logit += 1.0  # other weights
    calls = model.calls
    cached_image_outputs(model, samples[2:3], cache, draws=4, progress=False)
    assert model.calls > calls


def test_baseline_model_gets_only_the_deterministic_row(samples, folds):
    torch.manual_seed(0)
    model = UNet(base_filters=2, depth=3, embedding_dim=4)
    outputs = cached_image_outputs(model, samples[:1], None, draws=5, progress=False)
    assert outputs[samples[0].well].draws == ()
    result = evaluate_model(
        model,
        samples,
        folds=folds,
        bandwidths=[1.0],
        thresholds=[1.0],
        recipe=views_recipe(model, mc_draws=5, flips=False),
        progress=False,
    )
    assert [r["name"] for r in result.rows] == ["deterministic"]
    assert result.pavpu is None and result.proofreading is None and result.settings["draws"] == 0


def test_folds_must_cover_the_samples(samples, folds):
    model = UNet(base_filters=2, depth=3, embedding_dim=4)
    with pytest.raises(ValueError, match="in no fold"):
        evaluate_model(model, samples, folds=[folds[0], folds[1][:1]], progress=False)
    with pytest.raises(ValueError, match="disjoint"):
        evaluate_model(model, samples, folds=[folds[0], folds[1] + folds[0][:1]], progress=False)
    with pytest.raises(ValueError, match="at least one well"):
        evaluate_model(
            model, samples[:2], folds=[[samples[0].well, samples[1].well], ["C03"]], progress=False
        )


def test_write_report_files(oracle_run, samples, tmp_path):
    _, result, _ = oracle_run
    files = write_report(result, samples, tmp_path, info=dict(skipped_wells=["X"], wall_time_s=1.0))
    names = {p.name for p in files}
    assert names == {
        "results.json",
        "table1.csv",
        "per_image.csv",
        "tuning.csv",
        "pavpu.csv",
        "proofreading.csv",
        "pavpu.png",
        "gallery.png",
    }
    for name in names:
        assert (tmp_path / name).stat().st_size > 0
        assert (tmp_path / name).stat().st_mode & 0o044  # readable by group and others
    doc = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert doc["skipped_wells"] == ["X"] and doc["rows"] == json.loads(json.dumps(result.rows))
    assert len(doc["tuning"]["choices"]) == 2 and len(doc["pavpu"]) == 15
    with open(tmp_path / "table1.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["name"] for r in table] == ["mc", "deterministic"]
    assert float(table[0]["avAP"]) == pytest.approx(result.rows[0]["avAP"])
    with open(tmp_path / "per_image.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(result.per_image)
    worst = min((p for p in result.per_image if p["row"] == "mc"), key=lambda p: (p["avAP"], p["well"]))
    assert doc["gallery_wells"][0] == worst["well"]
    assert (tmp_path / "gallery.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_new_evaluation_replaces_the_earlier_set_whole(oracle_run, samples, tmp_path, monkeypatch):
    import os

    from companion.evaluation.report import STAGING_PREFIX, sweep_staging

    _, result, _ = oracle_run
    write_report(result, samples, tmp_path)  # a Concrete model's set: PAvPU and proofreading files
    assert (tmp_path / "pavpu.csv").is_file()
    deterministic = result._replace(pavpu=None, proofreading=None, rows=result.rows[1:])
    deterministic = deterministic._replace(per_image=[p for p in result.per_image if p["row"] != "mc"])
    files = write_report(deterministic, samples, tmp_path)  # a baseline's set into the same folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)
    assert not (tmp_path / "pavpu.csv").exists() and not (tmp_path / "proofreading.csv").exists()
    moved = []

    def interrupted(src, dst, real=os.replace):  # stops the swap after two files moved in
        if Path(dst).parent == tmp_path:
            if len(moved) == 2:
                raise KeyboardInterrupt
            moved.append(dst)
        real(src, dst)

    monkeypatch.setattr("companion.evaluation.report.os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report(result, samples, tmp_path)
    assert not (tmp_path / "results.json").exists()  # the folder says it is incomplete
    assert [p.name for p in sweep_staging(tmp_path)] == [f"{STAGING_PREFIX}{os.getpid()}"]
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_a_full_disk_names_the_file(tmp_path):
    import errno

    from companion._io import atomic_write

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'x.json'}: No space left") as caught:
        atomic_write(tmp_path / "x.json", full)
    assert caught.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from companion.cli import main

    out = tmp_path_factory.mktemp("run")
    assert (
        main(
            [
                "train",
                "--preset",
                "quick",
                "--crop-size",
                "32",
                "--iterations",
                "2",
                "--synthetic",
                "2",
                "--checkpoint-every",
                "2",
                "--log-every",
                "1",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out / "final.pt"


def test_cli_evaluates_a_checkpoint_on_synthetic_wells(tiny_checkpoint, tmp_path, capsys):
    from companion.cli import main

    out = tmp_path / "res"
    args = [
        "evaluate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--synthetic",
        "4",
        "--synthetic-size",
        "96",
        "--draws",
        "2",
        "--bandwidths",
        "1",
        "--thresholds",
        "1",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "avAP" in printed and "fold 0" in printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"]["sha256"] == file_sha256(tiny_checkpoint) and doc["model"]["kind"] == "concrete"
    assert [r["name"] for r in doc["rows"]] == ["mc", "deterministic"]
    for row in doc["rows"]:
        assert set(TABLE1_KEYS) <= set(row) and all(0.0 <= row[k] <= 1.0 for k in TABLE1_KEYS)
    assert doc["settings"]["draws"] == 2 and doc["wall_time_s"] > 0 and doc["skipped_wells"] == []
    assert doc["command"].startswith("python -m companion evaluate --checkpoint")
    for name in ("table1.csv", "per_image.csv", "pavpu.csv", "proofreading.csv", "pavpu.png", "gallery.png"):
        assert (out / name).is_file(), name
    with open(out / "pavpu.csv") as handle:
        for row in csv.DictReader(handle):
            assert row["pavpu"] == "nan" or 0.0 <= float(row["pavpu"]) <= 1.0
    cache_times = {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}
    assert len(cache_times) == 4
    assert doc["settings"]["max_points"] is None
    assert (
        main(args[:-2] + ["--bandwidths", "2", "--max-points", "300", "--out", str(out)]) == 0
    )  # clustering only
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()} == cache_times
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["bandwidths"] == [2.0] and settings["max_points"] == 300


def test_cli_errors_are_clear(tmp_path, capsys):
    from companion.cli import main

    assert (
        main(
            [
                "evaluate",
                "--pretrained",
                "concrete",
                "--pretrained-dir",
                str(tmp_path),
                "--synthetic",
                "2",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "not been shipped" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--out", "x", "--synthetic", "2"])  # a model is required
    with pytest.raises(SystemExit):
        main(["evaluate", "--pretrained", "concrete", "--checkpoint", "a.pt", "--out", "x"])


def test_cli_rejects_wells_outside_the_test_set(tiny_checkpoint, tmp_path, capsys):
    from companion.cli import main

    assert (
        main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--wells", "A01", "--out", str(tmp_path)])
        == 2
    )
    assert "A01" in capsys.readouterr().err


@pytest.mark.realdata
def test_cli_data_lists_skipped_incomplete_wells(bbbc010_root):
    from companion.cli import build_parser
    from companion.cli.evaluate import _evaluation_data

    args = build_parser().parse_args(
        [
            "evaluate",
            "--checkpoint",
            "x.pt",
            "--out",
            "o",
            "--no-progress",
            "--data-root",
            str(bbbc010_root),
            "--wells",
            "C03",
            "C04",
            "C13",
        ]
    )
    with pytest.warns(UserWarning, match="C13"):
        samples, folds, skipped, info = _evaluation_data(args)
    assert [s.well for s in samples] == ["C03", "C04"] and skipped == ["C13"]
    assert folds == [["C03"], ["C04"]] and samples[0].image.shape == (2, 520, 696)


# --------------------------------------------------------------------------------------------
# missing ground truth
# --------------------------------------------------------------------------------------------
class _NeverCalled(nn.Module):
    def forward(self, x):  # pragma: no cover - the point is that it is not reached
        raise AssertionError("the network ran although the ground truth was missing")


def test_wells_without_ground_truth_are_an_error_naming_them(samples, folds):
    from companion.data.bbbc010 import Sample

    empty = {samples[1].well, samples[2].well}
    stripped = [
        Sample(s.well, s.image, np.zeros((0,) + s.image.shape[1:], bool)) if s.well in empty else s
        for s in samples
    ]
    with pytest.raises(
        ValueError,
        match=rf"without ground truth \(no worm mask\): "
        rf"{samples[1].well}, {samples[2].well};",
    ):
        evaluate_model(_NeverCalled(), stripped, folds=folds, progress=False)


def test_cli_refuses_test_wells_whose_masks_are_all_empty(tiny_checkpoint, tmp_path, capsys):
    import tifffile
    from PIL import Image

    from companion.cli import main

    images, masks = tmp_path / "data" / "images", tmp_path / "data" / "masks_eachworm"
    images.mkdir(parents=True), masks.mkdir(parents=True)
    for well in ("C03", "C04"):  # one well of each test fold
        for ch in ("w1", "w2"):
            tifffile.imwrite(images / f"plate_{well}_{ch}_x.tif", np.full((32, 32), 500, np.uint16))
    worm = np.zeros((32, 32), np.uint8)
    worm[10:14, 4:28] = 255
    Image.fromarray(worm).save(masks / "C03_01_ground_truth.png")
    Image.fromarray(np.zeros_like(worm)).save(masks / "C04_01_ground_truth.png")  # no worm pixel
    with pytest.warns(UserWarning, match="C04_01_ground_truth.png' is all zero"):
        code = main(
            [
                "evaluate",
                "--checkpoint",
                str(tiny_checkpoint),
                "--data-root",
                str(tmp_path / "data"),
                "--wells",
                "C03",
                "C04",
                "--no-progress",
                "--out",
                str(tmp_path / "res"),
            ]
        )
    err = capsys.readouterr().err
    assert (
        code == 2 and err.startswith("error: cannot evaluate well(s) without ground truth") and "C04" in err
    )
    assert "C03" not in err and err.count("\n") == 1
    assert not (tmp_path / "res" / "results.json").exists()


def test_flip_augmented_evaluation_records_it_in_settings_rows_and_cache(samples, folds, tmp_path):
    torch.manual_seed(0)
    model = UNet(base_filters=2, depth=3, embedding_dim=4)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    cached_image_outputs(model, samples[:1], tmp_path, draws=0, progress=False)
    assert len(calls) == 1
    cached_image_outputs(model, samples[:1], tmp_path, draws=0, flips=True, progress=False)
    assert len(calls) == 1 + 4  # not the plain pass's cache: four flipped passes
    cached_image_outputs(model, samples[:1], tmp_path, draws=0, flips=True, progress=False)
    assert len(calls) == 5  # now cached
    options = dict(folds=folds, bandwidths=[1.0], thresholds=[1.0], progress=False)
    plain = evaluate_model(model, samples, recipe=Recipe(), **options)
    flipped = evaluate_model(model, samples, recipe=Recipe(views=4), **options)
    assert plain.settings["flips"] is False and flipped.settings["flips"] is True
    assert flipped.rows[0]["inference"].endswith("test-time augmentation with 4 flips")
    assert "flips" not in plain.rows[0]["inference"]


def test_flip_augmented_evaluation_of_a_model_without_dropout_agglomerates_its_flipped_passes(samples, folds):
    torch.manual_seed(0)
    model = UNet(base_filters=2, depth=3, embedding_dim=4)  # no dropout
    options = dict(folds=folds, bandwidths=[1.0], thresholds=[1.0], progress=False)
    flipped = evaluate_model(model, samples, recipe=views_recipe(model, mc_draws=8, flips=True), **options)
    assert [row["name"] for row in flipped.rows] == ["flips_agglomerated", "deterministic"]
    assert flipped.settings["draws"] == 4  # the four views (dropout draws need dropout)
    assert flipped.rows[0]["inference"].startswith("4 flipped passes")
    assert set(flipped.predictions) == {"flips_agglomerated", "deterministic"}
    assert {r["row"] for r in flipped.per_image} == {"flips_agglomerated", "deterministic"}
    plain = evaluate_model(model, samples, recipe=views_recipe(model, mc_draws=8, flips=False), **options)
    assert [row["name"] for row in plain.rows] == ["deterministic"]  # no views, no draws
