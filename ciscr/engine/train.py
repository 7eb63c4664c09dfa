"""The one training loop. Methods differ only by the step function they pass in.

The batches come from :mod:`ciscr.engine.streams`, whose data order and augmentation are pure
functions of the seed and the iteration, so a run resumed from a checkpoint at iteration *t*
draws exactly the batches an uninterrupted run would have drawn from *t* on. This module owns
the rest of a stage: optimiser and schedule, checkpoints and resume, DDP, AMP, logging.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ciscr import dist
from ciscr.config import TrainCfg
from ciscr.engine.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state

# One job per module: the streams (data order, loaders) are ciscr.engine.streams; this is the loop.
from ciscr.engine.streams import (  # noqa: F401 - Stream, IndexStream, stream_loader re-exported
    IndexStream,
    Stream,
    _EpochIndexed,
    _to_device,
    iters_per_epoch,
    next_batches,
    stream_loader,
    stream_loaders,
)
from ciscr.errors import CheckpointError, CiscrError, Interrupted, TrainingError
from ciscr.utils.io import append_jsonl, atomic_write_text, read_jsonl
from ciscr.utils.misc import autocast, make_grad_scaler

CKPT_NAME = "checkpoint.pt"

# step(model, batches, iteration) -> (loss, scalars to log)
StepFn = Callable[[nn.Module, dict[str, dict[str, Any]], int], tuple[torch.Tensor, dict[str, float]]]


# --------------------------------------------------------------------------- optimisation


def build_optimizer(model: nn.Module, cfg: TrainCfg) -> torch.optim.Optimizer:
    """SGD with the backbone at ``lr`` and everything else (ASPP, decoder) at ``lr * 10``."""
    groups = [
        {"params": list(model.backbone_parameters()), "lr": cfg.lr},
        {"params": list(model.head_parameters()), "lr": cfg.lr * cfg.head_lr_mult},
    ]
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def build_scheduler(opt: torch.optim.Optimizer, total: int, power: float):
    """Poly decay per iteration: lr_t = lr_0 * (1 - t / total) ** power."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: max(0.0, 1.0 - t / total) ** power
    )


# --------------------------------------------------------------------------- the loop


@dataclass
class StageState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    iteration: int
    total: int
    step: Any = None  # the step function; its state_dict() (if any) goes into the checkpoint
    # Process CPU and wall seconds spent training up to the last checkpoint, summed over the
    # invocations that ran this stage (iterations redone after a kill are counted once).
    spent: dict[str, float] = field(default_factory=lambda: {"cpu": 0.0, "wall": 0.0})
    saved_at: int | None = None  # iteration of the stage's last checkpoint (None: none yet)


def _save(path: Path, st: StageState, meta: dict[str, Any]) -> None:
    # Collective: every rank's RNG state goes into rank 0's file (per-rank dropout streams).
    rngs = dist.all_gather_object(get_rng_state()) if dist.is_dist() else None
    if not dist.is_main():
        return
    save_checkpoint(
        path,
        {
            "model": st.model.state_dict(),
            "optimizer": st.optimizer.state_dict(),
            "scheduler": st.scheduler.state_dict(),
            "scaler": st.scaler.state_dict() if st.scaler is not None else None,
            "iteration": st.iteration,
            "total_iters": st.total,
            "rng": get_rng_state(),
            "rng_ranks": rngs,
            # A stateful step (the online CISC prototype memory) resumes where it was.
            "step_state": st.step.state_dict() if hasattr(st.step, "state_dict") else None,
            "spent": dict(st.spent),
            "meta": meta,
        },
    )


