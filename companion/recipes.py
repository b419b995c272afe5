"""The inference recipes a shipped model carries: ``<name>.recipe.json`` beside its weights.

An evaluation (``python -m companion evaluate``) chooses the mean-shift bandwidth and threshold
by cross-validation and measures one Table 1 row per inference protocol. :func:`row_recipes`
turns its ``results.json`` into one :class:`companion.segmenter.Recipe` per row (the fold
choices included, so a test well is segmented as that evaluation did), :func:`save_recipes`
merges them into the model's recipe file (``evaluate --save-recipe`` does so), marking the row
with the best avAP, and :func:`read_recipe` reads one back, from the package itself, so that an
installed wheel predicts with the tuned settings.

The file::

    {"format": "companion-recipes-1", "model_sha256": ..., "best": "<evaluation>/<row>",
     "rows": {"<evaluation>/<row>": {"recipe": {...}, "metrics": {"avAP": ..., ...},
                                      "inference": ..., "command": ...}, ...}}

A bandwidth and threshold for images outside the evaluated folds: the grid point with the best
mean score over the folds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_bytes
from .checkpoint import SHIPPED_DIR
from .paper import ROW_KEYS
from .segmenter import Recipe, best_folds

__all__ = ["FORMAT", "recipe_path", "row_recipes", "save_recipes", "read_recipes", "read_recipe", "rows"]

#: Marker of a recipe file.
FORMAT = "companion-recipes-1"
#: The rows whose recipe agglomerates passes, by the evaluation's row name.
_AGGLOMERATED = ("mc", "flips_agglomerated")


def recipe_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    """``<directory>/<name>.recipe.json`` (default the package's shipped models)."""
    return (SHIPPED_DIR if directory is None else Path(directory)) / f"{name}.recipe.json"


def _overall_point(tuning: Mapping[str, Any]) -> tuple[float, float]:
    """The grid point with the best mean score over the folds (for images outside them)."""
    scores = np.asarray(tuning["scores"], np.float64).mean(axis=0)
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return float(tuning["bandwidths"][i]), float(tuning["thresholds"][j])


def row_recipes(results: Mapping[str, Any], evaluation: str) -> dict[str, dict[str, Any]]:
    """One entry per Table 1 row of an evaluation's ``results.json``, keyed ``"<evaluation>/<row>"``.

    Raises ``ValueError`` when ``results`` lacks what an evaluation writes.
    """
    try:
        settings, tuning, rows = results["settings"], results["tuning"], results["rows"]
        folds = best_folds(tuning["choices"], results["folds"])
        bandwidth, threshold = _overall_point(tuning)
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise ValueError(f"{evaluation}: not an evaluation's results.json (it lacks {err})") from None
    base = Recipe(
        bandwidth=bandwidth,
        threshold=threshold,
        clustering=settings["clustering"],
        min_size=int(settings["min_size"]),
        max_points=settings["max_points"],
        views=4 if settings["flips"] else 1,
        binarize_at=float(settings["binarize_at"]),
        seed=int(settings["seed"]),
        folds=folds,
    )
    entries = {}
    for row in rows:
        if row["name"] == "mc":
            recipe = base.replace(mc_draws=int(settings["draws"]))
        elif row["name"] == "flips_agglomerated":
            recipe = base.replace(agglomerate_views=True)
        else:
            recipe = base
        entries[f"{evaluation}/{row['name']}"] = dict(
            recipe=recipe.to_dict(),
            metrics={k: row[k] for k in ROW_KEYS if k in row},
            inference=row.get("inference", ""),
            command=results.get("command", ""),
        )
    return entries


def read_recipes(name: str, directory: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The recipe file of model ``name`` (None when the model has none)."""
    path = recipe_path(name, directory)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable recipe file (corrupt or truncated JSON: {err})") from None
    if (
        not isinstance(record, dict)
        or record.get("format") != FORMAT
        or not isinstance(record.get("rows"), dict)
    ):
        raise ValueError(f"{path} is not a recipe file (no format {FORMAT!r} with rows)")
    return record


def rows(name: str, directory: str | os.PathLike | None = None) -> list[str]:
    """The rows model ``name`` has recipes for, best first."""
    record = read_recipes(name, directory)
    if record is None:
        return []
    return sorted(record["rows"], key=lambda row: (row != record.get("best"), row))


def read_recipe(name: str, row: str | None = None, directory: str | os.PathLike | None = None) -> Recipe:
    """The recipe of one row of model ``name`` (default the best); :class:`Recipe` ``()`` for a
    model without a recipe file and ``row=None``.

    Raises ``ValueError`` for an unknown row (listing the known ones), a corrupt file, or
    recipes of other weights than the model's (the sha256 both record).
    """
    record = read_recipes(name, directory)
    if record is None:
        if row is None:
            return Recipe()
        raise ValueError(f"model {name!r} has no recipes ({recipe_path(name, directory)} is missing)")
    from .pretrained import available, provenance

    if name in available(directory) and record.get("model_sha256") != provenance(name, directory).get(
        "sha256"
    ):
        raise ValueError(
            f"{recipe_path(name, directory)} holds the recipes of other weights than {name}.pt "
            f"(sha256 {str(record.get('model_sha256'))[:12]}...): evaluate the model again with --save-recipe"
        )
    row = record.get("best") if row is None else row
    if row not in record["rows"]:
        raise ValueError(f"model {name!r} has no recipe for row {row!r}; rows: {rows(name, directory)}")
    return Recipe.from_dict(record["rows"][row]["recipe"], where=f"{recipe_path(name, directory)} row {row}")


def save_recipes(
    name: str,
    results: Mapping[str, Any],
    evaluation: str,
    directory: str | os.PathLike | None = None,
) -> Path:
    """Merge the rows of one evaluation into model ``name``'s recipe file and mark the best row.

    The evaluation must be of the model's weights (the sha256 both record). Written atomically.
    """
    path = recipe_path(name, directory)
    sha = (results.get("model") or {}).get("sha256")
    record = read_recipes(name, directory) or dict(format=FORMAT, model_sha256=sha, best=None, rows={})
    if record.get("model_sha256") != sha:  # new weights: the old recipes belong to the old ones
        record = dict(format=FORMAT, model_sha256=sha, best=None, rows={})
    stale = [row for row in record["rows"] if row.split("/")[0] == evaluation]
    for row in stale:
        del record["rows"][row]
    record["rows"].update(row_recipes(results, evaluation))
    record["rows"] = dict(sorted(record["rows"].items()))
    record["best"] = max(record["rows"], key=lambda row: record["rows"][row]["metrics"]["avAP"])
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    return path
