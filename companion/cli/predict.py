"""``python -m companion predict``: instance masks of wells or image files with a shipped model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The heavy modules (torch, the training loop, the evaluation) are imported inside the command
# functions: importing them all takes ~2-5 s, argparse alone 0.1 s, and `--help` or a usage error
# should answer at once.


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the ``predict`` subcommand (its options and its ``func``)."""
    p = commands.add_parser(
        "predict",
        help="instance masks of BBBC010 wells or image files with a shipped model",
        description="Predict instances with a shipped model and the inference recipe of one row "
        "of its evaluations, shipped beside its weights (NAME.recipe.json; default the best row); "
        "writes OUT/<well or file stem>.npz (masks, scores, probabilities for rows that "
        "agglomerate passes) and the overlay OUT/<stem>.overlay.png (never an input's name: "
        "inputs are images, outputs .npz and .overlay.png). Inputs whose names share a stem are "
        "refused: their outputs would overwrite each other.",
    )
    p.add_argument("--pretrained", required=True, help="name of a shipped model (e.g. baseline)")
    p.add_argument("--pretrained-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--row",
        default=None,
        help="the evaluation row whose recipe to use, EVALUATION/ROW, e.g. concrete/mc (default: "
        "the best; a wrong name lists them)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--wells", nargs="+", metavar="WELL", help="BBBC010 wells")
    source.add_argument(
        "--images",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="2-channel TIFF files (see companion.data.userdata.read_image)",
    )
    p.add_argument(
        "--scale",
        type=_scale,
        default="auto",
        help="how --images values map to [0, 1]: auto (floats as they are, 8-bit / 255, 12-bit "
        "data / 4095 as BBBC010's camera, other 16-bit data / 65535), a divisor, or one per "
        "channel (W1,W2); an image that comes out clipped, nearly black or constant is named in "
        "a warning",
    )
    p.add_argument("--data-root", type=Path, default=None, help="BBBC010 root for --wells")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:K")
    p.set_defaults(func=_run_predict)


def _scale(text: str):
    """``--scale``: "auto", one positive number, or two separated by a comma."""
    if text == "auto":
        return text
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected auto, a positive number or two (W1,W2), got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _run_predict(args: argparse.Namespace) -> int:
    from companion.inference.recipes import rows
    from companion.inference.segmenter import Segmenter

    try:
        _check_outputs(args)
        row = args.row or next(iter(rows(args.pretrained, args.pretrained_dir)), None)  # best first
        segmenter = Segmenter.pretrained(
            args.pretrained, row, directory=args.pretrained_dir, device=args.device or "cpu"
        )
        images = _predict_inputs(args)
        args.out.mkdir(parents=True, exist_ok=True)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from companion.training.run_folder import lock_run_folder

    with lock_run_folder(args.out, purpose="prediction"):  # a second predict into OUT is refused
        for stale in sorted(args.out.glob(".*.tmp")):  # left by a prediction that was killed
            stale.unlink()
        return _predict_locked(args, segmenter, images, row or "default recipe")


def _predict_locked(args, segmenter, images, row: str) -> int:
    import numpy as np

    from companion._io import atomic_savez
    from companion.data.bbbc010 import Sample
    from companion.evaluation.report import _save_figure, plot_gallery

    for stem, image, gt in images:
        result = segmenter(image, stem)
        arrays = dict(masks=result.masks, scores=result.scores)
        if result.probabilities is not None:
            arrays["probabilities"] = result.probabilities
        atomic_savez(args.out / f"{stem}.npz", arrays)
        sample = Sample(stem, image, gt if gt is not None else np.zeros((0,) + image.shape[1:], bool))
        _save_figure(
            plot_gallery([sample], [result.masks], [f"{stem}: {len(result.masks)} instances"]),
            args.out / f"{stem}.overlay.png",
        )
        used = segmenter.recipe.for_image(stem)
        print(
            f"{stem}: {len(result.masks)} instances (row {row}, bandwidth "
            f"{used.bandwidth:g}, threshold {used.threshold:g})"
        )
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse inputs whose outputs would overwrite each other (before any work)."""
    if not args.images:
        return
    by_stem: dict[str, list[Path]] = {}
    for path in args.images:
        by_stem.setdefault(path.stem, []).append(path)
    shared = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if shared:
        stem, paths = next(iter(shared.items()))
        raise ValueError(
            f"{' and '.join(map(str, paths))} share the name {stem!r}: their outputs would overwrite "
            f"each other; rename one or predict them into separate --out folders"
        )


def _predict_inputs(args: argparse.Namespace) -> list:
    """(stem, image, ground truth or None) of each well or file."""
    if args.wells:
        from companion.data.bbbc010 import load_bbbc010

        samples = load_bbbc010(args.data_root, list(dict.fromkeys(args.wells)), progress=False)
        return [(s.well, s.image, s.instances) for s in samples]
    from companion.data.userdata import read_image

    return [(path.stem, read_image(path, scale=args.scale), None) for path in args.images]
