"""Export a training checkpoint as a shipped model: float16 weights and a provenance record.

:func:`export` writes ``<name>.pt`` and ``<name>.json`` (the format :mod:`companion.pretrained`
reads) from a checkpoint of :func:`companion.training.train.train`; :func:`stage_summary` describes the
stages a model trained in several runs went through (``init_from``), which :func:`export` records.
On the command line: ``scripts/export_pretrained.py``.

Examples
--------
>>> import tempfile
>>> from companion.training.config import TrainConfig
>>> from companion.data.synthetic import make_dataset
>>> from companion.training.train import train
>>> run, shelf = tempfile.mkdtemp(), tempfile.mkdtemp()
>>> cfg = TrainConfig.preset("quick", iterations=2, checkpoint_every=2, log_every=1)
>>> ckpt = train(cfg, make_dataset(2, seed=0, shape=(96, 96)), run, progress=False)
>>> weights, record = export(ckpt, "concrete", shelf)
>>> weights.name, record.name, stage_summary(record)[-1]["iterations"]
('concrete.pt', 'concrete.json', 2)
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from companion.inference.recipes import recipe_path
from companion.model.dropout import dropout_rates
from companion.pretrained import FORMAT, PRETRAINED_DIR

from .. import __version__
from .._io import atomic_write, file_sha256
from .calibration import shift_background_logit
from .checkpoint import load_model, read_checkpoint
from .config import PRESETS, TrainConfig
from .run_folder import TERM_NAMES, read_log

__all__ = ["MAX_BYTES", "export", "stage_summary"]

#: Largest ``.pt`` that :func:`export` writes (the full U-Net is ~5.5 MB in float16).
MAX_BYTES = 15 * 1024 * 1024


def _preset_and_overrides(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The preset that differs from ``config`` in the fewest fields, and those fields."""
    best: tuple[str, dict[str, Any]] | None = None
    for preset in PRESETS:
        base = TrainConfig.preset(preset).to_dict()
        diff = {k: v for k, v in config.items() if base.get(k) != v}
        if best is None or len(diff) < len(best[1]):
            best = (preset, diff)
    assert best is not None
    return best


def _stage_reference(init_from: str | None) -> str | None:
    """``init_from`` as provenance records it: a shipped model's name or a relative path as
    given, an absolute path as ``<run folder>/<file>`` (the stage, not the machine it ran on).

    >>> _stage_reference("/somewhere/runs/base_s3/final.pt"), _stage_reference("baseline")
    ('base_s3/final.pt', 'baseline')
    """
    if init_from is None or not Path(init_from).is_absolute():
        return init_from
    path = Path(init_from)
    return f"{path.parent.name}/{path.name}"


def _without_machine_paths(config: dict[str, Any]) -> dict[str, Any]:
    return (
        {**config, "init_from": _stage_reference(config.get("init_from"))}
        if "init_from" in config
        else config
    )


def _training_time(log: list[dict]) -> float | None:
    """Seconds of training summed over the logged windows (interruptions excluded)."""
    total, previous = 0.0, 0
    for record in log:
        rate = record.get("it_per_s")
        if not rate or rate != rate:  # missing, 0 or NaN
            return None
        total += (record["iteration"] - previous) / rate
        previous = record["iteration"]
    return total if log else None


