"""Choosing the post-processing parameters by 2-fold cross-validation on the test set.

Mean-shift needs a ``bandwidth`` and the foreground mask a ``threshold``. Following the paper,
the test wells are split into two folds (:data:`companion.data.TEST_FOLDS`); the pair that
scores best on one fold is applied to the other, both ways, and the pooled metrics over all
test wells are reported. No well's score depends on parameters chosen on that well.

The network is evaluated once per well and its outputs cached (:func:`cached_outputs`, an
``.npz`` file written atomically), so a grid costs clustering only.

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

import os
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from .metrics import evaluate
from ._io import atomic_savez

__all__ = ["FoldChoice", "GridSearchResult", "grid_search", "cached_outputs", "segmenter", "foreground_scores"]

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
    ``choices``: one :class:`FoldChoice` per fold; ``pooled``: :func:`companion.metrics.evaluate`
    over all folds' wells, each segmented with the parameters chosen on the other fold."""

    bandwidths: np.ndarray
    thresholds: np.ndarray
    metric: str
    scores: np.ndarray
    choices: list
    pooled: dict



def cached_outputs(
    path: str | os.PathLike,
    wells: Sequence[str],
    compute: Callable[[str], Mapping[str, np.ndarray]],
    *,
    progress: bool = True,
) -> dict:
    """Network outputs per well, computed once and kept in an ``.npz`` cache.

    Parameters
    ----------
    path : path-like
        The cache file. Wells already in it are loaded, missing ones computed and the file
        rewritten atomically (temporary file + ``os.replace``).
    wells : sequence of str
    compute : callable
        ``compute(well) -> {"embedding": ..., "logits": ...}`` (any names of arrays), e.g.
        wrapping :func:`companion.sampling.predict` or ``mc_predict``.
    progress : bool
        Show a tqdm bar over the wells to compute.

    Returns
    -------
    dict
        ``{well: {name: array}}`` for the requested wells.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "cache.npz"
    >>> out = cached_outputs(f, ["A01"], lambda w: {"logits": np.zeros((3, 2, 2))}, progress=False)
    >>> out["A01"]["logits"].shape, f.exists()
    ((3, 2, 2), True)
    """
    from tqdm.auto import tqdm

    path = Path(path)
    stored: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path) as data:
            stored = {key: data[key] for key in data.files}
    for well in wells:
        if "__" in well:
            raise ValueError(f"well ids must not contain '__', got {well!r}")
    missing = [w for w in wells if not any(k.startswith(f"{w}__") for k in stored)]
    for well in tqdm(missing, desc="network outputs", disable=not progress or not missing):
        for name, array in compute(well).items():
            stored[f"{well}__{name}"] = np.asarray(array)
    if missing:
        atomic_savez(path, stored)
    out: dict = {w: {} for w in wells}
    for key, array in stored.items():
        well, name = key.split("__", 1)
        if well in out:
            out[well][name] = array
    return out


