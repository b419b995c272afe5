"""Calibrating the foreground decision of an under-trained network (not in the paper).

The 3-class head is trained with an unweighted cross-entropy on images that are ~96 %
background. Early in training (on a CPU budget) it therefore calls too few worm pixels
foreground: the argmax rule misses most of every worm, and post-processing can only cluster
what the foreground mask contains. A single number fixes most of it: lowering the background
logit by a shift ``s`` turns the rule "argmax of (l_bg, l_fg, l_ov)" into "argmax of
(l_bg - s, l_fg, l_ov)", i.e. a lower threshold on P(worm). :func:`choose_background_shift`
picks ``s`` on training wells (never the test wells) by the pixel F1 score of the foreground
mask, and :func:`shift_background_logit` folds it into the bias of the class head, so every
later step (``predict``, ``segment``, the evaluation) sees a calibrated network without any
new parameter. A fully trained network should need ``s`` near 0.

Examples
--------
>>> import torch
>>> from companion.model.unet import UNet
>>> net = UNet(base_filters=2, depth=2)
>>> before = net.class_head.layer.bias.detach().clone()
>>> shift_background_logit(net, 1.5)
>>> (before - net.class_head.layer.bias.detach()).tolist()
[1.5, 0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from companion.inference.sampling import mc_predict, predict

__all__ = [
    "DEFAULT_SHIFTS",
    "ShiftChoice",
    "foreground_f1",
    "choose_background_shift",
    "shift_background_logit",
]

#: Candidate shifts of the background logit (0 = the plain argmax rule).
DEFAULT_SHIFTS: tuple[float, ...] = tuple(np.round(np.arange(0.0, 4.01, 0.25), 2))


class ShiftChoice(NamedTuple):
    """``shift``: the chosen shift; ``shifts`` and ``f1``: every candidate and its pooled pixel F1;
    ``wells``: where it was chosen."""

    shift: float
    shifts: np.ndarray
    f1: np.ndarray
    wells: list


def _foreground(logits: np.ndarray, shift: float) -> np.ndarray:
    shifted = np.array(logits, dtype=np.float32, copy=True)
    shifted[0] -= shift
    return np.argmax(shifted, axis=0) != 0


def foreground_f1(logits: np.ndarray, truth: np.ndarray, shift: float = 0.0) -> tuple[int, int, int]:
    """True positive, false positive and false negative pixel counts of the foreground mask.

    Parameters
    ----------
    logits : (3, H, W) array
        Class logits (background, foreground, overlap).
    truth : (H, W) bool array
        Pixels covered by at least one true worm.
    shift : float
        Subtracted from the background logit before the argmax.

    Examples
    --------
    >>> logits = np.zeros((3, 1, 3), np.float32); logits[0] = [2.0, 0.5, -1.0]
    >>> foreground_f1(logits, np.array([[True, True, False]]), shift=1.0)
    (1, 1, 1)
    """
    logits, truth = np.asarray(logits), np.asarray(truth, bool)
    if logits.ndim != 3 or logits.shape[0] != 3 or logits.shape[1:] != truth.shape:
        raise ValueError(
            f"expected logits (3, H, W) and truth (H, W) of one size, got {logits.shape} and {truth.shape}"
        )
    mask = _foreground(logits, shift)
    return int((mask & truth).sum()), int((mask & ~truth).sum()), int((~mask & truth).sum())


def _pass_logits(
    model: nn.Module, image: np.ndarray, draws: int, seed: int, device: str | torch.device | None
) -> np.ndarray:
    """``(P, 3, H, W)`` logits: the deterministic pass (``draws == 0``) or ``draws`` MC draws."""
    if draws == 0:
        return np.asarray(predict(model, image, device=device).logits)
    return np.asarray(mc_predict(model, image, n_draws=draws, device=device, seed=seed).logits)


def _vote_counts(logits: np.ndarray, truth: np.ndarray, shifts: np.ndarray, agreement: float) -> np.ndarray:
    """``(len(shifts), 3)`` tp/fp/fn of the pixels foreground in ``>= agreement`` of the passes."""
    counts = np.zeros((len(shifts), 3))
    for i, shift in enumerate(shifts):
        votes = np.mean([_foreground(one, shift) for one in logits], axis=0)
        mask = votes >= agreement if len(logits) > 1 else votes > 0
        counts[i] = (mask & truth).sum(), (mask & ~truth).sum(), (~mask & truth).sum()
    return counts


def _pooled_f1(counts: np.ndarray) -> np.ndarray:
    """Pixel F1 of each row of ``(n, 3)`` true positive, false positive, false negative counts."""
    tp, fp, fn = np.asarray(counts, np.float64).T
    return np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)


def choose_background_shift(
    model: nn.Module,
    samples: Sequence,
    shifts: Sequence[float] = DEFAULT_SHIFTS,
    *,
    draws: int = 0,
    agreement: float = 0.75,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> ShiftChoice:
    """The shift of the background logit with the best pooled foreground F1 on ``samples``.

    With ``draws == 0`` the foreground is that of one deterministic pass per sample
    (:func:`companion.inference.sampling.predict`). With ``draws > 0`` (a Concrete Dropout model whose
    Monte-Carlo draws are agglomerated) it is the set of pixels that at least a fraction
    ``agreement`` of ``draws`` Monte-Carlo draws (:func:`companion.inference.sampling.mc_predict`, seeded
    with ``seed``) call foreground: the shift is then chosen for the draws it will be applied
    to, and for the agreement that binarising the agglomeration at ``agreement`` asks of them.
    Ties go to the smaller shift. Use training wells: choosing on the test wells would leak them.
    """
    from tqdm.auto import tqdm

    shifts = np.asarray(shifts, dtype=np.float64)
    if shifts.ndim != 1 or not len(shifts):
        raise ValueError(f"shifts must be a non-empty 1-d sequence, got shape {shifts.shape}")
    if not len(samples):
        raise ValueError("choose_background_shift needs at least one sample")
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 0:
        raise ValueError(f"draws must be an integer >= 0, got {draws!r}")
    if not 0 < agreement <= 1:
        raise ValueError(f"agreement must lie in (0, 1], got {agreement!r}")
    counts = np.zeros((len(shifts), 3))
    for sample in tqdm(samples, desc="calibrating the foreground", unit="well", disable=not progress):
        logits = _pass_logits(model, sample.image, draws, seed, device)
        truth = np.asarray(sample.instances, bool).any(axis=0)
        counts += _vote_counts(logits, truth, shifts, agreement)
    f1 = _pooled_f1(counts)
    best = int(np.argmax(f1))  # the first maximum: the smallest shift among ties
    return ShiftChoice(float(shifts[best]), shifts, f1, [s.well for s in samples])


def shift_background_logit(model: nn.Module, shift: float) -> None:
    """Subtract ``shift`` from the background bias of ``model.class_head`` (in place)."""
    layer = getattr(getattr(model, "class_head", None), "layer", None)
    if layer is None or getattr(layer, "bias", None) is None or layer.bias.shape[0] != 3:
        raise ValueError("model has no 3-class head with a bias (model.class_head.layer.bias)")
    with torch.no_grad():
        layer.bias[0] -= float(shift)
