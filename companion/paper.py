"""The numbers Rumberger, Mais and Kainmueller (2020) report, to print beside ours.

Only what the paper states is here; every number the book computes comes from the code.

Examples
--------
>>> TABLE1["concrete"]["avAP"], TABLE1["baseline"]["AP50"]
(0.77, 0.963)
>>> table1_html([("paper: concrete", TABLE1["concrete"])]).count("<td>")  # a rendered table
5
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["TABLE1_KEYS", "TABLE1", "FIGURE2_AT_005", "table1_html"]


#: The columns of Table 1, in the paper's order (the metrics of a Table 1 row).
TABLE1_KEYS: tuple[str, ...] = ("avAP", "AP50", "AP75", "recall80", "avAP_dsb")

#: Table 1 of the paper: BBBC010 test split; the concrete model's agglomerated Monte-Carlo
#: probabilities binarised at 0.75, the baseline's single deterministic prediction.
TABLE1: dict[str, dict[str, float]] = {
    "baseline": dict(avAP=0.761, AP50=0.963, AP75=0.879, recall80=0.81, avAP_dsb=0.686),
    "concrete": dict(avAP=0.770, AP50=0.974, AP75=0.883, recall80=0.81, avAP_dsb=0.703),
}

#: Figure 2 of the paper at the entropy threshold 0.05: the probability that an inaccurate 4 x 4
#: patch is flagged uncertain.
FIGURE2_AT_005: dict[str, float] = dict(threshold=0.05, p_uncertain_given_inaccurate=0.559)


def table1_html(rows: Sequence[tuple[str, Mapping[str, float]]]) -> str:
    """Table 1 rows as an HTML table (a rendered table in the book and in Jupyter).

    ``rows`` are ``(label, metrics)`` pairs; missing metrics show as ``-``. Labels are escaped.

    Examples
    --------
    >>> html = table1_html([("paper: baseline", TABLE1["baseline"]), ("ours", {"avAP": 0.5})])
    >>> html.count("<tr>"), "<td>0.761</td>" in html, "<td>-</td>" in html
    (3, True, True)
    """
    from .figures import html_table

    return html_table(
        ["", *TABLE1_KEYS], [[label, *(metrics.get(k) for k in TABLE1_KEYS)] for label, metrics in rows]
    )
