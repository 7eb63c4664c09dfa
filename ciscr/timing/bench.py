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
import gc
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ciscr.config import ModelCfg, TrainCfg, preset_overrides
from ciscr.errors import ConfigError
from ciscr.timing.common import (
    at_least,
    comma_list,
    device_sync,
    fmt,
    header,
    load_noise,
    measured,
    median,
    print_and_write,
    spelled,
    table,
    time_round_robin,
    timing_row,
)
from ciscr.utils.misc import precision_name

METHODS = ("st", "query", "bank_one", "bank_all")
AMPS = ("none", "bf16")
BANK_TARGET = 1.10  # bank-mode step / ST step (issue 4)
BF16_TARGET = 1.40  # fp32 step / bf16 step on a CPU with avx512_bf16 (issue 4)
DEFAULT_PEAK_TFLOPS = 989.0  # H100/H200 SXM bf16 dense
MEMORY_STEPS = 2  # steps run by each memory measurement (the first one creates the momentum)


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
        return f"{self.method}/{precision_name(self.amp)}/{'cl' if self.channels_last else 'nchw'}"


def _st_name(row: dict[str, Any]) -> str:
    """The ST variant of a train row's precision and memory format."""
    return f"st/{row['precision']}/{row['format']}"


def train_variants(formats: Sequence[bool] = (False, True)) -> list[TrainVariant]:
    """Every method x precision x memory format, ST first."""
    return [TrainVariant(m, a, cl) for cl in formats for a in AMPS for m in METHODS]


# --------------------------------------------------------------------------- inputs, train cases


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


def make_inputs(spec: BenchSpec) -> dict[str, Any]:
    """Random batches and the labeled pool, identical for every variant."""
    g = torch.Generator().manual_seed(spec.seed)
    b, s, k = spec.batch, spec.crop, spec.classes

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, s, s, generator=g)

    batches = {"labeled": {"image": images(b), "mask": blob_labels(b, s, s, k, g)},
               "unlabeled": {"image": images(b), "pseudo": blob_labels(b, s, s, k, g)}}
    return {"batches": batches,
            "pool": _TensorPool(images(spec.pool), blob_labels(spec.pool, s, s, k, g))}


