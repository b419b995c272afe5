"""companion.evaluation.paper: the paper's numbers and their table formats."""

from __future__ import annotations

import re

from companion.book.figures import table1_html
from companion.evaluation.paper import TABLE1, TABLE1_KEYS


def test_table1_html_has_one_row_per_entry_in_the_paper_column_order_and_escapes_labels():
    html = table1_html(
        [("ours <draws> & more", {"avAP": 0.41, "AP50": 0.775}), ("paper", TABLE1["concrete"])]
    )
    assert re.findall(r"<th>([^<]*)</th>", html)[1:6] == list(TABLE1_KEYS)
    assert "ours &lt;draws&gt; &amp; more" in html and "<draws>" not in html
    rows = html.split("<tr>")[2:]
    assert re.findall(r"<td>([^<]*)</td>", rows[0]) == ["0.410", "0.775", "-", "-", "-"]
    assert re.findall(r"<td>([^<]*)</td>", rows[1]) == ["0.770", "0.974", "0.883", "0.810", "0.703"]
