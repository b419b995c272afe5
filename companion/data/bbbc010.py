"""The BBBC010 *C. elegans* live/dead data set: well ids, the standard splits and a loader.

BBBC010 (Broad Bioimage Benchmark Collection) holds 100 wells (``A01`` .. ``E04``) of a
384-well plate, each imaged in two channels of 520 x 696 pixels:

* ``w1`` -- Sytox Orange fluorescence ("TRITC"; dead worms take up the stain and glow),
* ``w2`` -- transmitted light (brightfield; every worm is visible),

and one binary mask per worm (``<WELL>_NN_ground_truth.png``). Worms overlap, so the ground
truth is a *stack* of binary masks ``(K, H, W)``, never a label image.

:func:`load_bbbc010` returns one :class:`Sample` per well; :func:`fetch_bbbc010` downloads and
unpacks the official archives into a cache when no local copy is given.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [  # noqa: RUF022 (the order of the module)
    "WELLS", "TRAIN_WELLS", "VAL_WELLS", "FIT_WELLS", "TEST_WELLS", "TEST_FOLDS", "IMAGE_SHAPE",
    "CHANNEL_MAX", "BASE_URL", "IMAGES_ZIP", "MASKS_ZIP", "Sample", "IncompleteWellError",
    "CorruptFileError", "BBBC010Layout", "find_layout", "resolve_root", "default_cache_dir",
    "fetch_bbbc010", "load_well", "load_masks", "load_bbbc010", "normalize", "rescale",
    "BBBC010DownloadError",
]  # fmt: skip

#: The 100 well ids of BBBC010, row-major: ``A01`` .. ``A24``, ``B01`` .. ``D24``, ``E01`` .. ``E04``.
WELLS: tuple[str, ...] = tuple(f"{row}{col:02d}" for row in "ABCD" for col in range(1, 25)) + tuple(
    f"E{col:02d}" for col in range(1, 5)
)

#: The standard 50/50 split used by Rumberger et al. (2020) and PatchPerPix
#: (Kainmueller-Lab/PatchPerPix_experiments, ``wormbodies/01_data/trainTestSplit.py``):
#: the first 50 wells train, the last 50 test.
TRAIN_WELLS: tuple[str, ...] = WELLS[:50]
TEST_WELLS: tuple[str, ...] = WELLS[50:]
#: A fixed validation subset of the training wells (every fifth, from ``A03``): held out from
#: training; every recipe and post-processing choice is decided on these, never on test wells.
VAL_WELLS: tuple[str, ...] = TRAIN_WELLS[2::5]
#: The training wells the networks are fitted on: :data:`TRAIN_WELLS` without :data:`VAL_WELLS`.
FIT_WELLS: tuple[str, ...] = tuple(w for w in TRAIN_WELLS if w not in VAL_WELLS)

_FOLD1 = (
    "C03 C06 C07 C12 C13 C14 C15 C19 C21 C22 C24 D02 D03 D04 D05 D08 D10 D12 D14 D17 D18 D20 D22 D24 E03"
).split()
_FOLD2 = (
    "C04 C05 C08 C09 C10 C11 C16 C17 C18 C20 C23 D01 D06 D07 D09 D11 D13 D15 D16 D19 D21 D23 E01 E02 E04"
).split()
#: The 2-fold cross-validation split of the 50 test wells (25 + 25), as listed in
#: Kainmueller-Lab/PatchPerPix_experiments, ``wormbodies/03_results/info_dataset_split.txt``:
#: hyper-parameters (e.g. the post-processing thresholds) are tuned on one fold and
#: evaluated on the other.
TEST_FOLDS: tuple[tuple[str, ...], tuple[str, ...]] = (tuple(_FOLD1), tuple(_FOLD2))

#: Height and width of every BBBC010 image.
IMAGE_SHAPE: tuple[int, int] = (520, 696)

#: Fixed divisor per channel (w1, w2) used to map the raw ``uint16`` values to ``[0, 1]``.
#: The camera is 12-bit: over all 195 TIFFs of BBBC010 the raw values span 78 .. 4095 (w1) and
#: 81 .. 3072 (w2), so dividing by the 12-bit full scale ``4095`` maps every image into
#: ``[0, 1]`` without clipping and keeps intensities comparable across wells (a per-image
#: min/max would make a well of only live, dim worms look as bright as one of dead worms).
CHANNEL_MAX: tuple[float, float] = (4095.0, 4095.0)

#: Where the official archives live; :func:`fetch_bbbc010` appends the archive names.
BASE_URL = "https://data.broadinstitute.org/bbbc/BBBC010/"
IMAGES_ZIP = "BBBC010_v2_images.zip"
MASKS_ZIP = "BBBC010_v1_foreground_eachworm.zip"

_IMAGE_DIR_NAMES = ("images", "BBBC010_v2_images", "BBBC010_v1_images")
_MASK_DIR_NAMES = ("masks_eachworm", "BBBC010_v1_foreground_eachworm")
_MASK_RE = re.compile(r"^([A-E]\d\d)_(\d+)_ground_truth\.png$")
_CHANNELS = ("w1", "w2")


@dataclass(frozen=True, eq=False)
class Sample:
    """One well: a two-channel image and its stack of (overlapping) worm masks.

    Attributes
    ----------
    well : str
        Well id (``"A01"``) or, for synthetic data, ``"SYN-<seed>"``.
    image : np.ndarray
        ``float32`` array ``(2, H, W)`` in ``[0, 1]``; channel 0 is the w1 fluorescence,
        channel 1 the w2 brightfield.
    instances : np.ndarray
        ``bool`` array ``(K, H, W)``, one binary mask per worm (``K`` may be 0).
    """

    well: str
    image: np.ndarray
    instances: np.ndarray

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[0] != 2:
            raise ValueError(f"Sample {self.well}: image must be (2, H, W), got shape {self.image.shape}")
        if self.instances.ndim != 3 or self.instances.shape[1:] != self.image.shape[1:]:
            raise ValueError(
                f"Sample {self.well}: instances must be (K, H, W) with (H, W) = {self.image.shape[1:]}, "
                f"got shape {self.instances.shape}"
            )

    def __repr__(self) -> str:
        return (
            f"Sample(well={self.well!r}, image={self.image.dtype}{list(self.image.shape)}, "
            f"instances={self.instances.dtype}{list(self.instances.shape)})"
        )


class IncompleteWellError(FileNotFoundError):
    """A well lacks one of its image channels (BBBC010 v1: C13 and C14 lack both, D24 lacks w2)."""


class CorruptFileError(OSError):
    """An image or mask file exists but cannot be decoded, or has an unexpected shape."""


@dataclass(frozen=True)
class BBBC010Layout:
    """Where the image TIFFs and the per-worm mask PNGs of one BBBC010 copy lie."""

    images: Path
    masks: Path


def _candidate_dirs(root: Path, names: Sequence[str]) -> list[Path]:
    """``root/name``, ``root/*/name`` and ``root/*/*/name`` for each name (unzipped archives nest)."""
    found: list[Path] = []
    for depth in ("", "*/", "*/*/"):
        for name in names:
            found.extend(p for p in sorted(root.glob(depth + name)) if p.is_dir())
    return found


def find_layout(root: str | os.PathLike) -> BBBC010Layout:
    """Locate the image and mask folders of a BBBC010 copy.

    Two layouts are accepted, nested up to two folders deep (as unzipping leaves them):
    the official archive folders (``BBBC010_v2_images/`` or ``BBBC010_v1_images/`` with
    ``BBBC010_v1_foreground_eachworm/``) and the flat ``images/`` + ``masks_eachworm/``.
    The ``foreground/`` folder is never used: its masks are shifted down by one row.

    Parameters
    ----------
    root : path
        Folder holding the copy.

    Returns
    -------
    BBBC010Layout

    Raises
    ------
    FileNotFoundError
        If no folder with ``*_w?_*.tif`` images or ``*_ground_truth.png`` masks is found;
        the message lists the folder names looked for.

    Examples
    --------
    >>> find_layout("/data/bbbc010")  # doctest: +SKIP
    BBBC010Layout(images=PosixPath('/data/bbbc010/images'), masks=PosixPath('/data/bbbc010/masks_eachworm'))
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BBBC010 root {str(root)!r} is not a directory")
    images = [d for d in _candidate_dirs(root, _IMAGE_DIR_NAMES) if any(d.glob("*_w[12]_*.tif"))]
    masks = [d for d in _candidate_dirs(root, _MASK_DIR_NAMES) if any(d.glob("*_ground_truth.png"))]
    if not images or not masks:
        raise FileNotFoundError(
            f"no BBBC010 layout under {str(root)!r}: looked for an image folder named one of "
            f"{_IMAGE_DIR_NAMES} holding '*_w1_*.tif'/'*_w2_*.tif' files (found: {bool(images)}) and a "
            f"mask folder named one of {_MASK_DIR_NAMES} holding '*_ground_truth.png' files "
            f"(found: {bool(masks)}), directly under the root or up to two folders below it"
        )
    return BBBC010Layout(images=images[0], masks=masks[0])


