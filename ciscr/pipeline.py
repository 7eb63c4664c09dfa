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
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset

from ciscr import dist
from ciscr.config import Config, TrainCfg, config_to_dict, from_dict, save_config
from ciscr.data.check import validate_samples
from ciscr.data.datasets import MixedDataset, SegDataset, UnlabeledDataset, WorkerSafeLoader
from ciscr.data.formats import DatasetInfo, Sample, load_dataset
from ciscr.data.io import read_mask
from ciscr.data.pairs import PairDataset, class_presence
from ciscr.engine.evaluate import ConfusionMatrix, eval_chunk_indices, evaluate
from ciscr.engine.steps import (
    Rectifier,
    UnlabeledLoss,
    mixed_step,
    pair_step,
    retrain_step,
    supervised_step,
)
from ciscr.engine.train import Stream, iters_per_epoch, train_stage
from ciscr.errors import ConfigError, DataError
from ciscr.models import SegOutput, build_backbone, build_model, inference_layout
from ciscr.pseudo import CONF_DIR, pseudo_label
from ciscr.selection import (
    Selection,
    class_anchors,
    class_fractions,
    compute_labeled_prototypes,
    crop_level_scores,
    distance_table,
    image_distances,
    load_bank,
    per_image_miou,
    query_eligible,
    query_lists_as,
    query_lists_cs,
    query_lists_rs,
    read_selection,
    save_bank,
    split_by_score,
    split_unlabeled_cisc,
    split_unlabeled_random,
    stability_scores,
    write_selection,
)
from ciscr.utils.io import atomic_write_json, read_json
from ciscr.utils.misc import autocast, make_grad_scaler, seed_everything
from ciscr.warmstart import (
    INIT_STAGE,
    adopts_init,
    check_init_model,
    check_init_stages,
    init_snapshots,
    resolve_init,
    start_comparison,
    warm_config,
    warm_stage_iterations,
)

log = logging.getLogger("ciscr")


@dataclass
class RunContext:
    """Everything the stages share; built once by :func:`setup_run`."""

    cfg: Config
    run_dir: Path
    device: torch.device
    info: DatasetInfo
    labeled: list[Sample]
    unlabeled: list[Sample]
    val: list[Sample]

    @property
    def background(self) -> int | None:
        """The class never picked for rectification: the config's, else the format's (VOC: 0)."""
        bg = self.cfg.data.background_class
        return bg if bg is not None else self.info.background_class

    @property
    def meta(self) -> dict[str, Any]:
        """What a checkpoint carries so that eval/predict need no dataset or config file."""
        return {
            "config": config_to_dict(self.cfg),
            "class_names": list(self.info.class_names),
            "palette": [list(c) for c in self.info.palette],
            "num_classes": self.info.num_classes,
            "mean": list(self.cfg.data.mean),
            "std": list(self.cfg.data.std),
        }


def setup_run(cfg: Config, run_dir: Path, device: torch.device) -> RunContext:
    """Load the dataset and partition, save the resolved config; refuse a changed config.

    Every check a user can fail (config, splits, weight file, every image and mask) runs here,
    before anything is trained or written, on every rank (so all ranks raise the same error).
    """
    if cfg.model.init:  # its sha256 first: a resume with another file there is refused below
        cfg = warm_config(resolve_init(cfg))
    saved = run_dir / "config.yaml"
    if saved.exists():
        check_same_config(cfg, saved)
    make_grad_scaler(device, cfg.train.amp)  # ConfigError now for fp16 off CUDA
    info, labeled, unlabeled, val = load_dataset(cfg.data, cfg.seed)
    if not labeled:
        raise DataError("the labeled split is empty: set data.labeled or data.split")
    if uses_unlabeled(cfg) and not unlabeled:
        raise DataError(
            f"the unlabeled split is empty but method.name={cfg.method.name} self-trains on "
            "unlabeled images: label fewer images (data.labeled) or use method.name=suponly"
        )
    if cfg.model.pretrained:
        build_backbone(cfg.model.backbone, cfg.model.output_stride, cfg.model.pretrained)
    if cfg.model.init:
        from ciscr.engine.checkpoint import load_checkpoint

        check_init_model(cfg, info.num_classes, load_checkpoint(cfg.model.init))
        check_init_stages(cfg)
    # The labeled set is always checked (it is small and its classes are needed); a user with a
    # huge, trusted pool may skip decoding every unlabeled / val image up front.
    groups = {"labeled": labeled}
    if cfg.data.check:
        groups.update(unlabeled=unlabeled, val=val)
    present = validate_samples(groups, info.num_classes, cfg.data.ignore_index,
                               run_dir=run_dir, progress=cfg.train.progress)
    _warn_unlabeled_classes(info, present)
    if dist.is_main():
        _remove_stale_temporaries(run_dir)
        if not saved.exists():
            save_config(cfg, saved)
    dist.barrier()
    return RunContext(cfg, run_dir, device, info, labeled, unlabeled, val)


