"""Where a run's time went, from the run's own records (each stage's ``done.json``).

The pipeline writes ``wall_seconds`` into every stage's ``done.json`` (training stages also
``eval_seconds``, the final evaluation alone). This module turns those records into the
time-per-stage table of the end-of-run summary (:func:`ciscr.runner.format_results`), of
``report.html`` and of ``ciscr profile``. Nothing is re-measured here.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# "online" is the single training stage of FixMatch / UniMatch (ciscr/online.py): without it
# an online run's table showed only pseudo_final.
STAGE_ORDER = ("stage1", "online", "pseudo0", "selection", "stage2", "pseudo1", "stage3",
               "pseudo_final")
CATEGORIES = ("training", "evaluation", "pseudo-labelling", "selection")
NOTE = (
    "from each stage's done.json; a resumed stage counts only the invocation that finished "
    "it; training includes data loading, checkpoints and any per-epoch evaluation"
)


def stage_kind(name: str) -> str:
    """training | pseudo-labelling | selection, from the stage folder's name."""
    if name.startswith("pseudo"):
        return "pseudo-labelling"
    return "selection" if name == "selection" else "training"


def _read_done(run_dir: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / name / "done.json").read_text())
    except (OSError, ValueError):
        return None


def _log_records(run_dir: Path, name: str) -> list[dict[str, Any]]:
    """A training stage's train.jsonl records (unreadable lines skipped; [] if none)."""
    try:
        lines = (run_dir / name / "train.jsonl").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("iteration"), int):
            out.append(rec)
    return out


def last_iteration(run_dir: Path, name: str) -> int | None:
    """The highest iteration a training stage logged (train.jsonl), or None."""
    return max((r["iteration"] for r in _log_records(run_dir, name)), default=None)


def median_step_seconds(run_dir: Path, name: str) -> float | None:
    """Median over a training stage's log records of ``step_seconds`` (mean seconds of a
    batch + step over the record's window, evaluations and checkpoints excluded); None for
    logs written before the field existed."""
    xs = [float(r["step_seconds"]) for r in _log_records(run_dir, name)
          if isinstance(r.get("step_seconds"), (int, float))]
    return statistics.median(xs) if xs else None


def stage_time_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished stage with a time record, in pipeline order.

    Row: ``stage``, ``kind``, ``seconds`` per category (None where not recorded: a training
    stage of a run made before ``eval_seconds`` existed has its evaluation in ``training``),
    ``total`` and, for training stages, ``iterations`` and ``step_median``
    (:func:`median_step_seconds`).
    """
    run_dir = Path(run_dir)
    rows = []
    for name in STAGE_ORDER:
        done = _read_done(run_dir, name)
        if not done or done.get("wall_seconds") is None:
            continue
        wall, kind = float(done["wall_seconds"]), stage_kind(name)
        secs: dict[str, float | None] = dict.fromkeys(CATEGORIES)
        if kind == "training":
            ev = done.get("eval_seconds")
            secs["evaluation"] = None if ev is None else float(ev)
            secs["training"] = wall - (secs["evaluation"] or 0.0)
        else:
            secs[kind] = wall
        row = {"stage": name, "kind": kind, "seconds": secs, "total": wall}
        if kind == "training":
            row["iterations"] = last_iteration(run_dir, name)
            row["step_median"] = median_step_seconds(run_dir, name)
        rows.append(row)
    return rows


def category_totals(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Seconds per category summed over the stages (missing records count 0)."""
    return {c: sum(r["seconds"][c] or 0.0 for r in rows) for c in CATEGORIES}


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def time_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the time-per-stage table: one row per stage, then total and share."""
    header = ["stage", *(f"{c} s" for c in CATEGORIES), "total s"]
    body = [[r["stage"], *(_s(r["seconds"][c]) for c in CATEGORIES), _s(r["total"])]
            for r in rows]  # fmt: skip
    totals = category_totals(rows)
    grand = sum(r["total"] for r in rows)
    body.append(["total", *(_s(totals[c]) for c in CATEGORIES), _s(grand)])
    if grand > 0:
        body.append(["share", *(f"{totals[c] / grand:.0%}" for c in CATEGORIES), "100%"])
    return header, body


def format_time_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table as aligned plain text (the end-of-run summary); '' without records."""
    if not rows:
        return ""
    header, body = time_table(rows)
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in [header, *body]]  # fmt: skip
    return "\n".join(["time per stage (" + NOTE + "):", *lines])
