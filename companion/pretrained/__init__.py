"""Pretrained U-Nets shipped with the package: ``load("concrete")`` or ``load("baseline")``.

Each model is two files in this folder:

* ``<name>.pt``: ``{"format", "model_kwargs", "state_dict"}`` with the weights in float16
  (half the size; the outputs differ from the float32 model's by float16 rounding only),
  read with ``torch.load(..., weights_only=True)`` and cast back to float32;
* ``<name>.json``: provenance: the training command, preset and overridden settings, git
  commit, iterations, training time, hardware, final loss terms, learned dropout rates and
  the sha256 of the ``.pt``, which :func:`load` verifies.

They are written by :func:`export` (``scripts/export_pretrained.py`` on the command line) from a
training checkpoint of :func:`companion.train.train`.

Examples
--------
>>> import tempfile
>>> from companion.config import TrainConfig
>>> from companion.synthetic import make_dataset
>>> from companion.train import train
>>> run, shelf = tempfile.mkdtemp(), tempfile.mkdtemp()
>>> cfg = TrainConfig.preset("quick", iterations=2, checkpoint_every=2, log_every=1)
>>> ckpt = train(cfg, make_dataset(2, seed=0, shape=(96, 96)), run, progress=False)
>>> _ = export(ckpt, "concrete", shelf)
>>> available(shelf), provenance("concrete", shelf)["iterations"], load("concrete", directory=shelf).training
(['concrete'], 2, False)
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
from torch import nn

from .._io import atomic_write
from ..checkpoint import EXPORTED_FORMAT, check_map_location, read_exported

__all__ = [
    "NAMES",
    "PRETRAINED_DIR",
    "RESULTS_DIR",
    "MAX_BYTES",
    "available",
    "provenance",
    "load",
    "load_or_train",
    "results",
    "training_budget",
    "stage_summary",
    "export",
]

#: The models the package ships (when the lead has exported them).
NAMES: tuple[str, ...] = ("concrete", "baseline")
#: Where the shipped files live.
PRETRAINED_DIR: Path = Path(__file__).resolve().parent
#: Where the evaluations of the shipped models are committed (``results/<name>/`` of the book's
#: repository, written by ``python -m companion evaluate --pretrained <name> --out results/<name>``).
#: Present in a clone of the repository (also the one the chapters' Colab cell makes); a
#: ``pip install`` from PyPI or git has the weights but not the results.
RESULTS_DIR: Path = PRETRAINED_DIR.parents[1] / "results"
#: Marker stored in every exported ``.pt``.
FORMAT = EXPORTED_FORMAT  # written by export, read by load and by train(init_from=...)
#: Largest ``.pt`` that :func:`export` writes (the full U-Net is ~5.5 MB in float16).
MAX_BYTES = 15 * 1024 * 1024


def _directory(directory: str | os.PathLike | None) -> Path:
    return PRETRAINED_DIR if directory is None else Path(directory)


def available(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the models whose ``.pt`` and ``.json`` are both present, sorted."""
    folder = _directory(directory)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.pt") if p.with_suffix(".json").is_file())


def _paths(name: str, directory: str | os.PathLike | None) -> tuple[Path, Path]:
    folder = _directory(directory)
    present = available(directory)
    if name not in NAMES and name not in present:
        raise ValueError(
            f"unknown pretrained model {name!r}; the package knows {list(NAMES)}, "
            f"available in {folder}: {present or 'none'}"
        )
    weights, info = folder / f"{name}.pt", folder / f"{name}.json"
    missing = [p.name for p in (weights, info) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"pretrained model {name!r}: {', '.join(missing)} not found in {folder}. The trained "
            f"checkpoints have not been shipped with this copy of companion yet. Train a model "
            f"yourself (`python -m companion train --preset colab --model {name} --out runs/{name}`) "
            f"and use it with `python -m companion evaluate --checkpoint runs/{name}/final.pt`, or "
            f"export it here with `python scripts/export_pretrained.py --checkpoint runs/{name}/final.pt "
            f"--name {name}`."
        )
    return weights, info


def provenance(name: str, directory: str | os.PathLike | None = None) -> dict:
    """The provenance record ``<name>.json`` of a pretrained model (see the module docstring).

    Raises ``ValueError`` naming the file when it is not a JSON object (e.g. truncated).
    """
    _, info = _paths(name, directory)
    try:
        with open(info, encoding="utf-8") as handle:
            record = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{info} is not a readable provenance record (corrupt or truncated JSON: {err})"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{info} is not a provenance record: it holds a JSON {type(record).__name__}, not an object"
        )
    return record


def _sha256(path: Path) -> str:
    from companion._io import file_sha256

    return file_sha256(path)


