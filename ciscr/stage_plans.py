"""The stage plans of Algorithm 2: what each training stage trains and how.

A :class:`StagePlan` is a stage's model, data streams, step function and optimisation
settings: :func:`stage1_plan` (M0 on the labeled images, CE + L_CISC on pairs) and
:func:`retrain_plan` (a model on labeled + pseudo-labelled images, rectified by a frozen
teacher's CISC maps: query / bank mode). :func:`run_plan` trains one. ``ciscr.pipeline`` puts
the stages in Algorithm 2's order; ``ciscr profile`` times the steps of plans side by side.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset

from ciscr import dist
from ciscr.config import TrainCfg
from ciscr.data.datasets import MixedDataset, UnlabeledDataset
from ciscr.data.formats import Sample
from ciscr.data.io import read_mask
from ciscr.data.pairs import PairDataset, class_presence
from ciscr.engine.steps import (
    Rectifier,
    UnlabeledLoss,
    mixed_step,
    pair_step,
    retrain_step,
    supervised_step,
)
from ciscr.engine.train import Stream, iters_per_epoch, train_stage
from ciscr.errors import ConfigError
from ciscr.models import SegOutput, build_backbone, inference_layout
from ciscr.pseudo import CONF_DIR
from ciscr.run_services import (
    RunContext,
    _eval_kwargs,
    epoch_eval_hook,
    finish_stage,
    fresh_model,
    labeled_dataset,
    labeled_repeat,
    load_stage_model,
    start_model,
    unlabeled_stage_cfg,
)
from ciscr.selection import (
    Selection,
    class_anchors,
    class_fractions,
    compute_labeled_prototypes,
    load_bank,
    save_bank,
)
from ciscr.utils.misc import autocast

log = logging.getLogger("ciscr")


def stage_start_model(ctx: RunContext, previous: Path) -> nn.Module:
    """A retraining stage's starting point: ImageNet init (``method.init=fresh``, the paper)
    or the previous stage's final model (``previous``, ours)."""
    model = fresh_model(ctx)
    if ctx.cfg.method.init == "previous":
        from ciscr.engine.checkpoint import load_checkpoint

        model.load_state_dict(load_checkpoint(previous / "checkpoint.pt")["model"])
    return model


def unlabeled_dataset(ctx: RunContext, samples: list[Sample], pseudo_dir: Path,
                      part: int = 0) -> UnlabeledDataset:
    """Pseudo-labelled images of one part of a retraining list. Each part (stage 3: the
    reliable and the unreliable half) draws its own augmentation stream (seed + 1 + part):
    with one seed, item i of both parts got the same crop and colours every epoch."""
    d, t, m = ctx.cfg.data, ctx.cfg.train, ctx.cfg.method
    conf = pseudo_dir / CONF_DIR if needs_confidence(ctx) else None
    return UnlabeledDataset(
        samples, pseudo_dir, num_classes=ctx.info.num_classes, ignore_index=d.ignore_index,
        mean=d.mean, std=d.std, crop_size=t.crop_size,
        scale_range=t.scale_range, seed=ctx.cfg.seed + 1 + part, strong=True,
        conf_dir=conf, cutout=m.cutout,
    )


def needs_confidence(ctx: RunContext) -> bool:
    """Whether training reads the teacher's confidence maps (``labels/_confidence``, always
    written by pseudo-labelling, so runs that differ only here can share pseudo labels)."""
    m = ctx.cfg.method
    return m.confidence_threshold > 0 or m.confidence_weighting


@dataclass
class StagePlan:
    """What a training stage trains and how: built by :func:`stage1_plan` and
    :func:`retrain_plan`, run by :func:`run_plan` (``ciscr profile`` times the steps of plans
    side by side without running the stages)."""

    name: str
    model: nn.Module
    streams: dict[str, Stream]
    step: Any  # the step function (ciscr.engine.steps)
    cfg: TrainCfg  # the stage's optimisation settings (its epochs derived from its data)
    epoch_stream: str
    snapshot_iters: tuple[int, ...] = ()