def foreground_scores(masks: np.ndarray, class_logits: np.ndarray) -> np.ndarray:
    """Score of each instance: its mean probability of not being background (softmax of logits).

    Examples
    --------
    >>> logits = np.zeros((3, 2, 2)); logits[0, 0] = 10.0  # top row background
    >>> foreground_scores(np.ones((1, 2, 2), bool), logits).round(3).tolist()
    [0.333]
    """
    logits = np.asarray(class_logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    foreground = 1.0 - shifted[0] / shifted.sum(axis=0)
    masks = np.asarray(masks, bool)
    area = masks.sum(axis=(1, 2))
    return np.where(area > 0, (masks * foreground).sum(axis=(1, 2)) / np.maximum(area, 1), 0.0)


def segmenter(
    cache: Mapping[str, Mapping[str, np.ndarray]],
    segment_fn: Callable | None = None,
    *,
    binarize_at: float = 0.75,
) -> Predictor:
    """Turn cached network outputs into the ``(well, bandwidth, threshold) -> (masks, scores)``
    callable that :func:`grid_search` takes.

    A cache entry holds ``embedding`` ``(E, H, W)`` and ``logits`` ``(3, H, W)`` (one
    deterministic pass; scores by :func:`foreground_scores`), or Monte-Carlo draws
    ``(n, E, H, W)`` and ``(n, 3, H, W)``: then each draw is segmented, the draws are
    agglomerated (:func:`companion.agglomerate.agglomerate`) and binarised at ``binarize_at``,
    with the agglomeration's scores.

    Parameters
    ----------
    cache : mapping
        ``{well: {"embedding": ..., "logits": ...}}`` (e.g. from :func:`cached_outputs`).
    segment_fn : callable, optional
        ``segment_fn(embedding, class_logits, bandwidth, threshold) -> bool (K, H, W)``;
        default :func:`companion.postprocess.segment`.
    binarize_at : float
    """
    if segment_fn is None:
        from .postprocess import segment as segment_fn

    def predict(well: str, bandwidth: float, threshold: float):
        entry = cache[well]
        embedding, logits = np.asarray(entry["embedding"]), np.asarray(entry["logits"])
        if embedding.ndim == 3:
            masks = np.asarray(segment_fn(embedding, logits, bandwidth, threshold), bool)
            return masks, foreground_scores(masks, logits)
        if embedding.ndim != 4 or logits.ndim != 4:
            raise ValueError(f"well {well}: embedding must be (E, H, W) or (n, E, H, W), got {embedding.shape}")
        from .agglomerate import agglomerate, binarize_with_scores

        draws = [segment_fn(e, lg, bandwidth, threshold) for e, lg in zip(embedding, logits)]
        return binarize_with_scores(agglomerate(draws), binarize_at)

    return predict


def _predict_all(predict: Predictor, wells, bandwidth, threshold):
    preds, scores = [], []
    for well in wells:
        masks, s = predict(well, bandwidth, threshold)
        preds.append(np.asarray(masks, bool)), scores.append(np.asarray(s, np.float64))
    return preds, scores


def grid_search(
    predict: Predictor | Mapping,
    gts: Mapping[str, np.ndarray],
    bandwidths: Sequence[float],
    thresholds: Sequence[float],
    folds: Sequence[Sequence[str]] | None = None,
    *,
    metric: str = "avAP",
    segment_fn: Callable | None = None,
    progress: bool = True,
) -> GridSearchResult:
    """Bandwidth x threshold grid with cross-validation over folds of wells.

    For every grid point all wells are segmented once and scored per fold. For each fold
    ``f`` the best point of the *other* folds (mean of their scores; with two folds simply
    the other fold) is applied to fold ``f``. ``pooled`` evaluates all wells together, each
    segmented with the parameters chosen without it.

    Parameters
    ----------
    predict : callable or mapping
        ``predict(well, bandwidth, threshold) -> (masks bool (K, H, W), scores (K,))``; or a
        cache ``{well: {"embedding", "logits"}}``, wrapped by :func:`segmenter` with ``segment_fn``.
    gts : mapping
        Ground-truth stack per well.
    bandwidths, thresholds : sequences of float
    folds : sequence of sequences of well ids, optional
        Default :data:`companion.data.TEST_FOLDS`.
    metric : str
        A key of :func:`companion.metrics.evaluate`'s result used for the choice.
    segment_fn : callable, optional
        Only used when ``predict`` is a cache.
    progress : bool
        tqdm bar over the grid points.

    Returns
    -------
    GridSearchResult
    """
    from tqdm.auto import tqdm

    if folds is None:
        from .data import TEST_FOLDS as folds
    if len(folds) < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {len(folds)}")
    if not callable(predict):
        predict = segmenter(predict, segment_fn)
    missing = [w for fold in folds for w in fold if w not in gts]
    if missing:
        raise ValueError(f"no ground truth for wells {missing[:5]}{'...' if len(missing) > 5 else ''}")
    bandwidths, thresholds = np.asarray(bandwidths, float), np.asarray(thresholds, float)
    scores = np.zeros((len(folds), len(bandwidths), len(thresholds)))
    grid = [(i, j) for i in range(len(bandwidths)) for j in range(len(thresholds))]
    for i, j in tqdm(grid, desc="grid", disable=not progress):
        for f, fold in enumerate(folds):
            preds, s = _predict_all(predict, fold, bandwidths[i], thresholds[j])
            scores[f, i, j] = evaluate([gts[w] for w in fold], preds, s)[metric]
    choices, all_gts, all_preds, all_scores = [], [], [], []
    for f, fold in enumerate(folds):
        others = [g for g in range(len(folds)) if g != f]
        tuning = scores[others].mean(axis=0)
        i, j = np.unravel_index(np.argmax(tuning), tuning.shape)  # first best on ties
        preds, s = _predict_all(predict, fold, bandwidths[i], thresholds[j])
        fold_gts = [gts[w] for w in fold]
        choices.append(FoldChoice(others[0] if len(others) == 1 else -1, f, float(bandwidths[i]),
                                  float(thresholds[j]), float(tuning[i, j]), evaluate(fold_gts, preds, s)))
        all_gts += fold_gts
        all_preds += preds
        all_scores += s
    return GridSearchResult(bandwidths, thresholds, metric, scores, choices, evaluate(all_gts, all_preds, all_scores))
