"""Training and shipping a model.

The configuration and its presets (:mod:`.config`), the discriminative loss (:mod:`.losses`),
one optimisation step (:mod:`.step`), data order and loaders (:mod:`.batches`), time budgets
(:mod:`.budget`), several GPUs (:mod:`.distributed`), the run folder (:mod:`.run_folder`) and
its checkpoints (:mod:`.checkpoint`), the loop (:mod:`.train`) with validation snapshots
(:mod:`.selection`), and the export of a shipped model (:mod:`.export`) with its calibrated
class head (:mod:`.calibration`).

May import: every layer below it, :mod:`companion.data`, :mod:`companion.model`,
:mod:`companion.pretrained`, :mod:`companion.inference` and :mod:`companion.evaluation` (the
validation snapshots segment and score the validation wells as the evaluation does).
"""
