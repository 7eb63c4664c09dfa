"""The protocol-4 report (``benchmarks/camvid_labels.py``): the targets judged on the paired
differences, the headline and advice README gives, and the page itself (markdown, JSON and
figure) assembled from the run records (``camvid_labels_records``) and the tables
(``camvid_labels_tables``).

Nothing here trains and nothing is typed in: every figure comes from a run directory (live or
archived under ``docs/results/camvid_labels-runs/``).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from camvid_labels_records import (
    NEAR_STEPS,
    SSL,
    add_totals,
    compute_vals,
    curve_points,
    iterations_of,
    machines,
    nearest_steps,
    stages_in_all,
    vals,
)
from camvid_labels_tables import (
    break_even_lines,
    budget_lines,
    class_gap_lines,
    figures,
    lever_costs_line,
    md_diagnostics,
    mixed_lines,
    queued_lines,
    table_curve,
    table_per_class,
    table_plans,
    table_split,
)
from camvid_report import (
    fmt,
    in_progress,
    judge,
    paired,
    update_readme,
)

from ciscr.utils.io import atomic_write_bytes, atomic_write_json

README_MARK = ("<!-- camvid-labels-headline: written by benchmarks/camvid_labels.py -->",
               "<!-- /camvid-labels-headline -->")


def best_row(runs: dict, split: int, rows: list[str], seeds: list[int]) -> tuple[str | None, list]:
    """The row of ``rows`` with the highest mean mIoU over the seeds where every one of them
    finished, ONE row for every seed (each seed's best would select on val seed by seed), and
    its mIoU per seed on those seeds (None elsewhere); (None, Nones) before any such seed."""
    full = [s for s in seeds if all(runs.get((split, r, s)) for r in rows)]
    if not full:
        return None, [None] * len(seeds)
    best = max(rows, key=lambda r: statistics.fmean(runs[(split, r, s)]["val_miou"] for s in full))
    return best, [x if s in full else None
                  for x, s in zip(vals(runs, split, best, seeds), seeds, strict=True)]


def best_compute_pair(runs: dict, split: int, seeds: list[int]) -> tuple[str | None, list, list]:
    """The best semi-supervised row (:func:`best_row`), its mIoU per seed and, seed by seed,
    SupOnly's at that row's CPU time."""
    best, xs = best_row(runs, split, SSL, seeds)
    if best is None:
        return None, xs, [None] * len(seeds)
    return best, xs, compute_vals(runs, split, best, seeds)


def targets(runs: dict, splits: list[int], seeds: list[int], judged: bool) -> list[dict]:
    """Each of the issue's targets judged on its paired differences: {"target", "row" (the row
    judged; None while a chosen one waits for its seeds), "chosen" (picked by best_row: the
    better / best of several rows), "difference", "seeds", "verdict"}."""
    small, large = min(splits), max(splits)
    sup = {k: vals(runs, k, "suponly", seeds) for k in splits}
    one = " (by mean mIoU, one row for every seed)"  # best_row: never each seed's own best
    uni = ["unimatch", "unimatch_cisc"]
    checks = [(f"{small} labels, equal steps: the better of UniMatch / UniMatch + CISC{one} >= "
               "SupOnly + 6", True, *best_row(runs, small, uni, seeds), sup[small], 6.0),
              (f"{small} labels, equal CPU time: the best semi-supervised row{one} >= SupOnly "
               "given that row's CPU time + 0", True, *best_compute_pair(runs, small, seeds), 0.0),
              (f"{small} labels, equal steps: CISC-R >= SupOnly + 4", False, "ciscr",
               vals(runs, small, "ciscr", seeds), sup[small], 4.0)]
    if large != small:
        checks.append((f"{large} labels, equal steps: the better of UniMatch / UniMatch + "
                       f"CISC{one} >= SupOnly + 3", True, *best_row(runs, large, uni, seeds),
                       sup[large], 3.0))
    checks += [(f"{k} labels: UniMatch + CISC >= UniMatch", False, "unimatch_cisc",
                vals(runs, k, "unimatch_cisc", seeds), vals(runs, k, "unimatch", seeds), 0.0)
               for k in sorted(splits)]
    out = []
    for text, chosen, row, xs, ref, need in checks:
        d, n, verdict = judge(xs, ref, need, judged, "not the protocol")
        out.append({"target": text, "row": row, "chosen": chosen, "difference": d, "seeds": n,
                    "verdict": verdict})
    return out


def target_line(t: dict, labels: dict[str, str]) -> str:
    """A target's line on the page; a chosen row is named (before its verdict: as of now)."""
    if not (t["chosen"] and t["row"]):
        return f"- {t['target']}: {t['verdict']}"
    if t["difference"] is None:
        return (f"- {t['target']}: {t['verdict']}; the row it will judge, as the seeds stand: "
                f"{labels[t['row']]}")
    return f"- {t['target']}: {t['verdict']}; judged on {labels[t['row']]}"


