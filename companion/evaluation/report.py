"""The files of an evaluation: ``results.json``, the CSV tables and the figures (:func:`write_report`).

An evaluation folder is whole when it holds ``results.json``: :func:`write_report` writes the
new set into a staging folder beside it, removes ``results.json`` and every file of an earlier
evaluation, moves the new files in and ``results.json`` last. Interrupted at any point, the folder
either keeps no ``results.json`` (incomplete, and readers say so) or holds one whole set.

:func:`plot_pavpu` draws the paper's Fig. 2 layout, :func:`plot_gallery` images with the outlines
of ground truth and prediction.

Examples
--------
>>> _json_safe(dict(a=np.float64("nan"), b=np.arange(2)))
{'a': None, 'b': [0, 1]}
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import __version__
from .._io import atomic_write_bytes
from .paper import ROW_KEYS

if TYPE_CHECKING:  # pragma: no cover
    from companion.data.bbbc010 import Sample

    from .evaluate import EvaluationResult
    from .uncertainty import PAvPU

__all__ = ["write_report", "plot_pavpu", "plot_gallery"]


def _csv_bytes(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _json_safe(value: Any) -> Any:
    """Plain JSON types; NaN and inf become None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _pavpu_rows(result: PAvPU) -> list[dict]:
    return [
        dict(
            threshold=round(float(t), 9),
            p_accurate_given_certain=float(a),
            p_uncertain_given_inaccurate=float(u),
            pavpu=float(p),
            n_ac=int(ac),
            n_au=int(au),
            n_ic=int(ic),
            n_iu=int(iu),
        )
        for t, a, u, p, ac, au, ic, iu in zip(*result)
    ]


