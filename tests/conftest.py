"""Shared test settings: tests use tiny tensors, for which one thread is fastest and keeps
parallel test processes on a 2-core machine from fighting over cores."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CISCR_SHARED", REPO.parent / "shared"))


@pytest.fixture
def shared_dir() -> Path:
    return SHARED


# No test may reach outside this machine, nor read or fill the user's torch hub cache: weights
# named by model.pretrained (imagenet) resolve into a per-session TORCH_HOME (subprocesses
# inherit it), and a download from anywhere but the loopback interface fails the test.
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="ciscr-test-torch-home-")
atexit.register(shutil.rmtree, os.environ["TORCH_HOME"], True)


@pytest.fixture(autouse=True)
def _no_downloads_from_the_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.parse import urlparse

    from ciscr.models import weights

    real = weights._download

    def guarded(url: str, dst: Path, hash_prefix: str, progress: bool = True) -> None:
        host = urlparse(url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            pytest.fail(f"a test tried to download {url}; tests must stay on this machine")
        real(url, dst, hash_prefix, progress)

    monkeypatch.setattr(weights, "_download", guarded)
