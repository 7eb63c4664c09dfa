"""dist helpers in one process, plus one real 2-process gloo job (the torchrun path)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ciscr import dist
from ciscr.errors import ConfigError
from ciscr.utils.misc import Timer, autocast, count_parameters, make_grad_scaler, seed_everything

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def test_single_process_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    info = dist.init_distributed("cpu")
    assert (info.rank, info.local_rank, info.world_size, info.device.type) == (0, 0, 1, "cpu")
    assert not dist.is_dist() and dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object("x") == "x"
    dist.barrier()
    dist.cleanup()


def test_shard_unshard_roundtrip() -> None:
    for n in range(11):
        items = [f"id{i}" for i in range(n)]
        for world in range(1, 5):
            parts = [dist.shard(items, r, world) for r in range(world)]
            assert sum(len(p) for p in parts) == n
            assert max(map(len, parts), default=0) - min(map(len, parts), default=0) <= 1
            assert dist.unshard(parts) == items
    assert dist.shard([0, 1, 2, 3, 4], 1, 2) == [1, 3]
    assert dist.shard([5, 6]) == [5, 6]  # defaults: this process, world 1
    with pytest.raises(ValueError):
        dist.shard([1], 2, 2)


def test_resolve_device() -> None:
    assert dist.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert dist.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="device=cuda but no CUDA device is available"):
            dist.resolve_device("cuda")


def test_misc_helpers() -> None:
    with pytest.raises(ConfigError, match="train.amp=fp16 needs a CUDA device; use bf16 on CPU"):
        with autocast("cpu", "fp16"):
            pass
    with autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", "none"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert make_grad_scaler("cpu", "bf16") is None and make_grad_scaler("cpu", "none") is None
    seed_everything(5)
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    seed_everything(5)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert torch.are_deterministic_algorithms_enabled()
    seed_everything(5, deterministic=False)  # leave the process as other tests expect it
    assert not torch.are_deterministic_algorithms_enabled()
    assert count_parameters(torch.nn.Linear(3, 2)) == 8
    with Timer() as t:
        pass
    assert 0 <= t.elapsed < 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from ciscr.engine.evaluate import ConfusionMatrix, eval_indices

    info = dist.init_distributed("cpu")
    cm = ConfusionMatrix(2)
    mine = eval_indices(5, info.rank, info.world_size)  # rank 0: 0,2,4; rank 1: 1,3
    cm.update(torch.tensor(mine) % 2, torch.zeros(len(mine), dtype=torch.long))
    cm.reduce_from_all_processes()
    gathered = dist.all_gather_object(mine)
    token = dist.broadcast_object(f"from{rank}", src=0)
    t = dist.all_reduce_sum(torch.tensor([rank + 1.0]))
    dist.barrier()
    result = (info.world_size, cm.mat.tolist(), dist.unshard(gathered), token, t.item())
    torch.save(result, Path(out) / f"r{rank}.pt")
    dist.cleanup()


def test_two_process_gloo_job(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        world, mat, order, token, total = torch.load(tmp_path / f"r{r}.pt")
        assert world == 2 and token == "from0" and total == 3.0
        assert order == [0, 1, 2, 3, 4]
        assert mat == [[3, 2], [0, 0]]  # predictions i % 2 for i in 0..4, every target 0
