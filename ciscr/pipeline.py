"""Algorithm 2 of CISC-R as stage functions over a run directory (METHOD.md section 6).

    stage1/      M0: CE (+ L_CISC) on labeled pairs                  -> checkpoint.pt, metrics.json
    pseudo0/     TTA pseudo labels of every unlabeled image with M0 -> labels/*.png, quality.json
    selection/   anchors, query lists, reliable / unreliable halves   -> queries.json, split.json
    stage2/      fresh model on labeled + reliable, teacher M0        -> checkpoint.pt, metrics.json
    pseudo1/     the unreliable half re-labelled with M1
    stage3/      fresh model on labeled + all unlabeled, teacher M1   -> the result
    results.json summary of every stage

Each stage is skipped when its ``done.json`` exists and resumed from its checkpoint otherwise;
every artefact is written atomically, so a killed run is finished by rerunning the command.

This module is the stages' ORDER (and the selection stage, Algorithm 1). What each training
stage trains is planned in :mod:`ciscr.stage_plans`; the services every method family shares
(run context, evaluation, pseudo-labelling, ``finish_run``) are :mod:`ciscr.run_services`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ciscr import dist
from ciscr.data.formats import Sample
from ciscr.errors import DataError
from ciscr.run_services import (
    RunContext,
    _eval_kwargs,
    finish_stage,
    is_done,
    load_model_file,
    load_stage_model,
    mark_done,
    pseudo_stage,
    score_labels,
)
from ciscr.selection import (
    Selection,
    class_anchors,
    compute_labeled_prototypes,
    crop_level_scores,
    distance_table,
    image_distances,
    per_image_miou,
    query_eligible,
    query_lists_as,
    query_lists_cs,
    query_lists_rs,
    read_selection,
    split_by_score,
    split_unlabeled_cisc,
    split_unlabeled_random,
    stability_scores,
    write_selection,
)
from ciscr.stage_plans import retrain_plan, run_plan, stage1_plan
from ciscr.utils.io import atomic_write_json, read_json
from ciscr.warmstart import adopts_init, init_snapshots

log = logging.getLogger("ciscr")


# --------------------------------------------------------------------------- stages


def stage1(ctx: RunContext) -> dict[str, Any]:
    """Train M0 (:func:`stage1_plan`) unless stage 1 is done."""
    out = ctx.run_dir / "stage1"
    if is_done(out):
        return read_json(out / "done.json")
    t0 = time.perf_counter()
    if adopts_init(ctx.cfg):
        return adopt_init(ctx, out, t0)
    return run_plan(ctx, stage1_plan(ctx), t0)


def adopt_init(ctx: RunContext, out: Path, t0: float) -> dict[str, Any]:
    """Stage 1 = the ``model.init`` checkpoint (its weights, with this run's meta, and ST++'s
    snapshots of its own run), evaluated like a trained stage 1; nothing is trained."""
    from ciscr.engine.checkpoint import load_checkpoint, save_checkpoint

    cfg = ctx.cfg
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        for snap in init_snapshots(cfg) if cfg.method.selection == "stpp" else []:
            save_checkpoint(out / snap.name, {"model": load_checkpoint(snap)["model"]})
        save_checkpoint(out / "checkpoint.pt",
                        {"model": load_checkpoint(cfg.model.init)["model"],
                         "meta": {**ctx.meta, "stage": "stage1"}})
        atomic_write_json(out / "init.json", {"path": cfg.model.init,
                                              "sha256": cfg.model.init_sha256})
    dist.barrier()
    log.info("stage1: taken from model.init %s (not trained)", cfg.model.init)
    return finish_stage(ctx, out, load_stage_model(ctx, out), t0)


def selection_stage(ctx: RunContext, pseudo0: Path) -> Selection:
    """Algorithm 1 with M0: per-class query lists and the reliable / unreliable halves."""
    out = ctx.run_dir / "selection"
    lab_ids, unl_ids = [s.id for s in ctx.labeled], [s.id for s in ctx.unlabeled]
    if is_done(out):
        return read_selection(out, labeled_ids=lab_ids, unlabeled_ids=unl_ids)
    t0, c0 = time.perf_counter(), time.process_time()
    m0 = load_stage_model(ctx, ctx.run_dir / "stage1")
    kw = _eval_kwargs(ctx)
    protos, present = compute_labeled_prototypes(m0, ctx.labeled, **kw)
    anchors = class_anchors(protos, present)
    bal = ctx.cfg.method.distance == "balanced"
    d_lab, frac = image_distances(m0, ctx.labeled, "gt", anchors, return_fractions=True,
                                  balanced=bal, **kw)
    eligible = query_eligible(frac, ctx.cfg.method.query_min_class_ratio)
    queries = _query_lists(ctx, m0, lab_ids, eligible, d_lab)
    for k in range(ctx.info.num_classes):
        if not queries.get(k) and k != ctx.background:
            log.warning("class '%s' has no labeled image: it is never rectified (plain CE)",
                        ctx.info.class_names[k])
    reliable, unreliable, scores = _split_unlabeled(ctx, m0, pseudo0, anchors)
    if dist.is_main():
        write_selection(out, queries, reliable, unreliable, scores,
                        {"query_selection": ctx.cfg.method.query_selection,
                         "query_min_class_ratio": ctx.cfg.method.query_min_class_ratio,
                         "distance": ctx.cfg.method.distance,
                         "selection": ctx.cfg.method.selection},
                        class_names=ctx.info.class_names,
                        query_scores=distance_table(lab_ids, d_lab))
        _write_half_quality(ctx, out, pseudo0, reliable, unreliable)
    mark_done(out, {"reliable": len(reliable), "unreliable": len(unreliable),
                    "wall_seconds": round(time.perf_counter() - t0, 2),
                    "cpu_seconds": round(time.process_time() - c0, 2)})
    log.info("selection: %d reliable / %d unreliable unlabeled images (%s); query lists: %s",
             len(reliable), len(unreliable), ctx.cfg.method.selection,
             ", ".join(f"{ctx.info.class_names[k]} {len(v)}" for k, v in sorted(queries.items())))
    return read_selection(out, labeled_ids=lab_ids, unlabeled_ids=unl_ids)


def _query_lists(ctx: RunContext, m0: nn.Module, ids: list[str], present, d_lab):
    how = ctx.cfg.method.query_selection
    if how == "cs":
        return query_lists_cs(ids, present, d_lab)
    if how == "rs":
        return query_lists_rs(ids, present, ctx.cfg.seed)
    miou = per_image_miou(m0, ctx.labeled, **_eval_kwargs(ctx))
    return query_lists_as(ids, present, miou)


def _split_unlabeled(ctx: RunContext, m0: nn.Module, pseudo0: Path, anchors: torch.Tensor):
    m, ids = ctx.cfg.method, [s.id for s in ctx.unlabeled]
    if m.retrain != "two":
        return ids, [], {}
    if m.selection == "random":
        return split_unlabeled_random(ids, ctx.cfg.seed)
    kw = _eval_kwargs(ctx)
    bal = m.distance == "balanced"
    if m.selection == "stpp":
        paths = sorted((ctx.run_dir / "stage1").glob("snapshot_*.pt"))
        snaps = [load_model_file(ctx, p) for p in paths]
        kw.pop("ignore_index")
        scores = stability_scores(snaps, m0, ctx.unlabeled, **kw)
        return (*split_by_score(ids, scores, ascending=False), scores)
    if m.crop_selection:
        scores = crop_level_scores(m0, ctx.unlabeled, pseudo0, anchors, m.crop_selection,
                                   balanced=bal, **kw)
        return (*split_by_score(ids, scores, ascending=True), scores)
    d_unl, frac = image_distances(m0, ctx.unlabeled, pseudo0, anchors, return_fractions=True,
                                  balanced=bal, **kw)
    return split_unlabeled_cisc(ids, d_unl, frac > 0, all_classes=m.image_score == "all")


def _write_half_quality(ctx, out: Path, pseudo0: Path, reliable, unreliable) -> None:
    """Pseudo-label mIoU of the reliable vs unreliable halves (paper Fig. 10), if gt exists."""
    by_id = {s.id: s for s in ctx.unlabeled}
    halves = {"reliable": reliable, "unreliable": unreliable}
    quality = {k: score_labels(ctx, pseudo0, [by_id[i] for i in v]) for k, v in halves.items()}
    atomic_write_json(out / "half_quality.json", quality)


def retrain_stage(ctx: RunContext, name: str, parts: list[tuple[list[Sample], Path]],
                  teacher_dir: Path, sel: Selection | None) -> dict[str, Any]:
    """Train a retraining stage (:func:`retrain_plan`) unless it is done."""
    out = ctx.run_dir / name
    if is_done(out):
        return read_json(out / "done.json")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)  # the bank is cached there
    return run_plan(ctx, retrain_plan(ctx, name, parts, teacher_dir, sel), t0)


def retraining_selection(ctx: RunContext, pseudo0: Path) -> tuple[Selection | None,
                                                                   Selection | None]:
    """(Algorithm 1's selection, the one the rectifier uses): the selection runs (or is read,
    when done) where the method rectifies or splits the unlabeled images into halves; the
    rectifier's is None without rectification."""
    m = ctx.cfg.method
    needs_sel = m.rectify != "none" or m.retrain == "two"
    sel = selection_stage(ctx, pseudo0) if needs_sel else None
    return sel, (sel if m.rectify != "none" else None)