def _build(spec: BenchSpec, device: torch.device, channels_last: bool, train: bool) -> nn.Module:
    from ciscr.models import build_model

    cfg = ModelCfg(backbone=spec.backbone, pretrained="", channels=spec.channels)
    model = build_model(cfg, spec.classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model if train else model.eval().requires_grad_(False)


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _make_models(spec: BenchSpec, device: torch.device, channels_last: bool, teacher: bool):
    """(student, its StageState, teacher or None), shared by the variants of a memory format."""
    from ciscr.engine.train import StageState, build_optimizer, build_scheduler

    student = _build(spec, device, channels_last, train=True).train()
    # A tiny learning rate keeps the random-init weights from diverging to inf/NaN (or
    # denormals, which are slow on CPU) over the benchmark; SGD's cost does not depend on it.
    opt = build_optimizer(student, TrainCfg(lr=1e-6))
    state = StageState(student, opt, build_scheduler(opt, 10**9, 0.9), None, 0, 10**9)
    tea = _build(spec, device, channels_last, train=False) if teacher else None
    return student, state, tea


def make_rectifier(
    method: str, spec: BenchSpec, teacher: nn.Module, amp: str, device: torch.device,
    pool: _TensorPool, g: torch.Generator,
):
    """A :class:`~ciscr.engine.steps.Rectifier` built as ``stage_plans.build_rectifier`` builds it
    (teacher features under the stage's autocast); the bank holds random prototypes."""
    from ciscr.engine.steps import Rectifier
    from ciscr.utils.misc import autocast

    k, query = spec.classes, method == "query"
    present = torch.stack([torch.bincount(m.flatten(), minlength=k)[:k] > 0 for m in pool.masks])
    queries = {c: [j for j in range(len(pool)) if bool(present[j, c])] for c in range(k)}
    bank = None
    if not query:
        bank = (torch.rand(len(pool), k, spec.channels, generator=g) * present[..., None])
        bank = bank.to(device)

    def features(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return teacher(x).features

    return Rectifier(features=features, mode="query" if query else "bank",
                     classes="all" if method == "bank_all" else "one", num_classes=k,
                     query_lists=queries, seed=spec.seed, labeled=pool if query else None,
                     bank=bank, bank_present=None if query else present)  # fmt: skip


@dataclass
class TrainCase:
    """One variant's optimizer step, ready to call; also exposes its rectifier and batches."""

    variant: TrainVariant
    models: tuple  # (student, its StageState, teacher), see _make_models
    step_fn: Callable
    rectifier: Any
    batches: dict[str, dict[str, torch.Tensor]]
    cfg: TrainCfg
    device: torch.device
    it: int = 0

    def __call__(self) -> None:
        from ciscr.engine.train import _one_step

        self.it += 1
        student, state, _ = self.models
        _one_step(student, state, self.step_fn, self.batches, self.it, self.cfg, self.device)

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
    variant: TrainVariant, spec: BenchSpec, device: torch.device, models: tuple,
    inputs: dict[str, Any],
) -> TrainCase:
    """Wire a variant's step function to shared models and inputs (see :func:`make_inputs`)."""
    from ciscr.engine.steps import retrain_step
    from ciscr.engine.train import _to_device

    v, rect = variant, None
    if v.method != "st":
        rect = make_rectifier(v.method, spec, models[2], v.amp, device, inputs["pool"],
                              torch.Generator().manual_seed(spec.seed + 7))
    cfg = TrainCfg(amp=v.amp, channels_last=v.channels_last, lr=1e-6)
    batches = {n: _to_device(b, device, v.channels_last) for n, b in inputs["batches"].items()}
    return TrainCase(v, models, retrain_step(rect), rect, batches, cfg, device)


# --------------------------------------------------------------------------- memory


def _rss_bytes() -> tuple[int, int]:
    """(resident bytes, of which file-backed): /proc/self/status VmRSS and RssFile."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields.get("RssFile", 0)


def variant_memory(spec_d: dict[str, Any], variant_d: dict[str, Any]) -> float:
    """Peak memory (MiB) one train variant needs: its models, optimizer state, inputs, step.

    ``method="teacher"`` measures the teacher alone: its weights plus two no-grad forwards of
    the unlabeled batch (created before the baseline: ST holds that batch too).

    CPU: run in a FRESH process (see :func:`measure_memory`), as the peak resident set size
    (``ru_maxrss``) minus the resident size when the process started (torch already
    imported) and minus the growth of its file-backed pages (library code paged in); a fresh
    process per variant is the only way ``ru_maxrss`` is per-variant.
    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before building.
    """
    spec, v = BenchSpec(**spec_d), TrainVariant(**variant_d)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device, cuda = torch.device(spec.device), spec.device.startswith("cuda")
    x = None
    if v.method == "teacher":
        x = torch.randn(spec.batch, 3, spec.crop, spec.crop, device=device)
        x = x.contiguous(memory_format=torch.channels_last) if v.channels_last else x
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _rss_bytes()
    step = _teacher_alone(spec, v, device, x) if x is not None else make_train_case(
        v, spec, device, _make_models(spec, device, v.channels_last, v.method != "st"),
        make_inputs(spec))  # fmt: skip
    for _ in range(MEMORY_STEPS):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # Library code (libtorch, oneDNN kernels) is paged in as the variant first runs it;
    # that file-backed growth is not the variant's memory, so it is subtracted.
    code = _rss_bytes()[1] - base[1]
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base[0] - code) / 2**20


def _teacher_alone(spec: BenchSpec, v: TrainVariant, device: torch.device,
                   x: torch.Tensor) -> Callable[[], Any]:
    """A no-grad teacher forward of ``x``, the teacher built now (its weights count)."""
    from ciscr.utils.misc import autocast

    teacher = _build(spec, device, v.channels_last, train=False)

    def forward() -> None:
        with torch.no_grad(), autocast(device, v.amp):
            teacher(x).features.float()

    return forward


def measure_memory(spec: BenchSpec, variants: Sequence[TrainVariant]) -> dict[str, float]:
    """MiB per variant name; on CPU each variant runs in its own fresh forked process."""
    args = [(asdict(spec), asdict(v)) for v in variants]
    if spec.device.startswith("cuda"):
        return {v.name: variant_memory(*a) for v, a in zip(variants, args, strict=True)}
    # A small server process imports this module once and forks one child per variant: each
    # child starts small (never a copy of this process and its models) and quickly (torch is
    # already imported). multiprocessing's forkserver would do the same but re-imports the
    # caller's __main__, which breaks scripts without a main guard.
    code = "from ciscr.timing.bench import _memory_server; _memory_server()"
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=memory_env()) as server:
        out = {}
        for v, a in zip(variants, args, strict=True):
            server.stdin.write(json.dumps(a) + "\n")
            server.stdin.flush()
            reply = server.stdout.readline()
            if not reply.startswith(_RESULT):
                raise RuntimeError(f"memory measurement of {v.name} failed (see stderr)")
            out[v.name] = float(reply[len(_RESULT) :])
        server.stdin.close()
    return out


def memory_env() -> dict[str, str]:
    """Environment of the memory server: this package importable, glibc's mmap threshold fixed."""
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the ciscr package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    # WHY: glibc's default mmap threshold grows as large blocks are freed, after which freed
    # activations stay in the heap, fragmented, and the resident peak depends on the order of
    # earlier allocations (two identical ST runs measured hundreds of MiB apart). A fixed
    # threshold maps every large block and unmaps it on free: the peak is the live peak, as
    # torch.cuda.max_memory_allocated is on a GPU, and identical runs agree (memory_repeat_mib).
    env.update({k: env.get(k, str(MALLOC_THRESHOLD)) for k in MALLOC_ENV})
    return env


_RESULT = "ciscr-bench-memory "
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
MALLOC_THRESHOLD = 128 * 1024  # glibc's initial default, kept fixed


def _memory_server() -> None:
    """stdin: one JSON ``[spec, variant]`` per line -> stdout: one result line per request,
    each measured by :func:`variant_memory` in a fresh fork of this (otherwise idle) process."""
    for line in sys.stdin:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, send the figure, leave without any cleanup
            os.close(r)
            code = 1
            try:
                os.write(w, repr(variant_memory(*json.loads(line))).encode())
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            value = f.read()
        os.waitpid(pid, 0)
        print(_RESULT + value if value else "failed", flush=True)


# --------------------------------------------------------------------------- FLOPs, profiles


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def profile_ops(fn: Callable[[], Any]) -> dict[str, float]:
    """Self CPU milliseconds per aten op of one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def compare_profiles(
    fn_a: Callable[[], Any], fn_b: Callable[[], Any], top: int = 10
) -> list[dict[str, Any]]:
    """Ops whose self CPU time differs most between one call of ``fn_a`` and of ``fn_b``
    (after one untimed call of each): ``{"op", "a_ms", "b_ms", "diff_ms"}``, largest |diff|."""
    fn_a(), fn_b()
    a, b = profile_ops(fn_a), profile_ops(fn_b)
    rows = [{"op": op, "a_ms": a.get(op, 0.0), "b_ms": b.get(op, 0.0),
             "diff_ms": b.get(op, 0.0) - a.get(op, 0.0)} for op in set(a) | set(b)]  # fmt: skip
    return sorted(rows, key=lambda r: -abs(r["diff_ms"]))[:top]


def run_profiles(cases: dict[str, TrainCase]) -> dict[str, list[dict[str, Any]]]:
    """torch.profiler comparisons of one step: ST vs bank (fp32), fp32 vs bf16 (ST)."""
    st, bank, bf16 = (cases[n] for n in ("st/fp32/nchw", "bank_one/fp32/nchw", "st/bf16/nchw"))
    return {"ST -> bank_one (fp32, nchw)": compare_profiles(st, bank),
            "ST fp32 -> ST bf16 (nchw)": compare_profiles(st, bf16)}


# --------------------------------------------------------------------------- the other groups


def pseudo_cases(spec: BenchSpec, device: torch.device) -> dict[str, Callable[[], Any]]:
    """Pseudo-label one full (image_h, image_w) image: single scale vs TTA, fp32 vs bf16, the
    model in NCHW vs channels_last (``*_cl``: ``train.infer_channels_last``, the default).

    The prediction is what :mod:`ciscr.pseudo` computes per image (softmax averaged over the
    views, argmax); reading the image and writing the PNG are left out. ``single`` is also
    what evaluation in ``whole`` mode does per image.
    """
    from ciscr.engine.evaluate import predict_logits
    from ciscr.pseudo import TTA_SCALES

    models = {cl: _build(spec, device, channels_last=cl, train=False) for cl in (False, True)}
    g = torch.Generator().manual_seed(spec.seed + 1)
    x = torch.randn(1, 3, spec.image_h, spec.image_w, generator=g).to(device)
    views = {"single": ("whole", (1.0,), False), "tta": ("multiscale", TTA_SCALES, True)}

    def case(view: str, cl: bool, amp: str) -> Callable[[], Any]:
        mode, scales, flip = views[view]

        def run() -> None:
            probs = predict_logits(models[cl], x, mode, num_classes=spec.classes, scales=scales,
                                   flip=flip, amp=amp)
            probs.argmax(1).to(torch.uint8).cpu()

        return run

    return {f"pseudo/{v}{'_cl' if cl else ''}/{precision_name(a)}": case(v, cl, a)
            for cl in (False, True) for v in views for a in AMPS}  # fmt: skip


def _write_samples(root: Path, spec: BenchSpec) -> tuple[list, Path]:
    """``select_images`` random PNG images with blob ground truth and pseudo labels on disk."""
    from PIL import Image

    from ciscr.data.formats import Sample
    from ciscr.data.io import default_palette, write_mask_png

    g = torch.Generator().manual_seed(spec.seed + 2)
    n, h, w, k = spec.select_images, spec.image_h, spec.image_w, spec.classes
    gt, pseudo = blob_labels(n, h, w, k, g), blob_labels(n, h, w, k, g)
    pal = default_palette(k)
    (root / "pseudo").mkdir(parents=True)
    samples = []
    for i in range(n):
        img = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(img).save(root / f"img{i}.png")
        write_mask_png(root / f"gt{i}.png", gt[i].numpy().astype(np.uint8), pal)
        write_mask_png(root / "pseudo" / f"img{i}.png", pseudo[i].numpy().astype(np.uint8), pal)
        samples.append(Sample(f"img{i}", root / f"img{i}.png", root / f"gt{i}.png"))
    return samples, root / "pseudo"


def select_cases(spec: BenchSpec, device: torch.device, root: Path) -> dict[str, Callable[[], Any]]:
    """Selection over ``select_images`` files: labeled prototypes (= bank, one view) and the
    Eq. 10 anchor distances of pseudo-labelled images, fp32 vs bf16."""
    from ciscr.selection import class_anchors, compute_labeled_prototypes, image_distances

    samples, pseudo_dir = _write_samples(root, spec)
    model = _build(spec, device, channels_last=False, train=False)
    kw = {"num_classes": spec.classes, "mean": (0.485, 0.456, 0.406),
          "std": (0.229, 0.224, 0.225), "device": device}  # fmt: skip
    anchors = class_anchors(*compute_labeled_prototypes(model, samples, **kw))
    cases: dict[str, Callable[[], Any]] = {}
    for a in AMPS:
        cases[f"select/prototypes/{precision_name(a)}"] = lambda a=a: compute_labeled_prototypes(
            model, samples, amp=a, **kw)
        cases[f"select/distances/{precision_name(a)}"] = lambda a=a: image_distances(
            model, samples, pseudo_dir, anchors, amp=a, **kw)
    return cases


def simple_rows(times: dict[str, list[float]], images: int, base: str) -> list[dict[str, Any]]:
    """Rows of a pseudo/select group: ``<group>/<what>/<precision>`` names; ``base`` is the
    ``<what>`` every other one is compared with (same precision)."""
    med = {n: median(v) for n, v in times.items()}
    rows = []
    for name, ts in times.items():
        group, what, prec = name.split("/")
        m = med[name]
        rows.append({**timing_row(name, ts, images, what=what, precision=prec),
                     f"ratio_to_{base}": m / med[f"{group}/{base}/{prec}"],
                     "bf16_speedup": med[f"{group}/{what}/fp32"] / m if prec != "fp32" else None})
    return rows


LOADER_WORKERS = (0, 1)  # data.num_workers: the default, then the alternative
LOADER_ITERS = 10  # iterations of each timed loader stage


def _loader_overrides(spec: BenchSpec, iters: int) -> list[str]:
    """A realistic ST stage at the bench's sizes on generated (synthetic) images of
    ``image_h`` pixels: ``iters`` iterations, the default ``train.amp``, one checkpoint."""
    n = max(16, 4 * spec.batch)
    return [
        # ST's own recipe, whatever the synthetic config's method section says (its warm
        # start would need a previous stage, its threshold confidence maps).
        "method.name=st", *preset_overrides("st"),
        f"model.backbone={spec.backbone}", "model.pretrained=",
        f"model.channels={spec.channels}", f"train.crop_size={spec.crop}",
        f"train.batch_size={spec.batch}", "train.epochs=1", f"train.iters_per_epoch={iters}",
        f"train.ckpt_every={iters}", "train.progress=false", f"data.labeled={2 * spec.batch}",
        f"data.synthetic.num_train={n}", "data.synthetic.num_val=2",
        f"data.synthetic.size={max(32, spec.image_h)}",
        f"data.synthetic.num_classes={min(20, max(2, spec.classes))}",
        "data.max_val_images=2", f"seed={spec.seed}",
    ]  # fmt: skip


def loader_cases(spec: BenchSpec, device: torch.device, root: Path,
                 iters: int) -> dict[str, Callable[[], Any]]:
    """One ST re-training stage (``ciscr.pipeline.retrain_stage``: fresh model, real datasets
    read from files with their augmentations, train loop, checkpoint, final evaluation) per
    ``data.num_workers`` value; each call trains a new stage folder. Pseudo labels are the
    ground truth, copied (their content does not change the cost)."""
    import shutil

    from ciscr.config import load_config
    from ciscr.pipeline import retrain_stage
    from ciscr.run_setup import setup_run

    cfg = load_config("synthetic", [*_loader_overrides(spec, iters), f"data.root={root / 'data'}"])
    ctx = setup_run(cfg, root / "run", device)
    pseudo = root / "pseudo"
    pseudo.mkdir(exist_ok=True)
    for smp in ctx.unlabeled:
        shutil.copyfile(smp.mask, pseudo / f"{smp.id}.png")
    calls = {"n": 0}

    def case(workers: int) -> Callable[[], Any]:
        def run() -> None:
            calls["n"] += 1
            data = cfg.data.model_copy(update={"num_workers": workers})
            ctx.cfg = cfg.model_copy(update={"data": data})
            retrain_stage(ctx, f"stage_w{workers}_{calls['n']}", [(ctx.unlabeled, pseudo)],
                          root / "none", None)

        return run

    return {f"loader/workers{w}/{precision_name(_resolved_amp(device))}": case(w)
            for w in LOADER_WORKERS}  # fmt: skip


def _resolved_amp(device: torch.device) -> str:
    from ciscr.utils.misc import resolve_amp

    return resolve_amp(TrainCfg().amp, device)


def bench_loader(spec: BenchSpec, device: torch.device, iters: int) -> list[dict[str, Any]]:
    """Time a real ST stage with each ``data.num_workers`` value, round-robin (no warm-up
    round beyond one: every call builds its model and loaders anew, as a stage does); images/s
    counts the labeled + unlabeled images trained."""
    import logging

    quiet = logging.getLogger("ciscr")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one "val mIoU" line per timed stage is noise here
    try:
        with tempfile.TemporaryDirectory(prefix="ciscr-bench-loader-") as tmp:
            (Path(tmp) / "run").mkdir()
            cases = loader_cases(spec, device, Path(tmp), iters)
            times = time_round_robin(cases, spec.repeats, min(spec.warmup, 1), device_sync(device))
    finally:
        quiet.setLevel(level)
    rows = [timing_row(n, ts, 2 * spec.batch * iters) for n, ts in times.items()]
    return [{**r, "ratio_to_workers0": r["median_s"] / rows[0]["median_s"], "bf16_speedup": None}
            for r in rows]  # fmt: skip


# --------------------------------------------------------------------------- results


def bench_train(spec: BenchSpec, device: torch.device, memory: bool = True) -> dict[str, Any]:
    """Time every train variant side by side, plus the rectifier / teacher breakdown."""
    inputs, cases = make_inputs(spec), {}
    for cl in (False, True):
        models = _make_models(spec, device, cl, teacher=True)
        for v in train_variants((cl,)):
            cases[v.name] = make_train_case(v, spec, device, models, inputs)
    fns: dict[str, Callable[[], Any]] = dict(cases)
    for name, c in cases.items():
        if c.rectifier is not None:
            fns[f"rectifier/{name}"] = c.rectify
        if c.variant.method == "bank_one":  # the teacher forward is the same for every method
            fns[f"teacher/{name.split('/', 1)[1]}"] = c.teacher_forward
    times = time_round_robin(fns, spec.repeats, spec.warmup, device_sync(device))
    flops = {m: count_flops(cases[f"{m}/fp32/nchw"]) for m in METHODS}
    sts = [c.variant for c in cases.values() if c.variant.method == "st"]
    teachers = [TrainVariant("teacher", v.amp, v.channels_last) for v in sts]
    mem = measure_memory(spec, [c.variant for c in cases.values()] + teachers) if memory else {}
    # The ST peaks once more, in new processes: how far two identical measurements differ.
    again = measure_memory(spec, sts) if memory and device.type == "cpu" else {}
    return {"cases": cases, "times": times, "flops": flops, "memory_mib": mem,
            "memory_repeat_mib": again, "teacher_mib": _tensor_bytes(models[2]) / 2**20}


def train_rows(
    raw: dict[str, Any], spec: BenchSpec, peak_tflops: float | None
) -> list[dict[str, Any]]:
    """One row per variant: median, images/s, ratios to ST / fp32 / NCHW, memory, FLOP rate."""
    t, mem, rows = raw["times"], raw["memory_mib"], []
    med = {n: median(v) for n, v in t.items()}
    for name, case in raw["cases"].items():
        v, m = case.variant, med[name]
        prec, form = precision_name(v.amp), "cl" if v.channels_last else "nchw"
        flops = raw["flops"][v.method]
        row = timing_row(name, t[name], 2 * spec.batch, method=v.method, precision=prec,
                         format=form)
        row.update({
            "ratio_to_st": m / med[f"st/{prec}/{form}"],
            "bf16_speedup": med[f"{v.method}/fp32/{form}"] / m if v.amp != "none" else None,
            "channels_last_speedup": med[f"{v.method}/{prec}/nchw"] / m if v.channels_last
            else None,
            "rectifier_s": med.get(f"rectifier/{name}"),
            "teacher_forward_s": med[f"teacher/{prec}/{form}"], "peak_mib": mem.get(name),
            "teacher_peak_mib": mem.get(f"teacher/{prec}/{form}"),
            "peak_mib_repeat": raw.get("memory_repeat_mib", {}).get(name), "flops": flops,
            "tflops_per_s": flops / m / 1e12,
        })  # fmt: skip
        if peak_tflops:
            row["mfu"] = row["tflops_per_s"] / peak_tflops
        rows.append(row)
    return rows


def train_group(spec: BenchSpec, device: torch.device, memory: bool, peak_tflops: float | None,
                profile: bool | None) -> dict[str, Any]:
    """The train group's part of the result: rows, targets, profiles (``profile``: None =
    only when a target fails) and the findings."""
    raw = bench_train(spec, device, memory)
    rows = train_rows(raw, spec, peak_tflops)
    tg = evaluate_targets(rows)
    profiles = {}
    if profile or (profile is None and any(not t["pass"] for t in tg)):
        profiles = run_profiles(raw["cases"])
    return {"train": rows, "targets": tg, "profiles": profiles,
            "findings": findings(rows, tg, spec, profiles), "teacher_mib": raw["teacher_mib"]}


def defaults_rows(res: dict[str, Any], amp: str) -> list[dict[str, Any]]:
    """Each CPU-facing default next to its alternative, from the groups that ran: train.amp
    (its resolved value here vs the other precision) on the train step, TTA pseudo-labelling
    and whole-image evaluation; train.channels_last on the train step;
    train.infer_channels_last on TTA pseudo-labelling and whole-image evaluation;
    data.num_workers on a real stage. ``speedup`` = alternative time / default time (> 1: the
    default is faster)."""
    prec = precision_name(amp)
    other = "fp32" if prec == "bf16" else "bf16"
    med = {r["name"]: r["median_s"] for g in ("train", "pseudo", "loader") for r in res.get(g, [])}
    # (setting, default, alternative, measured on, the default's variant, the alternative's)
    specs = [("train.amp", f"auto ({prec})", other, on, v.format(prec), v.format(other))
             for on, v in (("train step (ST)", "st/{}/nchw"),
                           ("pseudo-labelling (TTA)", "pseudo/tta/{}"),
                           ("evaluation (whole image)", "pseudo/single/{}"))]
    specs.append(("train.channels_last", "false", "true", f"train step (ST, {prec})",
                  f"st/{prec}/nchw", f"st/{prec}/cl"))
    specs += [("train.infer_channels_last", "true", "false", f"{on}, {prec})",
               f"pseudo/{v}_cl/{prec}", f"pseudo/{v}/{prec}")
              for on, v in (("pseudo-labelling (TTA", "tta"), ("evaluation (whole image", "single"))]
    ld = res.get("loader", [])
    if len(ld) == len(LOADER_WORKERS):
        specs.append(("data.num_workers", str(LOADER_WORKERS[0]), str(LOADER_WORKERS[1]),
                      f"ST stage, {res.get('loader_iters')} iterations", ld[0]["name"],
                      ld[1]["name"]))  # fmt: skip
    return [{"setting": k, "default": d, "alternative": a, "measured_on": on,
             "default_s": med[dn], "alternative_s": med[an], "speedup": med[an] / med[dn]}
            for k, d, a, on, dn, an in specs if med.get(dn) and med.get(an)]  # fmt: skip


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, one entry per configuration: ``{"target", "variant", "value",
    "limit", "pass"}``; memory entries only where memory was measured.

    Memory: "no higher than ST's + the teacher" reads the teacher as what running it alone
    needs (``teacher_peak_mib``: its weights and one no-grad forward of the unlabeled batch).
    """
    by, out = {r["name"]: r for r in rows}, []

    def add(target: str, row: dict[str, Any], value: float, op: str, limit: float,
            spec: str = ".2f") -> None:
        ok = value <= limit if op == "<=" else value >= limit
        out.append({"target": target, "variant": row["name"], "value": value,
                    "limit": f"{op} {limit:{spec}}", "pass": ok})

    for r in rows:
        if r["method"] in ("bank_one", "bank_all"):
            add("bank step / ST step", r, r["ratio_to_st"], "<=", BANK_TARGET)
            st = by[_st_name(r)]
            if None not in (r["peak_mib"], st["peak_mib"], r["teacher_peak_mib"]):
                add("peak memory <= ST + teacher (MiB)", r, r["peak_mib"], "<=",
                    st["peak_mib"] + r["teacher_peak_mib"], ".0f")
        if r["bf16_speedup"] is not None:
            add("bf16 speed-up over fp32", r, r["bf16_speedup"], ">=", BF16_TARGET)
    return out


