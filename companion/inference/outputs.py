"""Network outputs of the evaluated wells: compact passes and their on-disk cache.

For one image, :func:`image_outputs` runs one deterministic pass
(:func:`companion.inference.sampling.predict`) and, for a model with Concrete Dropout, ``draws``
Monte-Carlo passes (:func:`companion.inference.sampling.mc_predict`); for a model without dropout and
test-time flips, the draws are the (at most four) flipped passes, each kept whole
(:func:`n_draws`; not in the paper). Each pass is kept compactly
(:class:`CompactPass`: the uint8 class map plus float16 embeddings and foreground probabilities
of the non-background pixels, ~4 % of a BBBC010 image). :func:`cached_image_outputs` stores them
in one ``.npz`` per well, reused when model (:func:`model_fingerprint`), image and settings are
unchanged, so a re-run of the evaluation only clusters.

Examples
--------
>>> logits = np.zeros((3, 2, 2), np.float32); logits[2, 1, 1] = 5.0
>>> compact_pass(np.ones((4, 2, 2), np.float32), logits).classes.tolist()
[[0, 0], [0, 2]]
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from companion.data.targets import worm_probability
from companion.model.dropout import concrete_layers

from .._io import atomic_savez, tensors_sha256
from .sampling import FLIPS, MC_DRAWS, MCDraws, flip_averaged, flip_passes, mc_predict, predict

if TYPE_CHECKING:  # pragma: no cover
    from companion.data.bbbc010 import Sample

__all__ = [
    "CompactPass",
    "ImageOutputs",
    "compact_pass",
    "embedding_map",
    "compact_scores",
    "mean_in_masks",
    "model_fingerprint",
    "has_concrete_dropout",
    "n_draws",
    "image_outputs",
    "cached_image_outputs",
]

#: Layout version of the per-well cache files; a change invalidates old caches.
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Compact network outputs
# --------------------------------------------------------------------------------------------
class CompactPass(NamedTuple):
    """One forward pass, stored compactly.

    Attributes
    ----------
    classes : np.ndarray
        uint8 ``(H, W)``: the most likely class (0 background, 1 foreground, 2 overlap).
    embedding : np.ndarray
        float16 ``(N, E)``: embeddings of the ``N`` pixels with ``classes != 0``, row-major.
    foreground : np.ndarray
        float16 ``(N,)``: their probability of not being background (softmax of the logits).
    """

    classes: np.ndarray
    embedding: np.ndarray
    foreground: np.ndarray


class ImageOutputs(NamedTuple):
    """Network outputs of one well: the deterministic pass and the Monte-Carlo draws (maybe none)."""

    deterministic: CompactPass
    draws: tuple


def compact_pass(embedding: np.ndarray | torch.Tensor, logits: np.ndarray | torch.Tensor) -> CompactPass:
    """Keep what post-processing needs of one pass: the class map and the foreground pixels.

    Parameters
    ----------
    embedding : np.ndarray or torch.Tensor
        ``(E, H, W)`` pixel embeddings.
    logits : np.ndarray or torch.Tensor
        ``(3, H, W)`` class logits. Tensors (e.g. on a GPU, from ``as_tensors=True`` of
        :mod:`companion.inference.sampling`) are reduced where they are: only the class map and the
        non-background pixels are copied to the host. The result is the same either way.

    Examples
    --------
    >>> logits = np.zeros((3, 2, 2), np.float32); logits[1, 0, 0] = 5.0
    >>> c = compact_pass(np.ones((4, 2, 2), np.float32), logits)
    >>> c.classes.tolist(), c.embedding.shape, c.embedding.dtype
    ([[1, 0], [0, 0]], (1, 4), dtype('float16'))
    """
    if embedding.ndim != 3 or tuple(logits.shape) != (3,) + tuple(embedding.shape[1:]):
        raise ValueError(
            f"expected embedding (E, H, W) and logits (3, H, W) of one size, got "
            f"embedding {tuple(embedding.shape)} and logits {tuple(logits.shape)}"
        )
    if not isinstance(logits, torch.Tensor):  # arrays take the same path, on the CPU
        logits = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    embedding = (
        embedding
        if isinstance(embedding, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(embedding))
    )
    classes = logits.argmax(dim=0)
    mask = classes != 0
    kept_logits = logits[:, mask].float().cpu().numpy()[:, :, None]  # (3, N, 1)
    kept_embedding = embedding[:, mask].cpu().numpy()  # (E, N)
    return CompactPass(
        classes.to(torch.uint8).cpu().numpy(),
        kept_embedding.T.astype(np.float16),
        worm_probability(kept_logits)[:, 0].astype(np.float16),
    )


def embedding_map(compact: CompactPass) -> np.ndarray:
    """The full-size ``float32 (E, H, W)`` embedding of a :class:`CompactPass` (zero on background).

    With the class map it is what :func:`companion.inference.postprocess.segment_classes` segments.

    Examples
    --------
    >>> c = CompactPass(np.array([[2, 0]], np.uint8), np.ones((1, 3), np.float16), np.ones(1, np.float16))
    >>> embedding_map(c)[:, 0].tolist()
    [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    """
    classes = np.asarray(compact.classes)
    mask = classes != 0
    if compact.embedding.ndim != 2 or len(compact.embedding) != mask.sum():
        raise ValueError(
            f"compact embedding {compact.embedding.shape} does not match the "
            f"{int(mask.sum())} non-background pixels of the class map"
        )
    embedding = np.zeros((compact.embedding.shape[1],) + classes.shape, np.float32)
    embedding[:, mask] = compact.embedding.T
    return embedding


def mean_in_masks(masks: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The mean of a pixel map ``values`` ``(H, W)`` inside each mask of ``(K, H, W)`` (0 for an
    empty mask): the score of an instance when ``values`` is its foreground probability.

    >>> mean_in_masks(np.array([[[1, 1, 0]], [[0, 0, 0]]], bool), np.array([[0.5, 1.0, 0.0]])).tolist()
    [0.75, 0.0]
    """
    masks = np.asarray(masks, bool)
    area = masks.sum(axis=(1, 2))
    total = (masks * values).sum(axis=(1, 2))
    return np.divide(total, area, out=np.zeros(len(masks)), where=area > 0)


def compact_scores(compact: CompactPass, masks: np.ndarray) -> np.ndarray:
    """Score of each mask: its mean foreground probability (:func:`mean_in_masks`).

    Examples
    --------
    >>> c = CompactPass(np.array([[1, 1, 0]], np.uint8), np.zeros((2, 1), np.float16),
    ...                 np.array([1.0, 0.5], np.float16))
    >>> compact_scores(c, np.ones((1, 1, 3), bool)).tolist()  # background pixels count as 0
    [0.5]
    """
    probability = np.zeros(compact.classes.shape, np.float64)
    probability[compact.classes != 0] = compact.foreground
    return mean_in_masks(masks, probability)


# --------------------------------------------------------------------------------------------
# Network outputs and their cache
# --------------------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and values), a cache key.

    Examples
    --------
    >>> from companion.model.unet import UNet
    >>> torch.manual_seed(0) and None
    >>> a = UNet(base_filters=2, depth=2)
    >>> model_fingerprint(a) == model_fingerprint(a), len(model_fingerprint(a))
    (True, 64)
    """
    return tensors_sha256(model.state_dict())


def _well_seed(seed: int, well: str) -> int:
    """Seed of the Monte-Carlo draws of one well, a function of (seed, well) only."""
    return int(np.random.SeedSequence([seed, zlib.crc32(well.encode())]).generate_state(1)[0])


def has_concrete_dropout(model: nn.Module) -> bool:
    """Whether ``model`` holds Concrete Dropout layers (so Monte-Carlo draws differ)."""
    return bool(concrete_layers(model))


def n_draws(model: nn.Module, draws: int, flips: bool) -> int:
    """How many draws :func:`image_outputs` gives for ``draws`` requested.

    A Concrete Dropout model: ``draws``. A model without dropout has no Monte-Carlo draws, but
    with ``flips`` its four flipped passes (:data:`companion.inference.sampling.FLIPS`) are distinct
    samples of the prediction: its draws are the first ``min(draws, 4)`` of them, to be
    segmented one by one and agglomerated like Monte-Carlo draws (test-time augmentation; not in
    the paper). Without ``flips``: none.

    Examples
    --------
    >>> from companion.model.unet import UNet
    >>> net = UNet(base_filters=2, depth=3)  # no dropout
    >>> n_draws(net, 8, flips=True), n_draws(net, 8, flips=False)
    (4, 0)
    """
    if draws < 0:
        raise ValueError(f"draws must be >= 0, got {draws}")
    if has_concrete_dropout(model):
        return int(draws)
    return min(int(draws), len(FLIPS)) if flips else 0


def image_outputs(
    model: nn.Module,
    image: np.ndarray,
    *,
    draws: int = MC_DRAWS,
    seed: int = 0,
    batch: int | None = None,
    device: str | torch.device | None = None,
    flips: bool = False,
) -> ImageOutputs:
    """Deterministic pass plus ``draws`` Monte-Carlo passes of one image, compacted on the
    model's device (:func:`compact_pass`), so that a GPU sends only class maps and foreground
    pixels to the host.

    ``flips``: test-time augmentation with the four flips (see :mod:`companion.inference.sampling`; not in
    the paper). For a model without Concrete Dropout the draws are its flipped passes with
    ``flips`` and none without (:func:`n_draws`).
    """
    count = n_draws(model, draws, flips)
    on_device = dict(device=device, as_tensors=True)  # compacted there: only foreground is copied
    if count and not has_concrete_dropout(model):  # the draws are the views the flips average
        views = flip_passes(model, image, **on_device)
        det, mc = flip_averaged(views), MCDraws(views.embeddings[:count], views.logits[:count])
    else:
        det = predict(model, image, flips=flips, **on_device)
        mc = MCDraws(det.embeddings[:0], det.logits[:0])  # none
        if count:
            mc = mc_predict(model, image, n_draws=count, batch=batch, seed=seed, flips=flips, **on_device)
    deterministic = compact_pass(det.embeddings[0], det.logits[0])
    return ImageOutputs(deterministic, tuple(compact_pass(e, lg) for e, lg in zip(mc.embeddings, mc.logits)))


def _pack(outputs: ImageOutputs, meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    passes = (outputs.deterministic,) + tuple(outputs.draws)
    return dict(
        meta=np.array(json.dumps(dict(meta), sort_keys=True)),
        classes=np.stack([p.classes for p in passes]),
        embedding=np.concatenate([p.embedding for p in passes]),
        foreground=np.concatenate([p.foreground for p in passes]),
    )


def _unpack(data: Mapping[str, np.ndarray]) -> ImageOutputs:
    passes, start = [], 0
    for classes in data["classes"]:
        n = int((classes != 0).sum())
        passes.append(
            CompactPass(classes, data["embedding"][start : start + n], data["foreground"][start : start + n])
        )
        start += n
    if start != len(data["embedding"]):
        raise ValueError(f"cache holds {len(data['embedding'])} embeddings, its class maps need {start}")
    return ImageOutputs(passes[0], tuple(passes[1:]))


def _read_cache(path: Path, meta: Mapping[str, Any]) -> ImageOutputs | None:
    """The cached outputs when ``path`` exists and was written with the same ``meta``."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            if json.loads(str(data["meta"])) != json.loads(json.dumps(dict(meta), sort_keys=True)):
                return None
            return _unpack({key: data[key] for key in ("classes", "embedding", "foreground")})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"cache file {path} is unreadable ({type(err).__name__}): recomputing it", stacklevel=2)
        return None  # recomputed and overwritten