def plot_pavpu(curves: PAvPU | Mapping[str, PAvPU]):
    """Fig. 2's layout: p(accurate | certain), p(uncertain | inaccurate) and PAvPU over the threshold.

    ``curves`` is one :class:`~companion.evaluation.uncertainty.PAvPU`, or a mapping from a label to one,
    drawn as labelled lines (e.g. the committed curves beside live ones).
    """
    import matplotlib.pyplot as plt

    labelled = list(curves.items()) if isinstance(curves, Mapping) else [(None, curves)]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.3), sharex=True)
    panels = (
        ("p(accurate | certain)", "p_accurate_given_certain"),
        ("p(uncertain | inaccurate)", "p_uncertain_given_inaccurate"),
        ("PAvPU", "pavpu"),
    )
    for ax, (title, key) in zip(axes, panels):
        for label, result in labelled:
            ax.plot(result.thresholds, getattr(result, key), "o-", markersize=3, label=label)
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("entropy threshold $t$ (nats)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if labelled[0][0] is not None:
        axes[0].legend(loc="lower right", fontsize=10.5)
    fig.tight_layout()
    return fig


def _outlines(ax, instances: np.ndarray) -> None:
    """Draw every instance's outline in its own colour, thick enough to survive downscaling."""
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    colors = np.array(
        [
            [0.90, 0.10, 0.10],
            [0.10, 0.75, 0.10],
            [0.15, 0.45, 1.00],
            [1.00, 0.80, 0.00],
            [0.85, 0.20, 0.85],
            [0.00, 0.85, 0.85],
            [1.00, 0.50, 0.00],
            [0.55, 0.35, 1.00],
        ]
    )
    width = max(0, min(instances.shape[1:]) // 256)  # extra pixels of line width on large images
    overlay = np.zeros(instances.shape[1:] + (4,), np.float32)
    for k, mask in enumerate(instances):
        edge = find_boundaries(mask, mode="inner")
        if width:
            edge = ndimage.binary_dilation(edge, iterations=width) & mask
        overlay[edge, :3] = colors[k % len(colors)]
        overlay[edge, 3] = 1.0
    ax.imshow(overlay, interpolation="nearest")


def plot_gallery(samples: Sequence[Sample], predictions: Sequence[np.ndarray], titles: Sequence[str]):
    """Rows of (brightfield image, ground-truth outlines, predicted outlines), one per sample."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(samples), 3, figsize=(10, 2.9 * len(samples)), squeeze=False)
    for row, (sample, pred, title) in zip(axes, zip(samples, predictions, titles)):
        brightfield = sample.image[1]
        low, high = np.percentile(brightfield, [1, 99.5])
        for ax, (name, instances) in zip(
            row, (("brightfield (w2)", None), ("ground truth", sample.instances), ("prediction", pred))
        ):
            ax.imshow(brightfield, cmap="gray", vmin=low, vmax=max(high, low + 1e-6))
            if instances is not None:
                _outlines(ax, np.asarray(instances, bool))
            ax.set_title(f"{title}: {name}" if instances is None else name, fontsize=12)
            ax.axis("off")
    fig.tight_layout()
    return fig


#: Every file an evaluation may write into its folder (besides the network-output ``cache/``).
RESULT_FILES: tuple[str, ...] = (
    "results.json",
    "table1.csv",
    "per_image.csv",
    "tuning.csv",
    "pavpu.csv",
    "pavpu.png",
    "proofreading.csv",
    "gallery.png",
)
#: Prefix of the staging folders of :func:`write_report` (swept by :func:`sweep_staging`).
STAGING_PREFIX = ".incoming-"


def sweep_staging(out_dir: str | os.PathLike) -> list[Path]:
    """Remove staging folders that an interrupted :func:`write_report` left in ``out_dir``."""
    import shutil

    stale = sorted(Path(out_dir).glob(f"{STAGING_PREFIX}*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _publish(staging: Path, out: Path, names: Sequence[str]) -> list[Path]:
    """Swap the staged files in: ``results.json`` removed first and put back last, the files of
    an earlier evaluation that this one lacks removed."""
    (out / "results.json").unlink(missing_ok=True)
    for name in RESULT_FILES:
        if name not in names:
            (out / name).unlink(missing_ok=True)
    for name in sorted(names, key=lambda n: n == "results.json"):
        os.replace(staging / name, out / name)
    staging.rmdir()
    return [out / name for name in names]


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_report(
    result: EvaluationResult,
    samples: Sequence[Sample],
    out_dir: str | os.PathLike,
    *,
    info: Mapping[str, Any] | None = None,
    n_gallery: int = 3,
) -> list[Path]:
    """Write the evaluation's files into ``out_dir`` as one set (module docstring).

    ``results.json`` (everything, plus ``info``: model, skipped wells, wall time, ...),
    ``table1.csv``, ``per_image.csv``, ``tuning.csv``, ``pavpu.csv`` and ``proofreading.csv`` (with
    draws), ``pavpu.png`` (with draws) and ``gallery.png`` (the ``n_gallery`` wells with the lowest
    avAP of the first row).

    Returns
    -------
    list of Path
        The files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir(exist_ok=True)
    written: list[str] = []

    def put(name: str, data: bytes) -> None:
        atomic_write_bytes(staging / name, data)
        written.append(name)

    tuning = result.tuning
    tuning_rows = [
        dict(fold=f, bandwidth=float(b), threshold=float(t), avAP=float(tuning.scores[f, i, j]))
        for f in range(len(tuning.scores))
        for i, b in enumerate(tuning.bandwidths)
        for j, t in enumerate(tuning.thresholds)
    ]
    choices = [
        dict(
            tuned_on=c.tuned_on,
            applied_to=c.applied_to,
            bandwidth=c.bandwidth,
            threshold=c.threshold,
            tuning_score=c.tuning_score,
            **{k: c.test_metrics[k] for k in ROW_KEYS},
        )
        for c in tuning.choices
    ]
    main_row = result.rows[0]["name"]
    ranked = sorted(
        (p for p in result.per_image if p["row"] == main_row), key=lambda p: (p["avAP"], p["well"])
    )
    worst = [p["well"] for p in ranked[:n_gallery]]
    document = dict(
        **dict(info or {}),
        package_version=__version__,
        torch_version=str(torch.__version__),
        settings=result.settings,
        wells=result.wells,
        folds=[list(f) for f in result.folds],
        rows=result.rows,
        tuning=dict(
            metric=tuning.metric,
            bandwidths=tuning.bandwidths,
            thresholds=tuning.thresholds,
            scores=tuning.scores,
            choices=choices,
            pooled_deterministic={k: tuning.pooled[k] for k in ROW_KEYS},
        ),
        pavpu=_pavpu_rows(result.pavpu) if result.pavpu is not None else None,
        proofreading=result.proofreading,
        per_image=result.per_image,
        gallery_wells=worst,
    )
    put("results.json", (json.dumps(_json_safe(document), indent=1, allow_nan=False) + "\n").encode())
    put("table1.csv", _csv_bytes(result.rows, ("name", *ROW_KEYS, "inference")))
    put(
        "per_image.csv",
        _csv_bytes(
            result.per_image,
            (
                "row",
                "well",
                "fold",
                "n_gt",
                "n_pred",
                "n_recalled80",
                "n_recalled80_iou",
                "AP50",
                "avAP",
                "avAP_dsb",
                "uncertainty",
            ),
        ),
    )
    put("tuning.csv", _csv_bytes(tuning_rows, ("fold", "bandwidth", "threshold", "avAP")))
    if result.pavpu is not None:
        rows = _pavpu_rows(result.pavpu)
        put("pavpu.csv", _csv_bytes(rows, list(rows[0])))
        fig = plot_pavpu(result.pavpu)
        _save_figure(fig, staging / "pavpu.png")
        written.append("pavpu.png")
    if result.proofreading is not None:
        put("proofreading.csv", _csv_bytes(result.proofreading, list(result.proofreading[0])))
    if worst:
        by_well = {s.well: s for s in samples}
        index = {w: i for i, w in enumerate(result.wells)}
        scores = {p["well"]: p["avAP"] for p in ranked}
        fig = plot_gallery(
            [by_well[w] for w in worst],
            [result.predictions[main_row][index[w]] for w in worst],
            [f"{w} (avAP {scores[w]:.2f})" for w in worst],
        )
        _save_figure(fig, staging / "gallery.png")
        written.append("gallery.png")
    return _publish(staging, out, written)