def _vs_suponly(runs: dict, split: int, row: str, seeds: list[int]
                ) -> tuple[tuple[float | None, str], tuple[float | None, str]]:
    """A row's paired difference (:func:`paired`: value, text) against SupOnly at N steps and
    against SupOnly given the row's CPU time, seed by seed: what the headline and the advice
    both report, from one place so they cannot disagree."""
    xs = vals(runs, split, row, seeds)
    return (paired(xs, vals(runs, split, "suponly", seeds)),
            paired(xs, compute_vals(runs, split, row, seeds)))


def _split_headline(runs: dict, split: int, seeds: list[int], labels: dict[str, str]) -> str:
    """"<row> <d> at equal steps, <dc> at equal CPU time; ..." at one split ("" before any)."""
    parts = []
    for r in SSL:
        (d, d_txt), (dc, dc_txt) = _vs_suponly(runs, split, r, seeds)
        in_all = stages_in_all(runs, split, r)
        steps = "at equal steps" if in_all is None else f"at N steps per stage ({in_all} in all)"
        if d is not None:
            parts.append(f"{labels.get(r, r)} {d_txt} {steps}"
                         + (f", {dc_txt} at equal CPU time" if dc is not None else ""))
    return "; ".join(parts)


def headline(runs: dict, splits: list[int], seeds: list[int], cmd: str,
             labels: dict[str, str]) -> str:
    """One line for README "Results": per split (smallest first), each semi-supervised row's
    paired difference with SupOnly at equal steps and with SupOnly at that row's CPU time."""
    parts = [f"{k} labeled images: {line}" for k in sorted(splits)
             if (line := _split_headline(runs, k, seeds, labels))]
    if not parts:
        return f"CamVid label curve: no semi-supervised row finished yet (`{cmd}`)."
    return (f"CamVid label curve, mIoU points over SupOnly, paired by seed (n = the seeds, of "
            f"{len(seeds)}, finished for both rows). {'. '.join(parts)} (`{cmd}`; "
            "docs/results/camvid_labels.md).")


def _per_step(runs: dict, split: int, seeds: list[int], labels: dict[str, str],
              first: bool) -> str | None:
    """At one split: the best semi-supervised row (the targets' choice: one row, by its mean)
    against SupOnly at N steps, as a clause of the advice; None before a seed has every row."""
    sup = vals(runs, split, "suponly", seeds)
    best, xs = best_row(runs, split, SSL, seeds)
    d, d_txt = paired(xs, sup)
    if best is None or d is None:
        return None
    n = sum(x is not None and y is not None for x, y in zip(xs, sup, strict=True))
    in_all = stages_in_all(runs, split, best)
    stages = "" if in_all is None else f" (N per training stage, {in_all} in all)"
    row = (f"the best semi-supervised row here (by mean mIoU), {labels[best]}" if first
           else f"the best row, {labels[best]}")
    return (f"{split} labeled images ({n} of {len(seeds)} seeds so far), {row}{stages}, "
            f"{'gains' if d > 0 else 'does not gain'} over SupOnly at N steps ({d_txt} mIoU "
            f"points{steps_matched(runs, split, best, seeds)})")


