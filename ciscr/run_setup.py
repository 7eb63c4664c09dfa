"""Setting up a run directory: load and check the dataset, save the resolved config, and
refuse a rerun whose config differs (``setup_run`` -> :class:`~ciscr.run_services.RunContext`).

It sits above the method registry (:mod:`ciscr.methods`: whether the configured method trains
on unlabeled images at all) and below the commands (``ciscr train/run``, bench, profile).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ciscr import dist
from ciscr.config import Config, config_to_dict, from_dict, save_config
from ciscr.data.check import validate_samples
from ciscr.data.formats import DatasetInfo, load_dataset
from ciscr.errors import ConfigError, DataError
from ciscr.models import build_backbone
from ciscr.run_services import RunContext
from ciscr.utils.misc import make_grad_scaler
from ciscr.warmstart import (
    check_init_model,
    check_init_stages,
    resolve_init,
    warm_config,
)

log = logging.getLogger("ciscr")


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
