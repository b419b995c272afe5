"""One path from an image to instances: a model and its :class:`companion.inference.recipes.Recipe` make a :class:`Segmenter`.

:class:`companion.inference.recipes.Recipe` holds every inference setting (mean-shift bandwidth and threshold, clustering,
smallest instance, point budget, Monte-Carlo dropout draws, test-time views, binarisation, seed);
its defaults are the only defaults of the package's inference. ``segmenter(image)`` runs the two
steps that every user of the package shares (the evaluation, ``python -m companion predict``,
the chapters and their live evaluation):

1. :meth:`Segmenter.network_outputs`: one deterministic pass and, where the recipe agglomerates,
   its passes (Monte-Carlo draws of a Concrete Dropout model, or the four flipped views of a
   model without dropout), compacted (:func:`companion.inference.outputs.image_outputs`);
2. :meth:`Segmenter.segment`: mean shift on each pass (:func:`segment_compact`), and for
   several passes their agglomeration and binarisation.

So a prediction made here with a row's recipe reproduces that row's per-image line of an
evaluation. The shipped models carry the recipes their evaluations chose
(:mod:`companion.inference.recipes`): ``Segmenter.pretrained("concrete")`` predicts with the best row's.

Examples
--------
>>> import torch
>>> from companion.model.unet import UNet
>>> torch.manual_seed(0) and None
>>> net = UNet(base_filters=2, depth=3, embedding_dim=4, dropout="concrete")
>>> segmenter = Segmenter(net, Recipe(bandwidth=1.0, threshold=1.0, mc_draws=2))
>>> result = segmenter(np.zeros((2, 32, 40), np.float32))
>>> result.masks.dtype, result.masks.shape[1:], result.probabilities.shape[1:], len(result.passes)
(dtype('bool'), (32, 40), (32, 40), 2)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from companion.pretrained import load as load_pretrained

from .agglomerate import Agglomeration, agglomerate, binarized_indices, uncertainty_map
from .outputs import (
    CompactPass,
    ImageOutputs,
    cached_image_outputs,
    compact_scores,
    embedding_map,
    has_concrete_dropout,
    image_outputs,
)
from .postprocess import segment_classes
from .recipes import Recipe, read_recipe

if TYPE_CHECKING:  # pragma: no cover
    from companion.data.bbbc010 import Sample

__all__ = ["Instances", "Segmenter", "segment_compact"]


def segment_compact(compact: CompactPass, bandwidth: float, threshold: float, **segment_kwargs) -> np.ndarray:
    """:func:`companion.inference.postprocess.segment_classes` on one :class:`CompactPass` (bool ``(K, H, W)``).

    Equal to ``segment`` on the full outputs with the embedding rounded to float16.
    """
    masks = segment_classes(embedding_map(compact), compact.classes, bandwidth, threshold, **segment_kwargs)
    return np.asarray(masks, bool)


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
        (:func:`companion.inference.agglomerate.uncertainty_map`; ``None`` for one pass).
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
            f"(companion.data.userdata.read_image builds one from your files)"
        )
    if not np.isfinite(image).all():
        raise ValueError("image holds NaN or infinite values")
    if image.max() > 1.0 or image.min() < 0.0:  # e.g. raw camera counts: the network sees noise
        warnings.warn(
            f"image values span [{image.min():.4g}, {image.max():.4g}], the models expect [0, 1]: "
            f"scale them first (companion.data.userdata.read_image does, e.g. BBBC010 counts / 4095)",
            stacklevel=3,
        )
    return image


class Segmenter:
    """A model and its :class:`companion.inference.recipes.Recipe`: ``segmenter(image) -> Instances``.

    Parameters
    ----------
    model : nn.Module
        A :class:`companion.model.unet.UNet`.
    recipe : Recipe, optional
        Default :class:`companion.inference.recipes.Recipe` ``()``: one deterministic pass.
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
        (:func:`companion.inference.recipes.rows` lists them). A model shipped without recipes gets
        :class:`companion.inference.recipes.Recipe` ``()`` (``row`` must then be None).
        """
        recipe = read_recipe(name, row, directory=directory)
        return cls(load_pretrained(name, directory=directory, map_location=device), recipe, device=device)

    def with_recipe(self, **changes: Any) -> Segmenter:
        """The same model with some recipe settings changed."""
        return Segmenter(self.model, self.recipe.replace(**changes), device=self.device)

    def network_outputs(
        self, image: np.ndarray, name: str | None = None, *, batch: int | None = None
    ) -> ImageOutputs:
        """Step 1: the compact deterministic pass and the recipe's passes of one image."""
        recipe = self.recipe
        return image_outputs(
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
    ) -> dict[str, ImageOutputs]:
        """Step 1 for many wells, each kept in ``cache_dir`` and reused for the same weights,
        image and passes (:func:`companion.inference.outputs.cached_image_outputs`); by well id."""
        recipe = self.recipe
        return cached_image_outputs(
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

    def segment(self, outputs: ImageOutputs, name: str | None = None) -> Instances:
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
        keep = binarized_indices(agg.probs, recipe.binarize_at)  # as binarize_with_scores keeps them
        kept = np.asarray(agg.probs)[keep]
        return Instances(
            kept >= recipe.binarize_at,
            np.asarray(agg.scores[keep], np.float64),
            kept.astype(np.float32).astype(np.float16),
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
