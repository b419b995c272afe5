"""Instance predictions written by any tool, read as mask stacks, one per BBBC010 well.

Worms overlap, so a prediction is a stack of masks ``(K, H, W)``, never one label image; tools
store such stacks in three ways, all read here:

* **label layers** ``(L, H, W)`` (or ``(L, 1, H, W)``, as PatchPerPix writes them into HDF5,
  dataset ``vote_instances``): integer labels, an instance's id the same in every layer it
  appears in, 0 background. Each id becomes one mask (its pixels in all layers).
* **mask stacks**: boolean layers, or integer layers holding only 0 and 1: one mask per layer
  (``python -m companion predict`` writes ``masks`` and ``scores`` into an ``.npz``).
* **a label image** ``(H, W)``: one mask per id (no overlaps can be expressed).

The well comes from the file name (``C03.hdf``, ``pred_C03_w1.tif``...). Scores are read where
the file has them (``scores`` in an ``.npz``); other tools' predictions have none.

Examples
--------
>>> layers = np.zeros((2, 1, 3, 4), np.uint16)
>>> layers[0, 0, 0, :2] = 7; layers[1, 0, 0, 1:3] = 9; layers[1, 0, 2, :] = 7
>>> masks = masks_from_labels(layers)
>>> masks.shape, masks.sum(axis=(1, 2)).tolist()  # id 7 in both layers, id 9 overlaps it
((2, 3, 4), [6, 2])
>>> well_of("results/setup08/C03.hdf"), well_of("plate1_D24_w2.tif")
('C03', 'D24')
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "Prediction",
    "SUFFIXES",
    "PATCHPERPIX_URL",
    "masks_from_labels",
    "well_of",
    "read_prediction",
    "read_predictions",
    "fetch_patchperpix",
]

#: File types read, by suffix.
SUFFIXES = (".hdf", ".h5", ".hdf5", ".tif", ".tiff", ".npz", ".npy")
#: HDF5 datasets tried in turn when none is named.
HDF5_DATASETS = ("vote_instances", "instances", "labels", "segmentation", "masks")
#: PatchPerPix's published BBBC010 test predictions (ppp+dec), one HDF5 file per well, at the
#: commit this project scored (``results/PROTOCOL.md``); they carry no licence: fetched, not shipped.
PATCHPERPIX_URL = (
    "https://raw.githubusercontent.com/Kainmueller-Lab/PatchPerPix_experiments/"
    "115aaa2c5d23eaa2f9fd4ec16e4ea9788a3567c4/wormbodies/03_results/setup08/{well}.hdf"
)
_WELL = re.compile(r"(?<![A-Za-z0-9])([A-E](?:0[1-9]|1\d|2[0-4]))(?![0-9])")


class Prediction(NamedTuple):
    """One well's predicted instances: ``masks`` bool ``(K, H, W)``, ``scores`` ``(K,)`` or
    ``None`` (the file has none), and the ``path`` they came from."""

    well: str
    masks: np.ndarray
    scores: np.ndarray | None
    path: Path


def well_of(path: str | os.PathLike) -> str:
    """The BBBC010 well id in a file name (``ValueError`` naming the file when there is none)."""
    found = _WELL.findall(Path(path).stem)
    if len(set(found)) != 1:
        raise ValueError(
            f"cannot tell the well of {str(path)!r}: its name should hold one well id such as C03 "
            f"(found {sorted(set(found)) or 'none'})"
        )
    return found[0]


def masks_from_labels(labels: np.ndarray) -> np.ndarray:
    """Mask stack ``bool (K, H, W)`` of a label image, label layers or a mask stack (module doc)."""
    labels = np.asarray(labels)
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim == 2:
        labels = labels[None]
    if labels.ndim != 3:
        raise ValueError(
            f"expected a label image (H, W), label layers (L, H, W) or (L, 1, H, W), got shape {labels.shape}"
        )
    if labels.dtype == bool or (labels.size and labels.min() >= 0 and labels.max() <= 1 and len(labels) > 1):
        stack = labels.astype(bool)
        return stack[stack.any(axis=(1, 2))]
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers or booleans, got dtype {labels.dtype}")
    ids = np.unique(labels)
    ids = ids[ids != 0]
    return (
        np.stack([(labels == i).any(axis=0) for i in ids])
        if len(ids)
        else np.zeros((0, *labels.shape[1:]), bool)
    )


def _read_array(path: Path, dataset: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    suffix = path.suffix.lower()
    if suffix in (".hdf", ".h5", ".hdf5"):
        try:
            import h5py
        except ImportError as err:
            raise ImportError(f"reading {path} needs h5py: pip install h5py") from err
        with h5py.File(path, "r") as handle:
            names = [dataset] if dataset else [n for n in HDF5_DATASETS if n in handle]
            if not names or names[0] not in handle:
                raise ValueError(
                    f"{path} has no dataset {dataset or ' / '.join(HDF5_DATASETS)} (it has {', '.join(handle)}); "
                    f"name one with dataset="
                )
            return handle[names[0]][...], None
    if suffix in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path), None
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            key = dataset or ("masks" if "masks" in data.files else data.files[0])
            scores = np.asarray(data["scores"], np.float64) if "scores" in data.files else None
            return data[key], scores
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    raise ValueError(f"cannot read predictions from {path}: expected one of {', '.join(SUFFIXES)}")


def read_prediction(path: str | os.PathLike, *, dataset: str | None = None) -> Prediction:
    """One prediction file (module docstring); ``dataset``: the HDF5 dataset or ``.npz`` key."""
    path = Path(path)
    array, scores = _read_array(path, dataset)
    if scores is not None and array.ndim == 3:  # a mask stack with a score per layer
        masks = np.asarray(array, bool)
    else:
        masks = masks_from_labels(array)
    if scores is not None and len(scores) != len(masks):
        raise ValueError(f"{path}: {len(masks)} masks but {len(scores)} scores")
    return Prediction(well_of(path), masks, scores, path)


def read_predictions(paths: str | os.PathLike | Iterable[str | os.PathLike], **options) -> list[Prediction]:
    """Every prediction file of a folder (by suffix), or the given files; one per well."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no prediction file or folder {path}")
    if not files:
        raise FileNotFoundError(
            f"no prediction files ({', '.join(SUFFIXES)}) in {', '.join(map(str, paths))}"
        )
    predictions = [read_prediction(p, **options) for p in files]
    wells = [p.well for p in predictions]
    twice = sorted({w for w in wells if wells.count(w) > 1})
    if twice:
        raise ValueError(f"several prediction files for well(s) {', '.join(twice)}: keep one file per well")
    return predictions


def fetch_patchperpix(wells: Iterable[str], cache: str | os.PathLike | None = None) -> list[Path]:
    """Download PatchPerPix's predictions of ``wells`` (:data:`PATCHPERPIX_URL`) into ``cache``
    (default: the package's pooch cache); the local files, in order. Needs the internet."""
    import pooch

    cache = Path(cache) if cache is not None else Path(pooch.os_cache("companion")) / "patchperpix"
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")  # no "Downloading data from ..." line per file
    try:
        return [
            Path(
                pooch.retrieve(
                    PATCHPERPIX_URL.format(well=w),
                    known_hash=None,
                    fname=f"{w}.hdf",
                    path=cache,
                    progressbar=False,
                )
            )
            for w in wells
        ]
    finally:
        logger.setLevel(level)
