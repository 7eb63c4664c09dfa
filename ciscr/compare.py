"""``ciscr compare RUN [RUN ...]``: a user's own finished runs side by side, the first as the
control.

What a user otherwise pairs by hand: each run's val mIoU and its difference with the control,
the classes that moved most, what each run trained (iterations, labeled / unlabeled images),
what it cost (CPU and wall minutes, precision, CPU model), and whether the runs can be compared
at all (the same val images, the same labeled split, the same start). Text on the console;
``--out DIR`` adds ``compare.json``, ``compare.png`` (per-class IoU) and ``compare.html``.

Everything comes from the run directories (``results.json``, ``config.yaml``, the stages'
``done.json`` / ``train.jsonl``); runs finished by an older ciscr lack some facts (CPU time,
the image-id hashes): those cells read ``-`` and comparability falls back to the config.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ciscr.errors import CiscrError

MOVERS = 3  # classes named per run in the "biggest movers" line


@dataclass
class RunFacts:
    """One run as ``ciscr compare`` sees it (fractions, not percentages)."""

    path: str
    method: str
    miou: float
    iou: list[float | None]
    class_names: list[str]
    iterations: int | None
    labeled: int | None
    unlabeled: int | None
    cpu_minutes: float | None
    wall_minutes: float | None
    precision: str
    cpu: str
    # comparability: name -> (words for the user, value compared)
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CiscrError(f"{path}: unreadable ({err})") from None


def _run_dir(arg: str) -> Path:
    path = Path(arg)
    run = path.parent if path.name == "results.json" else path
    if not run.is_dir():
        raise CiscrError(f"{arg}: not found (give a run directory, the --out of ciscr run/train)")
    if not (run / "results.json").is_file():
        what = ("the run has not finished (rerun its command to finish it)"
                if (run / "config.yaml").is_file() else "not a ciscr run directory")
        raise CiscrError(f"{run}: no results.json: {what}")
    return run


def _stage_iterations(run: Path, res: dict[str, Any]) -> int | None:
    """The run's training iterations: results.json's budget, else the stages' train.jsonl."""
    from ciscr.run_services import logged_iterations

    if (res.get("budget") or {}).get("iterations") is not None:
        return int(res["budget"]["iterations"])
    total = sum(logged_iterations(run / name) for name in res.get("stages", {}))
    return total or None


def _precision(res: dict[str, Any], cfg: dict[str, Any]) -> str:
    recorded = (res.get("machine") or {}).get("precision")
    if recorded:
        return str(recorded)
    from ciscr.utils.misc import precision_name  # torch: only where a record lacks it

    amp = str((cfg.get("train") or {}).get("amp", "?"))
    # "auto" (or a missing key) cannot be resolved after the fact: it depended on that machine.
    return precision_name(amp) if amp in ("none", "bf16", "fp16") else f"{amp} (not recorded)"


def _keys(res: dict[str, Any], cfg: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """What must match between runs for their difference to mean something."""
    d, m, data = cfg.get("data") or {}, cfg.get("model") or {}, res.get("data") or {}
    root = f"{d.get('format')} {d.get('root')}"
    val = (f"{root} {d.get('val_split')} max {d.get('max_val_images')}",
           data.get("val_ids_sha256") or "")
    split = (f"{d.get('split') or 'labeled=' + str(d.get('labeled'))} seed {cfg.get('seed')}",
             data.get("labeled_ids_sha256") or "")
    start = (m.get("init") and f"model.init {m['init']}") or (m.get("pretrained") or "random init")
    init = (f"{m.get('backbone')}, {start}", m.get("init_sha256") or "")
    return {"val images": val, "labeled split": split, "start": init}


def read_run(arg: str) -> RunFacts:
    """The facts of one finished run (``arg``: its directory or its results.json)."""
    import yaml

    run = _run_dir(arg)
    res = _read_json(run / "results.json")
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) \
            if (run / "config.yaml").is_file() else {}
    except (OSError, yaml.YAMLError) as err:
        raise CiscrError(f"{run / 'config.yaml'}: unreadable ({err})") from None
    fm = res.get("final_metrics") or {}
    if "miou" not in fm:
        raise CiscrError(f"{run / 'results.json'}: has no final_metrics.miou (not written by ciscr)")
    data = res.get("data") or {}
    counts = (_read_json(run / "data_check.json").get("num_samples", {})
              if (run / "data_check.json").is_file() else {})
    cpu_s = res.get("cpu_seconds")
    wall_s = res.get("wall_seconds")
    if wall_s is None:  # older runs: each stage's last invocation
        wall_s = sum(s.get("wall_seconds", 0.0) for s in res.get("stages", {}).values()) or None
    return RunFacts(
        path=arg, method=str(res.get("method")), miou=float(fm["miou"]), iou=list(fm.get("iou", [])),
        class_names=list(fm.get("class_names") or []),
        iterations=_stage_iterations(run, res),
        labeled=data.get("labeled", counts.get("labeled")),
        unlabeled=data.get("unlabeled", counts.get("unlabeled")),
        cpu_minutes=None if cpu_s is None else cpu_s / 60,
        wall_minutes=None if wall_s is None else wall_s / 60,
        precision=_precision(res, cfg), cpu=(res.get("machine") or {}).get("cpu", "not recorded"),
        keys=_keys(res, cfg))