def load(
    name: str, *, directory: str | os.PathLike | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """A pretrained :class:`companion.model.UNet`, float32, in eval mode.

    Parameters
    ----------
    name : {"concrete", "baseline"}
        Which model (or another name exported into ``directory``).
    directory : path-like, optional
        Folder holding ``<name>.pt`` and ``<name>.json``; default the package's own.
    map_location : str or torch.device
        Where the weights are loaded.

    Raises
    ------
    ValueError
        Unknown name (lists the available ones); a ``.pt`` whose sha256 differs from the one
        recorded in its ``.json``, that cannot be read (truncated), that is not an exported
        model or whose weights do not fit its architecture, or a corrupt ``.json`` (each names
        the file); ``map_location`` on a GPU where CUDA is not available (says so).
    FileNotFoundError
        The files are missing (explains how to train and export a model).
    """
    from companion.model import UNet

    check_map_location(map_location)  # before the files: a missing GPU is not a broken file
    weights, _ = _paths(name, directory)
    expected = provenance(name, directory).get("sha256")
    actual = _sha256(weights)
    if actual != expected:
        raise ValueError(
            f"{weights}: sha256 {actual} differs from {expected} recorded in "
            f"{weights.with_suffix('.json').name}; the file is corrupt or was replaced"
        )
    state, model_kwargs = read_exported(weights, map_location=map_location)
    try:
        model = UNet(**model_kwargs)
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:300]
        raise ValueError(
            f"{weights}: its weights do not fit the architecture {model_kwargs} it "
            f"records (another model's file?): {detail}"
        ) from err
    return model.to(map_location).eval()


def results(name: str, directory: str | os.PathLike | None = None) -> dict:
    """The committed evaluation of a shipped model: ``results/<name>/results.json``.

    Parameters
    ----------
    name : str
        ``"concrete"`` or ``"baseline"`` (the sub-folder of ``directory``).
    directory : path-like, optional
        Default :data:`RESULTS_DIR`, the repository's ``results/``.

    Returns
    -------
    dict
        As written by :func:`companion.report.write_report`: ``rows`` (Table 1), ``pavpu``
        (the Figure 2 curves), ``proofreading`` (Table 2), ``per_image``, ``tuning``, ...

    Raises
    ------
    FileNotFoundError
        No such file; says how to create it.
    """
    folder = RESULTS_DIR if directory is None else Path(directory)
    path = folder / name / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. The evaluation results live in the book's repository (clone it), or "
            f"compute them: python -m companion evaluate --pretrained {name} --out {folder / name}"
        )
    with open(path) as handle:
        return json.load(handle)


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "time not recorded"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def training_budget(name: str, directory: str | os.PathLike | None = None) -> str:
    """One line on how a shipped model was trained, to print beside its numbers.

    A model trained in stages (``earlier_stages`` in its provenance, see :func:`export`) gets
    the iterations and time of every stage and their totals.

    >>> training_budget("concrete", directory=_example_dir())  # doctest: +ELLIPSIS
    'concrete: 3 iterations of 64 x 64 crops (batch 2, lr 0.001), ... s on a ...-core CPU'
    """
    info = provenance(name, directory)
    cfg = info.get("config", {})
    hardware = info.get("hardware", {})
    device = hardware.get("cuda") or f"a {hardware.get('cpu_count', '?')}-core CPU"
    factor = cfg.get("downsample", 1)
    scale = f" (network at 1/{factor} resolution)" if factor > 1 else ""
    crops = f"{cfg.get('crop_size')} x {cfg.get('crop_size')} crops{scale}"
    stages = info.get("earlier_stages") or []
    if stages:
        parts = [
            f"{s['iterations']:,} as {s['model']} at lr {s['lr']:g} ({_hours(s['training_time_s'])})"
            for s in stages
        ]
        parts.append(
            f"{info['iterations']:,} as {info.get('model')} at lr {cfg.get('lr'):g} "
            f"({_hours(info.get('training_time_s'))})"
        )
        return (
            f"{name}: {info['total_iterations']:,} iterations of {crops}, batch {cfg.get('batch_size')}, "
            f"in {len(parts)} stages: "
            + ", then ".join(parts)
            + f"; {_hours(info.get('total_training_time_s'))} in all on {device}"
        )
    start = f", starting from the weights of {Path(cfg['init_from']).name}" if cfg.get("init_from") else ""
    return (
        f"{name}: {info['iterations']:,} iterations of {crops} "
        f"(batch {cfg.get('batch_size')}, lr {cfg.get('lr'):g}){start}, "
        f"{_hours(info.get('training_time_s'))} on {device}"
    )


def stage_summary(source: str | os.PathLike) -> list[dict[str, Any]]:
    """The training stages behind ``source``, oldest first, as :func:`export` records them.

    ``source`` is an exported model's provenance (``<name>.json``; its own earlier stages come
    first) or a training checkpoint (its ``log.jsonl`` beside it gives the time).
    """
    from companion.checkpoint import read_checkpoint
    from companion.run_folder import read_log

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
            crop_size=cfg["crop_size"],
            command=None,
        )
    ]


def _example_dir() -> Path:  # a throw-away exported model for the doctests
    import tempfile

    from companion.config import TrainConfig
    from companion.synthetic import make_dataset
    from companion.train import train

    run, shelf = tempfile.mkdtemp(), tempfile.mkdtemp()
    cfg = TrainConfig.preset("quick", iterations=3, checkpoint_every=3, log_every=1)
    export(train(cfg, make_dataset(2, seed=0, shape=(96, 96)), run, progress=False), "concrete", shelf)
    return Path(shelf)


