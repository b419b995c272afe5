"""BBBC010 wells in one file: a lossless archive that travels where the data folder cannot.

A machine that sees only a copy of the working tree (a rented GPU, a container) has no BBBC010
folder and may have no internet. :func:`pack_samples` writes loaded wells into one ``.npz``
(44 MiB for the 50 training wells and the 47 complete test wells), and every
command that takes ``--data-root`` also takes the archive: :func:`companion.data.bbbc010.load_bbbc010`
reads it with :func:`read_archive`, bit-identical to loading the folder.

The format: per well, ``<well>_image`` the raw camera counts as two byte planes
``uint8 (2, C, H, W)`` (high byte first: the high planes of a 12-bit camera hold 4 bits and
compress well apart from the noisy low ones), ``<well>_masks`` the instance masks bit-packed
along the rows (:func:`numpy.packbits`) and ``<well>_shape`` ``(K, H, W)``; members are
LZMA-compressed, and :func:`numpy.load` reads them without pickles.

Examples
--------
>>> import tempfile, os
>>> from companion.data.bbbc010 import Sample
>>> image = np.stack([np.full((4, 5), 7, np.uint16), np.arange(20, dtype=np.uint16).reshape(4, 5)])
>>> sample = Sample(well="A01", image=image / np.float32(4095), instances=np.eye(5, dtype=bool)[None, :4])
>>> path = os.path.join(tempfile.mkdtemp(), "wells.npz")
>>> pack_samples([sample], path) > 0
True
>>> again = read_archive(path)
>>> again[0].well, np.array_equal(again[0].image, sample.image.astype(np.float32))
('A01', True)
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .._io import atomic_write
from .bbbc010 import CHANNEL_MAX, Sample, normalize

__all__ = ["ARCHIVE_FORMAT", "pack_samples", "archive_wells", "read_archive"]

#: ``format`` entry of an archive.
ARCHIVE_FORMAT = "companion-bbbc010-pack"
ARCHIVE_VERSION = 1


def _raw_counts(sample: Sample) -> np.ndarray:
    """The raw camera counts ``uint16 (C, H, W)`` behind a loaded image (checked to be exact)."""
    image = np.asarray(sample.image, dtype=np.float32)
    raw = np.stack([np.rint(np.asarray(ch, np.float64) * CHANNEL_MAX[c]) for c, ch in enumerate(image)])
    if raw.min() < 0 or raw.max() > np.iinfo(np.uint16).max:
        raise ValueError(
            f"well {sample.well}: image values outside [0, 65535 / {CHANNEL_MAX[0]:g}]: cannot pack"
        )
    raw = raw.astype(np.uint16)
    if not all(np.array_equal(normalize(raw[c], c), image[c]) for c in range(len(image))):
        raise ValueError(
            f"well {sample.well}: the image is not raw camera counts / CHANNEL_MAX, so it cannot "
            f"be packed losslessly as uint16"
        )
    return raw


def pack_samples(samples: Sequence[Sample], path: str | os.PathLike, *, note: str = "") -> int:
    """Write loaded wells losslessly into the archive ``path`` (atomically); its size in bytes."""
    arrays: dict[str, np.ndarray] = dict(
        format=np.array(ARCHIVE_FORMAT),
        version=np.array(ARCHIVE_VERSION),
        wells=np.array([s.well for s in samples]),
        note=np.array(note),
    )
    for sample in samples:
        raw = _raw_counts(sample)
        arrays[f"{sample.well}_image"] = np.stack([raw >> 8, raw & 0xFF]).astype(np.uint8)
        masks = np.asarray(sample.instances, dtype=bool)
        arrays[f"{sample.well}_masks"] = np.packbits(masks, axis=-1)
        arrays[f"{sample.well}_shape"] = np.array(masks.shape, dtype=np.int64)

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)

    return atomic_write(path, write).stat().st_size


def _open(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no data archive at {path}: write one with `python -m companion pack --out {path}`"
        )
    try:
        archive = np.load(path, allow_pickle=False)
        fmt = str(archive["format"]) if "format" in archive.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a readable data archive ({type(err).__name__}: {err})") from err
    if fmt != ARCHIVE_FORMAT:
        archive.close()
        raise ValueError(
            f"{path} is not a companion data archive (format {fmt!r}, expected {ARCHIVE_FORMAT!r})"
        )
    return archive


def archive_wells(path: str | os.PathLike) -> list[str]:
    """The wells an archive holds, in order."""
    with _open(path) as archive:
        return [str(w) for w in archive["wells"]]


def read_archive(
    path: str | os.PathLike, wells: Iterable[str] | None = None, *, skip_missing: bool = False
) -> list[Sample]:
    """The wells of an archive, exactly as :func:`companion.data.bbbc010.load_bbbc010` loads them.

    ``wells``: these, in this order (default all). A well the archive lacks raises
    ``KeyError`` naming it, or is left out with ``skip_missing`` (an archive holds only
    complete wells, so this is ``load_bbbc010``'s ``skip_incomplete``).
    """
    with _open(path) as archive:
        held = [str(w) for w in archive["wells"]]
        wells = held if wells is None else list(wells)
        missing = [w for w in wells if w not in held]
        if missing and not skip_missing:
            raise KeyError(f"{path} holds no well {', '.join(missing)} (it holds {len(held)} wells)")
        if missing:
            warnings.warn(f"skipped {len(missing)} well(s) not in {path}: {', '.join(missing)}", stacklevel=2)
        samples = []
        for well in (w for w in wells if w in held):
            planes = archive[f"{well}_image"]
            raw = planes[0].astype(np.uint16) << 8 | planes[1]
            image = np.stack([normalize(raw[c], c) for c in range(len(raw))])
            k, height, width = (int(v) for v in archive[f"{well}_shape"])
            masks = np.unpackbits(archive[f"{well}_masks"], axis=-1, count=width).astype(bool)
            samples.append(Sample(well=well, image=image, instances=masks.reshape(k, height, width)))
    return samples
