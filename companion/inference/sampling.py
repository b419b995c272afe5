"""Deterministic and Monte-Carlo (dropout) inference of the U-Net on whole images.

With Concrete Dropout, every forward pass in *sampling mode* draws a fresh dropout mask for
every layer, i.e. a fresh set of weights from the approximate posterior ``q(W)``. Running
the network ``n`` times on the same image gives ``n`` samples of the predictive
distribution (Rumberger et al. 2020, Sec. 2.2); each can be post-processed into its own
instance segmentation and the instances agglomerated (:mod:`companion.inference.agglomerate`); a
:class:`companion.inference.segmenter.Segmenter` does both.

Two details make this practical:

* **Batched draws.** Spatial Concrete Dropout samples one mask per batch element and
  channel, so a batch holding the same image ``b`` times yields ``b`` independent draws in
  one forward pass (:func:`mc_predict`).
* **Any image size.** The U-Net needs ``H`` and ``W`` divisible by 16 (depth 5); images are
  reflect-padded to the next multiple (BBBC010's 520 x 696 becomes 528 x 704) and the
  outputs cropped back.

Beyond the paper, ``flips=True`` adds test-time augmentation with the four flips of the image
(:data:`FLIPS`; the network was trained with flips): the deterministic pass keeps the
unflipped embedding but averages the class probabilities of the four flipped passes, and the
Monte-Carlo draws cycle through the flips, each draw's outputs flipped back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from companion.model.dropout import concrete_layers, mc_sampling

from .._device import cuda_autocast_dtype, module_device, resolve_device

__all__ = [
    "MCDraws",
    "FLIPS",
    "inference_dtype",
    "predict",
    "flip_passes",
    "flip_averaged",
    "mc_predict",
    "pad_to_multiple",
    "MC_DRAWS",
]

#: The paper's number of Monte-Carlo draws per image.
MC_DRAWS = 8
#: The four flips of test-time augmentation, as the spatial axes that ``np.flip`` reverses:
#: none, left-right, up-down, both (= rotation by 180 degrees). Each is its own inverse.
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


class MCDraws(NamedTuple):
    """Network outputs of ``n`` forward passes on one image: float32 numpy arrays on the CPU, or
    float32 tensors on the model's device (``as_tensors=True``).

    Attributes
    ----------
    embeddings : np.ndarray or torch.Tensor
        ``(n, E, H, W)`` pixel embeddings.
    logits : np.ndarray or torch.Tensor
        ``(n, 3, H, W)`` background / foreground / overlap logits.
    """

    embeddings: np.ndarray
    logits: np.ndarray


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """Pad a ``(B, C, H, W)`` batch so ``H`` and ``W`` are multiples of ``multiple``.

    The padding is split evenly between both sides and mirrors the image (reflect); an image
    too small to mirror is padded by repeating its border (replicate).

    Returns
    -------
    padded : torch.Tensor
        ``(B, C, H', W')``.
    crop : tuple of slice
        Index ``padded[..., crop[0], crop[1]]`` to get back the original ``(H, W)``.

    Examples
    --------
    >>> padded, crop = pad_to_multiple(torch.zeros(1, 2, 520, 696), 16)
    >>> tuple(padded.shape), tuple(padded[..., crop[0], crop[1]].shape)
    ((1, 2, 528, 704), (1, 2, 520, 696))
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    top, left = pad_h // 2, pad_w // 2
    bottom, right = pad_h - top, pad_w - left
    mode = "reflect" if max(top, bottom) < height and max(left, right) < width else "replicate"
    if pad_h or pad_w:
        x = F.pad(x, (left, right, top, bottom), mode=mode)
    return x, (slice(top, top + height), slice(left, left + width))


def _as_image_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if tensor.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(tensor.shape)}")
    return tensor.float()


