"""Inference recipes: :class:`Recipe` (every inference setting, and the package's defaults) and
the recipes a shipped model carries, ``<name>.recipe.json`` beside its weights.

An evaluation (``python -m companion evaluate``) chooses the mean-shift bandwidth and threshold
by cross-validation and measures one Table 1 row per inference protocol. :func:`row_recipes`
turns its ``results.json`` into one :class:`Recipe` per row (the fold
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

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch import nn

from companion.model.files import SHIPPED_DIR
from companion.pretrained import available, provenance

from .._io import atomic_write_bytes
from .agglomerate import BINARIZE_AT
from .outputs import _well_seed, has_concrete_dropout
from .postprocess import DEFAULT_MIN_SIZE
from .sampling import FLIPS

__all__ = [
    "FoldSetting",
    "Recipe",
    "views_recipe",
    "FORMAT",
    "recipe_path",
    "row_recipes",
    "save_recipes",
    "read_recipes",
    "read_recipe",
    "rows",
]


#: Marker of a recipe file.
FORMAT = "companion-recipes-1"
#: The rows whose recipe agglomerates passes, by the evaluation's row name.
_AGGLOMERATED = ("mc", "flips_agglomerated")


class FoldSetting(NamedTuple):
    """The bandwidth and threshold an evaluation applied to one cross-validation fold's wells."""

    wells: tuple[str, ...]
    bandwidth: float
    threshold: float


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every inference setting of a :class:`Segmenter`; the defaults are the package's.

    Attributes
    ----------
    bandwidth, threshold : float
        Mean-shift bandwidth and pixel-to-centre assignment threshold (for an image outside
        ``folds``).
    clustering : {"global", "components"}
        Mean shift over the whole image (the paper) or inside each foreground component.
    min_size : int
        Smallest instance kept, in pixels.
    max_points : int or None
        Mean shift clusters at most this many foreground pixels per pass (all are assigned).
    mc_draws : int
        Monte-Carlo dropout draws (a Concrete Dropout model); 0: dropout stays off.
    views : {1, 4}
        Test-time views: the image, or its four flips (not in the paper). With draws, the
        draws cycle through the views; without, see ``agglomerate_views``.
    agglomerate_views : bool
        Without draws and with four views: segment each view and agglomerate them (True) or
        segment the average of their class probabilities (False).
    binarize_at : float
        Agglomerated probabilities ``>= binarize_at`` form the masks.
    seed : int
        Seeds the dropout masks (and the ``max_points`` subset), per image: the seed of an
        image named ``name`` is a function of ``(seed, name)`` only.
    folds : tuple of FoldSetting
        Bandwidth and threshold per cross-validation fold of an evaluation: a well in a fold is
        segmented with its fold's values, as that evaluation did.
    """

    bandwidth: float = 1.5
    threshold: float = 1.5
    clustering: str = "global"
    min_size: int = DEFAULT_MIN_SIZE
    max_points: int | None = 8000
    mc_draws: int = 0
    views: int = 1
    agglomerate_views: bool = False
    binarize_at: float = BINARIZE_AT
    seed: int = 0
    folds: tuple[FoldSetting, ...] = ()

    def __post_init__(self) -> None:
        checks = {
            "bandwidth": self.bandwidth > 0,
            "threshold": self.threshold > 0,
            "clustering": self.clustering in ("global", "components"),
            "min_size": _is_int(self.min_size) and self.min_size >= 0,
            "max_points": self.max_points is None or (_is_int(self.max_points) and self.max_points > 0),
            "mc_draws": _is_int(self.mc_draws) and 0 <= self.mc_draws,
            "views": self.views in (1, len(FLIPS)),
            "binarize_at": 0 < self.binarize_at <= 1,
            "seed": _is_int(self.seed),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"recipe setting {bad[0]}={getattr(self, bad[0])!r} is out of range (bandwidth and "
                f"threshold > 0, clustering global or components, views 1 or 4, binarize_at in (0, 1], "
                f"integer counts and seed)"
            )
        object.__setattr__(
            self, "folds", tuple(FoldSetting(tuple(w), float(b), float(t)) for w, b, t in self.folds)
        )

    @property
    def passes(self) -> int:
        """How many passes are segmented and agglomerated (0: one deterministic pass)."""
        if self.mc_draws:
            return self.mc_draws
        return self.views if self.agglomerate_views and self.views > 1 else 0

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def deterministic(self) -> Recipe:
        """The same recipe with one pass (dropout off; views averaged)."""
        return self.replace(mc_draws=0, agglomerate_views=False)

    def for_image(self, name: str | None) -> Recipe:
        """The recipe for the image ``name``: its fold's bandwidth and threshold if it is in one."""
        fold = next((f for f in self.folds if name in f.wells), None)
        return self if fold is None else self.replace(bandwidth=fold.bandwidth, threshold=fold.threshold)

    def seed_for(self, name: str | None) -> int:
        """The seed of the image ``name`` (the evaluation's per-well seed)."""
        return _well_seed(self.seed, name or "")

    def segment_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`companion.inference.postprocess.segment` this recipe sets."""
        return dict(clustering=self.clustering, min_size=self.min_size, max_points=self.max_points)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``folds`` as lists)."""
        record = dataclasses.asdict(self)
        record["folds"] = [
            dict(wells=list(f.wells), bandwidth=f.bandwidth, threshold=f.threshold) for f in self.folds
        ]
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], where: str | os.PathLike = "recipe") -> Recipe:
        """The inverse of :meth:`to_dict`; unknown or malformed settings raise ``ValueError`` naming ``where``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"{where}: unknown recipe setting(s) {unknown}; known: {sorted(known)}")
        values = dict(record)
        try:
            values["folds"] = tuple(
                FoldSetting(tuple(f["wells"]), f["bandwidth"], f["threshold"])
                for f in values.get("folds", ())
            )
            return cls(**values)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: not a valid recipe ({err})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def views_recipe(model: nn.Module, *, mc_draws: int, flips: bool, **settings: Any) -> Recipe:
    """The recipe an evaluation with ``mc_draws`` and ``flips`` agglomerates: dropout draws for a
    Concrete Dropout model (ignored without dropout), the four flipped views of a model without
    dropout when ``flips``."""
    concrete = has_concrete_dropout(model)
    return Recipe(
        mc_draws=int(mc_draws) if concrete else 0,
        views=len(FLIPS) if flips else 1,
        agglomerate_views=bool(flips and not concrete),
        **settings,
    )


def best_folds(
    choices: Sequence[Mapping[str, Any]], folds: Sequence[Sequence[str]]
) -> tuple[FoldSetting, ...]:
    """:class:`FoldSetting` per fold from an evaluation's ``tuning.choices`` and ``folds``."""
    return tuple(
        FoldSetting(tuple(folds[int(c["applied_to"])]), float(c["bandwidth"]), float(c["threshold"]))
        for c in choices
    )


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
            metrics={k: v for k, v in row.items() if isinstance(v, (int, float))},
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
    record = read_recipes(name, directory)
    if record is None or record.get("model_sha256") != sha:  # new weights: start afresh
        record = dict(format=FORMAT, model_sha256=sha, best=None, rows={})
    stale = [row for row in record["rows"] if row.split("/")[0] == evaluation]
    for row in stale:
        del record["rows"][row]
    record["rows"].update(row_recipes(results, evaluation))
    record["rows"] = dict(sorted(record["rows"].items()))
    record["best"] = max(record["rows"], key=lambda row: record["rows"][row]["metrics"]["avAP"])
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    return path