def _ms(x: float) -> str:
    return f"{1e3 * x:.0f} ms"


def _bank_finding(r: dict[str, Any], st: dict[str, Any], batch: int) -> str:
    extra, teach = r["median_s"] - st["median_s"], r["teacher_forward_s"]
    share = teach / st["median_s"]
    text = (f"`{r['name']}` is {r['ratio_to_st']:.2f}x the ST step ({_ms(extra)} more). Timed "
            f"alone, its rectifier takes {_ms(r['rectifier_s'])} and the teacher forward on the "
            f"{batch} unlabeled images {_ms(teach)}, i.e. {share:.1%} of the ST step. ")
    if 1 + share > BANK_TARGET:
        return text + (f"The teacher forward alone exceeds the {BANK_TARGET - 1:.0%} budget: it "
                       f"is an inference forward of the same network on half the images the "
                       f"student trains on (forward + backward), so with this teacher a "
                       f"bank-mode step cannot cost less than about {1 + share:.2f}x ST; the "
                       "rest of the gap is CISC maps, rectified loss and noise.")
    return text + ("The teacher forward fits the budget; the rest of the gap comes from the CISC "
                   "maps, the rectified loss and noise (see the profile below).")


def findings(
    rows: list[dict[str, Any]], targets: list[dict[str, Any]], spec: BenchSpec,
    profiles: dict[str, list[dict[str, Any]]],
) -> list[str]:
    """Sentences explaining each failed target, computed from the measured figures."""
    by, out = {r["name"]: r for r in rows}, []
    q = by.get("query/fp32/nchw")
    if q:
        out.append(f"Query mode (the authors' scheme, teacher on the unlabeled AND the queried "
                   f"batch) measures {q['ratio_to_st']:.2f}x the ST step in fp32 (the issue "
                   "quotes 1.26-1.32x on this CPU).")
    failed = [(t, by[t["variant"]]) for t in targets if not t["pass"]]
    out += [_bank_finding(r, by[_st_name(r)], spec.batch) for t, r in failed
            if t["target"].startswith("bank step")]  # fmt: skip
    slow = [f"`{r['name']}` {r['bf16_speedup']:.2f}x" for t, r in failed if "bf16" in t["target"]]
    if slow:
        out.append(f"bf16 autocast misses the {BF16_TARGET:.1f}x speed-up over fp32 for: "
                   + ", ".join(slow)
                   + " (the fp32 -> bf16 profile below shows which ops do not get faster).")
    out += _memory_findings(rows, failed)
    for title, prof in profiles.items():
        top = ", ".join(f"{p['op']} {p['a_ms']:.0f}->{p['b_ms']:.0f} ms" for p in prof[:4])
        out.append(f"Profile, {title} (self CPU time per op, one step each): {top}.")
    return out