def stage1_plan(ctx: RunContext) -> StagePlan:
    """M0 on the labeled split: CE, plus L_CISC on class-sharing pairs (Eq. 11-12)."""
    m, t, d = ctx.cfg.method, ctx.cfg.train, ctx.cfg.data
    ds, rep = labeled_dataset(ctx), labeled_repeat(ctx)
    if m.stage1_cisc_loss:
        masks = [read_mask(s.mask, ctx.info.num_classes, d.ignore_index) for s in ctx.labeled]
        present = class_presence(masks, ctx.info.num_classes)
        pairs = PairDataset(ds, present, ctx.background, ctx.cfg.seed, m.pair_views,
                            m.pair_partner, m.min_class_ratio, d.ignore_index)
        streams = {"pairs": Stream(pairs, max(1, t.batch_size // 2), rep, images_per_item=2)}
        step = pair_step(True, m.cisc_weight, d.ignore_index, m.pair_loss_norm)
    else:
        streams = {"labeled": Stream(ds, t.batch_size, rep)}
        step = supervised_step(d.ignore_index, m.ohem())
    epoch_stream = next(iter(streams))
    # ST++ keeps stage-1 snapshots for its stability selection; SupOnly keeps them too (two
    # files, no effect on training) so that any SupOnly model can be ST++'s model.init.
    keep = m.selection == "stpp" or m.retrain == "none"
    snaps = _stpp_snapshot_iters(ctx, streams[epoch_stream]) if keep else ()
    return StagePlan("stage1", start_model(ctx), streams, step, t, epoch_stream, tuple(snaps))


def run_plan(ctx: RunContext, plan: StagePlan, t0: float) -> dict[str, Any]:
    """Train a planned stage (resumable) into ``run_dir/<name>``, evaluate it, mark it done;
    its wall time counts from ``t0`` (before the plan was built: teacher, bank)."""
    out = ctx.run_dir / plan.name
    model = train_stage(out, plan.model, plan.streams, plan.step, plan.cfg, seed=ctx.cfg.seed,
                        device=ctx.device, epoch_stream=plan.epoch_stream,
                        meta={**ctx.meta, "stage": plan.name},
                        num_workers=ctx.cfg.data.num_workers, snapshot_iters=plan.snapshot_iters,
                        desc=plan.name, on_epoch_end=epoch_eval_hook(ctx))
    return finish_stage(ctx, out, model, t0)


def stpp_snapshot_iters(per_epoch: int, epochs: int, n: int) -> list[int]:
    """ST++ keeps stage-1 checkpoints at the ends of epochs floor(E*i/(n+1)), i = 1..n (ST++:
    n = 2, at E/3 and 2E/3); the last one, M0 itself, is not a snapshot. Iterations."""
    total = per_epoch * epochs
    if epochs > n:
        its = {per_epoch * (epochs * (i + 1) // (n + 1)) for i in range(n)}
    else:  # too few epochs for n distinct ones (tiny runs): evenly spaced iterations
        its = {max(1, total * (i + 1) // (n + 1)) for i in range(n)}
    return sorted(its - {total})


def _stpp_snapshot_iters(ctx: RunContext, stream: Stream) -> list[int]:
    t = ctx.cfg.train
    return stpp_snapshot_iters(iters_per_epoch(stream, t), t.epochs, ctx.cfg.method.stpp_snapshots)


class _ConcatWithEpoch(ConcatDataset):
    def set_epoch(self, epoch: int) -> None:
        for ds in self.datasets:
            ds.set_epoch(epoch)


class _BackboneTeacher(nn.Module):
    """'CISC maps from an ImageNet backbone' (paper Table 2): frozen pretrained backbone."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> SegOutput:
        return SegOutput(None, self.backbone.forward_features(x)[1])


def build_teacher(ctx: RunContext, stage_dir: Path) -> nn.Module:
    """The frozen teacher of a re-training stage (never wrapped in DDP)."""
    m = ctx.cfg.method
    if m.cisc_features == "imagenet":
        if not ctx.cfg.model.pretrained:
            raise ConfigError("method.cisc_features=imagenet needs model.pretrained (a weight file)")
        b = build_backbone(ctx.cfg.model.backbone, ctx.cfg.model.output_stride,
                           ctx.cfg.model.pretrained)
        teacher = inference_layout(_BackboneTeacher(b).to(ctx.device).eval(),
                                   ctx.cfg.train.infer_channels_last)
    else:
        teacher = load_stage_model(ctx, stage_dir)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def build_rectifier(ctx: RunContext, teacher_dir: Path, sel: Selection, lab_ds, out: Path):
    """The CISC-map machinery of Eq. 7 for one stage, or None for plain self-training."""
    m = ctx.cfg.method
    if m.rectify == "none":
        return None
    if m.rectify_classes == "all" and m.rectify == "query":
        raise ConfigError("method.rectify_classes=all needs method.rectify=bank or anchor")
    if m.num_prototypes > 1 and (m.rectify != "query" or m.rectify_classes != "one"):
        raise ConfigError("method.num_prototypes>1 needs method.rectify=query, rectify_classes=one")
    teacher = build_teacher(ctx, teacher_dir)
    index = {s.id: i for i, s in enumerate(ctx.labeled)}
    queries = {k: [index[i] for i in ids] for k, ids in sel.queries.items()}
    bank = present = anchors = None
    if m.rectify in ("bank", "anchor"):
        bank, present = _stage_bank(ctx, teacher, out)
        anchors = class_anchors(bank, present) if m.rectify == "anchor" else None

    def features(x: torch.Tensor) -> torch.Tensor:
        with autocast(ctx.device, ctx.cfg.train.amp):
            return teacher(x).features

    return Rectifier(
        features=features, mode=m.rectify, classes=m.rectify_classes,
        num_classes=ctx.info.num_classes, query_lists=queries, seed=ctx.cfg.seed,
        min_ratio=m.min_class_ratio, background=ctx.background,
        ignore_index=ctx.cfg.data.ignore_index, labeled=lab_ds,
        bank=bank.to(ctx.device) if bank is not None else None,
        bank_present=present, anchors=anchors, num_prototypes=m.num_prototypes,
        min_query_ratio=m.min_class_ratio,
    )


def _covers(ctx: RunContext, ratio: float) -> torch.Tensor:
    """(N_l, K) bool: class k covers >= ``ratio`` of labeled image n's valid pixels. The bank
    keeps no prototype from fewer pixels (the authors' >= 3 % rule)."""
    k, ign = ctx.info.num_classes, ctx.cfg.data.ignore_index
    rows = [class_fractions(read_mask(s.mask, k, ign), k) for s in ctx.labeled]
    return torch.from_numpy(np.stack(rows) >= ratio)


def _stage_bank(ctx: RunContext, teacher: nn.Module, out: Path):
    """Prototypes of every labeled image from this stage's frozen teacher, computed once."""
    path = out / "bank.safetensors"
    if path.exists():
        protos, present, ids = load_bank(path)
        if ids == [s.id for s in ctx.labeled]:
            return protos, present
    kw = _eval_kwargs(ctx)
    protos, present = compute_labeled_prototypes(teacher, ctx.labeled, views=ctx.cfg.method.bank_views, **kw)
    present = present & _covers(ctx, ctx.cfg.method.min_class_ratio)
    if dist.is_main():
        save_bank(path, protos, present, [s.id for s in ctx.labeled])
    return protos, present


def unlabeled_loss(ctx: RunContext, total_iters: int) -> UnlabeledLoss:
    m = ctx.cfg.method
    return UnlabeledLoss(weight=m.unlabeled_weight,
                         rampup_iters=round(m.unlabeled_rampup * total_iters),
                         threshold=m.confidence_threshold, by_confidence=m.confidence_weighting,
                         class_balance=m.class_balance, num_classes=ctx.info.num_classes)


def _retrain_streams(ctx: RunContext, parts: list[tuple[list[Sample], Path]]):
    """The streams and step of a retraining stage: ST++'s ONE mixed list (``mixed``) or a
    labeled and an unlabeled stream of B each (``split``, CISC-R)."""
    t = ctx.cfg.train
    unl = [unlabeled_dataset(ctx, s, p, part=i) for i, (s, p) in enumerate(parts) if s]
    if ctx.cfg.method.retrain_batches == "mixed":
        n_u = sum(len(u) for u in unl)
        lab = labeled_dataset(ctx, repeat=max(1, math.ceil(n_u / len(ctx.labeled))))
        return {"mixed": Stream(MixedDataset(lab, unl), t.batch_size)}, "mixed"
    streams = {"labeled": Stream(labeled_dataset(ctx), t.batch_size, labeled_repeat(ctx)),
               "unlabeled": Stream(_ConcatWithEpoch(unl), t.unlabeled_batch_size or t.batch_size)}
    return streams, "unlabeled"


def retrain_plan(ctx: RunContext, name: str, parts: list[tuple[list[Sample], Path]],
                 teacher_dir: Path, sel: Selection | None) -> StagePlan:
    """A model trained on labeled + pseudo-labeled images (``parts``: unlabeled samples and
    their pseudo-label folder), rectified by the frozen teacher of ``teacher_dir`` when
    ``sel`` is given. The stage's bank (bank mode) is cached in ``run_dir/<name>``."""
    model = stage_start_model(ctx, teacher_dir)
    streams, epoch_stream = _retrain_streams(ctx, parts)
    per_epoch = iters_per_epoch(streams[epoch_stream], ctx.cfg.train)
    # The mixed list's labeled part (ST++): about half of each batch, not a stream of B.
    lab = streams["mixed"].dataset.num_labeled if epoch_stream == "mixed" else None
    t = unlabeled_stage_cfg(ctx, per_epoch, lab)
    total = iters_per_epoch(streams[epoch_stream], t) * t.epochs  # t may fix the epoch length
    unl, ign = unlabeled_loss(ctx, total), ctx.cfg.data.ignore_index
    if epoch_stream == "mixed":  # never rectified (MethodCfg refuses mixed + rectify)
        step = mixed_step(ign, unl)
    else:
        out = ctx.run_dir / name
        rect = build_rectifier(ctx, teacher_dir, sel, labeled_dataset(ctx), out) if sel else None
        step = retrain_step(rect, ign, unl)
    return StagePlan(name, model, streams, step, t, epoch_stream)
