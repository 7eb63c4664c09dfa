"""What the CLI commands do, as plain functions (usable from Python too)."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ciscr import dist
from ciscr.config import Config, from_dict
from ciscr.errors import CheckpointError, CiscrError, ConfigError
from ciscr.utils.io import atomic_write_json, check_writable_dir

if TYPE_CHECKING:
    from ciscr.run_services import RunContext

log = logging.getLogger("ciscr")


def _check_batch(cfg: Config, world: int) -> None:
    # BatchNorm in the ASPP pooling branch sees a 1x1 map: it needs >= 2 images per process.
    per_rank = cfg.train.batch_size // world
    if per_rank < 2:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} gives {per_rank} image(s) per process "
            f"with {world} process(es); BatchNorm needs at least 2"
        )


# Fail early (before any training) if the run directory cannot be written.
check_writable = check_writable_dir


def run_training(cfg: Config, out: Path) -> dict[str, Any]:
    """``ciscr train`` / ``ciscr run``: every stage the method needs, resumable."""
    from ciscr.methods import run_method
    from ciscr.run_setup import setup_run

    info = dist.init_distributed(cfg.device)
    if not dist.is_main():
        logging.getLogger("ciscr").setLevel(logging.ERROR)  # rank 0 alone logs and warns
    created = _first_missing(out)  # what check_writable creates: removed again on bad input
    lock, setup_failed = None, False
    try:
        _check_batch(cfg, info.world_size)
        problem = None
        if dist.is_main():
            try:
                check_writable(out)
                lock = lock_run_dir(out)
            except ConfigError as err:
                problem = str(err)
        # Every rank raises the same error (a rank left waiting in a collective would hang).
        problem = dist.broadcast_object(problem)
        if problem:
            raise ConfigError(problem)
        threads_how = _set_threads(cfg.threads)
        _debug_config(cfg)
        if dist.is_main():
            _warn_at_start(cfg, info.device)
        resumed = (out / "config.yaml").exists()  # setup_run writes it for a new run
        try:
            ctx = setup_run(cfg, out, info.device)
        except CiscrError:
            setup_failed = True
            raise
        if dist.is_main():
            log.info(run_summary(ctx, resumed, threads_how))
            _warn_labeled_fraction(ctx)
            log.debug(data_counts(ctx.labeled, ctx.unlabeled, ctx.val))
        results = run_method(ctx)
        if dist.is_main():
            print(format_results(results, list(ctx.info.class_names)))
            if cfg.report:
                _write_report(out)
        return results
    finally:
        unlock_run_dir(lock)
        if setup_failed:
            _remove_if_empty(out, created)  # bad input leaves no trace, not even runs/
        dist.cleanup()


def lock_run_dir(out: Path):
    """An exclusive lock on ``out/.lock`` for the life of the run (POSIX ``flock``).

    Two processes training into one run directory would overwrite each other's checkpoints;
    the lock turns that into a clear error. It disappears with the process, even on SIGKILL.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; run directories are simply not locked there
        return None
    f = open(out / ".lock", "a+")  # noqa: SIM115 - held open until unlock_run_dir
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(
            f"--out {out}: another ciscr process is already running in this run directory; "
            "wait for it to finish (then rerun to resume) or choose another --out"
        ) from None
    return f


def unlock_run_dir(lock) -> None:
    if lock is None:
        return
    import fcntl

    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()
    Path(lock.name).unlink(missing_ok=True)


def _first_missing(out: Path) -> Path | None:
    """The outermost folder of ``out`` that does not exist yet (``runs`` for a new
    ``runs/a/b``), or None when ``out`` exists."""
    missing = None
    for p in (out, *out.absolute().parents):
        if p.exists():
            break
        missing = p
    return missing


def _remove_if_empty(out: Path, created: Path | None) -> None:
    """Remove the folders this run created, from ``out`` up to ``created``, while empty."""
    if created is None or not dist.is_main():
        return
    for p in (out.absolute(), *out.absolute().parents):
        try:
            p.rmdir()  # only succeeds while the folder is empty
        except OSError:
            return
        if p == created.absolute():
            return


def _write_report(out: Path) -> None:
    """report.html at the end of every run; a report problem never fails a finished run."""
    from ciscr.report import write_report

    try:
        print(f"report: {write_report(out)}")
    except Exception as err:  # noqa: BLE001 - the run's artefacts are already safe on disk
        log.warning("could not write the report (%s); rebuild it with: ciscr report %s", err, out)