def default_cache_dir() -> Path:
    """The download cache, ``pooch.os_cache("companion") / "bbbc010"``."""
    import pooch

    return Path(pooch.os_cache("companion")) / "bbbc010"


class BBBC010DownloadError(OSError):
    """The official BBBC010 archives could not be downloaded (no network, server error)."""


def fetch_bbbc010(
    cache_dir: str | os.PathLike | None = None, base_url: str | None = None, *, progress: bool = True
) -> Path:
    """Download and unpack the official BBBC010 archives (images v2, per-worm masks v1).

    The archives are fetched with :func:`pooch.retrieve` and unzipped with
    :class:`pooch.Unzip`; files already in the cache are not downloaded again. No checksum is
    pinned (``known_hash=None``): the Broad Institute publishes none for these archives, so
    the loader instead validates what it reads (shapes, decodability) and fails loudly.

    Parameters
    ----------
    cache_dir : path, optional
        Where to store the archives and their contents; default :func:`default_cache_dir`.
    base_url : str, optional
        URL prefix of the two archives; default :data:`BASE_URL` (tests point it at a local server).
    progress : bool
        Show pooch's download progress bar.

    Returns
    -------
    pathlib.Path
        The cache folder, a valid root for :func:`load_bbbc010`.

    Examples
    --------
    >>> root = fetch_bbbc010()  # doctest: +SKIP
    >>> samples = load_bbbc010(root, wells=["A01"])  # doctest: +SKIP
    """
    import pooch

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base_url = BASE_URL if base_url is None else base_url
    if not base_url.endswith("/"):
        base_url += "/"
    cache_dir.mkdir(parents=True, exist_ok=True)
    for archive in (IMAGES_ZIP, MASKS_ZIP):
        try:
            pooch.retrieve(
                url=base_url + archive,
                known_hash=None,
                fname=archive,
                path=cache_dir,
                processor=pooch.Unzip(extract_dir=archive[: -len(".zip")] + ".unzip"),
                progressbar=progress,
            )
        except OSError as error:  # requests' ConnectionError and HTTPError are OSErrors
            raise BBBC010DownloadError(
                f"could not download {base_url + archive} into {cache_dir} ({error}). Without "
                f"network access, pass root=... or set $BBBC010_ROOT to a folder that holds the "
                f"BBBC010 images and per-worm masks"
            ) from error
    find_layout(cache_dir)  # fail here, naming what was looked for, if the archives were odd
    return cache_dir


