"""The online family's one stage over a run directory (FixMatch, UniMatch, UniMatch + CISC).

    online/   the model, trained on labeled + unlabeled images in every step -> the result
              (checkpoint.pt, metrics.json, train.jsonl with mask_ratio / pseudo_acc, tb/)

The step's maths is :class:`ciscr.engine.online.OnlineStep`; this module only builds its
streams (labeled, unlabeled, and a second unlabeled stream to CutMix with) and runs
:func:`ciscr.engine.train.train_stage`, so resume, DDP, bf16 and logging are the shared ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ciscr import dist
from ciscr.data.datasets import UnlabeledViews
from ciscr.data.formats import Sample
from ciscr.engine.online import BankFn, OnlineRecipe, OnlineStep, batch_prototypes, recipe_weights
from ciscr.engine.train import Stream, iters_per_epoch, train_stage
from ciscr.errors import ConfigError, DataError
from ciscr.pseudo import eval_mode, load_eval_image, read_labels
from ciscr.run_services import (
    RunContext,
    epoch_eval_hook,
    finish_stage,
    is_done,
    labeled_dataset,
    labeled_repeat,
    start_model,
    unlabeled_stage_cfg,
)
from ciscr.utils.io import read_json
from ciscr.utils.misc import autocast

STAGE = "online"


def online_recipe(ctx: RunContext) -> OnlineRecipe:
    """The method's settings (``method.*``) as the step reads them."""
    m = ctx.cfg.method
    _, w_views, w_fp = recipe_weights(m.strong_views, m.feature_perturbation)
    return OnlineRecipe(
        strong_views=m.strong_views, fp=m.feature_perturbation, fp_p=m.fp_dropout,
        threshold=m.confidence_threshold, class_balance=m.class_balance, cisc=m.online_cisc,
        weight_labeled=m.labeled_weight,
        weight_views=w_views, weight_fp=w_fp, unlabeled_weight=m.unlabeled_weight,
        min_ratio=m.min_class_ratio, ignore_index=ctx.cfg.data.ignore_index,
        prototype_source=m.prototype_source, refresh=m.prototype_refresh, ohem=m.ohem(),
        unlabeled_every=m.unlabeled_every, mix_source=m.mix_source,
    )


