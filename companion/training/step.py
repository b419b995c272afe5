"""One optimisation step: the model and optimiser of a configuration, its device and precision.

:func:`train_step` is the unit :func:`companion.training.train.train` repeats; the chapters and the
benchmarks call it directly to time or inspect a single step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from companion.model.unet import UNet, UNetOutput

from .._device import cuda_autocast_dtype, resolve_device
from .config import TrainConfig
from .distributed import unwrap
from .losses import ObjectiveTerms, training_objective

__all__ = [
    "training_device",
    "autocast_dtype",
    "build_model",
    "make_optimizer",
    "step_objective",
    "compiled_objective",
    "train_step",
]


def training_device(config: TrainConfig) -> torch.device:
    """``config.device`` checked (one-line ``ValueError``), else CUDA when available, else the CPU."""
    return resolve_device(config.device)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a step on ``device`` (None: float32): bf16 on a CPU with ``cpu_bf16``;
    with ``amp`` on CUDA, bf16 where the GPU has it natively, else float16."""
    if device.type == "cpu":
        return torch.bfloat16 if config.cpu_bf16 else None
    if device.type != "cuda" or not config.amp:
        return None
    return cuda_autocast_dtype()


def build_model(config: TrainConfig) -> nn.Module:
    """The U-Net of a configuration (fresh weights from the global torch RNG)."""
    return UNet(**config.model_kwargs())


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Adam:
    """Adam over ``model``'s parameters; the dropout-rate logits in a group of their own (with
    ``lr_scale``) when ``config.dropout_lr_scale != 1`` and the model has Concrete Dropout.

    Examples
    --------
    >>> cfg = TrainConfig.preset("quick", dropout_lr_scale=10.0)
    >>> [g["lr"] for g in make_optimizer(build_model(cfg), cfg).param_groups]
    [0.001, 0.01]
    """
    rates = [p for name, p in model.named_parameters() if name.endswith("p_logit")]
    if config.dropout_lr_scale == 1.0 or not rates:
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    ids = {id(p) for p in rates}
    others = [p for p in model.parameters() if id(p) not in ids]
    scale = float(config.dropout_lr_scale)
    return torch.optim.Adam(
        [dict(params=others, lr_scale=1.0), dict(params=rates, lr=config.lr * scale, lr_scale=scale)],
        lr=config.lr,
    )


def step_objective(
    model: nn.Module,
    batch: dict,
    *,
    n_train: int,
    config: TrainConfig,
    amp_dtype: torch.dtype | None = None,
    disc_weight: float = 1.0,
) -> ObjectiveTerms:
    """The forward pass (under autocast when ``amp_dtype`` is given) and the objective, in float32.

    The part of :func:`train_step` that :func:`compiled_objective` hands to
    :func:`torch.compile`: no host synchronisation, no data-dependent shapes.
    """
    device_type = batch["image"].device.type
    with torch.autocast(
        device_type=device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    ):
        output = model(batch["image"])
    output = UNetOutput(output.embedding.float(), output.logits.float())
    return training_objective(
        unwrap(model),
        output,
        batch,
        n_train=n_train,
        weight_decay=config.weight_decay,
        length_scale_sq=config.length_scale_sq,
        zeta=config.zeta,
        delta_d=config.delta_d,
        overlap_weight=config.overlap_weight,
        disc_weight=disc_weight,
    )


def compiled_objective(config: TrainConfig) -> Callable[..., ObjectiveTerms]:
    """:func:`step_objective`, wrapped in :func:`torch.compile` when ``config.compile`` is on.

    The first steps of a compiled run are slow (the compilation); a batch whose mask count
    ``K`` changes (the scipy path pads each batch to its own largest count) is compiled once
    more with a dynamic ``K``.
    """
    return torch.compile(step_objective) if config.compile else step_objective


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    *,
    n_train: int,
    config: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    disc_weight: float = 1.0,
    objective: Callable[..., ObjectiveTerms] = step_objective,
) -> ObjectiveTerms:
    """One optimiser step on one batch; returns the (detached) terms of the objective.

    ``model`` may be wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, which then
    averages the gradients over the ranks. The forward pass runs under autocast when
    ``amp_dtype`` is given; the objective is always computed in float32. Nothing here waits for
    the device (the terms stay device tensors), except the float16 path's gradient scaler.

    Parameters
    ----------
    objective : callable
        :func:`step_objective`, or its compiled form from :func:`compiled_objective`.

    Examples
    --------
    >>> from companion.data.synthetic import make_dataset
    >>> from companion.data.augment import WormCropDataset, collate_crops
    >>> cfg = TrainConfig.preset("quick")
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = build_model(cfg)
    >>> opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    >>> data = make_dataset(2, seed=0, shape=(128, 128))
    >>> ds = WormCropDataset(data, crop_size=64, length=2, seed=0)
    >>> terms = train_step(model, opt, collate_crops([ds[0], ds[1]]), n_train=2, config=cfg)
    >>> bool(torch.isfinite(terms.total))
    True
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    terms = objective(
        model, batch, n_train=n_train, config=config, amp_dtype=amp_dtype, disc_weight=disc_weight
    )
    scaling = scaler is not None and scaler.is_enabled()
    (scaler.scale(terms.total) if scaling else terms.total).backward()
    if config.grad_clip > 0:
        if scaling:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    if scaling:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return ObjectiveTerms(*(torch.as_tensor(t).detach() for t in terms))
