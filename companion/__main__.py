"""Command line of the companion package: ``python -m companion <command> ...``.

Commands
--------
train
    Train a U-Net (Concrete Dropout or baseline) on the BBBC010 training wells or on
    synthetic worms, e.g.::

        python -m companion train --preset cpu --out runs/concrete --model concrete
        python -m companion train --preset colab --out runs/concrete --resume
        torchrun --nproc_per_node 4 -m companion train --preset paper --out runs/paper

evaluate
    Evaluate a trained model on the BBBC010 test wells (Table 1, PAvPU, proofreading), e.g.::

        python -m companion evaluate --checkpoint runs/concrete/final.pt --out results/concrete
        python -m companion evaluate --pretrained baseline --out results/baseline --draws 0

predict
    Instance masks of wells or image files with a shipped model and the settings of one row of
    its committed evaluation, e.g.::

        python -m companion predict --pretrained baseline --wells C03 --out predictions

New commands are added in :func:`build_parser` as further subparsers with a ``func`` default.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path


def _checked(convert, accept, expected: str):
    """An argparse ``type`` converting with ``convert`` and refusing values ``accept`` rejects."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: v > 0, "a positive number")
_probability = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    from companion.config import PRESETS

    p = commands.add_parser(
        "train",
        help="train a U-Net (see `python -m companion train --help`)",
        description="Train the U-Net with the discriminative loss and a 3-class head on "
        "augmented crops of the BBBC010 training wells (A01-A24, B01-B24, C01, C02) "
        "or of synthetic worms. Checkpoints go to OUT/last.pt (resumable) and "
        "OUT/final.pt, the loss log to OUT/log.jsonl. Runs unchanged under "
        "`torchrun --nproc_per_node N -m companion train ...` (one process per GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="starting configuration: paper (800k iterations, 512 crops), colab "
        "(~1 h on a Colab T4), cpu (~2 h on 2 CPU cores), quick (seconds, a "
        "pipeline check); the options below override single fields",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for checkpoints and log.jsonl")
    p.add_argument(
        "--model",
        choices=("concrete", "baseline"),
        default=None,
        help="concrete: U-Net with learned Concrete Dropout rates; baseline: no "
        "dropout, L2 weight decay (default: the preset's, i.e. concrete)",
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.pt (bit-identical to an uninterrupted run on "
        "the CPU); without it (or --overwrite) an OUT that holds a run's files "
        "(last.pt, final.pt, log.jsonl, iter_N.pt) is refused",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an OUT that holds an earlier run, removing its "
        "last.pt, final.pt, log.jsonl and iter_N.pt first",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder with the BBBC010 copy (default: $BBBC010_ROOT, else the "
        "download cache, downloading the data there if needed)",
    )
    source.add_argument(
        "--synthetic",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train on N synthetic images of worms instead of BBBC010",
    )
    p.add_argument(
        "--iterations", type=_positive_int, default=None, help="optimiser steps (total, also when resuming)"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of weights, data order, augmentation and dropout masks"
    )
    p.add_argument("--batch-size", type=_positive_int, default=None, help="crops per iteration per process")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument(
        "--disc-warmup",
        type=_non_negative_int,
        default=None,
        help="first iterations trained on cross-entropy only, before the "
        "discriminative loss joins (not in the paper; default 0)",
    )
    p.add_argument(
        "--grad-clip",
        type=float,
        default=None,
        help="largest global gradient norm, 0 disables clipping (default: 1.0)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="CHECKPOINT",
        help="start from the network weights of this training checkpoint (e.g. a "
        "baseline run's last.pt, to fine-tune a Concrete Dropout model; not in "
        "the paper) or exported model (companion/pretrained/NAME.pt) instead of "
        "a random initialisation",
    )
    p.add_argument(
        "--crop-size",
        type=_positive_int,
        default=None,
        help="side of the square training crops (multiple of 16)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        help="write OUT/last.pt every that many iterations",
    )
    p.add_argument(
        "--log-every",
        type=_positive_int,
        default=None,
        help="append a record to OUT/log.jsonl every that many iterations",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader processes preparing augmented crops (0: none)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:K (default: CUDA when present)")
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=None,
        help="learning-rate schedule (cosine: warm-up, then decay to 0 at --iterations)",
    )
    p.add_argument(
        "--lr-warmup", type=_non_negative_int, default=None, help="warm-up iterations of the cosine schedule"
    )
    p.add_argument(
        "--snapshot-every",
        type=_non_negative_int,
        default=None,
        help="keep iter_<N>.pt every that many iterations (0: none)",
    )
    p.add_argument(
        "--init-rate",
        type=_checked(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
        default=None,
        help="initial Concrete Dropout rate",
    )
    p.add_argument(
        "--downsample",
        type=_positive_int,
        default=None,
        help="internal resolution factor of the U-Net (2: the network runs on 2x2-"
        "pooled input and its outputs are resized back; not in the paper)",
    )
    p.add_argument(
        "--no-standardize", action="store_true", help="feed the [0, 1]-scaled images as they are (the paper)"
    )
    p.add_argument(
        "--no-amp",
        action="store_true",
        help="train in float32 on CUDA too (default: bf16/fp16 mixed precision)",
    )
    p.add_argument(
        "--dropout-lr-scale",
        type=_positive_float,
        default=None,
        help="multiplies the learning rate of the Concrete Dropout rates (not in the "
        "paper; lets the rates settle within a short budget)",
    )
    p.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="bf16 autocast + channels-last on the CPU (2x faster where the CPU has "
        "native bf16, e.g. AVX512-BF16; ~10x slower where it is emulated)",
    )
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="plain random crops, no rotations/flips/elastic deformations",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def config_from_args(args: argparse.Namespace):
    """The :class:`~companion.config.TrainConfig` of parsed ``train`` arguments."""
    from companion.config import TrainConfig

    overrides = {
        name: getattr(args, name)
        for name in (
            "model",
            "iterations",
            "seed",
            "batch_size",
            "lr",
            "disc_warmup",
            "grad_clip",
            "crop_size",
            "init_from",
            "checkpoint_every",
            "log_every",
            "num_workers",
            "device",
            "lr_schedule",
            "lr_warmup",
            "snapshot_every",
            "downsample",
            "dropout_lr_scale",
        )
        if getattr(args, name) is not None
    }
    if args.init_rate is not None:
        overrides["init_dropout_rate"] = args.init_rate
    if args.no_standardize:
        overrides["standardize"] = False
    if args.no_amp:
        overrides["amp"] = False
    if args.no_augment:
        overrides["augment"] = False
    if args.cpu_bf16:
        overrides["cpu_bf16"] = True
    return TrainConfig.preset(args.preset, **overrides)


def _training_data(args: argparse.Namespace, crop_size: int, seed: int) -> list:
    if args.synthetic is not None:
        from companion.synthetic import make_dataset

        side = max(256, crop_size)
        return make_dataset(args.synthetic, seed=seed, shape=(side, side))
    from companion.data import FIT_WELLS, load_bbbc010

    # the validation wells (companion.data.VAL_WELLS) are held out for every recipe decision
    return load_bbbc010(args.data_root, FIT_WELLS, skip_incomplete=True)


def _run_train(args: argparse.Namespace) -> int:
    from companion.run_folder import existing_run_files
    from companion.train import train

    config = config_from_args(args)
    found = [p.name for p in existing_run_files(args.out)]
    if found and not (args.resume or args.overwrite):  # before loading the data
        hint = (
            "add --resume to continue it, --overwrite to replace it"
            if "last.pt" in found
            else "add --overwrite to replace it (there is no last.pt to --resume from)"
        )
        print(
            f"error: {args.out} already holds a training run ({', '.join(found)}); {hint}, or "
            f"choose another --out",
            file=sys.stderr,
        )
        return 2
    data = _training_data(args, config.crop_size, config.seed)
    try:
        final = train(
            config,
            data,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, not one per process
        print(f"final checkpoint: {final}")
    return 0


def _add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    from companion.evaluate import DEFAULT_BANDWIDTHS, DEFAULT_THRESHOLDS
    from companion.pretrained import NAMES

    p = commands.add_parser(
        "evaluate",
        help="evaluate a model on the test wells (see `python -m companion evaluate --help`)",
        description="Evaluate a trained U-Net as in the paper: network outputs on the BBBC010 test "
        "wells (one deterministic pass, plus Monte-Carlo dropout draws for a Concrete "
        "Dropout model), mean-shift bandwidth and threshold chosen by 2-fold "
        "cross-validation over the test folds (on the deterministic pass), draws "
        "agglomerated and binarised. Writes OUT/results.json, table1.csv, per_image.csv, "
        "tuning.csv, pavpu.csv, proofreading.csv, pavpu.png and gallery.png; network "
        "outputs are cached in OUT/cache so a re-run only clusters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="training checkpoint to evaluate (e.g. runs/concrete/final.pt)",
    )
    model.add_argument(
        "--pretrained",
        choices=NAMES,
        default=None,
        help="evaluate a pretrained model shipped with the package",
    )
    p.add_argument(
        "--pretrained-dir",
        type=Path,
        default=None,
        help="folder holding the pretrained .pt/.json files (default: the package's)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder for the result files and the cache (e.g. results/concrete)",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder with the BBBC010 copy (default: $BBBC010_ROOT, else the "
        "download cache, downloading the data there if needed)",
    )
    source.add_argument(
        "--synthetic",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate on N synthetic images of worms (split into two folds) "
        "instead of BBBC010, a pipeline check",
    )
    p.add_argument(
        "--synthetic-size", type=_positive_int, default=256, help="height and width of the synthetic images"
    )
    p.add_argument(
        "--draws",
        type=_non_negative_int,
        default=8,
        help="Monte-Carlo dropout draws per well for a Concrete Dropout model "
        "(0: only the deterministic pass; ignored for a baseline model)",
    )
    p.add_argument(
        "--bandwidths",
        type=_positive_float,
        nargs="+",
        default=list(DEFAULT_BANDWIDTHS),
        help="mean-shift bandwidths of the grid search",
    )
    p.add_argument(
        "--thresholds",
        type=_positive_float,
        nargs="+",
        default=list(DEFAULT_THRESHOLDS),
        help="embedding-distance thresholds of the grid search (pixel-to-centre)",
    )
    p.add_argument(
        "--max-points",
        type=_positive_int,
        default=None,
        help="mean-shift clusters at most this many foreground pixels per pass, drawn at "
        "random (all are assigned); default all (exact, slow on a CPU)",
    )
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="evaluate on the test wells (the paper's 2 folds) or on the validation "
        "wells (companion.data.VAL_WELLS, two halves as folds)",
    )
    p.add_argument(
        "--clustering",
        choices=("global", "components"),
        default="global",
        help="mean-shift over the whole image (the paper) or inside each connected foreground component",
    )
    p.add_argument(
        "--min-size", type=_positive_int, default=None, help="smallest instance kept, in pixels (default 50)"
    )
    p.add_argument(
        "--wells",
        nargs="+",
        default=None,
        metavar="WELL",
        help="evaluate only these test wells (default: all 50 test wells; each "
        "cross-validation fold must keep at least one)",
    )
    p.add_argument(
        "--binarize",
        type=_probability,
        default=0.75,
        help="agglomerated probability at which a pixel belongs to an instance",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo dropout masks")
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=None,
        help="Monte-Carlo draws per forward pass (lower it if memory is short; "
        "default: 8 on a GPU, 1 on the CPU, where batching is slower)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:K for the network (default: CUDA when present)"
    )
    p.add_argument(
        "--no-cache", action="store_true", help="do not read or write the network outputs in OUT/cache"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_evaluate)


def _evaluation_model(args: argparse.Namespace, device):
    """The model to evaluate (on ``device``) and a description of it for results.json."""
    from companion._io import file_sha256
    from companion.model import dropout_rates
    from companion.outputs import has_concrete_dropout, model_fingerprint

    if args.checkpoint is not None:
        from companion.checkpoint import load_model, read_checkpoint

        model = load_model(args.checkpoint)
        ckpt = read_checkpoint(args.checkpoint)
        info = dict(
            source="checkpoint",
            path=str(args.checkpoint),
            sha256=file_sha256(args.checkpoint),
            iteration=int(ckpt["iteration"]),
            config=ckpt["config"],
        )
    else:
        from companion import pretrained

        model = pretrained.load(args.pretrained, directory=args.pretrained_dir)
        record = pretrained.provenance(args.pretrained, args.pretrained_dir)
        info = dict(
            source="pretrained",
            name=args.pretrained,
            sha256=record.get("sha256"),
            iteration=record.get("iterations"),
            config=record.get("config"),
        )
    info.update(
        kind="concrete" if has_concrete_dropout(model) else "baseline",
        dropout_rates=dropout_rates(model),
        weights_fingerprint=model_fingerprint(model),
    )
    return model.to(device), info


def _evaluation_data(args: argparse.Namespace):
    """Samples, folds, skipped wells and a description of the data."""
    if args.synthetic is not None:
        from companion.synthetic import make_dataset

        if args.synthetic < 2:
            raise ValueError("--synthetic needs N >= 2 images (two cross-validation folds)")
        seed = 1_000_000 + args.seed  # far from the training images' seeds
        samples = make_dataset(args.synthetic, seed=seed, shape=(args.synthetic_size,) * 2)
        wells = [s.well for s in samples]
        return (
            samples,
            [wells[0::2], wells[1::2]],
            [],
            dict(source="synthetic", n=args.synthetic, seed=seed, size=args.synthetic_size),
        )
    from companion.data import TEST_FOLDS, TEST_WELLS, load_bbbc010, resolve_root

    if args.split == "val":  # the validation wells: every decision is made here, not on test wells
        from companion.data import VAL_WELLS

        pool, pool_folds = VAL_WELLS, (VAL_WELLS[0::2], VAL_WELLS[1::2])
    else:
        pool, pool_folds = TEST_WELLS, TEST_FOLDS
    wells = list(pool) if args.wells is None else list(dict.fromkeys(args.wells))
    unknown = [w for w in wells if w not in pool]
    if unknown:
        raise ValueError(f"--wells {unknown} are not {args.split} wells ({', '.join(pool[:3])}, ...)")
    root = resolve_root(args.data_root)
    samples = load_bbbc010(root, wells, skip_incomplete=True, progress=not args.no_progress)
    loaded = {s.well for s in samples}
    skipped = [w for w in wells if w not in loaded]
    folds = [[w for w in fold if w in loaded] for fold in pool_folds]
    if not all(folds):
        raise ValueError(f"each cross-validation fold needs at least one well; folds: {folds}")
    return samples, folds, skipped, dict(source="bbbc010", root=str(root))


def _run_evaluate(args: argparse.Namespace) -> int:
    import datetime
    import time

    import torch

    from companion.evaluate import evaluate_model
    from companion.paper import TABLE1_KEYS
    from companion.report import write_report

    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, model_info = _evaluation_model(args, device)
        samples, folds, skipped, data_info = _evaluation_data(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if skipped:
        print(f"skipped {len(skipped)} incomplete well(s): {', '.join(skipped)}")
    result = evaluate_model(
        model,
        samples,
        folds=folds,
        bandwidths=args.bandwidths,
        thresholds=args.thresholds,
        draws=args.draws,
        binarize_at=args.binarize,
        seed=args.seed,
        batch=args.batch,
        max_points=args.max_points,
        clustering=args.clustering,
        min_size=args.min_size,
        cache_dir=None if args.no_cache else args.out / "cache",
        device=device,
        progress=not args.no_progress,
    )
    info = dict(
        command=" ".join(["python -m companion", *map(shlex.quote, getattr(args, "argv", []))]),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        model=model_info,
        data=data_info,
        skipped_wells=skipped,
        device=str(device),
        wall_time_s=time.perf_counter() - start,
    )
    files = write_report(result, samples, args.out, info=info)
    print(f"{'row':<14}" + "".join(f"{k:>10}" for k in TABLE1_KEYS))
    for row in result.rows:
        print(f"{row['name']:<14}" + "".join(f"{row[k]:>10.3f}" for k in TABLE1_KEYS))
    for c in result.tuning.choices:
        print(
            f"fold {c.applied_to}: bandwidth {c.bandwidth:g}, threshold {c.threshold:g} "
            f"(chosen on fold {c.tuned_on}, avAP {c.tuning_score:.3f} there)"
        )
    print(f"wrote {len(files)} files to {args.out} in {info['wall_time_s']:.0f} s")
    return 0


def _add_predict_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "predict",
        help="instance masks of BBBC010 wells or image files with a shipped model",
        description="Predict instances with a shipped model and the inference settings of one row "
        "of its committed evaluation (results/NAME/results.json); writes "
        "OUT/<well or file stem>.npz (masks, scores, probabilities for MC rows) and a PNG "
        "overlay.",
    )
    p.add_argument("--pretrained", required=True, help="name of a shipped model (e.g. baseline)")
    p.add_argument("--pretrained-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results.json whose row settings to use (default results/NAME/results.json)",
    )
    p.add_argument("--row", default=None, help="row name of results.json (default: best avAP)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--wells", nargs="+", metavar="WELL", help="BBBC010 wells")
    source.add_argument(
        "--images",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="2-channel TIFF files (see companion.userdata.read_image)",
    )
    p.add_argument("--data-root", type=Path, default=None, help="BBBC010 root for --wells")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:K")
    p.set_defaults(func=_run_predict)


def _row_settings(results: dict, row: str | None) -> tuple[str, dict, dict]:
    """The chosen row, its settings and the (bandwidth, threshold) per fold."""
    rows = {r["name"]: r for r in results["rows"]}
    if row is None:
        row = max(rows, key=lambda name: rows[name]["avAP"])
    if row not in rows:
        raise ValueError(f"row {row!r} is not in results.json; rows: {sorted(rows)}")
    settings = dict(results["settings"])
    per_fold = {
        int(c["applied_to"]): (float(c["bandwidth"]), float(c["threshold"]))
        for c in results["tuning"]["choices"]
    }
    return row, settings, per_fold


def _run_predict(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from companion import pretrained
    from companion._io import atomic_savez
    from companion.outputs import _well_seed
    from companion.postprocess import DEFAULT_MIN_SIZE
    from companion.predict import predict_instances
    from companion.report import _save_figure, plot_gallery

    try:
        model = pretrained.load(args.pretrained, directory=args.pretrained_dir)
        results_path = (
            args.results
            or Path(__file__).resolve().parent.parent / "results" / args.pretrained / "results.json"
        )
        if not results_path.is_file():
            raise FileNotFoundError(f"{results_path} does not exist: pass --results")
        results = json.loads(results_path.read_text())
        row, settings, per_fold = _row_settings(results, args.row)
        fold_of = {w: i for i, fold in enumerate(results["folds"]) for w in fold}
        images = _predict_inputs(args)
        args.out.mkdir(parents=True, exist_ok=True)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    draws = int(settings.get("draws", 0)) if row == "mc" else 0
    for stem, image, gt in images:
        bandwidth, threshold = per_fold[fold_of.get(stem, 0)]
        result = predict_instances(
            model.to(args.device or "cpu"),
            image,
            bandwidth=bandwidth,
            threshold=threshold,
            draws=draws,
            binarize_at=float(settings.get("binarize_at", 0.75)),
            clustering=settings.get("clustering", "global"),
            min_size=int(settings.get("min_size", DEFAULT_MIN_SIZE)),
            max_points=settings.get("max_points"),
            seed=_well_seed(int(settings.get("seed", 0)), stem),
            device=args.device,
        )
        arrays = dict(masks=result.masks, scores=result.scores)
        if result.probabilities is not None:
            arrays["probabilities"] = result.probabilities
        atomic_savez(args.out / f"{stem}.npz", arrays)
        from companion.data import Sample

        sample = Sample(stem, image, gt if gt is not None else np.zeros((0,) + image.shape[1:], bool))
        _save_figure(
            plot_gallery([sample], [result.masks], [f"{stem}: {len(result.masks)} instances"]),
            args.out / f"{stem}.png",
        )
        print(
            f"{stem}: {len(result.masks)} instances (row {row}, bandwidth {bandwidth:g}, "
            f"threshold {threshold:g})"
        )
    return 0


def _predict_inputs(args: argparse.Namespace) -> list:
    """(stem, image, ground truth or None) of each well or file."""
    if args.wells:
        from companion.data import load_bbbc010

        samples = load_bbbc010(args.data_root, list(dict.fromkeys(args.wells)), progress=False)
        return [(s.well, s.image, s.instances) for s in samples]
    from companion.userdata import read_image

    return [(path.stem, read_image(path), None) for path in args.images]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m companion``."""
    parser = argparse.ArgumentParser(
        prog="python -m companion",
        description="Companion package of 'Probabilistic Deep Learning for Instance "
        "Segmentation' (BBBC010 C. elegans).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(commands)
    _add_evaluate_parser(commands)
    _add_predict_parser(commands)
    return parser


def output_folder_error(out: Path) -> str | None:
    """``None`` when ``out`` is (or can be made) a folder this process can write to, else why not.

    Checked before a command loads data or a model, so that an unwritable ``--out`` fails in a
    second, not after an hour of training or evaluation.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as err:
        return f"cannot write to the output folder {out}: {err.strerror or err}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m companion`` and of the ``companion`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    out = getattr(args, "out", None)
    problem = output_folder_error(Path(out)) if out is not None else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (
        ValueError,
        OSError,
    ) as err:  # the package's own errors (FileNotFoundError, CorruptFileError, ...)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