def resolve_root(root: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Pick the BBBC010 root: the argument, else ``$BBBC010_ROOT``, else the download cache.

    If neither an argument nor ``$BBBC010_ROOT`` is given and the cache holds no copy, the
    archives are downloaded there with :func:`fetch_bbbc010` (unless ``download=False``).

    Examples
    --------
    >>> resolve_root("/data/bbbc010")  # doctest: +SKIP
    PosixPath('/data/bbbc010')
    """
    if root is not None:
        return Path(root)
    env = os.environ.get("BBBC010_ROOT")
    if env:
        return Path(env)
    cache = default_cache_dir()
    try:
        find_layout(cache)
        return cache
    except FileNotFoundError:
        if not download:
            raise
    return fetch_bbbc010(cache)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        array = tifffile.imread(path)
    except Exception as err:  # tifffile raises many types for broken files
        raise CorruptFileError(
            f"cannot read TIFF {str(path)!r}: the file is truncated or unreadable ({err})"
        ) from err
    if array.ndim != 2:
        raise CorruptFileError(f"TIFF {str(path)!r} should be a 2-D image, got shape {array.shape}")
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise CorruptFileError(
            f"TIFF {str(path)!r} holds {int((~np.isfinite(array)).sum())} NaN or inf pixels"
        )
    return array


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("L"))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
        raise CorruptFileError(f"cannot read mask PNG {str(path)!r}: {err}") from err
    return array > 0


def _channel_file(images: Path, well: str, channel: str) -> Path:
    pattern = f"*_{well}_{channel}_*.tif"
    matches = sorted(images.glob(pattern))
    if not matches:
        raise IncompleteWellError(
            f"well {well}: missing channel {channel} (no file matching {pattern!r} in {str(images)!r})"
        )
    if len(matches) > 1:
        raise ValueError(f"well {well}: several files match {pattern!r}: {[m.name for m in matches]}")
    return matches[0]


def _mask_files(masks: Path, well: str) -> list[Path]:
    files = []
    for path in masks.glob(f"{well}_*_ground_truth.png"):
        match = _MASK_RE.match(path.name)
        if match and match.group(1) == well:
            files.append((int(match.group(2)), path))
    return [p for _, p in sorted(files)]


def normalize(raw: np.ndarray, channel: int) -> np.ndarray:
    """Map raw camera values of channel 0 (w1) or 1 (w2) to ``float32`` in ``[0, 1]``.

    Divides by the fixed :data:`CHANNEL_MAX` and clips, so intensities stay comparable
    between wells.

    Examples
    --------
    >>> normalize(np.array([[0, 4095, 5000]], np.uint16), 0)
    array([[0., 1., 1.]], dtype=float32)
    """
    return rescale(raw, CHANNEL_MAX[channel])


def rescale(raw: np.ndarray, divisor: float) -> np.ndarray:
    """``raw / divisor`` as ``float32``, clipped to ``[0, 1]`` (:func:`normalize` with any divisor).

    Examples
    --------
    >>> rescale(np.array([[0, 1024, 4096]], np.uint16), 2048)
    array([[0. , 0.5, 1. ]], dtype=float32)
    """
    return np.clip(raw.astype(np.float32) / np.float32(divisor), 0.0, 1.0)


def load_well(layout: BBBC010Layout, well: str) -> Sample:
    """Load one well of a located BBBC010 copy (see :func:`load_bbbc010` for the errors).

    Examples
    --------
    >>> load_well(find_layout("/data/bbbc010"), "A01").instances.shape  # doctest: +SKIP
    (10, 520, 696)
    """
    paths = [_channel_file(layout.images, well, ch) for ch in _CHANNELS]
    raws = [_read_tiff(p) for p in paths]
    if raws[0].shape != raws[1].shape:
        raise CorruptFileError(
            f"well {well}: channel shapes differ: {paths[0].name} {raws[0].shape} vs {paths[1].name} {raws[1].shape}"
        )
    image = np.stack([normalize(raw, c) for c, raw in enumerate(raws)])
    return Sample(well=well, image=image, instances=load_masks(layout, well, image.shape[1:]))


def load_masks(layout: BBBC010Layout, well: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The instance masks ``bool (K, H, W)`` of one well, also of a well whose image is
    incomplete (C13, C14, D24: their masks are whole); ``shape`` checks them (else the first's)."""
    masks = []
    for path in _mask_files(layout.masks, well):
        mask = _read_mask(path)
        shape = mask.shape if shape is None else tuple(shape)
        if mask.shape != shape:
            raise ValueError(
                f"mask {str(path)!r} has shape {mask.shape} but well {well}'s images have {shape}"
            )
        if not mask.any():  # no worm: a broken export, not an instance (it could never be matched)
            warnings.warn(
                f"mask {str(path)!r} is all zero (no worm pixel): dropped from well {well}", stacklevel=2
            )
            continue
        masks.append(mask)
    return np.stack(masks) if masks else np.zeros((0, *(shape or (0, 0))), dtype=bool)


def _check_wells(wells: Iterable[str] | str | None) -> list[str]:
    if wells is None:
        return list(WELLS)
    if isinstance(wells, str):
        wells = [wells]
    wells = list(wells)
    if not wells:
        raise ValueError("wells is empty: name at least one well, or pass None for all of them")
    unknown = [w for w in wells if w not in WELLS]
    if unknown:
        raise ValueError(
            f"unknown well id(s) {unknown}; valid ids are {WELLS[0]}..{WELLS[-1]}: {', '.join(WELLS)}"
        )
    return wells


def load_bbbc010(
    root: str | os.PathLike | None = None,
    wells: Iterable[str] | None = None,
    *,
    skip_incomplete: bool = False,
    progress: bool = True,
) -> list[Sample]:
    """Load BBBC010 wells as :class:`Sample` objects.

    Parameters
    ----------
    root : path, optional
        Folder with a BBBC010 copy (see :func:`find_layout` for the accepted layouts), or an
        archive of wells written by :func:`companion.data.archive.pack_samples`. Default:
        ``$BBBC010_ROOT``, else the download cache (``pooch.os_cache("companion")/bbbc010``),
        downloading the official archives there with :func:`fetch_bbbc010` when it is empty.
    wells : iterable of str, optional
        Well ids to load, in that order; default all of :data:`WELLS`.
    skip_incomplete : bool
        Skip wells that lack an image channel (with a warning naming them) instead of raising.
        In the BBBC010 v1 image set C13 and C14 lack both channels and D24 lacks w2.
    progress : bool
        Show a tqdm progress bar while loading more than one well.

    Returns
    -------
    list of Sample
        Images ``float32 (2, H, W)`` scaled by the fixed :data:`CHANNEL_MAX` (see there why),
        instances ``bool (K, H, W)`` ordered by the mask files' worm number; ``K = 0`` for a
        well without masks. An all-zero mask file is dropped with a warning naming it.

    Raises
    ------
    ValueError
        Unknown well id (the message lists the valid ids), or a mask whose shape differs from
        its image (the message gives both shapes).
    IncompleteWellError
        A well lacks a channel and ``skip_incomplete`` is False (names the well and the file
        pattern looked for).
    CorruptFileError
        A TIFF or PNG cannot be decoded (names the file).
    FileNotFoundError
        ``root`` holds no BBBC010 layout (names the folders looked for).

    Examples
    --------
    >>> samples = load_bbbc010("/data/bbbc010", wells=TRAIN_WELLS[:2])  # doctest: +SKIP
    >>> samples[0].image.shape, samples[0].instances.dtype  # doctest: +SKIP
    ((2, 520, 696), dtype('bool'))
    """
    wells = _check_wells(wells)
    root = resolve_root(root)
    if root.is_file():  # wells packed into one file (companion.data.archive)
        from .archive import read_archive

        return read_archive(root, wells, skip_missing=skip_incomplete)
    layout = find_layout(root)
    from tqdm import tqdm

    samples, skipped = [], []
    for well in tqdm(wells, desc="loading BBBC010", unit="well", disable=not progress or len(wells) < 2):
        try:
            samples.append(load_well(layout, well))
        except IncompleteWellError:
            if not skip_incomplete:
                raise
            skipped.append(well)
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} incomplete well(s) lacking an image channel: {', '.join(skipped)}",
            stacklevel=2,
        )
    return samples
