"""Checkpoint roundtrip, corruption detection, atomicity, RNG state, safetensors export."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ciscr.engine import checkpoint as ck
from ciscr.engine.checkpoint import (
    export_weights,
    get_rng_state,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    set_rng_state,
)
from ciscr.errors import CheckpointError


def _state() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "iteration": 7,
        "meta": {"name": "x", "ratio": 0.5, "flag": True, "none": None, "pair": (1, 2)},
        "rng": get_rng_state(),
    }


def test_roundtrip_is_weights_only_loadable(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "sub" / "checkpoint.pt"
    save_checkpoint(path, state)
    raw = torch.load(path, weights_only=True)  # plain torch can read it safely too
    assert raw["ciscr_checkpoint"] == 1
    back = load_checkpoint(path)
    assert "ciscr_checkpoint" not in back
    assert back["iteration"] == 7 and back["meta"] == state["meta"]
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    buf = state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(back["optimizer"]["state"][0]["momentum_buffer"], buf)


@pytest.mark.parametrize(
    "bad", [np.zeros(3), np.float64(1.0), object(), {1, 2}, {"k": [1, np.int64(3)]}]
)
def test_unsafe_values_are_rejected_before_writing(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "c.pt"
    with pytest.raises(TypeError, match="weights_only|key"):
        save_checkpoint(path, {"ok": 1, "bad": bad})
    assert not path.exists()


def test_missing_corrupt_truncated_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.randn(4096)})
    data = good.read_bytes()
    mid = len(data) // 2
    cases = {
        "half.pt": data[:mid],
        "minus10.pt": data[:-10],
        "empty.pt": b"",
        "flipped.pt": data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :],
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match="checkpoint is corrupt or truncated") as e:
            load_checkpoint(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value)
    # Issue 33: a file that never was a checkpoint is not called corrupt (nor to be deleted).
    (tmp_path / "notes.pt").write_text("some text renamed .pt\n")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    for name in ("notes.pt", "random.pt"):
        with pytest.raises(CheckpointError, match="not a ciscr checkpoint") as e:
            load_checkpoint(tmp_path / name)
        assert "corrupt or truncated" not in str(e.value)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a ciscr checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"a": np.zeros(2)}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="not a ciscr checkpoint"):
        load_checkpoint(tmp_path / "unsafe.pt")


def test_failed_write_keeps_old_checkpoint_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1})

    def dying_save(obj: object, f: Path) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    torch.randn(10), random.random(), np.random.randn()  # move away from the seed state
    save_checkpoint(tmp_path / "r.pt", {"rng": get_rng_state()})
    expected = (torch.rand(5), random.random(), np.random.rand(3), random.gauss(0, 1))
    torch.rand(100), random.random(), np.random.rand(7)  # diverge
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(5), random.random(), np.random.rand(3), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0])
    assert got[1] == expected[1] and got[3] == expected[3]
    assert np.array_equal(got[2], expected[2])


def test_export_weights_safetensors_with_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    path = tmp_path / "model.safetensors"
    export_weights(path, model, {"backbone": "resnet18", "num_classes": "2"})
    tensors, meta = load_weights(path)
    assert meta == {"backbone": "resnet18", "num_classes": "2"}
    assert set(tensors) == set(model.state_dict())
    assert torch.equal(tensors["0.weight"], model[0].weight.detach())
    with pytest.raises(TypeError, match="str to str"):
        export_weights(tmp_path / "x.safetensors", model, {"num_classes": 2})  # type: ignore
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_weights(tmp_path / "junk.safetensors")
