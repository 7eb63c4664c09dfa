"""The run services both method families use (stage-wise ``ciscr.pipeline``, online
``ciscr.online``), and the ending every method shares.

:class:`RunContext` (the config, device, dataset lists of a run), stage bookkeeping
(``is_done`` / ``mark_done``), models (``fresh_model``, ``start_model``, ``load_stage_model``),
the labeled dataset, evaluation (``evaluate_model``, the per-epoch hook, ``finish_stage``),
pseudo-labelling a sample list (``pseudo_stage``), the iteration budget of a stage on unlabeled
images (``unlabeled_stage_cfg``), the ``model.init`` start and ``finish_run`` (results.json).

WHY here: the families are peers. Each imports this module and neither imports the other, so
a new method family (or a method in a test file) builds on these and nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ciscr import dist
from ciscr.config import Config, TrainCfg, config_to_dict
from ciscr.data.datasets import SegDataset, WorkerSafeLoader
from ciscr.data.formats import DatasetInfo, Sample
from ciscr.data.io import read_mask
from ciscr.engine.evaluate import ConfusionMatrix, eval_chunk_indices, evaluate
from ciscr.engine.train import Stream, iters_per_epoch
from ciscr.models import build_model, inference_layout
from ciscr.pseudo import pseudo_label
from ciscr.utils.io import atomic_write_json, read_json, read_jsonl
from ciscr.utils.misc import seed_everything
from ciscr.warmstart import (
    INIT_STAGE,
    adopts_init,
    start_comparison,
    warm_stage_iterations,
)

log = logging.getLogger("ciscr")


@dataclass
class RunContext:
    """Everything the stages share; built once by :func:`ciscr.run_setup.setup_run`."""

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


def _eval_kwargs(ctx: RunContext) -> dict[str, Any]:
    d = ctx.cfg.data
    return {"num_classes": ctx.info.num_classes, "mean": d.mean, "std": d.std,
            "device": ctx.device, "amp": ctx.cfg.train.amp, "ignore_index": d.ignore_index}


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
    t_eval, c_eval = time.perf_counter(), time.process_time()
    metrics = evaluate_model(ctx, model)
    t_end = time.perf_counter()
    if dist.is_main():
        atomic_write_json(out / "metrics.json", metrics)
    spent = stage_spent(out)
    # wall_seconds: the invocation that finished the stage (a resumed stage counts only its
    # last part), training and evaluation included. cpu_seconds / stage_wall_seconds: the
    # whole stage, its training summed over the invocations that ran it (the checkpoint keeps
    # the sum up to itself), plus the final evaluation; CPU time of this process.
    summary = {"val_miou": metrics["miou"], "checkpoint": str(out / "checkpoint.pt"),
               "iterations": spent["iteration"],
               "wall_seconds": round(t_end - t0, 1),
               "cpu_seconds": round(spent["cpu"] + time.process_time() - c_eval, 1),
               "stage_wall_seconds": round(spent["wall"] + t_end - t_eval, 1),
               "eval_seconds": round(t_end - t_eval, 2)}  # the final evaluation alone
    mark_done(out, summary)
    log.info("%s: val mIoU %.2f", out.name, 100 * metrics["miou"])
    return summary


def stage_spent(stage_dir: Path) -> dict[str, Any]:
    """A training stage's iterations and the CPU / wall seconds its training took, from its
    checkpoint (zeros for a stage that trained nothing, e.g. stage 1 taken from model.init)."""
    from ciscr.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(stage_dir / "checkpoint.pt")
    spent = ckpt.get("spent") or {}
    return {"iteration": int(ckpt.get("iteration") or 0), "cpu": float(spent.get("cpu", 0.0)),
            "wall": float(spent.get("wall", 0.0))}


def logged_iterations(stage_dir: Path) -> int:
    """The last iteration a stage's ``train.jsonl`` logged (0 without one)."""
    path = stage_dir / "train.jsonl"
    return max((int(r.get("iteration", 0)) for r in read_jsonl(path)), default=0) \
        if path.exists() else 0


def pseudo_stage(ctx: RunContext, name: str, model_dir: Path, samples: list[Sample]) -> Path:
    """TTA pseudo labels of ``samples`` by the model of ``model_dir`` -> ``<name>/labels``."""
    out = ctx.run_dir / name
    labels = out / "labels"
    if is_done(out):
        return labels
    m, d = ctx.cfg.method, ctx.cfg.data
    t0, c0 = time.perf_counter(), time.process_time()
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
                    "wall_seconds": round(time.perf_counter() - t0, 2),
                    "cpu_seconds": round(time.process_time() - c0, 2)})
    score = quality.get("miou")
    log.info("%s: %d images pseudo-labelled%s", name, len(samples),
             "" if score is None else f", pseudo-label mIoU {100 * score:.2f} (vs ground truth)")
    return labels


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


