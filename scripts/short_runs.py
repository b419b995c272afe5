"""Why short GPU runs failed, answered on the CPU: the two augmentation paths, and batch size.

Two experiments on the BBBC010 fitting wells, scored on the validation wells
(:data:`companion.data.bbbc010.VAL_WELLS`, never the test wells):

``parity``
    (1) Crops of the scipy path (:class:`companion.data.augment.WormCropDataset`) and of the torch
    path (:class:`companion.data.augment_torch.DeviceCropSource`, what a GPU run uses) side by side:
    per-channel intensity mean and standard deviation, the class frequencies of the 3-class
    target and the worms per crop. (2) The same short recipe trained with either path
    (``--seeds`` seeds): the ``cpu`` preset at ``--crop-size``, ``--iterations`` steps.
``batch``
    Steps against batch at an equal number of crops: batch ``B`` runs ``crops / B`` steps at
    learning rate ``lr * sqrt(B)`` (the square-root rule of Adam-type optimisers; warm-up a
    fixed 4 % of the steps), torch path.
``snapshots``
    The snapshots of a run (``--run DIR``: its ``iter_*.pt`` and ``final.pt``) and the model it
    started from (``--init-from``), each scored twice: by the fast protocol of
    :mod:`companion.training.selection` (what ``train --select-every`` uses) and by the protocol below.
    How far the two protocols and neighbouring snapshots disagree is the noise a selection
    works against.

Each trained model is scored by its deterministic pass on the validation wells: the pixel F1 of
the foreground without any calibration (``F1 unshifted``) and with the background shift chosen
on the first five of them (as the export and the learning curves do), and avAP / AP50 per
component over a small grid (bandwidth 1.5 / 2, threshold 1.5 / 3, 2-fold over the validation
wells). Writes ``<out>/<experiment>.csv``
and prints a table.

Run: ``OMP_NUM_THREADS=1 python scripts/short_runs.py parity --out results/gpu``
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def crop_statistics(samples, crop_size: int, n_crops: int) -> list[dict]:
    """Per-channel intensity statistics, class frequencies and worms per crop of both paths."""
    from companion.data.augment import WormCropDataset, collate_crops
    from companion.data.augment_torch import DeviceCropLoader, DeviceCropSource

    scipy_set = WormCropDataset(samples, crop_size=crop_size, length=n_crops, seed=0)
    paths = {
        "scipy": (collate_crops([scipy_set[i] for i in range(j, j + 16)]) for j in range(0, n_crops, 16)),
        "torch": iter(
            DeviceCropLoader(
                DeviceCropSource(samples, crop_size=crop_size), start=0, stop=n_crops // 16, batch_size=16
            )
        ),
    }
    rows = []
    for path, batches in paths.items():
        sums, squares, pixels = np.zeros(2), np.zeros(2), 0
        classes, worms = np.zeros(3), []
        for batch in batches:  # one batch at a time: 16 crops of 512 x 512 are ~70 MB
            images = batch["image"].double()
            inside = images.abs().sum(dim=1) > 0  # pixels of the well (crops reaching outside are zero)
            for c in range(2):
                values = images[:, c][inside]
                sums[c] += float(values.sum())
                squares[c] += float((values * values).sum())
            pixels += int(inside.sum())
            classes += np.bincount(batch["target"].flatten().numpy(), minlength=3)[:3]
            worms += batch["valid"].sum(dim=1).tolist()
        mean = sums / pixels
        std = np.sqrt(squares / pixels - mean**2)
        row = {"path": path, "crops": len(worms)}
        for c, name in enumerate(("fluorescence", "brightfield")):
            row[f"{name}_mean"], row[f"{name}_std"] = float(mean[c]), float(std[c])
        for k, name in enumerate(("background", "foreground", "overlap")):
            row[f"{name}_fraction"] = float(classes[k] / classes.sum())
        row["worms_per_crop"], row["worms_per_crop_sd"] = float(np.mean(worms)), float(np.std(worms))
        rows.append(row)
    return rows


def score(model, samples) -> dict:
    """Validation scores of a model's deterministic pass (see the module docstring)."""
    from learning_curve import calibrated_validation

    from companion.inference.sampling import predict
    from companion.training.calibration import foreground_f1

    counts = np.zeros(3)
    for sample in samples:
        truth = np.asarray(sample.instances).any(axis=0)
        counts += foreground_f1(predict(model, sample.image).logits[0], truth)
    tp, fp, fn = counts
    shift, row = calibrated_validation(
        model,
        samples,
        bandwidths=(1.5, 2.0),
        thresholds=(1.5, 3.0),  # the shipped models' choice, and larger
    )
    return {
        "f1_unshifted": 2 * tp / max(2 * tp + fp + fn, 1),
        "shift": shift,
        "avAP": row["avAP"],
        "AP50": row["AP50"],
    }


