"""The evaluation pipeline of the paper's Table 1, Fig. 2 and Table 2 (``python -m companion evaluate``).

For a trained model and the test wells:

1. **Network outputs** (:func:`well_outputs`): one deterministic pass per well
   (:func:`companion.sampling.predict`) and, for a model with Concrete Dropout, ``draws``
   Monte-Carlo passes (:func:`companion.sampling.mc_predict`). They are stored compactly
   (:class:`CompactPass`: the uint8 class map plus float16 embeddings and foreground
   probabilities of the non-background pixels, ~4 % of a BBBC010 image) in one ``.npz`` per
   well, reused when model, image and settings are unchanged, so a re-run only clusters.
2. **Hyper-parameters** (:func:`companion.tuning.grid_search`): bandwidth x threshold, 2-fold
   cross-validation over the test folds, as in the paper. The grid is searched on the
   *deterministic* pass only (its cost is one clustering per well and grid point, not
   ``draws`` of them); the Monte-Carlo draws of a fold then use the values chosen on the other
   fold.
3. **Predictions**: the deterministic pass is segmented (scores: mean foreground probability);
   for a Concrete Dropout model every draw is segmented, the draws agglomerated
   (:func:`companion.agglomerate.agglomerate`) and binarised at ``binarize_at`` (scores from
   the agglomeration).
4. **Metrics**: Table 1 rows (:func:`companion.metrics.evaluate`), PAvPU curves
   (:func:`companion.uncertainty.pavpu`) and simulated proofreading
   (:func:`companion.proofreading.simulate_proofreading`) of the agglomerated predictions.

:func:`evaluate_model` runs 1-4 on in-memory samples (tests pass synthetic worms);
:func:`write_report` writes ``results.json``, the CSV tables and the figures.

Cost, measured on one CPU thread on a BBBC010 well (520 x 696) with the full U-Net: 1.3 s for the
deterministic pass, 15 s for 8 draws; ``segment`` takes ~0.5 s per pass (idealised embeddings
of 15 worms). The 47 complete test wells with 8 draws and a 3 x 3 grid thus need ~13 min of
network (seconds on a GPU) and ~7 min of clustering; a cache file holds ~3.9 MB per well.

Examples
--------
>>> import torch
>>> from companion.model import UNet
>>> from companion.synthetic import make_dataset
>>> torch.manual_seed(0) and None
>>> samples = make_dataset(2, seed=0, shape=(64, 64))
>>> result = evaluate_model(UNet(base_filters=2, depth=3, embedding_dim=4), samples,
...                         folds=[["SYN-0"], ["SYN-1"]], bandwidths=[1.0], thresholds=[1.0],
...                         progress=False)
>>> [row["name"] for row in result.rows], sorted(result.rows[0])[:3]
(['deterministic'], ['AP50', 'AP75', 'avAP'])
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from ._io import atomic_savez, atomic_write_bytes, tensors_sha256
from .paper import TABLE1_KEYS

if TYPE_CHECKING:  # pragma: no cover
    from companion.data import Sample
    from companion.tuning import GridSearchResult
    from companion.uncertainty import PAvPU

__all__ = [
    "DEFAULT_BANDWIDTHS",
    "DEFAULT_THRESHOLDS",
    "PAVPU_THRESHOLDS",
    "CompactPass",
    "WellOutputs",
    "EvaluationResult",
    "compact_pass",
    "expand_pass",
    "segment_compact",
    "compact_scores",
    "model_fingerprint",
    "has_concrete_dropout",
    "well_outputs",
    "cached_well_outputs",
    "predict_deterministic",
    "predict_agglomerated",
    "evaluate_model",
    "write_report",
    "plot_pavpu",
    "plot_gallery",
]

#: Default mean-shift bandwidths of the grid search.
DEFAULT_BANDWIDTHS: tuple[float, ...] = (1.0, 1.5, 2.0)
#: Default assignment thresholds (embedding distance to the centre) of the grid search.
DEFAULT_THRESHOLDS: tuple[float, ...] = (1.0, 1.5, 2.0)
#: Entropy thresholds of the PAvPU curves (Fig. 2).
PAVPU_THRESHOLDS: np.ndarray = np.linspace(0.0, 0.7, 15)
#: Numbers of simulated corrections of Table 2.
N_CORRECTIONS: tuple[int, ...] = (0, 5, 10, 15, 20)
#: Layout version of the per-well cache files; a change invalidates old caches.
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Compact network outputs
# --------------------------------------------------------------------------------------------
class CompactPass(NamedTuple):
    """One forward pass, stored compactly.

    Attributes
    ----------
    classes : np.ndarray
        uint8 ``(H, W)``: the most likely class (0 background, 1 foreground, 2 overlap).
    embedding : np.ndarray
        float16 ``(N, E)``: embeddings of the ``N`` pixels with ``classes != 0``, row-major.
    foreground : np.ndarray
        float16 ``(N,)``: their probability of not being background (softmax of the logits).
    """

    classes: np.ndarray
    embedding: np.ndarray
    foreground: np.ndarray


class WellOutputs(NamedTuple):
    """Network outputs of one well: the deterministic pass and the Monte-Carlo draws (maybe none)."""

    deterministic: CompactPass
    draws: tuple


def compact_pass(embedding: np.ndarray, logits: np.ndarray) -> CompactPass:
    """Keep what post-processing needs of one pass: the class map and the foreground pixels.

    Parameters
    ----------
    embedding : np.ndarray
        ``(E, H, W)`` pixel embeddings.
    logits : np.ndarray
        ``(3, H, W)`` class logits.

    Examples
    --------
    >>> logits = np.zeros((3, 2, 2), np.float32); logits[1, 0, 0] = 5.0
    >>> c = compact_pass(np.ones((4, 2, 2), np.float32), logits)
    >>> c.classes.tolist(), c.embedding.shape, c.embedding.dtype
    ([[1, 0], [0, 0]], (1, 4), dtype('float16'))
    """
    embedding, logits = np.asarray(embedding), np.asarray(logits, dtype=np.float32)
    if embedding.ndim != 3 or logits.shape != (3,) + embedding.shape[1:]:
        raise ValueError(f"expected embedding (E, H, W) and logits (3, H, W) of one size, got "
                         f"embedding {embedding.shape} and logits {logits.shape}")
    classes = np.argmax(logits, axis=0).astype(np.uint8)
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    foreground_prob = 1.0 - shifted[0] / shifted.sum(axis=0)
    mask = classes != 0
    return CompactPass(classes, embedding[:, mask].T.astype(np.float16),
                       foreground_prob[mask].astype(np.float16))


def expand_pass(compact: CompactPass) -> tuple[np.ndarray, np.ndarray]:
    """Full-size ``(E, H, W)`` embedding and ``(3, H, W)`` one-hot logits of a :class:`CompactPass`.

    Background pixels get a zero embedding; the logits are 1 for the stored class and 0
    otherwise, so their argmax is the class map, which is all that
    :func:`companion.postprocess.segment` reads from them.

    Examples
    --------
    >>> c = CompactPass(np.array([[2, 0]], np.uint8), np.ones((1, 3), np.float16), np.ones(1, np.float16))
    >>> embedding, logits = expand_pass(c)
    >>> embedding[:, 0, 1].tolist(), logits.argmax(axis=0).tolist()
    ([0.0, 0.0, 0.0], [[2, 0]])
    """
    classes = np.asarray(compact.classes)
    mask = classes != 0
    if compact.embedding.ndim != 2 or len(compact.embedding) != mask.sum():
        raise ValueError(f"compact embedding {compact.embedding.shape} does not match the "
                         f"{int(mask.sum())} non-background pixels of the class map")
    embedding = np.zeros((compact.embedding.shape[1],) + classes.shape, np.float32)
    embedding[:, mask] = compact.embedding.T
    logits = (np.arange(3)[:, None, None] == classes[None]).astype(np.float32)
    return embedding, logits


def segment_compact(compact: CompactPass, bandwidth: float, threshold: float, **segment_kwargs) -> np.ndarray:
    """:func:`companion.postprocess.segment` on a :class:`CompactPass` (bool ``(K, H, W)``).

    Equal to ``segment`` on the full outputs with the embedding rounded to float16.
    """
    from companion.postprocess import segment

    embedding, logits = expand_pass(compact)
    return np.asarray(segment(embedding, logits, bandwidth, threshold, **segment_kwargs), bool)


def compact_scores(compact: CompactPass, masks: np.ndarray) -> np.ndarray:
    """Score of each mask: its mean foreground probability (as :func:`companion.tuning.foreground_scores`).

    Examples
    --------
    >>> c = CompactPass(np.array([[1, 1, 0]], np.uint8), np.zeros((2, 1), np.float16),
    ...                 np.array([1.0, 0.5], np.float16))
    >>> compact_scores(c, np.ones((1, 1, 3), bool)).tolist()  # background pixels count as 0
    [0.5]
    """
    probability = np.zeros(compact.classes.shape, np.float64)
    probability[compact.classes != 0] = compact.foreground
    masks = np.asarray(masks, bool)
    area = masks.sum(axis=(1, 2))
    total = (masks * probability).sum(axis=(1, 2))
    return np.divide(total, area, out=np.zeros(len(masks)), where=area > 0)


# --------------------------------------------------------------------------------------------
# Network outputs and their cache
# --------------------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and values), a cache key.

    Examples
    --------
    >>> from companion.model import UNet
    >>> torch.manual_seed(0) and None
    >>> a = UNet(base_filters=2, depth=2)
    >>> model_fingerprint(a) == model_fingerprint(a), len(model_fingerprint(a))
    (True, 64)
    """
    return tensors_sha256(model.state_dict())


