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

A training batch is computed at once (:func:`batched_discriminative_loss`): the crops' masks
come padded to one ``(B, K, H, W)`` stack, every term is a batched matrix product or a
reduction over it, and nothing depends on the data's shape or waits for the device. The same
loss written as a loop over crops and worms (kept as a reference beside the tests) made the
whole training objective ~6 300 operators (profiler events, forward + backward) for 8 crops and
~9 100 for 16, with a host synchronisation at every crop; in this form it is ~770 for any
batch, none of them synchronising (``benchmarks/bench_training.py``).

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

from companion.data.targets import pad_instances
from companion.model.dropout import concrete_layers, concrete_regularizer
from companion.model.unet import UNetOutput, weight_decay_penalty

from .._device import device_constant, off_diagonal

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


def _check_options(hinge: str, weights: Sequence[float]) -> None:
    if hinge not in _HINGES:
        raise ValueError(f"hinge must be one of {_HINGES}, got {hinge!r}")
    if len(weights) != 3:
        raise ValueError(f"weights must be (w_var, w_dist, w_reg), got {weights!r}")


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


def _as_padded(
    instances, valid: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(instances, torch.Tensor) and instances.ndim == 4):
        if valid is not None:
            raise ValueError("valid goes with a padded (B, K, H, W) instance tensor, not a list of stacks")
        instances, valid = pad_instances(list(instances))
    if instances.device != device:
        instances = instances.to(device)
    if valid is None:
        valid = torch.ones(instances.shape[:2], dtype=torch.bool, device=device)
    return instances, valid.to(device)


def _pair_distances(means: torch.Tensor, hinge: str) -> torch.Tensor:
    """Squared (``hinge="squared"``) or plain distances between the centres of each crop,
    ``(B, K, E) -> (B, K, K)``."""
    difference = means.unsqueeze(2) - means.unsqueeze(1)
    sq_dist = (difference * difference).sum(dim=-1)
    if hinge == "squared":
        return sq_dist
    return torch.sqrt(sq_dist.clamp_min(1e-12))  # floored: the gradient of sqrt stays finite


class _InstanceMoments(torch.autograd.Function):
    """Per instance, the sums of its pixels' centred embeddings and of their squared norms.

    ``flat (B, E, P)``, ``weights (B, K, P)`` (the masks as 0/1 floats), ``centre (B, E, 1)``
    (a constant) -> ``sums (B, K, E)`` of ``x_i - c`` and ``square_sums (B, K)`` of
    ``|x_i - c|^2`` over each mask's pixels. Written with its gradient,
    ``dL/dx_i = sum_k m_ki (g_k + 2 h_k (x_i - c))``, two batched matrix products and one
    multiply-add over the embedding: a handful of passes over the ``(B, E, P)`` embedding where
    autograd of the same expression makes about ten (the objective of 8 crops of 256 x 256
    1.6x faster on a 2-core CPU).
    """

    @staticmethod
    def forward(
        ctx, flat: torch.Tensor, weights: torch.Tensor, centre: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        centred = flat - centre
        square_norms = (centred * centred).sum(dim=1, keepdim=True)  # (B, 1, P)
        sums = torch.bmm(weights, centred.transpose(1, 2))  # (B, K, E)
        square_sums = torch.bmm(weights, square_norms.transpose(1, 2)).squeeze(2)  # (B, K)
        ctx.save_for_backward(flat, weights, centre)
        return sums, square_sums

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor, grad_squares: torch.Tensor):
        flat, weights, centre = ctx.saved_tensors
        grad = torch.bmm(grad_sums.transpose(1, 2), weights)  # (B, E, P)
        pull = torch.bmm(grad_squares.unsqueeze(1), weights)  # (B, 1, P)
        return torch.addcmul(grad, pull, flat - centre, value=2.0), None, None


