"""Distributed plumbing of a training run: where this process stands, and joining the group.

The entry point :func:`companion.training.train.train` runs under ``torchrun --nproc_per_node N`` with
:class:`~torch.nn.parallel.DistributedDataParallel` (NCCL on GPUs, gloo on the CPU); a plain
``python`` process is a group of one.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from torch import nn

__all__ = ["DistInfo", "init_distributed", "unwrap"]


class DistInfo(NamedTuple):
    """Where this process stands in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
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


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a :class:`~torch.nn.parallel.DistributedDataParallel` (or ``model``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
