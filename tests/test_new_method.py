"""A new method in one file: this test file defines one, registers it, and runs it through
``ciscr run``, an interrupted run's resume and the report, with nothing else changed.

The toy method ("smooth"): one training stage, ``smooth/``, that trains a fresh model on the
labeled images with label-smoothed CE. It is written only against the services every family
uses (:mod:`ciscr.run_services`) and the one training loop, as docs/DESIGN.md's "Adding a
method" says a new method should be.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ciscr.cli import main
from ciscr.engine.checkpoint import load_checkpoint
from ciscr.engine.train import Stream, train_stage
from ciscr.methods import RECIPES, Recipe, register_method, stage_names, unregister_method
from ciscr.run_services import (
    RunContext,
    epoch_eval_hook,
    finish_stage,
    fresh_model,
    is_done,
    labeled_dataset,
    labeled_repeat,
)
from ciscr.utils.io import read_json

STAGE = "smooth"
SMOOTHING = 0.1
# 6 iterations, a checkpoint every 2: an interruption at iteration 5 resumes from iteration 4.
ARGS = [
    "method.name=smooth", "train.epochs=2", "train.iters_per_epoch=3", "train.batch_size=4",
    "train.crop_size=32", "train.lr=0.02", "train.ckpt_every=2", "train.log_every=1",
    "train.eval_every_epochs=1", "train.progress=false", "data.synthetic.num_train=16",
    "data.synthetic.num_val=4", "data.synthetic.size=32", "data.labeled=8",
    "model.backbone=mobilenet_v2", "method.tta_scales=[1.0]", "device=cpu",
]  # fmt: skip


class _Interrupt(KeyboardInterrupt):
    """What Ctrl-C raises: ``ciscr run`` stops with 'rerun the same command to resume'."""


def smooth_step(ignore_index: int, stop_at: int | None = None):
    """The method's step: label-smoothed CE on a labeled batch (the loop does the rest)."""

    def step(model: torch.nn.Module, batches: dict[str, dict[str, Any]], it: int):
        if stop_at is not None and it == stop_at:
            raise _Interrupt
        b = batches["labeled"]
        logits = model(b["image"]).logits
        loss = F.cross_entropy(logits, b["mask"], ignore_index=ignore_index,
                               label_smoothing=SMOOTHING)
        return loss, {"ce_smoothed": float(loss.detach())}

    return step


def run_smooth(ctx: RunContext, stop_at: int | None = None) -> tuple[dict[str, Any], str]:
    """The method's stages: (each stage's summary, the final training stage)."""
    out = ctx.run_dir / STAGE
    if is_done(out):
        return {STAGE: read_json(out / "done.json")}, STAGE
    t0 = time.perf_counter()
    t = ctx.cfg.train
    streams = {"labeled": Stream(labeled_dataset(ctx), t.batch_size, labeled_repeat(ctx))}
    model = train_stage(out, fresh_model(ctx), streams,
                        smooth_step(ctx.cfg.data.ignore_index, stop_at), t, seed=ctx.cfg.seed,
                        device=ctx.device, epoch_stream="labeled",
                        meta={**ctx.meta, "stage": STAGE}, num_workers=ctx.cfg.data.num_workers,
                        desc=STAGE, on_epoch_end=epoch_eval_hook(ctx))
    return {STAGE: finish_stage(ctx, out, model, t0)}, STAGE


@pytest.fixture
def smooth_method():
    """Register the toy method for one test (what a method's own module does at import)."""
    recipe = Recipe(family="stagewise", summary="label-smoothed CE on the labeled images",
                    stages=lambda m: [STAGE], run=run_smooth)
    register_method("smooth", recipe, preset={"retrain": "none", "rectify": "none",
                                              "stage1_cisc_loss": False})
    yield recipe
    unregister_method("smooth")


def _run(out: Path, data: Path, *extra: str) -> int:
    return main(["run", "synthetic", "--out", str(out), *ARGS, f"data.root={data}", *extra])


def test_a_method_registered_in_a_test_file_runs_resumes_and_reports(
    smooth_method, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    # An uninterrupted run: the reference.
    assert _run(tmp_path / "ref", data) == 0
    ref = tmp_path / "ref"
    results = read_json(ref / "results.json")
    assert results["method"] == "smooth" and results["final_stage"] == STAGE
    assert set(results["stages"]) >= {STAGE}
    assert read_json(ref / STAGE / "metrics.json")["miou"] == results["final_metrics"]["miou"]
    assert "ce_smoothed" in (ref / STAGE / "train.jsonl").read_text()
    # The report knows the method's stages from its recipe alone.
    page = (ref / "report.html").read_text()
    assert "smooth" in page and '<span class="st done">done</span>' in page
    assert '<span class="st missing">' not in page and '<span class="st incomplete">' not in page

    # Interrupted at iteration 5 (after the checkpoint of iteration 4), then rerun: the same
    # command finishes the run, and it equals the uninterrupted one bit for bit.
    run = tmp_path / "run"
    interrupted = dataclasses.replace(smooth_method, run=lambda ctx: run_smooth(ctx, stop_at=5))
    RECIPES["smooth"] = interrupted  # (the fixture removes the name afterwards)
    try:
        assert _run(run, data) == 130
    finally:
        RECIPES["smooth"] = smooth_method
    assert load_checkpoint(run / STAGE / "checkpoint.pt")["iteration"] == 4
    assert not is_done(run / STAGE)
    assert _run(run, data) == 0
    for name in ("model", "optimizer"):
        a = load_checkpoint(ref / STAGE / "checkpoint.pt")[name]
        b = load_checkpoint(run / STAGE / "checkpoint.pt")[name]
        assert _same(a, b), name
    assert read_json(run / STAGE / "metrics.json") == read_json(ref / STAGE / "metrics.json")
    assert stage_names(_cfg_method(run)) == [STAGE]


def _cfg_method(run: Path):
    from ciscr.config import load_config

    return load_config(run / "config.yaml").method


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_registered_name_cannot_be_registered_twice(smooth_method) -> None:
    from ciscr.errors import ConfigError

    with pytest.raises(ConfigError, match="registered already"):
        register_method("smooth", smooth_method)
    with pytest.raises(ConfigError, match="registered already"):
        register_method("ciscr", smooth_method)
