"""The training batches: augmented crops in an order that is a function of (seed, iteration).

Iteration ``t`` of rank ``r`` (of ``W``) reads the crops with the global indices
``(t * W + r) * B + j``, ``j < B``, and the dataset derives each crop from ``(seed, index)``
alone. Resuming at iteration ``t`` therefore reads exactly the crops an uninterrupted run would
have read, without replaying the loader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from companion.data.augment import WormCropDataset, collate_crops
from companion.data.augment_torch import DeviceCropLoader, DeviceCropSource

from .config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from companion.data.bbbc010 import Sample

__all__ = ["make_loader", "to_device", "uses_gpu_augment", "single_threaded_numpy_blas"]


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


def make_loader(
    data: Sequence[Sample],
    config: TrainConfig,
    *,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    device: torch.device | str | None = None,
) -> Iterable[dict]:
    """The training batches of iterations ``start .. config.iterations - 1`` for one rank.

    Crops come from :class:`companion.data.augment.WormCropDataset` in a DataLoader, or, when
    :func:`uses_gpu_augment`, from :class:`companion.data.augment_torch.DeviceCropLoader` on
    ``device`` (default the CPU), batches already there. Iteration ``t`` of rank ``r`` reads the
    crops ``(t * world_size + r) * batch_size + j`` (see the module docs).

    Examples
    --------
    >>> from companion.data.synthetic import make_dataset
    >>> cfg = TrainConfig.preset("quick", iterations=3)
    >>> loader = make_loader(make_dataset(2, shape=(96, 96)), cfg, start=1)
    >>> [tuple(b["image"].shape) for b in loader]
    [(2, 2, 64, 64), (2, 2, 64, 64)]
    """
    largest = max((min(s.image.shape[1:]) for s in data), default=0)
    if config.crop_size > largest:  # every crop would be mostly padding
        raise ValueError(
            f"crop_size {config.crop_size} exceeds every training image (the largest is "
            f"{largest} pixels on its shorter side): choose --crop-size {16 * (largest // 16)} or less"
        )
    if uses_gpu_augment(config, device):
        source = DeviceCropSource(
            list(data),
            crop_size=config.crop_size,
            device=device or "cpu",
            rotate=config.augment,
            flip=config.augment,
            elastic=config.augment,
        )
        return DeviceCropLoader(
            source,
            start=start,
            stop=config.iterations,
            batch_size=config.batch_size,
            seed=config.seed,
            rank=rank,
            world_size=world_size,
        )
    n_crops = config.iterations * config.batch_size * world_size
    dataset = WormCropDataset(
        list(data), crop_size=config.crop_size, length=n_crops, seed=config.seed, augment=config.augment
    )
    sampler = _IterationSampler(start, config.iterations, config.batch_size, rank, world_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=collate_crops,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        # an own generator: creating the loader iterator must not consume the global torch RNG
        generator=torch.Generator().manual_seed(config.seed),
        persistent_workers=False,
        prefetch_factor=4 if config.num_workers else None,
        worker_init_fn=_init_worker if config.num_workers else None,
    )


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """A :func:`~companion.data.augment.collate_crops` batch moved to ``device`` (non-blocking)."""
    image = batch["image"].to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return dict(
        image=image,
        target=batch["target"].to(device, non_blocking=True),
        instances=batch["instances"].to(device, non_blocking=True),
        valid=batch["valid"].to(device, non_blocking=True),
    )