def uses_unlabeled(cfg: Config) -> bool:
    """Whether the configured method trains on unlabeled images at all (any stage but 1)."""
    from ciscr.methods import stage_names

    return stage_names(cfg.method) != ["stage1"]


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete what a killed run left half-written (``.<name>.<random>.tmp`` files of
    ciscr.utils.io, ``.<dir>.tmp`` / ``.<dir>.old`` folders): never read, and as big as a
    checkpoint. Safe because nothing else writes into this run directory right now."""
    import shutil

    for p in sorted(run_dir.rglob(".*"), reverse=True):
        if not p.name.endswith((".tmp", ".old")):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _warn_unlabeled_classes(info: DatasetInfo, present: list[int]) -> None:
    """A class no labeled mask contains cannot be queried: its pixels get plain CE (METHOD 3)."""
    missing = [k for k in range(info.num_classes)
               if k not in present and k != info.background_class]
    if missing and dist.is_main():
        names = ", ".join(f"'{info.class_names[k]}'" for k in missing)
        log.warning("warning: class(es) %s occur in no labeled mask: they are never rectified "
                    "(plain CE on their pseudo labels) and cannot be learned from labels", names)


def check_same_config(cfg: Config, saved: Path) -> None:
    """ConfigError unless ``cfg`` is the config a run directory was made with (``saved``), up
    to the settings that do not change results."""
    import yaml

    old = yaml.safe_load(saved.read_text())
    new = config_to_dict(cfg)
    # Settings that do not change results may differ between an interrupted run and its rerun.
    for volatile in ("device", "threads", "report"):
        old.pop(volatile, None)
        new.pop(volatile, None)
    # eval.batch_size only groups validation images into forwards (same predictions up to
    # float rounding); its default changed from 1 to 8, which must not strand older runs.
    ignored = [("train", "progress"), ("train", "log_every"), ("eval", "batch_size")]
    for section, k in ignored:
        old.get(section, {}).pop(k, None)
        new.get(section, {}).pop(k, None)
    _drop_new_defaults(old, new, config_to_dict(from_dict({"method": {"name": cfg.method.name}})))
    if old != new:
        diff = _first_difference(old, new)
        raise ConfigError(
            f"{saved}: this run directory was made with a different config ({diff}); "
            "use a new --out directory or the same settings"
        )


def _drop_new_defaults(old: dict, new: dict, defaults: dict) -> None:
    """Forget keys a newer ciscr added (absent from the saved config) that hold their default:
    WHY, a run started before a setting existed used what is now its default, so it resumes."""
    for k in list(new):
        if isinstance(new[k], dict) and isinstance(old.get(k), dict):
            _drop_new_defaults(old[k], new[k], defaults.get(k, {}))
        elif k not in old and new[k] == defaults.get(k, object()):
            del new[k]


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r} -> {b!r}"


# --------------------------------------------------------------------------- building blocks


def is_done(stage_dir: Path) -> bool:
    return (stage_dir / "done.json").exists()


def mark_done(stage_dir: Path, summary: dict[str, Any]) -> None:
    if dist.is_main():
        atomic_write_json(stage_dir / "done.json", summary)
    dist.barrier()


def fresh_model(ctx: RunContext) -> nn.Module:
    """Every stage starts from the same initialisation (same seed, same pretrained weights)."""
    seed_everything(ctx.cfg.seed, ctx.cfg.deterministic)
    return build_model(ctx.cfg.model, ctx.info.num_classes).to(ctx.device)


def start_model(ctx: RunContext) -> nn.Module:
    """The model a trained-from-scratch stage starts from: ``fresh_model``, or the weights of
    ``model.init`` (a run improving a model the user already has)."""
    model = fresh_model(ctx)
    if ctx.cfg.model.init:
        from ciscr.engine.checkpoint import load_checkpoint

        model.load_state_dict(load_checkpoint(ctx.cfg.model.init)["model"])
    return model


def stage_start_model(ctx: RunContext, previous: Path) -> nn.Module:
    """A retraining stage's starting point: ImageNet init (``method.init=fresh``, the paper)
    or the previous stage's final model (``previous``, ours)."""
    model = fresh_model(ctx)
    if ctx.cfg.method.init == "previous":
        from ciscr.engine.checkpoint import load_checkpoint

        model.load_state_dict(load_checkpoint(previous / "checkpoint.pt")["model"])
    return model


