"""The augmentation of :mod:`companion.data.augment`, batched in torch on the training device.

:func:`companion.data.augment.augment_sample` prepares one crop at a time on the CPU (scipy / NumPy,
in DataLoader workers). On a GPU that keeps the network waiting: one H100 trains the ``cpu``
preset's network on hundreds of crops per second. :class:`DeviceCropSource` keeps the training
images and their masks on the device and makes a whole batch of crops there, with the *same*
random transform as the scipy path -- a random crop, a random flip of each axis, a rotation by
a uniform angle in ``[0, 2 pi)`` and a smooth elastic deformation (cubic-spline interpolated
control-point displacements, :func:`companion.data.augment.elastic_displacement`) composed into one
coordinate map over the output crop:

* the source position of every output pixel is computed in pixel units, exactly as the scipy
  path does, and resampled with :func:`torch.nn.functional.grid_sample` -- bilinearly for the
  image channels, with nearest neighbours for the masks, zero outside the image;
* the masks travel bit-packed, 24 per float32 channel (integers below ``2**24`` are exact in
  float32 and nearest-neighbour sampling copies values), so they stay exactly binary;
* instances with fewer than :data:`~companion.data.augment.MIN_PIXELS` pixels left in the crop are
  dropped (their masks emptied, marked not ``valid``) and the 3-class target is recomputed from
  the kept instances (the classes of :func:`companion.data.targets.three_class_target`, counted in
  batches), as in the scipy path. The masks leave as one padded ``(B, K_max, h, w)`` stack,
  the form the training objective takes, with no host synchronisation.

The images are zero-padded to power-of-two sizes on the device: the normalisation of pixel
positions to grid_sample's ``[-1, 1]`` and back is then exact, so integer source positions
(a plain crop, flips, multiples of 90 degrees) reproduce the input pixels exactly. (The grid is
built directly rather than by :func:`torch.nn.functional.affine_grid`, whose base grid is not
exact, and because the elastic field is not affine.)

The random parameters are drawn on the CPU from a :class:`torch.Generator`, so a seed gives the
same crops on any device (to the last bits of the floating-point resampling). They follow the
scipy path's distributions but not its random stream: the two paths give statistically
equivalent, not identical, crops.

Examples
--------
>>> from companion.data.synthetic import make_dataset
>>> source = DeviceCropSource(make_dataset(2, shape=(64, 64)), crop_size=32)
>>> batch = source.crops([0, 1, 0], torch.Generator().manual_seed(0))
>>> batch["image"].shape, batch["target"].shape, batch["instances"].shape[:1]
(torch.Size([3, 2, 32, 32]), torch.Size([3, 32, 32]), torch.Size([3]))
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .augment import MIN_PIXELS, _crop_shape, _spline_basis
from .targets import OVERLAP

if TYPE_CHECKING:  # pragma: no cover
    from .bbbc010 import Sample

__all__ = [
    "CropParams",
    "DeviceCropSource",
    "DeviceCropLoader",
    "augment_batch",
    "batch_seed",
    "BITS_PER_WORD",
]

#: Masks per float32 channel of the bit-packed mask stack (integers < 2**24 are exact).
BITS_PER_WORD = 24


class CropParams(NamedTuple):
    """The random transform of each crop of a batch (tensors of length ``B``, on the CPU).

    ``sample`` indexes the source image; ``center_y``, ``center_x`` is the crop centre in source
    pixels; ``flip_y``, ``flip_x`` are +1 or -1; ``angle`` is in radians; ``control`` holds the
    elastic control-point displacements ``(B, 2, ny, nx)`` in pixels, or ``None``.
    """

    sample: torch.Tensor
    center_y: torch.Tensor
    center_x: torch.Tensor
    flip_y: torch.Tensor
    flip_x: torch.Tensor
    angle: torch.Tensor
    control: torch.Tensor | None


def _power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@lru_cache(maxsize=16)
def _basis(n_out: int, n_ctrl: int, device: torch.device) -> torch.Tensor:
    """The scipy path's spline basis (``(n_out, n_ctrl)``, float32), kept on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(_spline_basis(n_out, n_ctrl), dtype=np.float32)).to(device)


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without waiting for the device's queue (a blocking copy
    to CUDA synchronises the stream; the source is not reused, so an asynchronous one is safe)."""
    return values.to(device, non_blocking=True)


def _n_control(n: int, spacing: float) -> int:
    return max(int(np.ceil(n / spacing)) + 1, 2)


def _as_bool_stack(masks, shape: tuple[int, int]) -> torch.Tensor:
    stack = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    if stack.ndim != 3 or tuple(stack.shape[1:]) != tuple(shape):
        raise ValueError(
            f"instances must be (K, H, W) with (H, W) = {tuple(shape)}, got shape {tuple(stack.shape)}"
        )
    return stack != 0


def _pack_words(masks: torch.Tensor, n_words: int) -> torch.Tensor:
    """``(K, H, W)`` bool -> ``(n_words, H, W)`` float32 holding 24 mask bits per channel."""
    words = torch.zeros((n_words,) + tuple(masks.shape[1:]), dtype=torch.int32, device=masks.device)
    for k in range(len(masks)):
        words[k // BITS_PER_WORD] |= masks[k].to(torch.int32) << (k % BITS_PER_WORD)
    return words.to(torch.float32)


def _class_targets(masks: torch.Tensor) -> torch.Tensor:
    """:func:`companion.data.targets.three_class_target` of every crop's masks, batched.

    ``masks (B, K, h, w)`` bool -> ``(B, h, w)`` int64. Counts in uint8 (one byte per mask
    pixel, where a sum of bools would make an int64 copy of the stack), clamped at ``OVERLAP``.
    """
    count = masks.to(torch.uint8).sum(dim=1, dtype=torch.uint8)
    return count.clamp_(max=OVERLAP).to(torch.int64)


def _unpack_words(words: torch.Tensor, k_max: int) -> torch.Tensor:
    """``(B, n_words, h, w)`` int32 mask words -> ``(B, k_max, h, w)`` bool, all bits at once."""
    bits = torch.arange(k_max, device=words.device)
    planes = words.index_select(1, bits // BITS_PER_WORD)  # (B, k_max, h, w): mask k's word
    shifts = (bits % BITS_PER_WORD).to(torch.int32).view(1, -1, 1, 1)
    return (planes >> shifts) & 1 != 0


class DeviceCropSource:
    """Images and bit-packed masks of some samples on a device, and batched augmented crops of them.

    Parameters
    ----------
    samples : sequence of Sample
        The images (``(C, H, W)``, any sizes) with their instance masks.
    crop_size : int or (int, int)
        Output height and width.
    device : str or torch.device
        Where the images are kept and the crops made.
    rotate, flip, elastic : bool
        As in :func:`companion.data.augment.augment_sample` (all off: plain random crops).
    elastic_spacing, elastic_sigma : float
        Control-point spacing and displacement standard deviation of the elastic deformation.
    min_pixels : int
        Instances with fewer pixels inside a crop are dropped.

    Notes
    -----
    Memory on the device: ``(C + ceil(K_max / 24)) * 4`` bytes per pixel of the images padded to
    powers of two; 503 MB for the 40 BBBC010 fitting wells (1024 x 1024 each, 2 channels, 1
    mask word). Unpacking a batch's masks takes ``5 * K_max`` bytes per crop pixel for a moment
    (630 MB for 32 crops of 512 x 512 with the fitting wells' ``K_max = 15``).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        crop_size: int | tuple[int, int] = 512,
        *,
        device: str | torch.device = "cpu",
        rotate: bool = True,
        flip: bool = True,
        elastic: bool = True,
        elastic_spacing: float = 64.0,
        elastic_sigma: float = 4.0,
        min_pixels: int = MIN_PIXELS,
    ) -> None:
        if len(samples) == 0:
            raise ValueError("samples is empty")
        if elastic_sigma < 0 or elastic_spacing <= 0:
            raise ValueError(
                f"need elastic_sigma >= 0 and elastic_spacing > 0, got sigma={elastic_sigma}, "
                f"spacing={elastic_spacing}"
            )
        self.crop = _crop_shape(crop_size)
        self.device = torch.device(device)
        self.rotate, self.flip, self.elastic = bool(rotate), bool(flip), bool(elastic)
        self.elastic_spacing, self.elastic_sigma = float(elastic_spacing), float(elastic_sigma)
        self.min_pixels = int(min_pixels)
        images = [torch.as_tensor(np.asarray(s.image, dtype=np.float32)) for s in samples]
        if any(im.ndim != 3 or im.shape[0] != images[0].shape[0] for im in images):
            raise ValueError(
                f"images must be (C, H, W) with one C, got shapes {[tuple(im.shape) for im in images][:4]}"
            )
        masks = [_as_bool_stack(s.instances, im.shape[1:]) for s, im in zip(samples, images)]
        self.channels = int(images[0].shape[0])
        self.sizes = torch.tensor([tuple(im.shape[1:]) for im in images], dtype=torch.int64)  # (N, 2)
        self.counts = [len(m) for m in masks]
        self.k_max = max(self.counts)
        self.n_words = max(-(-self.k_max // BITS_PER_WORD), 1)
        self.padded = (_power_of_two(int(self.sizes[:, 0].max())), _power_of_two(int(self.sizes[:, 1].max())))
        padded_images = torch.zeros((len(images), self.channels) + self.padded, dtype=torch.float32)
        words = torch.zeros((len(images), self.n_words) + self.padded, dtype=torch.float32)
        for i, (image, mask) in enumerate(zip(images, masks)):
            height, width = image.shape[1:]
            padded_images[i, :, :height, :width] = image
            words[i, :, :height, :width] = _pack_words(mask, self.n_words)
        self.images, self.words = padded_images.to(self.device), words.to(self.device)
        self._counts = torch.tensor(self.counts, dtype=torch.int64, device=self.device)

    def __len__(self) -> int:
        return len(self.counts)

    def draw(self, samples: Sequence[int], generator: torch.Generator | None = None) -> CropParams:
        """Random transforms (distributed as in the scipy path) of crops of the given samples."""
        index = torch.as_tensor(list(samples), dtype=torch.int64)
        if index.ndim != 1 or len(index) == 0 or int(index.min()) < 0 or int(index.max()) >= len(self):
            raise ValueError(
                f"samples must be a non-empty list of indices in [0, {len(self)}), got {list(samples)[:8]}"
            )
        n = len(index)
        h, w = self.crop
        sizes = self.sizes[index].to(torch.float64)
        crop = torch.tensor([h, w], dtype=torch.float64)
        low, high = (
            torch.minimum(sizes - crop, torch.zeros(2, dtype=torch.float64)),
            torch.maximum(sizes - crop, torch.zeros(2, dtype=torch.float64)),
        )
        offset = (
            torch.floor(torch.rand((n, 2), generator=generator, dtype=torch.float64) * (high - low + 1)) + low
        )
        offset = torch.minimum(offset, high)  # guards rand() == 1 - eps rounding up
        center = offset + (crop - 1) / 2
        flips = (
            1.0 - 2.0 * torch.randint(0, 2, (n, 2), generator=generator).to(torch.float64)
            if self.flip
            else torch.ones((n, 2), dtype=torch.float64)
        )
        angle = (
            torch.rand(n, generator=generator, dtype=torch.float64) * (2 * math.pi)
            if self.rotate
            else torch.zeros(n, dtype=torch.float64)
        )
        control = None
        if self.elastic:
            shape = (n, 2, _n_control(h, self.elastic_spacing), _n_control(w, self.elastic_spacing))
            control = torch.randn(shape, generator=generator, dtype=torch.float64) * self.elastic_sigma
        return CropParams(index, center[:, 0], center[:, 1], flips[:, 0], flips[:, 1], angle, control)

    def source_positions(self, params: CropParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Source ``(y, x)`` pixel position of every output pixel, two ``(B, h, w)`` float32 tensors.

        The arithmetic of :func:`companion.data.augment._source_coordinates`: centred output
        coordinates, flipped, displaced, rotated and shifted to the crop centre.
        """
        h, w = self.crop
        dev, f32 = self.device, torch.float32

        def col(values: torch.Tensor) -> torch.Tensor:  # (B,) float64 -> (B, 1, 1) float32 on the device
            return _to_device(values.to(dtype=f32), dev).view(-1, 1, 1)

        u = (torch.arange(h, dtype=f32, device=dev) - (h - 1) / 2).view(1, h, 1) * col(params.flip_y)
        v = (torch.arange(w, dtype=f32, device=dev) - (w - 1) / 2).view(1, 1, w) * col(params.flip_x)
        u, v = u.expand(-1, h, w), v.expand(-1, h, w)
        if params.control is not None:
            ny, nx = params.control.shape[2:]
            displacement = torch.einsum(
                "hi,bcij,wj->bchw",
                _basis(h, ny, dev),
                _to_device(params.control.to(dtype=f32), dev),
                _basis(w, nx, dev),
            )
            u, v = u + displacement[:, 0], v + displacement[:, 1]
        cos, sin = col(torch.cos(params.angle)), col(torch.sin(params.angle))
        return col(params.center_y) + cos * u - sin * v, col(params.center_x) + sin * u + cos * v

    def warp(self, params: CropParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Warped images ``(B, C, h, w)`` and all ``K_max`` masks ``(B, K_max, h, w)`` bool."""
        y, x = self.source_positions(params)
        height, width = self.padded
        # exact for power-of-two sizes: grid_sample maps g back to ((g + 1) * size - 1) / 2
        grid = torch.stack([(2 * x + 1) / width - 1, (2 * y + 1) / height - 1], dim=-1)
        index = _to_device(params.sample, self.device)
        image = F.grid_sample(
            self.images.index_select(0, index),
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        words = F.grid_sample(
            self.words.index_select(0, index), grid, mode="nearest", padding_mode="zeros", align_corners=False
        ).to(torch.int32)
        return image, _unpack_words(words, self.k_max)

    def crops(
        self,
        samples: Sequence[int],
        generator: torch.Generator | None = None,
        *,
        params: CropParams | None = None,
    ) -> dict:
        """A training batch of augmented crops of ``samples`` (indices, repeats allowed).

        Returns
        -------
        dict
            As :func:`companion.data.augment.collate_crops`, on the device, with ``K = k_max`` (the
            largest mask count of the source): ``image (B, C, h, w)`` float32, ``target
            (B, h, w)`` int64, ``instances (B, K, h, w)`` bool and ``valid (B, K)`` bool. The
            masks of instances with fewer than ``min_pixels`` pixels in their crop, and of
            padding, are empty and not valid. Nothing waits for the device.
        """
        params = self.draw(samples, generator) if params is None else params
        image, masks = self.warp(params)
        counts = masks.flatten(2).sum(dim=2, dtype=torch.int32)  # (B, K_max)
        own = (
            torch.arange(self.k_max, device=self.device)[None]
            < self._counts[_to_device(params.sample, self.device)][:, None]
        )
        valid = (counts >= self.min_pixels) & own
        masks &= valid[:, :, None, None]
        return {"image": image, "target": _class_targets(masks), "instances": masks, "valid": valid}


def augment_batch(
    images,
    instances: Sequence,
    generator: torch.Generator | None = None,
    *,
    crop_size: int | tuple[int, int] = 512,
    rotate: bool = True,
    flip: bool = True,
    elastic: bool = True,
    elastic_spacing: float = 64.0,
    elastic_sigma: float = 4.0,
    min_pixels: int = MIN_PIXELS,
) -> dict:
    """One augmented crop of each image of a batch, on the images' device.

    The batched counterpart of :func:`companion.data.augment.augment_sample`.

    Parameters
    ----------
    images : torch.Tensor or np.ndarray
        ``(B, C, H, W)`` float images.
    instances : sequence of B bool arrays or tensors
        ``(K_b, H, W)`` masks of each image.
    generator : torch.Generator, optional
        CPU generator of the random transforms (same state, same crops).
    crop_size, rotate, flip, elastic, elastic_spacing, elastic_sigma, min_pixels
        As in :func:`companion.data.augment.augment_sample`.

    Returns
    -------
    dict
        As :meth:`DeviceCropSource.crops`: ``image (B, C, h, w)``, ``target (B, h, w)``,
        ``instances (B, K, h, w)`` (``K = max(K_b)``, dropped and padding masks empty) and
        ``valid (B, K)``.

    Examples
    --------
    >>> from companion.data.synthetic import make_sample
    >>> s = make_sample(0, shape=(64, 64))
    >>> out = augment_batch(torch.from_numpy(s.image)[None], [s.instances], crop_size=32)
    >>> out["image"].shape, out["instances"][0].dtype
    (torch.Size([1, 2, 32, 32]), torch.bool)
    """
    images = torch.as_tensor(images)
    if images.ndim != 4 or len(images) != len(instances):
        raise ValueError(
            f"images must be (B, C, H, W) with one instance stack each, got shape "
            f"{tuple(images.shape)} and {len(instances)} stacks"
        )
    device = images.device
    samples = [_TensorSample(image, masks) for image, masks in zip(images.cpu(), instances)]
    source = DeviceCropSource(
        samples,
        crop_size,
        device=device,
        rotate=rotate,
        flip=flip,
        elastic=elastic,
        elastic_spacing=elastic_spacing,
        elastic_sigma=elastic_sigma,
        min_pixels=min_pixels,
    )
    return source.crops(range(len(samples)), generator)


class _TensorSample(NamedTuple):
    image: torch.Tensor
    instances: object


def batch_seed(seed: int, first_index: int) -> int:
    """Seed of the transforms of the batch whose first crop has the global index ``first_index``.

    >>> batch_seed(0, 8) == batch_seed(0, 8) != batch_seed(0, 16)
    True
    """
    state = np.random.SeedSequence([int(seed) % 2**63, int(first_index)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class DeviceCropLoader:
    """Training batches of iterations ``start .. stop - 1`` made on the device, for one rank.

    The crop order is the one of :func:`companion.training.batches.make_loader`: iteration ``t`` of rank
    ``r`` (of ``world_size``) reads the global crop indices ``(t * world_size + r) * B + j``,
    crop ``i`` is of sample ``i % len(samples)``, and the transforms of a batch are drawn from a
    generator seeded with :func:`batch_seed` of ``(seed, first index)``: resuming at iteration
    ``t`` gives the batches an uninterrupted run reads.

    Examples
    --------
    >>> from companion.data.synthetic import make_dataset
    >>> source = DeviceCropSource(make_dataset(2, shape=(64, 64)), crop_size=32)
    >>> loader = DeviceCropLoader(source, start=1, stop=3, batch_size=2)
    >>> len(loader), [tuple(b["image"].shape) for b in loader]
    (2, [(2, 2, 32, 32), (2, 2, 32, 32)])
    """

    def __init__(
        self,
        source: DeviceCropSource,
        *,
        start: int,
        stop: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                f"rank={rank}, world_size={world_size}"
            )
        self.source = source
        self.start, self.stop = int(start), int(stop)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def batch(self, iteration: int) -> dict:
        """The batch of one iteration (a pure function of seed, iteration, rank)."""
        first = (iteration * self.world_size + self.rank) * self.batch_size
        indices = range(first, first + self.batch_size)
        generator = torch.Generator().manual_seed(batch_seed(self.seed, first))
        return self.source.crops([i % len(self.source) for i in indices], generator)

    def __iter__(self) -> Iterator[dict]:
        for iteration in range(self.start, self.stop):
            yield self.batch(iteration)
