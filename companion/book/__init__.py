"""What the chapters need beside the package: the shipped models' committed results and
training budgets, a model loaded or trained on the spot, live evaluations (:mod:`.chapters`)
and pictures and tables (:mod:`.figures`).

May import: every layer but :mod:`companion.cli`.
"""
