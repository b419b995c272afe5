"""Choosing the post-processing parameters by 2-fold cross-validation on the test set.

Mean-shift needs a ``bandwidth`` and the foreground mask a ``threshold``. Following the paper,
the test wells are split into two folds (:data:`companion.data.bbbc010.TEST_FOLDS`); the pair that
scores best on one fold is applied to the other, both ways, and the pooled metrics over all
test wells are reported. No well's score depends on parameters chosen on that well.

Examples
--------
>>> gts = {"a": np.ones((1, 4, 4), bool), "b": np.ones((1, 4, 4), bool)}
>>> def predict(well, bandwidth, threshold):  # a stand-in: right only for bandwidth 2
...     mask = np.ones((1, 4, 4), bool) if bandwidth == 2 else np.zeros((1, 4, 4), bool)
...     return mask, np.ones(1)
>>> result = grid_search(predict, gts, [1, 2], [0.5], folds=(("a",), ("b",)), progress=False)
>>> [c.bandwidth for c in result.choices], round(result.pooled["avAP"], 3)
([2.0, 2.0], 1.0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from companion.data.bbbc010 import TEST_FOLDS
from companion.data.targets import worm_probability
from companion.inference.outputs import mean_in_masks

from .metrics import instance_metrics

__all__ = ["FoldChoice", "GridSearchResult", "grid_search", "foreground_scores"]

Predictor = Callable[[str, float, float], tuple]


class FoldChoice(NamedTuple):
    """Parameters chosen on fold ``tuned_on`` (its score there) and the metrics on ``applied_to``."""

    tuned_on: int
    applied_to: int
    bandwidth: float
    threshold: float
    tuning_score: float
    test_metrics: dict


class GridSearchResult(NamedTuple):
    """``scores[f, i, j]``: the metric on fold ``f`` for ``bandwidths[i]``, ``thresholds[j]``;
    ``choices``: one :class:`FoldChoice` per fold; ``pooled``: :func:`companion.evaluation.metrics.instance_metrics`
    over all folds' wells, each segmented with the parameters chosen on the other fold;
    ``predictions``: ``{well: (masks, scores)}`` of those segmentations, fold by fold."""

    bandwidths: np.ndarray
    thresholds: np.ndarray
    metric: str
    scores: np.ndarray
    choices: list
    pooled: dict
    predictions: dict


def foreground_scores(masks: np.ndarray, class_logits: np.ndarray) -> np.ndarray:
    """Score of each instance: its mean probability of not being background (softmax of logits).

    Examples
    --------
    >>> logits = np.zeros((3, 2, 2)); logits[0, 0] = 10.0  # top row background
    >>> foreground_scores(np.ones((1, 2, 2), bool), logits).round(3).tolist()
    [0.333]
    """
    return mean_in_masks(masks, worm_probability(np.asarray(class_logits, dtype=np.float64)))


def _predict_all(predict: Predictor, wells, bandwidth, threshold):
    preds, scores = [], []
    for well in wells:
        masks, s = predict(well, bandwidth, threshold)
        preds.append(np.asarray(masks, bool)), scores.append(np.asarray(s, np.float64))
    return preds, scores


def grid_search(
    predict: Predictor,
    gts: Mapping[str, np.ndarray],
    bandwidths: Sequence[float],
    thresholds: Sequence[float],
    folds: Sequence[Sequence[str]] | None = None,
    *,
    metric: str = "avAP",
    progress: bool = True,
) -> GridSearchResult:
    """Bandwidth x threshold grid with cross-validation over folds of wells.

    For every grid point all wells are segmented once and scored per fold. For each fold
    ``f`` the best point of the *other* folds (mean of their scores; with two folds simply
    the other fold) is applied to fold ``f``. ``pooled`` evaluates all wells together, each
    segmented with the parameters chosen without it. Each well is segmented once per grid
    point: the predictions at the best point so far are kept, not recomputed.

    Parameters
    ----------
    predict : callable
        ``predict(well, bandwidth, threshold) -> (masks bool (K, H, W), scores (K,))``.
    gts : mapping
        Ground-truth stack per well.
    bandwidths, thresholds : sequences of float
    folds : sequence of sequences of well ids, optional
        Default :data:`companion.data.bbbc010.TEST_FOLDS`.
    metric : str
        A key of :func:`companion.evaluation.metrics.instance_metrics`'s result used for the choice.
    progress : bool
        tqdm bar over the grid points.

    Returns
    -------
    GridSearchResult
    """
    from tqdm.auto import tqdm

    if folds is None:
        folds = TEST_FOLDS
    if len(folds) < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {len(folds)}")
    missing = [w for fold in folds for w in fold if w not in gts]
    if missing:
        raise ValueError(f"no ground truth for wells {missing[:5]}{'...' if len(missing) > 5 else ''}")
    bandwidths, thresholds = np.asarray(bandwidths, float), np.asarray(thresholds, float)
    scores = np.zeros((len(folds), len(bandwidths), len(thresholds)))
    others = [[g for g in range(len(folds)) if g != f] for f in range(len(folds))]
    best: list[tuple | None] = [None] * len(folds)  # per fold: (tuning score, (i, j), preds, scores)
    grid = [(i, j) for i in range(len(bandwidths)) for j in range(len(thresholds))]
    for i, j in tqdm(grid, desc="grid", disable=not progress):
        point = []
        for f, fold in enumerate(folds):
            preds, s = _predict_all(predict, fold, bandwidths[i], thresholds[j])
            scores[f, i, j] = instance_metrics([gts[w] for w in fold], preds, s)[metric]
            point.append((preds, s))
        for f in range(len(folds)):  # keep the first best point so far (argmax's tie rule)
            value = scores[others[f], i, j].mean()
            if best[f] is None or value > best[f][0]:
                best[f] = (value, (i, j), *point[f])
    choices, all_gts, all_preds, all_scores, predictions = [], [], [], [], {}
    for f, fold in enumerate(folds):
        # the grid is visited row-major and only a strictly better point replaces the kept one,
        # so the kept point is np.argmax's first best of the other folds' mean score
        tuning_score, (i, j), preds, s = best[f]
        fold_gts = [gts[w] for w in fold]
        choices.append(
            FoldChoice(
                others[f][0] if len(others[f]) == 1 else -1,
                f,
                float(bandwidths[i]),
                float(thresholds[j]),
                float(tuning_score),
                instance_metrics(fold_gts, preds, s),
            )
        )
        predictions.update({w: (m, sc) for w, m, sc in zip(fold, preds, s)})
        all_gts += fold_gts
        all_preds += preds
        all_scores += s
    return GridSearchResult(
        bandwidths,
        thresholds,
        metric,
        scores,
        choices,
        instance_metrics(all_gts, all_preds, all_scores),
        predictions,
    )
