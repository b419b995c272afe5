"""companion.book.chapters.segmentation_settings: the shipped recipe for a well, or the defaults."""

from __future__ import annotations

import json

import pytest

from companion.book.chapters import segmentation_settings
from companion.data.bbbc010 import TEST_FOLDS
from companion.inference.recipes import Recipe, save_recipes


def _committed(tmp_path, max_points=8000):
    """A recipe file for "concrete" in tmp_path/shelf and its evaluation in tmp_path/results."""
    choices = [
        dict(tuned_on=1, applied_to=0, bandwidth=1.5, threshold=2.0, tuning_score=0.4),
        dict(tuned_on=0, applied_to=1, bandwidth=3.0, threshold=1.0, tuning_score=0.5),
    ]
    settings = dict(max_points=max_points, clustering="global", min_size=50, flips=False, draws=8)
    record = dict(
        model=dict(sha256="abc"),
        settings=dict(settings, binarize_at=0.75, seed=0),
        folds=[list(fold) for fold in TEST_FOLDS],
        tuning=dict(choices=choices, scores=[[[0.4]], [[0.5]]], bandwidths=[1.5], thresholds=[2.0]),
        rows=[dict(name="deterministic", avAP=0.5), dict(name="mc", avAP=0.6)],
    )
    (tmp_path / "results" / "concrete").mkdir(parents=True)
    (tmp_path / "results" / "concrete" / "results.json").write_text(json.dumps(record))
    save_recipes("concrete", record, "concrete", tmp_path / "shelf")
    return dict(directory=tmp_path / "results", pretrained_dir=tmp_path / "shelf")


def test_each_fold_gets_the_choice_applied_to_it(tmp_path):
    where = _committed(tmp_path)
    first = segmentation_settings("concrete", TEST_FOLDS[0][0], **where)
    second = segmentation_settings("concrete", TEST_FOLDS[1][3], **where)
    assert first[:3] == (1.5, 2.0, 8000) and second[:3] == (3.0, 1.0, 8000)
    assert "row concrete/deterministic" in first.source and f"holds {TEST_FOLDS[0][0]}" in first.source
    assert first.record["settings"]["max_points"] == 8000


def test_defaults_when_not_committed_missing_or_not_a_test_well(tmp_path):
    where = _committed(tmp_path)
    well = TEST_FOLDS[0][0]
    retrained = segmentation_settings("concrete", well, committed=False, default=(1.0, 4.0), **where)
    assert retrained == (1.0, 4.0, Recipe().max_points, retrained.source, None)
    assert retrained.source == "no committed choice for this model: bandwidth 1, threshold 4"
    missing = segmentation_settings("baseline", well, **where)
    assert missing.record is None and missing[:2] == (Recipe().bandwidth, Recipe().threshold)
    assert "has no recipes" in missing.source
    training_well = segmentation_settings("concrete", "A01", **where)
    assert training_well.record is None and training_well.bandwidth == Recipe().bandwidth


@pytest.mark.parametrize("max_points", [None, 5000])
def test_max_points_is_the_committed_one_even_when_none(tmp_path, max_points):
    where = _committed(tmp_path, max_points=max_points)
    assert segmentation_settings("concrete", TEST_FOLDS[1][0], **where).max_points == max_points


@pytest.mark.realdata
@pytest.mark.slow
def test_live_evaluation_runs_the_pipeline_on_the_first_well_of_each_fold(
    bbbc010_root, monkeypatch, tmp_path
):
    from companion.book.chapters import live_evaluation

    monkeypatch.setenv("BBBC010_ROOT", str(bbbc010_root))
    live = live_evaluation("concrete", n_per_fold=1, retrain=True, quick=True, cache_dir=tmp_path)
    wells = [s.well for s in live.samples]
    assert wells == [TEST_FOLDS[0][0], TEST_FOLDS[1][0]]
    defaults = Recipe()  # a model trained here: the shipped model's recipe does not apply
    assert live.params == {w: (defaults.bandwidth, defaults.threshold) for w in wells}
    assert live.settings["draws"] == 8 and live.settings["max_points"] == defaults.max_points
    assert len(live.preds) == len(live.scores) == len(live.probs) == 2
    for masks, scores, probs, gt in zip(live.preds, live.scores, live.probs, live.gts):
        assert masks.dtype == bool and len(masks) == len(scores) and masks.shape[1:] == gt.shape[1:]
        assert probs.shape[1:] == gt.shape[1:] and ((probs >= 0) & (probs <= 1)).all()
    assert len(live.report.splitlines()) == 3 and "trained here" in live.description
    assert sorted(p.name for p in (tmp_path / "concrete").glob("*.npz")) == sorted(f"{w}.npz" for w in wells)


def test_training_times_read_in_hours_minutes_or_seconds():
    from companion.book.chapters import _hours

    assert [_hours(s) for s in (7200, 2999, 59, None)] == ["2.0 h", "50 min", "59 s", "time not recorded"]