def retrain_inputs(ctx: RunContext, sel: Selection | None, pseudo0: Path,
                   pseudo1: Path | None = None) -> dict[str, tuple[list, Path]]:
    """The retraining stages of Algorithm 2: name -> (parts, teacher directory). ``retrain=one``:
    stage 2 on every unlabeled image; ``two``: stage 2 on the reliable half, stage 3 (once
    ``pseudo1`` exists) on both halves, the unreliable one relabelled by M1."""
    rd = ctx.run_dir
    if ctx.cfg.method.retrain == "one":
        return {"stage2": ([(ctx.unlabeled, pseudo0)], rd / "stage1")}
    by_id = {s.id: s for s in ctx.unlabeled}
    rel = [by_id[i] for i in sel.reliable]
    unrel = [by_id[i] for i in sel.unreliable]
    inputs = {"stage2": ([(rel, pseudo0)], rd / "stage1")}
    if pseudo1 is not None:
        inputs["stage3"] = ([(rel, pseudo0), (unrel, pseudo1)], rd / "stage2")
    return inputs


# --------------------------------------------------------------------------- Algorithm 2


def run_stagewise(ctx: RunContext) -> tuple[dict[str, dict[str, Any]], str]:
    """The stage-wise family (SupOnly, ST, ST++, CISC-R): run or finish every stage the method
    needs; returns (each stage's summary, the final training stage)."""
    m, rd = ctx.cfg.method, ctx.run_dir
    stages: dict[str, dict[str, Any]] = {"stage1": stage1(ctx)}
    if m.retrain == "none":
        return stages, "stage1"
    if not ctx.unlabeled:
        raise DataError("the unlabeled split is empty: nothing to self-train on")
    pseudo0 = pseudo_stage(ctx, "pseudo0", rd / "stage1", ctx.unlabeled)
    stages["pseudo0"] = read_json(rd / "pseudo0" / "done.json")
    sel, rect = retraining_selection(ctx, pseudo0)
    # Every stage's summary, selection and pseudo1 included: results.json's CPU and wall
    # totals are the sums over this dict.
    if sel is not None:
        stages["selection"] = read_json(rd / "selection" / "done.json")
    inputs = retrain_inputs(ctx, sel, pseudo0)
    stages["stage2"] = retrain_stage(ctx, "stage2", *inputs["stage2"], rect)
    if m.retrain == "one":
        return stages, "stage2"
    by_id = {s.id: s for s in ctx.unlabeled}
    unrel = [by_id[i] for i in sel.unreliable]
    pseudo1 = pseudo_stage(ctx, "pseudo1", rd / "stage2", unrel) if unrel else pseudo0
    if unrel:
        stages["pseudo1"] = read_json(rd / "pseudo1" / "done.json")
    inputs = retrain_inputs(ctx, sel, pseudo0, pseudo1)
    stages["stage3"] = retrain_stage(ctx, "stage3", *inputs["stage3"], rect)
    return stages, "stage3"


