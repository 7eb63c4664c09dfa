"""``ciscr bench``: what CISC-R costs, measured side by side with plain self-training.

Three groups of measurements, each a round-robin over its variants (the order rotates every
round, so drift on a shared, noisy machine hits every variant equally); every figure is the
median of ``repeats`` timed runs after ``warmup`` untimed rounds:

- ``train``: one optimizer step (:func:`ciscr.engine.train._one_step`, the code ``train_stage``
  runs) of plain ST (``retrain_step(None)``), CISC-R query mode (teacher on the unlabeled AND a
  queried labeled batch every step), CISC-R bank mode with one / all classes (teacher on the
  unlabeled batch only), in fp32 and bf16 autocast, contiguous and channels_last. Images per
  step = labeled + unlabeled batch. Peak memory per variant (see :func:`variant_memory`) and
  FLOPs per step (``torch.utils.flop_counter``) come from separate runs.
- ``pseudo``: pseudo-labelling one full image, single scale vs TTA (5 scales x flip).
- ``select``: class prototypes of labeled images (the bank) and Eq. 10 anchor distances of
  pseudo-labelled images, through the real file-reading functions of :mod:`ciscr.selection`.

Weights are random (speed does not depend on them); inputs are random images with "blob"
labels (a few ellipses of random classes), so every batch holds several classes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import multiprocessing as mp
import os
import platform
import resource
import shlex
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ciscr.config import ModelCfg, TrainCfg
from ciscr.errors import ConfigError

METHODS = ("st", "query", "bank_one", "bank_all")
AMPS = ("none", "bf16")
BANK_TARGET = 1.10  # bank-mode step / ST step (issue 4)
BF16_TARGET = 1.40  # fp32 step / bf16 step on a CPU with avx512_bf16 (issue 4)
DEFAULT_PEAK_TFLOPS = 989.0  # H100/H200 SXM bf16 dense
MEMORY_STEPS = 2  # timed-free steps run by each memory measurement (after one warm-up step)


@dataclass(frozen=True)
class BenchSpec:
    """Sizes and settings of one benchmark run (everything the variants are built from)."""

    backbone: str = "mobilenet_v2"
    batch: int = 8
    crop: int = 192
    classes: int = 11
    channels: int = 256
    repeats: int = 7
    warmup: int = 2
    device: str = "cpu"
    threads: int = 0
    image_h: int = 360
    image_w: int = 480
    select_images: int = 4
    pool: int = 16  # labeled images the queries / bank draw from
    seed: int = 0


QUICK = {"batch": 2, "crop": 32, "classes": 3, "channels": 16, "repeats": 3, "warmup": 1,
         "image_h": 32, "image_w": 48, "select_images": 2, "pool": 4}  # fmt: skip


@dataclass(frozen=True)
class TrainVariant:
    """One train-step configuration."""

    method: str  # st | query | bank_one | bank_all
    amp: str  # none | bf16
    channels_last: bool

    @property
    def name(self) -> str:
        return f"{self.method}/{_amp_name(self.amp)}/{'cl' if self.channels_last else 'nchw'}"


def _amp_name(amp: str) -> str:
    return "fp32" if amp == "none" else amp


def train_variants(formats: Sequence[bool] = (False, True)) -> list[TrainVariant]:
    """Every method x precision x memory format, ST first."""
    return [TrainVariant(m, a, cl) for cl in formats for a in AMPS for m in METHODS]


# --------------------------------------------------------------------------- inputs


def blob_labels(
    n: int, h: int, w: int, num_classes: int, g: torch.Generator, blobs: int = 4
) -> torch.Tensor:
    """int64 (n, h, w) label maps: a random background class plus ``blobs`` random ellipses.

    A realistic stand-in for pseudo labels: several classes per image, compact regions.
    """
    yy = torch.arange(h, dtype=torch.float32).view(h, 1)
    xx = torch.arange(w, dtype=torch.float32).view(1, w)
    out = torch.empty(n, h, w, dtype=torch.long)
    for i in range(n):
        lab = torch.full((h, w), int(torch.randint(num_classes, (1,), generator=g)))
        for _ in range(blobs):
            cy, cx, ry, rx = torch.rand(4, generator=g).tolist()
            ry, rx = (0.15 + 0.3 * ry) * h, (0.15 + 0.3 * rx) * w
            inside = ((yy - cy * h) / ry) ** 2 + ((xx - cx * w) / rx) ** 2 <= 1
            lab[inside] = int(torch.randint(num_classes, (1,), generator=g))
        out[i] = lab
    return out


class _TensorPool(torch.utils.data.Dataset):
    """In-memory labeled images for query mode: ``{"image": (3,H,W), "mask": (H,W)}``.

    SIMPLIFICATION: the real SegDataset reads and augments a file per query; serving tensors
    leaves that cost out, which flatters query mode (the baseline bank mode is compared with).
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "mask": self.masks[i]}

    def set_epoch(self, epoch: int) -> None:  # the Rectifier calls it; nothing to redraw
        pass


