"""Pretrained U-Nets shipped with the package: ``load("concrete")`` or ``load("baseline")``.

May import: :mod:`companion.data` and :mod:`companion.model`.

Each model is two files in this folder, and the recipes of its evaluations
(``<name>.recipe.json``, :mod:`companion.inference.recipes`):

* ``<name>.pt``: ``{"format", "model_kwargs", "state_dict"}`` with the weights in float16
  (half the size; the outputs differ from the float32 model's by float16 rounding only),
  read with ``torch.load(..., weights_only=True)`` and cast back to float32;
* ``<name>.json``: provenance: the training command, preset and overridden settings, git
  commit, iterations, training time, hardware, final loss terms, learned dropout rates and
  the sha256 of the ``.pt``, which :func:`load` verifies.

They are written by :func:`companion.training.export.export` (``scripts/export_pretrained.py`` on the
command line) from a training checkpoint of :func:`companion.training.train.train`. What the chapters
print beside a shipped model (its committed evaluation, its training budget) is in
:mod:`companion.book.chapters`.

Examples
--------
>>> import tempfile
>>> from companion.training.config import TrainConfig
>>> from companion.training.export import export
>>> from companion.data.synthetic import make_dataset
>>> from companion.training.train import train
>>> run, shelf = tempfile.mkdtemp(), tempfile.mkdtemp()
>>> cfg = TrainConfig.preset("quick", iterations=2, checkpoint_every=2, log_every=1)
>>> ckpt = train(cfg, make_dataset(2, seed=0, shape=(96, 96)), run, progress=False)
>>> _ = export(ckpt, "concrete", shelf)
>>> available(shelf), provenance("concrete", shelf)["iterations"], load("concrete", directory=shelf).training
(['concrete'], 2, False)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from companion._io import file_sha256
from companion.model.files import EXPORTED_FORMAT, SHIPPED_DIR, check_map_location, read_exported
from companion.model.unet import UNet

__all__ = ["NAMES", "PRETRAINED_DIR", "FORMAT", "available", "provenance", "load"]

#: The models the package ships.
NAMES: tuple[str, ...] = ("concrete", "baseline")
#: Where the shipped files live.
PRETRAINED_DIR: Path = SHIPPED_DIR  # this folder
#: Marker stored in every exported ``.pt``.
FORMAT = EXPORTED_FORMAT  # written by export, read by load and by train(init_from=...)


def _directory(directory: str | os.PathLike | None) -> Path:
    return PRETRAINED_DIR if directory is None else Path(directory)


def available(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the models whose ``.pt`` and ``.json`` are both present, sorted."""
    folder = _directory(directory)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.pt") if p.with_suffix(".json").is_file())


def _paths(name: str, directory: str | os.PathLike | None) -> tuple[Path, Path]:
    folder = _directory(directory)
    present = available(directory)
    if name not in NAMES and name not in present:
        raise ValueError(
            f"unknown pretrained model {name!r}; the package knows {list(NAMES)}, "
            f"available in {folder}: {present or 'none'}"
        )
    weights, info = folder / f"{name}.pt", folder / f"{name}.json"
    missing = [p.name for p in (weights, info) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"pretrained model {name!r}: {', '.join(missing)} not found in {folder}. The trained "
            f"checkpoints have not been shipped with this copy of companion yet. Train a model "
            f"yourself (`python -m companion train --preset colab --model {name} --out runs/{name}`) "
            f"and use it with `python -m companion evaluate --checkpoint runs/{name}/final.pt`, or "
            f"export it here with `python scripts/export_pretrained.py --checkpoint runs/{name}/final.pt "
            f"--name {name}`."
        )
    return weights, info


def provenance(name: str, directory: str | os.PathLike | None = None) -> dict:
    """The provenance record ``<name>.json`` of a pretrained model (see the module docstring).

    Raises ``ValueError`` naming the file when it is not a JSON object (e.g. truncated).
    """
    _, info = _paths(name, directory)
    try:
        with open(info, encoding="utf-8") as handle:
            record = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{info} is not a readable provenance record (corrupt or truncated JSON: {err})"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{info} is not a provenance record: it holds a JSON {type(record).__name__}, not an object"
        )
    return record


def load(
    name: str, *, directory: str | os.PathLike | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """A pretrained :class:`companion.model.unet.UNet`, float32, in eval mode.

    Parameters
    ----------
    name : {"concrete", "baseline"}
        Which model (or another name exported into ``directory``).
    directory : path-like, optional
        Folder holding ``<name>.pt`` and ``<name>.json``; default the package's own.
    map_location : str or torch.device
        Where the weights are loaded.

    Raises
    ------
    ValueError
        Unknown name (lists the available ones); a ``.pt`` whose sha256 differs from the one
        recorded in its ``.json``, that cannot be read (truncated), that is not an exported
        model or whose weights do not fit its architecture, or a corrupt ``.json`` (each names
        the file); ``map_location`` on a GPU where CUDA is not available (says so).
    FileNotFoundError
        The files are missing (explains how to train and export a model).
    """
    check_map_location(map_location)  # before the files: a missing GPU is not a broken file
    weights, _ = _paths(name, directory)
    expected = provenance(name, directory).get("sha256")
    actual = file_sha256(weights)
    if actual != expected:
        raise ValueError(
            f"{weights}: sha256 {actual} differs from {expected} recorded in "
            f"{weights.with_suffix('.json').name}; the file is corrupt or was replaced"
        )
    state, model_kwargs = read_exported(weights, map_location=map_location)
    try:
        model = UNet(**model_kwargs)
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:300]
        raise ValueError(
            f"{weights}: its weights do not fit the architecture {model_kwargs} it "
            f"records (another model's file?): {detail}"
        ) from err
    return model.to(map_location).eval()