def _per_cpu(runs: dict, split: int, seeds: list[int], labels: dict[str, str]
             ) -> tuple[float | None, str, list[str]]:
    """At one split, over the semi-supervised rows with SupOnly at their CPU time measured:
    (the lead row's paired difference, "<row> <d>; ..." , the rows not measured yet)."""
    both = {r: _vs_suponly(runs, split, r, seeds) for r in SSL}
    rows = [r for r in SSL if both[r][0][0] is not None]
    got = {r: both[r][1] for r in rows}
    measured = {r: v for r, v in got.items() if v[0] is not None}
    lead = max((v[0] for v in measured.values()), default=None)
    return (lead, "; ".join(f"{labels[r]} {v[1]}" for r, v in measured.items()),
            [labels[r] for r in rows if r not in measured])


def advice(runs: dict, splits: list[int], seeds: list[int], labels: dict[str, str],
           curve: dict) -> str:
    """The sentence README "Results" gives a user, written from the measured paired differences
    at each split (smallest first): does the best semi-supervised row pay per step (against
    SupOnly at N) and per CPU hour (against SupOnly given its CPU time), and how much SupOnly
    gained from doubling its steps (its curve, smallest split, seed 0): the case for training
    longer instead."""
    small = min(splits)
    steps = [c for k in sorted(splits)
             if (c := _per_step(runs, k, seeds, labels, first=k == small)) is not None]
    if not steps or not steps[0].startswith(f"{small} labeled"):
        return ("Not written yet: no seed has SupOnly and every semi-supervised row finished.")
    n_its = ", ".join(map(str, iterations_of(runs, small, "suponly"))) or "n/a"
    out = f"With N = {n_its} steps and {'; with '.join(steps)}; "
    cpu = {k: _per_cpu(runs, k, seeds, labels) for k in sorted(splits)}
    cpu = {k: v for k, v in cpu.items() if v[0] is not None or v[2]}
    several = len(cpu) > 1

    def each(ks: list[int]) -> str:  # "<split> labels: <row> <d>; ... (<rows>: not measured yet)"
        return "; ".join((f"{k} labels: " if several else "") + " ".join(filter(None, [
            cpu[k][1], f"({', '.join(cpu[k][2])}: not measured yet)" if cpu[k][2] else ""]))
            for k in ks)
    measured = [k for k in cpu if cpu[k][0] is not None]
    if not measured:
        return out + "per CPU hour: not measured yet (SupOnly given a row's CPU time has not " \
            "finished)."
    pays = [k for k in measured if cpu[k][0] >= 0]
    behind = [k for k in cpu if k not in pays]
    if pays:
        out += (f"per CPU hour, a semi-supervised row still leads SupOnly trained for the same "
                f"CPU time at {', '.join(map(str, pays))} labeled images ({each(pays)}): there "
                "the unlabeled images pay per CPU hour too")
        if not behind:
            return out + "."
        out += (f"; at {', '.join(map(str, behind))}, SupOnly trained for the same CPU time is "
                f"ahead of every semi-supervised row measured ({each(behind)}): there, train "
                "SupOnly longer before paying for an unlabeled branch")
    else:
        out += (f"per CPU hour, SupOnly trained for the same CPU time is ahead of every "
                f"semi-supervised row measured ({each(behind)}): on this budget, train SupOnly "
                "longer before paying for an unlabeled branch")
    gains = [(k, g) for k in behind
             if (g := gain_per_doubling(curve_points(runs, k, seeds[0], curve)))]
    if not gains:
        return out + "."
    return out + (" (SupOnly's two longest runs, seed 0: " + "; ".join(
        f"at {k} labels, {g[1]} and {g[2]} iterations, {100 * g[0]:+.2f} points per doubling "
        "of steps" for k, g in gains) + "); whether the unlabeled images pay once more steps "
        "stop paying is not measured here.")


def steps_matched(runs: dict, split: int, row: str, seeds: list[int]) -> str:
    """For a row that trains more than N in all (CISC-R: 3 stages of N), ", <d> against the
    SupOnly run nearest its steps (<its> iterations)" (``nearest_steps``); "" otherwise."""
    in_all = stages_in_all(runs, split, row)
    if in_all is None:
        return ""
    sup, its = nearest_steps(runs, split, row, seeds)
    d, d_txt = paired(vals(runs, split, row, seeds), sup)
    if d is None:
        return ""
    shown = " / ".join("n/a" if i is None else str(i) for i in its)
    return (f"; it trains {in_all} iterations in all, and against the "
            f"SupOnly run nearest that many steps (within {NEAR_STEPS}x) at each seed ({shown} "
            f"iterations) it is {d_txt}")


