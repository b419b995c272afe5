"""Training: configuration presets, the training loop, checkpoints and exact resuming.

The loop trains the U-Net of :mod:`companion.model` with the objective of
:mod:`companion.losses` on augmented crops from :class:`companion.augment.WormCropDataset`.

Design decisions
----------------
* **Data order is a function of (seed, iteration).** Iteration ``t`` of rank ``r`` (of ``W``)
  reads the crops with the global indices ``(t * W + r) * B + j``, ``j < B``, and the dataset
  derives each crop from ``(seed, index)`` alone. Resuming at iteration ``t`` therefore reads
  exactly the crops an uninterrupted run would have read, without replaying the loader.
* **Checkpoints hold only tensors and primitive containers** (the configuration as a dict, RNG
  states as tensors and lists), so :func:`load_model` reads them with
  ``torch.load(..., weights_only=True)`` and never executes a pickle.
* **Exact resuming on the CPU.** A checkpoint holds the model, the optimiser, the gradient
  scaler, the Python / NumPy / torch (and CUDA) random states and the iteration. On the CPU with
  a fixed seed, a run that is killed and resumed ends with weights bit-identical to an
  uninterrupted run (GPU kernels are not bit-deterministic, so on CUDA it is "statistically" the
  same run).
* **Mixed precision on CUDA only**: bf16 autocast where the GPU supports it natively
  (Ampere and newer), fp16 autocast with a :class:`torch.amp.GradScaler` otherwise (e.g. a
  Colab T4). The loss itself is computed in float32.
* **Multi-GPU**: the same entry point runs under ``torchrun --nproc_per_node N`` with
  :class:`~torch.nn.parallel.DistributedDataParallel` (NCCL on GPUs, gloo on the CPU). Every
  rank reads its own shard of each global batch and draws its own dropout masks; only rank 0
  logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
import socket
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from ._io import atomic_write, atomic_write_bytes, tensors_sha256

if TYPE_CHECKING:  # pragma: no cover
    from companion.data import Sample
    from companion.losses import ObjectiveTerms

__all__ = [
    "PRESETS",
    "TrainConfig",
    "DistInfo",
    "train",
    "train_step",
    "make_loader",
    "uses_gpu_augment",
    "single_threaded_numpy_blas",
    "to_device",
    "build_model",
    "channel_statistics",
    "load_model",
    "read_checkpoint",
    "read_log",
    "RunFolderBusyError",
    "check_map_location",
    "CHECKPOINT_FORMAT",
]

#: Marker stored in every checkpoint, checked by :func:`read_checkpoint`.
CHECKPOINT_FORMAT = "companion-checkpoint"
#: Version of the checkpoint layout.
CHECKPOINT_VERSION = 1
#: Names of the loss terms logged to ``log.jsonl`` (the fields of ``ObjectiveTerms``).
TERM_NAMES = ("total", "var", "dist", "reg", "ce", "model_reg")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
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
        :func:`companion.model.concrete_regularizer`); ``"baseline"``: no dropout, L2 weight
        decay ``weight_decay``.
    iterations : int
        Optimiser steps (the paper: 800 000).
    batch_size : int
        Crops per iteration *per process* (a run on ``N`` GPUs uses ``N * batch_size``).
    lr : float
        Adam learning rate.
    disc_warmup : int
        Iterations at the start during which the discriminative term is switched off (cross-entropy
        and model regulariser only). Not in the paper (0 there, the default). Short CPU probes on
        256 x 256 crops: with the full objective from the start, the 3-class head still gave worm
        pixels p(foreground) = 0.03 after 200 iterations (cross-entropy alone: 0.82); after 150
        warm-up iterations and 250 with the full objective it gave 0.69.
    grad_clip : float
        Largest global gradient norm (``0`` disables clipping). Not in the paper: it keeps a
        single bad crop from blowing up the embedding early in training, where an unclipped run of
        the ``cpu`` preset collapsed every embedding onto one point within 200 iterations (the
        squared-distance hinge has no gradient there).
    crop_size : int
        Side of the square training crops (multiple of 16; the paper: 512).
    embedding_dim, base_filters, depth, init_dropout_rate, temperature
        Architecture, see :class:`companion.model.UNet`.
    delta_d, length_scale_sq, zeta, weight_decay
        Objective, see :func:`companion.losses.training_objective`.
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
        Channels-last memory format on CUDA (faster convolutions with tensor cores), and on the
        CPU together with ``cpu_bf16``.
    dropout_lr_scale : float
        Multiplies the learning rate of the Concrete Dropout rates' logits (not in the paper, whose
        800 000 iterations give the rates time to settle; 1: one rate for all parameters). With
        Adam a logit moves at most about ``lr`` per step, so in a CPU budget of ~10 000 steps at
        lr 3e-4 an initial rate of 0.05 can hardly move (measured: 0.050 -> 0.048 in 800 steps).
    cpu_bf16 : bool
        bf16 autocast + channels-last on the CPU (the objective stays float32). Off by default:
        it pays only on CPUs with native bf16 (AVX512-BF16 / AMX). One training step of the
        ``cpu`` preset, one thread, on an AMD EPYC with AVX512-BF16: 0.61 s fp32, 0.31 s bf16 +
        channels-last; on an AVX2-only CPU bf16 is emulated and ~10x slower
        (``results/TRAINING.md``).
    gpu_augment : bool or None
        Make the augmented crops in batches on the training device
        (:class:`companion.augment_torch.DeviceCropSource`, the same transforms in torch) instead
        of in DataLoader workers with scipy. ``None``: on when the device is CUDA, where the
        workers cannot keep up with the GPU; the scipy path stays the default on the CPU.
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
        of the training images (not in the paper, whose inputs are only scaled to [0, 1]: there
        channel 0 has sd 0.022). The statistics are computed once by :func:`train` and stored as
        ``input_mean`` / ``input_std`` (part of the model's architecture keywords).
    input_mean, input_std : list of float or None
        Set by :func:`train` when ``standardize`` is on (or given to fix them).
    lr_schedule : {"constant", "cosine"}
        ``"cosine"``: linear warm-up over ``lr_warmup`` iterations, then cosine decay to 0 at
        ``iterations`` (not in the paper, which names no schedule). The rate is a function of
        the iteration alone, so resuming needs no scheduler state.
    lr_warmup : int
        Warm-up iterations of the cosine schedule.
    snapshot_every : int
        Also keep a copy ``iter_<N>.pt`` of every that many iterations' checkpoint (0: none),
        for learning curves measured afterwards on the validation wells.
    downsample : int
        Internal resolution factor of the U-Net (see :class:`companion.model.UNet`; not in the
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
    gpu_augment: bool | None = None

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
        for name in ("iterations", "batch_size", "crop_size", "embedding_dim", "base_filters",
                     "depth", "checkpoint_every", "log_every", "downsample"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.crop_size % (16 * self.downsample):
            raise ValueError(f"crop_size must be a multiple of {16 * self.downsample} (the U-Net "
                             f"pools 4 times after downsample={self.downsample}), got {self.crop_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not isinstance(self.disc_warmup, int) or self.disc_warmup < 0:
            raise ValueError(f"disc_warmup must be an integer >= 0, got {self.disc_warmup!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip!r}")
        for name in ("lr", "delta_d", "length_scale_sq", "zeta", "temperature", "dropout_lr_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.init_dropout_rate < 1:
            raise ValueError(f"init_dropout_rate must lie in (0, 1), got {self.init_dropout_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.gpu_augment not in (None, True, False):
            raise ValueError(f"gpu_augment must be True, False or None (on with CUDA), got {self.gpu_augment!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TrainConfig":
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
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Rebuild a configuration from :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`companion.model.UNet` for this configuration."""
        kwargs = dict(in_channels=2, embedding_dim=self.embedding_dim, n_classes=3,
                      base_filters=self.base_filters, depth=self.depth,
                      dropout="concrete" if self.model == "concrete" else None,
                      init_dropout_rate=self.init_dropout_rate, temperature=self.temperature)
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


