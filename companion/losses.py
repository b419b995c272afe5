"""Training losses: the discriminative embedding loss, the 3-class loss and the full objective.

The discriminative loss (De Brabandere et al. 2017, in the form of Rumberger et al. 2020)
pulls the embeddings of each instance's pixels to their mean :math:`\\mu_c` and pushes the
means of different instances apart. For ``C`` instances with pixel sets :math:`S_c`:

.. math::
    L_{var} = \\frac{1}{C} \\sum_c \\frac{1}{|S_c|} \\sum_{i \\in S_c} \\lVert \\mu_c - x_i \\rVert^2
    \\qquad (1)

    L_{dist} = \\frac{1}{C (C - 1)} \\sum_{A \\ne B} \\big[ 2 \\delta_d - \\lVert \\mu_A - \\mu_B \\rVert^2 \\big]_+^2
    \\qquad (2)

    L_{reg} = \\frac{1}{C} \\sum_c \\lVert \\mu_c \\rVert^2 \\qquad (3)

The pull term has no hinge (every pixel is pulled all the way to its centre), and
``hinge="euclidean"`` gives De Brabandere's push term
:math:`[2 \\delta_d - \\lVert \\mu_A - \\mu_B \\rVert]_+^2` instead of the squared-distance
hinge of eq. (2). Worms overlap: a pixel covered by several worms belongs to every one of
them, so it is pulled to each of their centres.

Examples
--------
>>> import torch
>>> instances = torch.zeros(2, 4, 4, dtype=torch.bool)
>>> instances[0, :, :2] = True
>>> instances[1, :, 2:] = True
>>> embedding = torch.zeros(2, 4, 4)
>>> embedding[0, :, 2:] = 3.0  # instance 1 sits at (3, 0), instance 0 at the origin
>>> terms = discriminative_loss(embedding, instances, delta_d=4.0)
>>> float(terms.var), float(terms.dist)  # push: [8 - 9]_+ = 0
(0.0, 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from companion.dropout import concrete_layers, concrete_regularizer
from companion.model import UNetOutput, weight_decay_penalty

__all__ = [
    "DiscriminativeTerms",
    "discriminative_loss",
    "batched_discriminative_loss",
    "class_loss",
    "ObjectiveTerms",
    "training_objective",
]

_HINGES = ("squared", "euclidean")


class DiscriminativeTerms(NamedTuple):
    """Scalar terms of the discriminative loss; ``total = w_var var + w_dist dist + w_reg reg``."""

    total: torch.Tensor
    var: torch.Tensor
    dist: torch.Tensor
    reg: torch.Tensor


class ObjectiveTerms(NamedTuple):
    """Terms of the training objective; ``total = w_var var + w_dist dist + w_reg reg + ce + model_reg``."""

    total: torch.Tensor
    var: torch.Tensor
    dist: torch.Tensor
    reg: torch.Tensor
    ce: torch.Tensor
    model_reg: torch.Tensor


def _check_pair(embedding: torch.Tensor, instances: torch.Tensor) -> None:
    if embedding.ndim != 3:
        raise ValueError(f"embedding must be (E, H, W), got shape {tuple(embedding.shape)}")
    if instances.ndim != 3 or instances.shape[1:] != embedding.shape[1:]:
        raise ValueError(
            f"instances must be (K, H, W) with the embedding's H, W {tuple(embedding.shape[1:])}, "
            f"got shape {tuple(instances.shape)}"
        )


def instance_means(embedding: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean embedding of each instance by one matrix product.

    Parameters
    ----------
    embedding : Tensor (E, H, W)
    masks : Tensor (K, H, W), bool, no empty mask

    Returns
    -------
    Tensor (K, E)

    Examples
    --------
    >>> import torch
    >>> emb = torch.arange(4.0).reshape(1, 2, 2)
    >>> instance_means(emb, torch.tensor([[[True, True], [False, False]]]))
    tensor([[0.5000]])
    """
    flat_masks = masks.reshape(masks.shape[0], -1).to(embedding.dtype)  # (K, HW)
    flat_embedding = embedding.reshape(embedding.shape[0], -1).T  # (HW, E)
    return (flat_masks @ flat_embedding) / flat_masks.sum(dim=1, keepdim=True)


