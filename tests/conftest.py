"""Shared fixtures: the real BBBC010 copy (skipped with a reason when absent) and seeds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
_SHARED = REPO_ROOT.parent / "shared" / "bbbc010"


def real_data_root() -> Path | None:
    """``$BBBC010_ROOT`` if set, else ``../shared/bbbc010`` beside the project, else ``None``."""
    env = os.environ.get("BBBC010_ROOT")
    if env and Path(env).is_dir():
        return Path(env)
    return _SHARED if _SHARED.is_dir() else None


@pytest.fixture(scope="session")
def bbbc010_root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("real BBBC010 data not found: set BBBC010_ROOT or place it at ../shared/bbbc010")
    return root


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
