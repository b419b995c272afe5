"""A few GPU minutes as a new training stage of the shipped models: train, select, export, evaluate.

Usage::

    # once, where the data is: the wells as one file (a GPU machine may see only the working tree)
    python -m companion pack data_pack/bbbc010.npz --data-root BBBC010_DIR

    # with the GPU (default: 8 minutes for everything, both models):
    python scripts/gpu_run.py --out DIR [--budget-min 9] [--models baseline concrete]

    # anywhere, end to end on the CPU in a few minutes (synthetic worms, a few iterations):
    python scripts/gpu_run.py --out DIR --smoke

The run is a sequence of package commands, each a child process with its share of the budget
(``--budget-min`` counts from the start; what no longer fits is skipped and named):

1. ``python -m companion train`` per model (``--models``, in turn, sharing the budget):
   by default a new stage on top of the shipped weights (``--init-from shipped``) with the
   objective of their last stage (overlap weight 5; dropout-rate learning rate x10 for the
   Concrete model), batch ``--batch`` (16) at learning rate ``3e-4 * sqrt(batch)`` (the shipped
   stages' rate with the square-root rule; batches 1-16 at an equal number of crops in
   ``results/short_runs/batch_sweep.csv``), warm-up and cosine decay sized by the run itself to
   its share (``--time-budget``), GPU augmentation, bf16; the weights are scored on the
   validation wells at the start and every ~``--select-every`` seconds (``--select-every``:
   the fast protocol of :mod:`companion.training.selection`), the best kept as ``best.pt``;
2. when a snapshot beat the starting weights: ``scripts/export_pretrained.py`` exports it with
   the background-logit shift chosen on the validation wells (for the Concrete model on 8
   Monte-Carlo draws) and the shipped model's stages as its history;
3. ``python -m companion evaluate`` of the exported model on the test wells with the settings
   of each committed ``results/<name>*/`` row (best rows first), in child processes that
   overlap the next model's training; one still running at the end of the budget is stopped.

``DIR`` receives at most 8 files, each under 16 MiB, written as soon as they exist:
``summary.json`` (every number), ``run.log``, ``<model>.pt`` / ``<model>.json`` (exported
models) and ``<model>_run.zip`` (training and selection logs, evaluation reports).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PROCESS_START = time.monotonic()
REPO = Path(__file__).resolve().parents[1]
#: Where ``python -m companion pack`` writes the archive by default here (git-ignored).
DEFAULT_ARCHIVE = REPO / "data_pack" / "bbbc010.npz"
MAX_OUT_BYTES = 16 * 2**20
MODELS = ("baseline", "concrete")
#: Learning rate of the shipped models' later stages (batch 1); a stage at batch ``B`` uses
#: ``CONTINUE_LR * sqrt(B)``.
CONTINUE_LR = 3e-4
#: Objective settings of the shipped models' last stages, kept by a stage on top of them.
STAGE_OPTIONS = {
    "baseline": ["--overlap-weight", "5"],
    "concrete": ["--overlap-weight", "5", "--dropout-lr-scale", "10"],
}
#: The committed evaluation rows replayed for each model, best rows first.
ROWS = ("{}_components_flips", "{}", "{}_components")


@dataclass(frozen=True)
class Plan:
    """What a run does: the full run on a GPU, or the smoke run on the CPU."""

    smoke: bool
    data: list[str]  # the data option of every command
    val_wells: int  # validation wells the export calibrates on (0: none)
    train_extra: list[str]  # further train options
    eval_extra: list[str]  # further evaluate options (after the committed row's)
    draws: int  # Monte-Carlo draws of the Concrete model's calibration
    startup_s: float  # a command's start (imports, data, CUDA)
    export_s: float
    eval_reserve_s: float  # kept after the last training for its evaluation


def plan_for(args: argparse.Namespace) -> Plan:
    """The plan of parsed arguments."""
    archive = args.data or DEFAULT_ARCHIVE
    if args.smoke:
        data = ["--data-root", str(archive)] if args.data else ["--synthetic", "3"]
        return Plan(
            smoke=True,
            data=data,
            val_wells=1 if args.data else 0,
            train_extra=[
                "--crop-size",
                "64",
                "--iterations",
                "6",
                "--checkpoint-every",
                "2",
                "--log-every",
                "1",
            ],
            eval_extra=["--bandwidths", "1.5", "--thresholds", "2", "--draws", "2", "--max-points", "2000"],
            draws=2,
            startup_s=5,
            export_s=15,
            eval_reserve_s=40,
        )
    return Plan(
        smoke=False,
        data=["--data-root", str(archive)],
        val_wells=10,
        train_extra=["--iterations", "1000000", "--checkpoint-every", "500", "--log-every", "50"],
        eval_extra=[],
        draws=8,
        startup_s=15,
        export_s=30,
        eval_reserve_s=150,
    )


def companion(*args: str) -> list[str]:
    """A package command line run with this interpreter."""
    return [sys.executable, "-m", "companion", *args]


@dataclass
class Run:
    """The output folder, the work folder, the budget and the summary (rewritten on each change)."""

    out: Path
    work: Path
    budget_s: float
    started: float
    summary: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f} s] {message}"
        print(line, flush=True)
        with open(self.out / "run.log", "a") as handle:
            handle.write(line + "\n")

    def save(self) -> None:
        from companion._io import atomic_write_bytes

        self.summary["elapsed_s"] = round(time.monotonic() - self.started, 1)
        atomic_write_bytes(self.out / "summary.json", (json.dumps(self.summary, indent=1) + "\n").encode())

    def record(self, model: str, phase: str, **details: Any) -> None:
        self.summary.setdefault("models", {}).setdefault(model, {})[phase] = details
        self.save()

    def start(self, model: str, phase: str, argv: list[str], threads: int | None = None) -> subprocess.Popen:
        """Start a command; its output goes to ``work/<model>/<phase>.log``."""
        log = self.work / model / f"{phase}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            MPLBACKEND="Agg",
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        )
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.log(f"{model}: {phase}: {shlex.join(argv[1:])}")
        with open(log, "w") as handle:
            return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))

    def finish(self, model: str, phase: str, child: subprocess.Popen, timeout: float) -> bool:
        """Wait for a command until ``timeout`` (then stop it); whether it succeeded."""
        started = time.monotonic()
        try:
            child.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        log = self.work / model / f"{phase}.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
        if child.returncode != 0:
            self.log(f"{model}: {phase} ended with exit code {child.returncode}: {' | '.join(tail)}")
        self.summary.setdefault("commands", []).append(
            dict(
                model=model,
                phase=phase,
                returncode=child.returncode,
                waited_s=round(time.monotonic() - started, 1),
                tail=tail,
            )
        )
        self.save()
        return child.returncode == 0


def train_argv(args: argparse.Namespace, plan: Plan, model: str, minutes: float, folder: Path) -> list[str]:
    """``python -m companion train`` of one model for ``minutes``."""
    argv = companion(
        "train", "--preset", "cpu", "--model", model, "--out", str(folder), "--no-progress", *plan.data
    )
    argv += [
        "--batch-size",
        str(args.batch),
        "--time-budget",
        f"{minutes:.3f}",
        "--downsample",
        str(args.downsample),
    ]
    argv += ["--select-every", f"{args.select_every:g}"]
    if args.init_from != "scratch":
        source = model if args.init_from == "shipped" else args.init_from
        argv += [
            "--init-from",
            source,
            "--lr",
            f"{CONTINUE_LR * math.sqrt(args.batch):.3g}",
            "--disc-warmup",
            "0",
        ]
        argv += ["--lr-warmup", "50"] + STAGE_OPTIONS[model]
    if args.device:
        argv += ["--device", args.device]
    return argv + plan.train_extra


#: The validation avAP (fast protocol) a snapshot must gain over the starting weights to count as
#: better. Measured on a CPU rehearsal of the recipe (results/short_runs/base_s5_b8_snapshots.csv,
#: results/TRAINING.md, recipe 9): late snapshots of one run jitter within 0.005, the two
#: validation protocols differ by up to 0.04 on one snapshot, and the best snapshot's +0.013
#: on the validation wells came out 0.007 below the start on the test wells.
MIN_GAIN = 0.02


def selection_of(folder: Path, min_gain: float = MIN_GAIN) -> dict:
    """What the run's validation scores say: the start, the best, and whether it beat the start
    by at least ``min_gain``."""
    from companion.training.selection import read_selection

    records = read_selection(folder)
    if not records:
        return dict(scores=[], improved=False)
    best = max(records, key=lambda r: r["avAP"])
    first = records[0]
    return dict(
        scores=records,
        start=first,
        best=best,
        improved=best["iteration"] > 0 and best["avAP"] >= first["avAP"] + min_gain,
    )


def command_of(argv: Sequence[str]) -> str:
    """The run's command line as provenance: its folders as names, not as this machine's paths."""
    words, hide = ["python", "scripts/gpu_run.py"], {"--out": "DIR", "--work": None, "--data": "ARCHIVE"}
    argv = list(argv)
    for i, word in enumerate(argv):
        if i and argv[i - 1] in hide:
            if hide[argv[i - 1]]:
                words.append(hide[argv[i - 1]])
        elif word != "--work":
            words.append(word)
    return shlex.join(words)


def export_argv(
    args: argparse.Namespace, plan: Plan, model: str, checkpoint: Path, folder: Path
) -> list[str]:
    argv = [sys.executable, str(REPO / "scripts" / "export_pretrained.py"), "--checkpoint", str(checkpoint)]
    argv += [
        "--name",
        model,
        "--out-dir",
        str(folder),
        "--command",
        command_of(args.argv),
    ]
    if plan.val_wells:
        argv += ["--calibrate", str(plan.val_wells), *plan.data[:2]]
        if model == "concrete":
            argv += ["--calibrate-draws", str(plan.draws)]
    source = model if args.init_from == "shipped" else args.init_from
    shipped = REPO / "companion" / "pretrained" / f"{source}.json"
    if source in MODELS and shipped.is_file():  # the shipped model's stages are this one's history
        argv += ["--earlier-stage", str(shipped)]
    return argv


def evaluate_argvs(plan: Plan, model: str, models_dir: Path, work: Path) -> list[tuple[str, list[str]]]:
    """``(row, argv)`` of each committed row of ``model`` replayed on the exported weights."""
    rows = []
    for row in (pattern.format(model) for pattern in ROWS):
        committed = REPO / "results" / row / "results.json"
        if not committed.is_file():
            continue
        options = shlex.split(json.loads(committed.read_text())["command"])[4:]  # after "evaluate"
        kept, skip = [], False
        for word in options:  # drop the committed model and folder
            if skip:
                skip = False
            elif word in ("--pretrained", "--out", "--checkpoint", "--pretrained-dir"):
                skip = True
            else:
                kept.append(word)
        argv = companion("evaluate", "--pretrained", model, "--pretrained-dir", str(models_dir), *kept)
        rows.append((row, argv + ["--out", str(work / model / row), *plan.data, *plan.eval_extra]))
    return rows


def rows_of(folder: Path) -> list[dict]:
    """Table 1 rows of an evaluation folder."""
    result = folder / "results.json"
    if not result.is_file():
        return []
    return [
        {k: r[k] for k in ("name", "avAP", "AP50", "AP75", "recall80", "avAP_dsb") if k in r}
        for r in json.loads(result.read_text())["rows"]
    ]


def write_model_zip(run: Run, model: str) -> None:
    """``out/<model>_run.zip``: logs, scores and evaluation reports (figures dropped if too big)."""
    from companion._io import atomic_write

    base = run.work / model
    files = [
        p
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.suffix in (".jsonl", ".json", ".csv", ".png", ".log")
    ]
    for skip_png in (False, True):
        chosen = [p for p in files if not (skip_png and p.suffix == ".png")]

        def write(tmp: str, chosen: list[Path] = chosen) -> None:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for path in chosen:
                    archive.write(path, path.relative_to(base))

        if atomic_write(run.out / f"{model}_run.zip", write).stat().st_size < MAX_OUT_BYTES:
            return


def run_model(
    run: Run, args: argparse.Namespace, plan: Plan, model: str, seconds: float, evaluations: list
) -> None:
    """Train ``model`` for ``seconds``; export and start evaluating its best snapshot if it beat the start."""
    folder = run.work / model / "train"
    child = run.start(model, "train", train_argv(args, plan, model, seconds / 60, folder))
    run.finish(model, "train", child, seconds + 60)
    log = folder / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    selection = selection_of(folder, args.min_gain)
    run.record(
        model,
        "training",
        budget_s=round(seconds, 1),
        iterations=records[-1]["iteration"] if records else 0,
        crops_per_s=round(args.batch * records[-1]["it_per_s"], 1) if records else None,
        final_loss={k: records[-1][k] for k in ("total", "var", "dist", "ce")} if records else None,
        selection=selection,
    )
    write_model_zip(run, model)
    if not (folder / "best.pt").is_file() or (args.init_from != "scratch" and not selection["improved"]):
        run.log(
            f"{model}: no snapshot beat the starting weights by {args.min_gain:g} validation avAP; "
            f"nothing exported"
        )
        return
    best = selection["best"]
    run.log(
        f"{model}: best snapshot at iteration {best['iteration']}: validation avAP {best['avAP']:.3f} (start {selection['start']['avAP']:.3f})"
    )
    models_dir = run.work / "models"
    child = run.start(model, "export", export_argv(args, plan, model, folder / "best.pt", models_dir))
    if not run.finish(model, "export", child, min(run.left(), 4 * plan.export_s)):
        return
    for suffix in (".pt", ".json"):
        shutil.copyfile(models_dir / f"{model}{suffix}", run.out / f"{model}{suffix}")
    threads = max(1, (os.cpu_count() or 2) // (2 * len(ROWS)))
    for row, argv in evaluate_argvs(plan, model, models_dir, run.work):
        evaluations.append((model, row, run.start(model, f"evaluate {row}", argv, threads=threads)))


def _terminate(signum, frame) -> None:  # a SIGTERM from outside: unwind, keep what we have
    raise SystemExit(128 + signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Continue the shipped models on one GPU within a time budget: train, keep the best "
        "validation snapshot, export and evaluate it (package commands in turn).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="empty folder for the (at most 8) result files"
    )
    parser.add_argument("--budget-min", type=float, default=8.0, help="wall-clock minutes for everything")
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="one may take the whole budget"
    )
    parser.add_argument(
        "--init-from",
        default="shipped",
        help="shipped: each model continues from its shipped weights; scratch: fresh weights; or a "
        "shipped model's name or a checkpoint for every model",
    )
    parser.add_argument(
        "--batch", type=int, default=16, help="crops per step (learning rate 3e-4 * sqrt(batch))"
    )
    parser.add_argument(
        "--downsample", type=int, choices=(1, 2), default=2, help="1: the network at full resolution"
    )
    parser.add_argument("--select-every", type=float, default=60.0, help="seconds between validation scores")
    parser.add_argument(
        "--min-gain",
        type=float,
        default=MIN_GAIN,
        help="validation avAP a snapshot must gain over the start to be exported and evaluated",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help=f"data archive (default {DEFAULT_ARCHIVE.relative_to(REPO)})"
    )
    parser.add_argument("--device", default=None, help="default: CUDA when present")
    parser.add_argument(
        "--smoke", action="store_true", help="synthetic worms (or --data), few iterations, on the CPU"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for checkpoints and reports (default: temporary)"
    )
    return parser


def main(argv: Sequence[str] | None = None, *, started: float | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    plan = plan_for(args)
    if not plan.smoke and not (args.data or DEFAULT_ARCHIVE).is_file():
        archive = args.data or DEFAULT_ARCHIVE
        print(
            f"error: no data archive at {archive}: write it with `python -m companion pack {archive}`",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.iterdir()):
        print(f"error: {args.out} is not empty; choose an empty folder", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_run_"))
    run = Run(args.out, work, args.budget_min * 60, started if started is not None else time.monotonic())
    run.summary.update(status="running", argv=argv, plan=dict(vars(plan)), budget_s=run.budget_s)
    previous = signal.signal(signal.SIGTERM, _terminate)
    evaluations: list[tuple[str, str, subprocess.Popen]] = []
    try:
        _run(run, args, plan, evaluations)
        run.summary["status"] = "complete"
    except SystemExit:
        run.summary["status"] = "terminated"
        raise
    finally:
        for _, _, child in evaluations:
            if child.poll() is None:
                child.kill()
                child.wait()
        signal.signal(signal.SIGTERM, previous)
        run.summary["files"] = sorted(p.name for p in args.out.iterdir())
        run.save()
    return 0


def _run(run: Run, args: argparse.Namespace, plan: Plan, evaluations: list) -> None:
    import torch

    run.summary["environment"] = dict(
        torch=str(torch.__version__),
        device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        cpu_count=os.cpu_count(),
    )
    models = [m for m in MODELS if m in args.models]
    for index, model in enumerate(models):
        later = len(models) - index - 1
        seconds = (run.left() - plan.eval_reserve_s - (later + 1) * (plan.export_s + plan.startup_s)) / (
            later + 1
        )
        if seconds < plan.startup_s + 10:
            run.log(f"{model}: skipped, {run.left():.0f} s left")
            run.record(model, "training", skipped=True, left_s=round(run.left(), 1))
            continue
        run_model(run, args, plan, model, seconds, evaluations)
    for model, row, child in evaluations:
        if run.finish(model, f"evaluate {row}", child, run.left() - 5):
            run.summary["models"][model].setdefault("rows", {})[row] = rows_of(run.work / model / row)
    for model in dict.fromkeys(model for model, _, _ in evaluations):  # once each, with every report
        write_model_zip(run, model)
    run.save()
    for info in run.summary.get("models", {}).values():
        for row, values in info.get("rows", {}).items():
            run.log(
                f"{row}: "
                + ", ".join(f"{r['name']} avAP {r['avAP']:.3f} AP50 {r['AP50']:.3f}" for r in values)
            )


if __name__ == "__main__":
    sys.exit(main(started=_PROCESS_START))
