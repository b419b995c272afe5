"""``python -m companion evaluate``: Table 1, PAvPU and proofreading of a trained model."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ._args import add_data_source, checked, positive_float, positive_int, probability

#: More draws than this per well are a typo, not a protocol (the paper: 8; each costs a pass).
MAX_DRAWS = 256

# The heavy modules (torch, the training loop, the evaluation) are imported inside the command
# functions: importing them all takes ~2-5 s, argparse alone 0.1 s, and `--help` or a usage error
# should answer at once.


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the ``evaluate`` subcommand (its options and its ``func``)."""
    from companion.evaluation.evaluate import DEFAULT_BANDWIDTHS, DEFAULT_THRESHOLDS
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
        default=None,
        metavar="NAME",
        help=f"evaluate a pretrained model by name: shipped with the package ({', '.join(NAMES)}, and "
        "any other model in its folder, e.g. concrete_snapshot) or exported into --pretrained-dir",
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
    add_data_source(
        p,
        "evaluate on N synthetic images of worms (split into two folds) instead of BBBC010, a pipeline check",
    )
    p.add_argument(
        "--synthetic-size", type=positive_int, default=256, help="height and width of the synthetic images"
    )
    p.add_argument(
        "--draws",
        type=checked(int, lambda v: 0 <= v <= MAX_DRAWS, f"an integer from 0 to {MAX_DRAWS}"),
        default=8,
        help="Monte-Carlo dropout draws per well for a Concrete Dropout model "
        "(0: only the deterministic pass); a model without dropout has none (see --flips)",
    )
    p.add_argument(
        "--bandwidths",
        type=positive_float,
        nargs="+",
        default=list(DEFAULT_BANDWIDTHS),
        help="mean-shift bandwidths of the grid search",
    )
    p.add_argument(
        "--thresholds",
        type=positive_float,
        nargs="+",
        default=list(DEFAULT_THRESHOLDS),
        help="embedding-distance thresholds of the grid search (pixel-to-centre)",
    )
    p.add_argument(
        "--max-points",
        type=positive_int,
        default=None,
        help="mean-shift clusters at most this many foreground pixels per pass, drawn at "
        "random (all are assigned); default all (exact, slow on a CPU)",
    )
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="evaluate on the test wells (the paper's 2 folds) or on the validation "
        "wells (companion.data.bbbc010.VAL_WELLS, two halves as folds)",
    )
    p.add_argument(
        "--clustering",
        choices=("global", "components"),
        default="global",
        help="mean-shift over the whole image (the paper) or inside each connected foreground component",
    )
    p.add_argument(
        "--min-size", type=positive_int, default=None, help="smallest instance kept, in pixels (default 50)"
    )
    p.add_argument(
        "--flips",
        action="store_true",
        help="test-time augmentation with the four flips of each image (not in the paper): the "
        "deterministic pass averages the class probabilities of the flips, the Monte-Carlo draws "
        "cycle through them; a model without dropout also gets its four flipped views "
        "segmented one by one and agglomerated (row flips_agglomerated)",
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
        type=probability,
        default=0.75,
        help="agglomerated probability at which a pixel belongs to an instance",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo dropout masks")
    p.add_argument(
        "--batch",
        type=positive_int,
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
    p.add_argument(
        "--save-recipe",
        action="store_true",
        help="write the rows' inference recipes (the chosen bandwidth and threshold per fold, "
        "draws, views, binarisation) into the pretrained model's folder as NAME.recipe.json, "
        "under the evaluation name OUT's folder name, the best row marked; predict and "
        "Segmenter.pretrained read them (--pretrained and the test split only)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_evaluate)


def _evaluation_model(args: argparse.Namespace, device):
    """The model to evaluate (on ``device``) and a description of it for results.json."""
    from companion._io import file_sha256
    from companion.inference.outputs import has_concrete_dropout, model_fingerprint
    from companion.model.dropout import dropout_rates

    if args.checkpoint is not None:
        from companion.training.checkpoint import load_model, read_checkpoint

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
        from companion.data.synthetic import make_dataset

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
    from companion.data.bbbc010 import TEST_FOLDS, TEST_WELLS, load_bbbc010, resolve_root

    if args.split == "val":  # the validation wells: every decision is made here, not on test wells
        from companion.data.bbbc010 import VAL_WELLS

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
    return samples, folds, skipped, dict(source="bbbc010", root=root.name)  # no machine path


def _run_evaluate(args: argparse.Namespace) -> int:
    import time

    from companion.evaluation.report import sweep_staging
    from companion.training.run_folder import lock_run_folder

    start = time.perf_counter()
    with lock_run_folder(args.out, purpose="evaluation"):  # a second evaluation into OUT is refused
        if sweep_staging(args.out):
            print(f"removed the unfinished result files of an interrupted evaluation from {args.out}")
        return _evaluate_locked(args, start)


def _evaluate_locked(args: argparse.Namespace, start: float) -> int:
    import datetime
    import time

    from companion._device import resolve_device
    from companion.evaluation.evaluate import evaluate_model
    from companion.evaluation.paper import TABLE1_KEYS
    from companion.evaluation.report import write_report

    device = resolve_device(args.device)
    try:
        if args.save_recipe and (args.pretrained is None or args.split != "test" or args.synthetic):
            raise ValueError("--save-recipe needs --pretrained and the test wells of BBBC010")
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
        recipe=_recipe(args, model),
        batch=args.batch,
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
    print(f"{'row':<19}" + "".join(f"{k:>10}" for k in TABLE1_KEYS))
    for row in result.rows:
        print(f"{row['name']:<19}" + "".join(f"{row[k]:>10.3f}" for k in TABLE1_KEYS))
    for c in result.tuning.choices:
        print(
            f"fold {c.applied_to}: bandwidth {c.bandwidth:g}, threshold {c.threshold:g} "
            f"(chosen on fold {c.tuned_on}, avAP {c.tuning_score:.3f} there)"
        )
    print(f"wrote {len(files)} files to {args.out} in {info['wall_time_s']:.0f} s")
    if args.save_recipe:
        import json

        from companion.inference.recipes import save_recipes

        results = json.loads((args.out / "results.json").read_text())
        path = save_recipes(args.pretrained, results, args.out.name, args.pretrained_dir)
        print(f"saved the recipes of rows {[r['name'] for r in result.rows]} to {path}")
    return 0


def _recipe(args: argparse.Namespace, model):
    """The inference recipe of the agglomerated row (the grid search sets bandwidth and threshold)."""
    from companion.inference.postprocess import DEFAULT_MIN_SIZE
    from companion.inference.recipes import views_recipe

    return views_recipe(
        model,
        mc_draws=args.draws,
        flips=args.flips,
        binarize_at=args.binarize,
        seed=args.seed,
        max_points=args.max_points,
        clustering=args.clustering,
        min_size=DEFAULT_MIN_SIZE if args.min_size is None else args.min_size,
    )
