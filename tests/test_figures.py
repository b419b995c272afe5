"""companion.figures.mask_overlay, checked pixel by pixel."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from companion.figures import mask_overlay


def test_each_instance_has_its_colour_overlaps_are_white_background_transparent():
    masks = np.zeros((3, 2, 4), bool)
    masks[0, 0, :2] = True
    masks[1, 0, 1:3] = True
    masks[2, 1, 3] = True
    rgba = mask_overlay(masks, alpha=0.7)
    assert rgba[0, 0].tolist() == [*plt.cm.tab20(0)[:3], 0.7]
    assert rgba[0, 1].tolist() == [1.0, 1.0, 1.0, 0.7]  # worms 0 and 1 overlap
    assert rgba[0, 2].tolist() == [*plt.cm.tab20(1)[:3], 0.7]
    assert rgba[1, 3].tolist() == [*plt.cm.tab20(2)[:3], 0.7]
    assert rgba[1, 0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert mask_overlay(np.zeros((0, 2, 4), bool)).shape == (2, 4, 4)
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        mask_overlay(np.zeros((2, 4), bool))
