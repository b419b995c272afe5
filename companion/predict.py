"""One path from a trained model and an image to instance masks: :func:`predict_instances`.

The evaluation (:mod:`companion.evaluate`), the ``python -m companion predict`` command and the
chapters all go through the same two steps: the network outputs of one image
(:func:`companion.outputs.well_outputs`: a deterministic pass, plus Monte-Carlo draws for a
Concrete Dropout model) and their post-processing (:func:`predict_deterministic` or
:func:`predict_agglomerated`, on the compact passes through :func:`segment_compact`). So a prediction made here with a row's
settings reproduces that row's per-image line of an evaluation.

Examples
--------
>>> import torch
>>> from companion.model import UNet
>>> torch.manual_seed(0) and None
>>> net = UNet(base_filters=2, depth=3, embedding_dim=4, dropout="concrete")
>>> result = predict_instances(net, np.zeros((2, 32, 40), np.float32), draws=2, bandwidth=1.0,
...                            threshold=1.0)
>>> result.masks.dtype, result.masks.shape[1:], result.probabilities.shape[1:]
(dtype('bool'), (32, 40), (32, 40))
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from companion.agglomerate import agglomerate, binarize_with_scores, binarized_indices
from companion.outputs import (
    CompactPass,
    WellOutputs,
    compact_scores,
    embedding_map,
    has_concrete_dropout,
    well_outputs,
)
from companion.postprocess import DEFAULT_MIN_SIZE, segment_classes

__all__ = [
    "Instances",
    "predict_instances",
    "segment_compact",
    "predict_deterministic",
    "predict_agglomerated",
]


def segment_compact(compact: CompactPass, bandwidth: float, threshold: float, **segment_kwargs) -> np.ndarray:
    """:func:`companion.postprocess.segment_classes` on a :class:`CompactPass` (bool ``(K, H, W)``).

    Equal to ``segment`` on the full outputs with the embedding rounded to float16.
    """
    masks = segment_classes(embedding_map(compact), compact.classes, bandwidth, threshold, **segment_kwargs)
    return np.asarray(masks, bool)


def predict_deterministic(
    outputs: WellOutputs, bandwidth: float, threshold: float, **segment_kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Instances of the deterministic pass and their mean foreground probabilities."""
    masks = segment_compact(outputs.deterministic, bandwidth, threshold, **segment_kwargs)
    return masks, compact_scores(outputs.deterministic, masks)


def predict_agglomerated(
    outputs: WellOutputs, bandwidth: float, threshold: float, *, binarize_at: float = 0.75, **segment_kwargs
):
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
    if not outputs.draws:
        raise ValueError(
            "these outputs hold no Monte-Carlo draws (a model without Concrete Dropout, or draws=0)"
        )
    agg = agglomerate([segment_compact(d, bandwidth, threshold, **segment_kwargs) for d in outputs.draws])
    return (*binarize_with_scores(agg, binarize_at), agg)


class Instances(NamedTuple):
    """The instances predicted for one image.

    Attributes
    ----------
    masks : np.ndarray
        bool ``(K, H, W)``; masks may overlap.
    scores : np.ndarray
        ``(K,)`` confidence of each mask (mean foreground probability for one pass, the
        agglomeration score for Monte-Carlo draws); the order of the COCO ranking.
    probabilities : np.ndarray or None
        float16 ``(K, H, W)`` per-instance pixel probabilities of the agglomerated draws
        (``None`` for a deterministic prediction).
    """

    masks: np.ndarray
    scores: np.ndarray
    probabilities: np.ndarray | None


def predict_instances(
    model: nn.Module,
    image: np.ndarray,
    *,
    bandwidth: float,
    threshold: float,
    draws: int = 0,
    binarize_at: float = 0.75,
    clustering: str = "global",
    min_size: int = DEFAULT_MIN_SIZE,
    max_points: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    flips: bool = False,
) -> Instances:
    """Instance masks of one ``(2, H, W)`` image.

    Parameters
    ----------
    model : nn.Module
        A :class:`companion.model.UNet`.
    image : np.ndarray
        ``(2, H, W)`` float image scaled as :func:`companion.data.normalize` does.
    bandwidth, threshold : float
        Mean-shift bandwidth and assignment threshold.
    draws : int
        0: one deterministic pass. ``n > 0``: ``n`` Monte-Carlo draws of a Concrete Dropout
        model, each segmented, agglomerated and binarised at ``binarize_at``; for a model
        without dropout (``flips=True`` only) the first ``min(n, 4)`` flipped passes take the
        draws' place (:func:`companion.outputs.n_draws`; not in the paper).
    clustering, min_size, max_points
        See :func:`companion.postprocess.segment`.
    seed : int
        Seed of the dropout masks (and of the ``max_points`` subset).
    device : str or torch.device, optional
        Where the network runs (default: the model's device).
    flips : bool
        Test-time augmentation with the four flips (not in the paper; see
        :mod:`companion.sampling`), as an evaluation with ``flips`` did.

    Raises
    ------
    ValueError
        ``image`` is not ``(2, H, W)`` with ``H, W >= 1`` (the message gives its shape), holds
        NaN or infinite values, or ``draws`` does not fit the model.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] != 2 or min(image.shape[1:]) < 1:
        raise ValueError(
            f"image has shape {image.shape}, but the model expects a (2, H, W) array "
            f"with H, W >= 1: 2 channels, w1 fluorescence then w2 brightfield "
            f"(companion.userdata.read_image builds one from your files)"
        )
    if not np.isfinite(image).all():
        raise ValueError("image holds NaN or infinite values")
    if image.max() > 1.0 or image.min() < 0.0:  # e.g. raw camera counts: the network sees noise
        warnings.warn(
            f"image values span [{image.min():.4g}, {image.max():.4g}], the models expect [0, 1]: "
            f"scale them first (companion.userdata.read_image does, e.g. BBBC010 counts / 4095)",
            stacklevel=2,
        )
    if not isinstance(draws, (int, np.integer)) or isinstance(draws, bool) or draws < 0:
        raise ValueError(f"draws must be an integer >= 0, got {draws!r}")
    if draws and not flips and not has_concrete_dropout(model):
        raise ValueError(
            f"draws={draws} needs a model with Concrete Dropout, or flips=True (the flipped "
            f"passes as draws); this one has no dropout (use draws=0 or flips=True)"
        )
    options = dict(clustering=clustering, min_size=min_size, max_points=max_points)
    outputs = well_outputs(model, image, draws=draws, seed=seed, device=device, flips=flips)
    if not draws:
        masks, scores = predict_deterministic(outputs, bandwidth, threshold, **options)
        return Instances(np.asarray(masks, bool), np.asarray(scores, np.float64), None)
    masks, scores, agglomeration = predict_agglomerated(
        outputs, bandwidth, threshold, binarize_at=binarize_at, **options
    )
    keep = binarized_indices(agglomeration.probs, binarize_at)  # the masks' order
    probabilities = np.asarray(agglomeration.probs, np.float32)[keep].astype(np.float16)
    return Instances(np.asarray(masks, bool), np.asarray(scores, np.float64), probabilities)
