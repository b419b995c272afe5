"""Companion package of the book *Probabilistic Deep Learning for Instance Segmentation*.

The package holds all the logic the book's chapters show, in sub-packages in the order the data
flows through them; each imports only those above it in this list (a test checks it):

* :mod:`companion.data`: BBBC010 wells, your own images, synthetic worms, training targets,
  augmentation;
* :mod:`companion.model`: the U-Net with Concrete Dropout and its exported weight files;
* :mod:`companion.pretrained`: the models shipped with the package;
* :mod:`companion.inference`: network passes, mean shift, agglomeration, the recipes, and
  :class:`companion.inference.segmenter.Segmenter`, the one path from an image to instances;
* :mod:`companion.evaluation`: metrics, PAvPU, proofreading, the whole evaluation, the paper's
  numbers;
* :mod:`companion.training`: the loss, the training loop, checkpoints, validation snapshots,
  export;
* :mod:`companion.book`: what the chapters print and draw;
* :mod:`companion.cli`: ``python -m companion train / evaluate / predict / pack / score``.

Sub-packages are imported lazily, so ``import companion`` stays cheap.
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