def _set_threads(threads: int | str = "auto") -> str:
    """Apply the ``threads`` setting (:func:`ciscr.threads.apply_threads`); how, in words."""
    from ciscr.threads import apply_threads

    how = apply_threads(threads, dist.world_size())
    log.debug("threads: %d (%s)", torch.get_num_threads(), how)
    return how


def _usable_cores() -> int:
    from ciscr.threads import usable_cores

    return usable_cores()


def oversubscription_warning(threads: int, processes: int = 1) -> str | None:
    """See :func:`ciscr.threads.oversubscription_warning` (every command warns the same way)."""
    from ciscr.threads import oversubscription_warning as warning

    return warning(threads, processes)


def warn_if_busy(device: torch.device | str = "cpu") -> None:
    """Log the busy-machine warning for the threads torch now uses (CPU work only)."""
    if torch.device(device).type == "cpu" and dist.is_main():
        text = oversubscription_warning(torch.get_num_threads(), dist.world_size())
        if text:
            log.warning(text)


def random_init_warning(cfg: Config) -> str | None:
    """The loud warning for a backbone trained from random initialisation, or None.

    The synthetic config does this on purpose (its YAML says so); anywhere else it usually means
    a forgotten ``model.pretrained`` and far lower mIoU than an ImageNet start.
    """
    if cfg.model.pretrained or cfg.data.format == "synthetic":
        return None
    return (
        f"WARNING: model.pretrained is empty: the {cfg.model.backbone} backbone trains from "
        "RANDOM initialisation (expect far lower mIoU than with ImageNet weights); set "
        "model.pretrained=imagenet or model.pretrained=PATH"
    )


def _warn_at_start(cfg: Config, device: torch.device) -> None:
    from ciscr.engine.evaluate import eval_warning

    for text in (bf16_emulated_warning(cfg, device), random_init_warning(cfg),
                 eval_warning(cfg.eval)):
        if text:
            log.warning(text)
    warn_if_busy(device)


def _precision(cfg: Config, device: torch.device) -> str:
    """What ``train.amp`` means on this device (``auto`` resolved), in words."""
    from ciscr.utils.misc import precision_name, resolve_amp

    amp = resolve_amp(cfg.train.amp, device)
    words = precision_name(amp) + ("" if amp == "none" else " autocast")
    return f"{words} (train.amp=auto)" if cfg.train.amp == "auto" else words


def run_summary(ctx: RunContext, resumed: bool = False, threads_how: str = "") -> str:
    """What a run is about to do: data, classes, device, threads, precision, run directory.

    A resumed run also says which stages are already done (they are skipped); the stage that
    was interrupted says where it resumes when it starts (engine/train.py).
    """
    cfg, info = ctx.cfg, ctx.info
    names = ", ".join(info.class_names)
    weights = cfg.model.pretrained or "random init"
    if cfg.model.init:
        weights = f"from model.init {cfg.model.init}, sha256 {cfg.model.init_sha256[:12]}"
    done = _done_stages(ctx.run_dir)
    lines = [
        f"run: {ctx.run_dir} ({'resumed' if resumed else 'new'})",
        f"data: {len(ctx.labeled)} labeled / {len(ctx.unlabeled)} unlabeled / {len(ctx.val)} "
        f"val images, {info.num_classes} classes ({names})",
        f"model: {cfg.model.backbone} ({weights}), method {cfg.method.name}; device {ctx.device}"
        f", {torch.get_num_threads()} thread(s) x {dist.world_size()} process(es)"
        f"{f' ({threads_how})' if threads_how else ''}, "
        f"precision {_precision(cfg, ctx.device)}",
    ]
    rule = _labeled_fraction(ctx)[0]
    if rule:
        lines.insert(2, rule)
    if cfg.model.init:
        lines.append(_warm_budget_line(ctx))
    if done:
        lines.append(f"resuming: {', '.join(done)} already done (skipped)")
    return "\n".join(lines)


def _warm_budget_line(ctx: RunContext) -> str:
    """A run from ``model.init``: its training budget next to the one its start had, so that a
    gain over the start is read with both in view."""
    from ciscr.run_services import stage1_iterations
    from ciscr.warmstart import init_budget

    t = ctx.cfg.train
    base = init_budget(ctx.cfg.model.init)
    lr0 = f" at lr {base['lr']:g}" if isinstance(base.get("lr"), (int, float)) else ""
    return (f"budget: {stage1_iterations(ctx)} iterations at lr {t.lr:g} (train.epochs={t.epochs}"
            f" passes over the labeled list; train.warm_epochs / train.warm_lr set them) on a "
            f"start whose checkpoint trained {base.get('iterations', 'unknown')} iterations"
            f"{lr0}")


