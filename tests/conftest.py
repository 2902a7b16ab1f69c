"""Shared fixtures for the test suite.

Real data sets live in ``../shared/data`` (next to the repository, never copied into it); tests
that need them take the ``shared_data`` fixture and skip cleanly when the folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder; skips the test when it is absent."""
    if not DATA.is_dir():
        pytest.skip(f"no shared data folder at {DATA}")
    return DATA


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator (each test gets a fresh one, so tests are order-independent)."""
    return torch.Generator().manual_seed(1234)