def load_or_train(
    name: str = "concrete",
    *,
    retrain: bool = False,
    quick: bool = True,
    device: str | torch.device = "cpu",
    train_wells: Sequence[str] | None = None,
    data_root: str | os.PathLike | None = None,
    directory: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[nn.Module, str]:
    """The model a chapter works with: the shipped one, or one trained right now.

    Parameters
    ----------
    name : {"concrete", "baseline"}
    retrain : bool
        False (default): :func:`load` the shipped weights. True: train a new model on the BBBC010
        training wells, with the ``quick`` preset (a tiny network, seconds; its outputs are
        only a pipeline check) or, with ``quick=False``, the shipped model's recorded training
        settings (preset ``colab`` on a GPU: about an hour on a T4; preset ``cpu`` otherwise).
    quick : bool
        See ``retrain``.
    device : str or torch.device
    train_wells : sequence of str, optional
        Default :data:`companion.data.TRAIN_WELLS` (``quick``: the first 8).
    data_root : path-like, optional
        Passed to :func:`companion.data.load_bbbc010`.
    directory : path-like, optional
        Folder of the shipped weights (default the package's).
    progress : bool

    Returns
    -------
    model : nn.Module
        In eval mode on ``device``.
    description : str
        Where the model came from, for printing beside results.
    """
    if not retrain:
        model = load(name, directory=directory, map_location=device)
        return model, "shipped model " + training_budget(name, directory)

    import tempfile
    import time
    import warnings

    from companion.checkpoint import load_model
    from companion.config import TrainConfig
    from companion.data import TRAIN_WELLS, load_bbbc010
    from companion.train import train

    if name not in NAMES:
        raise ValueError(f"retrain knows the models {list(NAMES)}, got {name!r}")
    on_gpu = torch.device(device).type == "cuda"
    if quick:
        config = TrainConfig.preset("quick", model=name, device=str(device))
        wells = list(train_wells or TRAIN_WELLS[:8])
    else:
        recorded = provenance(name, directory).get("overrides", {}) if name in available(directory) else {}
        keep = {k: recorded[k] for k in ("lr", "disc_warmup", "grad_clip") if k in recorded}
        config = TrainConfig.preset("colab" if on_gpu else "cpu", model=name, device=str(device), **keep)
        wells = list(train_wells or TRAIN_WELLS)
    samples = load_bbbc010(data_root, wells=wells, progress=progress)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint = train(config, samples, tempfile.mkdtemp(prefix=f"companion-{name}-"), progress=progress)
    model = load_model(checkpoint, map_location=device).eval()
    return model, (
        f"{name} model trained here ({'quick' if quick else 'full'} configuration): "
        f"{config.iterations:,} iterations, {time.perf_counter() - start:.0f} s on {device}"
    )


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------
def _preset_and_overrides(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The preset that differs from ``config`` in the fewest fields, and those fields."""
    from companion.config import PRESETS, TrainConfig

    best: tuple[str, dict[str, Any]] | None = None
    for preset in PRESETS:
        base = TrainConfig.preset(preset).to_dict()
        diff = {k: v for k, v in config.items() if base.get(k) != v}
        if best is None or len(diff) < len(best[1]):
            best = (preset, diff)
    assert best is not None
    return best


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
        ``last.pt`` / ``final.pt`` of :func:`companion.train.train`.
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
        (:func:`companion.calibration.shift_background_logit`; 0: the trained weights as they are).
    calibration : dict, optional
        How the shift was chosen (wells, candidate shifts and their F1), recorded verbatim.
    earlier_stages : sequence of dict
        The stages whose weights this run started from (``init_from``), oldest first, from
        :func:`stage_summary`; recorded with ``total_iterations`` and ``total_training_time_s``.

    Returns
    -------
    tuple of Path
        The ``.pt`` and ``.json`` written (each atomically, the ``.pt`` first).
    """
    import companion
    from companion.checkpoint import load_model, read_checkpoint
    from companion.model import dropout_rates
    from companion.run_folder import TERM_NAMES, read_log

    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"name must be a plain file stem (letters, digits, - and _), got {name!r}")
    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint)
    model = load_model(checkpoint)
    if background_shift:
        from companion.calibration import shift_background_logit

        shift_background_logit(model, background_shift)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    payload = dict(format=FORMAT, model_kwargs=dict(ckpt["model_kwargs"]), state_dict=state)
    folder = _directory(out_dir)
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
    preset, overrides = _preset_and_overrides(dict(ckpt["config"]))
    record = dict(
        name=name,
        format=FORMAT,
        sha256=_sha256(weights),
        size_bytes=weights.stat().st_size,
        dtype="float16",
        parameters=int(sum(p.numel() for p in model.parameters())),
        model=ckpt["config"].get("model"),
        model_kwargs=dict(ckpt["model_kwargs"]),
        command=command,
        preset=preset,
        overrides=overrides,
        config=dict(ckpt["config"]),
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
        package_version=companion.__version__,
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
    return weights, info