def channel_statistics(data: Sequence["Sample"]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over all pixels of ``data``'s images.

    Examples
    --------
    >>> from companion.synthetic import make_dataset
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
        squares += (image ** 2).sum(axis=1)
        count += image.shape[1]
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    if not (std > 0).all():
        raise ValueError(f"cannot standardise: a channel of the training images is constant (sd {std.tolist()})")
    return mean.tolist(), std.tolist()


#: Named presets (overrides of the paper defaults). How they were sized:
#:
#: * ``paper``: the paper's set-up, 800 000 iterations of 512 x 512 crops.
#: * ``colab``: what a free Colab T4 finishes in about an hour. Not measured (no GPU here), but
#:   estimated: one iteration (2 crops of 512 x 512, forward + backward) costs 205 GFLOP
#:   (``torch.utils.flop_counter``); assuming the T4 sustains ~1 TFLOP/s on this thin U-Net
#:   under fp16 autocast (~1.5 % of its tensor-core peak, ~18x one core of the CPU measured
#:   below, which runs ~55 GFLOP/s) gives ~5 it/s, i.e. ~18 000 iterations per hour; 15 000
#:   leave a margin. The data pipeline is not the limit: one core augments 27-55 crops of
#:   512 x 512 per second (``benchmarks/bench_training.py``), so Colab's 2 vCPUs feed > 25 it/s.
#:   Checkpoints every 1000 iterations, so a disconnect costs minutes: rerun with ``--resume``.
#: * ``cpu``: what one CPU core finishes in about 1.5 hours (two such runs side by side on two
#:   cores): 512 x 512 crops with the network at half resolution (``downsample=2``), batch 1, the
#:   full-size U-Net, lr 1e-3 with warm-up and cosine decay, standardised inputs. Measured on the
#:   2-core development machine: 0.95 it/s with one torch thread alone, ~0.9 it/s beside a second
#:   run, so 5 000 iterations take ~1.5 h. Chosen on the validation wells: after 1 000
#:   iterations (17 CPU minutes) it scores val avAP 0.109 / AP50 0.252, where the same recipe on
#:   256 x 256 crops at full resolution scored 0.042 / 0.102 (``results/TRAINING.md``).
#: * ``quick``: seconds; a tiny network on 64 x 64 crops to check the pipeline (CI, the book),
#:   with a 10x larger learning rate so that the loss visibly moves within 30 iterations.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "colab": dict(iterations=15_000, batch_size=2, checkpoint_every=1_000, log_every=100,
                  num_workers=2),
    "cpu": dict(iterations=5_000, crop_size=512, downsample=2, batch_size=1, checkpoint_every=500,
                log_every=50, num_workers=1, lr=1e-3, disc_warmup=300, standardize=True,
                lr_schedule="cosine", lr_warmup=200, snapshot_every=1_000),
    "quick": dict(iterations=30, crop_size=64, batch_size=2, lr=1e-3, base_filters=4, depth=5,
                  embedding_dim=8, checkpoint_every=10, log_every=2, num_workers=0),
}


