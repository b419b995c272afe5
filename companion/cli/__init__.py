"""Command line of the companion package: ``python -m companion <command> ...``.

May import: every layer (the commands import them inside their functions, so ``--help`` is fast).

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

pack
    BBBC010 wells in one file that ``--data-root`` accepts (for a machine without the data
    folder), e.g.::

        python -m companion pack data_pack/bbbc010.npz --data-root /data/bbbc010

score
    Predictions of any tool (PatchPerPix's HDF5 label layers, TIFFs, ``predict``'s ``.npz``)
    scored like Table 1, once per protocol, e.g.::

        python -m companion score setup08/ --out results/peers/patchperpix

Each command is a module of this package with an ``add_parser(commands)`` that registers its
subparser and sets its ``func``; a new command is a new module added in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import evaluate, pack, predict, score, train

__all__ = ["build_parser", "main", "output_folder_error"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m companion``."""
    parser = argparse.ArgumentParser(
        prog="python -m companion",
        description="Companion package of 'Probabilistic Deep Learning for Instance "
        "Segmentation' (BBBC010 C. elegans).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_parser(commands)
    evaluate.add_parser(commands)
    predict.add_parser(commands)
    pack.add_parser(commands)
    score.add_parser(commands)
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
    previous = _on_sigterm(_interrupt)  # a SIGTERM ends like Ctrl-C: one line
    try:
        return args.func(args)
    except (
        ValueError,
        OSError,
    ) as err:  # the package's own errors (FileNotFoundError, CorruptFileError, ...)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = (
            f"; what {out} holds stays (a training continues with --resume, an evaluation "
            f"folder without results.json is incomplete)"
            if out is not None
            else ""
        )
        print(f"error: interrupted{kept}", file=sys.stderr)
        return 130
    finally:
        _on_sigterm(previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM; the previous one (None outside the main thread)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals stay as they are
        return None