def _per_crop_terms(
    embeddings: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, delta_d: float, hinge: str
) -> torch.Tensor:
    """``var, dist, reg`` of each crop, ``(3, B)``, from padded masks, without a loop.

    The pull term of instance ``k`` is ``mean_i |x_i - c|^2 - |mu_k - c|^2`` over its pixels,
    with ``c`` the crop's (detached) mean embedding: the same value as ``mean_i |x_i - mu_k|^2``
    for any ``c``, and with ``c`` near the data the two squares stay small, so little is lost to
    cancellation in float32 (relative error ~1e-5 on a trained network's embeddings, where the
    looped float32 form reached ~1e-7). Both sums come from batched matrix products with the
    masks (:class:`_InstanceMoments`). Padding and empty masks enter every sum with weight 0.
    """
    flat = embeddings.flatten(2)  # (B, E, P)
    centre = flat.detach().mean(dim=2, keepdim=True)  # (B, E, 1)
    weights = masks.flatten(2).to(embeddings.dtype)  # (B, K, P)
    counts = weights.sum(dim=2)  # (B, K)
    present = valid.to(embeddings.dtype) * counts.clamp(max=1.0)  # 1 for each crop's instances, else 0
    sums, square_sums = _InstanceMoments.apply(flat, weights, centre)
    per_pixel = 1.0 / counts.clamp_min(1.0)
    centred_means, mean_sq = sums * per_pixel.unsqueeze(2), square_sums * per_pixel  # (B, K, E), (B, K)
    n = present.sum(dim=1)  # instances per crop
    per_instance = 1.0 / n.clamp_min(1.0)
    pull = mean_sq - (centred_means * centred_means).sum(dim=2)
    var = (pull * present).sum(dim=1) * per_instance
    pairs = (
        present.unsqueeze(2)
        * present.unsqueeze(1)
        * off_diagonal(masks.shape[1], embeddings.device, embeddings.dtype)
    )
    gap = torch.clamp(2.0 * delta_d - _pair_distances(centred_means, hinge), min=0.0)
    dist = (gap * gap * pairs).sum(dim=(1, 2)) / (n * (n - 1.0)).clamp_min(1.0)  # distances ignore c
    means = centred_means + centre.transpose(1, 2)
    reg = ((means * means).sum(dim=2) * present).sum(dim=1) * per_instance
    return torch.stack([var, dist, reg])


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
    return batched_discriminative_loss(
        embedding[None], instances[None], delta_d=delta_d, weights=weights, hinge=hinge
    )


def batched_discriminative_loss(
    embeddings: torch.Tensor,
    instances: torch.Tensor | Sequence[torch.Tensor],
    valid: torch.Tensor | None = None,
    *,
    delta_d: float = 4.0,
    weights: tuple[float, float, float] = (1.0, 1.0, 0.001),
    hinge: str = "squared",
) -> DiscriminativeTerms:
    """Eqs. (1)-(3) of every crop of a batch, averaged over the crops, without a loop.

    Each term is computed per crop (over that crop's instances) and then averaged over the
    crops; a crop without an instance contributes zeros, one with a single instance ``dist = 0``.
    The computation never leaves the device: no Python loop over crops or instances, no
    data-dependent shapes, no host synchronisation.

    Parameters
    ----------
    embeddings : Tensor (B, E, H, W)
    instances : Tensor (B, K, H, W) bool, or sequence of B bool tensors (K_b, H, W)
        Padded instance masks (see :func:`companion.data.targets.pad_instances`), or one stack per crop (padded here).
        Empty masks are ignored: worms that left a crop, padding.
    valid : Tensor (B, K) bool, optional
        Which of the padded masks are instances (default: all; empty ones are skipped anyway).
    delta_d, weights, hinge
        As in :func:`discriminative_loss`.

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
    _check_options(hinge, weights)
    if len(instances) != embeddings.shape[0]:
        raise ValueError(f"got {len(instances)} instance stacks for a batch of {embeddings.shape[0]}")
    masks, valid = _as_padded(instances, valid, embeddings.device)
    if masks.shape[2:] != embeddings.shape[2:] or valid.shape != masks.shape[:2]:
        raise ValueError(
            f"instances must be (B, K, H, W) with the embeddings' B, H, W "
            f"{(embeddings.shape[0], *embeddings.shape[2:])}"
            f" and valid (B, K), got {tuple(masks.shape)} and {tuple(valid.shape)}"
        )
    terms = _per_crop_terms(embeddings, masks, valid, delta_d, hinge).mean(dim=1)  # var, dist, reg
    total = (terms * device_constant(tuple(map(float, weights)), embeddings.device, embeddings.dtype)).sum()
    return DiscriminativeTerms(total, *terms.unbind())


def class_loss(logits: torch.Tensor, target: torch.Tensor, *, overlap_weight: float = 1.0) -> torch.Tensor:
    """Pixel-wise cross-entropy of the 3-class head (0 background, 1 foreground, 2 overlap).

    Parameters
    ----------
    logits : Tensor (B, 3, H, W)
    target : Tensor (B, H, W), int64 (see :func:`companion.data.targets.three_class_target`)
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
        weight = torch.ones(3, device=logits.device, dtype=logits.dtype)  # no host-to-device copy
        weight[2] = overlap_weight
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

    The model regulariser is :func:`companion.model.dropout.concrete_regularizer` for a model with
    Concrete Dropout, else ``weight_decay`` times the sum of squared weights (the baseline).

    Parameters
    ----------
    model : nn.Module
        The network that produced ``output``.
    output : UNetOutput
        ``embedding (B, E, H, W)`` and ``logits (B, 3, H, W)``.
    batch : dict
        From :func:`companion.data.augment.collate_crops` or
        :meth:`companion.data.augment_torch.DeviceCropSource.crops`: ``target (B, H, W)``,
        ``instances`` (padded ``(B, K, H, W)`` bool masks, or a list of ``(K_b, H, W)`` stacks)
        and optionally ``valid (B, K)``.
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
    >>> from companion.model.unet import UNet
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
    disc = batched_discriminative_loss(
        output.embedding, batch["instances"], batch.get("valid"), delta_d=delta_d
    )
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