def _labeled_fraction(ctx: RunContext) -> tuple[str | None, str | None]:
    """What ``data.labeled`` as a fraction was a fraction of (line, warning), for a random
    partition (folder / synthetic); (None, None) for a packaged split."""
    from ciscr.data.formats import DEFAULT_LABELED_FRACTION
    from ciscr.data.partition import labeled_fraction_note

    d = ctx.cfg.data
    if d.split or d.format not in ("folder", "synthetic"):
        return None, None
    masked = len(ctx.labeled) + sum(s.mask is not None for s in ctx.unlabeled)
    return labeled_fraction_note(d.labeled, len(ctx.labeled), masked,
                                 len(ctx.labeled) + len(ctx.unlabeled), DEFAULT_LABELED_FRACTION)


def _debug_config(cfg: Config) -> None:
    """-v: the settings that differ from the defaults of the method, i.e. what really runs."""
    from ciscr.config import non_default_settings

    log.debug("config (differs from the defaults of method.name=%s): %s", cfg.method.name,
              " ".join(non_default_settings(cfg)) or "nothing")


def data_counts(labeled: list, unlabeled: list, val: list) -> str:
    """-v: the split's counts, and how many unlabeled images have a mask (those masks only
    score pseudo labels)."""
    scored = sum(s.mask is not None for s in unlabeled)
    return (f"data: pool {len(labeled) + len(unlabeled)} images = {len(labeled)} labeled + "
            f"{len(unlabeled)} unlabeled ({scored} of them with a mask, used only to score "
            f"pseudo labels); val {len(val)} images")


def _warn_labeled_fraction(ctx: RunContext) -> None:
    warning = _labeled_fraction(ctx)[1]
    if warning:
        log.warning(warning)


def _done_stages(run_dir: Path) -> list[str]:
    """Stage folders with a done.json, in the order they finished."""
    marks = [p for p in run_dir.glob("*/done.json") if p.is_file()]
    return [p.parent.name for p in sorted(marks, key=lambda p: p.stat().st_mtime_ns)]


def format_results(results: dict[str, Any], class_names: list[str]) -> str:
    """The end-of-run summary: per-stage val mIoU and pseudo-label quality, the per-class IoU
    of the result and the time per stage (training, evaluation, pseudo-labelling, selection)."""
    from ciscr.engine.evaluate import format_miou_table
    from ciscr.timing import format_time_table, stage_time_rows

    lines = [f"method: {results['method']}    result: {results['final_stage']} (last checkpoint)"]
    for name, s in results["stages"].items():
        extra = ""
        if s.get("pseudo_miou") is not None:
            extra = f"   pseudo-label mIoU {100 * s['pseudo_miou']:.2f}"
        if s.get("val_miou") is not None:
            lines.append(f"  {name:<8} val mIoU {100 * s['val_miou']:6.2f}{extra}")
        elif extra:
            lines.append(f"  {name:<8}{extra}")
    from ciscr.warmstart import format_comparison

    if (comparison := format_comparison(results)) is not None:
        lines.append(comparison)
    if results.get("warning"):
        lines.append(f"warning: {results['warning']}")
    lines.append("")
    lines.append(format_miou_table(results["final_metrics"], class_names))
    times = format_time_table(stage_time_rows(results["run_dir"]))
    if times:
        lines += ["", times]
    lines.append(f"run directory: {results['run_dir']}")
    return "\n".join(lines)