def evaluate_init(ctx: RunContext) -> dict[str, Any] | None:
    """The supervised start of a run that trains on from ``model.init`` (online methods,
    SupOnly continued), evaluated once into ``init/``: what the result is compared with."""
    if not ctx.cfg.model.init or adopts_init(ctx.cfg):
        return None
    out = ctx.run_dir / INIT_STAGE
    if is_done(out):
        return read_json(out / "done.json")
    t0, c0 = time.perf_counter(), time.process_time()
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_model(ctx, load_model_file(ctx, Path(ctx.cfg.model.init)))
    if dist.is_main():
        atomic_write_json(out / "metrics.json", metrics)
    summary = {"val_miou": metrics["miou"], "checkpoint": ctx.cfg.model.init,
               "sha256": ctx.cfg.model.init_sha256,
               "wall_seconds": round(time.perf_counter() - t0, 1),
               "cpu_seconds": round(time.process_time() - c0, 1)}
    mark_done(out, summary)
    log.info("init: val mIoU %.2f (%s)", 100 * metrics["miou"], ctx.cfg.model.init)
    return summary


def finish_run(ctx: RunContext, stages: dict[str, dict[str, Any]], final: str) -> dict[str, Any]:
    """Score the final model's labels of the unlabeled pool (where ground truth exists) and
    write ``results.json``: the same ending for every method."""
    m, rd = ctx.cfg.method, ctx.run_dir
    if m.score_final_pseudo and any(s.mask is not None for s in ctx.unlabeled):
        if not is_done(rd / "pseudo_final"):
            log.info("pseudo_final: labelling the %d unlabeled images with the final model to "
                     "score its pseudo labels against their masks (a diagnostic in the report, "
                     "no training; method.score_final_pseudo=false skips it)", len(ctx.unlabeled))
        pseudo_stage(ctx, "pseudo_final", rd / final, ctx.unlabeled)
        stages["pseudo_final"] = read_json(rd / "pseudo_final" / "done.json")
    final_metrics = read_json(rd / final / "metrics.json")
    results = {
        "method": m.name, "final_stage": final, "stages": stages, "run_dir": str(rd),
        "final_metrics": final_metrics, **run_record(ctx, stages),
        **start_comparison(rd, ctx.cfg, final, final_metrics["miou"]),
    }
    if results.get("warning") and dist.is_main():
        log.warning("warning: %s", results["warning"])
    if dist.is_main():
        atomic_write_json(rd / "results.json", results)
    return results


def run_record(ctx: RunContext, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What ``ciscr compare`` needs to say whether two runs compare and what each cost: the
    training budget, which images (hashes of the id lists), the machine and precision, and the
    CPU / wall seconds summed over the stages (CPU: this process; see finish_stage)."""
    from ciscr.utils.misc import cpu_model_name, precision_name, resolve_amp

    def ids_hash(samples: list[Sample]) -> str:
        return hashlib.sha256("\n".join(sorted(s.id for s in samples)).encode()).hexdigest()[:16]

    d = ctx.cfg.data
    amp = resolve_amp(ctx.cfg.train.amp, ctx.device)
    return {
        "budget": {"iterations": sum(int(s.get("iterations", 0)) for s in stages.values()),
                   "lr": ctx.cfg.train.lr},
        "data": {"format": d.format, "root": str(Path(d.root).expanduser().resolve())
                 if d.root else "", "labeled": len(ctx.labeled),
                 "unlabeled": len(ctx.unlabeled), "val": len(ctx.val),
                 "labeled_ids_sha256": ids_hash(ctx.labeled), "val_ids_sha256": ids_hash(ctx.val)},
        "machine": {"device": str(ctx.device), "cpu": cpu_model_name(),
                    "precision": precision_name(amp),
                    "threads": torch.get_num_threads(), "processes": dist.world_size()},
        "cpu_seconds": _total(stages, "cpu_seconds"),
        "wall_seconds": _total(stages, "stage_wall_seconds", "wall_seconds"),
    }


def _total(stages: dict[str, dict[str, Any]], *keys: str) -> float | None:
    """The sum over stages of the first of ``keys`` each has (None when one has none: a stage
    finished by an older ciscr that did not record it)."""
    total = 0.0
    for s in stages.values():
        value = next((s[k] for k in keys if s.get(k) is not None), None)
        if value is None:
            return None
        total += float(value)
    return round(total, 1)
