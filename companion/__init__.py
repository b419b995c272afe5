"""Companion package of the book *Probabilistic Deep Learning for Instance Segmentation*.

The package holds all the logic the book's chapters show: the BBBC010 data layer
(:mod:`companion.data`), synthetic worms (:mod:`companion.synthetic`), training targets
(:mod:`companion.targets`), augmentation (:mod:`companion.augment`), the U-Net (:mod:`companion.model`) with
Concrete Dropout (:mod:`companion.dropout`), the discriminative loss (:mod:`companion.losses`),
training (:mod:`companion.train`, one step in :mod:`companion.step`), post-processing (:mod:`companion.postprocess`, with the
mean-shift of :mod:`companion.meanshift`), simulated network outputs (:mod:`companion.simulate`),
Monte-Carlo sampling (:mod:`companion.sampling`), agglomeration (:mod:`companion.agglomerate`),
metrics (:mod:`companion.metrics`), uncertainty evaluation (:mod:`companion.uncertainty`),
guided proofreading (:mod:`companion.proofreading`), the whole evaluation
(:mod:`companion.evaluate`: network outputs in :mod:`companion.outputs`, predictions by
:mod:`companion.segmenter`, result files in :mod:`companion.report`), the trained models shipped with the package
(:mod:`companion.pretrained`, written by :mod:`companion.export`, calibrated by
:mod:`companion.calibration`; what the chapters print beside them in :mod:`companion.chapters`), the paper's reported numbers
(:mod:`companion.paper`), ensembles and uncertainty ranking (:mod:`companion.ensemble`) and
reading your own images (:mod:`companion.userdata`).

Modules are imported lazily, so ``import companion`` stays cheap.
"""

from __future__ import annotations

import importlib
import pkgutil

__version__ = "0.1.0"

#: Every public module and sub-package, found on disk (so a new module is never left out).
_SUBMODULES = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_SUBMODULES) + ["__version__"]
