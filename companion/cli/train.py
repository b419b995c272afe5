"""``python -m companion train``: train a U-Net on BBBC010 or synthetic worms."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ._args import add_data_source, checked, non_negative_int, positive_float, positive_int

# The heavy modules (torch, the training loop, the evaluation) are imported inside the command
# functions: importing them all takes ~2-5 s, argparse alone 0.1 s, and `--help` or a usage error
# should answer at once.


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the ``train`` subcommand (its options and its ``func``)."""
    from companion.training.config import PRESETS

    p = commands.add_parser(
        "train",
        help="train a U-Net (see `python -m companion train --help`)",
        description="Train the U-Net with the discriminative loss and a 3-class head on "
        "augmented crops of the BBBC010 fitting wells (companion.data.bbbc010.FIT_WELLS: the training "
        "wells A01-C02 less the 10 validation wells) "
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
        "(~1 h on a Colab T4), cpu (about 1.5 h on one CPU core), quick (seconds, a "
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
    add_data_source(
        p,
        "train on N synthetic images of worms instead of BBBC010",
    )
    p.add_argument(
        "--iterations", type=positive_int, default=None, help="optimiser steps (total, also when resuming)"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of weights, data order, augmentation and dropout masks"
    )
    p.add_argument("--batch-size", type=positive_int, default=None, help="crops per iteration per process")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument(
        "--disc-warmup",
        type=non_negative_int,
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
        help="start from the network weights of a shipped model (baseline, concrete: a new "
        "stage on top of their training), of a training checkpoint (e.g. a baseline run's "
        "last.pt, to fine-tune a Concrete Dropout model) or of an exported model file, "
        "instead of a random initialisation (not in the paper)",
    )
    p.add_argument(
        "--time-budget",
        type=positive_float,
        default=None,
        metavar="MINUTES",
        help="train for this many minutes (from the start of the command): the first "
        "iterations are timed and --iterations lowered to what fits, so that the warm-up and "
        "cosine schedule end in time; the run stops with a checkpoint at the budget whatever "
        "happens",
    )
    p.add_argument(
        "--select-every",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="score the weights on the validation wells every that many seconds of training, "
        "at the start and at the end (fast protocol, companion.training.selection), and keep the best "
        "checkpoint as OUT/best.pt, the scores in OUT/selection.jsonl (not in the paper)",
    )
    p.add_argument(
        "--crop-size",
        type=positive_int,
        default=None,
        help="side of the square training crops (multiple of 16)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        help="write OUT/last.pt every that many iterations",
    )
    p.add_argument(
        "--log-every",
        type=positive_int,
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
        "--lr-warmup", type=non_negative_int, default=None, help="warm-up iterations of the cosine schedule"
    )
    p.add_argument(
        "--snapshot-every",
        type=non_negative_int,
        default=None,
        help="keep iter_<N>.pt every that many iterations (0: none)",
    )
    p.add_argument(
        "--init-rate",
        type=checked(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
        default=None,
        help="initial Concrete Dropout rate",
    )
    p.add_argument(
        "--downsample",
        type=positive_int,
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
        type=positive_float,
        default=None,
        help="multiplies the learning rate of the Concrete Dropout rates (not in the "
        "paper; lets the rates settle within a short budget)",
    )
    p.add_argument(
        "--overlap-weight",
        type=positive_float,
        default=None,
        help="weight of the overlap class in the cross-entropy (default 1, the paper; "
        "overlap pixels are rare and unweighted models predict none)",
    )
    p.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="bf16 autocast on the CPU (1.4x faster than float32 where the CPU has "
        "native bf16, e.g. AVX512-BF16; ~10x slower where it is emulated)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="wrap each step's forward pass and objective in torch.compile (pays on a GPU; "
        "the first steps compile for a minute or more)",
    )
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="plain random crops, no rotations/flips/elastic deformations",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def config_from_args(args: argparse.Namespace):
    """The :class:`~companion.training.config.TrainConfig` of parsed ``train`` arguments."""
    from companion.training.config import TrainConfig

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
            "overlap_weight",
            "time_budget",
            "select_every",
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
    if args.compile:
        overrides["compile"] = True
    return TrainConfig.preset(args.preset, **overrides)


def _training_data(args: argparse.Namespace, crop_size: int, seed: int) -> tuple[list, list | None]:
    """The training images and, with ``--select-every``, the validation images."""
    validating = args.select_every is not None
    if args.synthetic is not None:
        from companion.data.synthetic import make_dataset

        side = max(256, crop_size)
        val = make_dataset(max(1, args.synthetic // 4), seed=seed + 10_000, shape=(side, side))
        return make_dataset(args.synthetic, seed=seed, shape=(side, side)), val if validating else None
    from companion.data.bbbc010 import FIT_WELLS, VAL_WELLS, load_bbbc010, resolve_root

    # the validation wells are held out for every recipe decision
    wells = FIT_WELLS + (VAL_WELLS if validating else ())
    root = resolve_root(args.data_root)
    samples = load_bbbc010(root, wells, skip_incomplete=True)
    lacking = [w for w in wells if w not in {s.well for s in samples}]
    if lacking and not root.is_file():  # every training well is complete: the copy is partial
        # (an archive of wells, companion.data.archive, may hold a chosen subset)
        raise ValueError(
            f"{len(lacking)} of the {len(wells)} training wells could not be loaded "
            f"({', '.join(lacking[:6])}{', ...' if len(lacking) > 6 else ''}): the BBBC010 copy is "
            f"incomplete; fetch it again (or point --data-root at a whole copy)"
        )
    fit = [s for s in samples if s.well in FIT_WELLS]
    return fit, [s for s in samples if s.well in VAL_WELLS] if validating else None


#: What a run was trained on (image names and a checksum of the images), beside its checkpoints:
#: ``--resume`` with other data is refused.
DATA_RECORD = "data.json"


def _data_record(data: list) -> dict:
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for sample in data:
        digest.update(np.ascontiguousarray(sample.image, np.float32).tobytes())
        digest.update(np.packbits(np.asarray(sample.instances, bool)).tobytes())
    return dict(wells=[s.well for s in data], sha256=digest.hexdigest())


def _run_train(args: argparse.Namespace) -> int:
    started = time.perf_counter()  # a --time-budget counts from here, data loading included
    import json

    from companion._io import atomic_write_bytes
    from companion.training.run_folder import existing_run_files
    from companion.training.train import train

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
    data, validation = _training_data(args, config.crop_size, config.seed)
    record = _data_record(data)
    if args.resume and (args.out / DATA_RECORD).is_file():
        before = json.loads((args.out / DATA_RECORD).read_text())
        if before != record:
            print(
                f"error: {args.out} was trained on other data ({len(before['wells'])} images, "
                f"{before['sha256'][:12]}...; now {len(record['wells'])}, {record['sha256'][:12]}...): "
                f"resuming would not continue that run; pass the same data, or --overwrite",
                file=sys.stderr,
            )
            return 2

    def note_data(iteration: int, path: Path) -> None:  # beside the first checkpoint, once
        if not (args.out / DATA_RECORD).is_file():
            atomic_write_bytes(args.out / DATA_RECORD, json.dumps(record).encode())

    try:
        final = train(
            config,
            data,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            started=started,
            validation=validation,
            on_checkpoint=note_data,
        )
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, not one per process
        print(f"final checkpoint: {final}")
    return 0