def _pull_term(flat_embedding: torch.Tensor, flat_masks: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Eq. (1): mean over instances of the mean squared distance of its pixels to its centre."""
    instance_idx, pixel_idx = torch.nonzero(flat_masks, as_tuple=True)  # one row per (worm, pixel)
    sq_dist = (flat_embedding[pixel_idx] - means[instance_idx]).pow(2).sum(dim=1)
    per_instance = torch.zeros(means.shape[0], dtype=means.dtype, device=means.device)
    per_instance = per_instance.index_add(0, instance_idx, sq_dist)
    return (per_instance / flat_masks.sum(dim=1).to(means.dtype)).mean()


def _push_term(means: torch.Tensor, delta_d: float, hinge: str) -> torch.Tensor:
    """Eq. (2): mean over ordered pairs A != B of the squared hinge on the centre distance."""
    n = means.shape[0]
    if n < 2:
        return means.sum() * 0.0
    sq_dist = (means[:, None, :] - means[None, :, :]).pow(2).sum(dim=-1)  # (K, K)
    if hinge == "squared":
        gap = 2.0 * delta_d - sq_dist
    else:  # floored so that the gradient of sqrt stays finite for coinciding centres
        gap = 2.0 * delta_d - torch.sqrt(sq_dist.clamp_min(1e-12))
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=means.device)
    return gap.clamp_min(0.0).pow(2)[off_diagonal].mean()


def discriminative_loss(
    embedding: torch.Tensor,
    instances: torch.Tensor,
    delta_d: float = 4.0,
    weights: tuple[float, float, float] = (1.0, 1.0, 0.001),
    hinge: str = "squared",
) -> DiscriminativeTerms:
    """Discriminative loss of one image, eqs. (1)-(3).

    Parameters
    ----------
    embedding : Tensor (E, H, W), float
        Per-pixel embedding.
    instances : Tensor (K, H, W), bool
        Ground-truth masks; they may overlap. Empty masks are ignored.
    delta_d : float
        Push margin: centres closer than ``2 delta_d`` (in squared distance for
        ``hinge="squared"``, in distance for ``"euclidean"``) are pushed apart.
    weights : (w_var, w_dist, w_reg)
        Weights of the pull, push and regularisation terms.
    hinge : {"squared", "euclidean"}
        Push on the squared centre distance (the paper's eq. 2) or on the distance
        (De Brabandere et al.).

    Returns
    -------
    DiscriminativeTerms
        Scalar tensors ``total, var, dist, reg``. No instance: all zero (still attached to the
        graph); one instance: ``dist = 0``.

    Examples
    --------
    >>> import torch
    >>> instances = torch.zeros(2, 3, 3, dtype=torch.bool)
    >>> instances[0, 0], instances[1, 2] = True, True
    >>> embedding = torch.zeros(2, 3, 3, requires_grad=True)
    >>> terms = discriminative_loss(embedding, instances)
    >>> terms.dist.item()  # both centres at the origin: [2 * 4 - 0]^2
    64.0
    >>> terms.total.backward()  # differentiable
    """
    _check_pair(embedding, instances)
    if hinge not in _HINGES:
        raise ValueError(f"hinge must be one of {_HINGES}, got {hinge!r}")
    if len(weights) != 3:
        raise ValueError(f"weights must be (w_var, w_dist, w_reg), got {weights!r}")
    instances = instances.to(device=embedding.device, dtype=torch.bool)
    masks = instances[instances.flatten(1).any(dim=1)] if instances.shape[0] else instances
    if masks.shape[0] == 0:
        zero = embedding.sum() * 0.0
        return DiscriminativeTerms(zero, zero, zero, zero)
    flat_embedding = embedding.reshape(embedding.shape[0], -1).T  # (HW, E)
    flat_masks = masks.reshape(masks.shape[0], -1)
    means = instance_means(embedding, masks)
    var = _pull_term(flat_embedding, flat_masks, means)
    dist = _push_term(means, delta_d, hinge)
    reg = means.pow(2).sum(dim=1).mean()
    w_var, w_dist, w_reg = weights
    return DiscriminativeTerms(w_var * var + w_dist * dist + w_reg * reg, var, dist, reg)


def batched_discriminative_loss(
    embeddings: torch.Tensor, instances: Sequence[torch.Tensor], **kwargs
) -> DiscriminativeTerms:
    """Mean of :func:`discriminative_loss` over a batch.

    Parameters
    ----------
    embeddings : Tensor (B, E, H, W)
    instances : sequence of B bool tensors (K_b, H, W)
    **kwargs
        Passed to :func:`discriminative_loss` (``delta_d``, ``weights``, ``hinge``).

    Examples
    --------
    >>> import torch
    >>> masks = torch.ones(1, 4, 4, dtype=torch.bool)
    >>> terms = batched_discriminative_loss(torch.zeros(2, 3, 4, 4), [masks, masks[:0]])
    >>> float(terms.total)
    0.0
    """
    if embeddings.ndim != 4:
        raise ValueError(f"embeddings must be (B, E, H, W), got shape {tuple(embeddings.shape)}")
    if len(instances) != embeddings.shape[0]:
        raise ValueError(f"got {len(instances)} instance stacks for a batch of {embeddings.shape[0]}")
    per_image = [discriminative_loss(e, m, **kwargs) for e, m in zip(embeddings, instances)]
    return DiscriminativeTerms(*(torch.stack(terms).mean() for terms in zip(*per_image)))


def class_loss(logits: torch.Tensor, target: torch.Tensor, *, overlap_weight: float = 1.0) -> torch.Tensor:
    """Pixel-wise cross-entropy of the 3-class head (0 background, 1 foreground, 2 overlap).

    Parameters
    ----------
    logits : Tensor (B, 3, H, W)
    target : Tensor (B, H, W), int64 (see :func:`companion.targets.three_class_target`)
    overlap_weight : float
        Weight of the overlap pixels' terms (1: the paper's plain cross-entropy). The mean is
        taken over the weights, as :func:`torch.nn.functional.cross_entropy` does.

    Examples
    --------
    >>> import torch
    >>> logits = torch.zeros(1, 3, 2, 2)
    >>> round(float(class_loss(logits, torch.zeros(1, 2, 2, dtype=torch.long))), 4)  # log 3
    1.0986
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits (B, C, H, W) and target (B, H, W) do not match: "
            f"{tuple(logits.shape)} vs {tuple(target.shape)}"
        )
    if not overlap_weight > 0:
        raise ValueError(f"overlap_weight must be > 0, got {overlap_weight!r}")
    weight = None
    if overlap_weight != 1:
        weight = torch.tensor([1.0, 1.0, overlap_weight], device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, target.to(device=logits.device, dtype=torch.long), weight=weight)