@contextlib.contextmanager
def _inference_state(model: nn.Module, sampling: bool) -> Iterator[None]:
    """Eval mode and the given sampling state inside the block; previous modes restored after."""
    was_training = model.training
    layers = concrete_layers(model)
    previous = [layer.sampling for layer in layers]
    model.eval()
    try:
        if sampling:
            with mc_sampling(model):
                yield
        else:
            for layer in layers:
                layer.sampling = False
            yield
    finally:
        for layer, state in zip(layers, previous):
            layer.sampling = state
        model.train(was_training)


def inference_dtype(device: torch.device, amp: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of inference on ``device`` (None: float32).

    ``amp=None``: bf16 on a CUDA GPU that has it natively, float16 on an older one, float32 on
    the CPU (where the committed results were computed); ``True``: the same on CUDA and bf16 on
    the CPU; ``False``: float32 everywhere.

    >>> inference_dtype(torch.device("cpu")), inference_dtype(torch.device("cpu"), amp=True)
    (None, torch.bfloat16)
    """
    if amp is False or (amp is None and device.type != "cuda"):
        return None
    return cuda_autocast_dtype() if device.type == "cuda" else torch.bfloat16


def _forward_cropped(
    model: nn.Module, batch: torch.Tensor, amp_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One padded forward pass of a ``(B, C, H, W)`` batch, outputs cropped back, float32 on the
    device, checked to be finite there (one host synchronisation)."""
    padded, (rows, cols) = pad_to_multiple(batch, getattr(model, "divisor", 16))
    # channels-last input makes the convolutions pick the NHWC kernels: 1.9x faster on a
    # 2-core CPU for the paper's U-Net at 528 x 704 (same outputs to float32 rounding).
    with torch.autocast(padded.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        output = model(padded.contiguous(memory_format=torch.channels_last))
    embedding = output.embedding[..., rows, cols].float()
    logits = output.logits[..., rows, cols].float()
    if not bool(torch.isfinite(embedding).all() & torch.isfinite(logits).all()):
        # caught here: downstream, the argmax of NaN logits reads as background and the run
        # would end with empty segmentations and a table of zeros instead of an error
        raise ValueError(
            "the network's output is not finite (NaN or inf): its weights are "
            "probably corrupt, e.g. from a diverged training run"
        )
    return embedding, logits


def _flipped(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(x, axes) if axes else x


def _mean_class_log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """log of the mean softmax of ``(n, 3, H, W)`` logits: ``(1, 3, H, W)`` logits whose softmax
    is the average class probability (float32)."""
    log_p = torch.log_softmax(logits, dim=1)
    return torch.logsumexp(log_p, dim=0, keepdim=True) - float(np.log(len(logits)))


def _finish(draws: MCDraws, as_tensors: bool) -> MCDraws:
    """The outputs as device tensors, or moved to the host as numpy."""
    if as_tensors:
        return draws
    return MCDraws(*(np.ascontiguousarray(t.cpu().numpy()) for t in draws))


def predict(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    device: str | torch.device | None = None,
    flips: bool = False,
    amp: bool | None = None,
    as_tensors: bool = False,
) -> MCDraws:
    """Deterministic prediction (evaluation mode, dropout sampling off) for one image.

    Parameters
    ----------
    model : nn.Module
        A :class:`companion.model.unet.UNet` (or any module returning ``UNetOutput``).
    image : np.ndarray or torch.Tensor
        ``(2, H, W)``, any ``H`` and ``W``.
    device : str or torch.device, optional
        Where to run; default the model's device (the model is not moved).
    flips : bool
        Test-time augmentation (not in the paper): the class logits become the log of the
        class probabilities averaged over the four :data:`FLIPS` (four passes); the embedding
        stays that of the unflipped image, whose values the clustering compares.
    amp : bool, optional
        Mixed precision, see :func:`inference_dtype` (default: on a GPU, not on the CPU).
    as_tensors : bool
        Return float32 tensors on the device instead of numpy arrays (nothing is copied to
        the host).

    Returns
    -------
    MCDraws
        With ``n = 1``: ``embeddings (1, E, H, W)`` and ``logits (1, 3, H, W)``.

    Examples
    --------
    >>> from companion.model.unet import UNet
    >>> net = UNet(base_filters=2, depth=3, dropout="concrete")
    >>> out = predict(net, np.zeros((2, 30, 41), np.float32))
    >>> out.embeddings.shape, out.logits.shape
    ((1, 16, 30, 41), (1, 3, 30, 41))
    """
    if flips:
        views = flip_passes(model, image, device=device, amp=amp, as_tensors=True)
        return _finish(flip_averaged(views), as_tensors)
    device = resolve_device(device) if device is not None else module_device(model)
    x = _as_image_tensor(image).to(device)[None]
    with _inference_state(model, sampling=False), torch.inference_mode():
        embedding, logits = _forward_cropped(model, x, inference_dtype(device, amp))
    return _finish(MCDraws(embedding, logits), as_tensors)


def flip_passes(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    *,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    as_tensors: bool = False,
) -> MCDraws:
    """The deterministic pass on each of the four :data:`FLIPS` views, outputs flipped back.

    ``device``, ``amp`` and ``as_tensors`` as in :func:`predict`.

    Returns
    -------
    MCDraws
        With ``n = 4``, in the order of :data:`FLIPS` (view 0 is the image itself).
        :func:`flip_averaged` makes the flip-augmented prediction of :func:`predict` from them;
        for a model without dropout they are also the draws that
        :func:`companion.inference.outputs.image_outputs` agglomerates.

    Examples
    --------
    >>> from companion.model.unet import UNet
    >>> net = UNet(base_filters=2, depth=3)
    >>> image = np.random.default_rng(0).random((2, 20, 24), dtype=np.float32)
    >>> views = flip_passes(net, image)
    >>> views.logits.shape
    (4, 3, 20, 24)
    >>> bool(np.array_equal(views.logits[0], predict(net, image).logits[0]))
    True
    """
    device = resolve_device(device) if device is not None else module_device(model)
    x = _as_image_tensor(image).to(device)[None]
    amp_dtype = inference_dtype(device, amp)
    embeddings, logits = [], []
    with _inference_state(model, sampling=False), torch.inference_mode():
        for axes in FLIPS:
            embedding, logit = _forward_cropped(model, _flipped(x, axes), amp_dtype)
            embeddings.append(_flipped(embedding[0], axes)), logits.append(_flipped(logit[0], axes))
        views = MCDraws(torch.stack(embeddings), torch.stack(logits))
    return _finish(views, as_tensors)


def flip_averaged(views: MCDraws) -> MCDraws:
    """The flip-augmented deterministic prediction (``n = 1``) from :func:`flip_passes`' views.

    The embedding of the unflipped view (embedding values are only comparable within one pass)
    and, as logits, the log of the class probabilities averaged over the views. Numpy views
    give numpy arrays, tensors give tensors on their device.
    """
    if isinstance(views.logits, torch.Tensor):
        return MCDraws(views.embeddings[:1], _mean_class_log_probabilities(views.logits))
    logits = _mean_class_log_probabilities(torch.from_numpy(np.asarray(views.logits))).numpy()
    return MCDraws(views.embeddings[:1], logits)


def mc_predict(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    n_draws: int = MC_DRAWS,
    batch: int | None = None,
    *,
    device: str | torch.device | None = None,
    seed: int | None = None,
    flips: bool = False,
    amp: bool | None = None,
    as_tensors: bool = False,
) -> MCDraws:
    """Monte-Carlo dropout predictions: ``n_draws`` stochastic forward passes of one image.

    The image is repeated ``batch`` times along the batch dimension; spatial Concrete
    Dropout draws an independent mask per batch element, so each element is an independent
    draw and ``ceil(n_draws / batch)`` forward passes suffice. The model's training mode and
    sampling flags are restored afterwards.

    Parameters
    ----------
    model : nn.Module
        A :class:`companion.model.unet.UNet` with ``dropout="concrete"`` (a model without dropout
        layers gives ``n_draws`` identical outputs).
    image : np.ndarray or torch.Tensor
        ``(2, H, W)``, any ``H`` and ``W`` (padded to multiples of 16 internally).
    n_draws : int
        Number of Monte-Carlo samples.
    batch : int, optional
        Draws per forward pass (lower it if memory is short). Default: 8 on a GPU, 1 on the
        CPU, where ``benchmarks/bench_mc_sampling.py`` measured batches of 8 draws to be
        *slower* (0.75-0.82x) than one draw per pass on 2 cores: the convolutions already keep
        the cores busy and 8 images' activations no longer fit the caches.
    device : str or torch.device, optional
        Where to run; default the model's device.
    seed : int, optional
        Seeds the dropout masks (the global RNG state is left untouched); ``None`` uses the
        current global state.
    flips : bool
        Test-time augmentation (not in the paper): draw ``d`` runs on the image flipped by
        ``FLIPS[d % 4]`` and its outputs are flipped back, so the draws vary both the dropout
        masks and the view. No extra passes.
    amp, as_tensors
        As in :func:`predict`: mixed precision (default on a GPU) and device tensors instead
        of numpy arrays.

    Returns
    -------
    MCDraws
        ``embeddings (n_draws, E, H, W)`` and ``logits (n_draws, 3, H, W)``, float32.

    Examples
    --------
    >>> from companion.model.unet import UNet
    >>> net = UNet(base_filters=2, depth=3, dropout="concrete", init_dropout_rate=0.3)
    >>> image = np.random.default_rng(0).random((2, 20, 24), dtype=np.float32)
    >>> draws = mc_predict(net, image, n_draws=3, seed=0)
    >>> draws.logits.shape
    (3, 3, 20, 24)
    >>> bool(np.array_equal(draws.logits, mc_predict(net, image, n_draws=3, seed=0).logits))  # seeded
    True
    >>> bool(np.array_equal(draws.logits[0], draws.logits[1]))  # draws differ
    False
    """
    device = resolve_device(device) if device is not None else module_device(model)
    if batch is None:
        batch = 8 if device.type == "cuda" else 1
    if n_draws < 1 or batch < 1:
        raise ValueError(f"n_draws and batch must be >= 1, got n_draws={n_draws}, batch={batch}")
    x = _as_image_tensor(image).to(device)[None]
    amp_dtype = inference_dtype(device, amp)
    rng_devices = [device] if device.type == "cuda" else []
    embeddings: list = [None] * n_draws
    logits: list = [None] * n_draws
    with contextlib.ExitStack() as stack:
        if seed is not None:
            stack.enter_context(torch.random.fork_rng(devices=rng_devices))
            torch.manual_seed(seed)
        stack.enter_context(_inference_state(model, sampling=True))
        stack.enter_context(torch.inference_mode())
        views = FLIPS if flips else ((),)
        for start in range(0, n_draws, batch):
            draws = range(start, min(start + batch, n_draws))
            for axes in dict.fromkeys(views[d % len(views)] for d in draws):  # one pass per view
                mine = [d for d in draws if views[d % len(views)] == axes]
                embedding, logit = _forward_cropped(
                    model, _flipped(x, axes).expand(len(mine), *x.shape[1:]), amp_dtype
                )
                embedding, logit = _flipped(embedding, axes), _flipped(logit, axes)
                for d, e, lg in zip(mine, embedding, logit):  # draw d keeps view FLIPS[d % 4]
                    embeddings[d], logits[d] = e, lg
        out = MCDraws(torch.stack(embeddings), torch.stack(logits))
    return _finish(out, as_tensors)