def superseded_lines(archive: Path) -> list[str]:
    """The finished runs set aside under ``archive``/superseded/ (never read by the tables),
    each with its mIoU, so a reader can compare it with the run that replaced it."""
    got = sorted((archive / "superseded").glob("l*/*/results.json"))
    return [f"- set aside, not in the tables: `{p.parent.parent.name}/{p.parent.name}`, val mIoU "
            f"{fmt(json.loads(p.read_text())['final_metrics']['miou'])} (why: "
            f"{archive.name}/superseded/README.md)" for p in got]


def curve_end(points: list[tuple], queued: list[tuple[int, int, str]]) -> str:
    """Whether SupOnly's curve reached the issue's end (a doubling of its steps gains under a
    point, between its two longest runs), and if not, whether a longer run is still queued."""
    gain = gain_per_doubling(points)
    if gain is None:
        return "Where the curve ends: fewer than two SupOnly run lengths finished."
    more = [row for _, _, row in queued if row == "suponly_8n"]
    if gain[0] < 0.01:
        return (f"The curve has reached the issue's end: between its two longest runs ({gain[1]} "
                f"and {gain[2]} iterations) a doubling gains {100 * gain[0]:+.2f} points, under "
                "one.")
    return (f"The curve has not reached the issue's end (a doubling gaining under a point): "
            f"between its two longest runs ({gain[1]} and {gain[2]} iterations) a doubling still "
            f"gains {100 * gain[0]:+.2f} points; "
            + ("SupOnly at 8N is queued (after the 46-label seeds)." if more else
               "no longer run is queued: the budget stopped it here."))


def other_curves(runs: dict, splits: list[int], seed: int, curve: dict) -> list[str]:
    """SupOnly's runs at each larger split (seed ``seed``: its N and CPU-time runs, no curve of
    its own), where two lengths finished: how much more steps still gave there."""
    md = []
    for split in sorted(splits)[1:]:
        pts = curve_points(runs, split, seed, curve)
        if len({p[0] for p in pts}) >= 2:
            md += [f"SupOnly's runs at {split} labels (seed {seed}: its N and CPU-time runs, "
                   "each its own schedule):", "", *table_curve(pts), ""]
    return md


def gain_per_doubling(points: list[tuple]) -> tuple[float, int, int] | None:
    """SupOnly's mIoU gain per doubling of its steps between its two longest runs
    (``curve_points``: iterations, mIoU, ...), log-linear between them: (gain, shorter, longer)
    iterations; None with fewer than two lengths. WHY the two longest: the advice is about
    whether training still longer pays, and the compute rows (own schedule lengths) are curve
    points too, so an exact doubling is rarely measured."""
    by_its = {p[0]: p[1] for p in points}
    if len(by_its) < 2:
        return None
    (i0, m0), (i1, m1) = sorted(by_its.items())[-2:]
    return (m1 - m0) / math.log2(i1 / i0), i0, i1


def stage_start(runs: dict, split: int, seed: int) -> str:
    """The measurement behind CISC-R's main row (METHOD-NOTES): its later stages continued from
    stage 1 (``ciscr``) against from ImageNet (``ciscr_fresh``, the paper), same split and seed."""
    a, b = (runs.get((split, r, seed)) for r in ("ciscr", "ciscr_fresh"))
    if not a or not b:
        return (f"CISC-R's later stages, continued against from ImageNet (seed {seed}, {split} "
                "labels): not measured yet.")
    d = 100 * (a["val_miou"] - b["val_miou"])
    verdict = ("continuing wins: the main row `ciscr` (method.init=previous) stands" if d >= 0
               else "from ImageNet wins: the main row should switch to `ciscr_fresh`'s start")
    return (f"CISC-R's later stages (seed {seed}, {split} labels): continued from stage 1 "
            f"{fmt(a['val_miou'])}, from ImageNet (the paper) {fmt(b['val_miou'])}, {d:+.2f} "
            f"points for continuing, at the same {a['iterations']} iterations: {verdict}.")