def training_objective(
    model: torch.nn.Module,
    output: UNetOutput,
    batch: dict,
    *,
    n_train: int,
    weight_decay: float = 1e-6,
    length_scale_sq: float = 1e-6,
    zeta: float = 1e-3,
    delta_d: float = 4.0,
    disc_weight: float = 1.0,
    overlap_weight: float = 1.0,
) -> ObjectiveTerms:
    """The loss the training loop minimises: discriminative + cross-entropy + model regulariser.

    The model regulariser is :func:`companion.dropout.concrete_regularizer` for a model with
    Concrete Dropout, else ``weight_decay`` times the sum of squared weights (the baseline).

    Parameters
    ----------
    model : nn.Module
        The network that produced ``output``.
    output : UNetOutput
        ``embedding (B, E, H, W)`` and ``logits (B, 3, H, W)``.
    batch : dict
        From :func:`companion.augment.collate_crops`: ``target (B, H, W)`` and ``instances``
        (list of ``(K_b, H, W)`` bool tensors).
    n_train : int
        Number of training samples ``N`` of the Concrete Dropout regulariser.
    weight_decay, length_scale_sq, zeta, delta_d : float
        Regularisation constants and the push margin.
    disc_weight : float
        Weight of the discriminative term in ``total`` (1 in the paper; the training loop sets 0
        during an optional cross-entropy warm-up). The returned ``var``, ``dist``, ``reg`` are
        unweighted either way.
    overlap_weight : float
        Weight of the overlap class in the cross-entropy (:func:`class_loss`; 1 in the paper).

    Examples
    --------
    >>> import torch
    >>> from companion.model import UNet
    >>> net = UNet(base_filters=2, depth=2, dropout="concrete")
    >>> batch = {"image": torch.rand(1, 2, 8, 8), "target": torch.zeros(1, 8, 8, dtype=torch.long),
    ...          "instances": [torch.ones(1, 8, 8, dtype=torch.bool)]}
    >>> terms = training_objective(net, net(batch["image"]), batch, n_train=10)
    >>> bool(torch.isclose(terms.total, terms.var + terms.dist + 0.001 * terms.reg
    ...                    + terms.ce + terms.model_reg))
    True
    """
    if n_train <= 0:
        raise ValueError(f"n_train must be positive, got {n_train!r}")
    disc = batched_discriminative_loss(output.embedding, batch["instances"], delta_d=delta_d)
    ce = class_loss(output.logits, batch["target"], overlap_weight=overlap_weight)
    if concrete_layers(model):
        model_reg = concrete_regularizer(model, n_train, length_scale_sq=length_scale_sq, zeta=zeta)
    else:
        model_reg = weight_decay * weight_decay_penalty(model)
    model_reg = model_reg.to(ce.device)
    if disc_weight < 0:
        raise ValueError(f"disc_weight must be >= 0, got {disc_weight!r}")
    total = disc_weight * disc.total + ce + model_reg
    return ObjectiveTerms(total, disc.var, disc.dist, disc.reg, ce, model_reg)
