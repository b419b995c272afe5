"""companion.book.figures: mask_overlay checked pixel by pixel, html_table cell by cell."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pytest

from companion.book.figures import html_table, mask_overlay


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


def test_html_table_formats_escapes_and_labels_rows():
    html = html_table(["preset", "lr", "crop", "note"], [["cpu", 0.001, 512, None], ["a<b", 1e-6, 64, "x&y"]])
    rows = re.findall(r"<tr>(.*?)</tr>", html)
    assert len(rows) == 3
    assert rows[0] == "<th>preset</th><th>lr</th><th>crop</th><th>note</th>"
    assert rows[1] == "<th>cpu</th><td>0.001</td><td>512</td><td>-</td>"
    assert rows[2] == "<th>a&lt;b</th><td>1e-06</td><td>64</td><td>x&amp;y</td>"


def test_html_table_rejects_a_row_of_the_wrong_length():
    with pytest.raises(ValueError, match="every row needs 3 cells"):
        html_table(["a", "b", "c"], [["x", 1, 2], ["y", 1]])