def cached_image_outputs(
    model: nn.Module,
    samples: Sequence[Sample],
    cache_dir: str | os.PathLike | None,
    *,
    draws: int = MC_DRAWS,
    seed: int = 0,
    batch: int | None = None,
    device: str | torch.device | None = None,
    flips: bool = False,
    progress: bool = True,
) -> dict[str, ImageOutputs]:
    """:func:`image_outputs` of every sample, kept in ``cache_dir/<well>.npz``.

    A cache file is reused only if it was written for the same model weights
    (:func:`model_fingerprint`), the same image (its sha256), ``draws``, ``seed``, ``flips`` and
    cache layout; otherwise it is recomputed and rewritten atomically. ``cache_dir=None``: no cache.

    Returns
    -------
    dict
        ``{well: ImageOutputs}`` in the order of ``samples``.
    """
    from tqdm.auto import tqdm

    fingerprint = model_fingerprint(model)
    count = n_draws(model, draws, flips)
    out: dict[str, ImageOutputs] = {}
    for sample in tqdm(samples, desc="network outputs", unit="well", disable=not progress):
        image = np.ascontiguousarray(sample.image, dtype=np.float32)
        well_seed = _well_seed(seed, sample.well)
        meta = dict(
            version=CACHE_VERSION,
            model=fingerprint,
            image=hashlib.sha256(image.tobytes()).hexdigest(),
            shape=list(image.shape),
            draws=count,
            seed=well_seed,
            flips=bool(flips),
        )
        path = Path(cache_dir) / f"{sample.well}.npz" if cache_dir is not None else None
        outputs = _read_cache(path, meta) if path is not None else None
        if outputs is None:
            outputs = image_outputs(
                model, image, draws=draws, seed=well_seed, batch=batch, device=device, flips=flips
            )
            if path is not None:
                atomic_savez(path, _pack(outputs, meta))
        out[sample.well] = outputs
    return out