def _resume(path: Path, st: StageState) -> None:
    ckpt = load_checkpoint(path)
    if ckpt.get("total_iters") != st.total:
        raise CheckpointError(
            f"{path}: was written for {ckpt.get('total_iters')} iterations but this run has "
            f"{st.total}; resume with the same config or use a new --out directory"
        )
    st.model.load_state_dict(ckpt["model"])
    st.optimizer.load_state_dict(ckpt["optimizer"])
    st.scheduler.load_state_dict(ckpt["scheduler"])
    if st.scaler is not None and ckpt.get("scaler"):
        st.scaler.load_state_dict(ckpt["scaler"])
    ranks = ckpt.get("rng_ranks")
    # Resumed with the same number of processes: each rank continues its own RNG stream.
    # Otherwise (different world size) every rank takes rank 0's: resumable, not bit-identical.
    same_world = bool(ranks) and len(ranks) == dist.world_size()
    set_rng_state(ranks[dist.rank()] if same_world else ckpt["rng"])
    if ckpt.get("step_state") is not None and hasattr(st.step, "load_state_dict"):
        st.step.load_state_dict(ckpt["step_state"])
    st.iteration = int(ckpt["iteration"])
    st.saved_at = st.iteration
    st.spent = {k: float(v) for k, v in (ckpt.get("spent") or {"cpu": 0.0, "wall": 0.0}).items()}


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around the STUDENT only (a frozen teacher has no gradients to synchronise and is
    never passed here). Without a process group the model is returned as is."""
    if not dist.is_dist():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Under torchrun on CUDA, BatchNorm statistics are computed over the global batch.

    SyncBatchNorm has no CPU (gloo) implementation, so on CPU every rank normalises with the
    statistics of its own share of the batch (>= 2 images, see runner._check_batch). The
    conversion swaps the BN modules in place, sharing parameters and running buffers, so the
    state_dict keys are unchanged and checkpoints load into a plain model.
    """
    if dist.is_dist() and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def train_stage(
    out_dir: Path,
    model: nn.Module,
    streams: dict[str, Stream],
    step_fn: StepFn,
    cfg: TrainCfg,
    *,
    seed: int,
    device: torch.device,
    epoch_stream: str,
    meta: dict[str, Any] | None = None,
    num_workers: int = 0,
    snapshot_iters: Sequence[int] = (),
    on_epoch_end: Callable[[nn.Module, int], dict[str, float]] | None = None,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` for ``cfg.epochs`` epochs, resuming from ``out_dir/checkpoint.pt``.

    ``streams`` maps a name ("labeled", "unlabeled", "pairs") to a :class:`Stream`; each
    iteration draws one batch of every stream and passes them to ``step_fn``. One epoch is one
    pass over ``streams[epoch_stream]``. Returns the trained model (not DDP-wrapped).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _sync_batchnorm(model.to(device), device)
    if dist.world_size() > 1:
        # Per-rank dropout streams (data augmentation is keyed on (seed, epoch, index) and
        # identical on every rank by construction). A resume restores each rank's own state.
        torch.manual_seed(seed * 1_000_003 + 7_919 * dist.rank() + 1)
    per_epoch = iters_per_epoch(streams[epoch_stream], cfg)
    total = per_epoch * cfg.epochs
    st = new_stage_state(model, step_fn, cfg, total, device)
    ckpt_path = out_dir / CKPT_NAME
    if ckpt_path.exists():
        _resume(ckpt_path, st)
        logging.getLogger("ciscr").info("%s: resuming at iteration %d/%d", desc, st.iteration, total)
    if st.iteration >= total:
        return model
    _run_iterations(out_dir, st, streams, step_fn, cfg, seed, device, per_epoch, meta or {},
                    num_workers, set(snapshot_iters), on_epoch_end, desc)
    return model


def new_stage_state(model: nn.Module, step_fn: StepFn, cfg: TrainCfg, total: int,
                    device: torch.device) -> StageState:
    """A stage at iteration 0 of ``total``: ``model`` (channels_last if ``cfg`` says so), its
    optimiser, poly schedule and grad scaler."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    return StageState(model, opt, build_scheduler(opt, total, cfg.poly_power),
                      make_grad_scaler(device, cfg.amp), 0, total, step_fn)


def _run_iterations(out_dir, st, streams, step_fn, cfg, seed, device, per_epoch, meta,
                    num_workers, snapshots, on_epoch_end, desc) -> None:
    ddp_model = _wrap_ddp(st.model, device)
    ddp_model.train()
    loaders = stream_loaders(streams, seed, st.iteration, st.total, num_workers)
    log = _Logger(out_dir, st.iteration, st.total, desc, cfg.progress, cfg.log_every)
    ckpt_path = out_dir / CKPT_NAME
    clock = _Clock(st.spent)
    try:
        for t in range(st.iteration, st.total):
            t_step = time.perf_counter()
            batches = next_batches(loaders, device, cfg.channels_last, step_streams(step_fn, t))
            scalars = _one_step(ddp_model, st, step_fn, batches, t, cfg, device)
            if not _all_finite(scalars["loss"], device):
                raise _diverged(desc, scalars["loss"], t + 1, ckpt_path)
            st.iteration = t + 1
            log.step(st.iteration, scalars, st.optimizer.param_groups[0]["lr"],
                     time.perf_counter() - t_step)
            if st.iteration in snapshots and dist.is_main():
                # meta (the run's config) makes a snapshot evaluable on its own (ciscr eval).
                save_checkpoint(out_dir / f"snapshot_{st.iteration:07d}.pt",
                                {"model": st.model.state_dict(), "iteration": st.iteration,
                                 "meta": meta})
            epoch_done = st.iteration % per_epoch == 0
            # The epoch hook runs BEFORE the checkpoint: a run killed in between redoes both,
            # so its log ends up exactly like an uninterrupted run's.
            if on_epoch_end is not None and epoch_done:
                # WHY fork_rng: a hook (evaluation: building its loader) may draw from the global
                # random stream, the one dropout trains with; without the fork, how often a run
                # evaluates would change what it trains.
                cuda = [device.index or 0] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=cuda):
                    log.record(st.iteration, on_epoch_end(st.model, st.iteration // per_epoch))
                ddp_model.train()
            if st.iteration % cfg.ckpt_every == 0 or st.iteration == st.total:
                st.spent = clock.total()
                _save(ckpt_path, st, meta)
                st.saved_at = st.iteration
    except KeyboardInterrupt:
        log.close()  # the progress bar's last line comes before the message, not after it
        raise Interrupted(_interrupt_note(desc, st, cfg.ckpt_every)) from None
    finally:
        log.close()
        dist.barrier()


class _Clock:
    """CPU (this process) and wall seconds since construction, added to ``base``."""

    def __init__(self, base: dict[str, float]) -> None:
        self.base = dict(base)
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def total(self) -> dict[str, float]:
        return {"cpu": self.base["cpu"] + time.process_time() - self.cpu0,
                "wall": self.base["wall"] + time.perf_counter() - self.wall0}


def _interrupt_note(desc: str, st: StageState, ckpt_every: int) -> str:
    """What rerunning the same command will do for the interrupted stage (made true by
    ``train_stage``: it resumes from ``checkpoint.pt`` when there is one, else from 0)."""
    where = f"{desc} stopped at iteration {st.iteration}/{st.total}"
    if st.saved_at is None:
        return (f"{where} before its first checkpoint (train.ckpt_every={ckpt_every}): rerun "
                "the same command to start this stage again from iteration 0 (finished stages "
                "are kept)")
    return (f"{where}; rerun the same command to resume it from its last checkpoint, "
            f"iteration {st.saved_at} (finished stages are kept)")


def _diverged(desc: str, loss: float, iteration: int, ckpt_path: Path) -> TrainingError:
    """The NaN/inf error: nothing of the diverged step is saved, the last checkpoint is kept."""
    kept = (
        f"the last good checkpoint is kept at {ckpt_path}"
        if ckpt_path.exists()
        else "no checkpoint of this stage was written yet"
    )
    return TrainingError(
        f"{desc}: loss became {loss} at iteration {iteration}; {kept}; check the data or "
        "lower train.lr (with a new --out directory)"
    )


def _all_finite(loss: float, device: torch.device) -> bool:
    """True when the loss is finite on EVERY rank, so that all ranks stop together."""
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
    return float(dist.all_reduce_sum(bad)) == 0.0


def step_streams(step_fn: StepFn, t: int) -> Collection[str] | None:
    """The streams step ``t`` reads, when the step says (``step_fn.streams_at(t)``: names, or
    None for all): :func:`next_batches` moves the others on without loading them."""
    at = getattr(step_fn, "streams_at", None)
    return None if at is None else at(t)


def _one_step(model, st: StageState, step_fn: StepFn, batches, t: int, cfg: TrainCfg,
              device) -> dict[str, float]:
    with autocast(device, cfg.amp):
        loss, scalars = step_fn(model, batches, t)
    st.optimizer.zero_grad(set_to_none=True)
    if st.scaler is not None:
        st.scaler.scale(loss).backward()
        st.scaler.step(st.optimizer)
        st.scaler.update()
    else:
        loss.backward()
        st.optimizer.step()
    st.scheduler.step()
    return {"loss": float(loss.detach()), **scalars}


class _Logger:
    """tqdm progress, TensorBoard and JSONL, on the main process only."""

    def __init__(
        self, out_dir: Path, start: int, total: int, desc: str, progress: bool, every: int
    ) -> None:
        self.main, self.total, self.every = dist.is_main(), total, every
        self.jsonl = out_dir / "train.jsonl"
        self.busy, self.steps = 0.0, 0  # step seconds and steps since the last record
        self.bar = self.tb = None
        if not self.main:
            return
        self._drop_records_after(start)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events a killed run logged after its last checkpoint.
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start or None)
        except ImportError:  # tensorboard is a core dependency; tolerate a broken install
            self.tb = None

    def _drop_records_after(self, start: int) -> None:
        """A resumed stage redoes the iterations after its checkpoint: forget their records."""
        if self.jsonl.exists():
            kept = [r for r in read_jsonl(self.jsonl) if r.get("iteration", 0) <= start]
            atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))

    def step(self, it: int, scalars: dict[str, float], lr: float, seconds: float) -> None:
        """One finished iteration; ``seconds`` = its batch loading + step, so ``step_seconds`` in
        the log is the training speed without the evaluations and checkpoints in between
        (what ``ciscr profile`` compares across methods: its median over records shrugs off
        a moment when another process took the cores)."""
        if not self.main:
            return
        self.busy, self.steps = self.busy + seconds, self.steps + 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{scalars['loss']:.3f}")
        if it % self.every == 0 or it == self.total:
            self.record(it, {**scalars, "lr": lr, "step_seconds": self.busy / self.steps})
            self.busy, self.steps = 0.0, 0

    def record(self, it: int, scalars: dict[str, float]) -> None:
        if not self.main or not scalars:
            return
        try:
            append_jsonl(self.jsonl, {"iteration": it, **scalars})
        except OSError as err:  # e.g. the disk filled up: one line, not a traceback
            raise CiscrError(f"{self.jsonl}: cannot write ({err.strerror or err})") from None
        if self.tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, it)

    def close(self) -> None:
        """Idempotent: the interrupt path closes the bar early, ``finally`` again."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
