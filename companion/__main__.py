"""Command line of the companion package: ``python -m companion <command> ...``.

Commands
--------
train
    Train a U-Net (Concrete Dropout or baseline) on the BBBC010 training wells or on
    synthetic worms, e.g.::

        python -m companion train --preset cpu --out runs/concrete --model concrete
        python -m companion train --preset colab --out runs/concrete --resume
        torchrun --nproc_per_node 4 -m companion train --preset paper --out runs/paper

New commands are added in :func:`build_parser` as further subparsers with a ``func`` default.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    from companion.train import PRESETS

    p = commands.add_parser(
        "train", help="train a U-Net (see `python -m companion train --help`)",
        description="Train the U-Net with the discriminative loss and a 3-class head on "
                    "augmented crops of the BBBC010 training wells (A01-A24, B01-B24, C01, C02) "
                    "or of synthetic worms. Checkpoints go to OUT/last.pt (resumable) and "
                    "OUT/final.pt, the loss log to OUT/log.jsonl. Runs unchanged under "
                    "`torchrun --nproc_per_node N -m companion train ...` (one process per GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="starting configuration: paper (800k iterations, 512 crops), colab "
                        "(~1 h on a Colab T4), cpu (~2 h on 2 CPU cores), quick (seconds, a "
                        "pipeline check); the options below override single fields")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder for checkpoints and log.jsonl")
    p.add_argument("--model", choices=("concrete", "baseline"), default=None,
                   help="concrete: U-Net with learned Concrete Dropout rates; baseline: no "
                        "dropout, L2 weight decay (default: the preset's, i.e. concrete)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt (bit-identical to an uninterrupted run on "
                        "the CPU); without it an OUT that holds a checkpoint is refused")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data-root", type=Path, default=None,
                        help="folder with the BBBC010 copy (default: $BBBC010_ROOT, else the "
                             "download cache, downloading the data there if needed)")
    source.add_argument("--synthetic", type=_positive_int, default=None, metavar="N",
                        help="train on N synthetic images of worms instead of BBBC010")
    p.add_argument("--iterations", type=_positive_int, default=None,
                   help="optimiser steps (total, also when resuming)")
    p.add_argument("--seed", type=int, default=None, help="seed of weights, data order, "
                   "augmentation and dropout masks")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="crops per iteration per process")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument("--crop-size", type=_positive_int, default=None,
                   help="side of the square training crops (multiple of 16)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=None,
                   help="write OUT/last.pt every that many iterations")
    p.add_argument("--log-every", type=_positive_int, default=None,
                   help="append a record to OUT/log.jsonl every that many iterations")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader processes preparing augmented crops (0: none)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:K (default: CUDA when present)")
    p.add_argument("--no-amp", action="store_true",
                   help="train in float32 on CUDA too (default: bf16/fp16 mixed precision)")
    p.add_argument("--no-augment", action="store_true",
                   help="plain random crops, no rotations/flips/elastic deformations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def config_from_args(args: argparse.Namespace):
    """The :class:`~companion.train.TrainConfig` of parsed ``train`` arguments."""
    from companion.train import TrainConfig

    overrides = {name: getattr(args, name) for name in
                 ("model", "iterations", "seed", "batch_size", "lr", "crop_size",
                  "checkpoint_every", "log_every", "num_workers", "device")
                 if getattr(args, name) is not None}
    if args.no_amp:
        overrides["amp"] = False
    if args.no_augment:
        overrides["augment"] = False
    return TrainConfig.preset(args.preset, **overrides)


def _training_data(args: argparse.Namespace, crop_size: int, seed: int) -> list:
    if args.synthetic is not None:
        from companion.synthetic import make_dataset

        side = max(256, crop_size)
        return make_dataset(args.synthetic, seed=seed, shape=(side, side))
    from companion.data import TRAIN_WELLS, load_bbbc010

    return load_bbbc010(args.data_root, TRAIN_WELLS, skip_incomplete=True)


def _run_train(args: argparse.Namespace) -> int:
    from companion.train import train

    config = config_from_args(args)
    if (args.out / "last.pt").exists() and not args.resume:
        print(f"error: {args.out} already holds a training run (last.pt); add --resume to "
              f"continue it or choose another --out", file=sys.stderr)
        return 2
    data = _training_data(args, config.crop_size, config.seed)
    final = train(config, data, args.out, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, not one per process
        print(f"final checkpoint: {final}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m companion``."""
    parser = argparse.ArgumentParser(
        prog="python -m companion",
        description="Companion package of 'Probabilistic Deep Learning for Instance "
                    "Segmentation' (BBBC010 C. elegans).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m companion`` and of the ``companion`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
