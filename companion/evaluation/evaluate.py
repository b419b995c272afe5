"""The evaluation pipeline of the paper's Table 1, Fig. 2 and Table 2 (``python -m companion evaluate``).

For a trained model and the test wells:

1. **Network outputs** (:meth:`companion.inference.segmenter.Segmenter.cached_outputs`): one deterministic pass
   per well and, for a model with Concrete Dropout, ``draws`` Monte-Carlo passes, stored
   compactly in one ``.npz`` per well and reused when model, image and settings are unchanged,
   so a re-run only clusters.
2. **Hyper-parameters** (:func:`companion.evaluation.tuning.grid_search`): bandwidth x threshold, 2-fold
   cross-validation over the test folds, as in the paper. The grid is searched on the
   *deterministic* pass only (its cost is one clustering per well and grid point, not
   ``draws`` of them); the Monte-Carlo draws of a fold then use the values chosen on the other
   fold.
3. **Predictions** (:meth:`companion.inference.segmenter.Segmenter.segment` with each fold's
   bandwidth and threshold): the deterministic pass is segmented (scores: mean foreground
   probability);
   for a Concrete Dropout model every draw is segmented, the draws agglomerated
   (:func:`companion.inference.agglomerate.agglomerate`) and binarised at ``binarize_at`` (scores from
   the agglomeration). A model without dropout evaluated with ``flips`` gets the same
   treatment of its four flipped passes (row ``"flips_agglomerated"``; not in the paper).
4. **Metrics**: Table 1 rows (:func:`companion.evaluation.metrics.instance_metrics`), PAvPU curves
   (:func:`companion.evaluation.uncertainty.pavpu`) and simulated proofreading
   (:func:`companion.evaluation.proofreading.simulate_proofreading`) of the agglomerated predictions.

:func:`evaluate_model` runs 1-4 on in-memory samples (tests pass synthetic worms);
:func:`companion.evaluation.report.write_report` writes ``results.json``, the CSV tables and the figures.

The network outputs dominate the cost on a CPU and are cached per well, so a second evaluation
with other post-processing settings only re-clusters (``results/TRAINING.md`` has the timings).

Examples
--------
>>> import torch
>>> from companion.model.unet import UNet
>>> from companion.data.synthetic import make_dataset
>>> torch.manual_seed(0) and None
>>> samples = make_dataset(2, seed=0, shape=(64, 64))
>>> result = evaluate_model(UNet(base_filters=2, depth=3, embedding_dim=4), samples,
...                         folds=[["SYN-0"], ["SYN-1"]], bandwidths=[1.0], thresholds=[1.0],
...                         progress=False)
>>> [row["name"] for row in result.rows], sorted(result.rows[0])[:3]
(['deterministic'], ['AP50', 'AP75', 'avAP'])
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn

from companion.data.bbbc010 import TEST_FOLDS
from companion.inference.agglomerate import image_uncertainty
from companion.inference.outputs import has_concrete_dropout
from companion.inference.recipes import Recipe, views_recipe
from companion.inference.sampling import MC_DRAWS
from companion.inference.segmenter import Segmenter

from .metrics import instance_metrics
from .paper import ROW_KEYS
from .proofreading import simulate_proofreading
from .tuning import GridSearchResult, grid_search
from .uncertainty import PAvPU, pavpu

if TYPE_CHECKING:  # pragma: no cover
    from companion.data.bbbc010 import Sample

__all__ = [
    "DEFAULT_BANDWIDTHS",
    "DEFAULT_THRESHOLDS",
    "PAVPU_THRESHOLDS",
    "N_CORRECTIONS",
    "AGGLOMERATED_ROWS",
    "FLIPS_AGGLOMERATED",
    "EvaluationResult",
    "evaluate_model",
]

#: Default mean-shift bandwidths of the grid search.
DEFAULT_BANDWIDTHS: tuple[float, ...] = (1.0, 1.5, 2.0)
#: Default assignment thresholds (embedding distance to the centre) of the grid search.
DEFAULT_THRESHOLDS: tuple[float, ...] = (1.0, 1.5, 2.0)
#: Entropy thresholds of the PAvPU curves (Fig. 2).
PAVPU_THRESHOLDS: np.ndarray = np.linspace(0.0, 0.7, 15)
#: Numbers of simulated corrections of Table 2.
N_CORRECTIONS: tuple[int, ...] = (0, 5, 10, 15, 20)


class _ScaledCounts(Sequence):
    """Agglomeration probabilities held as uint8 counts of ``n`` draws, float32 on access (4x less memory)."""

    def __init__(self, counts: list, n: int) -> None:
        self._counts, self._n = counts, n

    def __len__(self) -> int:
        return len(self._counts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return (self._counts[index] / np.float64(self._n)).astype(np.float32)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))


def _to_counts(probs: np.ndarray, n: int) -> np.ndarray:
    counts = np.rint(np.asarray(probs, np.float64) * n)
    return counts.astype(np.uint8 if n < 256 else np.uint16)


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------
class EvaluationResult(NamedTuple):
    """What :func:`evaluate_model` measured.

    Attributes
    ----------
    rows : list of dict
        Table 1 rows: ``name`` (``"mc"`` agglomerated draws, ``"flips_agglomerated"`` the
        agglomerated flipped passes of a model without dropout, ``"deterministic"`` one pass),
        ``inference`` (a description) and the metrics of :data:`companion.evaluation.paper.ROW_KEYS`.
    tuning : companion.evaluation.tuning.GridSearchResult
        The grid search on the deterministic pass.
    folds : list of tuple of str
        The folds actually used (wells absent from ``samples`` removed).
    per_image : list of dict
        One dict per well and row: ``row``, ``well``, ``fold``, ``n_gt``, ``n_pred``,
        ``n_recalled80``, ``n_recalled80_iou``, ``AP50``, ``avAP``, ``avAP_dsb``; agglomerated rows also ``uncertainty``
        (:func:`companion.inference.agglomerate.image_uncertainty` of the agglomerated probabilities).
    pavpu : companion.evaluation.uncertainty.PAvPU or None
        Of the agglomerated predictions (None without draws).
    proofreading : list of dict or None
        Rows of :func:`companion.evaluation.proofreading.simulate_proofreading` (None without draws).
    predictions : dict
        ``{row name: [bool (K, H, W) per well]}`` in the order of ``wells``.
    wells : list of str
        The evaluated wells, fold by fold (the order of all per-well lists).
    settings : dict
    """

    rows: list
    tuning: GridSearchResult
    folds: list
    per_image: list
    pavpu: PAvPU | None
    proofreading: list | None
    predictions: dict
    wells: list
    settings: dict


def _check_folds(samples: Sequence[Sample], folds: Sequence[Sequence[str]] | None) -> list[tuple[str, ...]]:
    wells = [s.well for s in samples]
    if len(set(wells)) != len(wells):
        raise ValueError(
            f"samples hold duplicate wells: {sorted(w for w in set(wells) if wells.count(w) > 1)}"
        )
    if folds is None:
        folds = TEST_FOLDS
    present = set(wells)
    used = [tuple(w for w in fold if w in present) for fold in folds]
    in_folds = {w for fold in used for w in fold}
    if sum(len(fold) for fold in used) != len(in_folds):
        raise ValueError(f"folds must be disjoint; got {[list(f) for f in used]}")
    outside = [w for w in wells if w not in in_folds]
    if outside:
        raise ValueError(f"wells {outside[:5]} are in no fold; pass folds= covering every sample")
    empty = [i for i, fold in enumerate(used) if not fold]
    if len(used) < 2 or empty:
        raise ValueError(
            f"cross-validation needs >= 2 folds with at least one well each; folds {empty} "
            f"hold none of the samples' wells"
        )
    return used


def _per_image_rows(name: str, wells: Sequence[str], fold_of: Mapping[str, int], metrics: dict) -> list[dict]:
    keys = ("n_gt", "n_pred", "n_recalled80", "n_recalled80_iou", "AP50", "avAP", "avAP_dsb")
    return [
        dict(row=name, well=well, fold=fold_of[well], **{k: image[k] for k in keys})
        for well, image in zip(wells, metrics["per_image"])
    ]


_FLIPS_NOTE = ", test-time augmentation with 4 flips"
#: Name of the agglomerated row of a model without dropout, whose draws are its flipped passes.
FLIPS_AGGLOMERATED = "flips_agglomerated"
#: Names of the rows made by agglomerating draws (``"mc"``: Monte-Carlo dropout draws).
AGGLOMERATED_ROWS: tuple[str, ...] = ("mc", FLIPS_AGGLOMERATED)


def _agglomerated_row(model: nn.Module, n_draws: int, binarize_at: float, flips: bool) -> tuple[str, str]:
    """Name and inference text of the row that agglomerates ``n_draws`` draws."""
    if has_concrete_dropout(model):
        text = f"{n_draws} Monte-Carlo draws, agglomerated, p >= {binarize_at}"
        return "mc", text + (_FLIPS_NOTE if flips else "")
    text = (
        f"{n_draws} flipped passes (test-time augmentation, no dropout), each segmented, "
        f"agglomerated, p >= {binarize_at}"
    )
    return FLIPS_AGGLOMERATED, text


def evaluate_model(
    model: nn.Module,
    samples: Sequence[Sample],
    *,
    recipe: Recipe | None = None,
    folds: Sequence[Sequence[str]] | None = None,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    batch: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    pavpu_thresholds: Sequence[float] = PAVPU_THRESHOLDS,
    n_corrections: Sequence[int] = N_CORRECTIONS,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate a model on samples as the paper does (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        A :class:`companion.model.unet.UNet` (on ``device``), with or without Concrete Dropout.
    samples : sequence of Sample
        The evaluated wells with their ground truth; a well without any instance raises
        ``ValueError`` naming it (before any network pass).
    folds : sequence of sequences of well ids, optional
        Cross-validation folds; default :data:`companion.data.bbbc010.TEST_FOLDS`. Wells absent from
        ``samples`` (e.g. skipped incomplete wells) are dropped; every sample must be in a fold.
    bandwidths, thresholds : sequences of float
        The grid of mean-shift bandwidths and assignment thresholds.
    recipe : companion.inference.recipes.Recipe, optional
        The inference protocol of the agglomerated row (its bandwidth and threshold are
        replaced by the grid search's); the deterministic row uses ``recipe.deterministic()``.
        Default: :data:`companion.inference.sampling.MC_DRAWS` Monte-Carlo draws for a Concrete Dropout
        model, one pass otherwise, and the :class:`~companion.inference.recipes.Recipe` defaults.
    batch : int, optional
        Draws per forward pass; default 8 on a GPU, 1 on the CPU (see
        :func:`companion.inference.sampling.mc_predict`).
    cache_dir : path-like, optional
        Where the compact network outputs are cached (``None``: not cached).
    device : str or torch.device, optional
        Where the network runs (the model must already be there); default the model's device.
    pavpu_thresholds, n_corrections : sequences
        Entropy thresholds of the PAvPU curves; numbers of simulated corrections.
    progress : bool
        tqdm bars.

    Returns
    -------
    EvaluationResult
    """
    from tqdm.auto import tqdm

    used_folds = _check_folds(samples, folds)
    no_truth = [s.well for s in samples if len(s.instances) == 0]
    if no_truth:  # COCO would score them -1 and the run would end "successfully"
        raise ValueError(
            f"cannot evaluate well(s) without ground truth (no worm mask): "
            f"{', '.join(no_truth)}; predict them instead, or leave them out"
        )
    if recipe is None:
        recipe = views_recipe(model, mc_draws=MC_DRAWS, flips=False)
    segmenter = Segmenter(model, recipe, device=device)
    # fold by fold, the order of grid_search's pooled metrics (COCO AP breaks score ties by order)
    wells = [w for fold in used_folds for w in fold]
    by_well = {s.well: s for s in samples}
    samples = [by_well[w] for w in wells]
    gts = {s.well: np.asarray(s.instances, bool) for s in samples}
    fold_of = {w: f for f, fold in enumerate(used_folds) for w in fold}
    outputs = segmenter.cached_outputs(samples, cache_dir, batch=batch, progress=progress)
    one_pass = segmenter.recipe.deterministic()

    def deterministic(well: str, bandwidth: float, threshold: float):
        point = one_pass.replace(bandwidth=float(bandwidth), threshold=float(threshold))
        return Segmenter(model, point).segment(outputs[well])[:2]

    tuning = grid_search(
        deterministic, gts, bandwidths, thresholds, used_folds, metric="avAP", progress=progress
    )
    chosen = {c.applied_to: (c.bandwidth, c.threshold) for c in tuning.choices}
    det = [tuning.predictions[w] for w in wells]  # each well segmented at its fold's chosen point
    gt_list = [gts[w] for w in wells]
    det_metrics = instance_metrics(gt_list, [m for m, _ in det], [s for _, s in det])
    rows = [
        dict(
            name="deterministic",
            inference="one deterministic pass (dropout off)" + (_FLIPS_NOTE if recipe.views > 1 else ""),
            **{k: det_metrics[k] for k in ROW_KEYS},
        )
    ]
    per_image = _per_image_rows("deterministic", wells, fold_of, det_metrics)
    predictions = {"deterministic": [m for m, _ in det]}
    pavpu_result = proofreading = None

    n_draws = len(outputs[wells[0]].draws)
    if n_draws:
        mc_masks, mc_scores, counts, agg_scores = [], [], [], []
        for well in tqdm(wells, desc="MC draws: segment + agglomerate", unit="well", disable=not progress):
            bandwidth, threshold = chosen[fold_of[well]]
            result = segmenter.with_recipe(bandwidth=bandwidth, threshold=threshold).segment(outputs[well])
            mc_masks.append(result.masks), mc_scores.append(result.scores)
            counts.append(_to_counts(result.agglomeration.probs, n_draws))
            agg_scores.append(result.agglomeration.scores)
        mc_metrics = instance_metrics(gt_list, mc_masks, mc_scores)
        agg_name, inference = _agglomerated_row(model, n_draws, recipe.binarize_at, recipe.views > 1)
        rows.insert(
            0,
            dict(
                name=agg_name,
                inference=inference,
                **{k: mc_metrics[k] for k in ROW_KEYS},
            ),
        )
        mc_rows = _per_image_rows(agg_name, wells, fold_of, mc_metrics)
        for row, count in zip(mc_rows, counts):
            row["uncertainty"] = image_uncertainty(count / np.float64(n_draws))
        per_image = mc_rows + per_image
        predictions = {agg_name: mc_masks, **predictions}
        probs = _ScaledCounts(counts, n_draws)
        pavpu_result = pavpu(gt_list, probs, pavpu_thresholds, binarize_at=recipe.binarize_at)
        proofreading = simulate_proofreading(
            gt_list, probs, n_corrections, binarize_at=recipe.binarize_at, scores=agg_scores
        ).rows
    settings = dict(
        bandwidths=[float(b) for b in bandwidths],
        thresholds=[float(t) for t in thresholds],
        max_points=recipe.max_points,
        clustering=recipe.clustering,
        min_size=recipe.min_size,
        flips=recipe.views > 1,
        draws=n_draws,
        binarize_at=float(recipe.binarize_at),
        seed=int(recipe.seed),
        tuning_metric="avAP",
        tuned_on="deterministic pass",
        pavpu_thresholds=[round(float(t), 9) for t in pavpu_thresholds],
        n_corrections=[int(n) for n in n_corrections],
    )
    return EvaluationResult(
        rows, tuning, used_folds, per_image, pavpu_result, proofreading, predictions, wells, settings
    )
