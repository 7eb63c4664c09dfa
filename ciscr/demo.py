"""``ciscr demo``: does semi-supervision pay? SupOnly vs CISC-R (and, with ``--methods``, any
other method, e.g. UniMatch) on the built-in synthetic data (10 labeled images, 190
unlabeled), in a few minutes on a CPU.

Each row is a plain ``ciscr run synthetic method.name=...`` in its own folder under ``--out``
(printed in full), so ``ciscr run synthetic`` reproduces the CISC-R row; the config's method
options chosen for CISC-R (``ciscr.config.RECIPE_KEYS``) are reset to each other row's own
preset. A second ``ciscr demo`` reuses every run that finished (its table row is read back,
with the wall time it took then); an interrupted one resumes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ciscr.config import load_config, preset_overrides
from ciscr.runner import run_training
from ciscr.utils.io import atomic_write_json

# Row labels of the methods a demo can show; the default rows fit the README's few minutes.
LABELS = {"suponly": "SupOnly (labeled only)", "st": "ST (self-training)", "stpp": "ST++",
          "ciscr": "CISC-R (query, paper)", "ciscr_bank": "CISC-R (bank)",
          "fixmatch": "FixMatch", "unimatch": "UniMatch", "unimatch_cisc": "UniMatch + CISC"}
DEFAULT_METHODS = ("suponly", "ciscr_bank")
LEARNED = 0.05  # a class counts as learned from 5 % IoU


def row_label(method: str, cfg: Any) -> str:
    """The table's name of a row, saying when a CISC-R row trains stage 1 without L_CISC."""
    label = LABELS[method]
    if method.startswith("ciscr") and not cfg.method.stage1_cisc_loss:
        label += ", no stage-1 L_CISC"
    return label


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def demo_table(rows: list[tuple[str, dict[str, Any], float, bool]],
               class_names: list[str]) -> str:
    """The side-by-side table: val mIoU, gain over the first row, per-class IoU, wall time.

    ``rows``: (label, results.json of the run, wall seconds, reused from an earlier demo).
    """
    base = rows[0][1]["final_metrics"]["miou"]
    # Each class column is as wide as its whole name (never cut: "background", not "backgroun").
    widths = [max(10, len(n) + 1) for n in class_names]
    head = f"{'method':<36}{'val mIoU':>9}{'gain':>8}" + "".join(
        f"{n:>{w}}" for n, w in zip(class_names, widths, strict=True))
    lines = [head + f"{'wall s':>9}", "-" * (len(head) + 9)]
    for label, res, seconds, reused in rows:
        m = res["final_metrics"]
        gain = "" if res is rows[0][1] else f"{100 * (m['miou'] - base):+.2f}"
        ious = "".join(f"{_pct(x):>{w}}" for x, w in zip(m["iou"], widths, strict=True))
        wall = f"{seconds:.0f}" + (" (reused)" if reused else "")
        lines.append(f"{label:<36}{_pct(m['miou']):>9}{gain:>8}{ious} {wall:>8}")
    learned = [any((r[1]["final_metrics"]["iou"][k] or 0) >= LEARNED for r in rows)
               for k in range(len(class_names))]
    lines.append(f"classes learned (IoU >= {100 * LEARNED:.0f} %) by at least one method: "
                 f"{sum(learned)} of {len(class_names)}")
    lines.append("val mIoU of the LAST checkpoint of each method's final stage; gain = over "
                 "SupOnly, the same labeled images without the unlabeled ones.")
    return "\n".join(lines)


def _finished(run: Path, cfg: Any) -> tuple[dict[str, Any], float] | None:
    """The results and wall time of a run an earlier demo finished with this very config."""
    from ciscr.errors import ConfigError
    from ciscr.run_setup import check_same_config

    res, wall, saved = run / "results.json", run / "demo_wall.json", run / "config.yaml"
    if not (res.exists() and wall.exists() and saved.exists()):
        return None
    try:
        check_same_config(cfg, saved)  # the same test a resumed run passes
    except ConfigError:
        return None
    return json.loads(res.read_text()), json.loads(wall.read_text())["seconds"]


def same_stage1(a: Any, b: Any) -> bool:
    """Whether two configs train the same stage 1: the labeled-only SupOnly stage (no L_CISC,
    no ST++ snapshots) with the same data, model, optimisation and seed. Deterministic CPU
    training then gives the same model, so one run's stage 1 can stand in for the other's."""
    from ciscr.methods import stage_names

    def plain(c: Any) -> bool:
        m = c.method
        return ("stage1" in stage_names(m) and not m.stage1_cisc_loss
                and m.selection != "stpp")

    keys = ("seed", "data", "model", "train")
    return plain(a) and plain(b) and all(getattr(a, k) == getattr(b, k) for k in keys)


def _share_stage1(source: Path, run: Path) -> bool:
    """Copy a finished stage 1 into a run that has none yet; True if copied."""
    if not (source / "stage1" / "done.json").exists() or (run / "stage1").exists():
        return False
    run.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "stage1", run / "stage1")
    return True


def run_demo(out: Path, overrides: list[str], methods: tuple[str, ...] = DEFAULT_METHODS,
             ) -> list[tuple[str, dict[str, Any], float, bool]]:
    """Run (or reuse) every row, print each row's progress and the final table."""
    from ciscr.errors import ConfigError

    unknown = [m for m in methods if m not in LABELS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
                          f"valid: {', '.join(LABELS)}")
    rows = []
    first: tuple[Any, Path] | None = None  # the first row's config and run: its stage 1 is shared
    for i, method in enumerate(methods, start=1):
        recipe = preset_overrides(method)
        cfg = load_config("synthetic", [f"method.name={method}", *recipe, *overrides])
        label = row_label(method, cfg)
        run = out / method
        done = _finished(run, cfg)
        if done is not None:
            print(f"=== [{i}/{len(methods)}] {label}: finished earlier in {run} (reused)")
            rows.append((label, done[0], done[1], True))
            first = first or (cfg, run)
            continue
        extra = " ".join([*recipe, *overrides])
        print(f"\n=== [{i}/{len(methods)}] {label}: ciscr run synthetic "
              f"method.name={method} {extra} --out {run}".replace("  ", " "), flush=True)
        t0 = time.perf_counter()
        # WHY: a row whose stage 1 is SupOnly's (same config) would retrain the same model.
        if first is not None and same_stage1(first[0], cfg) and _share_stage1(first[1], run):
            print(f"stage1: the same as {first[1].name}'s (same config): copied, not retrained")
        res = run_training(cfg, run)
        seconds = time.perf_counter() - t0
        atomic_write_json(run / "demo_wall.json", {"seconds": seconds})
        rows.append((label, res, seconds, False))
        first = first or (cfg, run)
    names = rows[0][1]["final_metrics"].get("class_names") or [
        str(k) for k in range(len(rows[0][1]["final_metrics"]["iou"]))]
    print("\n" + demo_table(rows, names))
    total = sum(r[2] for r in rows if not r[3])
    print(f"runs: {', '.join(str(out / m) for m in methods)}; this invocation: "
          f"{total:.0f} s of training runs")
    return rows
