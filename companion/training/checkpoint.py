"""Checkpoints: what a training run saves and reads back (exported weight files: :mod:`companion.model.files`).

Design decisions
----------------
* **Checkpoints hold only tensors and primitive containers** (the configuration as a dict, RNG
  states as tensors and lists), so :func:`load_model` reads them with
  ``torch.load(..., weights_only=True)`` and never executes a pickle.
* **Exact resuming on the CPU.** A checkpoint holds the model, the optimiser, the gradient
  scaler, the Python / NumPy / torch (and CUDA) random states and the iteration. On the CPU with
  a fixed seed, a run that is killed and resumed ends with weights bit-identical to an
  uninterrupted run (GPU kernels are not bit-deterministic, so on CUDA it is "statistically" the
  same run). The data order needs no state: see :mod:`companion.training.batches`.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from companion.model.files import SHIPPED_DIR, check_map_location, read_exported, safe_load
from companion.model.unet import UNet

from .. import __version__
from .._io import atomic_write, tensors_sha256
from .config import TrainConfig
from .distributed import DistInfo, unwrap

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "read_checkpoint",
    "load_model",
    "init_source",
    "init_weights",
    "check_resumable",
    "write_checkpoint",
    "restore_rng",
]

#: Marker stored in every checkpoint, checked by :func:`read_checkpoint`.
CHECKPOINT_FORMAT = "companion-checkpoint"
#: Version of the checkpoint layout.
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Random states
# --------------------------------------------------------------------------------------------
def _capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [int(version), [int(v) for v in internal], gauss],
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.as_tensor(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the Python, NumPy, torch (and CUDA) random states captured in a checkpoint."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng(dist_info: DistInfo) -> list[dict]:
    state = _capture_rng()
    if dist_info.world_size == 1:
        return [state]
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(gathered, state)
    return gathered


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a training checkpoint without executing any pickle.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is not a checkpoint written by :func:`companion.training.train.train` (not a safe torch
        file, or a file without the checkpoint's keys), or its weights no longer match the
        sha256 recorded at save time.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: name the checkpoint in it (e.g. {path}/final.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    check_map_location(map_location)
    ckpt = safe_load(path, map_location, "a companion checkpoint that can be loaded safely")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        what = (
            f"a dict with keys {sorted(map(str, ckpt))[:8]}"
            if isinstance(ckpt, dict)
            else f"a {type(ckpt).__name__}"
        )
        raise ValueError(
            f"{path} is not a companion training checkpoint: it holds {what} "
            f"without format={CHECKPOINT_FORMAT!r}"
        )
    missing = {"version", "config", "model_kwargs", "model", "iteration"} - set(ckpt)
    if missing:
        raise ValueError(f"checkpoint {path} lacks the keys {sorted(missing)}")
    if ckpt["version"] > CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {path} has layout version {ckpt['version']}, newer than "
            f"this package's {CHECKPOINT_VERSION}: update companion"
        )
    recorded = ckpt.get("model_sha256")  # absent in checkpoints written before it was recorded
    if recorded is not None and tensors_sha256(ckpt["model"]) != recorded:
        raise ValueError(
            f"checkpoint {path} is corrupted: its weights do not match the sha256 recorded when it was saved"
        )
    return ckpt


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained U-Net of a checkpoint, in eval mode.

    The architecture is rebuilt from the keyword arguments stored in the checkpoint; weights
    that do not fit that architecture raise ``ValueError`` naming the file.

    Examples
    --------
    >>> import tempfile, os
    >>> from companion.data.synthetic import make_dataset
    >>> from companion.training.train import train
    >>> out = tempfile.mkdtemp()
    >>> cfg = TrainConfig.preset("quick", iterations=2, checkpoint_every=2, log_every=1)
    >>> path = train(cfg, make_dataset(2, seed=0, shape=(96, 96)), out, progress=False)
    >>> model = load_model(path)
    >>> model.training
    False
    """
    ckpt = read_checkpoint(path, map_location=map_location)
    try:
        model = UNet(**ckpt["model_kwargs"])
    except TypeError as err:
        raise ValueError(
            f"checkpoint {path}: model_kwargs {ckpt['model_kwargs']} do not describe a companion UNet ({err})"
        ) from err
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise ValueError(
            f"checkpoint {path}: its weights do not fit the architecture {ckpt['model_kwargs']}: {detail}"
        ) from err
    return model.eval()


def shipped_model_file(name: str | os.PathLike) -> Path | None:
    """The shipped model file of a name such as ``"baseline"`` when no file of that name
    exists, else ``None``.

    >>> shipped_model_file("baseline").name, shipped_model_file("no-such-model")
    ('baseline.pt', None)
    """
    if isinstance(name, str) and not Path(name).exists() and "/" not in name and not name.endswith(".pt"):
        candidate = SHIPPED_DIR / f"{name}.pt"
        return candidate if candidate.is_file() else None
    return None


