"""Starting a run from a model you already have (``model.init``): the checks a user can fail,
run before anything is trained or written, and the "did the unlabeled images help?" verdict.

What ``model.init`` means for each family (``ciscr.pipeline`` / ``ciscr.online`` act on it):

- online methods (FixMatch, UniMatch, UniMatch + CISC) train from the checkpoint;
- stage-wise methods with later stages (ST, ST++, CISC-R) take it AS their stage 1: no stage-1
  training, pseudo labels and selection from it, stages 2/3 warm (``method.init=previous``
  unless the user sets ``fresh``); ST++'s stability snapshots come from the checkpoint's own
  folder (a SupOnly or ST++ stage 1 keeps them);
- SupOnly (stage 1 only) trains on from it: the control of a warm start, the same model trained
  on for the same number of steps with labeled images alone.

Budget: ``train.epochs`` passes over the labeled list define the run's T iterations; the stages
that train after the init share them (``warm_stage_iterations``), so every method spends the same
number of steps as the control.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ciscr.config import Config
from ciscr.errors import ConfigError
from ciscr.utils.io import file_sha256

INIT_STAGE = "init"  # folder holding the evaluation of the start (online methods, SupOnly)


def resolve_init(cfg: Config) -> Config:
    """``cfg`` with ``model.init_sha256`` filled in from the file (or checked against the one
    given): the saved config then names the exact file, and a resume with another file at that
    path is refused by the config check. ConfigError for a missing file."""
    path = Path(cfg.model.init)
    if not path.is_file():
        from ciscr.config import path_hint

        raise ConfigError(f"model.init: {path}: checkpoint not found (a ciscr checkpoint.pt, "
                          f"e.g. RUN/stage1/checkpoint.pt){path_hint('model.init', path)}")
    digest = file_sha256(path)
    if cfg.model.init_sha256 and cfg.model.init_sha256 != digest:
        raise ConfigError(f"model.init: {path} has sha256 {digest[:12]}..., not the "
                          f"model.init_sha256 {cfg.model.init_sha256[:12]}... this run asks for")
    model = cfg.model.model_copy(update={"init_sha256": digest})
    return cfg.model_copy(update={"model": model})


def warm_config(cfg: Config) -> Config:
    """The settings a run from ``model.init`` trains with: ``train.warm_epochs`` /
    ``train.warm_lr`` (when set) as its ``train.epochs`` / ``train.lr``, so that one config file
    holds both the base (trained from ImageNet) and the runs that start from it."""
    t = cfg.train
    if not cfg.model.init or not (t.warm_epochs or t.warm_lr):
        return cfg
    train = t.model_copy(update={"epochs": t.warm_epochs or t.epochs, "lr": t.warm_lr or t.lr,
                                 "warm_epochs": 0, "warm_lr": 0.0})
    return cfg.model_copy(update={"train": train})


def adopts_init(cfg: Config) -> bool:
    """Whether the init checkpoint IS the run's stage 1 (stage-wise methods with later stages;
    the online presets and SupOnly have ``retrain=none``)."""
    return bool(cfg.model.init) and cfg.method.retrain != "none"


def check_init_model(cfg: Config, num_classes: int, state: dict[str, Any]) -> None:
    """ConfigError unless the checkpoint ``state`` (load_checkpoint's dict) holds a model this
    run can load: the same backbone, decoder width and number of classes."""
    meta = state.get("meta") or {}
    saved = (meta.get("config") or {}).get("model") or {}
    have = (saved.get("backbone"), saved.get("channels"), meta.get("num_classes"))
    want = (cfg.model.backbone, cfg.model.channels, num_classes)
    if None in have:
        raise ConfigError(f"model.init: {cfg.model.init} carries no model description (not a "
                          "checkpoint of a ciscr training stage)")
    if have != want:
        raise ConfigError(
            f"model.init: {cfg.model.init} is a {have[0]} model (channels {have[1]}, "
            f"{have[2]} classes) but this run builds {want[0]} (channels {want[1]}, "
            f"{want[2]} classes): set model.backbone / model.channels to the checkpoint's, or "
            "use a checkpoint of this dataset")


def init_snapshots(cfg: Config) -> list[Path]:
    """ST++'s stage-1 snapshots kept beside the init checkpoint (its own run's stage 1)."""
    return sorted(Path(cfg.model.init).parent.glob("snapshot_*.pt"))


def check_init_stages(cfg: Config) -> None:
    """ConfigError when the method needs what the init's run did not keep (ST++'s stability
    selection needs the stage-1 snapshots)."""
    if not (adopts_init(cfg) and cfg.method.selection == "stpp" and cfg.method.retrain == "two"):
        return
    if not init_snapshots(cfg):
        folder = Path(cfg.model.init).parent
        raise ConfigError(
            f"model.init: ST++'s selection (method.selection=stpp) needs the stage-1 snapshots "
            f"of the init's own run, and {folder} has no snapshot_*.pt: use a checkpoint from "
            "RUN/stage1 of a SupOnly or ST++ run (their stage 1 keeps them), or "
            "method.selection=cisc")


def warm_stage_iterations(total: int, num_stages: int, per_epoch: int) -> tuple[int, int]:
    """(epochs, iterations per epoch) of one of ``num_stages`` stages sharing ``total``
    iterations, epochs as close to the stage's natural length ``per_epoch`` as the share allows.

    >>> warm_stage_iterations(600, 2, 41)
    (8, 38)
    """
    share = math.ceil(total / num_stages)
    epochs = max(1, math.ceil(share / per_epoch))
    return epochs, math.ceil(share / epochs)


def start_metrics(run_dir: Path, final: str) -> tuple[str, float] | None:
    """(stage, val mIoU) of the run's own supervised start: the evaluated init checkpoint, else
    stage 1 of a stage-wise run whose result is a later stage; None without one."""
    for stage in (INIT_STAGE, "stage1"):
        path = run_dir / stage / "metrics.json"
        if stage != final and path.exists():
            return stage, float(json.loads(path.read_text())["miou"])
    return None


def regression_causes(run_dir: Path, cfg: Config, final: str) -> list[str]:
    """What the run's own artefacts show that can pull a semi-supervised result below its
    supervised start: weak pseudo labels, few confident pixels, stages restarted from ImageNet,
    stages shorter than stage 1. Observations, not a diagnosis."""
    causes: list[str] = []
    quality = run_dir / "pseudo0" / "quality.json"
    start = start_metrics(run_dir, final)
    if quality.exists() and start is not None:
        pl = json.loads(quality.read_text()).get("miou")
        if pl is not None:
            causes.append(f"the start's pseudo labels score {100 * pl:.1f} mIoU on the unlabeled "
                          "images' ground truth: their errors are trained on")
    ratio = _last_logged(run_dir / final / "train.jsonl", "mask_ratio")
    if ratio is not None and ratio < 0.5:
        causes.append(f"only {100 * ratio:.0f}% of unlabeled pixels passed "
                      f"method.confidence_threshold={cfg.method.confidence_threshold} at the end")
    if cfg.method.retrain != "none" and cfg.method.init == "fresh":
        causes.append("stages 2/3 restart from ImageNet (method.init=fresh) and relearn what "
                      "stage 1 knew; method.init=previous keeps it")
    if cfg.model.init:
        causes.append(f"training on a trained model restarts at learning rate {cfg.train.lr} "
                      "(train.warm_lr, else train.lr)")
    return causes


def _last_logged(path: Path, key: str) -> float | None:
    if not path.exists():
        return None
    value = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in rec:
            value = float(rec[key])
    return value


def init_budget(path: str | Path) -> dict[str, Any]:
    """What the checkpoint at ``path`` was trained with: ``iterations`` (its stage's, from the
    checkpoint) and ``lr`` (its config's ``train.lr``); None where it does not say."""
    from ciscr.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    train = ((ckpt.get("meta") or {}).get("config") or {}).get("train") or {}
    return {"iterations": ckpt.get("iteration"), "lr": train.get("lr")}


def _start_budget(run_dir: Path, cfg: Config, stage: str) -> dict[str, Any]:
    if stage == INIT_STAGE:
        return init_budget(cfg.model.init)
    done = run_dir / stage / "done.json"
    iters = json.loads(done.read_text()).get("iterations") if done.exists() else None
    return {"iterations": iters, "lr": cfg.train.lr}


def start_comparison(run_dir: Path, cfg: Config, final: str, final_miou: float) -> dict[str, Any]:
    """results.json's verdict: the final model against its own supervised start (with the
    start's training budget), and when it lost, a warning with the causes
    :func:`regression_causes` can see ({} without a start)."""
    start = start_metrics(run_dir, final)
    if start is None:
        return {}
    stage, miou = start
    out: dict[str, Any] = {"start": {"stage": stage, "val_miou": miou,
                                     **_start_budget(run_dir, cfg, stage)},
                           "gain_over_start": final_miou - miou}
    if final_miou < miou:
        causes = regression_causes(run_dir, cfg, final)
        out["warning"] = (f"the result ({100 * final_miou:.2f}) is below its own supervised start "
                          f"({stage}: {100 * miou:.2f}): the unlabeled images did not help"
                          + (f"; seen: {'; '.join(causes)}" if causes else ""))
    return out


def _budget_words(b: dict[str, Any] | None) -> str:
    if not b or b.get("iterations") is None:
        return "unknown iterations"
    lr = f" at lr {b['lr']:g}" if isinstance(b.get("lr"), (int, float)) else ""
    return f"{b['iterations']} iterations{lr}"


def format_comparison(results: dict[str, Any]) -> str | None:
    """Console lines: final vs start, the budgets of both, and what the difference is NOT
    (a gain over a control) with how to get the one that is (None without a start)."""
    start = results.get("start")
    if not start:
        return None
    final = results["final_metrics"]["miou"]
    init = start["stage"] == INIT_STAGE
    lines = [f"vs its supervised start ({start['stage']}): {100 * start['val_miou']:.2f} -> "
             f"{100 * final:.2f} ({100 * results['gain_over_start']:+.2f} mIoU); this run: "
             f"{_budget_words(results.get('budget'))}, the start: {_budget_words(start)}"]
    if results.get("method") == "suponly":
        lines.append("note: this SupOnly run is the control for semi-supervised runs from the "
                     "same model.init: `ciscr compare THIS_RUN OTHER_RUN` pairs them")
    else:
        same = " from the same model.init" if init else ""
        lines.append("note: a gain over the start is not a gain over a control: train the "
                     f"control, method.name=suponly{same} for as many iterations on the same "
                     "labeled images, then `ciscr compare CONTROL_RUN THIS_RUN`")
    return "\n".join(lines)