INTRO = ("Every row from ImageNet on the same labeled split of its seed, val mIoU of the LAST "
         "checkpoint (101 val images). N = {iters} iterations per training stage (the rule: "
         "benchmarks/camvid_labels.py's header). Costs are each run's own measured CPU and wall "
         "time on 2 cores, two runs at a time, one thread each, from ciscr's own record "
         "(results.json: each stage's CPU time summed over the invocations that ran it, kept in "
         "its checkpoints, so a session's end loses nothing measured) or, for runs finished "
         "before ciscr kept it, the wait4 sum of the benchmark's invocations; CISC-R's include "
         "its stage 1 (the SupOnly run). Wall time also counts any time the queue was paused "
         "(SIGSTOP while the test suite or CI was timed on the same machine); CPU time does "
         "not, which is why every comparison uses CPU time. A finished run set aside before its "
         "retraining started (never for its result) lies in camvid_labels-runs/superseded/, "
         "never read here; its README says why.")


def md_head(runs: dict, cmd: str, judged: bool, iters: int, tgt: list[dict],
            tip: str, labels: dict[str, str], notes: list[str]) -> list[str]:
    """The page's title, command, protocol and machines, then the targets and the advice."""
    return [f"# CamVid protocol 4: the label curve{'' if judged else ' (NOT the protocol)'}", "",
            f"Command: `{cmd}` (resumable; `--report-only` rewrites this page). Generated "
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}; nothing typed by hand.",
            "", INTRO.format(iters=iters), "",
            "Machines (CPU, bf16 support, as recorded by each invocation):",
            *[f"- {m}" for m in machines(runs)], "",
            *[f"- CPU time of `l{k[0]}/{k[1]}_s{k[2]}`: {r['cpu_source']}" for k, r in
              sorted(runs.items()) if not r["cpu_source"].startswith(("wait4", "ciscr's own"))],
            *notes, "", "## Targets", "", *[target_line(t, labels) for t in tgt], "",
            "## When it pays (the sentence README gives users, written from the figures below)",
            "", tip, ""]


def md_splits(runs: dict, splits: list[int], seeds: list[int], order: list[str],
              labels: dict[str, str]) -> list[str]:
    """Per split: the rows' table, their per-class IoU and what a seed's rows cost together."""
    md = []
    for split in splits:
        if not any(k[0] == split and k[1] in order for k in runs):
            md += [f"## {split} labeled images", "", "No run finished at this split yet (the "
                   "queue's order and estimates: \"Queued, not started\", below).", ""]
            continue
        mixed = mixed_lines(runs, split, order, seeds, labels)
        md += [f"## {split} labeled images", "", *table_split(runs, split, order, seeds, labels),
               "", *([*mixed, ""] if mixed else []), "Per-class IoU (mean over the seeds finished):", "",
               *table_per_class(runs, split, order, seeds, labels), ""]
        gaps = class_gap_lines(runs, split, seeds, labels)
        md += ["Per class, each semi-supervised row against SupOnly given its CPU time (IoU "
               "points, paired seeds):", "", *gaps, ""] if gaps else []
        cost = budget_lines(runs, split, seeds, order)
        md += ["What a seed's finished main and compute rows cost together:", "", *cost, ""] \
            if cost else []
    return md


def option_rows(spec: dict[str, Any]) -> list[str]:
    """The options tables' rows: SupOnly and UniMatch + CISC (the references), then the options."""
    return ["suponly", "unimatch_cisc", *spec["levers"], "ciscr", "ciscr_fresh", "fixmatch", "stpp"]