def init_source(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, model_kwargs)`` of a training checkpoint or of an exported model file.

    An exported ``.pt`` (e.g. ``companion/pretrained/baseline.pt``, float16) lets a fresh
    machine continue from the committed weights with ``--init-from``; its weights come back
    as float32. The name of a shipped model (``"baseline"``, ``"concrete"``) stands for its
    file.
    """
    path = shipped_model_file(path) or path
    try:
        ckpt = read_checkpoint(path, map_location="cpu")
        return ckpt["model"], ckpt["model_kwargs"]
    except ValueError as err:
        try:
            return read_exported(path)
        except Exception:  # neither kind: report why it is not a checkpoint
            raise err from None


def init_weights(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Copy the network weights of a training checkpoint or an exported model into ``model``.

    See ``init_from``. Raises ``ValueError`` (naming the file) when a weight of the source has
    no place in ``model``, has another shape, or when ``model`` lacks anything but dropout rates.
    """
    target = model.state_dict()
    source, kwargs = init_source(checkpoint)
    rates = {k for k in set(source) - set(target) if k.endswith("p_logit")}  # a baseline has none
    unexpected = sorted(set(source) - set(target) - rates)
    missing = sorted(k for k in set(target) - set(source) if not k.endswith("p_logit"))
    wrong = sorted(k for k in set(source) & set(target) if source[k].shape != target[k].shape)
    if unexpected or missing or wrong:
        shape = {k: kwargs[k] for k in ("base_filters", "depth", "embedding_dim") if k in (kwargs or {})}
        raise ValueError(
            f"{checkpoint}: its weights do not fit this network (other shape {wrong[:3]}, unexpected "
            f"{unexpected[:3]}, missing {missing[:3]}): init_from needs the same architecture "
            f"(the source has {shape or 'another'}); only the dropout rates may differ"
        )
    source = {k: v for k, v in source.items() if k not in rates}
    model.load_state_dict(source, strict=False)


# --------------------------------------------------------------------------------------------
# Writing and resuming
# --------------------------------------------------------------------------------------------
def _checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    iteration: int,
    rng_per_rank: list[dict],
    dist_info: DistInfo,
) -> dict:
    weights = unwrap(model).state_dict()
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "package_version": __version__,
        "torch_version": str(torch.__version__),
        "iteration": iteration,
        "config": config.to_dict(),
        "model_kwargs": config.model_kwargs(),
        "model": weights,
        "model_sha256": tensors_sha256(weights),  # verified by read_checkpoint
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_per_rank[0],
        "rng_per_rank": rng_per_rank,
        "data_position": {
            "iteration": iteration,
            "world_size": dist_info.world_size,
            "crops_per_iteration": config.batch_size * dist_info.world_size,
            "next_crop_index": iteration * config.batch_size * dist_info.world_size,
        },
    }


def write_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    iteration: int,
    dist_info: DistInfo,
    last_path: Path,
    on_checkpoint: Callable[[int, Path], None] | None,
) -> None:
    """Save the run at ``iteration`` to ``last_path`` (rank 0; every rank joins the RNG gather).

    ``on_checkpoint(iteration, last_path)`` is called after the file is in place.
    """
    rng_per_rank = _gather_rng(dist_info)
    if dist_info.is_main:
        state = _checkpoint_state(model, optimizer, scaler, config, iteration, rng_per_rank, dist_info)
        atomic_write(last_path, lambda tmp: torch.save(state, tmp))
        if on_checkpoint is not None:
            on_checkpoint(iteration, last_path)


def check_resumable(ckpt: dict, config: TrainConfig, path: Path) -> None:
    """Refuse a checkpoint of another architecture; warn about changed settings that matter."""
    saved = TrainConfig.from_dict(ckpt["config"])
    if saved.model_kwargs() != config.model_kwargs():
        raise ValueError(
            f"cannot resume from {path}: it was trained with the architecture "
            f"{saved.model_kwargs()}, the configuration asks for "
            f"{config.model_kwargs()}"
        )
    changed = [
        f.name
        for f in fields(TrainConfig)
        if f.name
        not in (
            "iterations",
            "checkpoint_every",
            "log_every",
            "num_workers",
            "snapshot_every",
            "select_every",
            "device",
            "amp",
            "channels_last",
            "cpu_bf16",
            "compile",
            "time_budget",
        )
        and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if changed:
        warnings.warn(
            f"resuming {path} with changed settings {changed}: the run is no longer "
            f"identical to an uninterrupted one",
            stacklevel=3,
        )
