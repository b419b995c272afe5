"""Configuration of a training run: :class:`TrainConfig`, its named :data:`PRESETS`, and the
input statistics that :func:`companion.training.train.train` stores when ``standardize`` is on.

Everything here is JSON-safe: a checkpoint stores its configuration as a dict
(:meth:`TrainConfig.to_dict`), and :meth:`TrainConfig.from_dict` rebuilds it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from companion.data.bbbc010 import Sample

__all__ = ["PRESETS", "TrainConfig", "channel_statistics"]


@dataclass
class TrainConfig:
    """Everything that defines a training run (JSON-safe, see :meth:`to_dict`).

    The defaults are the paper's set-up (the ``"paper"`` preset). The learning rate and the
    batch size are not given in the paper; ``lr=1e-4`` with Adam and 2 crops of 512 x 512 per
    iteration are the usual choice for a U-Net of this size on a single GPU.

    Parameters
    ----------
    model : {"concrete", "baseline"}
        ``"concrete"``: U-Net with Concrete Dropout (learned dropout rates, regularised by
        :func:`companion.model.dropout.concrete_regularizer`); ``"baseline"``: no dropout, L2 weight
        decay ``weight_decay``.
    iterations : int
        Optimiser steps (the paper: 800 000).
    batch_size : int
        Crops per iteration *per process* (a run on ``N`` GPUs uses ``N * batch_size``).
    lr : float
        Adam learning rate.
    disc_warmup : int
        Iterations at the start during which the discriminative term is switched off (cross-entropy
        and model regulariser only). Not in the paper (0 there, the default); it lets the class
        head learn the foreground first in short runs (``results/TRAINING.md``, "Measurements
        behind the TrainConfig options").
    grad_clip : float
        Largest global gradient norm (``0`` disables clipping). Not in the paper: it keeps a
        single bad crop from blowing up the embedding early in training, which can collapse every
        embedding onto one point, where the squared-distance hinge has no gradient.
    crop_size : int
        Side of the square training crops (multiple of 16; the paper: 512).
    embedding_dim, base_filters, depth, init_dropout_rate, temperature
        Architecture, see :class:`companion.model.unet.UNet`.
    delta_d, length_scale_sq, zeta, weight_decay
        Objective, see :func:`companion.training.losses.training_objective`.
    augment : bool
        Random rotations, flips and elastic deformations of the crops.
    seed : int
        Seeds weights, data order, augmentation and dropout masks.
    checkpoint_every, log_every : int
        Write ``last.pt`` / a ``log.jsonl`` line every that many iterations.
    num_workers : int
        DataLoader worker processes preparing crops (0: in the training process).
    amp : bool
        Mixed precision on CUDA (ignored on the CPU).
    channels_last : bool
        Channels-last memory format for the network and its input batches: faster convolutions
        on CUDA (tensor cores) and on the CPU (oneDNN's NHWC kernels; the ``cpu`` preset's step
        ~1.15x faster in float32 on one thread, ``benchmarks/bench_training.py``).
    overlap_weight : float
        Weight of the overlap class in the cross-entropy (1: the paper). Overlap pixels are rare,
        and a model trained with weight 1 on a short budget may predict none, so that the overlap
        heuristic of the post-processing never fires.
    dropout_lr_scale : float
        Multiplies the learning rate of the Concrete Dropout rates' logits (not in the paper, whose
        800 000 iterations give the rates time to settle; 1: one rate for all parameters). With
        Adam a logit moves at most about ``lr`` per step, so within a short budget the rates
        hardly move from their initial value without it.
    cpu_bf16 : bool
        bf16 autocast on the CPU (the objective stays float32). Off by default:
        it pays only on CPUs with native bf16 (AVX512-BF16 / AMX), where it halves the time of a
        step; elsewhere bf16 is emulated and much slower (``results/TRAINING.md``).
    gpu_augment : bool or None
        Make the augmented crops in batches on the training device
        (:class:`companion.data.augment_torch.DeviceCropSource`, the same transforms in torch) instead
        of in DataLoader workers with scipy. ``None``: on when the device is CUDA, where the
        workers cannot keep up with the GPU; the scipy path stays the default on the CPU.
    compile : bool
        Wrap the forward pass and the objective of each step in :func:`torch.compile`
        (:func:`companion.training.step.compiled_objective`). Off by default: the first step compiles
        for a minute or two (on a 2-core CPU 73 s for the ``cpu`` preset, which then stepped
        1.13x faster, ``benchmarks/bench_training.py``), it needs a C++ compiler, and each new
        mask count ``K`` of the scipy path's batches compiles once more until the count is
        marked dynamic. Worth it for runs of thousands of steps.
    time_budget : float or None
        Minutes of wall-clock time for the run (:mod:`companion.training.budget`): the first iterations
        are timed, ``iterations`` is lowered to what fits (it is an upper bound then), so that
        the warm-up and cosine schedule end at the budget, and the run stops in time to write
        its last checkpoint whatever happens. ``None``: run ``iterations``.
    init_from : str or None
        Start from the network weights of another run's checkpoint, or of an exported model
        file (``companion/pretrained/<name>.pt``), instead of a random initialisation (not in
        the paper): e.g. a Concrete Dropout model fine-tuned from a
        baseline checkpoint, its dropout rates starting at ``init_dropout_rate``. Only the
        weights are taken (not the optimiser, not the iteration count); the architectures
        must agree apart from the dropout layers.
    device : str or None
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when present.
    standardize : bool
        Standardise each input channel inside the network with the mean and standard deviation
        of the training images (not in the paper, whose inputs are only scaled to [0, 1], where
        the fluorescence channel varies little). The statistics are computed once by
        :func:`companion.training.train.train` and stored as ``input_mean`` / ``input_std`` (part of the
        model's architecture keywords).
    input_mean, input_std : list of float or None
        Set by :func:`companion.training.train.train` when ``standardize`` is on (or given to fix them).
    lr_schedule : {"constant", "cosine"}
        ``"cosine"``: linear warm-up over ``lr_warmup`` iterations, then cosine decay to 0 at
        ``iterations`` (not in the paper, which names no schedule). The rate is a function of
        the iteration alone, so resuming needs no scheduler state.
    lr_warmup : int
        Warm-up iterations of the cosine schedule.
    snapshot_every : int
        Also keep a copy ``iter_<N>.pt`` of every that many iterations' checkpoint (0: none),
        for learning curves measured afterwards on the validation wells.
    select_every : float
        Seconds of training between scores of the weights on the validation wells given to
        :func:`companion.training.train.train` (:mod:`companion.training.selection`: the best checkpoint is kept
        as ``best.pt``, every score in ``selection.jsonl``; 0: none). Not in the paper.
    downsample : int
        Internal resolution factor of the U-Net (see :class:`companion.model.unet.UNet`; not in the
        paper). ``crop_size`` must be a multiple of ``16 * downsample``; the loss is computed at
        the crop's full resolution on the resized outputs.
    """

    model: str = "concrete"
    iterations: int = 800_000
    batch_size: int = 2
    lr: float = 1e-4
    disc_warmup: int = 0
    grad_clip: float = 1.0
    crop_size: int = 512
    embedding_dim: int = 16
    base_filters: int = 19
    depth: int = 5
    init_dropout_rate: float = 0.1
    temperature: float = 0.1
    delta_d: float = 4.0
    length_scale_sq: float = 1e-6
    zeta: float = 1e-3
    weight_decay: float = 1e-6
    augment: bool = True
    seed: int = 0
    checkpoint_every: int = 5_000
    log_every: int = 100
    num_workers: int = 2
    amp: bool = True
    channels_last: bool = True
    device: str | None = None
    init_from: str | None = None
    standardize: bool = False
    input_mean: list | None = None
    input_std: list | None = None
    lr_schedule: str = "constant"
    lr_warmup: int = 0
    snapshot_every: int = 0
    downsample: int = 1
    cpu_bf16: bool = False
    dropout_lr_scale: float = 1.0
    overlap_weight: float = 1.0
    gpu_augment: bool | None = None
    compile: bool = False
    time_budget: float | None = None
    select_every: float = 0.0

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        for name in ("lr_warmup", "snapshot_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("give both input_mean and input_std, or neither")
        if self.input_mean is not None:
            self.input_mean = [float(v) for v in self.input_mean]
            self.input_std = [float(v) for v in self.input_std]
        if self.model not in ("concrete", "baseline"):
            raise ValueError(f"model must be 'concrete' or 'baseline', got {self.model!r}")
        for name in (
            "iterations",
            "batch_size",
            "crop_size",
            "embedding_dim",
            "base_filters",
            "depth",
            "checkpoint_every",
            "log_every",
            "downsample",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.crop_size % (16 * self.downsample):
            raise ValueError(
                f"crop_size must be a multiple of {16 * self.downsample} (the U-Net "
                f"pools 4 times after downsample={self.downsample}), got {self.crop_size}"
            )
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not isinstance(self.disc_warmup, int) or self.disc_warmup < 0:
            raise ValueError(f"disc_warmup must be an integer >= 0, got {self.disc_warmup!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip!r}")
        for name in (
            "lr",
            "delta_d",
            "length_scale_sq",
            "zeta",
            "temperature",
            "dropout_lr_scale",
            "overlap_weight",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.init_dropout_rate < 1:
            raise ValueError(f"init_dropout_rate must lie in (0, 1), got {self.init_dropout_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.time_budget is not None and not (
            isinstance(self.time_budget, (int, float))
            and not isinstance(self.time_budget, bool)
            and self.time_budget > 0
        ):
            raise ValueError(
                f"time_budget must be a positive number of minutes or None, got {self.time_budget!r}"
            )
        if isinstance(self.select_every, bool) or not (
            isinstance(self.select_every, (int, float)) and self.select_every >= 0
        ):
            raise ValueError(f"select_every must be a number of seconds >= 0, got {self.select_every!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if self.gpu_augment not in (None, True, False):
            raise ValueError(
                f"gpu_augment must be True, False or None (on with CUDA), got {self.gpu_augment!r}"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named preset (see :data:`PRESETS`) with some fields overridden.

        Examples
        --------
        >>> TrainConfig.preset("quick").iterations
        30
        >>> TrainConfig.preset("cpu", model="baseline").model
        'baseline'
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-safe dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Rebuild a configuration from :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`companion.model.unet.UNet` for this configuration."""
        kwargs = dict(
            in_channels=2,
            embedding_dim=self.embedding_dim,
            n_classes=3,
            base_filters=self.base_filters,
            depth=self.depth,
            dropout="concrete" if self.model == "concrete" else None,
            init_dropout_rate=self.init_dropout_rate,
            temperature=self.temperature,
        )
        if self.input_mean is not None:  # absent otherwise: older checkpoints stay comparable
            kwargs.update(input_mean=list(self.input_mean), input_std=list(self.input_std))
        if self.downsample > 1:
            kwargs.update(downsample=self.downsample)
        return kwargs

    def lr_at(self, iteration: int) -> float:
        """Learning rate of the step that follows ``iteration`` completed steps.

        Examples
        --------
        >>> cfg = TrainConfig(iterations=100, lr=1.0, lr_schedule="cosine", lr_warmup=10)
        >>> [round(cfg.lr_at(t), 3) for t in (0, 9, 10, 55, 99)]
        [0.1, 1.0, 1.0, 0.5, 0.0]
        """
        if self.lr_schedule == "constant":
            return self.lr
        if iteration < self.lr_warmup:
            return self.lr * (iteration + 1) / self.lr_warmup
        span = max(1, self.iterations - self.lr_warmup)
        progress = min(1.0, (iteration - self.lr_warmup) / span)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def channel_statistics(data: Sequence[Sample]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over all pixels of ``data``'s images.

    Examples
    --------
    >>> from companion.data.synthetic import make_dataset
    >>> mean, std = channel_statistics(make_dataset(2, shape=(64, 64)))
    >>> len(mean), all(s > 0 for s in std)
    (2, True)
    """
    sums = np.zeros(2, np.float64)
    squares = np.zeros(2, np.float64)
    count = 0
    for sample in data:
        image = np.asarray(sample.image, np.float64).reshape(len(sample.image), -1)
        if len(image) != len(sums):
            sums, squares = np.zeros(len(image)), np.zeros(len(image))
        sums += image.sum(axis=1)
        squares += (image**2).sum(axis=1)
        count += image.shape[1]
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    if not (std > 0).all():
        raise ValueError(
            f"cannot standardise: a channel of the training images is constant (sd {std.tolist()})"
        )
    return mean.tolist(), std.tolist()


#: Named presets (overrides of the paper defaults):
#:
#: * ``paper``: the paper's set-up, 800 000 iterations of 512 x 512 crops.
#: * ``colab``: what a free Colab T4 should finish in about an hour (an estimate from the FLOP
#:   count, not a measurement); checkpoints every 1000 iterations, so a disconnect costs minutes:
#:   rerun with ``--resume``.
#: * ``cpu``: what one CPU core finishes in about 1.5 hours: 512 x 512 crops with the network at
#:   half resolution (``downsample=2``), batch 1, the full-size U-Net, lr 1e-3 with warm-up and
#:   cosine decay, standardised inputs; chosen on the validation wells.
#: * ``quick``: seconds; a tiny network on 64 x 64 crops to check the pipeline (CI, the book),
#:   with a 10x larger learning rate so that the loss visibly moves within 30 iterations.
#:
#: How ``colab`` and ``cpu`` were sized: ``results/TRAINING.md``, "Measurements behind the
#: TrainConfig options".
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "colab": dict(iterations=15_000, batch_size=2, checkpoint_every=1_000, log_every=100, num_workers=2),
    "cpu": dict(
        iterations=5_000,
        crop_size=512,
        downsample=2,
        batch_size=1,
        checkpoint_every=500,
        log_every=50,
        num_workers=1,
        lr=1e-3,
        disc_warmup=300,
        standardize=True,
        lr_schedule="cosine",
        lr_warmup=200,
        snapshot_every=1_000,
    ),
    "quick": dict(
        iterations=30,
        crop_size=64,
        batch_size=2,
        lr=1e-3,
        base_filters=4,
        depth=5,
        embedding_dim=8,
        checkpoint_every=10,
        log_every=2,
        num_workers=0,
    ),
}
