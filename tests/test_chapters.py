"""companion.chapters.segmentation_settings: the committed choice for a well, or the defaults."""

from __future__ import annotations

import json

import pytest

from companion.chapters import segmentation_settings
from companion.data import TEST_FOLDS


def _committed(tmp_path, max_points=8000):
    folder = tmp_path / "concrete"
    folder.mkdir()
    choices = [
        dict(tuned_on=1, applied_to=0, bandwidth=1.5, threshold=2.0, tuning_score=0.4),
        dict(tuned_on=0, applied_to=1, bandwidth=3.0, threshold=1.0, tuning_score=0.5),
    ]
    record = dict(tuning=dict(choices=choices), settings=dict(max_points=max_points))
    (folder / "results.json").write_text(json.dumps(record))
    return tmp_path


def test_each_fold_gets_the_choice_applied_to_it(tmp_path):
    results_dir = _committed(tmp_path)
    first = segmentation_settings("concrete", TEST_FOLDS[0][0], directory=results_dir)
    second = segmentation_settings("concrete", TEST_FOLDS[1][3], directory=results_dir)
    assert first[:3] == (1.5, 2.0, 8000) and second[:3] == (3.0, 1.0, 8000)
    assert "chosen on test fold 1" in first.source and f"holds {TEST_FOLDS[0][0]}" in first.source
    assert first.record["settings"]["max_points"] == 8000


def test_defaults_when_not_committed_missing_or_not_a_test_well(tmp_path):
    results_dir = _committed(tmp_path)
    well = TEST_FOLDS[0][0]
    retrained = segmentation_settings(
        "concrete", well, committed=False, default=(1.0, 4.0), default_max_points=None, directory=results_dir
    )
    assert retrained == (1.0, 4.0, None, retrained.source, None)
    assert retrained.source == "no committed choice for this model: bandwidth 1, threshold 4"
    missing = segmentation_settings("baseline", well, directory=results_dir)
    assert missing.record is None and missing[:3] == (2.0, 2.0, 20_000)
    assert "results.json not found" in missing.source
    training_well = segmentation_settings("concrete", "A01", directory=results_dir)
    assert training_well.record is None and training_well.bandwidth == 2.0


@pytest.mark.parametrize("max_points", [None, 5000])
def test_max_points_is_the_committed_one_even_when_none(tmp_path, max_points):
    results_dir = _committed(tmp_path, max_points=max_points)
    assert segmentation_settings("concrete", TEST_FOLDS[1][0], directory=results_dir).max_points == max_points


@pytest.mark.realdata
@pytest.mark.slow
def test_live_evaluation_runs_the_pipeline_on_the_first_well_of_each_fold(
    bbbc010_root, monkeypatch, tmp_path
):
    from companion.chapters import live_evaluation

    monkeypatch.setenv("BBBC010_ROOT", str(bbbc010_root))
    live = live_evaluation("concrete", n_per_fold=1, retrain=True, quick=True, cache_dir=tmp_path)
    wells = [s.well for s in live.samples]
    assert wells == [TEST_FOLDS[0][0], TEST_FOLDS[1][0]]
    # a model trained here: the shipped model's committed choice does not apply
    assert live.params == {w: (2.0, 2.0) for w in wells} and live.settings["draws"] == 8
    assert len(live.preds) == len(live.scores) == len(live.probs) == 2
    for masks, scores, probs, gt in zip(live.preds, live.scores, live.probs, live.gts):
        assert masks.dtype == bool and len(masks) == len(scores) and masks.shape[1:] == gt.shape[1:]
        assert probs.shape[1:] == gt.shape[1:] and ((probs >= 0) & (probs <= 1)).all()
    assert len(live.report.splitlines()) == 3 and "trained here" in live.description
    assert sorted(p.name for p in (tmp_path / "concrete").glob("*.npz")) == sorted(f"{w}.npz" for w in wells)


def test_training_times_read_in_hours_minutes_or_seconds():
    from companion.chapters import _hours

    assert [_hours(s) for s in (7200, 2999, 59, None)] == ["2.0 h", "50 min", "59 s", "time not recorded"]