def comparability_warnings(runs: list[RunFacts]) -> list[str]:
    """One line per way a run differs from the control that makes the difference mean less."""
    ctrl, out = runs[0], []
    for r in runs[1:]:
        for name, (words, digest) in r.keys.items():
            c_words, c_digest = ctrl.keys[name]
            same = digest == c_digest if digest and c_digest else words == c_words
            if not same:
                shown = f"{c_words} vs {words}" if words != c_words else "other images"
                out.append(f"warning: {r.path}: another {name} than the control ({shown}): "
                           "its difference is not the method's alone")
        if r.class_names != ctrl.class_names:
            out.append(f"warning: {r.path}: other classes than the control: per-class IoU "
                       "not compared")
        if None not in (r.iterations, ctrl.iterations) and r.iterations != ctrl.iterations:
            out.append(f"warning: {r.path}: trained {r.iterations} iterations, the control "
                       f"{ctrl.iterations}: the difference mixes the method with the budget "
                       "(compare at equal steps, or at equal CPU minutes)")
    recorded = [r for r in runs if r.cpu != "not recorded"]
    if len({(r.cpu, r.precision) for r in recorded}) > 1:
        out.append("note: the runs' CPU minutes come from different CPUs or precisions: "
                   + "; ".join(f"{r.path}: {r.cpu}, {r.precision}" for r in recorded))
    if len(recorded) < len(runs):
        out.append("note: CPU model and precision not recorded (finished by an older ciscr): "
                   + ", ".join(r.path for r in runs if r.cpu == "not recorded"))
    return out


def movers(ctrl: RunFacts, run: RunFacts, n: int = MOVERS) -> list[tuple[str, float]]:
    """The ``n`` classes whose IoU moved most against the control, (name, difference), biggest
    first; classes absent from either run's val set are skipped."""
    if run.class_names != ctrl.class_names:
        return []
    diffs = [(name, b - a) for name, a, b in zip(ctrl.class_names, ctrl.iou, run.iou, strict=False)
             if a is not None and b is not None]
    return sorted(diffs, key=lambda t: -abs(t[1]))[:n]


