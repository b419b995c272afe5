"""The three-class training target: background, single-worm foreground and overlap.

Rumberger et al. (2020) train the U-Net's class head on three classes per pixel:
``BACKGROUND`` (no worm), ``FOREGROUND`` (exactly one worm) and ``OVERLAP`` (two or more
worms). The overlap class lets post-processing assign a pixel to several instances.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["BACKGROUND", "FOREGROUND", "OVERLAP", "CLASS_NAMES", "three_class_target", "worm_probability"]

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
