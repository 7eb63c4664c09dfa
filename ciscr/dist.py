"""Distributed helpers (torchrun), in the style of nanoGPT: everything is a no-op in one process.

``torchrun --nproc_per_node N -m ciscr.cli train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` reads them, joins the process group (gloo on CPU, nccl on
CUDA) and pins each process to the GPU of its local rank. Without those variables the run is a
plain single process (world size 1) and every helper below returns immediately, so the training
and evaluation code calls them unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from ciscr.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def resolve_device(pref: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu``/``cuda``/``cuda:N``/``mps`` are checked.

    Raises ConfigError (naming ``device=``) when the requested device does not exist here.
    """
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={pref} but no CUDA device is available")
        dev = torch.device(pref)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={pref} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return dev
    if pref == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("device=mps but no MPS device is available")
        return torch.device("mps")
    if pref == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device={pref}: must be auto, cpu, cuda, cuda:N or mps")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device_pref: str) -> DistInfo:
    """Join the torchrun process group if launched by torchrun, else describe one process.

    Under torchrun a CUDA device is always ``cuda:LOCAL_RANK`` (one GPU per process), whatever
    index ``device_pref`` names; the process group is created once (idempotent).
    """
    device = resolve_device(device_pref)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 0, 1, device)
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                "exist; lower torchrun --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, local_rank, world, device)


def is_dist() -> bool:
    """True inside an initialised process group."""
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


# ``shard`` takes a parameter called ``rank``; this alias keeps the function reachable there.
_current_rank = rank


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Rank 0 writes files, logs and progress bars; the others stay quiet."""
    return rank() == 0


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks IN PLACE and return it (unchanged in one process).

    With nccl the tensor must live on this rank's GPU.
    """
    if is_dist():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: T) -> list[T]:
    """Picklable ``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process)."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def shard(items: list[T], rank: int | None = None, world: int | None = None) -> list[T]:
    """This rank's strided part ``items[rank::world]`` (no padding, no duplicates).

    Strided rather than contiguous so that :func:`unshard` can restore the original order from
    the gathered parts without knowing the sizes, and so that the parts differ by at most one.
    """
    r = _current_rank() if rank is None else rank
    w = world_size() if world is None else world
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"shard: rank {r} is not in [0, {w})")
    return items[r::w]


def unshard(parts: list[list[T]]) -> list[T]:
    """Inverse of :func:`shard`: ``parts[r]`` is rank r's shard; returns the original order."""
    out: list[T] = []
    longest = max((len(p) for p in parts), default=0)
    for i in range(longest):
        for p in parts:
            if i < len(p):
                out.append(p[i])
    return out


def map_sharded(fn: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
    """``[fn(x) for x in items]`` computed rank-sharded; every rank gets the full list, in the
    order of ``items``."""
    mine = [fn(x) for x in shard(list(items))]
    out = unshard(all_gather_object(mine))
    assert len(out) == len(items), "sharded results do not cover the item list"
    return list(out)


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun job)."""
    if is_dist():
        tdist.destroy_process_group()
