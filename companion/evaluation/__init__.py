"""How good the instances are: Table 1, Figure 2 and Table 2 of the paper.

Instance metrics equal to pycocotools' (:mod:`.metrics`), the cross-validated grid search
(:mod:`.tuning`), PAvPU (:mod:`.uncertainty`), simulated proofreading (:mod:`.proofreading`),
the whole evaluation (:mod:`.evaluate`) and its result files (:mod:`.report`), scoring other
tools' predictions (:mod:`.prediction_files`, :mod:`.scoring`) and the paper's own numbers
(:mod:`.paper`).

May import: :mod:`companion.data`, :mod:`companion.model`, :mod:`companion.pretrained`,
:mod:`companion.inference`.
"""
