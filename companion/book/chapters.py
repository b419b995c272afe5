"""What the chapters print beside a shipped model, and the model a chapter works with.

:func:`results` reads a shipped model's committed evaluation (``results/<name>/results.json``),
:func:`segmentation_settings` the bandwidth, threshold and point budget of a shipped recipe for
a well, :func:`training_budget` says in one line how a model was trained, :func:`gpu_figures` what
a GPU run measured (``results/gpu/``), and
:func:`load_or_train` gives a chapter the shipped model or one trained on the spot
(``BOOK_RETRAIN=1``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from companion.data.bbbc010 import FIT_WELLS, TEST_FOLDS, Sample, load_bbbc010
from companion.data.synthetic import make_dataset
from companion.inference.agglomerate import Agglomeration
from companion.inference.outputs import ImageOutputs
from companion.inference.recipes import Recipe, read_recipe
from companion.inference.sampling import MC_DRAWS
from companion.inference.segmenter import Segmenter
from companion.pretrained import NAMES, PRETRAINED_DIR, available, load, provenance
from companion.training.checkpoint import load_model
from companion.training.config import TrainConfig
from companion.training.export import export
from companion.training.train import train

__all__ = [
    "RESULTS_DIR",
    "SegmentationSettings",
    "results",
    "segmentation_settings",
    "training_budget",
    "GPU_RUN",
    "gpu_figures",
    "load_or_train",
    "LiveEvaluation",
    "live_evaluation",
]

#: Where the evaluations of the shipped models are committed (``results/<name>/`` of the book's
#: repository, written by ``python -m companion evaluate --pretrained <name> --out results/<name>``).
#: Present in a clone of the repository (also the one the chapters' Colab cell makes); a
#: ``pip install`` from PyPI or git has the weights but not the results.
RESULTS_DIR: Path = PRETRAINED_DIR.parents[1] / "results"


def results(name: str, directory: str | os.PathLike | None = None) -> dict:
    """The committed evaluation of a shipped model: ``results/<name>/results.json``.

    Parameters
    ----------
    name : str
        ``"concrete"`` or ``"baseline"`` (the sub-folder of ``directory``).
    directory : path-like, optional
        Default :data:`RESULTS_DIR`, the repository's ``results/``.

    Returns
    -------
    dict
        As written by :func:`companion.evaluation.report.write_report`: ``rows`` (Table 1), ``pavpu``
        (the Figure 2 curves), ``proofreading`` (Table 2), ``per_image``, ``tuning``, ...

    Raises
    ------
    FileNotFoundError
        No such file; says how to create it.
    """
    folder = RESULTS_DIR if directory is None else Path(directory)
    path = folder / name / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. The evaluation results live in the book's repository (clone it), or "
            f"compute them: python -m companion evaluate --pretrained {name} --out {folder / name}"
        )
    with open(path) as handle:
        return json.load(handle)


class SegmentationSettings(NamedTuple):
    """Post-processing settings for one well, and where they come from (to print)."""

    bandwidth: float
    threshold: float
    max_points: int | None
    #: one line on where the values come from, to print
    source: str
    #: the committed evaluation they come from (:func:`results`); None for the defaults
    record: dict | None


def segmentation_settings(
    name: str,
    well: str,
    *,
    committed: bool = True,
    row: str | None = None,
    default: tuple[float, float] | None = None,
    directory: str | os.PathLike | None = None,
    pretrained_dir: str | os.PathLike | None = None,
) -> SegmentationSettings:
    """The bandwidth, threshold and point budget of a shipped model's recipe for ``well``.

    The shipped recipes (:mod:`companion.inference.recipes`) hold what each committed evaluation chose on
    one test fold and applied to the other (the paper's 2-fold protocol); this returns the pair
    of row ``row`` (default ``"<name>/deterministic"``, the paper's protocol) for the fold that
    holds ``well``. Without a recipe for the model, or with ``committed=False`` (a chapter trained
    its own model, to which the shipped choice does not belong), it returns
    :class:`companion.inference.recipes.Recipe`'s defaults (or ``default``) and says so in ``source``.
    ``record`` is the committed evaluation (:func:`results`, from ``directory``) when there is one.

    >>> segmentation_settings("concrete", "C03", committed=False).source
    'no committed choice for this model: bandwidth 1.5, threshold 1.5'
    """
    row = f"{name}/deterministic" if row is None else row
    fold = next((f for f, wells in enumerate(TEST_FOLDS) if well in wells), None)
    recipe, reason = None, "no committed choice for this model"
    if committed and fold is not None:
        try:
            recipe = read_recipe(name, row, directory=pretrained_dir)
        except ValueError as missing:
            reason = str(missing)
    if recipe is None or not recipe.folds:
        fallback = Recipe()
        bandwidth, threshold = default or (fallback.bandwidth, fallback.threshold)
        source = f"{reason}: bandwidth {bandwidth:g}, threshold {threshold:g}"
        return SegmentationSettings(bandwidth, threshold, fallback.max_points, source, None)
    chosen = recipe.for_image(well)
    try:
        record = results(row.split("/")[0], directory)
    except FileNotFoundError:
        record = None
    source = (
        f"bandwidth {chosen.bandwidth:g}, threshold {chosen.threshold:g}: the shipped recipe of row "
        f"{row}, chosen on the other test fold and applied to fold {fold}, which holds {well}"
    )
    return SegmentationSettings(chosen.bandwidth, chosen.threshold, chosen.max_points, source, record)


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "time not recorded"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def training_budget(name: str, directory: str | os.PathLike | None = None) -> str:
    """One line on how a shipped model was trained, to print beside its numbers.

    A model trained in stages (``earlier_stages`` in its provenance, see :func:`export`) gets
    the iterations and time of every stage and their totals.

    >>> training_budget("concrete", directory=_example_dir())  # doctest: +ELLIPSIS
    'concrete: 3 iterations of 64 x 64 crops (batch 2, lr 0.001), ... s on a ...-core CPU'
    """
    info = provenance(name, directory)
    cfg = info.get("config", {})
    hardware = info.get("hardware", {})
    device = hardware.get("cuda") or f"a {hardware.get('cpu_count', '?')}-core CPU"
    factor = cfg.get("downsample", 1)
    scale = f" (network at 1/{factor} resolution)" if factor > 1 else ""
    crops = f"{cfg.get('crop_size')} x {cfg.get('crop_size')} crops{scale}"
    stages = info.get("earlier_stages") or []
    if stages:
        batches = [s.get("batch_size", 1) for s in stages] + [cfg.get("batch_size", 1)]
        one = len(set(batches)) == 1  # else each stage says its batch
        lrs = [s["lr"] for s in stages] + [cfg.get("lr")]
        runs = [(s["iterations"], s["model"], s["training_time_s"]) for s in stages]
        runs.append((info["iterations"], info.get("model"), info.get("training_time_s")))
        parts = [
            f"{n:,} as {model} at lr {lr:g}{'' if one else f', batch {b}'} ({_hours(t)})"
            for (n, model, t), lr, b in zip(runs, lrs, batches)
        ]
        batch = f"batch {batches[0]}" if one else "batches " + ", ".join(map(str, dict.fromkeys(batches)))
        return (
            f"{name}: {info['total_iterations']:,} iterations of {crops}, {batch}, "
            f"in {len(parts)} stages: "
            + ", then ".join(parts)
            + f"; {_hours(info.get('total_training_time_s'))} in all on {device}"
        )
    start = f", starting from the weights of {Path(cfg['init_from']).name}" if cfg.get("init_from") else ""
    return (
        f"{name}: {info['iterations']:,} iterations of {crops} "
        f"(batch {cfg.get('batch_size')}, lr {cfg.get('lr'):g}){start}, "
        f"{_hours(info.get('training_time_s'))} on {device}"
    )


#: The GPU run whose measurements the chapters print (``results/gpu/<GPU_RUN>/summary.json``).
GPU_RUN = "h200-2026-12-04"


def gpu_figures(run: str = GPU_RUN, directory: str | os.PathLike | None = None) -> list[str]:
    """What a committed GPU run measured, one printable line per figure, hardware first.

    >>> gpu_figures()[0]  # doctest: +ELLIPSIS
    'measured on one NVIDIA H200 (torch 2.11.0+cu130), the project at commit 57a2dc3...'
    """
    folder = (RESULTS_DIR if directory is None else Path(directory)) / "gpu" / run
    path = folder / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the GPU runs are committed in the repository's results/gpu/"
        )
    summary = json.loads(path.read_text())
    env, bench = summary["environment"], summary["benchmarks"]
    train, mc, aug = bench["training"], bench["mc_sampling"], bench["augmentation"]
    by_batch = "; ".join(
        f"batch {b}: {v['it_per_s']:.1f} it/s ({v['crops_per_s']:.0f} crops/s)"
        for b, v in train["mixed_by_batch"].items()
    )
    lines = [
        f"measured on one {env['device_name']} (torch {env['torch']}), the project at commit 57a2dc3 "
        "(the looped objective, before the batched one)",
        f"training step, {train['mixed']}, 512 x 512 crops: {by_batch}",
        f"float32 at batch {train['chosen_batch']}: {train['fp32_it_per_s']:.2f} it/s "
        f"(mixed precision {train['speedup_mixed_over_fp32']:.2f}x faster)",
        f"augmented {aug['crop_size']} x {aug['crop_size']} crops: {aug['torch_cuda_crops_per_s']:,.0f}/s on the "
        f"GPU, {aug['scipy_cpu_crops_per_s']:.1f}/s in one CPU process",
        f"{mc['draws']} Monte-Carlo draws of one well: {mc['batched_s']:.2f} s batched, "
        f"{mc['sequential_s']:.2f} s one at a time",
    ]
    for name, model in summary["models"].items():
        training, evaluation = model["training"], model["evaluation"]["rows"][0]
        lines.append(
            f"{name} from scratch in {training['seconds']:.0f} s ({training['iterations']} steps of "
            f"{training['batch_size']} crops): test avAP {evaluation['avAP']:.3f}, AP50 {evaluation['AP50']:.3f} "
            f"({evaluation['name']})"
        )
    return lines


def _example_dir() -> Path:  # a throw-away exported model for the doctests
    run, shelf = tempfile.mkdtemp(), tempfile.mkdtemp()
    cfg = TrainConfig.preset("quick", iterations=3, checkpoint_every=3, log_every=1)
    export(train(cfg, make_dataset(2, seed=0, shape=(96, 96)), run, progress=False), "concrete", shelf)
    return Path(shelf)


def load_or_train(
    name: str = "concrete",
    *,
    retrain: bool = False,
    quick: bool = True,
    device: str | torch.device = "cpu",
    train_wells: Sequence[str] | None = None,
    data_root: str | os.PathLike | None = None,
    directory: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[nn.Module, str]:
    """The model a chapter works with: the shipped one, or one trained right now.

    Parameters
    ----------
    name : {"concrete", "baseline"}
    retrain : bool
        False (default): :func:`load` the shipped weights. True: train a new model on the BBBC010
        training wells, with the ``quick`` preset (a tiny network, seconds; its outputs are
        only a pipeline check) or, with ``quick=False``, the shipped model's recorded training
        settings (preset ``colab`` on a GPU: about an hour on a T4; preset ``cpu`` otherwise).
    quick : bool
        See ``retrain``.
    device : str or torch.device
    train_wells : sequence of str, optional
        Default :data:`companion.data.bbbc010.FIT_WELLS`, the training wells less the validation wells,
        as ``python -m companion train`` uses (``quick``: the first 8).
    data_root : path-like, optional
        Passed to :func:`companion.data.bbbc010.load_bbbc010`.
    directory : path-like, optional
        Folder of the shipped weights (default the package's).
    progress : bool

    Returns
    -------
    model : nn.Module
        In eval mode on ``device``.
    description : str
        Where the model came from, for printing beside results.
    """
    if not retrain:
        model = load(name, directory=directory, map_location=device)
        return model, "shipped model " + training_budget(name, directory)

    if name not in NAMES:
        raise ValueError(f"retrain knows the models {list(NAMES)}, got {name!r}")
    on_gpu = torch.device(device).type == "cuda"
    if quick:
        config = TrainConfig.preset("quick", model=name, device=str(device))
        wells = list(train_wells or FIT_WELLS[:8])
    else:
        recorded = provenance(name, directory).get("overrides", {}) if name in available(directory) else {}
        keep = {k: recorded[k] for k in ("lr", "disc_warmup", "grad_clip") if k in recorded}
        config = TrainConfig.preset("colab" if on_gpu else "cpu", model=name, device=str(device), **keep)
        wells = list(train_wells or FIT_WELLS)
    samples = load_bbbc010(data_root, wells=wells, progress=progress)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint = train(config, samples, tempfile.mkdtemp(prefix=f"companion-{name}-"), progress=progress)
    model = load_model(checkpoint, map_location=device).eval()
    return model, (
        f"{name} model trained here ({'quick' if quick else 'full'} configuration): "
        f"{config.iterations:,} iterations, {time.perf_counter() - start:.0f} s on {device}"
    )


class LiveEvaluation(NamedTuple):
    """The committed evaluation's pipeline, run live on a few test wells (:func:`live_evaluation`)."""

    samples: list[Sample]
    #: network outputs of each well (deterministic pass + draws), as the evaluation caches them
    outputs: dict[str, ImageOutputs]
    #: (bandwidth, threshold) each well was segmented with
    params: dict[str, tuple[float, float]]
    #: binarised agglomerated masks and their scores, the agglomerations (one per well)
    preds: list[np.ndarray]
    scores: list[np.ndarray]
    agglomerations: list[Agglomeration]
    #: draws, seed, binarize_at, max_points of the run
    settings: dict
    #: where the model came from; what was run, one line per well
    description: str
    report: str
    #: the folder of the cached network outputs (one sub-folder per model name)
    cache_dir: Path
    #: the model and the recipe that made the predictions
    segmenter: Segmenter

    @property
    def gts(self) -> list[np.ndarray]:
        """The wells' ground-truth instance stacks."""
        return [s.instances for s in self.samples]

    @property
    def probs(self) -> list[np.ndarray]:
        """The per-instance probability maps ``(K, H, W)`` of each well."""
        return [agg.probs for agg in self.agglomerations]


def live_evaluation(
    name: str = "concrete",
    *,
    n_per_fold: int = 1,
    wells: Sequence[str] | None = None,
    retrain: bool = False,
    quick: bool = True,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> LiveEvaluation:
    """Run the committed evaluation's pipeline on the first ``n_per_fold`` wells of each test fold
    (or on ``wells``, e.g. the paper's Figure 1 wells C10, C04, D21).

    The model is :func:`load_or_train`'s, its :class:`companion.inference.segmenter.Segmenter` the shipped
    recipe of row ``"<name>/mc"`` (the paper's protocol; without one, or for a retrained model,
    :data:`companion.inference.sampling.MC_DRAWS` draws and the recipe defaults). The network outputs
    are computed as the evaluation computes them (same per-well seeds of the dropout masks) and
    kept in ``cache_dir`` (default a folder in the system's temporary directory, shared by the
    chapters; a file is reused only for the same weights and image).
    """
    model, description = load_or_train(name, retrain=retrain, quick=quick, device=device)
    recipe = None
    if not retrain:
        try:
            recipe = read_recipe(name, f"{name}/mc")  # the paper's protocol, as committed
        except ValueError:
            recipe = None
    if recipe is None:
        recipe = Recipe(mc_draws=MC_DRAWS)
    segmenter = Segmenter(model, recipe, device=device)
    folds = [f.wells for f in recipe.folds] or TEST_FOLDS
    wells = list(wells) if wells is not None else [w for fold in folds for w in fold[:n_per_fold]]
    samples = load_bbbc010(wells=wells, progress=False)
    folder = (
        Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "companion-book-outputs"
    )
    start = time.perf_counter()
    outputs = segmenter.cached_outputs(samples, folder / name, progress=False)
    params, preds, scores, aggs, lines = {}, [], [], [], []
    for sample in samples:
        chosen = recipe.for_image(sample.well)
        params[sample.well] = (chosen.bandwidth, chosen.threshold)
        result = segmenter.segment(outputs[sample.well], sample.well)
        preds.append(result.masks)
        scores.append(result.scores)
        aggs.append(result.agglomeration)
        lines.append(
            f"  {sample.well}: {len(sample.instances)} true worms, {len(result.agglomeration.probs)} "
            f"agglomerated instances, {len(result.masks)} after binarising (bandwidth "
            f"{chosen.bandwidth:g}, threshold {chosen.threshold:g})"
        )
    settings = dict(
        draws=recipe.mc_draws,
        seed=recipe.seed,
        binarize_at=recipe.binarize_at,
        max_points=recipe.max_points,
        flips=recipe.views > 1,
    )
    head = (
        f"{len(samples)} test wells {wells}, {settings['draws']} Monte-Carlo draws each, segmented and "
        f"agglomerated in {time.perf_counter() - start:.0f} s"
    )
    report = "\n".join([head, *lines])
    return LiveEvaluation(
        samples, outputs, params, preds, scores, aggs, settings, description, report, folder, segmenter
    )
