"""The three-class training target: background, single-worm foreground and overlap.

Rumberger et al. (2020) train the U-Net's class head on three classes per pixel:
``BACKGROUND`` (no worm), ``FOREGROUND`` (exactly one worm) and ``OVERLAP`` (two or more
worms). The overlap class lets post-processing assign a pixel to several instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

__all__ = [
    "BACKGROUND",
    "FOREGROUND",
    "OVERLAP",
    "CLASS_NAMES",
    "three_class_target",
    "worm_probability",
    "pad_instances",
]


BACKGROUND, FOREGROUND, OVERLAP = 0, 1, 2
CLASS_NAMES: tuple[str, str, str] = ("background", "foreground", "overlap")

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def three_class_target(instances: ArrayT) -> ArrayT:
    """Per-pixel class from a stack of instance masks.

    Parameters
    ----------
    instances : np.ndarray or torch.Tensor
        Binary masks ``(K, H, W)`` (bool, or 0/1 numbers); ``K`` may be 0.

    Returns
    -------
    np.ndarray or torch.Tensor
        ``int64 (H, W)`` of the same type (and torch device) as the input:
        :data:`BACKGROUND` where no mask is set, :data:`FOREGROUND` where exactly one is and
        :data:`OVERLAP` where two or more are.

    Examples
    --------
    >>> masks = np.zeros((2, 1, 3), bool)
    >>> masks[0, 0, :2] = True
    >>> masks[1, 0, 1:] = True
    >>> three_class_target(masks)
    array([[1, 2, 1]])
    """
    if not isinstance(instances, (np.ndarray, torch.Tensor)):
        raise TypeError(f"instances must be a numpy array or torch tensor, got {type(instances).__name__}")
    if instances.ndim != 3:
        raise ValueError(f"instances must be a (K, H, W) stack of masks, got shape {tuple(instances.shape)}")
    if isinstance(instances, torch.Tensor):
        nonzero = instances if instances.dtype == torch.bool else instances != 0
        return torch.clamp(nonzero.sum(dim=0, dtype=torch.int64), max=OVERLAP)
    nonzero = instances if instances.dtype == bool else instances != 0
    count = nonzero.view(np.uint8).sum(axis=0, dtype=np.int32)  # uint8 view: ~4x faster than count_nonzero
    return np.minimum(count, OVERLAP).astype(np.int64)


def worm_probability(logits: np.ndarray) -> np.ndarray:
    """P(worm) = 1 - P(background) per pixel, from class logits ``(..., 3, H, W)`` (softmax).

    Foreground and overlap together: the probability that a pixel belongs to at least one worm.
    Computed in the logits' floating dtype (float32 stays float32).

    Examples
    --------
    >>> logits = np.zeros((3, 1, 2)); logits[0, 0, 0] = 10.0  # left pixel: surely background
    >>> worm_probability(logits).round(4).tolist()
    [[0.0001, 0.6667]]
    """
    logits = np.asarray(logits)
    if logits.ndim < 3 or logits.shape[-3] != 3:
        raise ValueError(f"expected class logits (..., 3, H, W), got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        logits = logits.astype(np.float64)
    shifted = np.exp(logits - logits.max(axis=-3, keepdims=True))
    return 1.0 - np.take(shifted, BACKGROUND, axis=-3) / shifted.sum(axis=-3)


def pad_instances(
    stacks: Sequence[torch.Tensor | np.ndarray], k_max: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(B, K, H, W)`` bool tensor from ``B`` mask stacks ``(K_b, H, W)``, and which are real.

    Parameters
    ----------
    stacks : sequence of B tensors or arrays (K_b, H, W)
        The instance masks of each crop (``K_b`` may be 0).
    k_max : int, optional
        ``K`` of the result (at least ``max(K_b)``); default ``max(K_b)``.

    Returns
    -------
    instances : Tensor (B, K, H, W), bool
        Stack ``b`` in ``instances[b, :K_b]``, the rest all False.
    valid : Tensor (B, K), bool
        ``valid[b, k]`` is ``k < K_b``.

    Examples
    --------
    >>> masks, valid = pad_instances([torch.ones(2, 3, 3, dtype=torch.bool), torch.ones(0, 3, 3)])
    >>> tuple(masks.shape), valid.tolist()
    ((2, 2, 3, 3), [[True, True], [False, False]])
    """
    if len(stacks) == 0:
        raise ValueError("cannot pad an empty sequence of instance stacks")
    stacks = [torch.as_tensor(s) for s in stacks]
    shape = tuple(stacks[0].shape[1:])
    if any(s.ndim != 3 or tuple(s.shape[1:]) != shape for s in stacks):
        raise ValueError(
            f"instance stacks must be (K_b, H, W) with one H, W, got shapes {[tuple(s.shape) for s in stacks][:4]}"
        )
    counts = [len(s) for s in stacks]
    k = max(counts) if k_max is None else int(k_max)
    if k < max(counts):
        raise ValueError(f"k_max={k_max} is smaller than the largest stack ({max(counts)} masks)")
    device = stacks[0].device
    instances = torch.zeros((len(stacks), k) + shape, dtype=torch.bool, device=device)
    for b, stack in enumerate(stacks):
        instances[b, : len(stack)] = stack.to(device) != 0
    valid = torch.arange(k, device=device)[None] < torch.tensor(counts, device=device)[:, None]
    return instances, valid
