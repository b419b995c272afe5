"""One path from an image to instances: a model and its :class:`Recipe` make a :class:`Segmenter`.

A :class:`Recipe` holds every inference setting (mean-shift bandwidth and threshold, clustering,
smallest instance, point budget, Monte-Carlo dropout draws, test-time views, binarisation, seed);
its defaults are the only defaults of the package's inference. ``segmenter(image)`` runs the two
steps that every user of the package shares (the evaluation, ``python -m companion predict``,
the chapters and their live evaluation):

1. :meth:`Segmenter.network_outputs`: one deterministic pass and, where the recipe agglomerates,
   its passes (Monte-Carlo draws of a Concrete Dropout model, or the four flipped views of a
   model without dropout), compacted (:func:`companion.outputs.well_outputs`);
2. :meth:`Segmenter.segment`: mean shift on each pass (:func:`segment_compact`), and for
   several passes their agglomeration and binarisation.

So a prediction made here with a row's recipe reproduces that row's per-image line of an
evaluation. The shipped models carry the recipes their evaluations chose
(:mod:`companion.recipes`): ``Segmenter.pretrained("concrete")`` predicts with the best row's.

Examples
--------
>>> import torch
>>> from companion.model import UNet
>>> torch.manual_seed(0) and None
>>> net = UNet(base_filters=2, depth=3, embedding_dim=4, dropout="concrete")
>>> segmenter = Segmenter(net, Recipe(bandwidth=1.0, threshold=1.0, mc_draws=2))
>>> result = segmenter(np.zeros((2, 32, 40), np.float32))
>>> result.masks.dtype, result.masks.shape[1:], result.probabilities.shape[1:], len(result.passes)
(dtype('bool'), (32, 40), (32, 40), 2)
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .agglomerate import Agglomeration, agglomerate, binarize_with_scores, binarized_indices
from .outputs import (
    CompactPass,
    WellOutputs,
    _well_seed,
    cached_well_outputs,
    compact_scores,
    embedding_map,
    has_concrete_dropout,
    well_outputs,
)
from .postprocess import DEFAULT_MIN_SIZE, segment_classes
from .proofreading import uncertainty_map
from .sampling import FLIPS

if TYPE_CHECKING:  # pragma: no cover
    from .data import Sample

__all__ = ["FoldSetting", "Recipe", "Instances", "Segmenter", "segment_compact", "MC_DRAWS"]

#: The paper's number of Monte-Carlo draws per image.
MC_DRAWS = 8


def segment_compact(compact: CompactPass, bandwidth: float, threshold: float, **segment_kwargs) -> np.ndarray:
    """:func:`companion.postprocess.segment_classes` on one :class:`CompactPass` (bool ``(K, H, W)``).

    Equal to ``segment`` on the full outputs with the embedding rounded to float16.
    """
    masks = segment_classes(embedding_map(compact), compact.classes, bandwidth, threshold, **segment_kwargs)
    return np.asarray(masks, bool)


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
    binarize_at: float = 0.75
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
        """The keyword arguments of :func:`companion.postprocess.segment` this recipe sets."""
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


class Instances(NamedTuple):
    """The instances predicted for one image.

    Attributes
    ----------
    masks : np.ndarray
        bool ``(K, H, W)``; masks may overlap.
    scores : np.ndarray
        ``(K,)`` confidence of each mask (mean foreground probability for one pass, the
        agglomeration score for several); the order of the COCO ranking.
    probabilities : np.ndarray or None
        float16 ``(K, H, W)`` per-instance pixel probabilities of the agglomerated passes
        (``None`` for one pass).
    uncertainty : np.ndarray or None
        ``(H, W)`` per-pixel uncertainty of the agglomeration
        (:func:`companion.proofreading.uncertainty_map`; ``None`` for one pass).
    agglomeration : Agglomeration or None
        Every agglomerated instance before binarising (probabilities and scores).
    passes : tuple of np.ndarray
        The segmentation of each agglomerated pass, bool ``(K_i, H, W)`` (empty for one pass).
    """

    masks: np.ndarray
    scores: np.ndarray
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    agglomeration: Agglomeration | None = None
    passes: tuple = ()


def _checked_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] != 2 or min(image.shape[1:]) < 1:
        raise ValueError(
            f"image has shape {image.shape}, but the model expects a (2, H, W) array "
            f"with H, W >= 1: 2 channels, w1 fluorescence then w2 brightfield "
            f"(companion.userdata.read_image builds one from your files)"
        )
    if not np.isfinite(image).all():
        raise ValueError("image holds NaN or infinite values")
    if image.max() > 1.0 or image.min() < 0.0:  # e.g. raw camera counts: the network sees noise
        warnings.warn(
            f"image values span [{image.min():.4g}, {image.max():.4g}], the models expect [0, 1]: "
            f"scale them first (companion.userdata.read_image does, e.g. BBBC010 counts / 4095)",
            stacklevel=3,
        )
    return image


class Segmenter:
    """A model and its :class:`Recipe`: ``segmenter(image) -> Instances``.

    Parameters
    ----------
    model : nn.Module
        A :class:`companion.model.UNet`.
    recipe : Recipe, optional
        Default :class:`Recipe` ``()``: one deterministic pass.
    device : str or torch.device, optional
        Where the network runs (the model is moved there; default its device).

    Raises
    ------
    ValueError
        Monte-Carlo draws for a model without Concrete Dropout.
    """

    def __init__(
        self, model: nn.Module, recipe: Recipe | None = None, *, device: str | torch.device | None = None
    ) -> None:
        self.recipe = Recipe() if recipe is None else recipe
        if self.recipe.mc_draws and not has_concrete_dropout(model):
            raise ValueError(
                f"mc_draws={self.recipe.mc_draws} needs a model with Concrete Dropout; this one has "
                f"none (use mc_draws=0, or views=4 with agglomerate_views=True to agglomerate flips)"
            )
        if self.recipe.agglomerate_views and not self.recipe.mc_draws and has_concrete_dropout(model):
            raise ValueError(
                "agglomerate_views agglomerates the flipped views of a model without dropout; "
                "a Concrete Dropout model agglomerates Monte-Carlo draws (mc_draws > 0), which "
                "cycle through the views"
            )
        self.model = model if device is None else model.to(device)
        self.device = device

    def __repr__(self) -> str:
        return f"Segmenter({type(self.model).__name__}, {self.recipe!r})"

    @classmethod
    def pretrained(
        cls,
        name: str,
        row: str | None = None,
        *,
        directory: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> Segmenter:
        """A shipped model with the recipe of one row of its evaluations (default: the best row).

        ``row`` is ``"<evaluation>/<row>"``, e.g. ``"concrete_components_flips/mc"``
        (:func:`companion.recipes.rows` lists them). A model shipped without recipes gets
        :class:`Recipe` ``()`` (``row`` must then be None).
        """
        from .pretrained import load
        from .recipes import read_recipe

        recipe = read_recipe(name, row, directory=directory)
        return cls(load(name, directory=directory, map_location=device), recipe, device=device)

    def with_recipe(self, **changes: Any) -> Segmenter:
        """The same model with some recipe settings changed."""
        return Segmenter(self.model, self.recipe.replace(**changes), device=self.device)

    def network_outputs(
        self, image: np.ndarray, name: str | None = None, *, batch: int | None = None
    ) -> WellOutputs:
        """Step 1: the compact deterministic pass and the recipe's passes of one image."""
        recipe = self.recipe
        return well_outputs(
            self.model,
            _checked_image(image),
            draws=recipe.passes,
            seed=recipe.seed_for(name),
            batch=batch,
            device=self.device,
            flips=recipe.views > 1,
        )

    def cached_outputs(
        self,
        samples: Sequence[Sample],
        cache_dir: str | os.PathLike | None,
        *,
        batch: int | None = None,
        progress: bool = True,
    ) -> dict[str, WellOutputs]:
        """Step 1 for many wells, each kept in ``cache_dir`` and reused for the same weights,
        image and passes (:func:`companion.outputs.cached_well_outputs`); by well id."""
        recipe = self.recipe
        return cached_well_outputs(
            self.model,
            samples,
            cache_dir,
            draws=recipe.passes,
            seed=recipe.seed,
            batch=batch,
            device=self.device,
            flips=recipe.views > 1,
            progress=progress,
        )

    def segment(self, outputs: WellOutputs, name: str | None = None) -> Instances:
        """Step 2: the instances of computed network outputs (a deterministic recipe segments
        their deterministic pass; an agglomerating one needs as many passes as it asks for)."""
        recipe = self.recipe.for_image(name)
        settings = (recipe.bandwidth, recipe.threshold)
        if not recipe.passes:
            masks = segment_compact(outputs.deterministic, *settings, **recipe.segment_options())
            return Instances(masks, np.asarray(compact_scores(outputs.deterministic, masks), np.float64))
        if len(outputs.draws) < recipe.passes:
            raise ValueError(
                f"the recipe agglomerates {recipe.passes} passes, the outputs hold {len(outputs.draws)}"
            )
        passes = tuple(
            segment_compact(d, *settings, **recipe.segment_options()) for d in outputs.draws[: recipe.passes]
        )
        agg = agglomerate(passes)
        masks, scores = binarize_with_scores(agg, recipe.binarize_at)
        keep = binarized_indices(agg.probs, recipe.binarize_at)  # the masks' order
        probabilities = np.asarray(agg.probs, np.float32)[keep].astype(np.float16)
        return Instances(
            np.asarray(masks, bool),
            np.asarray(scores, np.float64),
            probabilities,
            uncertainty_map(agg.probs),
            agg,
            passes,
        )

    def __call__(self, image: np.ndarray, name: str | None = None) -> Instances:
        """Instances of one ``(2, H, W)`` image in ``[0, 1]`` (w1 fluorescence, w2 brightfield).

        ``name`` (a well id or file stem) seeds the draws and, for a well of one of the recipe's
        ``folds``, picks that fold's bandwidth and threshold.

        Raises
        ------
        ValueError
            ``image`` is not ``(2, H, W)`` with ``H, W >= 1`` (the message gives its shape) or
            holds NaN or infinite values.
        """
        return self.segment(self.network_outputs(image, name), name)


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
