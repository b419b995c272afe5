"""What the chapters show: pictures of instance masks (:func:`mask_overlay`) and rendered tables
(:func:`html_table`, Table 1 rows in :func:`table1_html`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

import matplotlib.pyplot as plt
import numpy as np

from companion.evaluation.paper import TABLE1_KEYS

__all__ = ["BOOK_STYLE", "mask_overlay", "html_table", "table1_html"]

#: The chapters' matplotlib settings (``plt.rcParams.update(BOOK_STYLE)``). The book's text column
#: is about 690 px wide at a 1280 px window, so a figure at most 10 inches wide keeps its 13 pt
#: titles at about 12 px and its 11.5 pt tick labels above 10 px.
BOOK_STYLE: dict[str, float] = {
    "figure.dpi": 90,
    "font.size": 12.5,
    "axes.titlesize": 13,
    "axes.labelsize": 12.5,
    "xtick.labelsize": 11.5,
    "ytick.labelsize": 11.5,
    "legend.fontsize": 11.5,
    "figure.titlesize": 14,
}


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


def _html_cell(value: object, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.{digits}g}"
    return escape(str(value))


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, digits: int = 3) -> str:
    """Rows as an HTML table (rendered in the book and in Jupyter, unlike fixed-width prints).

    The first column is the row label (a header cell). Floats show ``digits`` decimals (general
    format outside 0.001-100 000), ``None`` as ``-``; everything is escaped.

    Examples
    --------
    >>> html = html_table(["", "lr", "crop"], [["cpu", 1e-3, 512], ["<x>", None, 64]])
    >>> html.count("<tr>"), "<td>0.001</td>" in html, "<th>&lt;x&gt;</th>" in html, "<td>-</td>" in html
    (3, True, True, True)
    """
    rows = [list(row) for row in rows]
    if any(len(row) != len(header) for row in rows):
        widths = sorted({len(row) for row in rows})
        raise ValueError(f"every row needs {len(header)} cells (one per header), got rows of {widths}")
    head = "<tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr>"
    body = "".join(
        f"<tr><th>{_html_cell(row[0], digits)}</th>"
        + "".join(f"<td>{_html_cell(v, digits)}</td>" for v in row[1:])
        + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def table1_html(rows: Sequence[tuple[str, Mapping[str, float]]], keys: Sequence[str] = TABLE1_KEYS) -> str:
    """Table 1 rows as an HTML table (a rendered table in the book and in Jupyter).

    ``rows`` are ``(label, metrics)`` pairs, ``keys`` the columns; missing metrics (or ``None``)
    show as ``-``. Labels are escaped.

    Examples
    --------
    >>> from companion.evaluation.paper import TABLE1
    >>> html = table1_html([("paper: baseline", TABLE1["baseline"]), ("ours", {"avAP": 0.5})])
    >>> html.count("<tr>"), "<td>0.761</td>" in html, "<td>-</td>" in html
    (3, True, True)
    """
    return html_table(["", *keys], [[label, *(metrics.get(k) for k in keys)] for label, metrics in rows])
