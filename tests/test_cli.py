"""The command line: ``python -m companion train ...``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from companion.cli import build_parser, main
from companion.cli.train import config_from_args
from companion.training.checkpoint import read_checkpoint
from companion.training.config import TrainConfig
from companion.training.run_folder import read_log

QUICK = [
    "--preset",
    "quick",
    "--crop-size",
    "32",
    "--checkpoint-every",
    "2",
    "--log-every",
    "1",
    "--no-progress",
]


def _subcommand_parser(name: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


@pytest.mark.parametrize("command, n_options", [("train", 15), ("evaluate", 15)])
def test_every_option_is_explained_in_help(command, n_options):
    parser = _subcommand_parser(command)
    help_text = parser.format_help()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= n_options
    for action in options:
        assert action.help and len(action.help) > 10, action.option_strings
        assert action.option_strings[-1] in help_text


def test_options_override_the_preset():
    args = build_parser().parse_args(
        [
            "train",
            "--preset",
            "cpu",
            "--out",
            "x",
            "--model",
            "baseline",
            "--iterations",
            "7",
            "--seed",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "0.01",
            "--no-amp",
            "--no-augment",
            "--overlap-weight",
            "5",
            "--compile",
        ]
    )
    expected = TrainConfig.preset(
        "cpu",
        model="baseline",
        iterations=7,
        seed=3,
        batch_size=4,
        lr=0.01,
        amp=False,
        augment=False,
        overlap_weight=5.0,
        compile=True,
    )
    assert config_from_args(args) == expected
    untouched = config_from_args(build_parser().parse_args(["train", "--preset", "colab", "--out", "x"]))
    assert untouched == TrainConfig.preset("colab")


def test_bad_arguments_exit_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["train", "--out", "x", "--iterations", "0"])
    assert err.value.code == 2
    assert "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x", "--synthetic", "2", "--data-root", "y"])
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # a command is required


def test_train_on_synthetic_data_then_resume_to_more_iterations(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--synthetic", "2", "--iterations", "2", "--out", str(out)]) == 0
    assert f"final checkpoint: {out / 'final.pt'}" in capsys.readouterr().out
    assert read_checkpoint(out / "final.pt")["iteration"] == 2
    assert (
        main(["train", *QUICK, "--synthetic", "2", "--iterations", "4", "--resume", "--out", str(out)]) == 0
    )
    assert read_checkpoint(out / "final.pt")["iteration"] == 4
    assert [r["iteration"] for r in read_log(out)] == [1, 2, 3, 4]
    with pytest.warns(UserWarning, match="already at iteration 4 >= iterations=3: nothing to train"):
        assert (
            main(["train", *QUICK, "--synthetic", "2", "--iterations", "3", "--resume", "--out", str(out)])
            == 0
        )
    assert read_checkpoint(out / "final.pt")["iteration"] == 4


def test_existing_run_without_resume_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--synthetic", "2", "--iterations", "1", "--out", str(out)]) == 0
    assert main(["train", *QUICK, "--synthetic", "2", "--iterations", "2", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_python_dash_m_companion_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "companion", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert "--synthetic" in done.stdout and "torchrun" in done.stdout


@pytest.mark.realdata
@pytest.mark.slow
def test_train_on_the_bbbc010_training_wells(bbbc010_root, tmp_path):
    out = tmp_path / "real"
    assert (
        main(["train", *QUICK, "--data-root", str(bbbc010_root), "--iterations", "1", "--out", str(out)]) == 0
    )
    ckpt = read_checkpoint(out / "final.pt")
    assert ckpt["iteration"] == 1 and ckpt["config"]["crop_size"] == 32


@pytest.mark.parametrize(
    "command",
    [
        ["train", *QUICK, "--synthetic", "2"],
        ["evaluate", "--pretrained", "baseline"],
        ["predict", "--pretrained", "baseline", "--wells", "C03"],
    ],
)
def test_an_unwritable_out_fails_before_any_work(tmp_path, capsys, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main([*command, "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to the output folder") and str(blocker / "out") in err
    assert err.count("\n") == 1  # one line, no traceback


def test_package_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("just some text\n")
    assert main(["evaluate", "--checkpoint", str(text), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "notes.pt" in err and err.count("\n") == 1
    assert (
        main(
            [
                "train",
                *QUICK,
                "--synthetic",
                "2",
                "--iterations",
                "1",
                "--device",
                "banana",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "banana" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--crop-size", "17"], "crop_size must be a multiple of 16"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--data-root", "no/such/root"], "no/such/root"),
        (["--init-from", "TEXT"], "notes.pt"),
    ],
)
def test_bad_training_settings_are_one_line_with_exit_code_2(tmp_path, capsys, extra, says):
    text = tmp_path / "notes.pt"
    text.write_text("just some text\n")
    extra = [str(text) if e == "TEXT" else e for e in extra]
    data = [] if "--data-root" in extra else ["--synthetic", "2"]
    assert main(["train", *QUICK, *data, "--iterations", "1", *extra, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1


def test_a_truncated_last_checkpoint_on_resume_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--synthetic", "2", "--iterations", "2", "--out", str(out)]) == 0
    whole = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    assert (
        main(["train", *QUICK, "--synthetic", "2", "--iterations", "4", "--resume", "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "last.pt" in err and err.count("\n") == 1


def test_a_real_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr("companion.training.train.train", broken)  # the train command imports it on use
    with pytest.raises(KeyError, match="a bug"):
        main(["train", *QUICK, "--synthetic", "2", "--iterations", "1", "--out", str(tmp_path / "run")])


def test_an_earlier_log_needs_overwrite_and_a_locked_out_is_one_line(tmp_path, capsys):
    from companion.training.run_folder import lock_run_folder

    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"iteration": 1, "total": 2.0}\n')
    assert main(["train", *QUICK, "--synthetic", "2", "--iterations", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "log.jsonl" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "log.jsonl").read_text() == '{"iteration": 1, "total": 2.0}\n'
    with pytest.raises(SystemExit):  # continue and replace at once: a usage error
        build_parser().parse_args(["train", "--out", "x", "--resume", "--overwrite"])
    with pytest.warns(UserWarning, match="overwrite: removed"):
        assert (
            main(["train", *QUICK, "--synthetic", "2", "--iterations", "1", "--overwrite", "--out", str(out)])
            == 0
        )
    assert [r["iteration"] for r in read_log(out)] == [1]
    capsys.readouterr()
    with lock_run_folder(out):  # another training holds the folder
        assert (
            main(["train", *QUICK, "--synthetic", "2", "--iterations", "2", "--resume", "--out", str(out)])
            == 2
        )
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} is in use by another training process (pid {os.getpid()}")
    assert err.count("\n") == 1


def test_settings_and_files_the_commands_check(tmp_path, capsys):
    import json
    import shutil

    import tifffile
    from test_data import write_copy

    from companion.pretrained import PRETRAINED_DIR

    image = tmp_path / "x.tif"
    tifffile.imwrite(image, np.zeros((2, 32, 48), np.uint16), photometric="minisblack")
    predict = ["predict", "--pretrained", "baseline", "--images", str(image), "--out", str(tmp_path / "p")]
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    for suffix in (".pt", ".json", ".recipe.json"):
        shutil.copy(PRETRAINED_DIR / f"baseline{suffix}", shelf / f"baseline{suffix}")
    recipes = json.loads((shelf / "baseline.recipe.json").read_text())
    best = recipes["rows"][recipes["best"]]["recipe"]
    for content, expected in (
        ("{", "is not a readable recipe file"),
        ("[]", "is not a recipe file"),
        (dict(recipes, rows={recipes["best"]: dict(recipe=dict(best, draws=8))}), "unknown recipe setting"),
        (dict(recipes, rows={recipes["best"]: dict(recipe=dict(best, views=3))}), "views=3 is out of range"),
        (dict(recipes, model_sha256="0" * 64), "holds the recipes of other weights"),
    ):
        text = content if isinstance(content, str) else json.dumps(content)
        (shelf / "baseline.recipe.json").write_text(text)
        assert main([*predict, "--pretrained-dir", str(shelf)]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    assert (
        main(["predict", "--pretrained", "baseline", "--images", str(tmp_path), "--out", str(tmp_path / "q")])
        == 2
    )
    assert "is a folder: name the image files in it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["evaluate", "--pretrained", "baseline", "--draws", "1000000000", "--out", "o"]
        )
    assert "an integer from 0 to 256" in capsys.readouterr().err
    parsed = build_parser().parse_args(["evaluate", "--pretrained", "concrete_snapshot", "--out", "o"])
    assert parsed.pretrained == "concrete_snapshot"  # any model in the folder, not only two names
    write_copy(tmp_path / "bbbc" / "images", tmp_path / "bbbc" / "masks_eachworm", {"A01": [1], "A02": [2]})
    train = [
        "train",
        *QUICK,
        "--iterations",
        "1",
        "--data-root",
        str(tmp_path / "bbbc"),
        "--out",
        str(tmp_path / "t"),
    ]
    with pytest.warns(UserWarning, match="skipped"):
        assert main(train) == 2
    assert "38 of the 40 training wells could not be loaded" in capsys.readouterr().err


def test_init_from_a_concrete_model_into_a_baseline_drops_only_the_rates(tmp_path):
    import torch

    from companion.data.synthetic import make_dataset
    from companion.model.unet import UNet
    from companion.training.checkpoint import init_weights
    from companion.training.config import TrainConfig
    from companion.training.train import train

    config = TrainConfig.preset("quick", iterations=1, checkpoint_every=1, log_every=1)
    final = train(config, make_dataset(2, seed=0, shape=(96, 96)), tmp_path, progress=False)
    kwargs = {**config.model_kwargs(), "dropout": None}
    baseline = UNet(**kwargs)
    init_weights(baseline, final)
    source = torch.load(final, weights_only=True)["model"]
    assert all(torch.equal(v, source[k]) for k, v in baseline.state_dict().items())
    with pytest.raises(ValueError, match=r"the source has \{'base_filters'"):
        init_weights(UNet(**{**kwargs, "base_filters": kwargs["base_filters"] + 2}), final)


def test_resuming_with_other_data_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    run = ["train", *QUICK, "--iterations", "2", "--out", str(out)]
    assert main([*run, "--synthetic", "2"]) == 0
    record = (out / "data.json").read_text()
    assert (
        main(["train", *QUICK, "--iterations", "4", "--out", str(out), "--synthetic", "3", "--resume"]) == 2
    )
    err = capsys.readouterr().err
    assert "was trained on other data (2 images" in err and "now 3" in err and err.count("\n") == 1
    assert (
        main(["train", *QUICK, "--iterations", "4", "--out", str(out), "--synthetic", "2", "--resume"]) == 0
    )
    assert (out / "data.json").read_text() == record


def test_a_sigterm_ends_a_command_in_one_line_in_another_process(tmp_path):
    import signal
    import time

    script = (
        "import sys, time\n"
        "import companion.cli.evaluate as ev\n"
        "from companion.cli import main\n"
        "ev._evaluate_locked = lambda *a: (print('started', flush=True), time.sleep(60))\n"
        f"sys.exit(main(['evaluate', '--pretrained', 'baseline', '--synthetic', '2', '--out', {str(tmp_path)!r}]))\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    assert child.stdout.readline().strip() == "started"  # it holds the folder's lock now
    assert main(["evaluate", "--pretrained", "baseline", "--synthetic", "2", "--out", str(tmp_path)]) == 2
    child.send_signal(signal.SIGTERM)
    start = time.monotonic()
    _, err = child.communicate(timeout=30)
    assert child.returncode == 130 and time.monotonic() - start < 30
    assert err.startswith("error: interrupted;") and err.count("\n") == 1, err
