"""Pictures of instance masks for figures: :func:`mask_overlay`."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["mask_overlay"]


def mask_overlay(masks: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """RGBA picture of a mask stack ``(K, H, W)``: one colour per instance, overlaps white.

    Colours cycle through matplotlib's ``tab20``; pixels of no instance are transparent, so the
    picture can be drawn over an image with ``imshow``.

    Examples
    --------
    >>> masks = np.zeros((2, 1, 3), bool); masks[0, 0, :2] = True; masks[1, 0, 1:] = True
    >>> rgba = mask_overlay(masks, alpha=0.5)
    >>> rgba.shape, rgba[0, 1].tolist(), float(rgba[0, 0, 3])
    ((1, 3, 4), [1.0, 1.0, 1.0, 0.5], 0.5)
    """
    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"expected a mask stack (K, H, W), got shape {masks.shape}")
    rgba = np.zeros(masks.shape[1:] + (4,))
    for k, mask in enumerate(masks):
        rgba[mask, :3] = plt.cm.tab20(k % 20)[:3]
        rgba[mask, 3] = alpha
    rgba[masks.sum(0) >= 2] = (1, 1, 1, alpha)
    return rgba
