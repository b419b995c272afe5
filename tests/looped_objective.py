"""The training objective's parts as the package computed them before they were written for
whole batches and all layers at once.

Reference implementations kept for the tests and ``benchmarks/bench_training.py`` only. The
discriminative loss loops over the crops of a batch, drops empty masks by boolean indexing and
gathers the (worm, pixel) pairs with ``torch.nonzero`` -- one host synchronisation and dozens of
small kernels per crop; the regularisers loop over the layers. The package's
:func:`companion.training.losses.batched_discriminative_loss`,
:func:`companion.model.dropout.concrete_regularizer` and :func:`companion.model.unet.weight_decay_penalty`
must agree with them to float tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from companion.model.dropout import _bernoulli_entropy, dropout_layers
from companion.training.losses import DiscriminativeTerms


def looped_discriminative_loss(
    embedding: torch.Tensor,
    instances: torch.Tensor,
    delta_d: float = 4.0,
    weights: tuple[float, float, float] = (1.0, 1.0, 0.001),
    hinge: str = "squared",
) -> DiscriminativeTerms:
    """Eqs. (1)-(3) of one crop ``embedding (E, H, W)``, masks ``(K, H, W)`` (empty ones ignored)."""
    masks = instances[instances.flatten(1).any(dim=1)] if instances.shape[0] else instances
    if masks.shape[0] == 0:
        zero = embedding.sum() * 0.0
        return DiscriminativeTerms(zero, zero, zero, zero)
    flat_embedding = embedding.reshape(embedding.shape[0], -1).T  # (HW, E)
    flat_masks = masks.reshape(masks.shape[0], -1)
    weights_f = flat_masks.to(embedding.dtype)
    means = (weights_f @ flat_embedding) / weights_f.sum(dim=1, keepdim=True)
    instance_idx, pixel_idx = torch.nonzero(flat_masks, as_tuple=True)
    sq_dist = (flat_embedding[pixel_idx] - means[instance_idx]).pow(2).sum(dim=1)
    per_instance = torch.zeros(means.shape[0], dtype=means.dtype, device=means.device)
    per_instance = per_instance.index_add(0, instance_idx, sq_dist)
    var = (per_instance / flat_masks.sum(dim=1).to(means.dtype)).mean()
    n = means.shape[0]
    if n < 2:
        dist = means.sum() * 0.0
    else:
        sq = (means[:, None, :] - means[None, :, :]).pow(2).sum(dim=-1)
        gap = 2.0 * delta_d - (sq if hinge == "squared" else torch.sqrt(sq.clamp_min(1e-12)))
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=means.device)
        dist = gap.clamp_min(0.0).pow(2)[off_diagonal].mean()
    reg = means.pow(2).sum(dim=1).mean()
    w_var, w_dist, w_reg = weights
    return DiscriminativeTerms(w_var * var + w_dist * dist + w_reg * reg, var, dist, reg)


def looped_batched_loss(
    embeddings: torch.Tensor, instances: Sequence[torch.Tensor], **kwargs
) -> DiscriminativeTerms:
    """Mean over the crops of :func:`looped_discriminative_loss`; ``instances`` one stack per crop."""
    per_image = [looped_discriminative_loss(e, m, **kwargs) for e, m in zip(embeddings, instances)]
    return DiscriminativeTerms(*(torch.stack(terms).mean() for terms in zip(*per_image)))


def looped_concrete_regularizer(
    model: nn.Module, n_train: int, length_scale_sq: float = 1e-6, zeta: float = 1e-3
) -> torch.Tensor:
    """The Concrete Dropout regulariser, one layer at a time."""
    total = torch.zeros(())
    for pair in dropout_layers(model):
        drop = pair.dropout
        inv_retain = torch.exp(-drop.log_retain())
        term = 0.5 * length_scale_sq * inv_retain * pair.layer.weight.pow(2).sum()
        bias = getattr(pair.layer, "bias", None)
        if bias is not None:
            term = term + 0.5 * length_scale_sq * bias.pow(2).sum()
        total = total + term - zeta * pair.in_features * _bernoulli_entropy(drop.p_logit)
    return total / n_train


def looped_weight_decay_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of squared convolution / linear weights, one layer at a time."""
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    return torch.stack([m.weight.pow(2).sum() for m in model.modules() if isinstance(m, kinds)]).sum()
