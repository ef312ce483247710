"""Shared test setup: where the offline models/data are, and one torch thread.

The CI and developer machines have 2 cores; two BLAS threads on the tiny matrices of these tests are an
order of magnitude slower than one when anything else runs, so every test runs single-threaded.
"""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL_DIR = Path(os.environ.get("OPTPRUNE_MODEL_DIR", SHARED / "models"))
DATA_DIR = Path(os.environ.get("OPTPRUNE_DATA_DIR", SHARED / "data"))
STORIES = MODEL_DIR / "stories260K"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def stories_dir() -> Path:
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found in {MODEL_DIR} (set OPTPRUNE_MODEL_DIR)")
    return STORIES