def evaluate_checkpoint(ckpt_path: Path, overrides: list[str], out: Path | None) -> dict:
    """``ciscr eval``: rebuild model and data from the checkpoint's own config, then evaluate."""
    from ciscr.config import apply_overrides
    from ciscr.data.formats import load_dataset
    from ciscr.engine.checkpoint import load_checkpoint
    from ciscr.engine.evaluate import eval_settings, eval_warning, format_miou_table
    from ciscr.models import build_model
    from ciscr.run_services import RunContext, evaluate_model

    ckpt = load_checkpoint(ckpt_path)
    meta = _eval_meta(ckpt_path, ckpt)
    cfg = from_dict(apply_overrides(meta["config"], overrides), f"{ckpt_path} config",
                    overrides)
    info = dist.init_distributed(cfg.device)
    _set_threads(cfg.threads)
    _debug_config(cfg)
    warning = eval_warning(cfg.eval)
    if warning and dist.is_main():
        log.warning(warning)
    warn_if_busy(info.device)
    try:
        model_cfg = cfg.model.model_copy(update={"pretrained": ""})
        model = build_model(model_cfg, meta["num_classes"])
        model.load_state_dict(ckpt["model"])
        model.to(info.device).eval()
        dinfo, labeled, unlabeled, val = load_dataset(cfg.data, cfg.seed)
        log.debug(data_counts(labeled, unlabeled, val))
        ctx = RunContext(cfg, ckpt_path.parent, info.device, dinfo, labeled, unlabeled, val)
        metrics = evaluate_model(ctx, model)
        metrics.update(checkpoint=str(ckpt_path), iteration=ckpt.get("iteration"),
                       eval_mode=cfg.eval.mode, eval=eval_settings(cfg.eval, cfg.train.crop_size),
                       data={"format": cfg.data.format, "root": _abs_root(cfg.data.root),
                             "val_split": cfg.data.val_split,
                             "max_val_images": cfg.data.max_val_images},
                       **_provenance())
        if dist.is_main():
            dest = out or default_eval_path(ckpt_path, cfg, meta["config"])
            replaced = _replaced_note(dest)
            atomic_write_json(dest, metrics)
            print(format_miou_table(metrics, list(dinfo.class_names)))
            print(f"written: {dest}" + (f" (replaced {replaced})" if replaced else ""))
        return metrics
    finally:
        dist.cleanup()