# --------------------------------------------------------------------------------------------
# Distributed plumbing
# --------------------------------------------------------------------------------------------
class DistInfo(NamedTuple):
    """Where this process stands in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's environment (or by the caller).

    A process group the caller already initialised is used as is; ``WORLD_SIZE > 1`` in the
    environment (torchrun) initialises one: NCCL for CUDA, gloo for the CPU.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0, False)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but torch.distributed is not available")
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, True)


def _resolve_device(config: TrainConfig) -> torch.device:
    if config.device is not None:
        try:
            device = torch.device(config.device)
        except RuntimeError as err:
            raise ValueError(f"device {config.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rank_seed(seed: int, rank: int) -> int:
    """Seed of the dropout masks of one rank (rank 0 keeps ``seed``)."""
    return seed + 1_000_003 * rank


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type == "cpu":
        return torch.bfloat16 if config.cpu_bf16 else None
    if device.type != "cuda" or not config.amp:
        return None
    try:
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the keyword
        bf16 = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float16


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
class _IterationSampler(torch.utils.data.Sampler):
    """Global crop indices of iterations ``start..stop-1`` for one rank (see module docs)."""

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.stop = start, stop
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        for it in range(self.start, self.stop):
            first = (it * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.batch_size


def single_threaded_numpy_blas() -> contextlib.AbstractContextManager:
    """Limit NumPy's / SciPy's OpenBLAS to one thread (a context manager; applies at once).

    After every call OpenBLAS keeps its threads spinning for a while; the augmentation's small
    matrix products gain nothing from them, but the spinning threads steal the cores torch
    trains on (measured here: a CPU step after a crop was prepared took 350 ms instead of 270 ms
    with two OpenBLAS threads). torch's own thread pool (OpenMP) is not affected.
    """
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    prefixes = {info["prefix"] for info in threadpool_info() if info["internal_api"] == "openblas"}
    if not prefixes:
        return contextlib.nullcontext()
    return threadpool_limits(limits={prefix: 1 for prefix in prefixes})


def _init_worker(worker_id: int) -> None:
    single_threaded_numpy_blas()  # stays in force for the worker's lifetime


def uses_gpu_augment(config: TrainConfig, device: torch.device | str | None) -> bool:
    """Whether crops are made on the training device (``config.gpu_augment``; ``None``: on CUDA).

    >>> uses_gpu_augment(TrainConfig(), "cpu"), uses_gpu_augment(TrainConfig(gpu_augment=True), "cpu")
    (False, True)
    """
    if config.gpu_augment is not None:
        return config.gpu_augment
    return device is not None and torch.device(device).type == "cuda"


def make_loader(data: Sequence["Sample"], config: TrainConfig, *, start: int = 0, rank: int = 0,
                world_size: int = 1, pin_memory: bool = False,
                device: torch.device | str | None = None) -> Iterable[dict]:
    """The training batches of iterations ``start .. config.iterations - 1`` for one rank.

    Crops come from :class:`companion.augment.WormCropDataset` in a DataLoader, or, when
    :func:`uses_gpu_augment`, from :class:`companion.augment_torch.DeviceCropLoader` on
    ``device`` (default the CPU), batches already there. Iteration ``t`` of rank ``r`` reads the
    crops ``(t * world_size + r) * batch_size + j`` (see the module docs).

    Examples
    --------
    >>> from companion.synthetic import make_dataset
    >>> cfg = TrainConfig.preset("quick", iterations=3)
    >>> loader = make_loader(make_dataset(2, shape=(96, 96)), cfg, start=1)
    >>> [tuple(b["image"].shape) for b in loader]
    [(2, 2, 64, 64), (2, 2, 64, 64)]
    """
    if uses_gpu_augment(config, device):
        from companion.augment_torch import DeviceCropLoader, DeviceCropSource

        source = DeviceCropSource(list(data), crop_size=config.crop_size, device=device or "cpu",
                                  rotate=config.augment, flip=config.augment, elastic=config.augment)
        return DeviceCropLoader(source, start=start, stop=config.iterations, batch_size=config.batch_size,
                                seed=config.seed, rank=rank, world_size=world_size)
    from companion.augment import WormCropDataset, collate_crops

    n_crops = config.iterations * config.batch_size * world_size
    dataset = WormCropDataset(list(data), crop_size=config.crop_size, length=n_crops,
                              seed=config.seed, augment=config.augment)
    sampler = _IterationSampler(start, config.iterations, config.batch_size, rank, world_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=collate_crops,
        num_workers=config.num_workers, pin_memory=pin_memory,
        # an own generator: creating the loader iterator must not consume the global torch RNG
        generator=torch.Generator().manual_seed(config.seed),
        persistent_workers=False, prefetch_factor=4 if config.num_workers else None,
        worker_init_fn=_init_worker if config.num_workers else None)


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """A :func:`~companion.augment.collate_crops` batch moved to ``device`` (non-blocking)."""
    image = batch["image"].to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return dict(image=image, target=batch["target"].to(device, non_blocking=True),
                instances=[m.to(device, non_blocking=True) for m in batch["instances"]])


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_model(config: TrainConfig) -> nn.Module:
    """The U-Net of a configuration (fresh weights from the global torch RNG)."""
    from companion.model import UNet

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
    return torch.optim.Adam([dict(params=others, lr_scale=1.0),
                             dict(params=rates, lr=config.lr * scale, lr_scale=scale)], lr=config.lr)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, *,
               n_train: int, config: TrainConfig,
               scaler: "torch.amp.GradScaler | None" = None,
               amp_dtype: torch.dtype | None = None,
               disc_weight: float = 1.0) -> "ObjectiveTerms":
    """One optimiser step on one batch; returns the (detached) terms of the objective.

    ``model`` may be wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, which then
    averages the gradients over the ranks. The forward pass runs under autocast when
    ``amp_dtype`` is given; the objective is always computed in float32.

    Examples
    --------
    >>> from companion.synthetic import make_dataset
    >>> from companion.augment import WormCropDataset, collate_crops
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
    from companion.losses import ObjectiveTerms, training_objective
    from companion.model import UNetOutput

    model.train()
    optimizer.zero_grad(set_to_none=True)
    device_type = batch["image"].device.type
    with torch.autocast(device_type=device_type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        output = model(batch["image"])
    output = UNetOutput(output.embedding.float(), output.logits.float())
    terms = training_objective(_unwrap(model), output, batch, n_train=n_train,
                               weight_decay=config.weight_decay,
                               length_scale_sq=config.length_scale_sq, zeta=config.zeta,
                               delta_d=config.delta_d, disc_weight=disc_weight)
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


# --------------------------------------------------------------------------------------------
# RNG states and checkpoints
# --------------------------------------------------------------------------------------------
def _capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [int(version), [int(v) for v in internal], gauss],
        "numpy": {"bit_generator": str(np_state["bit_generator"]),
                  "key": torch.as_tensor(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def _restore_rng(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": np_state["bit_generator"],
                         "state": {"key": np_state["key"].numpy().astype(np.uint32),
                                   "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_map_location(map_location: str | torch.device) -> None:
    """Refuse a ``map_location`` this machine cannot load onto, before any file is read.

    Without it ``torch.load`` fails on a CUDA location of a machine without CUDA with an error
    that reads as if the file were broken.

    Examples
    --------
    >>> check_map_location("cpu")
    >>> check_map_location("banana")
    Traceback (most recent call last):
    ...
    ValueError: map_location 'banana' is not a torch device (cpu, cuda, cuda:1, ...)
    """
    if not isinstance(map_location, (str, torch.device)):
        return  # a dict or a callable: torch's own remapping, passed through
    try:
        device = torch.device(map_location)
    except RuntimeError as err:
        raise ValueError(f"map_location {map_location!r} is not a torch device (cpu, cuda, cuda:1, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"map_location {str(map_location)!r} asks for a GPU, but CUDA is not available "
                         f"on this machine: use 'cpu'")


def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a training checkpoint without executing any pickle.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is not a checkpoint written by :func:`train` (not a safe torch file, or a
        file without the checkpoint's keys), or its weights no longer match the sha256
        recorded at save time.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    check_map_location(map_location)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError,
            ValueError, TypeError, KeyError, IndexError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a companion checkpoint that can be loaded safely "
                         f"(torch.load(weights_only=True) refused it: {first_line})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        what = f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) \
            else f"a {type(ckpt).__name__}"
        raise ValueError(f"{path} is not a companion training checkpoint: it holds {what} "
                         f"without format={CHECKPOINT_FORMAT!r}")
    missing = {"version", "config", "model_kwargs", "model", "iteration"} - set(ckpt)
    if missing:
        raise ValueError(f"checkpoint {path} lacks the keys {sorted(missing)}")
    if ckpt["version"] > CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has layout version {ckpt['version']}, newer than "
                         f"this package's {CHECKPOINT_VERSION}: update companion")
    recorded = ckpt.get("model_sha256")  # absent in checkpoints written before it was recorded
    if recorded is not None and tensors_sha256(ckpt["model"]) != recorded:
        raise ValueError(f"checkpoint {path} is corrupted: its weights do not match the sha256 "
                         f"recorded when it was saved")
    return ckpt


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained U-Net of a checkpoint, in eval mode.

    The architecture is rebuilt from the keyword arguments stored in the checkpoint; weights
    that do not fit that architecture raise ``ValueError`` naming the file.

    Examples
    --------
    >>> import tempfile, os
    >>> from companion.synthetic import make_dataset
    >>> out = tempfile.mkdtemp()
    >>> cfg = TrainConfig.preset("quick", iterations=2, checkpoint_every=2, log_every=1)
    >>> path = train(cfg, make_dataset(2, seed=0, shape=(96, 96)), out, progress=False)
    >>> model = load_model(path)
    >>> model.training
    False
    """
    from companion.model import UNet

    ckpt = read_checkpoint(path, map_location=map_location)
    try:
        model = UNet(**ckpt["model_kwargs"])
    except TypeError as err:
        raise ValueError(f"checkpoint {path}: model_kwargs {ckpt['model_kwargs']} do not "
                         f"describe a companion UNet ({err})") from err
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise ValueError(f"checkpoint {path}: its weights do not fit the architecture "
                         f"{ckpt['model_kwargs']}: {detail}") from err
    return model.eval()


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` written by :func:`train` (a file or its run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: "torch.amp.GradScaler", config: TrainConfig, iteration: int,
                      rng_per_rank: list[dict], dist_info: DistInfo) -> dict:
    import companion

    weights = _unwrap(model).state_dict()
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "package_version": companion.__version__,
        "torch_version": str(torch.__version__),
        "iteration": iteration,
        "config": config.to_dict(),
        "model_kwargs": config.model_kwargs(),
        "model": weights,
        "model_sha256": tensors_sha256(weights),  # verified by read_checkpoint
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_per_rank[0],
        "rng_per_rank": rng_per_rank,
        "data_position": {"iteration": iteration, "world_size": dist_info.world_size,
                          "crops_per_iteration": config.batch_size * dist_info.world_size,
                          "next_crop_index": iteration * config.batch_size * dist_info.world_size},
    }


def _gather_rng(dist_info: DistInfo) -> list[dict]:
    state = _capture_rng()
    if dist_info.world_size == 1:
        return [state]
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(gathered, state)
    return gathered


#: ``format`` of the weight files that ``scripts/export_pretrained.py`` writes.
EXPORTED_FORMAT = "companion-pretrained"


def read_exported(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """``(state_dict, model_kwargs)`` of an exported model file, its weights as float32.

    Raises ``ValueError`` naming the file when it is not an exported companion model (also a
    truncated or otherwise unreadable one), and one saying so when ``map_location`` is a GPU
    but CUDA is not available.
    """
    import pickle

    check_map_location(map_location)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError,
            KeyError, IndexError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable exported companion model (truncated or corrupt? "
                         f"torch.load(weights_only=True) refused it: {first_line})") from err
    if not isinstance(payload, dict) or payload.get("format") != EXPORTED_FORMAT:
        raise ValueError(f"{path} is not an exported companion model (format {EXPORTED_FORMAT!r} missing)")
    weights, kwargs = payload.get("state_dict"), payload.get("model_kwargs")
    if not isinstance(weights, dict) or not isinstance(kwargs, dict) or \
            not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{path} is not an exported companion model: it lacks a state_dict of "
                         f"tensors or its model_kwargs")
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    return state, kwargs


def init_source(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, model_kwargs)`` of a training checkpoint or of an exported model file.

    An exported ``.pt`` (e.g. ``companion/pretrained/baseline.pt``, float16) lets a fresh
    machine continue from the committed weights with ``--init-from``; its weights come back
    as float32.
    """
    try:
        ckpt = read_checkpoint(path, map_location="cpu")
        return ckpt["model"], ckpt["model_kwargs"]
    except ValueError as err:
        try:
            return read_exported(path)
        except Exception:  # neither kind: report why it is not a checkpoint
            raise err from None


def init_weights(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Copy the network weights of a training checkpoint or an exported model into ``model``.

    See ``init_from``. Raises ``ValueError`` (naming the file) when a weight of the source has
    no place in ``model``, has another shape, or when ``model`` lacks anything but dropout rates.
    """
    target = model.state_dict()
    source, _ = init_source(checkpoint)
    unexpected = sorted(set(source) - set(target))
    missing = sorted(k for k in set(target) - set(source) if not k.endswith("p_logit"))
    wrong = sorted(k for k in set(source) & set(target) if source[k].shape != target[k].shape)
    if unexpected or missing or wrong:
        raise ValueError(f"{checkpoint}: weights do not fit this model (unexpected {unexpected[:3]}, "
                         f"missing {missing[:3]}, other shape {wrong[:3]}); init_from needs the same "
                         f"architecture apart from the dropout layers")
    model.load_state_dict(source, strict=False)


def _check_resumable(ckpt: dict, config: TrainConfig, path: Path) -> None:
    saved = TrainConfig.from_dict(ckpt["config"])
    if saved.model_kwargs() != config.model_kwargs():
        raise ValueError(f"cannot resume from {path}: it was trained with the architecture "
                         f"{saved.model_kwargs()}, the configuration asks for "
                         f"{config.model_kwargs()}")
    changed = [f.name for f in fields(TrainConfig)
               if f.name not in ("iterations", "checkpoint_every", "log_every", "num_workers",
                                 "snapshot_every",
                                 "device", "amp", "channels_last", "cpu_bf16")
               and getattr(saved, f.name) != getattr(config, f.name)]
    if changed:
        warnings.warn(f"resuming {path} with changed settings {changed}: the run is no longer "
                      f"identical to an uninterrupted one", stacklevel=3)


def _trim_log(log_path: Path, iteration: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the run repeats them)."""
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text().splitlines()
            if line.strip() and json.loads(line)["iteration"] <= iteration]
    atomic_write_bytes(log_path, "".join(line + "\n" for line in kept).encode())


class RunFolderBusyError(OSError):
    """Another training process holds the run folder's lock (``OUT/.lock``)."""


#: The lock file of a run folder (see :func:`lock_run_folder`).
LOCK_NAME = ".lock"


@contextlib.contextmanager
def lock_run_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``out_dir`` (created if needed) while the block runs.

    The lock is an :func:`fcntl.flock` on ``out_dir/.lock``, which records the holder's pid and
    host. The operating system drops it when the holder exits, also when it crashes or is
    killed, so a stale lock file never blocks a later run. Where the file system cannot lock
    (some network or FUSE mounts, Windows) the run goes on with a warning.

    Raises
    ------
    RunFolderBusyError
        Another process holds the lock (names the folder and, when recorded, its pid).

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with lock_run_folder(folder):
    ...     with lock_run_folder(folder):  # doctest: +ELLIPSIS
    ...         pass
    Traceback (most recent call last):
    ...
    companion.train.RunFolderBusyError: ... is in use by another training process (pid ...
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        warnings.warn(f"cannot lock {out_dir} on this platform: make sure no other training writes "
                      f"there", stacklevel=4)
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = os.read(fd, 200).decode(errors="replace").split()
                who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") \
                    if holder else "pid not recorded yet"
                raise RunFolderBusyError(
                    f"{out_dir} is in use by another training process ({who}; lock file "
                    f"{path}): wait for it to finish or stop it, or choose another folder") from None
            warnings.warn(f"cannot lock {out_dir} ({err.strerror or err}): make sure no other "
                          f"training writes there", stacklevel=4)
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting run)


#: Files of a run in its folder, besides the ``iter_<N>.pt`` snapshots.
_RUN_FILES = ("last.pt", "final.pt", "log.jsonl")


def _existing_run_files(out_dir: Path) -> list[Path]:
    found = [out_dir / name for name in _RUN_FILES if (out_dir / name).exists()]
    return found + sorted(out_dir.glob("iter_*.pt"))


def _prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, clear) an earlier run's files; drop stale temporary files.

    Called on rank 0 while it holds the folder's lock, so no other run is writing there.
    """
    # a writer killed between filling its temporary file and the rename (see companion._io)
    stale = sorted(p for pattern in (".last.pt.*.tmp", ".final.pt.*.tmp", ".log.jsonl.*.tmp",
                                     ".iter_*.pt.*.tmp") for p in out_dir.glob(pattern))
    for path in stale:
        path.unlink()
    if stale:
        warnings.warn(f"removed {len(stale)} unfinished temporary file(s) of an interrupted run "
                      f"from {out_dir}: {', '.join(p.name for p in stale)}", stacklevel=3)
    if resume:
        return
    found = _existing_run_files(out_dir)
    if found and overwrite:
        for path in found:
            path.unlink()
        warnings.warn(f"overwrite: removed the earlier run's {', '.join(p.name for p in found)} "
                      f"from {out_dir}", stacklevel=3)
    elif (out_dir / "last.pt").exists():
        raise FileExistsError(f"{out_dir} already holds a checkpoint (last.pt); pass resume=True "
                              f"(--resume) to continue it, overwrite=True (--overwrite) to replace "
                              f"it, or choose another folder")
    elif found:
        raise FileExistsError(f"{out_dir} already holds files of another run "
                              f"({', '.join(p.name for p in found)}) but no last.pt to resume from; "
                              f"pass overwrite=True (--overwrite) to replace them, or choose "
                              f"another folder")


def train(config: TrainConfig, data: Sequence["Sample"], out_dir: str | os.PathLike, *,
          resume: bool = False, overwrite: bool = False, progress: bool = True,
          on_checkpoint: Callable[[int, Path], None] | None = None) -> Path:
    """Train a U-Net; returns the path of the final checkpoint ``out_dir/final.pt``.

    Parameters
    ----------
    config : TrainConfig
        The run (e.g. ``TrainConfig.preset("cpu")``).
    data : sequence of Sample
        Training images with their instance masks; ``n_train = len(data)`` scales the
        Concrete Dropout regulariser.
    out_dir : path
        Receives ``last.pt`` (every ``checkpoint_every`` iterations), ``final.pt`` and
        ``log.jsonl`` (one JSON record every ``log_every`` iterations: the mean of every loss
        term over those iterations, every layer's dropout rate, iterations/s).
    resume : bool
        Continue from ``out_dir/last.pt`` (starts afresh, with a warning, if there is none).
        Without it an ``out_dir`` that already holds a run's files (``last.pt``, ``final.pt``,
        ``log.jsonl``, ``iter_<N>.pt``) is refused with ``FileExistsError``.
    overwrite : bool
        Start afresh in an ``out_dir`` that holds an earlier run: its files are removed first
        (with a warning naming them). Not together with ``resume``.
    progress : bool
        Show a tqdm progress bar (loss and mean dropout rate).
    on_checkpoint : callable, optional
        Called as ``on_checkpoint(iteration, path)`` on rank 0 after each checkpoint (an
        exception it raises stops the run, which ``resume=True`` then continues).

    Notes
    -----
    Seeds the global Python, NumPy and torch random generators from ``config.seed``. Under
    ``torchrun`` (``WORLD_SIZE > 1``) it joins the process group, wraps the model in
    :class:`~torch.nn.parallel.DistributedDataParallel` and leaves the group at the end.

    The main process holds :func:`lock_run_folder` on ``out_dir`` for the whole run: a second
    training into the same folder raises :class:`RunFolderBusyError` naming the holder's pid.

    Examples
    --------
    >>> import tempfile
    >>> from companion.synthetic import make_dataset
    >>> cfg = TrainConfig.preset("quick", iterations=4, checkpoint_every=2, log_every=2)
    >>> out = tempfile.mkdtemp()
    >>> final = train(cfg, make_dataset(2, seed=0, shape=(96, 96)), out, progress=False)
    >>> final.name, [r["iteration"] for r in read_log(out)]
    ('final.pt', [2, 4])
    """
    if len(data) == 0:
        raise ValueError("train() needs at least one training sample, got an empty sequence")
    if resume and overwrite:
        raise ValueError("pass resume=True (continue the run) or overwrite=True (replace it), not both")
    out_dir = Path(out_dir)
    if config.standardize and config.input_mean is None:
        saved = out_dir / "last.pt"
        if resume and saved.exists():  # the statistics the run started with
            stored = read_checkpoint(saved)["config"]
            mean, std = stored.get("input_mean"), stored.get("input_std")
        else:
            source = init_source(config.init_from)[1] if config.init_from else {}
            mean, std = source.get("input_mean"), source.get("input_std")
            if mean is None:
                mean, std = channel_statistics(data)
        config = TrainConfig.from_dict({**config.to_dict(), "input_mean": mean, "input_std": std})
    device = _resolve_device(config)
    dist_info = _init_distributed(device.type)
    try:
        with lock_run_folder(out_dir) if dist_info.is_main else contextlib.nullcontext():
            if dist_info.is_main:
                _prepare_run_folder(out_dir, resume, overwrite)
            return _train(config, data, out_dir, device, dist_info, resume, progress, on_checkpoint)
    finally:
        if dist_info.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config: TrainConfig, data: Sequence["Sample"], out_dir: Path, device: torch.device,
           dist_info: DistInfo, resume: bool, progress: bool,
           on_checkpoint: Callable[[int, Path], None] | None) -> Path:
    from tqdm.auto import tqdm

    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    last_path, final_path, log_path = out_dir / "last.pt", out_dir / "final.pt", out_dir / "log.jsonl"

    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)  # same initial weights on every rank
    model = build_model(config).to(device)
    if config.init_from is not None and not (resume and last_path.exists()):
        init_weights(model, config.init_from)
    channels_last = config.channels_last and (device.type == "cuda" or config.cpu_bf16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = make_optimizer(model, config)
    amp_dtype = _amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    torch.manual_seed(_rank_seed(config.seed, dist_info.rank))

    start = 0
    if resume and last_path.exists():
        # on the CPU: the random states must stay CPU tensors; load_state_dict moves the rest
        ckpt = read_checkpoint(last_path, map_location="cpu")
        _check_resumable(ckpt, config, last_path)
        _unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["iteration"])
        per_rank = ckpt.get("rng_per_rank", [ckpt["rng"]])
        if len(per_rank) == dist_info.world_size:
            _restore_rng(per_rank[dist_info.rank])
        else:
            warnings.warn(f"{last_path} was written by {len(per_rank)} process(es), this run has "
                          f"{dist_info.world_size}: random states are re-seeded", stacklevel=3)
            torch.manual_seed(_rank_seed(config.seed, dist_info.rank) + start)
        if dist_info.is_main:
            _trim_log(log_path, start)
            if start >= config.iterations:
                warnings.warn(f"{last_path} is already at iteration {start} >= iterations="
                              f"{config.iterations}: nothing to train (raise --iterations to "
                              f"continue); final.pt is that checkpoint", stacklevel=3)
    elif resume and dist_info.is_main:
        dropped = " (dropping the records of its log.jsonl, which no checkpoint kept)" \
            if log_path.exists() else ""
        _trim_log(log_path, 0)  # the run repeats those iterations
        warnings.warn(f"resume requested but {last_path} does not exist: starting afresh{dropped}",
                      stacklevel=3)

    if dist_info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    net = _unwrap(model)
    loader = make_loader(data, config, start=start, rank=dist_info.rank,
                         world_size=dist_info.world_size, pin_memory=device.type == "cuda", device=device)
    n_train = len(data)

    bar = tqdm(total=config.iterations, initial=start, disable=not (progress and dist_info.is_main),
               desc=f"training ({config.model}, {device.type})", dynamic_ncols=True)
    with single_threaded_numpy_blas():
        _loop(model, optimizer, scaler, loader, config, device, dist_info, net, bar, start,
              n_train, channels_last, amp_dtype, log_path, last_path, on_checkpoint)
    bar.close()
    if dist_info.is_main:
        read_checkpoint(last_path)  # validates what we publish as final
        atomic_write(final_path, lambda tmp: shutil.copyfile(last_path, tmp))
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return final_path


def _loop(model, optimizer, scaler, loader, config, device, dist_info, net, bar, start, n_train,
          channels_last, amp_dtype, log_path, last_path, on_checkpoint) -> None:
    """The iterations ``start .. config.iterations - 1``: step, log, checkpoint."""
    from companion.model import dropout_rates

    window: list[torch.Tensor] = []
    window_start, window_time = start, time.perf_counter()
    iteration = start
    for batch in loader:
        batch = to_device(batch, device, channels_last)
        if config.lr_schedule != "constant":
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(iteration) * group.get("lr_scale", 1.0)
        terms = train_step(model, optimizer, batch, n_train=n_train, config=config,
                           scaler=scaler, amp_dtype=amp_dtype,
                           disc_weight=0.0 if iteration < config.disc_warmup else 1.0)
        window.append(torch.stack([t.float() for t in terms]))
        total = float(terms.total)
        if not math.isfinite(total):  # stop before a poisoned step reaches a checkpoint
            _stop_non_finite(f"the loss of iteration {iteration + 1} is {total}", optimizer, last_path)
        iteration += 1
        bar.update(1)
        if iteration % config.log_every == 0 or iteration == config.iterations:
            record = _log_record(window, iteration, window_start, window_time, net, dist_info,
                                 dropout_rates, optimizer.param_groups[0]["lr"])
            if dist_info.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                rates = record["dropout_rates"]
                bar.set_postfix(loss=f"{record['total']:.4g}",
                                p=f"{np.mean(rates):.3f}" if rates else "-")
            window, window_start, window_time = [], iteration, time.perf_counter()
        if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
            if not all(torch.isfinite(p).all() for p in net.parameters()):
                _stop_non_finite(f"the weights after iteration {iteration} are not finite",
                                 optimizer, last_path)
            _write_checkpoint(model, optimizer, scaler, config, iteration, dist_info, last_path,
                              on_checkpoint)
            if dist_info.is_main and config.snapshot_every and iteration % config.snapshot_every == 0:
                snapshot = last_path.with_name(f"iter_{iteration:07d}.pt")
                atomic_write(snapshot, lambda tmp: shutil.copyfile(last_path, tmp))


def _stop_non_finite(what: str, optimizer: torch.optim.Optimizer, last_path: Path) -> None:
    kept = f"{last_path} keeps the last finite checkpoint" if last_path.exists() else \
        "no checkpoint was written yet"
    raise FloatingPointError(
        f"training stopped: {what} (lr {optimizer.param_groups[0]['lr']:g}); {kept}. Lower "
        f"--lr, keep --grad-clip on, or check the training images for NaN values")


def _log_record(window: list[torch.Tensor], iteration: int, window_start: int, window_time: float,
                net: nn.Module, dist_info: DistInfo, dropout_rates: Callable, lr: float) -> dict:
    means = torch.stack(window).mean(dim=0)
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(means)
        means /= dist_info.world_size
    seconds = time.perf_counter() - window_time
    record: dict[str, Any] = {"iteration": iteration}
    record.update({name: float(v) for name, v in zip(TERM_NAMES, means.tolist())})
    record["dropout_rates"] = [float(p) for p in dropout_rates(net)]
    record["it_per_s"] = (iteration - window_start) / seconds if seconds > 0 else math.nan
    record["lr"] = float(lr)
    record["time"] = time.time()
    return record


def _write_checkpoint(model, optimizer, scaler, config, iteration, dist_info, last_path,
                      on_checkpoint) -> None:
    rng_per_rank = _gather_rng(dist_info)
    if dist_info.is_main:
        state = _checkpoint_state(model, optimizer, scaler, config, iteration, rng_per_rank,
                                  dist_info)
        atomic_write(last_path, lambda tmp: torch.save(state, tmp))
        if on_checkpoint is not None:
            on_checkpoint(iteration, last_path)