def _memory_findings(rows: list[dict[str, Any]], failed: list[tuple[dict, dict]]) -> list[str]:
    by = {r["name"]: r for r in rows}
    extra = [(r["peak_mib"] - by[_st_name(r)]["peak_mib"], r["teacher_peak_mib"])
             for r in rows if r["method"].startswith("bank") and r["peak_mib"] is not None]
    if not extra or None in (e for pair in extra for e in pair):
        return []
    (lo, hi), (tlo, thi) = [(min(v), max(v)) for v in zip(*extra, strict=True)]
    out = [f"Memory: bank-mode steps peak {lo:.0f} to {hi:.0f} MiB above the ST step of the "
           f"same precision and format; the teacher run alone (weights + one no-grad forward of "
           f"the unlabeled batch) needs {tlo:.0f} to {thi:.0f} MiB."]
    reps = [abs(r["peak_mib"] - r["peak_mib_repeat"]) for r in rows
            if r.get("peak_mib_repeat") is not None]  # fmt: skip
    if reps:
        out[0] += (f" Each ST step measured twice, in new processes, gave peaks at most "
                   f"{max(reps):.1f} MiB apart (the measurement's repeatability).")
    over = [f"`{r['name']}` {r['peak_mib']:.0f} MiB (limit {t['limit'][3:]})"
            for t, r in failed if t["target"].startswith("peak memory")]  # fmt: skip
    if over:
        out.append("Peak memory above ST's peak + the teacher alone: " + ", ".join(over) + ".")
    return out


