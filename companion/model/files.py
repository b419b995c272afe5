"""The exported model files: ``torch.load(..., weights_only=True)`` with one-line errors, and the
format of the weight files that the package ships (:mod:`companion.pretrained`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._device import resolve_device

__all__ = ["EXPORTED_FORMAT", "SHIPPED_DIR", "check_map_location", "safe_load", "read_exported"]

#: ``format`` of the weight files that ``scripts/export_pretrained.py`` writes.
EXPORTED_FORMAT = "companion-pretrained"
#: Where the package's shipped models live (:mod:`companion.pretrained`).
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "pretrained"


def check_map_location(map_location: str | torch.device) -> None:
    """Refuse a ``map_location`` this machine cannot load onto, before any file is read.

    Without it ``torch.load`` fails on a CUDA location of a machine without CUDA with an error
    that reads as if the file were broken.

    Examples
    --------
    >>> check_map_location("cpu")
    >>> check_map_location("banana")
    Traceback (most recent call last):
    ...
    ValueError: map_location 'banana' is not a torch device (cpu, cuda, cuda:1, ...)
    """
    if not isinstance(map_location, (str, torch.device)):
        return  # a dict or a callable: torch's own remapping, passed through
    resolve_device(map_location, what="map_location")


def safe_load(path: Path, map_location: Any, what: str) -> Any:
    """``torch.load(path, weights_only=True)``; any refusal becomes one ``ValueError`` naming the file."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
        AttributeError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
    ) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} is not {what} (torch.load(weights_only=True) refused it: {first_line})"
        ) from err


def read_exported(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """``(state_dict, model_kwargs)`` of an exported model file, its weights as float32.

    Raises ``ValueError`` naming the file when it is not an exported companion model (also a
    truncated or otherwise unreadable one), and one saying so when ``map_location`` is a GPU
    but CUDA is not available.
    """
    check_map_location(map_location)
    payload = safe_load(path, map_location, "a readable exported companion model (truncated or corrupt?)")
    if not isinstance(payload, dict) or payload.get("format") != EXPORTED_FORMAT:
        raise ValueError(f"{path} is not an exported companion model (format {EXPORTED_FORMAT!r} missing)")
    weights, kwargs = payload.get("state_dict"), payload.get("model_kwargs")
    if (
        not isinstance(weights, dict)
        or not isinstance(kwargs, dict)
        or not all(isinstance(v, torch.Tensor) for v in weights.values())
    ):
        raise ValueError(
            f"{path} is not an exported companion model: it lacks a state_dict of tensors or its model_kwargs"
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    return state, kwargs
