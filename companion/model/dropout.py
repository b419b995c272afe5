"""Concrete Dropout (Gal, Hron & Kendall 2017): a dropout layer whose rate is learned.

:class:`ConcreteDropout2d` drops whole feature maps with a relaxed (Concrete) Bernoulli mask, so
the rate :math:`p` gets gradients; :class:`DropoutLayer` pairs it with the weight layer it feeds,
whose weights enter :func:`concrete_regularizer`. :func:`mc_sampling` switches the masks on at test
time (Monte-Carlo dropout) independently of ``model.train()`` / ``model.eval()``.

Dropout convention
------------------
The layers use *inverted* dropout: a kept feature is divided by the retain probability
:math:`1 - p`, so ``E[x * z / (1 - p)] = x``. Consequently the deterministic forward pass
(evaluation mode, sampling off) is the identity -- no rescaling at test time -- and the
KL weight term of the regulariser is :math:`l^2 \\lVert M \\rVert^2 / (2 (1 - p))`
(see :func:`concrete_regularizer` and chapter 3).

Examples
--------
>>> import torch
>>> from companion.model.unet import UNet
>>> net = UNet(base_filters=4, dropout="concrete")
>>> len(concrete_layers(net)) == len(dropout_rates(net))
True
>>> with mc_sampling(net):
...     a, b = net(torch.ones(1, 2, 16, 16)), net(torch.ones(1, 2, 16, 16))
>>> bool((a.logits != b.logits).any())  # two draws differ
True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .._device import device_constant, module_device

__all__ = [
    "EPS",
    "ConcreteDropout",
    "ConcreteDropout2d",
    "DropoutLayer",
    "concrete_layers",
    "dropout_layers",
    "dropout_rates",
    "set_mc_sampling",
    "mc_sampling",
    "concrete_regularizer",
]

#: Numerical floor used by the Concrete relaxation (uniform noise is kept in ``[EPS, 1 - EPS]``)
#: and for the retain probability ``1 - p`` (never below ``EPS``, so ``1 / (1 - p) <= 1e7``).
EPS = 1e-7


def _logit(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout rate must lie strictly in (0, 1), got {p!r}")
    return math.log(p) - math.log1p(-p)


class ConcreteDropout(nn.Module):
    """Element-wise Concrete Dropout with a learnable rate (dense features, shape ``(B, F)``).

    The dropout rate is stored as a logit, ``p = sigmoid(p_logit)``. While sampling (training
    mode, or :func:`set_mc_sampling` on) a relaxed Bernoulli *drop* variable is drawn with the
    Concrete distribution

    .. math:: \\tilde z = \\sigma\\big((\\operatorname{logit} p + \\log u - \\log(1-u)) / t\\big),
              \\quad u \\sim U(\\epsilon, 1 - \\epsilon)

    and the input is multiplied by ``(1 - z~) / (1 - p)`` (inverted dropout). The ratio is
    evaluated in log space, so it stays finite for extreme logits. Otherwise (evaluation mode,
    sampling off) the layer is the identity: with inverted dropout the expectation of the
    sampled layer already equals its input.

    Parameters
    ----------
    init_rate : float
        Initial dropout rate ``p`` in (0, 1).
    temperature : float
        Temperature ``t`` of the relaxation; 0.1 (Gal et al.) is close to hard Bernoulli masks
        while keeping gradients with respect to ``p`` usable.
    eps : float
        Keeps the uniform noise away from 0 and 1 (``log u`` stays finite) and is the floor
        of the retain probability ``1 - p``.

    Examples
    --------
    >>> import torch
    >>> drop = ConcreteDropout(init_rate=0.2)
    >>> round(drop.p, 6)
    0.2
    >>> x = torch.ones(4, 8)
    >>> torch.equal(drop.eval()(x), x)  # deterministic mode is the identity
    True
    """

    def __init__(self, init_rate: float = 0.1, temperature: float = 0.1, eps: float = EPS) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.p_logit = nn.Parameter(torch.tensor(_logit(init_rate), dtype=torch.float32))
        self.temperature = float(temperature)
        self.eps = float(eps)
        self.sampling = False

    @property
    def p(self) -> float:
        """Current dropout rate ``sigmoid(p_logit)`` as a Python float."""
        return float(torch.sigmoid(self.p_logit.detach()))

    def log_retain(self) -> torch.Tensor:
        """``log(1 - p)``, floored at ``log(eps)`` (differentiable in ``p_logit``)."""
        return torch.clamp(F.logsigmoid(-self.p_logit), min=math.log(self.eps))

    def noise_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Shape of the dropout mask: one value per element."""
        return tuple(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.sampling):
            return x
        dtype = torch.promote_types(x.dtype, torch.float32)  # noise never in half precision
        u = torch.rand(self.noise_shape(x), device=x.device, dtype=dtype)
        u = u.clamp(self.eps, 1.0 - self.eps)
        logit = self.p_logit.to(dtype)
        drop_logit = (logit + torch.log(u) - torch.log1p(-u)) / self.temperature
        # keep mask (1 - z~) = sigmoid(-drop_logit); scale = keep / (1 - p), in log space
        log_scale = F.logsigmoid(-drop_logit) - self.log_retain().to(dtype)
        return x * torch.exp(log_scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}, temperature={self.temperature}, sampling={self.sampling}"