def _well_seed(seed: int, well: str) -> int:
    """Seed of the Monte-Carlo draws of one well, a function of (seed, well) only."""
    return int(np.random.SeedSequence([seed, zlib.crc32(well.encode())]).generate_state(1)[0])


def has_concrete_dropout(model: nn.Module) -> bool:
    """Whether ``model`` holds Concrete Dropout layers (so Monte-Carlo draws differ)."""
    from companion.model import concrete_layers

    return bool(concrete_layers(model))


def well_outputs(model: nn.Module, image: np.ndarray, *, draws: int = 8, seed: int = 0,
                 batch: int | None = None, device: str | torch.device | None = None) -> WellOutputs:
    """Deterministic pass plus ``draws`` Monte-Carlo passes of one image, compacted.

    ``draws`` is ignored (no draws) for a model without Concrete Dropout.
    """
    from companion.sampling import mc_predict, predict

    det = predict(model, image, device=device)
    deterministic = compact_pass(det.embeddings[0], det.logits[0])
    if draws < 1 or not has_concrete_dropout(model):
        return WellOutputs(deterministic, ())
    mc = mc_predict(model, image, n_draws=draws, batch=batch, device=device, seed=seed)
    return WellOutputs(deterministic, tuple(compact_pass(e, lg) for e, lg in zip(mc.embeddings, mc.logits)))


