"""U-Net with spatial Concrete Dropout (Gal, Hron & Kendall 2017) for instance embeddings.

The network maps a 2-channel BBBC010 image (fluorescence, brightfield) to two full-resolution
outputs: a per-pixel embedding (16-d by default, trained with the discriminative loss of
:mod:`companion.losses`) and 3-class logits (background / foreground / overlap).

With ``dropout="concrete"`` every convolution -- the 3x3 convolutions, the 2x2 up-convolutions
and both 1x1 heads -- reads its input through its own :class:`ConcreteDropout2d`, so each weight
matrix :math:`M_l` has its own learnable dropout rate :math:`p_l` (the paper's set-up).
``dropout=None`` is the baseline: the same network without dropout.

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
>>> net = UNet(base_filters=4, dropout="concrete")
>>> out = net(torch.zeros(1, 2, 32, 48))
>>> tuple(out.embedding.shape), tuple(out.logits.shape)
((1, 16, 32, 48), (1, 3, 32, 48))
>>> len(concrete_layers(net)) == len(dropout_rates(net))
True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNetOutput",
    "UNet",
    "ConcreteDropout",
    "ConcreteDropout2d",
    "DropoutLayer",
    "concrete_layers",
    "dropout_layers",
    "dropout_rates",
    "set_mc_sampling",
    "mc_sampling",
    "concrete_regularizer",
    "weight_decay_penalty",
]

#: Numerical floor used by the Concrete relaxation (uniform noise is kept in ``[EPS, 1 - EPS]``)
#: and for the retain probability ``1 - p`` (never below ``EPS``, so ``1 / (1 - p) <= 1e7``).
EPS = 1e-7


class UNetOutput(NamedTuple):
    """The two heads of :class:`UNet`.

    Attributes
    ----------
    embedding : Tensor (B, E, H, W)
        Per-pixel instance embedding.
    logits : Tensor (B, 3, H, W)
        Background / foreground / overlap class logits.
    """

    embedding: torch.Tensor
    logits: torch.Tensor


# --------------------------------------------------------------------------------------------
# Concrete Dropout
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# U-Net
# --------------------------------------------------------------------------------------------
class UNet(nn.Module):
    """U-Net with an embedding head and a 3-class head, optionally with Concrete Dropout.

    ``depth`` levels (5: four 2x2 max-pool down-samplings, so ``H`` and ``W`` must be
    divisible by 16); level ``i`` has ``base_filters * 2**i`` channels and two 3x3
    same-padded convolutions with ReLU; the decoder up-samples with learned 2x2 stride-2
    transposed convolutions and concatenates the encoder's skip features.

    Parameters
    ----------
    in_channels : int
        Image channels (2 for BBBC010).
    embedding_dim : int
        Dimension ``E`` of the embedding head.
    n_classes : int
        Classes of the semantic head (background / foreground / overlap).
    base_filters : int
        Channels of the first level (19 in the paper).
    depth : int
        Number of resolution levels (at least 1).
    dropout : None or "concrete"
        ``"concrete"`` puts a :class:`ConcreteDropout2d` before every convolution.
    init_dropout_rate, temperature : float
        Initial rate and relaxation temperature of the Concrete Dropout layers.
    input_mean, input_std : sequence of float, optional
        Per-channel standardisation ``(x - mean) / std`` applied to the input.
    downsample : int
        Internal resolution factor (not in the paper). With ``downsample=2`` the input is
        average-pooled 2x2 before the first level and both heads' outputs are resized
        bilinearly back to the input's ``(H, W)``: a quarter of the compute per pixel, and a
        crop of the same cost covers four times the image. BBBC010's true worm masks pooled 2x2 and
        resized back keep a mean IoU of 0.98 with themselves. ``H`` and ``W``
        must then be divisible by ``downsample * 2**(depth - 1)``.

    Examples
    --------
    >>> import torch
    >>> net = UNet(base_filters=4, depth=3)
    >>> net.divisor
    4
    >>> out = net(torch.zeros(2, 2, 8, 12))
    >>> tuple(out.embedding.shape)
    (2, 16, 8, 12)
    """

    def __init__(
        self,
        in_channels: int = 2,
        embedding_dim: int = 16,
        n_classes: int = 3,
        base_filters: int = 19,
        depth: int = 5,
        dropout: str | None = None,
        init_dropout_rate: float = 0.1,
        temperature: float = 0.1,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        downsample: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(downsample, int) or isinstance(downsample, bool) or downsample < 1:
            raise ValueError(f"downsample must be an integer >= 1, got {downsample!r}")
        if dropout not in (None, "concrete"):
            raise ValueError(f"dropout must be None or 'concrete', got {dropout!r}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth!r}")
        self.depth = depth
        self.downsample = downsample
        self.divisor = downsample * 2 ** (depth - 1)
        self.dropout_kind = dropout
        self._init_rate = init_dropout_rate
        self._temperature = temperature
        if dropout is not None:
            _logit(init_dropout_rate)  # validates the rate early
        self._register_standardization(in_channels, input_mean, input_std)
        widths = [base_filters * 2**i for i in range(depth)]
        self.encoder = nn.ModuleList()
        channels = in_channels
        for width in widths:
            self.encoder.append(self._double_conv(channels, width))
            channels = width
        self.upconvs = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.upconvs.append(self._wrap(nn.ConvTranspose2d(channels, width, 2, stride=2)))
            self.decoder.append(self._double_conv(2 * width, width))
            channels = width
        self.embedding_head = self._wrap(nn.Conv2d(channels, embedding_dim, 1))
        self.class_head = self._wrap(nn.Conv2d(channels, n_classes, 1))
        self.reset_parameters()

    def _register_standardization(
        self, channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> None:
        """Per-channel ``(x - mean) / std`` applied to the input (identity when both are None).

        Kept as non-persistent buffers built from the constructor arguments, so the statistics
        travel with ``model_kwargs`` and old state dicts load unchanged.
        """
        if (mean is None) != (std is None):
            raise ValueError("give both input_mean and input_std, or neither")
        mean_v = [0.0] * channels if mean is None else [float(v) for v in mean]
        std_v = [1.0] * channels if std is None else [float(v) for v in std]
        if len(mean_v) != channels or len(std_v) != channels:
            raise ValueError(
                f"input_mean and input_std need {channels} values each, got {len(mean_v)} and {len(std_v)}"
            )
        if not all(math.isfinite(v) for v in mean_v) or not all(math.isfinite(v) and v > 0 for v in std_v):
            raise ValueError(
                f"input_mean must be finite and input_std finite and > 0, got {mean_v} and {std_v}"
            )
        # built on the CPU: a model created under torch.device("meta") still gets real statistics
        mean_t = torch.tensor(mean_v, dtype=torch.float32, device="cpu")
        std_t = torch.tensor(std_v, dtype=torch.float32, device="cpu")
        self.standardizes = mean is not None
        self.register_buffer("input_mean", mean_t.view(1, channels, 1, 1), persistent=False)
        self.register_buffer("input_std", std_t.view(1, channels, 1, 1), persistent=False)

    def reset_parameters(self) -> None:
        """He (Kaiming) normal initialisation of every convolution, zero biases.

        PyTorch's default initialisation shrinks the activations by about 1/sqrt(3) per layer;
        after the ~20 layers of a depth-5 U-Net the embedding starts almost constant, where the
        push term of eq. (2) has (nearly) zero gradient. He initialisation keeps the activation
        scale through the ReLU layers, so training starts with spread-out embeddings.

        A 2x2 stride-2 transposed convolution sums exactly ``C_in`` terms into each output
        pixel (one kernel tap per input pixel), so its He standard deviation is
        ``sqrt(2 / C_in)``; torch's ``fan_out`` of it is ``4 C_in`` and would halve it.
        """
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose2d):
                stride_area = module.stride[0] * module.stride[1]
                fan = module.in_channels * module.kernel_size[0] * module.kernel_size[1] // stride_area
                nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan))
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def _wrap(self, layer: nn.Module) -> DropoutLayer:
        dropout = None
        if self.dropout_kind == "concrete":
            dropout = ConcreteDropout2d(self._init_rate, self._temperature)
        return DropoutLayer(layer, dropout)

    def _double_conv(self, c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            self._wrap(nn.Conv2d(c_in, c_out, 3, padding=1)),
            nn.ReLU(inplace=True),
            self._wrap(nn.Conv2d(c_out, c_out, 3, padding=1)),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> UNetOutput:
        if x.ndim != 4:
            raise ValueError(f"UNet expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(
                f"UNet with depth={self.depth}, downsample={self.downsample} needs H and W divisible by {self.divisor}, "
                f"got input shape {tuple(x.shape)}; pad or crop the image first"
            )
        if self.standardizes:
            x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        size = x.shape[-2:]
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        skips = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for upconv, block in zip(self.upconvs, self.decoder):
            x = block(torch.cat([skips.pop(), upconv(x)], dim=1))
        embedding, logits = self.embedding_head(x), self.class_head(x)
        if self.downsample > 1:
            embedding = F.interpolate(embedding, size=size, mode="bilinear", align_corners=False)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return UNetOutput(embedding, logits)


# --------------------------------------------------------------------------------------------
# Helpers on any model
# --------------------------------------------------------------------------------------------
def concrete_layers(model: nn.Module) -> list[ConcreteDropout]:
    """All Concrete Dropout layers of ``model`` in definition order (empty for the baseline).

    Examples
    --------
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
    total = None
    for pair in dropout_layers(model):
        drop = pair.dropout
        inv_retain = torch.exp(-drop.log_retain())
        term = 0.5 * length_scale_sq * inv_retain * pair.layer.weight.pow(2).sum()
        bias = getattr(pair.layer, "bias", None)
        if bias is not None:
            term = term + 0.5 * length_scale_sq * bias.pow(2).sum()
        term = term - zeta * pair.in_features * _bernoulli_entropy(drop.p_logit)
        total = term if total is None else total + term
    if total is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return total / n_train


def weight_decay_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of squared weights of all convolution / linear layers (biases excluded).

    The baseline's regulariser is ``weight_decay * weight_decay_penalty(model)``.

    Examples
    --------
    >>> import torch
    >>> net = nn.Sequential(nn.Linear(2, 2, bias=False))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.fill_(2.0)
    >>> weight_decay_penalty(net).item()
    16.0
    """
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    squares = [m.weight.pow(2).sum() for m in model.modules() if isinstance(m, kinds)]
    if not squares:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(squares).sum()
