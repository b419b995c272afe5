"""Joint augmentation of an image and its instance masks, and the training crop dataset.

One random geometric transform -- flips, a rotation by any angle and a smooth elastic
deformation -- is composed into a single coordinate map over the *output crop only*, so the
cost depends on the crop size and not on the image size:

* the image channels are resampled bilinearly (as :func:`scipy.ndimage.map_coordinates` with
  ``order=1, mode="grid-constant"``), zero outside the image;
* the instance masks are resampled with nearest neighbours in one gather on the bit-packed
  stack (:func:`encode_masks`), so they stay exactly binary.

Instances with fewer than :data:`MIN_PIXELS` pixels left in the crop are dropped (a worm tip
of a few pixels at the border is not a useful training instance for the discriminative loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.interpolate import make_interp_spline

from .bbbc010 import Sample
from .targets import pad_instances, three_class_target

__all__ = [
    "MIN_PIXELS",
    "AugmentedCrop",
    "elastic_displacement",
    "encode_masks",
    "augment_sample",
    "WormCropDataset",
    "collate_crops",
]

#: Instances with fewer pixels than this inside an augmented crop are dropped.
MIN_PIXELS = 20


class AugmentedCrop(NamedTuple):
    """Result of :func:`augment_sample` (unpacks as ``image, instances``)."""

    image: np.ndarray  #: float32 (C, h, w)
    instances: np.ndarray  #: bool (K', h, w), K' <= K


def _crop_shape(crop_size: int | tuple[int, int]) -> tuple[int, int]:
    shape = (crop_size, crop_size) if np.isscalar(crop_size) else tuple(crop_size)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"crop_size must be a positive int or (h, w), got {crop_size!r}")
    return int(shape[0]), int(shape[1])


def _spline_basis(n_out: int, n_ctrl: int) -> np.ndarray:
    """``(n_out, n_ctrl)`` matrix interpolating ``n_ctrl`` evenly spaced control values smoothly."""
    knots = np.linspace(0.0, 1.0, n_ctrl)
    return make_interp_spline(knots, np.eye(n_ctrl), k=min(3, n_ctrl - 1))(np.linspace(0.0, 1.0, n_out))


def elastic_displacement(
    shape: tuple[int, int], rng: np.random.Generator, *, spacing: float = 64.0, sigma: float = 4.0
) -> np.ndarray:
    """Smooth random displacement field ``(2, h, w)`` in pixels.

    Independent ``N(0, sigma^2)`` displacements on a grid of control points ``spacing``
    pixels apart are interpolated by cubic splines (a separable product, so it costs two
    small matrix products).

    Examples
    --------
    >>> d = elastic_displacement((64, 48), np.random.default_rng(0), spacing=16, sigma=2)
    >>> d.shape
    (2, 64, 48)
    """
    if sigma < 0 or spacing <= 0:
        raise ValueError(f"need sigma >= 0 and spacing > 0, got sigma={sigma}, spacing={spacing}")
    height, width = shape
    ny, nx = (max(int(np.ceil(n / spacing)) + 1, 2) for n in (height, width))
    basis_y, basis_x = _spline_basis(height, ny), _spline_basis(width, nx)
    control = rng.normal(0.0, sigma, (2, ny, nx))
    return np.einsum("hi,cij,wj->chw", basis_y, control, basis_x, optimize=True).astype(np.float32)


def _crop_center(size: int, crop: int, rng: np.random.Generator) -> float:
    """Centre of a random crop at an integer offset: inside the image when it fits, else padded."""
    offset = rng.integers(min(0, size - crop), max(0, size - crop) + 1)
    return float(offset) + (crop - 1) / 2


def _source_coordinates(
    image_shape: tuple[int, int],
    crop: tuple[int, int],
    rng: np.random.Generator,
    *,
    rotate: bool,
    flip: bool,
    elastic: bool,
    elastic_spacing: float,
    elastic_sigma: float,
) -> np.ndarray:
    """Source (y, x) position of every output pixel, ``(2, h, w)`` float32."""
    h, w = crop
    u = np.arange(h, dtype=np.float32)[:, None] - np.float32((h - 1) / 2)
    v = np.arange(w, dtype=np.float32)[None, :] - np.float32((w - 1) / 2)
    if flip:
        u = u * np.float32(rng.choice([-1, 1]))
        v = v * np.float32(rng.choice([-1, 1]))
    u, v = np.broadcast_to(u, crop), np.broadcast_to(v, crop)
    if elastic:
        displacement = elastic_displacement(crop, rng, spacing=elastic_spacing, sigma=elastic_sigma)
        u, v = u + displacement[0], v + displacement[1]
    angle = rng.uniform(0.0, 2 * np.pi) if rotate else 0.0
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    center_y = _crop_center(image_shape[0], h, rng)
    center_x = _crop_center(image_shape[1], w, rng)
    return np.stack([center_y + cos * u - sin * v, center_x + sin * u + cos * v])


def encode_masks(instances: np.ndarray) -> np.ndarray:
    """Bit-pack a ``(K, H, W)`` bool stack into ``(n_words, H * W)`` unsigned integer words.

    Bit ``k % b`` of word ``k // b`` of a pixel is set where mask ``k`` is, with ``b`` the
    smallest of 8, 16, 32 and 64 bits that holds all ``K`` masks (64-bit words beyond that),
    so one gather moves all masks at once. :class:`WormCropDataset` encodes each sample once
    and reuses it (BBBC010's at most 15 worms per image fit in ``uint16``: 0.7 MB per image).

    Examples
    --------
    >>> masks = np.zeros((2, 1, 3), bool); masks[0, 0, 0] = masks[1, 0, 0] = masks[1, 0, 2] = True
    >>> encode_masks(masks)
    array([[3, 0, 2]], dtype=uint8)
    """
    if instances.ndim != 3:
        raise ValueError(f"instances must be (K, H, W), got shape {instances.shape}")
    k, height, width = instances.shape
    bits = next(b for b in (8, 16, 32, 64) if k <= b or b == 64)
    dtype = np.dtype(f"uint{bits}")
    flat = np.asarray(instances, dtype=bool).reshape(k, height * width)
    words = np.zeros((max(-(-k // bits), 1), height * width), dtype=dtype)
    for i, mask in enumerate(
        flat
    ):  # scatter to the (few) worm pixels only: much faster than words[mask] |= bit
        words[i // bits, np.flatnonzero(mask)] |= dtype.type(1 << (i % bits))
    return words


def _sample_masks(
    words: np.ndarray, k: int, shape: tuple[int, int], iy: np.ndarray, ix: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour lookup of ``k`` encoded masks at integer positions; False outside."""
    height, width = shape
    bits = words.dtype.itemsize * 8
    inside = (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
    gathered = np.take(words, np.where(inside, iy * width + ix, 0), axis=1)
    masks = np.empty((k,) + iy.shape, dtype=bool)
    for i in range(k):
        np.not_equal(gathered[i // bits] & words.dtype.type(1 << (i % bits)), 0, out=masks[i])
    masks &= inside
    return masks


def _pad_channels_last(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> ``((H + 3) * (W + 3), C)`` float32 with a zero border (1 before, 2 after)."""
    channels, height, width = image.shape
    padded = np.zeros((height + 3, width + 3, channels), dtype=np.float32)
    padded[1 : height + 1, 1 : width + 1] = np.moveaxis(image, 0, -1)
    return padded.reshape(-1, channels)


def _bilinear(padded: np.ndarray, shape: tuple[int, int], cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """Bilinear resampling at float positions of an image padded by :func:`_pad_channels_last`.

    Same result as :func:`scipy.ndimage.map_coordinates` with ``order=1,
    mode="grid-constant", cval=0`` (checked in the tests), but all channels move in four
    gathers. Positions are clamped to ``[-1, H] x [-1, W]``, where the border is zero.
    """
    height, width = shape
    cy = np.clip(cy, -1, height)
    cx = np.clip(cx, -1, width)
    y0, x0 = np.floor(cy), np.floor(cx)
    fy, fx = (cy - y0)[..., None], (cx - x0)[..., None]
    stride = width + 3
    corner = (y0.astype(np.intp) + 1) * stride + (x0.astype(np.intp) + 1)

    def gather(offset: int) -> np.ndarray:  # np.take is several times faster than fancy indexing here
        return np.take(padded, corner + offset, axis=0)

    top = gather(0) * (1 - fx) + gather(1) * fx
    bottom = gather(stride) * (1 - fx) + gather(stride + 1) * fx
    return np.ascontiguousarray(np.moveaxis(top * (1 - fy) + bottom * fy, -1, 0), dtype=np.float32)


def augment_sample(
    image: np.ndarray,
    instances: np.ndarray,
    rng: np.random.Generator,
    *,
    crop_size: int | tuple[int, int] = 512,
    rotate: bool = True,
    flip: bool = True,
    elastic: bool = True,
    elastic_spacing: float = 64.0,
    elastic_sigma: float = 4.0,
    min_pixels: int = MIN_PIXELS,
) -> AugmentedCrop:
    """Randomly crop, flip, rotate and elastically deform an image and its masks together.

    Parameters
    ----------
    image : np.ndarray
        ``(C, H, W)`` float image (BBBC010: ``C = 2``).
    instances : np.ndarray
        ``(K, H, W)`` bool masks.
    rng : np.random.Generator
        Source of all randomness (same state, same result).
    crop_size : int or (int, int)
        Output height and width; the image is zero-padded where the crop reaches outside it
        (always when the image is smaller than the crop, and in the corners of rotated crops).
    rotate, flip, elastic : bool
        Rotation by a uniform angle in ``[0, 2 pi)``; a random flip of each axis; a smooth
        elastic deformation (see :func:`elastic_displacement`). With all three off the result
        is a random axis-aligned crop of the input, values unchanged.
    elastic_spacing, elastic_sigma : float
        Control-point spacing and displacement standard deviation (pixels) of the deformation.
    min_pixels : int
        Instances with fewer pixels inside the crop are dropped.

    Returns
    -------
    AugmentedCrop
        ``(image float32 (C, h, w), instances bool (K', h, w))``.

    Examples
    --------
    >>> from companion.data.synthetic import make_sample
    >>> s = make_sample(0)
    >>> img, masks = augment_sample(s.image, s.instances, np.random.default_rng(1), crop_size=128)
    >>> img.shape, masks.dtype
    ((2, 128, 128), dtype('bool'))
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {image.shape}")
    if instances.ndim != 3 or instances.shape[1:] != image.shape[1:]:
        raise ValueError(
            f"instances must be (K, H, W) with (H, W) = {image.shape[1:]}, got shape {instances.shape}"
        )
    return _augment_encoded(
        _pad_channels_last(image),
        image.shape[1:],
        encode_masks(instances),
        len(instances),
        rng,
        crop_size=crop_size,
        rotate=rotate,
        flip=flip,
        elastic=elastic,
        elastic_spacing=elastic_spacing,
        elastic_sigma=elastic_sigma,
        min_pixels=min_pixels,
    )


def _augment_encoded(
    padded: np.ndarray,
    shape: tuple[int, int],
    words: np.ndarray,
    k: int,
    rng: np.random.Generator,
    *,
    crop_size: int | tuple[int, int],
    rotate: bool,
    flip: bool,
    elastic: bool,
    elastic_spacing: float = 64.0,
    elastic_sigma: float = 4.0,
    min_pixels: int = MIN_PIXELS,
) -> AugmentedCrop:
    crop = _crop_shape(crop_size)
    cy, cx = _source_coordinates(
        shape,
        crop,
        rng,
        rotate=rotate,
        flip=flip,
        elastic=elastic,
        elastic_spacing=elastic_spacing,
        elastic_sigma=elastic_sigma,
    )
    out_image = _bilinear(padded, shape, cy, cx)
    masks = _sample_masks(words, k, shape, np.rint(cy).astype(np.intp), np.rint(cx).astype(np.intp))
    keep = np.count_nonzero(masks.reshape(k, crop[0] * crop[1]), axis=1) >= min_pixels
    return AugmentedCrop(out_image, masks[keep])


class WormCropDataset(torch.utils.data.Dataset):
    """Random (augmented) crops of samples, reproducible per item.

    Item ``i`` is a crop of ``samples[i % len(samples)]`` drawn with
    ``np.random.default_rng([seed, epoch, i])``: the same index gives the same crop in any
    process (DataLoader workers included), and :meth:`set_epoch` gives new crops each epoch.
    On first use of a sample the dataset caches a zero-padded float32 copy of its image and its
    bit-packed masks (:func:`encode_masks`): about 3.6 MB per BBBC010 image, in each worker.

    Parameters
    ----------
    samples : sequence of Sample
    crop_size : int or (int, int)
    length : int, optional
        Number of items; default ``len(samples)``.
    seed : int
    augment : bool
        Flips, rotation and elastic deformation; without, a plain random crop.

    Examples
    --------
    >>> from companion.data.synthetic import make_dataset
    >>> ds = WormCropDataset(make_dataset(2, shape=(64, 64)), crop_size=32, length=4)
    >>> item = ds[3]
    >>> item["image"].shape, item["target"].dtype
    (torch.Size([2, 32, 32]), torch.int64)
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        crop_size: int | tuple[int, int] = 512,
        *,
        length: int | None = None,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        if len(samples) == 0:
            raise ValueError("samples is empty")
        self.samples = list(samples)
        self.crop_size = _crop_shape(crop_size)
        self.length = len(self.samples) if length is None else int(length)
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.seed = int(seed)
        self.augment = augment
        self.epoch = 0
        self._prepared: dict[
            int, tuple[np.ndarray, np.ndarray]
        ] = {}  # position -> (padded image, mask words)

    def set_epoch(self, epoch: int) -> None:
        """Draw different crops from now on (item ``i`` depends on ``(seed, epoch, i)``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        index %= self.length
        position = index % len(self.samples)
        sample = self.samples[position]
        if position not in self._prepared:  # done once per sample (and per DataLoader worker)
            self._prepared[position] = (_pad_channels_last(sample.image), encode_masks(sample.instances))
        padded, words = self._prepared[position]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, instances = _augment_encoded(
            padded,
            sample.image.shape[1:],
            words,
            len(sample.instances),
            rng,
            crop_size=self.crop_size,
            rotate=self.augment,
            flip=self.augment,
            elastic=self.augment,
        )
        return {
            "image": torch.from_numpy(image),
            "instances": torch.from_numpy(instances),
            "target": torch.from_numpy(three_class_target(instances)),
        }


def collate_crops(batch: Sequence[dict[str, torch.Tensor]]) -> dict:
    """Stack the images, targets and (padded) instance masks of :class:`WormCropDataset` items.

    The crops hold different numbers of worms; their masks are padded with empty masks to the
    largest count (:func:`companion.data.targets.pad_instances`), the form in which the training
    objective takes a whole batch at once.

    Returns
    -------
    dict
        ``image`` ``(B, C, h, w)`` float, ``target`` ``(B, h, w)`` int64, ``instances``
        ``(B, K, h, w)`` bool (crop ``b``'s ``K_b`` masks first, then empty ones) and ``valid``
        ``(B, K)`` bool (``valid[b, k]``: mask ``k`` of crop ``b`` is a worm).

    Examples
    --------
    >>> from companion.data.synthetic import make_dataset
    >>> ds = WormCropDataset(make_dataset(2, shape=(64, 64)), crop_size=32)
    >>> batch = collate_crops([ds[0], ds[1]])
    >>> batch["image"].shape, batch["instances"].shape[0], batch["valid"].shape[0]
    (torch.Size([2, 2, 32, 32]), 2, 2)
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    instances, valid = pad_instances([item["instances"] for item in batch])
    return {
        "image": torch.stack([item["image"] for item in batch]),
        "target": torch.stack([item["target"] for item in batch]),
        "instances": instances,
        "valid": valid,
    }
