"""U-Net with spatial Concrete Dropout (Gal, Hron & Kendall 2017) for instance embeddings.

The network maps a 2-channel BBBC010 image (fluorescence, brightfield) to two full-resolution
outputs: a per-pixel embedding (16-d by default, trained with the discriminative loss of
:mod:`companion.training.losses`) and 3-class logits (background / foreground / overlap).

With ``dropout="concrete"`` every convolution -- the 3x3 convolutions, the 2x2 up-convolutions
and both 1x1 heads -- reads its input through its own :class:`ConcreteDropout2d`, so each weight
matrix :math:`M_l` has its own learnable dropout rate :math:`p_l` (the paper's set-up).
``dropout=None`` is the baseline: the same network without dropout.

The dropout layers and the helpers on them are in :mod:`companion.model.dropout`.

Examples
--------
>>> import torch
>>> net = UNet(base_filters=4, dropout="concrete")
>>> out = net(torch.zeros(1, 2, 32, 48))
>>> tuple(out.embedding.shape), tuple(out.logits.shape)
((1, 16, 32, 48), (1, 3, 32, 48))
>>> from companion.model.dropout import dropout_rates
>>> len(dropout_rates(net))  # one learned rate per convolution
24
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._device import module_device
from .dropout import ConcreteDropout2d, DropoutLayer, sum_of_squares

__all__ = ["UNetOutput", "UNet", "weight_decay_penalty"]


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
            if not 0.0 < init_dropout_rate < 1.0:  # early, before any layer is built
                raise ValueError(f"dropout rate must lie strictly in (0, 1), got {init_dropout_rate!r}")
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
    weights = [m.weight for m in model.modules() if isinstance(m, kinds)]
    if not weights:
        device = module_device(model)
        return torch.zeros((), device=device)
    return sum_of_squares(weights)  # all layers at once
