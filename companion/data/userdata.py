"""Your own images and masks, in the form the shipped models expect (the book's "own data" page).

The shipped U-Nets were trained on BBBC010: two channels, **w1 fluorescence first, w2
brightfield second**, 12-bit camera values divided by 4095 (:data:`.bbbc010.CHANNEL_MAX`).
:func:`read_image` turns your files into that ``float32 (2, H, W)`` array:

* one multi-channel file (TIFF, or anything Pillow reads) holding ``(2, H, W)`` or ``(H, W, 2)``;
* or a pair ``(w1_file, w2_file)`` of single-channel files;
* a single-channel file alone is refused unless ``fill_missing`` says what to put in w1 (the
  model has never seen such images: read its uncertainty, and fine-tune if you can).

:func:`read_instances` reads ground truth (a label image, a ``(K, H, W)`` stack or one binary
file per object) for evaluation; :func:`load_user_images` does both for lists of files and
returns :class:`.bbbc010.Sample` objects; :func:`match_percentiles` rescales images of another
microscope towards BBBC010's intensities; :func:`save_prediction` writes the results.

Every function raises ``ValueError`` naming the file and its shape when the shape does not fit.

Examples
--------
>>> import tempfile, tifffile
>>> folder = Path(tempfile.mkdtemp())
>>> raw = np.full((2, 8, 10), 4095, np.uint16); raw[1] = 2048
>>> tifffile.imwrite(folder / "well.tif", raw)
>>> image = read_image(folder / "well.tif")
>>> image.shape, image.dtype, float(image[0].max()), round(float(image[1].max()), 3)
((2, 8, 10), dtype('float32'), 1.0, 0.5)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._io import atomic_write
from .bbbc010 import CHANNEL_MAX, Sample, rescale

__all__ = [
    "auto_scale",
    "intensity_warnings",
    "read_array",
    "read_image",
    "read_instances",
    "load_user_images",
    "match_percentiles",
    "save_prediction",
]

PathLike = str | os.PathLike
_TIFF = (".tif", ".tiff")


def read_array(path: PathLike) -> np.ndarray:
    """The pixel array of one file: TIFF with :mod:`tifffile`, other formats with Pillow.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist (names it).
    ValueError
        The file cannot be decoded, e.g. it is truncated (names it), or holds NaN / inf pixels.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder: name the image files in it (e.g. {path}/*.tif)")
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} not found")
    try:
        if path.suffix.lower() in _TIFF:
            import tifffile

            array = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                array = np.asarray(im)
    except Exception as err:  # the readers raise many types for broken files
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot read image {str(path)!r}: the file is truncated or unreadable ({detail})"
        ) from err
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise ValueError(f"image {str(path)!r} holds {int((~np.isfinite(array)).sum())} NaN or inf pixels")
    return array


def _channels_first(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] == 2:
        return array
    if array.ndim == 3 and array.shape[-1] == 2:
        return np.moveaxis(array, -1, 0)
    raise ValueError(
        f"{str(path)!r} has shape {array.shape}; expected a two-channel image (2, H, W) or (H, W, 2) "
        f"with w1 fluorescence first and w2 brightfield second, or pass the two channels as a pair of "
        f"single-channel files (w1_path, w2_path). A single-channel (H, W) file needs fill_missing=..."
    )


def _source_name(source: PathLike | Sequence[PathLike]) -> str:
    """A file, or a pair of files, as one name for messages."""
    return str(source) if isinstance(source, (str, os.PathLike)) else ", ".join(map(str, source))


def _non_empty(image: np.ndarray, source: PathLike | Sequence[PathLike]) -> np.ndarray:
    if min(image.shape[1:]) < 1:
        name = _source_name(source)
        raise ValueError(f"{name!r} holds an empty image of shape {image.shape[1:]} (H or W is 0)")
    return image


def _single(path: PathLike) -> np.ndarray:
    array = read_array(path)
    if array.ndim != 2:
        raise ValueError(
            f"{str(path)!r} has shape {array.shape}; expected one channel (H, W) in a pair of files"
        )
    return array


#: Below this 99th percentile of the brightfield (w2) an image is "nearly black" for the models:
#: BBBC010's brightfield reaches about 0.7 (four wells measured: 0.67-0.71), its fluorescence 0.03.
DARK_BRIGHTFIELD = 0.1
#: Above this share of pixels at 1.0 a channel is "clipped" (BBBC010: none; a saturated spot is not).
CLIPPED_SHARE = 0.05


def auto_scale(raw: np.ndarray) -> float:
    """The divisor of ``scale="auto"``: how the values of an image file map to ``[0, 1]``.

    Floats are taken as they are (1); 8-bit integers by their range (255); larger integers as
    a 12-bit camera's (4095, BBBC010's) when no value exceeds 4095, else by the 16-bit range
    (65535), else by their own maximum.

    >>> [auto_scale(np.array(v)) for v in (np.float32(0.5), np.uint8(7), np.uint16(4095), np.uint16(4096))]
    [1.0, 255.0, 4095.0, 65535.0]
    """
    raw = np.asarray(raw)
    if raw.dtype.kind in "fcb":
        return 1.0
    if raw.dtype.itemsize == 1:
        return 255.0
    top = float(raw.max()) if raw.size else 0.0
    return CHANNEL_MAX[0] if top <= CHANNEL_MAX[0] else 65535.0 if top <= 65535 else top


def intensity_warnings(image: np.ndarray, channels: Sequence[int] = (0, 1)) -> list[str]:
    """What sets a scaled ``(2, H, W)`` image apart from the training images, in words (or [])."""
    found = []
    for c in channels:
        name, channel = ("w1 fluorescence", "w2 brightfield")[c], image[c]
        if channel.size and float(channel.min()) == float(channel.max()):
            found.append(f"its {name} channel is constant ({float(channel.min()):.3g})")
            continue
        clipped = float((channel >= 1.0).mean())
        if clipped > CLIPPED_SHARE:
            found.append(f"{clipped:.0%} of its {name} pixels clip at 1.0 (pass a larger scale)")
        top = float(np.percentile(channel, 99)) if c == 1 and channel.size else 1.0
        if top < DARK_BRIGHTFIELD:
            found.append(
                f"its brightfield is nearly black (99th percentile {top:.3f}, "
                f"BBBC010's about 0.7; pass a smaller scale)"
            )
    return found


def _warn_intensities(image: np.ndarray, source, channels: Sequence[int] = (0, 1)) -> np.ndarray:
    name = _source_name(source)
    for message in intensity_warnings(image, channels):
        warnings.warn(f"{name}: {message}; the models were trained on BBBC010's intensities", stacklevel=3)
    return image


def _scaled(raw: np.ndarray, divisor: float) -> np.ndarray:
    if not (np.isfinite(divisor) and divisor > 0):
        raise ValueError(f"scale must be a finite number > 0, got {divisor}")
    return rescale(raw, divisor)


def read_image(
    source: PathLike | Sequence[PathLike],
    *,
    scale: float | Sequence[float] | str = "auto",
    fill_missing: float | None = None,
) -> np.ndarray:
    """One image as the models expect it: ``float32 (2, H, W)`` in ``[0, 1]``, w1 then w2.

    Parameters
    ----------
    source : path or pair of paths
        A two-channel file (``(2, H, W)`` or ``(H, W, 2)``), or ``(w1_path, w2_path)``.
    scale : "auto", float or pair of floats
        Raw values are divided by it (per channel) and clipped to ``[0, 1]``. ``"auto"``
        (default, :func:`auto_scale` of the file, or of both files of a pair): floats as they
        are, 8-bit by 255, 12-bit data (no value above 4095, BBBC010's camera) by 4095, other
        16-bit data by 65535. Give a number when you know better, and see
        :func:`match_percentiles` when your intensities differ from BBBC010's. An image that
        comes out clipped, nearly black or constant is read with a warning naming the file.
    fill_missing : float, optional
        For a single-channel ``(H, W)`` file: it is taken as the w2 brightfield, and w1 is
        filled with this constant (already scaled, in ``[0, 1]``). ``None`` (default): such a
        file raises.

    Raises
    ------
    ValueError
        A shape that is not one of the above, an empty image (H or W is 0) (the message names
        the file and its shape), two channel files of different shapes, or an unreadable file
        (a truncated one: "truncated or unreadable", naming it).

    Examples
    --------
    >>> import tempfile
    >>> from PIL import Image
    >>> folder = Path(tempfile.mkdtemp())
    >>> Image.fromarray(np.arange(0, 240, 10, np.uint8).reshape(4, 6)).save(folder / "bf.png")
    >>> read_image(folder / "bf.png")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: '.../bf.png' has shape (4, 6); expected a two-channel image ...
    >>> image = read_image(folder / "bf.png", fill_missing=0.1)  # 8 bits: divided by 255
    >>> image.shape, round(float(image[0, 0, 0]), 3), round(float(image[1, 0, 1]), 4)
    ((2, 4, 6), 0.1, 0.0392)
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        array = read_array(path)
        divisors = _divisors(scale, [array])
        if array.ndim == 2 and fill_missing is not None:
            if not (np.isfinite(fill_missing) and 0 <= fill_missing <= 1):
                raise ValueError(f"fill_missing must be a number in [0, 1], got {fill_missing!r}")
            brightfield = _scaled(array, divisors[1])
            image = np.stack([np.full_like(brightfield, np.float32(fill_missing)), brightfield])
            return _warn_intensities(_non_empty(image, path), path, channels=(1,))  # w1 is filled
        array = _channels_first(array, path)
        image = _non_empty(np.stack([_scaled(array[c], divisors[c]) for c in range(2)]), path)
        return _warn_intensities(image, path)
    paths = [Path(p) for p in source]
    if len(paths) != 2:
        raise ValueError(f"expected a path or a pair (w1_path, w2_path), got {len(paths)} paths")
    raws = [_single(p) for p in paths]
    if raws[0].shape != raws[1].shape:
        raise ValueError(
            f"channel files differ in shape: {str(paths[0])!r} {raws[0].shape} vs "
            f"{str(paths[1])!r} {raws[1].shape}"
        )
    divisors = _divisors(scale, raws)
    image = _non_empty(np.stack([_scaled(raw, d) for raw, d in zip(raws, divisors)]), paths)
    return _warn_intensities(image, paths)


def _divisors(scale: float | Sequence[float] | str, raws: Sequence[np.ndarray]) -> list[float]:
    """One divisor per channel: ``scale`` as given, or :func:`auto_scale` of all ``raws``."""
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(f"scale must be 'auto', a number or one number per channel, got {scale!r}")
        return [max(auto_scale(raw) for raw in raws)] * 2
    divisors = [float(scale)] * 2 if np.ndim(scale) == 0 else [float(s) for s in scale]
    if len(divisors) != 2:
        raise ValueError(f"scale must be one number or one per channel (2), got {scale!r}")
    return divisors


def read_instances(source: PathLike | Sequence[PathLike], shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth instances ``bool (K, H, W)`` from a label image, a stack or one file per object.

    Parameters
    ----------
    source : path or sequence of paths
        One file: a 2-D label image (0 background, each other value one object; objects cannot
        overlap) or a 3-D ``(K, H, W)`` stack of masks (non-zero = object; they may overlap).
        Several files: one 2-D binary mask per object (non-zero = object), as BBBC010's.
    shape : (H, W)
        The image's size; every mask must have it.

    Raises
    ------
    ValueError
        A mask of another size or dimension (names the file, its shape and the expected one).

    Examples
    --------
    >>> import tempfile, tifffile
    >>> folder = Path(tempfile.mkdtemp())
    >>> labels = np.zeros((4, 5), np.uint16); labels[0, :2] = 1; labels[2:, 3:] = 7
    >>> tifffile.imwrite(folder / "labels.tif", labels)
    >>> read_instances(folder / "labels.tif", (4, 5)).sum(axis=(1, 2)).tolist()
    [2, 4]
    >>> read_instances(folder / "labels.tif", (5, 4))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: mask '.../labels.tif' has shape (4, 5), but the image is (5, 4) ...
    """
    shape = tuple(int(s) for s in shape)

    def check(array: np.ndarray, path: Path, allowed: tuple[int, ...]) -> None:
        if array.ndim not in allowed or array.shape[-2:] != shape:
            kinds = "a 2-D label image or a (K, H, W) stack" if 3 in allowed else "a 2-D binary mask"
            raise ValueError(
                f"mask {str(path)!r} has shape {array.shape}, but the image is {shape} "
                f"(expected {kinds} of that size)"
            )

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        array = read_array(path)
        check(array, path, (2, 3))
        if array.ndim == 3:
            return array != 0
        labels = np.unique(array[array != 0])
        return array[None] == labels[:, None, None] if len(labels) else np.zeros((0,) + shape, bool)
    masks = []
    for p in source:
        array = read_array(p)
        check(array, Path(p), (2,))
        masks.append(array != 0)
    return np.stack(masks) if masks else np.zeros((0,) + shape, bool)


def load_user_images(
    images: Sequence[PathLike | Sequence[PathLike]],
    masks: Sequence[PathLike | Sequence[PathLike] | None] | None = None,
    *,
    names: Sequence[str] | None = None,
    scale: float | Sequence[float] | str = "auto",
    fill_missing: float | None = None,
) -> list[Sample]:
    """Your images (and masks, when you have them) as :class:`companion.data.bbbc010.Sample` objects.

    Parameters
    ----------
    images : sequence
        One :func:`read_image` source per image.
    masks : sequence, optional
        One :func:`read_instances` source (or ``None``) per image. Without masks a sample has
        no instances (``K = 0``): fine for prediction, not for evaluation.
    names : sequence of str, optional
        The samples' ``well`` names; default the (first) file's stem.
    scale, fill_missing
        Passed to :func:`read_image`.

    Raises
    ------
    ValueError
        Lists of different lengths, an empty list, a single path where a list is expected, or a
        file :func:`read_image` / :func:`read_instances` refuses.

    Examples
    --------
    >>> import tempfile, tifffile
    >>> folder = Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(folder / "a.tif", np.zeros((6, 7, 2), np.uint16))
    >>> tifffile.imwrite(folder / "a_mask.tif", np.eye(6, 7, dtype=np.uint8))
    >>> [s] = load_user_images([folder / "a.tif"], [folder / "a_mask.tif"])
    >>> s.well, s.image.shape, s.instances.shape
    ('a', (2, 6, 7), (1, 6, 7))
    """
    if isinstance(images, (str, os.PathLike)):
        raise ValueError(
            f"images must be a sequence of sources, one per image, got the single path "
            f"{str(images)!r}: wrap it in a list, [{str(images)!r}]"
        )
    images = list(images)
    if not images:
        raise ValueError("images is empty: give at least one image source")
    if isinstance(masks, (str, os.PathLike)):
        raise ValueError(
            f"masks must be a sequence, one entry per image, got the single path "
            f"{str(masks)!r}: wrap it in a list"
        )
    masks = [None] * len(images) if masks is None else list(masks)
    if len(masks) != len(images):
        raise ValueError(f"{len(images)} images but {len(masks)} mask entries")
    if names is not None and len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    samples = []
    for i, (source, mask_source) in enumerate(zip(images, masks)):
        image = read_image(source, scale=scale, fill_missing=fill_missing)
        first = source if isinstance(source, (str, os.PathLike)) else list(source)[0]
        name = names[i] if names is not None else Path(first).stem
        instances = (
            np.zeros((0,) + image.shape[1:], bool)
            if mask_source is None
            else read_instances(mask_source, image.shape[1:])
        )
        samples.append(Sample(well=name, image=image, instances=instances))
    return samples


def match_percentiles(
    image: np.ndarray, reference: np.ndarray, q: tuple[float, float] = (1.0, 99.0)
) -> np.ndarray:
    """Rescale each channel linearly so that its ``q`` percentiles equal those of ``reference``.

    A crude but transparent way to bring images of another microscope or exposure towards the
    intensities the model was trained on (pass a BBBC010 image as ``reference``). The result
    is clipped to ``[0, 1]``.

    Parameters
    ----------
    image, reference : np.ndarray
        ``(C, H, W)`` arrays with the same ``C`` (sizes may differ).
    q : (low, high)
        Percentiles matched.

    Examples
    --------
    >>> image = np.linspace(0, 1, 101, dtype=np.float32).reshape(1, 1, 101)
    >>> out = match_percentiles(image, 0.2 + 0.5 * image, q=(0, 100))
    >>> round(float(out.min()), 3), round(float(out.max()), 3)
    (0.2, 0.7)
    """
    image, reference = np.asarray(image, np.float32), np.asarray(reference, np.float32)
    if image.ndim != 3 or reference.ndim != 3 or image.shape[0] != reference.shape[0]:
        raise ValueError(
            f"expected (C, H, W) arrays with the same C, got {image.shape} and {reference.shape}"
        )
    out = np.empty_like(image)
    for c in range(len(image)):
        lo, hi = np.percentile(image[c], q)
        rlo, rhi = np.percentile(reference[c], q)
        gain = (rhi - rlo) / (hi - lo) if hi > lo else 0.0
        out[c] = rlo + (image[c] - lo) * gain
    return np.clip(out, 0.0, 1.0)


def save_prediction(
    folder: PathLike,
    name: str,
    masks: np.ndarray,
    uncertainty: np.ndarray | None = None,
    probs: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write a prediction for use in other tools (Fiji, napari, ...).

    Files (in ``folder``, created if needed):

    * ``<name>_instances.tif``: ``uint16 (K, H, W)``, instance ``k`` drawn with value ``k + 1``
      in slice ``k`` (a stack, since worms overlap);
    * ``<name>_uncertainty.png`` (with ``uncertainty``): 8-bit, 0 = certain, 255 = ``log 2`` nats,
      the largest possible Bernoulli entropy;
    * ``<name>_probabilities.tif`` (with ``probs``): ``float32 (K', H, W)`` probability maps.

    Returns
    -------
    dict
        ``{"instances": path, "uncertainty": path, "probabilities": path}`` for the files written.

    Examples
    --------
    >>> import tempfile, tifffile
    >>> masks = np.zeros((2, 3, 4), bool); masks[0, 0] = True; masks[1, 2] = True
    >>> paths = save_prediction(tempfile.mkdtemp(), "x", masks, np.full((3, 4), np.log(2)))
    >>> tifffile.imread(paths["instances"]).max(axis=(1, 2)).tolist(), sorted(paths)
    ([1, 2], ['instances', 'uncertainty'])
    """
    import tifffile
    from PIL import Image

    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be a (K, H, W) stack, got shape {masks.shape}")
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"name must be a plain file-name stem without folders, got {name!r}")
    if len(masks) > np.iinfo(np.uint16).max:
        raise ValueError(
            f"{len(masks)} instances do not fit the uint16 labels of {name}_instances.tif "
            f"(at most {np.iinfo(np.uint16).max})"
        )
    if uncertainty is not None:
        uncertainty = np.asarray(uncertainty, np.float64)
        if uncertainty.shape != masks.shape[1:]:
            raise ValueError(f"uncertainty map has shape {uncertainty.shape}, the masks {masks.shape[1:]}")
    if probs is not None:
        probs = np.asarray(probs, np.float32)
        if probs.ndim != 3 or probs.shape[1:] != masks.shape[1:]:
            raise ValueError(
                f"probs must be (K', H, W) with (H, W) = {masks.shape[1:]}, got shape {probs.shape}"
            )
    # everything is checked before the first file is written: no half-written prediction
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"instances": folder / f"{name}_instances.tif"}
    labels = masks.astype(np.uint16) * np.arange(1, len(masks) + 1, dtype=np.uint16)[:, None, None]
    atomic_write(paths["instances"], lambda tmp: tifffile.imwrite(tmp, labels, photometric="minisblack"))
    if uncertainty is not None:
        paths["uncertainty"] = folder / f"{name}_uncertainty.png"
        scaled = np.clip(uncertainty / np.log(2.0), 0.0, 1.0) * 255.0
        picture = Image.fromarray(np.rint(scaled).astype(np.uint8))
        atomic_write(paths["uncertainty"], lambda tmp: picture.save(tmp, format="PNG"))
    if probs is not None:
        paths["probabilities"] = folder / f"{name}_probabilities.tif"
        atomic_write(
            paths["probabilities"], lambda tmp: tifffile.imwrite(tmp, probs, photometric="minisblack")
        )
    return paths
