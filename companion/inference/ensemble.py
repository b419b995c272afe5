"""Beyond the paper: ensembles of Monte-Carlo draws and uncertainty-ranked annotation.

Two ideas the paper leaves as future work, made computable (chapter 11 of the book):

* **Ensembles.** Draws of several models (here: snapshots of one training run) are pooled and
  agglomerated exactly as the draws of one model. :func:`pool_draws` pools the stored
  outputs of the members (:class:`companion.inference.outputs.ImageOutputs`), so
  :meth:`companion.inference.segmenter.Segmenter.segment` evaluates the ensemble unchanged;
  :func:`ensemble_outputs` runs the members on one image.
* **Active learning.** Which image should a human annotate first? Ranking images by their
  uncertainty (:func:`companion.inference.agglomerate.image_uncertainty`) is useful if the most
  uncertain images are the worst segmented. :func:`annotation_order` ranks images and
  :func:`errors_caught` measures, for an order, which fraction of the total error
  ``sum(1 - AP)`` the first ``k`` annotated images hold (the oracle ranks by the true AP).

Examples
--------
>>> ap = np.array([0.9, 0.2, 0.6])
>>> uncertainty = np.array([0.1, 0.5, 0.3])
>>> order = annotation_order(uncertainty)  # most uncertain first
>>> order.tolist(), errors_caught(ap, order).round(3).tolist()
([1, 2, 0], [0.0, 0.615, 0.923, 1.0])
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .outputs import ImageOutputs, _well_seed, image_outputs

__all__ = ["member_seed", "pool_draws", "ensemble_outputs", "annotation_order", "errors_caught"]


def member_seed(seed: int, member: int, well: str = "") -> int:
    """Seed of the dropout masks of ensemble member ``member`` on ``well``.

    Member 0 on a well gets the seed :func:`companion.evaluation.evaluate.evaluate_model` uses for that
    well (so its draws are the committed evaluation's when the model and ``seed`` are the same);
    the other members get different seeds, a function of ``(seed, member, well)`` only.

    Examples
    --------
    >>> member_seed(0, 0, "C03") == member_seed(0, 0, "C03"), member_seed(0, 0, "C03") != member_seed(0, 1, "C03")
    (True, True)
    """
    if member < 0:
        raise ValueError(f"member must be >= 0, got {member}")
    if member == 0:
        return _well_seed(seed, well)
    return int(np.random.SeedSequence([seed, zlib.crc32(well.encode()), member]).generate_state(1)[0])


def _draw_counts(draws_per_member: int | Sequence[int], n_members: int, noun: str) -> list[int]:
    """One draw count per member, from one number for all or one per member."""
    counts = (
        [int(draws_per_member)] * n_members
        if np.ndim(draws_per_member) == 0
        else [int(n) for n in draws_per_member]
    )
    if len(counts) != n_members:
        raise ValueError(f"{n_members} {noun} but {len(counts)} draw counts")
    return counts


def pool_draws(members: Sequence[ImageOutputs], draws_per_member: int | Sequence[int]) -> ImageOutputs:
    """Pool the first ``draws_per_member`` Monte-Carlo draws of each member into one set of draws.

    Parameters
    ----------
    members : sequence of ImageOutputs
        The outputs of each ensemble member on the same image (e.g. from :func:`image_outputs`).
    draws_per_member : int or sequence of int
        How many draws to take from each member (one number for all, or one per member).

    Returns
    -------
    ImageOutputs
        The first member's deterministic pass and the pooled draws, member by member; feed it to
        :meth:`companion.inference.segmenter.Segmenter.segment` like the outputs of one model.

    Raises
    ------
    ValueError
        No members, a member with fewer draws than asked for, images of different sizes, or
        fewer than one draw in total.

    Examples
    --------
    >>> from companion.inference.outputs import compact_pass
    >>> logits = np.zeros((3, 3, 3), np.float32); logits[1] = 5.0  # every pixel foreground
    >>> def member(n, value):
    ...     one = compact_pass(np.full((2, 3, 3), value, np.float32), logits)
    ...     return ImageOutputs(one, (one,) * n)
    >>> pooled = pool_draws([member(8, 0.0), member(4, 1.0)], 2)
    >>> len(pooled.draws), [float(d.embedding[0, 0]) for d in pooled.draws]
    (4, [0.0, 0.0, 1.0, 1.0])
    """
    members = list(members)
    if not members:
        raise ValueError("pool_draws needs at least one member")
    counts = _draw_counts(draws_per_member, len(members), "members")
    shape = members[0].deterministic.classes.shape
    pooled = []
    for i, (outputs, n) in enumerate(zip(members, counts)):
        if n < 0 or n > len(outputs.draws):
            raise ValueError(f"member {i} holds {len(outputs.draws)} draws, asked for {n}")
        if outputs.deterministic.classes.shape != shape:
            raise ValueError(
                f"member {i} has image shape {outputs.deterministic.classes.shape}, member 0 {shape}"
            )
        pooled.extend(outputs.draws[:n])
    if not pooled:
        raise ValueError("the pooled ensemble holds no draw")
    return ImageOutputs(members[0].deterministic, tuple(pooled))


def ensemble_outputs(
    models: Sequence[nn.Module],
    image: np.ndarray,
    draws_per_member: int | Sequence[int],
    *,
    seed: int = 0,
    well: str = "",
    device: str | torch.device | None = None,
) -> list[ImageOutputs]:
    """Outputs of every member on one image (its deterministic pass and its draws).

    Member ``i`` is sampled with :func:`member_seed` ``(seed, i, well)``. Pool them with
    :func:`pool_draws`; keeping the members separate lets a chapter compare a single member
    with more draws and the pooled ensemble on the same draws.

    Returns
    -------
    list of ImageOutputs
        One per member, in the order of ``models``.
    """
    counts = _draw_counts(draws_per_member, len(models), "models")
    return [
        image_outputs(model, image, draws=n, seed=member_seed(seed, i, well), device=device)
        for i, (model, n) in enumerate(zip(models, counts))
    ]


def annotation_order(values: Sequence[float], *, descending: bool = True) -> np.ndarray:
    """Indices of the images in the order they are annotated: by ``values``, ties by index.

    ``descending=True`` (default) ranks the largest value first (uncertainty: most uncertain
    first); ``descending=False`` the smallest first (the oracle ranks by AP, worst first).

    Examples
    --------
    >>> annotation_order([0.2, 0.5, 0.5, 0.1]).tolist(), annotation_order([0.2, 0.5, 0.1], descending=False).tolist()
    ([1, 2, 0, 3], [2, 0, 1])
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(values).any():
        raise ValueError("values contain NaN; drop those images before ranking")
    return np.argsort(-values if descending else values, kind="stable")


def errors_caught(ap: Sequence[float], order: Sequence[int]) -> np.ndarray:
    """Fraction of the total error ``sum(1 - ap)`` in the first ``k`` images of ``order``, k = 0 .. n.

    Parameters
    ----------
    ap : sequence of float
        Per-image average precision in ``[0, 1]`` (e.g. avAP).
    order : sequence of int
        A permutation of ``range(len(ap))``.

    Returns
    -------
    np.ndarray
        ``(n + 1,)``, non-decreasing from 0 to 1 (all zeros when every image is perfect). The
        oracle order (``annotation_order(ap, descending=False)``) gives the highest curve; a
        random order gives ``k / n`` on average.

    Examples
    --------
    >>> errors_caught([1.0, 0.5, 0.0], [2, 1, 0]).tolist()
    [0.0, 0.6666666666666666, 1.0, 1.0]
    """
    ap = np.asarray(ap, dtype=np.float64).reshape(-1)
    order = np.asarray(order, dtype=int).reshape(-1)
    if sorted(order.tolist()) != list(range(len(ap))):
        raise ValueError(f"order must be a permutation of range({len(ap)}), got {order.tolist()}")
    if np.any((ap < 0) | (ap > 1)) or np.isnan(ap).any():
        raise ValueError("ap must lie in [0, 1] (an image without ground truth has AP -1: drop it)")
    errors = 1.0 - ap[order]
    total = errors.sum()
    cumulative = np.concatenate([[0.0], np.cumsum(errors)])
    return cumulative / total if total > 0 else np.zeros(len(ap) + 1)