def load_stage_model(ctx: RunContext, stage_dir: Path) -> nn.Module:
    """The last checkpoint of a stage, in eval mode."""
    return load_model_file(ctx, stage_dir / "checkpoint.pt")


def load_model_file(ctx: RunContext, path: Path) -> nn.Module:
    from ciscr.engine.checkpoint import load_checkpoint

    model = build_model(ctx.cfg.model.model_copy(update={"pretrained": ""}), ctx.info.num_classes)
    model.load_state_dict(load_checkpoint(path)["model"])
    return inference_layout(model.to(ctx.device).eval(), ctx.cfg.train.infer_channels_last)


def labeled_dataset(ctx: RunContext, train: bool = True, repeat: int = 1) -> SegDataset:
    d, t = ctx.cfg.data, ctx.cfg.train
    return SegDataset(
        ctx.labeled, num_classes=ctx.info.num_classes, ignore_index=d.ignore_index,
        mean=d.mean, std=d.std, train=train, crop_size=t.crop_size,
        scale_range=t.scale_range, seed=ctx.cfg.seed, repeat=repeat,
    )


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


def labeled_repeat(ctx: RunContext) -> int:
    return 2 if len(ctx.labeled) < ctx.cfg.train.repeat_small_labeled else 1


def evaluate_model(ctx: RunContext, model: nn.Module) -> dict[str, Any]:
    """mIoU on the validation split (whole / sliding / multi-scale per ``cfg.eval``). A model
    in training is evaluated through a copy in the inference layout, so that its own layout
    (and so its training) is untouched."""
    d = ctx.cfg.data
    if ctx.cfg.train.infer_channels_last and model.training:
        model = copy.deepcopy(model)
    model = inference_layout(model, ctx.cfg.train.infer_channels_last)
    val = ctx.val[: d.max_val_images] if d.max_val_images else ctx.val
    ds = SegDataset(val, num_classes=ctx.info.num_classes, ignore_index=d.ignore_index,
                    mean=d.mean, std=d.std, train=False, crop_size=ctx.cfg.train.crop_size,
                    scale_range=(1.0, 1.0), seed=0)
    # whole chunks of eval.batch_size images per rank, no padding duplicates (evaluate batches them)
    idx = eval_chunk_indices(len(ds), ctx.cfg.eval.batch_size, dist.rank(), dist.world_size())
    loader = WorkerSafeLoader(torch.utils.data.Subset(ds, idx), batch_size=1,
                              num_workers=d.num_workers)
    metrics = evaluate(model, loader, ctx.info.num_classes, ctx.cfg.eval, ctx.device,
                       amp=ctx.cfg.train.amp, ignore_index=d.ignore_index,
                       progress=ctx.cfg.train.progress, crop_size=ctx.cfg.train.crop_size)
    metrics["class_names"] = list(ctx.info.class_names)
    return metrics


def score_labels(ctx: RunContext, label_dir: Path, samples: list[Sample]) -> dict[str, Any] | None:
    """mIoU of a pseudo-label set against the ground truth of those images, if it exists.

    Only for reporting (paper Table 5 / Fig. 10): never used for training or selection.
    """
    scored = [s for s in samples if s.mask is not None]
    if not scored:
        return None
    k, ign = ctx.info.num_classes, ctx.cfg.data.ignore_index
    cm = ConfusionMatrix(k, torch.device("cpu"))
    for s in scored:
        gt = torch.tensor(read_mask(s.mask, k, ign)).long()  # copies: read masks are read-only
        pred = torch.tensor(read_mask(label_dir / f"{s.id}.png", k, ign)).long()
        cm.update(pred, gt)
    out = cm.compute()
    out["num_images"] = len(scored)
    return out


# --------------------------------------------------------------------------- stages


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