def _batches(spec: BenchSpec, g: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    b, s, k = spec.batch, spec.crop, spec.classes
    return {
        "labeled": {"image": torch.randn(b, 3, s, s, generator=g),
                    "mask": blob_labels(b, s, s, k, g)},
        "unlabeled": {"image": torch.randn(b, 3, s, s, generator=g),
                      "pseudo": blob_labels(b, s, s, k, g)},
    }  # fmt: skip


def _model_cfg(spec: BenchSpec) -> ModelCfg:
    return ModelCfg(backbone=spec.backbone, pretrained="", channels=spec.channels)


def _build(spec: BenchSpec, device: torch.device, channels_last: bool, train: bool) -> nn.Module:
    from ciscr.models import build_model

    model = build_model(_model_cfg(spec), spec.classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not train:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


# --------------------------------------------------------------------------- train cases


@dataclass
class _Models:
    """Student (+ optimizer state) and teacher shared by the variants of one memory format."""

    student: nn.Module
    state: Any
    teacher: nn.Module | None


def _make_models(spec: BenchSpec, device: torch.device, channels_last: bool, teacher: bool):
    from ciscr.engine.train import StageState, build_optimizer, build_scheduler

    student = _build(spec, device, channels_last, train=True).train()
    # A tiny learning rate keeps the random-init weights from diverging to inf/NaN (or
    # denormals, which are slow on CPU) over the benchmark; SGD's cost does not depend on it.
    opt = build_optimizer(student, TrainCfg(lr=1e-6))
    state = StageState(student, opt, build_scheduler(opt, 10**9, 0.9), None, 0, 10**9)
    tea = _build(spec, device, channels_last, train=False) if teacher else None
    return _Models(student, state, tea)


def _pool(spec: BenchSpec, g: torch.Generator) -> _TensorPool:
    n, s = spec.pool, spec.crop
    return _TensorPool(torch.randn(n, 3, s, s, generator=g), blob_labels(n, s, s, spec.classes, g))


def make_rectifier(
    method: str, spec: BenchSpec, teacher: nn.Module, amp: str, device: torch.device,
    pool: _TensorPool, g: torch.Generator,
):
    """A :class:`~ciscr.engine.steps.Rectifier` built as ``pipeline.build_rectifier`` builds it
    (teacher features under the stage's autocast); the bank holds random prototypes."""
    from ciscr.engine.steps import Rectifier
    from ciscr.utils.misc import autocast

    k = spec.classes
    present = torch.stack([torch.bincount(m.flatten(), minlength=k)[:k] > 0 for m in pool.masks])
    queries = {c: [j for j in range(len(pool)) if bool(present[j, c])] for c in range(k)}
    bank = None
    if method != "query":
        bank = (torch.rand(len(pool), k, spec.channels, generator=g) * present[..., None]).to(device)

    def features(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return teacher(x).features

    return Rectifier(
        features=features, mode="query" if method == "query" else "bank",
        classes="all" if method == "bank_all" else "one", num_classes=k, query_lists=queries,
        seed=spec.seed, labeled=pool if method == "query" else None, bank=bank,
        bank_present=present if bank is not None else None,
    )


@dataclass
class TrainCase:
    """One variant's optimizer step, ready to call; also exposes its rectifier and batches."""

    variant: TrainVariant
    models: _Models
    step_fn: Callable
    rectifier: Any
    batches: dict[str, dict[str, torch.Tensor]]
    cfg: TrainCfg
    device: torch.device
    it: int = 0

    def __call__(self) -> None:
        from ciscr.engine.train import _one_step

        self.it += 1
        _one_step(self.models.student, self.models.state, self.step_fn, self.batches, self.it,
                  self.cfg, self.device)  # fmt: skip

    def rectify(self) -> None:
        """The rectifier alone (teacher forward + CISC maps), under the step's autocast."""
        from ciscr.utils.misc import autocast

        ub = self.batches["unlabeled"]
        self.it += 1
        with autocast(self.device, self.cfg.amp):
            self.rectifier(ub["image"], ub["pseudo"], self.it)

    def teacher_forward(self) -> None:
        """The teacher forward on the unlabeled batch, as the rectifier runs it."""
        with torch.no_grad():
            self.rectifier.features(self.batches["unlabeled"]["image"])


def make_train_case(
    variant: TrainVariant, spec: BenchSpec, device: torch.device, models: _Models,
    inputs: dict[str, Any],
) -> TrainCase:
    """Wire a variant's step function to shared models and inputs (see :func:`make_inputs`)."""
    from ciscr.engine.steps import retrain_step
    from ciscr.engine.train import _to_device

    rect = None
    if variant.method != "st":
        rect = make_rectifier(variant.method, spec, models.teacher, variant.amp, device,
                              inputs["pool"], torch.Generator().manual_seed(spec.seed + 7))
    cfg = TrainCfg(amp=variant.amp, channels_last=variant.channels_last, lr=1e-6)
    batches = {n: _to_device(b, device, variant.channels_last) for n, b in inputs["batches"].items()}
    return TrainCase(variant, models, retrain_step(rect), rect, batches, cfg, device)


def make_inputs(spec: BenchSpec) -> dict[str, Any]:
    """Random batches and the labeled pool, identical for every variant."""
    g = torch.Generator().manual_seed(spec.seed)
    return {"batches": _batches(spec, g), "pool": _pool(spec, g)}


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_round_robin(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds of each call, ``warmup`` untimed then ``repeats`` timed rounds over all ``fns``.

    Every round visits every function once; the starting point rotates by one each round so
    no variant always runs right after the same neighbour (cache state, clock boost, ...).
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def variant_memory(spec_d: dict[str, Any], variant_d: dict[str, Any]) -> float:
    """Peak memory (MiB) one train variant needs: its models, optimizer state, inputs, step.

    CPU: run in a FRESH process (see :func:`measure_memory`), as the peak resident set size
    (``ru_maxrss``) minus the resident size when the process started (torch already
    imported); a fresh process per variant is the only way ``ru_maxrss`` is per-variant.
    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before building.
    """
    spec, variant = BenchSpec(**spec_d), TrainVariant(**variant_d)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _rss_bytes()
    models = _make_models(spec, device, variant.channels_last, variant.method != "st")
    case = make_train_case(variant, spec, device, models, make_inputs(spec))
    for _ in range(1 + MEMORY_STEPS):
        case()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # KiB on Linux
    return peak / 2**20


def measure_memory(spec: BenchSpec, variants: Sequence[TrainVariant]) -> dict[str, float]:
    """MiB per variant name; on CPU each variant runs in its own forked worker process."""
    args = [(asdict(spec), asdict(v)) for v in variants]
    if spec.device.startswith("cuda"):
        return {v.name: variant_memory(*a) for v, a in zip(variants, args, strict=True)}
    # forkserver: children fork from a clean server that has only imported this module, so
    # each one starts small (never a copy of this process and its models), and quickly.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["ciscr.bench"])
    out = {}
    with ctx.Pool(1, maxtasksperchild=1) as pool:  # one fresh process per variant
        for v, a in zip(variants, args, strict=True):
            out[v.name] = pool.apply(variant_memory, a)
    return out


# --------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())
