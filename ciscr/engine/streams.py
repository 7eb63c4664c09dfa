"""The training loop's data: streams of batches whose order and augmentation are pure functions.

Data order is a pure function of ``(seed, stream, position)`` (see :class:`IndexStream`), and
augmentation a pure function of ``(seed, epoch, index)``, so a run resumed from a checkpoint at
iteration *t* draws exactly the batches an uninterrupted run would have drawn from *t* on.
``ciscr.engine.train`` (the loop) asks this module for the batches of iterations
``start..stop-1`` of every stream and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from ciscr import dist
from ciscr.config import TrainCfg
from ciscr.data.datasets import WorkerSafeLoader


@dataclass
class Stream:
    """A dataset drawn ``batch_size`` items per iteration, reshuffled every pass.

    ``repeat`` makes one pass visit every item that many times (small labeled sets are
    repeated twice per epoch, as in ST++/CISC-R).
    """

    dataset: Dataset
    batch_size: int
    repeat: int = 1
    # Images an item contributes (2 for stage-1 pairs): an epoch is one pass over the images,
    # so SupOnly and SupOnly + L_CISC train for the same number of steps.
    images_per_item: int = 1


class IndexStream:
    """Deterministic infinite index order: position p -> (item index, augmentation epoch)."""

    def __init__(self, n: int, seed: int, stream_id: int, repeat: int = 1) -> None:
        if n < 1:
            raise ValueError("a training stream needs at least one item")
        self.n, self.seed, self.stream_id, self.repeat = n, seed, stream_id, repeat
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, cycle: int) -> torch.Tensor:
        if cycle not in self._cache:
            g = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.stream_id * 7_919 + cycle) % (2**63)
            )
            self._cache = {cycle: torch.randperm(self.n * self.repeat, generator=g)}
        return self._cache[cycle]

    def item(self, p: int) -> tuple[int, int]:
        length = self.n * self.repeat
        cycle, offset = divmod(p, length)
        v = int(self._perm(cycle)[offset])
        # Each repetition of an item within a cycle gets its own augmentation epoch.
        return v % self.n, cycle * self.repeat + v // self.n

    def batch(self, t: int, batch_size: int) -> list[tuple[int, int]]:
        return [self.item(p) for p in range(t * batch_size, (t + 1) * batch_size)]


class _EpochIndexed(Dataset):
    """Lets a DataLoader fetch ``(index, epoch)`` keys from a dataset with ``set_epoch``."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)
        return self.ds[index]


class _Batches(torch.utils.data.Sampler):
    def __init__(self, order: IndexStream, start: int, stop: int, bs: int) -> None:
        self.order, self.start, self.stop, self.bs = order, start, stop, bs
        self.rank, self.world = dist.rank(), dist.world_size()

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for t in range(self.start, self.stop):
            # Every rank takes a strided share of the same global batch.
            yield self.order.batch(t, self.bs)[self.rank :: self.world]


def stream_loader(
    stream: Stream, stream_id: int, seed: int, start: int, stop: int, num_workers: int
) -> Iterator[dict[str, Any]]:
    """Batches for iterations ``start..stop-1`` of one stream."""
    order = IndexStream(len(stream.dataset), seed, stream_id, stream.repeat)  # type: ignore[arg-type]
    sampler = _Batches(order, start, stop, stream.batch_size)
    if num_workers == 0:
        return _InlineBatches(_EpochIndexed(stream.dataset), iter(sampler))
    loader = WorkerSafeLoader(
        _EpochIndexed(stream.dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=False,
        # Worker base seeds come from this generator, not from the global RNG: otherwise
        # starting the loader (once per run, again on resume) would shift the dropout masks.
        generator=torch.Generator().manual_seed(seed * 1_000_003 + stream_id),
    )
    return iter(loader)


class _InlineBatches:
    """A stream's batches loaded in this process (``num_workers`` 0), one per ``next``;
    ``skip`` passes an iteration's batch without loading it (see :func:`next_batches`)."""

    def __init__(self, ds: _EpochIndexed, keys: Iterator[list[tuple[int, int]]]) -> None:
        self.ds, self.keys = ds, keys

    def __iter__(self) -> _InlineBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        return default_collate([self.ds[k] for k in next(self.keys)])

    def skip(self) -> None:
        next(self.keys)


def iters_per_epoch(stream: Stream, cfg: TrainCfg) -> int:
    if cfg.iters_per_epoch:
        return cfg.iters_per_epoch
    images_per_step = stream.batch_size * stream.images_per_item
    return max(1, math.ceil(len(stream.dataset) * stream.repeat / images_per_step))  # type: ignore[arg-type]


def stream_loaders(streams: dict[str, Stream], seed: int, start: int, stop: int,
                   num_workers: int) -> dict[str, Iterator[dict[str, Any]]]:
    """Batch iterators of every stream for iterations ``start..stop-1`` (stream ids by name)."""
    return {name: stream_loader(s, i, seed, start, stop, num_workers)
            for i, (name, s) in enumerate(sorted(streams.items()))}


def next_batches(loaders: dict[str, Iterator[dict[str, Any]]], device: torch.device,
                 channels_last: bool, only: Collection[str] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """One batch of every stream (of the streams in ``only``, when given), on ``device``.

    A stream left out still moves on by one iteration, so every later batch is the one an
    uninterrupted run draws; WHY skip rather than load and drop: a step that needs only the
    labeled batch (``method.unlabeled_every``) should not pay for decoding and augmenting
    the unlabeled views it never reads (in this process, on the training core). Worker
    loaders have the batch on its way already: it is taken and dropped.
    """
    out = {}
    for name, it in loaders.items():
        if only is None or name in only:
            out[name] = _to_device(next(it), device, channels_last)
        elif isinstance(it, _InlineBatches):
            it.skip()
        else:
            next(it)
    return out


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out