def evaluate_init(ctx: RunContext) -> dict[str, Any] | None:
    """The supervised start of a run that trains on from ``model.init`` (online methods,
    SupOnly continued), evaluated once into ``init/``: what the result is compared with."""
    if not ctx.cfg.model.init or adopts_init(ctx.cfg):
        return None
    out = ctx.run_dir / INIT_STAGE
    if is_done(out):
        return read_json(out / "done.json")
    t0 = time.perf_counter()
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_model(ctx, load_model_file(ctx, Path(ctx.cfg.model.init)))
    if dist.is_main():
        atomic_write_json(out / "metrics.json", metrics)
    summary = {"val_miou": metrics["miou"], "checkpoint": ctx.cfg.model.init,
               "sha256": ctx.cfg.model.init_sha256,
               "wall_seconds": round(time.perf_counter() - t0, 1)}
    mark_done(out, summary)
    log.info("init: val mIoU %.2f (%s)", 100 * metrics["miou"], ctx.cfg.model.init)
    return summary


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


def epoch_eval_hook(ctx: RunContext):
    """The per-epoch validation hook of ``train.eval_every_epochs`` (logged, never used to
    select anything), or None when it is off."""
    every = ctx.cfg.train.eval_every_epochs
    if not every:
        return None

    def hook(model: nn.Module, epoch: int) -> dict[str, float]:
        if epoch % every:
            return {}
        return {"val_miou": evaluate_model(ctx, model)["miou"]}

    return hook


def finish_stage(ctx: RunContext, out: Path, model: nn.Module, t0: float) -> dict[str, Any]:
    """Evaluate a trained stage's model, write ``metrics.json`` and mark the stage done."""
    t_eval = time.perf_counter()
    metrics = evaluate_model(ctx, model)
    t_end = time.perf_counter()
    if dist.is_main():
        atomic_write_json(out / "metrics.json", metrics)
    # Wall time of the invocation that finished the stage (a resumed stage counts only its
    # last part), training and evaluation included.
    summary = {"val_miou": metrics["miou"], "checkpoint": str(out / "checkpoint.pt"),
               "wall_seconds": round(t_end - t0, 1),
               "eval_seconds": round(t_end - t_eval, 2)}  # the final evaluation alone
    mark_done(out, summary)
    log.info("%s: val mIoU %.2f", out.name, 100 * metrics["miou"])
    return summary


def pseudo_stage(ctx: RunContext, name: str, model_dir: Path, samples: list[Sample]) -> Path:
    """TTA pseudo labels of ``samples`` by the model of ``model_dir`` -> ``<name>/labels``."""
    out = ctx.run_dir / name
    labels = out / "labels"
    if is_done(out):
        return labels
    m, d = ctx.cfg.method, ctx.cfg.data
    t0 = time.perf_counter()
    model = load_stage_model(ctx, model_dir)
    quality = pseudo_label(
        model, samples, labels, num_classes=ctx.info.num_classes, mean=d.mean, std=d.std,
        scales=m.tta_scales, flip=m.tta_flip, device=ctx.device, amp=ctx.cfg.train.amp,
        palette=[tuple(c) for c in ctx.info.palette], progress=ctx.cfg.train.progress,
        score=True, ignore_index=d.ignore_index, confidence=True,
    )
    if dist.is_main():
        atomic_write_json(out / "quality.json", quality)
    mark_done(out, {"num_images": len(samples), "pseudo_miou": quality.get("miou"),
                    "wall_seconds": round(time.perf_counter() - t0, 2)})
    score = quality.get("miou")
    log.info("%s: %d images pseudo-labelled%s", name, len(samples),
             "" if score is None else f", pseudo-label mIoU {100 * score:.2f} (vs ground truth)")
    return labels


def _eval_kwargs(ctx: RunContext) -> dict[str, Any]:
    d = ctx.cfg.data
    return {"num_classes": ctx.info.num_classes, "mean": d.mean, "std": d.std,
            "device": ctx.device, "amp": ctx.cfg.train.amp, "ignore_index": d.ignore_index}


def selection_stage(ctx: RunContext, pseudo0: Path) -> Selection:
    """Algorithm 1 with M0: per-class query lists and the reliable / unreliable halves."""
    out = ctx.run_dir / "selection"
    lab_ids, unl_ids = [s.id for s in ctx.labeled], [s.id for s in ctx.unlabeled]
    if is_done(out):
        return read_selection(out, labeled_ids=lab_ids, unlabeled_ids=unl_ids)
    t0 = time.perf_counter()
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
                    "wall_seconds": round(time.perf_counter() - t0, 2)})
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


def stage1_iterations(ctx: RunContext) -> int:
    """Iterations of the labeled-only stage 1 (SupOnly's budget): ``train.epochs`` passes over
    the labeled list (repeated when small), B images per step."""
    t = ctx.cfg.train
    labeled = Stream(labeled_dataset(ctx), t.batch_size, labeled_repeat(ctx))
    return iters_per_epoch(labeled, t) * t.epochs


