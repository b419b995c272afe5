"""A training run's folder: its files, its lock, and its log.

A run writes into one folder ``OUT``: ``last.pt`` (the latest checkpoint), ``final.pt``,
``iter_<N>.pt`` snapshots, ``log.jsonl`` (one record every ``log_every`` iterations, see
:data:`TERM_NAMES`), with validation scores ``best.pt`` and ``selection.jsonl``
(:mod:`companion.training.selection`), ``data.json`` (what ``python -m companion train`` trained on, so
that ``--resume`` with other data is refused), and the lock file ``.lock`` that keeps a second run out.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

from .._io import atomic_write_bytes

__all__ = [
    "TERM_NAMES",
    "LOCK_NAME",
    "RunFolderBusyError",
    "lock_run_folder",
    "existing_run_files",
    "prepare_run_folder",
    "read_log",
    "trim_log",
]

#: Names of the loss terms logged to ``log.jsonl`` (the fields of ``ObjectiveTerms``).
TERM_NAMES = ("total", "var", "dist", "reg", "ce", "model_reg")


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a run's ``log.jsonl`` (the file or its run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trim_log(log_path: Path, iteration: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the run repeats them)."""
    if not log_path.exists():
        return
    kept = [
        line
        for line in log_path.read_text().splitlines()
        if line.strip() and json.loads(line)["iteration"] <= iteration
    ]
    atomic_write_bytes(log_path, "".join(line + "\n" for line in kept).encode())


class RunFolderBusyError(OSError):
    """Another process holds the folder's lock (``OUT/.lock``)."""


#: The lock file of a run folder (see :func:`lock_run_folder`).
LOCK_NAME = ".lock"


@contextlib.contextmanager
def lock_run_folder(out_dir: str | os.PathLike, purpose: str = "training") -> Iterator[Path]:
    """Hold an exclusive lock on ``out_dir`` (created if needed) while the block runs.

    ``purpose`` names the kind of process in the messages (training, evaluation, prediction):
    every command that writes a folder locks it.

    The lock is an :func:`fcntl.flock` on ``out_dir/.lock``, which records the holder's pid and
    host. The operating system drops it when the holder exits, also when it crashes or is
    killed, so a stale lock file never blocks a later run. Where the file system cannot lock
    (some network or FUSE mounts, Windows) the run goes on with a warning.

    Raises
    ------
    RunFolderBusyError
        Another process holds the lock (names the folder and, when recorded, its pid).

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with lock_run_folder(folder):
    ...     with lock_run_folder(folder):  # doctest: +ELLIPSIS
    ...         pass
    Traceback (most recent call last):
    ...
    companion.training.run_folder.RunFolderBusyError: ... is in use by another training process (pid ...
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        warnings.warn(
            f"cannot lock {out_dir} on this platform: make sure no other {purpose} writes there", stacklevel=4
        )
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = os.read(fd, 200).decode(errors="replace").split()
                who = (
                    f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "")
                    if holder
                    else "pid not recorded yet"
                )
                raise RunFolderBusyError(
                    f"{out_dir} is in use by another {purpose} process ({who}; lock file "
                    f"{path}): wait for it to finish or stop it, or choose another folder"
                ) from None
            warnings.warn(
                f"cannot lock {out_dir} ({err.strerror or err}): make sure no other {purpose} writes there",
                stacklevel=4,
            )
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting run)


#: Files of a run in its folder, besides the ``iter_<N>.pt`` snapshots.
_RUN_FILES = ("last.pt", "final.pt", "log.jsonl", "best.pt", "selection.jsonl", "data.json")


def existing_run_files(out_dir: Path) -> list[Path]:
    """The files of an earlier run in ``out_dir`` (checkpoints, log, snapshots); may be empty."""
    found = [out_dir / name for name in _RUN_FILES if (out_dir / name).exists()]
    return found + sorted(out_dir.glob("iter_*.pt"))


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, clear) an earlier run's files; drop stale temporary files.

    Called on rank 0 while it holds the folder's lock, so no other run is writing there.
    """
    # a writer killed between filling its temporary file and the rename (see companion._io)
    stale = sorted(p for name in _RUN_FILES + ("iter_*.pt",) for p in out_dir.glob(f".{name}.*.tmp"))
    for path in stale:
        path.unlink()
    if stale:
        warnings.warn(
            f"removed {len(stale)} unfinished temporary file(s) of an interrupted run "
            f"from {out_dir}: {', '.join(p.name for p in stale)}",
            stacklevel=3,
        )
    if resume:
        return
    found = existing_run_files(out_dir)
    if found and overwrite:
        for path in found:
            path.unlink()
        warnings.warn(
            f"overwrite: removed the earlier run's {', '.join(p.name for p in found)} from {out_dir}",
            stacklevel=3,
        )
    elif (out_dir / "last.pt").exists():
        raise FileExistsError(
            f"{out_dir} already holds a checkpoint (last.pt); pass resume=True "
            f"(--resume) to continue it, overwrite=True (--overwrite) to replace "
            f"it, or choose another folder"
        )
    elif found:
        raise FileExistsError(
            f"{out_dir} already holds files of another run "
            f"({', '.join(p.name for p in found)}) but no last.pt to resume from; "
            f"pass overwrite=True (--overwrite) to replace them, or choose "
            f"another folder"
        )
