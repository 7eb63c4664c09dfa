"""Training steps of finished stages, timed side by side in one process: the interleaved pass
of ``ciscr profile``.

WHY: the timed pass runs whole stages minutes apart, and on a shared virtual machine the same
work can run 10-50 % slower a few minutes later (the A/A control of
``docs/results/profile_cpu.md``): more than the 15 % margin of the stage targets. Here every
stage is planned again from a finished run by the pipeline's own functions
(:func:`ciscr.stage_plans.stage1_plan`, :func:`~ciscr.stage_plans.retrain_plan`: the same streams,
step function, teacher, bank and optimiser settings) and trains for a block of steps in turn,
round after round. A change of the machine's speed hits every stage of a round alike, and a
stage's ratio to ST is the median over the rounds of the ratio within a round. ST's stage 2 is
timed twice, as two separate plans: their ratio (an A/A control) shows the resolution.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ciscr.run_services import RunContext
from ciscr.stage_plans import StagePlan
from ciscr.timing.common import in_rounds

ROUNDS = 10  # rounds of the interleaved pass
BLOCK = 4  # steps of a stage per round (batch loading included, as in a real stage)
WARMUP = 1  # rounds run first and not counted (allocator, caches)
AA_KEY = "st stage2 (again)"  # the A/A control: ST's stage 2 planned and timed a second time


def finished_plans(ctx: RunContext) -> dict[str, StagePlan]:
    """Every training stage of the finished stage-wise run ``ctx.run_dir``, planned again as
    the run planned it (its selection, pseudo labels and banks are read from the run)."""
    from ciscr.pipeline import retrain_inputs, retraining_selection
    from ciscr.stage_plans import retrain_plan, stage1_plan

    rd = ctx.run_dir
    plans = {"stage1": stage1_plan(ctx)}
    if ctx.cfg.method.retrain == "none":
        return plans
    pseudo0 = rd / "pseudo0" / "labels"
    sel, rect = retraining_selection(ctx, pseudo0)
    pseudo1 = rd / "pseudo1" / "labels"
    pseudo1 = pseudo1 if pseudo1.is_dir() else pseudo0  # no unreliable half: stage 3 reuses 0
    for name, (parts, teacher_dir) in retrain_inputs(ctx, sel, pseudo0, pseudo1).items():
        plans[name] = retrain_plan(ctx, name, parts, teacher_dir, rect)
    return plans


class _Trainer:
    """One plan's model, optimiser and batch iterators, ready to run steps on demand."""

    def __init__(self, plan: StagePlan, device: torch.device, seed: int) -> None:
        from ciscr.engine.train import iters_per_epoch, new_stage_state, stream_loaders

        self.plan, self.device = plan, device
        total = iters_per_epoch(plan.streams[plan.epoch_stream], plan.cfg) * plan.cfg.epochs
        self.state = new_stage_state(plan.model.to(device).train(), plan.step, plan.cfg, total,
                                     device)
        # Iterators that never run out: the timing takes a few dozen steps of any stage. The
        # batches load on this process (num_workers=0, the configs' default), so that loading
        # is timed with the step as in a real stage; loader workers would blur the turns.
        self.loaders = stream_loaders(plan.streams, seed, 0, 10**9, 0)

    def steps(self, n: int) -> float:
        """Seconds per step over ``n`` steps (loading each batch included)."""
        # The engine's own step and loading.
        from ciscr.engine.train import _one_step, next_batches, step_streams

        st, cfg = self.state, self.plan.cfg
        t0 = time.perf_counter()
        for _ in range(n):
            batches = next_batches(self.loaders, self.device, cfg.channels_last,
                                   step_streams(self.plan.step, st.iteration))
            _one_step(st.model, st, self.plan.step, batches, st.iteration, cfg, self.device)
            st.iteration += 1
        return (time.perf_counter() - t0) / n


def time_steps(trainers: dict[str, _Trainer], rounds: int = ROUNDS, block: int = BLOCK,
               warmup: int = WARMUP) -> dict[str, list[float]]:
    """{key: seconds per step in each counted round}: every trainer runs ``block`` steps in
    turn, in the same order every round, ``warmup + rounds`` times."""
    return in_rounds({k: functools.partial(t.steps, block) for k, t in trainers.items()},
                     rounds, warmup, rotate=False)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The median over rounds of ``a[r] / b[r]`` (two stages timed in the same rounds)."""
    xs = [x / y for x, y in zip(a, b, strict=True) if y > 0]
    return statistics.median(xs) if xs else None


def interleaved_pass(runs: dict[str, tuple[Any, Path]], device: torch.device | None = None,
                     rounds: int | None = None, block: int | None = None) -> dict[str, Any]:
    """Time every training stage of the finished runs ``{method: (cfg, run_dir)}`` side by
    side on ``device`` (default: the first config's), ``rounds`` / ``block`` (default
    :data:`ROUNDS` / :data:`BLOCK`). Returns seconds per step per round (``times``, keys
    "<method> <stage>" and, with ST, :data:`AA_KEY`) and the settings."""
    from ciscr.dist import resolve_device
    from ciscr.run_setup import setup_run

    rounds, block = rounds or ROUNDS, block or BLOCK
    device = device or resolve_device(next(iter(runs.values()))[0].device)
    trainers: dict[str, _Trainer] = {}
    for method, (cfg, run_dir) in runs.items():
        ctx = setup_run(cfg, run_dir, device)
        plans = finished_plans(ctx)
        for stage, plan in plans.items():
            trainers[f"{method} {stage}"] = _Trainer(plan, device, cfg.seed)
        if method == "st" and "stage2" in plans:  # a second, separate plan of the same stage
            trainers[AA_KEY] = _Trainer(finished_plans(ctx)["stage2"], device, cfg.seed)
    times = time_steps(trainers, rounds, block)
    return {"rounds": rounds, "block": block, "warmup": WARMUP, "times": times}