def run(config, data, val, label: dict) -> dict:
    from companion.training.checkpoint import load_model
    from companion.training.train import train

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        final = train(config, data, out, progress=False)
        minutes = (time.perf_counter() - start) / 60
        row = {**label, "iterations": config.iterations, "batch": config.batch_size, "lr": config.lr}
        row.update({"train_minutes": round(minutes, 2), **score(load_model(final), val)})
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True
    )
    return row


def load_start(name: str):
    """A shipped model by name, or the model of a checkpoint or exported file."""
    from companion import pretrained
    from companion.training.checkpoint import load_model

    return pretrained.load(name) if name in pretrained.NAMES else load_model(name)


def snapshot_rows(run_dir: Path, init_from: str | None, val) -> list[dict]:
    """Both protocols' scores of a run's starting model and snapshots."""
    from learning_curve import run_snapshots

    from companion.training.checkpoint import load_model
    from companion.training.selection import validation_score

    candidates = [(0, lambda: load_start(init_from))] if init_from else []
    candidates += [
        (iteration, lambda path=path: load_model(path)) for iteration, path in run_snapshots(run_dir)
    ]
    rows = []
    for iteration, load in candidates:
        model = load()
        fast = validation_score(model, val)
        row = dict(iteration=iteration, fast_avAP=fast.avAP, fast_AP50=fast.AP50, fast_shift=fast.shift)
        row.update({f"grid_{k}": v for k, v in score(model, val).items() if k in ("avAP", "AP50", "shift")})
        rows.append(row)
        print(row, flush=True)
    return rows


def write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {k: float(f"{v:.4g}") if isinstance(v, float) and math.isfinite(v) else v for k, v in r.items()}
            for r in rows
        )
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("parity", "batch", "snapshots"))
    parser.add_argument("--run", type=Path, default=None, help="snapshots: the run folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=600, help="parity: steps of each run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--crops", type=int, default=1600, help="batch: crops seen by each run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--model", default="baseline")
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate at batch 1 (default: the preset's)"
    )
    parser.add_argument(
        "--init-from",
        default=None,
        help="batch: continue this model (e.g. baseline, the shipped one) instead of starting afresh",
    )
    parser.add_argument("--stat-crops", type=int, default=480)
    args = parser.parse_args()

    from companion.data.bbbc010 import FIT_WELLS, VAL_WELLS, load_bbbc010
    from companion.training.config import TrainConfig

    data = load_bbbc010(None, FIT_WELLS, skip_incomplete=True, progress=False)
    val = load_bbbc010(None, VAL_WELLS, skip_incomplete=True, progress=False)
    base = TrainConfig.preset(
        "cpu", model=args.model, crop_size=args.crop_size, num_workers=0, snapshot_every=0, log_every=50
    )
    overrides = {"lr": args.lr} if args.lr else {}
    if args.init_from:
        overrides.update(init_from=args.init_from, disc_warmup=0)
    base = TrainConfig.from_dict({**base.to_dict(), **overrides})
    rows = []
    if args.experiment == "snapshots":
        write(snapshot_rows(args.run, args.init_from, val), args.out / f"{args.run.name}_snapshots.csv")
        return
    if args.experiment == "parity":
        stats = crop_statistics(data, 512, args.stat_crops)
        write(stats, args.out / "augment_parity_crops.csv")
        for seed in args.seeds:
            for gpu_augment in (False, True):
                config = TrainConfig.from_dict(
                    {
                        **base.to_dict(),
                        "iterations": args.iterations,
                        "seed": seed,
                        "gpu_augment": gpu_augment,
                        "checkpoint_every": args.iterations,
                        "disc_warmup": args.iterations * 6 // 100,
                        "lr_warmup": args.iterations // 25,
                    }
                )
                rows.append(
                    run(config, data, val, {"path": "torch" if gpu_augment else "scipy", "seed": seed})
                )
        write(rows, args.out / "augment_parity.csv")
        for path in ("scipy", "torch"):
            mine = [r for r in rows if r["path"] == path]
            print(
                path,
                {k: round(statistics.mean(r[k] for r in mine), 3) for k in ("f1_unshifted", "avAP", "AP50")},
            )
    else:
        if args.init_from:  # where the runs start from, scored with the same protocol
            start = load_start(args.init_from)
            rows.append(
                {
                    "crops": 0,
                    "iterations": 0,
                    "batch": 0,
                    "lr": 0.0,
                    "train_minutes": 0.0,
                    **score(start, val),
                }
            )
            print("start:", rows[-1], flush=True)
        for batch in args.batches:
            steps = args.crops // batch
            config = TrainConfig.from_dict(
                {
                    **base.to_dict(),
                    "iterations": steps,
                    "batch_size": batch,
                    "lr": base.lr * math.sqrt(batch),
                    "gpu_augment": True,
                    "checkpoint_every": steps,
                    "log_every": max(1, steps // 20),
                    "lr_warmup": max(1, steps // 25),
                    "disc_warmup": 0 if args.init_from else steps * 6 // 100,
                }
            )
            rows.append(run(config, data, val, {"crops": steps * batch}))
        write(rows, args.out / "batch_sweep.csv")


if __name__ == "__main__":
    main()
