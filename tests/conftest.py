"""Shared test fixtures: repository paths, the optional ../shared data, deterministic CPU torch."""

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def shared_ct_dir() -> Path:
    """The real CT scans beside the repository; tests that need them skip cleanly when absent."""
    path = SHARED_DIR / "data" / "ct"
    if not path.is_dir():
        pytest.skip("../shared/data/ct is not present beside the repository")
    return path