# --------------------------------------------------------------------------- run + report


def run_bench(
    spec: BenchSpec, groups: Sequence[str] = ("train", "pseudo", "select"), *,
    peak_tflops: float | None = None, memory: bool = True, profile: bool | None = None,
    command: str = "", loader_iters: int = LOADER_ITERS,
) -> dict[str, Any]:
    """Run the requested groups and return the result (what the JSON file holds).

    ``profile``: None = profile only when a target fails; True / False = always / never.
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    sync = device_sync(device)
    with measured(command, device, settings=asdict(spec), peak_tflops=peak_tflops, train=[],
                  pseudo=[], select=[], loader=[], loader_iters=loader_iters, targets=[],
                  findings=[], profiles={}) as res:  # fmt: skip
        if "train" in groups:
            res.update(train_group(spec, device, memory, peak_tflops, profile))
        if "pseudo" in groups:
            times = time_round_robin(pseudo_cases(spec, device), spec.repeats, spec.warmup, sync)
            res["pseudo"] = simple_rows(times, 1, "single")
        if "select" in groups:
            with tempfile.TemporaryDirectory(prefix="ciscr-bench-") as tmp:
                cases = select_cases(spec, device, Path(tmp))
                times = time_round_robin(cases, spec.repeats, spec.warmup, sync)
            res["select"] = simple_rows(times, spec.select_images, "prototypes")
        if "loader" in groups:
            res["loader"] = bench_loader(spec, device, loader_iters)
        res["defaults"] = defaults_rows(res, _resolved_amp(device))
    return res


def _header(res: dict[str, Any]) -> list[str]:
    m, s = res["machine"], res["settings"]
    busy, note = load_noise(m, "during the run ", f"{m['threads']} of them used here")
    dev = m.get("gpu") or f"{m['cpu']} ({m['cores']} cores, {m['threads']} torch threads)"
    note += (" Absolute times are noisy; the ratios were measured side by side (round-robin) "
             "and are more robust. Rerun the same command on a quiet machine for final figures.")
    if busy and m["threads"] > 1:
        note += (" With several torch threads on a busy machine every parallel op waits for "
                 "threads the OS has descheduled, so single runs can be 10-100x slow: prefer "
                 "--threads 1.")
    return header(res, f"ciscr bench: {dev}", note, True, [
        f"- device: {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else ""),
        f"- sizes: {s['backbone']}, {s['classes']} classes, C={s['channels']}, crop {s['crop']}, "
        f"batch {s['batch']} labeled + {s['batch']} unlabeled per step; pseudo/select images "
        f"{s['image_h']}x{s['image_w']}; median of {s['repeats']} runs after {s['warmup']} "
        f"warm-up rounds; wall time {res.get('wall_s', 0):.0f} s"])  # fmt: skip


# The report's tables: (header, key or function of the row, format spec), see common.table.
TRAIN_COLUMNS = [
    ("variant", "name", ""), ("median s", "median_s", ".3f"), ("images/s", "images_per_s", ".2f"),
    ("x ST", "ratio_to_st", ".2f"), ("bf16 x", "bf16_speedup", ".2f"),
    ("cl x", "channels_last_speedup", ".2f"), ("rectifier s", "rectifier_s", ".3f"),
    ("peak MiB", "peak_mib", ".0f"), ("TFLOP/s", "tflops_per_s", ".4f"),
]  # fmt: skip
TEACHER_COLUMNS = [
    ("precision/format", lambda r: f"{r['precision']}/{r['format']}", ""),
    ("teacher forward s", "teacher_forward_s", ".3f"),
    ("share of the ST step", lambda r: r["teacher_forward_s"] / r["median_s"], ".1%"),
    ("teacher peak MiB", "teacher_peak_mib", ".0f"),
]
TARGET_COLUMNS = [
    ("target", "target", ""), ("variant", "variant", ""),
    ("value", lambda t: fmt(t["value"], ".0f" if t["target"].startswith("peak") else ".4f"), ""),
    ("limit", "limit", ""), ("result", lambda t: "PASS" if t["pass"] else "FAIL", ""),
]
DEFAULTS_COLUMNS = [
    ("setting", "setting", ""), ("default", "default", ""), ("alternative", "alternative", ""),
    ("measured on", "measured_on", ""), ("default s", "default_s", ".3f"),
    ("alternative s", "alternative_s", ".3f"), ("alternative / default", "speedup", ".2f"),
    ("faster", lambda r: "default" if r["speedup"] >= 1 else "ALTERNATIVE", ""),
]
PROFILE_COLUMNS = [("op", "op", ""), ("before ms", "a_ms", ".1f"), ("after ms", "b_ms", ".1f"),
                   ("difference ms", "diff_ms", "+.1f")]  # fmt: skip


def _simple_columns(base: str) -> list[tuple[str, Any, str]]:
    return [("variant", "name", ""), ("median s", "median_s", ".3f"),
            ("images/s", "images_per_s", ".2f"), (f"x {base}", f"ratio_to_{base}", ".2f"),
            ("bf16 x", "bf16_speedup", ".2f"), ("spread", "spread", ".0%")]  # fmt: skip


METHOD_NOTES = """\
## How it is measured

