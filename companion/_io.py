"""Atomic file writes: a reader never sees a half-written checkpoint, cache or result file.

Every writer fills a temporary file in the target's folder and moves it over the target with
:func:`os.replace` (atomic on POSIX and Windows); on any error the temporary file is removed and
the old target, if any, is left untouched.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_savez", "file_sha256", "tensors_sha256"]


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of named tensors (names, dtypes, shapes and values), e.g. a model's state dict.

    The same on every device and after a save / load round trip; one changed bit changes it.

    Examples
    --------
    >>> import torch
    >>> state = {"w": torch.zeros(3)}
    >>> digest = tensors_sha256(state)
    >>> state["w"][1] = 1e-30
    >>> len(digest), tensors_sha256(state) == digest
    (64, False)
    """
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in chunks.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "empty"
    >>> _ = target.write_bytes(b"")
    >>> file_sha256(target)[:16]
    'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Create or replace ``path`` atomically; ``write(tmp)`` fills the temporary file ``tmp``.

    The result is world-readable (``0644``), like a file written with :func:`open`, although
    :func:`tempfile.mkstemp` creates ``0600`` files.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
    >>> _ = atomic_write(target, lambda tmp: pathlib.Path(tmp).write_text("hello"))
    >>> target.read_text()
    'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and str(path) not in str(err):  # e.g. a full disk: say where
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Create or replace ``path`` atomically with ``data``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_savez(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """:func:`numpy.savez_compressed` ``arrays`` to ``path`` atomically (no ``.npz`` appended)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a handle: savez would append ".npz" to a path
            np.savez_compressed(handle, **arrays)

    return atomic_write(path, write)