def md_options(runs: dict, split: int, seeds: list[int], spec: dict[str, Any],
               labels: dict[str, str]) -> list[str]:
    """The options at ``split``, one table per seed they ran (or are queued) at: the first seed
    always (CISC-R's stage start), another where the queue put an option (``option_seed``: the
    seed of the machine it ran on); each option's cost per CPU hour against SupOnly's runs at
    its own seed, on the same CPU and precision."""
    rows = option_rows(spec)
    opts = [r for r in rows if r not in ("suponly", "unimatch_cisc", "ciscr")]
    at = {s for (k, r, s) in runs if k == split and r in opts} | {
        s for k, s, r in spec.get("queued", []) if k == split and r in opts}
    out = []
    for s in sorted({seeds[0]} | (at & set(seeds))):
        mixed = mixed_lines(runs, split, rows, [s], labels)
        out += [f"## Options ({split} labels, seed {s})", "",
                *table_split(runs, split, rows, [s], labels), "", *mixed, *([""] if mixed else [])]
        if s == seeds[0]:
            out += [stage_start(runs, split, s), ""]
        done = [r for r in opts if r != "ciscr_fresh" and (split, r, s) in runs]
        if done:
            out += [f"Per CPU hour at seed {s}, each option against SupOnly's runs at that seed "
                    "(N and its CPU-time runs, on the option's CPU and precision; an estimate "
                    "read off those runs, linear between them, not a measurement):", "",
                    *break_even_lines(runs, split, s, spec["curve"], labels, rows=done), ""]
    return out


def write(args: argparse.Namespace, runs: dict, splits: list[int], seeds: list[int],
          argv: list[str], spec: dict[str, Any]) -> Path:
    """docs/results/<name>.md, .json and .png. ``spec``: labels, main, compute, curve, iters."""
    add_totals(runs)
    labels, out = spec["labels"], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = ("python benchmarks/camvid_labels.py " + shlex.join(
        a for a in argv if a != "--report-only")).strip()
    judged = not args.overrides and spec["iters"] == 480
    stem = out / args.name
    tgt = targets(runs, splits, seeds, judged)
    tip = advice(runs, splits, seeds, labels, spec["curve"])
    order = [*spec["main"], *[c for c in spec["compute"] if c != "suponly_compute"]]
    small = min(splits)
    options = option_rows(spec)
    curve = curve_points(runs, small, seeds[0], spec["curve"])  # SupOnly's, seed 0
    notes = superseded_lines(out / f"{args.name}-runs")
    for split in sorted(splits):
        if (matched := steps_matched(runs, split, "ciscr", seeds)):
            notes.append(f"- {labels['ciscr']} at {split} labels, at about equal steps: "
                         f"{matched[2:]} (the CISC-R target below is at SupOnly's N, as the "
                         "issue sets it).")
    md = [*md_head(runs, cmd, judged, spec["iters"], tgt, tip, labels, notes),
          *md_splits(runs, splits, seeds, order, labels),
          *md_options(runs, small, seeds, spec, labels),
          *md_diagnostics(runs, splits, seeds, [*order, *options[2:]], labels),
          "## SupOnly's learning curve (smallest split, seed 0)", "",
          *table_curve(curve), "", curve_end(curve, spec["queued"]), "",
          "Where the semi-supervised rows would pay per CPU hour (seed 0, an estimate read off "
          "that curve, not a measurement):", "",
          *break_even_lines(runs, small, seeds[0], spec["curve"], labels), "",
          lever_costs_line(out / "camvid_levers.json", spec.get("lever_overrides", [])), "",
          *other_curves(runs, splits, seeds[0], spec["curve"]),
          "## SupOnly given a row's CPU time (the rule's plans)", "",
          *table_plans(runs, splits, seeds, spec["compute"]), "",
          "## Figure", "", *figures(runs, splits, seeds, labels, spec["curve"], stem), "",
          "## In progress", ""]
    for split in splits:
        md += in_progress(Path(args.runs) / f"l{split}") or []
    md += ["", "## Queued, not started (the queue's order)", "",
           *queued_lines(runs, spec.get("queued", []), spec), ""]
    atomic_write_bytes(stem.with_suffix(".md"), "\n".join(md).encode())
    atomic_write_json(stem.with_suffix(".json"), {
        "command": cmd, "judged": judged, "iterations_n": spec["iters"],
        "machines": machines(runs), "targets": tgt, "advice": tip,
        "runs": [{k: v for k, v in r.items() if k not in ("class_names", "run_dir")}
                 for r in runs.values()]})
    if judged:
        update_readme(Path(args.out).parents[1] / "README.md",
                      headline(runs, splits, seeds, cmd, labels) + "\n\n"
                      + f"![the label curve](docs/results/{stem.name}.png)\n\n" + tip,
                      README_MARK)
    return stem.with_suffix(".md")