- Each group is timed round-robin: every round runs every variant once, the starting variant
  rotates each round, and each figure is the median over the timed rounds; `spread` is
  (max - min) / median of those runs. `x ST` divides by the ST step of the same precision and
  memory format; `bf16 x` is fp32 time / bf16 time; `cl x` is NCHW time / channels_last time.
- Train step = `ciscr.engine.train._one_step` with `retrain_step` (forward, loss, backward,
  SGD step, scheduler), on random-init models and random images with blob labels; images/s
  counts the labeled and the unlabeled images of the step. Query mode serves its queried
  labeled images from memory (the real dataset reads and augments files: query mode is
  flattered); the bank holds random prototypes (its one-off computation is the `select/
  prototypes` row). `rectifier s`: the rectifier alone (teacher forward + CISC maps) and
  `teacher forward s`: the teacher alone on the unlabeled batch, timed in the same rounds.
- Peak memory (CPU): every variant runs 2 steps in a fresh process forked from a clean server
  (only this module imported) that builds only that variant's models, optimizer and inputs;
  the figure is its peak resident set size (`ru_maxrss`) minus its resident size at start
  and minus the growth of its file-backed pages (library code paged in on first use). The
  server runs with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_` and
  `MALLOC_TRIM_THRESHOLD_` = 128 KiB unless already set): every large block is mapped and
  unmapped on free, so the figure is the live peak and does not depend on earlier allocations
  (with glibc's default, identical runs differed by hundreds of MiB); every ST step is
  measured twice to show the repeatability. On CUDA: `torch.cuda.max_memory_allocated`
  above the memory allocated before building.
  The target compares it with ST's peak + the teacher alone, measured the same way (its
  weights and two no-grad forwards of the unlabeled batch: `teacher peak MiB`).
- FLOPs: one fp32 step per method under `torch.utils.flop_counter.FlopCounterMode`
  (convolutions and matmuls, forward + backward, teacher included); TFLOP/s = FLOPs / median
  step time; MFU = TFLOP/s / the peak given by `--peak-tflops` (default 989 on CUDA).
- Pseudo-labelling: one full image, `predict_logits` + argmax as `ciscr.pseudo` does it (image
  decoding and PNG writing excluded); TTA = scales 0.5, 0.75, 1.0, 1.5, 2.0 x horizontal flip.
- Selection: the real `compute_labeled_prototypes` (one view) and `image_distances` over
  image files written to a temporary folder (decoding included).
- Data loading: a real ST re-training stage (`ciscr.pipeline.retrain_stage`: fresh model,
  datasets read from generated image files with their augmentations, the training loop, one
  checkpoint, the final evaluation on 2 images) with `data.num_workers` 0 and 1, round-robin;
  images/s counts the labeled + unlabeled images trained.
- Defaults vs their alternatives: read off the groups above (`train.amp` auto, resolved on
  this machine, vs the other precision; `train.channels_last`; `data.num_workers`);
  `alternative / default` > 1 means the default is the faster one.
"""


def format_report(res: dict[str, Any]) -> str:
    """The markdown report (also what is printed on stdout)."""

    def section(title: str, *lines: str) -> list[str]:
        return ["", title, "", *lines]

    out, s = _header(res), res["settings"]
    if res.get("defaults"):
        out += section("## Defaults vs their alternatives", *table(res["defaults"],
                                                                   DEFAULTS_COLUMNS))
    if res["train"]:
        mfu = [("MFU", "mfu", ".1%")] if res["peak_tflops"] is not None else []
        sts = [r for r in res["train"] if r["method"] == "st"]
        out += section("## Train step", *table(res["train"], [*TRAIN_COLUMNS, *mfu,
                                                              ("spread", "spread", ".0%")]),
                       "", "The teacher alone on the unlabeled batch (time; peak memory with its "
                       "weights):", "", *table(sts, TEACHER_COLUMNS))  # fmt: skip
        if res.get("teacher_mib") is not None:
            out += ["", f"Teacher weights and buffers: {res['teacher_mib']:.0f} MiB."]
    for group, title, base in (
        ("pseudo", "## Pseudo-labelling (one image)", "single"),
        ("select", f"## Selection ({s['select_images']} images per run)", "prototypes"),
        ("loader", f"## Data loading (a real ST stage, {res.get('loader_iters')} iterations)",
         "workers0"),
    ):  # fmt: skip
        if res.get(group):
            out += section(title, *table(res[group], _simple_columns(base)))
    if res["targets"]:
        n_pass = sum(t["pass"] for t in res["targets"])
        out += section(f"## Targets: {n_pass} of {len(res['targets'])} pass",
                       *table(res["targets"], TARGET_COLUMNS))
    if res["findings"]:
        out += section("## Findings (generated from the figures above)",
                       *(f"- {f}" for f in res["findings"]))
    for title, prof in res["profiles"].items():
        out += section(f"### Profile: {title}", *table(prof, PROFILE_COLUMNS))
    return "\n".join([*out, "", METHOD_NOTES])


# --------------------------------------------------------------------------- CLI

GROUPS = ("train", "pseudo", "select", "loader")
_SIZE_ARGS = ("batch", "crop", "classes", "channels", "repeats", "warmup")


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    """Sizes from the command line; ``--quick`` fills in tiny values for those not given."""
    from ciscr.dist import resolve_device

    at_least(args, {k: 0 if k == "warmup" else 1 for k in _SIZE_ARGS})
    given = {k: getattr(args, k) for k in _SIZE_ARGS if getattr(args, k) is not None}
    if args.image_size:
        try:
            h, w = (int(v) for v in args.image_size.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--image-size {args.image_size}: expected HxW, e.g. 360x480"
                              ) from None  # fmt: skip
        given.update(image_h=h, image_w=w)
    if args.select_images is not None:
        given["select_images"] = max(1, args.select_images)
    base = BenchSpec(**QUICK) if args.quick else BenchSpec()
    return replace(base, backbone=args.backbone, device=str(resolve_device(args.device)),
                   threads=args.threads, **given)  # fmt: skip


def command_line(args: argparse.Namespace, spec: BenchSpec) -> str:
    """The full command that reproduces this run (every size spelled out)."""
    parts = ["ciscr", "bench", "--backbone", spec.backbone,
             *(w for k in _SIZE_ARGS for w in (f"--{k}", str(getattr(spec, k)))),
             "--image-size", f"{spec.image_h}x{spec.image_w}", "--select-images",
             str(spec.select_images), "--device", args.device, "--only", args.only]  # fmt: skip
    if "loader" in args.only:
        parts += ["--loader-iters", str(args.loader_iters)]
    return shlex.join([*parts, *spelled(args, {"threads": 0, "peak_tflops": None,
                                               "no_memory": False, "quick": False,
                                               "out": None})])  # fmt: skip


def cmd_bench(args: argparse.Namespace) -> int:
    """``ciscr bench``: run, print the report, write it under ``--out`` if given."""
    spec = spec_from_args(args)
    groups = comma_list(args.only, "--only", GROUPS)
    at_least(args, {"loader_iters": 1})
    peak = args.peak_tflops
    if peak is None and spec.device.startswith("cuda"):
        peak = DEFAULT_PEAK_TFLOPS
    profile = True if args.profile else (False if args.quick else None)
    res = run_bench(spec, groups, peak_tflops=peak, memory=not args.no_memory, profile=profile,
                    command=command_line(args, spec), loader_iters=args.loader_iters)
    name = f"speed_{torch.device(spec.device).type}"
    return print_and_write(res, format_report(res), args.out, name)


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``ciscr bench`` to the CLI (called by ciscr.cli while it builds its parser)."""
    from ciscr.commands import command

    p = sub.add_parser(
        "bench",
        help="speed: train step (ST vs CISC-R), pseudo-labelling, selection",
        description="Times ST vs CISC-R (query / bank) train steps in fp32 / bf16 / "
        "channels_last, pseudo-labelling with and without TTA and selection, side by side; "
        "prints a table and (with --out) writes speed_<device>.md and .json.",
    )
    p.add_argument("--backbone", default="mobilenet_v2", help="default mobilenet_v2")
    p.add_argument("--batch", type=int, help="labeled = unlabeled batch per step (default 8)")
    p.add_argument("--crop", type=int, help="train crop side (default 192)")
    p.add_argument("--classes", type=int, help="number of classes (default 11, CamVid)")
    p.add_argument("--channels", type=int, help="feature channels C (default 256)")
    p.add_argument("--repeats", type=int, help="timed rounds; figures are medians (default 7)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 2)")
    p.add_argument("--image-size", metavar="HxW", help="pseudo/select image (default 360x480)")
    p.add_argument("--select-images", type=int, help="images per selection run (default 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", type=Path, help="write speed_<device>.md/.json here")
    p.add_argument("--only", default=",".join(GROUPS),
                   help="comma list of train,pseudo,select,loader")
    p.add_argument("--loader-iters", type=int, default=LOADER_ITERS,
                   help=f"iterations of each timed loader stage (default {LOADER_ITERS})")
    p.add_argument("--peak-tflops", type=float,
                   help=f"peak for MFU (default {DEFAULT_PEAK_TFLOPS:g} on CUDA: H100/H200 bf16)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--profile", action="store_true",
                   help="always add torch.profiler comparisons (default: when a target fails)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests and CI")
    command("bench")(cmd_bench)


__all__ = [
    "BenchSpec", "TrainVariant", "blob_labels", "cmd_bench", "compare_profiles", "count_flops",
    "evaluate_targets", "format_report", "make_rectifier", "make_train_case", "measure_memory",
    "pseudo_cases", "register_cli", "run_bench", "select_cases", "time_round_robin", "train_rows",
    "train_variants", "variant_memory",
]