def _pack(outputs: WellOutputs, meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    passes = (outputs.deterministic,) + tuple(outputs.draws)
    return dict(
        meta=np.array(json.dumps(dict(meta), sort_keys=True)),
        classes=np.stack([p.classes for p in passes]),
        embedding=np.concatenate([p.embedding for p in passes]),
        foreground=np.concatenate([p.foreground for p in passes]),
    )


def _unpack(data: Mapping[str, np.ndarray]) -> WellOutputs:
    passes, start = [], 0
    for classes in data["classes"]:
        n = int((classes != 0).sum())
        passes.append(CompactPass(classes, data["embedding"][start:start + n], data["foreground"][start:start + n]))
        start += n
    if start != len(data["embedding"]):
        raise ValueError(f"cache holds {len(data['embedding'])} embeddings, its class maps need {start}")
    return WellOutputs(passes[0], tuple(passes[1:]))


def _read_cache(path: Path, meta: Mapping[str, Any]) -> WellOutputs | None:
    """The cached outputs when ``path`` exists and was written with the same ``meta``."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            if json.loads(str(data["meta"])) != json.loads(json.dumps(dict(meta), sort_keys=True)):
                return None
            return _unpack({key: data[key] for key in ("classes", "embedding", "foreground")})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"cache file {path} is unreadable ({type(err).__name__}): recomputing it",
                      stacklevel=2)
        return None  # recomputed and overwritten


def cached_well_outputs(model: nn.Module, samples: Sequence["Sample"], cache_dir: str | os.PathLike | None, *,
                        draws: int = 8, seed: int = 0, batch: int | None = None, device: str | torch.device | None = None,
                        progress: bool = True) -> dict[str, WellOutputs]:
    """:func:`well_outputs` of every sample, kept in ``cache_dir/<well>.npz``.

    A cache file is reused only if it was written for the same model weights
    (:func:`model_fingerprint`), the same image (its sha256), ``draws``, ``seed`` and cache
    layout; otherwise it is recomputed and rewritten atomically. ``cache_dir=None``: no cache.

    Returns
    -------
    dict
        ``{well: WellOutputs}`` in the order of ``samples``.
    """
    from tqdm.auto import tqdm

    fingerprint = model_fingerprint(model)
    concrete = has_concrete_dropout(model)
    out: dict[str, WellOutputs] = {}
    for sample in tqdm(samples, desc="network outputs", unit="well", disable=not progress):
        image = np.ascontiguousarray(sample.image, dtype=np.float32)
        well_seed = _well_seed(seed, sample.well)
        meta = dict(version=CACHE_VERSION, model=fingerprint, image=hashlib.sha256(image.tobytes()).hexdigest(),
                    shape=list(image.shape), draws=int(draws) if concrete else 0, seed=well_seed)
        path = Path(cache_dir) / f"{sample.well}.npz" if cache_dir is not None else None
        outputs = _read_cache(path, meta) if path is not None else None
        if outputs is None:
            outputs = well_outputs(model, image, draws=draws, seed=well_seed, batch=batch, device=device)
            if path is not None:
                atomic_savez(path, _pack(outputs, meta))
        out[sample.well] = outputs
    return out


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------
def predict_deterministic(outputs: WellOutputs, bandwidth: float, threshold: float,
                          **segment_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Instances of the deterministic pass and their mean foreground probabilities."""
    masks = segment_compact(outputs.deterministic, bandwidth, threshold, **segment_kwargs)
    return masks, compact_scores(outputs.deterministic, masks)


def predict_agglomerated(outputs: WellOutputs, bandwidth: float, threshold: float, *,
                         binarize_at: float = 0.75, **segment_kwargs):
    """Segment every draw, agglomerate, binarise.

    Returns
    -------
    masks : np.ndarray
        bool ``(K', H, W)``, the agglomerated instances with at least one pixel ``>= binarize_at``.
    scores : np.ndarray
        ``(K',)`` their agglomeration scores.
    agglomeration : companion.agglomerate.Agglomeration
        All agglomerated instances (probabilities and scores), before binarising.
    """
    from companion.agglomerate import agglomerate, binarize_with_scores

    if not outputs.draws:
        raise ValueError("these outputs hold no Monte-Carlo draws (a model without Concrete Dropout, or draws=0)")
    agg = agglomerate([segment_compact(d, bandwidth, threshold, **segment_kwargs) for d in outputs.draws])
    return (*binarize_with_scores(agg, binarize_at), agg)


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
        Table 1 rows: ``name`` (``"mc"`` agglomerated draws, ``"deterministic"`` one pass),
        ``inference`` (a description) and the metrics of :data:`TABLE1_KEYS`.
    tuning : companion.tuning.GridSearchResult
        The grid search on the deterministic pass.
    folds : list of tuple of str
        The folds actually used (wells absent from ``samples`` removed).
    per_image : list of dict
        One dict per well and row: ``row``, ``well``, ``fold``, ``n_gt``, ``n_pred``,
        ``n_recalled80``, ``AP50``, ``avAP``, ``avAP_dsb``; rows ``"mc"`` also ``uncertainty``
        (:func:`companion.proofreading.image_uncertainty` of the agglomerated probabilities).
    pavpu : companion.uncertainty.PAvPU or None
        Of the agglomerated predictions (None without draws).
    proofreading : list of dict or None
        Rows of :func:`companion.proofreading.simulate_proofreading` (None without draws).
    predictions : dict
        ``{row name: [bool (K, H, W) per well]}`` in the order of ``wells``.
    wells : list of str
        The evaluated wells, fold by fold (the order of all per-well lists).
    settings : dict
    """

    rows: list
    tuning: "GridSearchResult"
    folds: list
    per_image: list
    pavpu: "PAvPU | None"
    proofreading: "list | None"
    predictions: dict
    wells: list
    settings: dict


def _check_folds(samples: Sequence["Sample"], folds: Sequence[Sequence[str]] | None) -> list[tuple[str, ...]]:
    wells = [s.well for s in samples]
    if len(set(wells)) != len(wells):
        raise ValueError(f"samples hold duplicate wells: {sorted(w for w in set(wells) if wells.count(w) > 1)}")
    if folds is None:
        from companion.data import TEST_FOLDS as folds
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
        raise ValueError(f"cross-validation needs >= 2 folds with at least one well each; folds {empty} "
                         f"hold none of the samples' wells")
    return used


def _per_image_rows(name: str, wells: Sequence[str], fold_of: Mapping[str, int], metrics: dict) -> list[dict]:
    keys = ("n_gt", "n_pred", "n_recalled80", "AP50", "avAP", "avAP_dsb")
    return [dict(row=name, well=well, fold=fold_of[well], **{k: image[k] for k in keys})
            for well, image in zip(wells, metrics["per_image"])]


def evaluate_model(
    model: nn.Module,
    samples: Sequence["Sample"],
    *,
    folds: Sequence[Sequence[str]] | None = None,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    draws: int = 8,
    binarize_at: float = 0.75,
    seed: int = 0,
    batch: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    pavpu_thresholds: Sequence[float] = PAVPU_THRESHOLDS,
    n_corrections: Sequence[int] = N_CORRECTIONS,
    max_points: int | None = None,
    clustering: str = "global",
    min_size: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate a model on samples as the paper does (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        A :class:`companion.model.UNet` (on ``device``), with or without Concrete Dropout.
    samples : sequence of Sample
        The evaluated wells with their ground truth; a well without any instance raises
        ``ValueError`` naming it (before any network pass).
    folds : sequence of sequences of well ids, optional
        Cross-validation folds; default :data:`companion.data.TEST_FOLDS`. Wells absent from
        ``samples`` (e.g. skipped incomplete wells) are dropped; every sample must be in a fold.
    bandwidths, thresholds : sequences of float
        The grid of mean-shift bandwidths and assignment thresholds.
    draws : int
        Monte-Carlo draws per well for a Concrete Dropout model (0: deterministic pass only).
    binarize_at : float
        Agglomerated probabilities ``>= binarize_at`` form the predicted masks.
    seed : int
        Seeds the dropout masks of the draws (per well, see :func:`cached_well_outputs`).
    batch : int, optional
        Draws per forward pass; default 8 on a GPU, 1 on the CPU (see
        :func:`companion.sampling.mc_predict`).
    cache_dir : path-like, optional
        Where the compact network outputs are cached (``None``: not cached).
    device : str or torch.device, optional
        Where the network runs (the model must already be there); default the model's device.
    pavpu_thresholds, n_corrections : sequences
        Entropy thresholds of the PAvPU curves; numbers of simulated corrections.
    max_points : int, optional
        Mean-shift clusters a random subset of at most this many foreground pixels per pass
        (all pixels are still assigned; see :func:`companion.postprocess.segment`). Default:
        all, exact but slow on a CPU when the embedding clusters are wide.
    clustering : {"global", "components"}
        Mean-shift over the whole image (the paper) or inside each connected foreground
        component (see :func:`companion.postprocess.segment`).
    min_size : int, optional
        Smallest instance kept (default :data:`companion.postprocess.DEFAULT_MIN_SIZE`).
    progress : bool
        tqdm bars.

    Returns
    -------
    EvaluationResult
    """
    from tqdm.auto import tqdm

    from companion.metrics import evaluate
    from companion.proofreading import image_uncertainty, simulate_proofreading
    from companion.tuning import grid_search
    from companion.uncertainty import pavpu

    from companion.postprocess import DEFAULT_MIN_SIZE

    used_folds = _check_folds(samples, folds)
    no_truth = [s.well for s in samples if len(s.instances) == 0]
    if no_truth:  # COCO would score them -1 and the run would end "successfully"
        raise ValueError(f"cannot evaluate well(s) without ground truth (no worm mask): "
                         f"{', '.join(no_truth)}; predict them instead, or leave them out")
    min_size = DEFAULT_MIN_SIZE if min_size is None else int(min_size)
    segment_options = dict(max_points=max_points, clustering=clustering, min_size=min_size)
    if draws < 0:
        raise ValueError(f"draws must be >= 0, got {draws}")
    # fold by fold, the order of grid_search's pooled metrics (COCO AP breaks score ties by order)
    wells = [w for fold in used_folds for w in fold]
    by_well = {s.well: s for s in samples}
    samples = [by_well[w] for w in wells]
    gts = {s.well: np.asarray(s.instances, bool) for s in samples}
    fold_of = {w: f for f, fold in enumerate(used_folds) for w in fold}
    outputs = cached_well_outputs(model, samples, cache_dir, draws=draws, seed=seed, batch=batch,
                                  device=device, progress=progress)

    def deterministic(well: str, bandwidth: float, threshold: float):
        return predict_deterministic(outputs[well], float(bandwidth), float(threshold), **segment_options)

    tuning = grid_search(deterministic, gts, bandwidths, thresholds, used_folds, metric="avAP", progress=progress)
    chosen = {c.applied_to: (c.bandwidth, c.threshold) for c in tuning.choices}
    det = [tuning.predictions[w] for w in wells]  # each well segmented at its fold's chosen point
    gt_list = [gts[w] for w in wells]
    det_metrics = evaluate(gt_list, [m for m, _ in det], [s for _, s in det])
    rows = [dict(name="deterministic", inference="one deterministic pass (dropout off)",
                 **{k: det_metrics[k] for k in TABLE1_KEYS})]
    per_image = _per_image_rows("deterministic", wells, fold_of, det_metrics)
    predictions = {"deterministic": [m for m, _ in det]}
    pavpu_result = proofreading = None

    n_draws = len(outputs[wells[0]].draws)
    if n_draws:
        mc_masks, mc_scores, counts, agg_scores = [], [], [], []
        for well in tqdm(wells, desc="MC draws: segment + agglomerate", unit="well", disable=not progress):
            masks, scores, agg = predict_agglomerated(outputs[well], *chosen[fold_of[well]], binarize_at=binarize_at,
                                                      **segment_options)
            mc_masks.append(masks), mc_scores.append(scores)
            counts.append(_to_counts(agg.probs, n_draws)), agg_scores.append(agg.scores)
        mc_metrics = evaluate(gt_list, mc_masks, mc_scores)
        rows.insert(0, dict(name="mc", inference=f"{n_draws} Monte-Carlo draws, agglomerated, p >= {binarize_at}",
                            **{k: mc_metrics[k] for k in TABLE1_KEYS}))
        mc_rows = _per_image_rows("mc", wells, fold_of, mc_metrics)
        for row, count in zip(mc_rows, counts):
            row["uncertainty"] = image_uncertainty(count / np.float64(n_draws))
        per_image = mc_rows + per_image
        predictions = {"mc": mc_masks, **predictions}
        probs = _ScaledCounts(counts, n_draws)
        pavpu_result = pavpu(gt_list, probs, pavpu_thresholds, binarize_at=binarize_at)
        proofreading = simulate_proofreading(gt_list, probs, n_corrections, binarize_at=binarize_at,
                                             scores=agg_scores).rows
    settings = dict(bandwidths=[float(b) for b in bandwidths], thresholds=[float(t) for t in thresholds],
                    max_points=None if max_points is None else int(max_points),
                    clustering=clustering, min_size=min_size,
                    draws=n_draws, binarize_at=float(binarize_at), seed=int(seed), tuning_metric="avAP",
                    tuned_on="deterministic pass", pavpu_thresholds=[round(float(t), 9) for t in pavpu_thresholds],
                    n_corrections=[int(n) for n in n_corrections])
    return EvaluationResult(rows, tuning, used_folds, per_image, pavpu_result, proofreading, predictions,
                            wells, settings)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def _csv_bytes(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _json_safe(value: Any) -> Any:
    """Plain JSON types; NaN and inf become None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _pavpu_rows(result: "PAvPU") -> list[dict]:
    return [dict(threshold=round(float(t), 9), p_accurate_given_certain=float(a), p_uncertain_given_inaccurate=float(u),
                 pavpu=float(p), n_ac=int(ac), n_au=int(au), n_ic=int(ic), n_iu=int(iu))
            for t, a, u, p, ac, au, ic, iu in zip(*result)]


def plot_pavpu(result: "PAvPU"):
    """Fig. 2's layout: p(accurate | certain), p(uncertain | inaccurate) and PAvPU over the threshold."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3), sharex=True)
    curves = (("p(accurate | certain)", result.p_accurate_given_certain),
              ("p(uncertain | inaccurate)", result.p_uncertain_given_inaccurate),
              ("PAvPU", result.pavpu))
    for ax, (title, values) in zip(axes, curves):
        ax.plot(result.thresholds, values, marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("uncertainty threshold (nats)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _outlines(ax, instances: np.ndarray) -> None:
    """Draw every instance's outline in its own colour, thick enough to survive downscaling."""
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    colors = np.array([[0.90, 0.10, 0.10], [0.10, 0.75, 0.10], [0.15, 0.45, 1.00], [1.00, 0.80, 0.00],
                       [0.85, 0.20, 0.85], [0.00, 0.85, 0.85], [1.00, 0.50, 0.00], [0.55, 0.35, 1.00]])
    width = max(0, min(instances.shape[1:]) // 256)  # extra pixels of line width on large images
    overlay = np.zeros(instances.shape[1:] + (4,), np.float32)
    for k, mask in enumerate(instances):
        edge = find_boundaries(mask, mode="inner")
        if width:
            edge = ndimage.binary_dilation(edge, iterations=width) & mask
        overlay[edge, :3] = colors[k % len(colors)]
        overlay[edge, 3] = 1.0
    ax.imshow(overlay, interpolation="nearest")


def plot_gallery(samples: Sequence["Sample"], predictions: Sequence[np.ndarray], titles: Sequence[str]):
    """Rows of (brightfield image, ground-truth outlines, predicted outlines), one per sample."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(samples), 3, figsize=(12, 3.2 * len(samples)), squeeze=False)
    for row, (sample, pred, title) in zip(axes, zip(samples, predictions, titles)):
        brightfield = sample.image[1]
        low, high = np.percentile(brightfield, [1, 99.5])
        for ax, (name, instances) in zip(row, (("brightfield (w2)", None), ("ground truth", sample.instances),
                                               ("prediction", pred))):
            ax.imshow(brightfield, cmap="gray", vmin=low, vmax=max(high, low + 1e-6))
            if instances is not None:
                _outlines(ax, np.asarray(instances, bool))
            ax.set_title(f"{title}: {name}" if instances is None else name, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    return fig


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_report(result: EvaluationResult, samples: Sequence["Sample"], out_dir: str | os.PathLike, *,
                 info: Mapping[str, Any] | None = None, n_gallery: int = 3) -> list[Path]:
    """Write the evaluation's files into ``out_dir`` (each atomically).

    ``results.json`` (everything, plus ``info``: model, skipped wells, wall time, ...),
    ``table1.csv``, ``per_image.csv``, ``tuning.csv``, ``pavpu.csv`` and ``proofreading.csv`` (with
    draws), ``pavpu.png`` (with draws) and ``gallery.png`` (the ``n_gallery`` wells with the lowest
    avAP of the first row).

    Returns
    -------
    list of Path
        The files written.
    """
    import companion

    out = Path(out_dir)
    written: list[Path] = []

    def put(name: str, data: bytes) -> None:
        atomic_write_bytes(out / name, data)
        written.append(out / name)

    tuning = result.tuning
    tuning_rows = [dict(fold=f, bandwidth=float(b), threshold=float(t), avAP=float(tuning.scores[f, i, j]))
                   for f in range(len(tuning.scores)) for i, b in enumerate(tuning.bandwidths)
                   for j, t in enumerate(tuning.thresholds)]
    choices = [dict(tuned_on=c.tuned_on, applied_to=c.applied_to, bandwidth=c.bandwidth, threshold=c.threshold,
                    tuning_score=c.tuning_score, **{k: c.test_metrics[k] for k in TABLE1_KEYS})
               for c in tuning.choices]
    main_row = result.rows[0]["name"]
    ranked = sorted((p for p in result.per_image if p["row"] == main_row), key=lambda p: (p["avAP"], p["well"]))
    worst = [p["well"] for p in ranked[:n_gallery]]
    document = dict(
        **dict(info or {}),
        package_version=companion.__version__,
        torch_version=str(torch.__version__),
        settings=result.settings,
        wells=result.wells,
        folds=[list(f) for f in result.folds],
        rows=result.rows,
        tuning=dict(metric=tuning.metric, bandwidths=tuning.bandwidths, thresholds=tuning.thresholds,
                    scores=tuning.scores, choices=choices, pooled_deterministic={k: tuning.pooled[k] for k in TABLE1_KEYS}),
        pavpu=_pavpu_rows(result.pavpu) if result.pavpu is not None else None,
        proofreading=result.proofreading,
        per_image=result.per_image,
        gallery_wells=worst,
    )
    put("results.json", (json.dumps(_json_safe(document), indent=1, allow_nan=False) + "\n").encode())
    put("table1.csv", _csv_bytes(result.rows, ("name", *TABLE1_KEYS, "inference")))
    put("per_image.csv", _csv_bytes(result.per_image, ("row", "well", "fold", "n_gt", "n_pred", "n_recalled80",
                                                       "AP50", "avAP", "avAP_dsb", "uncertainty")))
    put("tuning.csv", _csv_bytes(tuning_rows, ("fold", "bandwidth", "threshold", "avAP")))
    if result.pavpu is not None:
        rows = _pavpu_rows(result.pavpu)
        put("pavpu.csv", _csv_bytes(rows, list(rows[0])))
        fig = plot_pavpu(result.pavpu)
        _save_figure(fig, out / "pavpu.png")
        written.append(out / "pavpu.png")
    if result.proofreading is not None:
        put("proofreading.csv", _csv_bytes(result.proofreading, list(result.proofreading[0])))
    if worst:
        by_well = {s.well: s for s in samples}
        index = {w: i for i, w in enumerate(result.wells)}
        scores = {p["well"]: p["avAP"] for p in ranked}
        fig = plot_gallery([by_well[w] for w in worst], [result.predictions[main_row][index[w]] for w in worst],
                           [f"{w} (avAP {scores[w]:.2f})" for w in worst])
        _save_figure(fig, out / "gallery.png")
        written.append(out / "gallery.png")
    return written