def _eval_meta(ckpt_path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The run config and class count to evaluate ``ckpt`` with: its own meta; for a stage's
    ``snapshot_*.pt`` written before snapshots carried one, that of the stage's checkpoint.pt
    beside it (same run, same model). CheckpointError saying what the file is otherwise."""
    from ciscr.engine.checkpoint import load_checkpoint

    meta = ckpt.get("meta") or {}
    if "config" in meta:
        return meta
    sibling = ckpt_path.with_name("checkpoint.pt")
    if "model" in ckpt and "iteration" in ckpt and sibling.is_file() and sibling != ckpt_path:
        meta = load_checkpoint(sibling).get("meta") or {}
        if "config" in meta:
            log.info("%s: a training snapshot (iteration %d); its run's config is taken from %s",
                     ckpt_path.name, ckpt["iteration"], sibling)
            return meta
    if "model" in ckpt and "iteration" in ckpt:
        raise CheckpointError(
            f"{ckpt_path}: a training snapshot (model weights at iteration {ckpt['iteration']}) "
            f"without its run's config, and no checkpoint.pt of that run beside it to take the "
            "config from: evaluate the stage's checkpoint.pt, or copy it next to the snapshot")
    raise CheckpointError(f"{ckpt_path}: has no embedded config (not a checkpoint written by "
                          "ciscr train/run)")


def _abs_root(root: str) -> str:
    return str(Path(root).expanduser().resolve()) if root else ""


def _provenance() -> dict[str, str]:
    """When and by which ciscr an eval record was written (a JSON alone says neither)."""
    from datetime import datetime, timezone

    import ciscr

    return {"ciscr_version": ciscr.__version__,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _replaced_note(dest: Path) -> str:
    """What an eval JSON about to be overwritten held ('' when there is none)."""
    import json

    try:
        old = json.loads(dest.read_text())
    except (OSError, ValueError):
        return "" if not dest.exists() else "an unreadable file"
    miou = old.get("miou")
    when = old.get("timestamp", "before timestamps were recorded")
    what = f"mIoU {100 * miou:.2f}" if isinstance(miou, (int, float)) else "no mIoU"
    return f"the result of {when}: {what}, iteration {old.get('iteration')}"


def _settings_tag(cfg: Config, trained: dict[str, Any]) -> str:
    """'' when the evaluation settings are the checkpoint's own (its eval section, in the mode
    asked for; its val split), else ``-<6 hex>`` of them: WHY, two evals in one mode with other
    scales / flip / window / val images must not overwrite each other."""
    import hashlib
    import json

    from ciscr.engine.evaluate import eval_settings

    def settings(c: Config) -> dict[str, Any]:
        return {**eval_settings(c.eval, c.train.crop_size), "val_split": c.data.val_split,
                "max_val_images": c.data.max_val_images}

    base = from_dict(trained)
    base = base.model_copy(update={"eval": base.eval.model_copy(update={"mode": cfg.eval.mode})})
    mine = settings(cfg)
    if mine == settings(base):
        return ""
    return "-" + hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:6]


def default_eval_path(ckpt_path: Path, cfg: Config, trained: dict[str, Any]) -> Path:
    """``<stem>_eval_<mode>.json`` next to the checkpoint, for the data it was trained on.

    Other evaluation settings than the checkpoint's own add a short hash of them
    (:func:`_settings_tag`); another ``data.root`` adds that root's name and a short hash of its
    absolute path, so that it never overwrites the result on the original data.
    """
    import hashlib
    import re

    name = f"{ckpt_path.stem}_eval_{cfg.eval.mode}{_settings_tag(cfg, trained)}"
    if cfg.data.root != (trained.get("data") or {}).get("root", ""):
        root = _abs_root(cfg.data.root)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(root).name)[:40] or "root"
        name += f"_{slug}-{hashlib.sha256(root.encode()).hexdigest()[:6]}"
    return ckpt_path.with_name(f"{name}.json")


def print_info() -> None:
    """``ciscr info``: what this machine offers ciscr."""
    import ciscr

    rows = [
        ("ciscr", ciscr.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("platform", platform.platform()),
        ("cpu threads", _threads_line()),
        ("load", _load_line()),
        ("cuda", _cuda_line()),
        ("bf16 autocast (cpu)", _bf16_cpu()),
        ("distributed", _dist_line()),
    ]
    for mod in ("kornia", "numpy", "PIL", "pydantic", "safetensors", "tensorboard"):
        rows.append((mod, _version(mod)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _threads_line() -> str:
    env = [f"{v}={os.environ[v]}" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if v in os.environ]
    source = ", ".join(env) if env else "OMP_NUM_THREADS unset"
    return (f"{torch.get_num_threads()} by torch's default (of {_usable_cores()} cores; {source}); "
            "ciscr's default threads=auto starts one per free core, threads=N sets them")


def _load_line() -> str:
    from ciscr.threads import load_line

    return load_line()


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "installed")
    except Exception as err:  # noqa: BLE001 - report, never crash `info`
        return f"unavailable ({type(err).__name__})"


def _cuda_line() -> str:
    if not torch.cuda.is_available():
        return f"not available (torch built with CUDA {torch.version.cuda or 'none'})"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    bf16 = "bf16 yes" if torch.cuda.is_bf16_supported() else "bf16 no"
    return f"{len(names)} device(s): {', '.join(names)}; {bf16}"


def _bf16_cpu() -> str:
    """Whether bf16 autocast runs here, natively or emulated, and what train.amp=auto picks."""
    from ciscr.utils.misc import cpu_has_fast_bf16

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except Exception as err:  # noqa: BLE001
        return f"no ({err}); train.amp=auto picks fp32"
    if cpu_has_fast_bf16():
        return "native (AVX512-BF16 / AMX); train.amp=auto picks bf16"
    return ("emulated (no AVX512-BF16 / AMX: slower than fp32, up to ~9x); "
            "train.amp=auto picks fp32")


def bf16_emulated_warning(cfg: Config, device: torch.device) -> str:
    """The warning for an explicit ``train.amp=bf16`` on a CPU that only emulates bf16 ('' when
    it does not apply): the run does as asked, but a user should know it is the slow path."""
    from ciscr.utils.misc import cpu_has_fast_bf16

    if cfg.train.amp != "bf16" or device.type != "cpu" or cpu_has_fast_bf16():
        return ""
    return ("warning: train.amp=bf16: this CPU has no native bf16 (no AVX512-BF16 / AMX), so bf16 is "
            "emulated here and runs slower than fp32 (by how much depends on the CPU); "
            "train.amp=auto picks the "
            "fast precision for each machine")


def _dist_line() -> str:
    import torch.distributed as tdist

    if not tdist.is_available():
        return "torch.distributed not available"
    backends = ["gloo" if tdist.is_gloo_available() else None,
                "nccl" if tdist.is_nccl_available() else None]
    got = ", ".join(b for b in backends if b) or "none"
    return f"available (backends: {got}); launch with torchrun --nproc_per_node=N"