def _num(v: float | int | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def summary_rows(runs: list[RunFacts]) -> list[list[str]]:
    """The main table: header then one row per run (percentages, minutes)."""
    ctrl = runs[0]
    rows = [["run", "method", "val mIoU", "vs control", "iterations", "labeled/unlabeled",
             "CPU min", "wall min", "precision"]]
    for i, r in enumerate(runs):
        diff = "control" if i == 0 else f"{100 * (r.miou - ctrl.miou):+.2f}"
        rows.append([r.path, r.method, f"{100 * r.miou:.2f}", diff, _num(r.iterations, "d"),
                     f"{_num(r.labeled, 'd')}/{_num(r.unlabeled, 'd')}",
                     _num(r.cpu_minutes, ".1f"), _num(r.wall_minutes, ".1f"), r.precision])
    return rows


def class_rows(runs: list[RunFacts]) -> list[list[str]]:
    """Per-class IoU (%): one row per class of the control, one column per run (differences
    with the control in brackets). Runs with other classes are left out."""
    ctrl = runs[0]
    same = [r for r in runs if r.class_names == ctrl.class_names]
    rows = [["class", *[r.path for r in same]]]
    for k, name in enumerate(ctrl.class_names):
        cells = [name]
        for j, r in enumerate(same):
            v, c = r.iou[k] if k < len(r.iou) else None, ctrl.iou[k]
            cell = "absent" if v is None else f"{100 * v:.2f}"
            if j and v is not None and c is not None:
                cell += f" ({100 * (v - c):+.2f})"
            cells.append(cell)
        rows.append(cells)
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_compare(runs: list[RunFacts]) -> str:
    """Everything ``ciscr compare`` prints."""
    parts = [text_table(summary_rows(runs))]
    for r in runs[1:]:
        moved = movers(runs[0], r)
        if moved:
            parts.append(f"biggest movers, {r.path} vs control: "
                         + ", ".join(f"{name} {100 * d:+.2f}" for name, d in moved))
    if runs[0].class_names:
        parts += ["", "per-class IoU %", text_table(class_rows(runs))]
    warnings = comparability_warnings(runs)
    if not any(w.startswith("warning:") for w in warnings):
        warnings.insert(0, "comparable: same val images, labeled split and start")
    return "\n".join([*parts, "", *warnings])


def compare_figure(runs: list[RunFacts]):
    """Grouped bars: per-class IoU of each run with the control's classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ctrl = runs[0]
    same = [r for r in runs if r.class_names == ctrl.class_names]
    k = len(ctrl.class_names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * k + 2), 3.6))
    width = 0.8 / len(same)
    for j, r in enumerate(same):
        vals = [100 * (v or 0.0) for v in r.iou[:k]]
        ax.bar(np.arange(k) + j * width, vals, width, label=f"{r.path} ({100 * r.miou:.1f})")
    ax.set_xticks(np.arange(k) + 0.4 - width / 2, ctrl.class_names, rotation=45, ha="right")
    ax.set_ylabel("val IoU %")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_compare(runs: list[RunFacts], out: Path) -> list[Path]:
    """compare.json / compare.png / compare.html in ``out`` (atomically), their paths."""
    import html

    from ciscr.utils.io import (
        atomic_write_bytes,
        atomic_write_json,
        atomic_write_text,
        check_writable_dir,
    )
    from ciscr.visualize import figure_png

    check_writable_dir(out)
    paths = [out / "compare.json", out / "compare.png", out / "compare.html"]
    atomic_write_json(paths[0], {"runs": [asdict(r) for r in runs],
                                 "warnings": comparability_warnings(runs)})
    png = figure_png(compare_figure(runs), dpi=90) if runs[0].class_names else b""
    if png:
        atomic_write_bytes(paths[1], png)
    else:
        paths.remove(paths[1])
    pre = html.escape(format_compare(runs))
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>ciscr compare"
            f"</title></head><body><h1>ciscr compare</h1><pre>{pre}</pre>"
            + ("<img src='compare.png' alt='per-class IoU of each run'>" if png else "")
            + "</body></html>\n")
    atomic_write_text(paths[-1], page)
    return paths


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``ciscr compare`` to the CLI (called by ciscr.cli while it builds its parser)."""
    from ciscr.commands import command

    p = sub.add_parser(
        "compare", help="finished runs side by side, the first as the control",
        description="A table of each run's val mIoU, its difference with the first run (the "
        "control), the biggest per-class movers, iterations, labeled/unlabeled images, CPU and "
        "wall minutes and precision, and a warning where runs do not compare (other val "
        "images, labeled split or start).")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories (--out of ciscr run/train); the first is the control")
    p.add_argument("--out", type=Path, help="also write compare.json/.png/.html into this folder")
    command("compare")(_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise CiscrError("compare needs two or more runs: the control first, then the others")
    runs = [read_run(r) for r in args.runs]
    print(format_compare(runs))
    if args.out:
        for path in write_compare(runs, args.out):
            print(f"written: {path}")
    return 0
