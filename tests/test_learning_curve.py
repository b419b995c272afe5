"""scripts/learning_curve.py: argument checks that need no data."""

from __future__ import annotations

import importlib.util

from conftest import REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location(
        "learning_curve", REPO_ROOT / "scripts" / "learning_curve.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_start_minutes_must_match_the_runs(tmp_path, capsys):
    code = _script().main(
        [
            "--runs",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--start-minutes",
            "98",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "--start-minutes has 1 values for 2 runs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_minutes_are_summed_over_logged_windows():
    log = [
        dict(iteration=50, it_per_s=1.0),
        dict(iteration=100, it_per_s=0.5),
        dict(iteration=150, it_per_s=2.0),
    ]
    minutes, record = _script()._minutes_at(log, 100)
    assert minutes == (50 / 1.0 + 50 / 0.5) / 60
    assert record["iteration"] == 100  # the losses logged at the snapshot, not after it