def unlabeled_stage_cfg(ctx: RunContext, per_epoch: int,
                        labeled_per_epoch: int | None = None) -> TrainCfg:
    """The optimisation settings of a stage that trains on unlabeled images, whose epoch (one
    pass over its own list) is ``per_epoch`` iterations showing ``labeled_per_epoch`` labeled
    images (None: a labeled stream of B images every step): ``train.unlabeled_epochs`` epochs
    (0 = ``train.epochs``), raised where needed so that the stage shows the labeled images at
    least as many times as stage 1 did (stage 1's iterations x B).

    WHY the floor: such a stage trains a model (fresh, for the stage-wise family) with labeled
    images alongside. Showing them fewer times than stage 1, it loses to the SupOnly it is
    compared with for that reason alone while SupOnly still gains from a longer budget
    (CamVid at 1/8: UniMatch and CISC-R's stage 3 at 615 iterations vs SupOnly's 960; ST++'s
    stage 2 at stage 1's iterations, about half of each batch labeled, ended below its own
    stage 1: docs/results/camvid_superseded_2026-11-30.md).
    ST++ and UniMatch never train shorter than their supervised baseline either: at equal
    epochs their lists show the labeled images more often than the supervised stage does.
    An explicit ``train.iters_per_epoch`` is taken as given."""
    t = ctx.cfg.train
    if ctx.cfg.model.init and not t.iters_per_epoch:
        return warm_stage_cfg(ctx, per_epoch)
    epochs = t.unlabeled_epochs or t.epochs
    if not t.iters_per_epoch:
        per_epoch_labeled = labeled_per_epoch or per_epoch * t.batch_size
        epochs = max(epochs, math.ceil(stage1_iterations(ctx) * t.batch_size / per_epoch_labeled))
    return t.model_copy(update={"epochs": epochs})


def warm_stage_cfg(ctx: RunContext, per_epoch: int) -> TrainCfg:
    """A stage of a run started from ``model.init``: the run's T iterations (``train.epochs``
    passes over the labeled list, what SupOnly continued trains) shared by the stages that
    train, so every method spends the control's number of steps (retrain=two: T/2 each)."""
    n = 2 if ctx.cfg.method.retrain == "two" else 1
    epochs, ipe = warm_stage_iterations(stage1_iterations(ctx), n, per_epoch)
    return ctx.cfg.train.model_copy(update={"epochs": epochs, "iters_per_epoch": ipe})


def unlabeled_loss(ctx: RunContext, total_iters: int) -> UnlabeledLoss:
    m = ctx.cfg.method
    return UnlabeledLoss(weight=m.unlabeled_weight,
                         rampup_iters=round(m.unlabeled_rampup * total_iters),
                         threshold=m.confidence_threshold, by_confidence=m.confidence_weighting)


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
    inputs = retrain_inputs(ctx, sel, pseudo0)
    stages["stage2"] = retrain_stage(ctx, "stage2", *inputs["stage2"], rect)
    if m.retrain == "one":
        return stages, "stage2"
    by_id = {s.id: s for s in ctx.unlabeled}
    unrel = [by_id[i] for i in sel.unreliable]
    pseudo1 = pseudo_stage(ctx, "pseudo1", rd / "stage2", unrel) if unrel else pseudo0
    inputs = retrain_inputs(ctx, sel, pseudo0, pseudo1)
    stages["stage3"] = retrain_stage(ctx, "stage3", *inputs["stage3"], rect)
    return stages, "stage3"


def finish_run(ctx: RunContext, stages: dict[str, dict[str, Any]], final: str) -> dict[str, Any]:
    """Score the final model's labels of the unlabeled pool (where ground truth exists) and
    write ``results.json``: the same ending for every method."""
    m, rd = ctx.cfg.method, ctx.run_dir
    if m.score_final_pseudo and any(s.mask is not None for s in ctx.unlabeled):
        pseudo_stage(ctx, "pseudo_final", rd / final, ctx.unlabeled)
        stages["pseudo_final"] = read_json(rd / "pseudo_final" / "done.json")
    final_metrics = read_json(rd / final / "metrics.json")
    results = {
        "method": m.name, "final_stage": final, "stages": stages, "run_dir": str(rd),
        "final_metrics": final_metrics,
        **start_comparison(rd, ctx.cfg, final, final_metrics["miou"]),
    }
    if results.get("warning") and dist.is_main():
        log.warning("warning: %s", results["warning"])
    if dist.is_main():
        atomic_write_json(rd / "results.json", results)
    return results