def labeled_bank(samples: list[Sample], num_classes: int, *, mean: Sequence[float],
                 std: Sequence[float], ignore_index: int, min_ratio: float, amp: str,
                 device: torch.device | str, max_images: int = 0, seed: int = 0) -> BankFn:
    """The prototype bank of online CISC: ``bank(model, it) -> (protos (K, C), known (K,))``,
    the mean over labeled images (whole, eval transform, eval mode) of each image's class
    prototype where the class covers >= ``min_ratio`` of it (the 3 % rule).

    ``max_images`` > 0 bounds a refresh's cost on large labeled sets: a sample of that many
    images, drawn from (seed, it) so every rank and a resumed run draw the same; 0 = all.
    Each rank forwards its share of them; the per-image sums are gathered and added in image
    order, so every rank holds the same bank, bit for bit.
    """
    k = num_classes

    def one(model: nn.Module, s: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        img = load_eval_image(s, mean, std, device)
        lab = read_labels(s, "gt", tuple(img.shape[-2:]), k, ignore_index)
        with autocast(device, amp):
            feats = model(img).features
        lab_t = torch.from_numpy(np.asarray(lab, dtype=np.int64)).unsqueeze(0).to(device)
        sums, counts = batch_prototypes(feats.float(), lab_t, k, min_ratio, ignore_index)
        return sums.cpu(), counts.cpu()

    def bank(model: nn.Module, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = list(samples)
        if 0 < max_images < len(chosen):
            g = np.random.default_rng([seed, it])
            chosen = [chosen[i] for i in sorted(g.choice(len(chosen), max_images, replace=False))]
        with eval_mode(model):
            rows = dist.map_sharded(lambda s: one(model, s), chosen)
        sums = torch.stack([r[0] for r in rows]).sum(0)
        counts = torch.stack([r[1] for r in rows]).sum(0)
        protos = sums / counts.clamp_min(1.0).unsqueeze(1)
        return protos.to(device), counts > 0

    return bank


def _views(ctx: RunContext, seed: int) -> UnlabeledViews:
    d, t, m = ctx.cfg.data, ctx.cfg.train, ctx.cfg.method
    r = t.unlabeled_resolution  # < 1: the same field of view in fewer pixels (a cheaper branch)
    return UnlabeledViews(
        ctx.unlabeled, num_classes=ctx.info.num_classes, ignore_index=d.ignore_index,
        mean=d.mean, std=d.std, crop_size=max(16, round(t.crop_size * r)),
        scale_range=(t.scale_range[0] * r, t.scale_range[1] * r), seed=seed,
        views=m.strong_views, cutmix_p=m.cutmix_p,
    )


def online_stage(ctx: RunContext) -> dict[str, Any]:
    """Train the model of an online method; one epoch = one pass over the unlabeled images
    (UniMatch's), the labeled stream cycling alongside."""
    out = ctx.run_dir / STAGE
    if is_done(out):
        return read_json(out / "done.json")
    if not ctx.unlabeled:
        raise DataError(f"the unlabeled split is empty but method.name={ctx.cfg.method.name} "
                        "trains on unlabeled images: label fewer images or use suponly")
    b_u = ctx.cfg.train.unlabeled_batch_size or ctx.cfg.train.batch_size
    if ctx.cfg.method.mix_source == "batch" and b_u // dist.world_size() < 2:
        # Each image's CutMix partner is another image of its process's batch: one has none.
        raise ConfigError(f"method.mix_source=batch needs at least 2 unlabeled images per "
                          f"process per step; train.unlabeled_batch_size={b_u} over "
                          f"{dist.world_size()} process(es) gives {b_u // dist.world_size()}")
    t0 = time.perf_counter()
    model = start_model(ctx)
    t = ctx.cfg.train
    # The mixing stream is the same pool in another order with other augmentations: the
    # partner is another image. (UniMatch zips its unlabeled loader with itself, so its partner
    # is another random view of the same image: UniMatch issue 51.) Both streams are keyed on
    # the seed, so identical on all ranks. With method.mix_source=batch the step never reads
    # the mixing stream (OnlineStep.streams_at): it is kept so that the other streams' ids,
    # hence their order, stay those of the published recipe's run.
    streams = {"labeled": Stream(labeled_dataset(ctx), t.batch_size, labeled_repeat(ctx)),
               "unlabeled": Stream(_views(ctx, ctx.cfg.seed + 1), b_u),
               "mix": Stream(_views(ctx, ctx.cfg.seed + 2), b_u)}
    t = unlabeled_stage_cfg(ctx, iters_per_epoch(streams["unlabeled"], t))
    m, d = ctx.cfg.method, ctx.cfg.data
    # Only called where the recipe uses a bank (CISC with prototype_source=bank): OnlineStep decides.
    bank = labeled_bank(ctx.labeled, ctx.info.num_classes, mean=d.mean, std=d.std,
                        ignore_index=d.ignore_index, min_ratio=m.min_class_ratio,
                        amp=ctx.cfg.train.amp, device=ctx.device,
                        max_images=m.prototype_bank_images, seed=ctx.cfg.seed)
    step = OnlineStep(online_recipe(ctx), ctx.info.num_classes, m.prototype_momentum, bank)
    train_stage(out, model, streams, step, t, seed=ctx.cfg.seed, device=ctx.device,
                epoch_stream="unlabeled", meta={**ctx.meta, "stage": STAGE},
                num_workers=ctx.cfg.data.num_workers, desc=STAGE, on_epoch_end=epoch_eval_hook(ctx))
    return finish_stage(ctx, out, model, t0)


def run_online(ctx: RunContext) -> tuple[dict[str, dict[str, Any]], str]:
    """The online family's stages: one training stage; returns (summaries, final stage)."""
    return {STAGE: online_stage(ctx)}, STAGE
