"""Keeping the best weights of a run: validation scores while it trains (not in the paper).

A short run on a fast machine (minutes of GPU time continuing the shipped models, or a free
Colab session) can end worse than it started: a learning rate too high for the budget, a
schedule cut short. :class:`SnapshotSelection` scores the run's weights on the validation wells
(:data:`companion.data.bbbc010.VAL_WELLS`, never trained on, never the test wells) every ``every_s``
seconds of training, and at its start and end, with a fast protocol
(:func:`validation_score`), and keeps the best checkpoint as ``best.pt`` beside ``last.pt``;
``selection.jsonl`` holds every score. ``train --select-every SECONDS`` switches it on.

The fast protocol (about a second a well on a GPU, ten on a CPU core): one deterministic pass
per well (a Concrete Dropout model at its expected weights; the evaluation adds Monte-Carlo
draws), the background-logit shift with the best pooled foreground F1 on the same wells (what
an export's ``--calibrate`` would choose; :mod:`companion.training.calibration`), then per-component
mean-shift at a single bandwidth / threshold (the committed results' choice, 1.5 / 2) and the
pooled COCO avAP. It ranks checkpoints of one run; Table 1 comes from the full evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from companion.data.bbbc010 import Sample
from companion.evaluation.metrics import instance_metrics
from companion.evaluation.tuning import foreground_scores
from companion.inference.postprocess import segment
from companion.inference.sampling import predict

from .._io import atomic_write
from .calibration import DEFAULT_SHIFTS, _pooled_f1, _vote_counts
from .run_folder import read_log, trim_log

__all__ = ["ValidationScore", "validation_score", "SnapshotSelection", "read_selection"]


class ValidationScore(NamedTuple):
    """``avAP`` / ``AP50`` (pooled COCO) of the fast protocol, the background-logit ``shift`` it
    chose, the pooled foreground ``f1`` at that shift, and the ``seconds`` it took."""

    avAP: float
    AP50: float
    shift: float
    f1: float
    seconds: float


def validation_score(
    model: nn.Module,
    samples: Sequence[Sample],
    *,
    bandwidth: float = 1.5,
    threshold: float = 2.0,
    clustering: str = "components",
    max_points: int | None = 8000,
    shifts: Sequence[float] = DEFAULT_SHIFTS,
    device: str | torch.device | None = None,
) -> ValidationScore:
    """Score ``model`` on validation ``samples`` with the fast protocol (module docstring).

    Examples
    --------
    >>> from companion.model.unet import UNet
    >>> from companion.data.synthetic import make_dataset
    >>> score = validation_score(UNet(base_filters=2, depth=2), make_dataset(1, seed=0, shape=(48, 48)))
    >>> 0.0 <= score.avAP <= 1.0 and score.shift in DEFAULT_SHIFTS
    True
    """
    if not len(samples):
        raise ValueError("validation_score needs at least one validation sample")
    started = time.perf_counter()
    shifts = np.asarray(shifts, np.float64)
    passes, counts = [], np.zeros((len(shifts), 3))
    for sample in samples:
        out = predict(model, sample.image, device=device)
        embedding, logits = np.asarray(out.embeddings[0]), np.asarray(out.logits[0])
        passes.append((embedding, logits))
        counts += _vote_counts(logits[None], np.asarray(sample.instances, bool).any(axis=0), shifts, 1.0)
    f1 = _pooled_f1(counts)
    best = int(np.argmax(f1))  # the smallest shift among ties
    preds, scores = [], []
    for embedding, logits in passes:
        logits = logits.copy()
        logits[0] -= shifts[best]
        masks = np.asarray(
            segment(embedding, logits, bandwidth, threshold, clustering=clustering, max_points=max_points),
            bool,
        )
        preds.append(masks)
        scores.append(foreground_scores(masks, logits))
    metrics = instance_metrics([np.asarray(s.instances, bool) for s in samples], preds, scores)
    return ValidationScore(
        float(metrics["avAP"]),
        float(metrics["AP50"]),
        float(shifts[best]),
        float(f1[best]),
        time.perf_counter() - started,
    )


def read_selection(path: str | os.PathLike) -> list[dict]:
    """The records of a run's ``selection.jsonl`` (the file or its run folder); [] if none."""
    path = Path(path)
    path = path / "selection.jsonl" if path.is_dir() else path
    return read_log(path) if path.is_file() else []


class SnapshotSelection:
    """Score a run's checkpoints on validation wells while it trains; keep the best as ``best.pt``.

    Parameters
    ----------
    samples : sequence of Sample
        The validation wells.
    out_dir : path
        The run folder: ``best.pt`` (a copy of the best-scoring ``last.pt``) and
        ``selection.jsonl`` (one record per score: iteration, avAP, AP50, shift, f1, seconds,
        best) go there. Records of a resumed run past its checkpoint are dropped, and the best
        score so far is read back.
    every_s : float
        Seconds of training between scores (:meth:`due`).
    clock : callable
        The time source.
    **protocol
        Passed to :func:`validation_score`.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        out_dir: str | os.PathLike,
        every_s: float,
        *,
        clock: Callable[[], float] = time.perf_counter,
        **protocol,
    ) -> None:
        if not every_s > 0:
            raise ValueError(f"every_s must be positive, got {every_s!r}")
        if not len(samples):
            raise ValueError("snapshot selection needs at least one validation well")
        self.samples, self.every_s, self.clock, self.protocol = list(samples), float(every_s), clock, protocol
        self.log_path = Path(out_dir) / "selection.jsonl"
        self.best_path = Path(out_dir) / "best.pt"
        self.best: float | None = None
        self._last = clock()

    def resume_at(self, iteration: int) -> None:
        """Forget the records past ``iteration`` (a resumed run repeats them); the best so far."""
        trim_log(self.log_path, iteration)
        kept = self.records()
        self.best = max((r["avAP"] for r in kept), default=None) if self.best_path.exists() else None

    def records(self) -> list[dict]:
        """The scores so far, in order."""
        return read_selection(self.log_path)

    def due(self) -> bool:
        """Whether ``every_s`` seconds have passed since the last score."""
        return self.clock() - self._last >= self.every_s

    def score(self, model: nn.Module, iteration: int, checkpoint: str | os.PathLike) -> ValidationScore:
        """Score ``model`` (whose weights ``checkpoint`` holds); copy it to ``best.pt`` if best."""
        result = validation_score(model, self.samples, **self.protocol)
        better = self.best is None or result.avAP > self.best
        if better:
            atomic_write(self.best_path, lambda tmp: shutil.copyfile(checkpoint, tmp))
            self.best = result.avAP
        record = dict(iteration=int(iteration), **{k: round(v, 6) for k, v in result._asdict().items()})
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps({**record, "best": better}) + "\n")
        self._last = self.clock()
        return result
