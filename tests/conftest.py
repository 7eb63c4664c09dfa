"""Shared test settings: tests use tiny tensors, for which one thread is fastest and keeps
parallel test processes on a 2-core machine from fighting over cores."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CISCR_SHARED", REPO.parent / "shared"))


@pytest.fixture
def shared_dir() -> Path:
    return SHARED