def _finite(value: float) -> float | None:
    return float(value) if value == value and abs(value) != float("inf") else None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PRETRAINED_DIR, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _hardware() -> dict[str, Any]:
    info: dict[str, Any] = dict(
        platform=platform.platform(),
        machine=platform.machine(),
        processor=platform.processor() or None,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=str(torch.__version__),
    )
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def export(
    checkpoint: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike | None = None,
    *,
    command: str | None = None,
    log: str | os.PathLike | None = None,
    background_shift: float = 0.0,
    calibration: dict | None = None,
    earlier_stages: Sequence[dict] = (),
) -> tuple[Path, Path]:
    """Write ``<name>.pt`` (float16 weights) and ``<name>.json`` (provenance) from a training checkpoint.

    Parameters
    ----------
    checkpoint : path-like
        ``last.pt`` / ``final.pt`` of :func:`companion.training.train.train`.
    name : str
        File stem, e.g. ``"concrete"``.
    out_dir : path-like, optional
        Default the package's own folder (:data:`PRETRAINED_DIR`).
    command : str, optional
        The training command, recorded verbatim.
    log : path-like, optional
        The run's ``log.jsonl``; default the one beside ``checkpoint`` (final loss terms,
        training time; ``None`` in the record when absent).
    background_shift : float
        Folded into the class head's background bias before saving
        (:func:`companion.training.calibration.shift_background_logit`; 0: the trained weights as they are).
    calibration : dict, optional
        How the shift was chosen (wells, candidate shifts and their F1), recorded verbatim.
    earlier_stages : sequence of dict
        The stages whose weights this run started from (``init_from``), oldest first, from
        :func:`stage_summary`; recorded with ``total_iterations`` and ``total_training_time_s``.

    Returns
    -------
    tuple of Path
        The ``.pt`` and ``.json`` written (each atomically, the ``.pt`` first). A
        ``<name>.recipe.json`` there is removed: its recipes belong to the weights replaced
        (``python -m companion evaluate --save-recipe`` writes those of the new ones).
    """

    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"name must be a plain file stem (letters, digits, - and _), got {name!r}")
    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint)
    model = load_model(checkpoint)
    if background_shift:
        shift_background_logit(model, background_shift)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    payload = dict(format=FORMAT, model_kwargs=dict(ckpt["model_kwargs"]), state_dict=state)
    folder = PRETRAINED_DIR if out_dir is None else Path(out_dir)
    weights, info = folder / f"{name}.pt", folder / f"{name}.json"

    def save_checked(tmp: str) -> None:
        # through a buffer: torch.save names the archive after the (random) temporary file, and
        # the same weights would get a different sha256 at every export
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        Path(tmp).write_bytes(buffer.getvalue())
        size = os.path.getsize(tmp)
        if size > MAX_BYTES:
            raise ValueError(
                f"{name}.pt would be {size / 2**20:.1f} MiB, over the "
                f"{MAX_BYTES / 2**20:.0f} MiB limit for shipped weights"
            )

    atomic_write(weights, save_checked)

    log_path = Path(log) if log is not None else checkpoint.parent / "log.jsonl"
    records = read_log(log_path) if log_path.is_file() else []
    records = [r for r in records if r["iteration"] <= ckpt["iteration"]]
    config = _without_machine_paths(dict(ckpt["config"]))
    preset, overrides = _preset_and_overrides(config)
    record = dict(
        name=name,
        format=FORMAT,
        sha256=file_sha256(weights),
        size_bytes=weights.stat().st_size,
        dtype="float16",
        parameters=int(sum(p.numel() for p in model.parameters())),
        model=ckpt["config"].get("model"),
        model_kwargs=dict(ckpt["model_kwargs"]),
        command=command,
        preset=preset,
        overrides=overrides,
        config=config,
        iterations=int(ckpt["iteration"]),
        training_time_s=_training_time(records),
        final_loss_terms={k: _finite(records[-1][k]) for k in TERM_NAMES if k in records[-1]}
        if records
        else None,
        final_loss_iteration=records[-1]["iteration"] if records else None,
        dropout_rates=[float(p) for p in dropout_rates(model)],
        background_shift=float(background_shift),
        calibration=calibration,
        git_commit=_git_commit(),
        hardware=_hardware(),
        hardware_note="of the machine that ran the export (normally the training machine)",
        package_version=__version__,
        checkpoint_package_version=ckpt.get("package_version"),
        checkpoint_torch_version=ckpt.get("torch_version"),
        source_checkpoint=checkpoint.name,
        exported_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    if earlier_stages:
        stages = [dict(stage) for stage in earlier_stages]
        times = [s.get("training_time_s") for s in stages] + [record["training_time_s"]]
        record.update(
            earlier_stages=stages,
            total_iterations=sum(int(s["iterations"]) for s in stages) + record["iterations"],
            total_training_time_s=None if None in times else float(sum(times)),
        )
    text = json.dumps(record, indent=1, sort_keys=False, allow_nan=False) + "\n"
    atomic_write(info, lambda tmp: Path(tmp).write_text(text))
    recipes_of_the_replaced_weights = recipe_path(name, folder)
    if recipes_of_the_replaced_weights.is_file():  # evaluate --save-recipe writes new ones
        recipes_of_the_replaced_weights.unlink()
    return weights, info


def stage_summary(source: str | os.PathLike) -> list[dict[str, Any]]:
    """The training stages behind ``source``, oldest first, as :func:`export` records them.

    ``source`` is an exported model's provenance (``<name>.json``; its own earlier stages come
    first) or a training checkpoint (its ``log.jsonl`` beside it gives the time).
    """
    path = Path(source)
    if path.suffix == ".json":
        try:
            info = json.loads(path.read_text())
            cfg = info["config"]
            own = dict(
                source=path.name,
                model=info["model"],
                iterations=int(info["iterations"]),
                training_time_s=info.get("training_time_s"),
                lr=cfg["lr"],
                batch_size=cfg.get("batch_size", 1),
                crop_size=cfg["crop_size"],
                command=info.get("command"),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a provenance record of an exported model ({err})") from err
        return list(info.get("earlier_stages") or []) + [own]
    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    log = path.parent / "log.jsonl"
    records = [r for r in read_log(log) if r["iteration"] <= ckpt["iteration"]] if log.is_file() else []
    return [
        dict(
            source=path.name,
            model=cfg["model"],
            iterations=int(ckpt["iteration"]),
            training_time_s=_training_time(records),
            lr=cfg["lr"],
            batch_size=cfg.get("batch_size", 1),
            crop_size=cfg["crop_size"],
            command=None,
        )
    ]