class ConcreteDropout2d(ConcreteDropout):
    """Spatial (channel-wise) Concrete Dropout for feature maps ``(B, C, H, W)``.

    One relaxed Bernoulli variable per sample and channel drops a whole feature map, like
    :class:`torch.nn.Dropout2d`; everything else is as in :class:`ConcreteDropout`.

    Examples
    --------
    >>> import torch
    >>> drop = ConcreteDropout2d(init_rate=0.5)
    >>> with torch.no_grad():
    ...     y = drop.train()(torch.ones(1, 6, 4, 4))
    >>> bool((y.amax(dim=(2, 3)) == y.amin(dim=(2, 3))).all())  # constant per channel
    True
    """

    def noise_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if x.ndim != 4:
            raise ValueError(f"ConcreteDropout2d expects (B, C, H, W) input, got shape {tuple(x.shape)}")
        return (x.shape[0], x.shape[1], 1, 1)


class DropoutLayer(nn.Module):
    """A weight layer ``layer`` (conv, up-conv or linear) reading its input through ``dropout``.

    Pairs each dropout rate with the weight matrix it multiplies, which
    :func:`concrete_regularizer` needs. ``dropout=None`` gives the plain layer.

    Examples
    --------
    >>> import torch
    >>> mlp_layer = DropoutLayer(nn.Linear(3, 5), ConcreteDropout(0.1))
    >>> tuple(mlp_layer(torch.zeros(2, 3)).shape)
    (2, 5)
    """

    def __init__(self, layer: nn.Module, dropout: ConcreteDropout | None = None) -> None:
        super().__init__()
        self.dropout = dropout
        self.layer = layer

    @property
    def in_features(self) -> int:
        """Number of input features ``F_l`` (channels for convolutions)."""
        for name in ("in_channels", "in_features"):
            if hasattr(self.layer, name):
                return int(getattr(self.layer, name))
        raise TypeError(f"cannot tell the input features of {type(self.layer).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.layer(x)


def concrete_layers(model: nn.Module) -> list[ConcreteDropout]:
    """All Concrete Dropout layers of ``model`` in definition order (empty for the baseline).

    Examples
    --------
    >>> from companion.model.unet import UNet
    >>> len(concrete_layers(UNet(base_filters=2, depth=2, dropout="concrete")))
    9
    >>> concrete_layers(UNet(base_filters=2, depth=2))
    []
    """
    return [m for m in model.modules() if isinstance(m, ConcreteDropout)]


def dropout_layers(model: nn.Module) -> list[DropoutLayer]:
    """All :class:`DropoutLayer` pairs (dropout + weight layer) of ``model`` with a Concrete Dropout."""
    return [m for m in model.modules() if isinstance(m, DropoutLayer) and m.dropout is not None]


def dropout_rates(model: nn.Module) -> list[float]:
    """Current dropout rate of every Concrete Dropout layer, in definition order.

    Examples
    --------
    >>> from companion.model.unet import UNet
    >>> rates = dropout_rates(UNet(base_filters=2, depth=2, dropout="concrete", init_dropout_rate=0.2))
    >>> all(abs(p - 0.2) < 1e-6 for p in rates)
    True
    """
    return [layer.p for layer in concrete_layers(model)]


def set_mc_sampling(model: nn.Module, enabled: bool) -> None:
    """Switch Monte-Carlo sampling of every Concrete Dropout layer on or off.

    In sampling mode the layers draw dropout masks even in ``model.eval()``; with sampling off
    they sample only in training mode. A model without Concrete Dropout is left unchanged.

    Examples
    --------
    >>> import torch
    >>> from companion.model.unet import UNet
    >>> net = UNet(base_filters=2, depth=2, dropout="concrete", init_dropout_rate=0.5).eval()
    >>> x = torch.rand(1, 2, 8, 8)
    >>> set_mc_sampling(net, True)
    >>> with torch.no_grad():
    ...     differ = not torch.equal(net(x).logits, net(x).logits)
    >>> set_mc_sampling(net, False)
    >>> differ
    True
    """
    for layer in concrete_layers(model):
        layer.sampling = bool(enabled)


@contextlib.contextmanager
def mc_sampling(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: sampling mode on inside the block, the previous modes restored after.

    Examples
    --------
    >>> from companion.model.unet import UNet
    >>> net = UNet(base_filters=2, depth=2, dropout="concrete")
    >>> with mc_sampling(net):
    ...     inside = all(layer.sampling for layer in concrete_layers(net))
    >>> inside, any(layer.sampling for layer in concrete_layers(net))
    (True, False)
    """
    layers = concrete_layers(model)
    previous = [layer.sampling for layer in layers]
    set_mc_sampling(model, True)
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.sampling = state


def _bernoulli_entropy(p_logit: torch.Tensor) -> torch.Tensor:
    """``H(p) = -p log p - (1-p) log(1-p)`` from the logit, finite for any logit."""
    p = torch.sigmoid(p_logit)
    return -(p * F.logsigmoid(p_logit) + (1 - p) * F.logsigmoid(-p_logit))


def concrete_regularizer(
    model: nn.Module, n_train: int, length_scale_sq: float = 1e-6, zeta: float = 1e-3
) -> torch.Tensor:
    """KL regulariser of Concrete Dropout, summed over the model's dropout layers.

    For each :class:`DropoutLayer` ``l`` with weight ``M_l``, bias ``b_l``, dropout rate ``p_l``
    and ``F_l`` input features (channels for spatial dropout)

    .. math:: R = \\frac{1}{N} \\sum_l \\Big[ \\frac{l^2}{2 (1 - p_l)} \\lVert M_l \\rVert^2
              + \\frac{l^2}{2} \\lVert b_l \\rVert^2 - \\zeta F_l \\, \\mathcal{H}(p_l) \\Big],
       \\qquad \\mathcal{H}(p) = -p \\log p - (1 - p) \\log (1 - p),

    the paper's eqs. (4)-(5) for *inverted* dropout (our forward pass divides kept features by
    ``1 - p``; the non-inverted form ``(1 - p) l^2/2 ||M||^2`` describes the same model with
    ``M = M_inv / (1 - p)``). ``R`` is *added* to the loss: minimising it shrinks the weights
    and maximises the entropy of each rate (pushing ``p`` toward 0.5), against the data term,
    which prefers small ``p``. The bias is never dropped, so it gets the plain Gaussian-prior
    term. ``1 - p`` is floored at :data:`EPS`, and all logs come from ``logsigmoid``, so the
    value and its gradient stay finite for any logit (e.g. +-100).

    Parameters
    ----------
    model : nn.Module
        Any module built from :class:`DropoutLayer` with Concrete Dropout.
    n_train : int
        Number ``N`` of training samples.
    length_scale_sq : float
        Prior length scale squared ``l^2``.
    zeta : float
        Weight of the entropy term (the paper's ``zeta``; Gal et al. use ``2 / tau``).

    Returns
    -------
    Tensor
        Scalar; zero (on the model's device) for a model without Concrete Dropout.

    Examples
    --------
    >>> import torch
    >>> layer = DropoutLayer(nn.Linear(4, 1, bias=False), ConcreteDropout(0.5))
    >>> with torch.no_grad():
    ...     _ = layer.layer.weight.fill_(1.0)
    >>> reg = concrete_regularizer(layer, n_train=1, length_scale_sq=1.0, zeta=1.0)
    >>> expected = 4 / (2 * 0.5) - 4 * math.log(2)
    >>> abs(reg.item() - expected) < 1e-5
    True
    """
    if n_train <= 0:
        raise ValueError(f"n_train must be positive, got {n_train!r}")
    pairs = dropout_layers(model)
    if not pairs:
        return torch.zeros((), device=module_device(model))
    # all layers at once (a few operations per tensor whatever the depth, no host synchronisation)
    device = pairs[0].dropout.p_logit.device
    logits = torch.stack([pair.dropout.p_logit for pair in pairs])  # (L,)
    floors = device_constant(tuple(math.log(pair.dropout.eps) for pair in pairs), device)
    log_retain = torch.clamp(F.logsigmoid(-logits), min=floors)  # as ConcreteDropout.log_retain
    norms = squared_norms([pair.layer.weight for pair in pairs])  # (L,)
    weights = (torch.exp(-log_retain) * norms).sum()
    biases = [pair.layer.bias for pair in pairs if getattr(pair.layer, "bias", None) is not None]
    if biases:
        weights = weights + sum_of_squares(biases)
    in_features = device_constant(tuple(float(pair.in_features) for pair in pairs), device)
    entropy = (in_features * _bernoulli_entropy(logits)).sum()
    return weights * (0.5 * length_scale_sq / n_train) - entropy * (zeta / n_train)


def _flat_views(tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [t.view(-1) if t.is_contiguous() else t.reshape(-1) for t in tensors]


class _SquaredNorms(torch.autograd.Function):
    """``(|t_1|^2, ..., |t_n|^2)`` of n tensors, with its gradient ``2 g_i t_i``: a multi-tensor
    call each way (``torch._foreach_norm`` / ``torch._foreach_mul``, as
    :func:`torch.nn.utils.clip_grad_norm_` uses), one pass over the weights, a few GPU kernels."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)
        norms = torch._foreach_norm(tensors)
        return torch.cat([n.view(1) for n in norms]).square()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch._foreach_mul(ctx.saved_tensors, list((2.0 * grad).unbind())))


class _SumOfSquares(torch.autograd.Function):
    """``sum_i |t_i|^2`` over n tensors, with its gradient ``2 g t_i`` (one multi-tensor call)."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)
        flat = torch.cat(_flat_views(tensors))
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch._foreach_mul(ctx.saved_tensors, 2.0 * grad))


def squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of each tensor, ``(n,)`` (differentiable).

    Examples
    --------
    >>> squared_norms([torch.ones(2, 2), torch.full((3,), 2.0)]).tolist()
    [4.0, 12.0]
    """
    return _SquaredNorms.apply(*tensors)


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all elements of all ``tensors``, a scalar (differentiable).

    Examples
    --------
    >>> float(sum_of_squares([torch.ones(2, 2), torch.full((3,), 2.0)]))
    16.0
    """
    return _SumOfSquares.apply(*tensors)
