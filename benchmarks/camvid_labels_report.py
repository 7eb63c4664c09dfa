"""The protocol-4 report (``benchmarks/camvid_labels.py``): each finished run's figures read from
its own artefacts, the targets judged on the paired differences, the markdown, JSON and figures.

Nothing here trains and nothing is typed in: every figure comes from a run directory (live or
archived under ``docs/results/camvid_labels-runs/``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from camvid_report import (
    TRAIN_STAGES,
    fmt,
    in_progress,
    judge,
    paired,
    read,
    read_yaml,
    update_readme,
)

from ciscr.utils.io import atomic_write_bytes, atomic_write_json, read_jsonl
from ciscr.utils.misc import precision_name

README_MARK = ("<!-- camvid-labels-headline: written by benchmarks/camvid_labels.py -->",
               "<!-- /camvid-labels-headline -->")
SSL = ["unimatch", "unimatch_cisc", "ciscr"]


# --------------------------------------------------------------------------- collecting


def invocations_complete(rd: Path, wall: dict[str, Any]) -> bool:
    """Whether wall.json holds every invocation of the run: each start writes a machine.jsonl
    line, each exit adds to wall.json (``invocations``; older wall.json: one). An invocation
    killed with its session never reaches wall.json, so its CPU time is missing there."""
    if "cpu_source" in wall:  # a run started by hand, recorded as such
        return True
    started = len([x for x in (rd / "machine.jsonl").read_text().splitlines() if x.strip()]) \
        if (rd / "machine.jsonl").exists() else 1
    return int(wall.get("invocations", 1)) >= started


def missing_stage_cpu(rd: Path, res: dict[str, Any]) -> str | None:
    """Why ciscr's own record has no CPU total when some of its stages have theirs: the
    stages without one (copied from a run that predates the record, or killed before it), and
    the CPU minutes of those that have it. None when no stage has a CPU time."""
    got = {s: (read(rd / s / "done.json") or {}).get("cpu_seconds") for s in res.get("stages", [])}
    known = {s: c for s, c in got.items() if c is not None}
    if not known:
        return None
    lack = [s for s, c in got.items() if c is None]
    return (f"stages {', '.join(lack)} have no CPU time in their record (copied from a run "
            f"that predates ciscr's CPU record, or killed before it); the others "
            f"({', '.join(known)}) took {sum(known.values()) / 60:.1f} CPU min")


def run_cost(rd: Path) -> dict[str, Any]:
    """A finished run's CPU and wall seconds and where they come from: ciscr's own record
    (results.json: each stage's CPU time summed over its invocations, kept in the checkpoints,
    so a killed invocation's work up to its last checkpoint counts; stages copied from another
    row are included), else the wait4 sum of wall.json when no invocation was killed; else
    unknown (None)."""
    res = read(rd / "results.json") or {}
    if res.get("cpu_seconds") is not None:
        return {"cpu_seconds": float(res["cpu_seconds"]), "wall_seconds": res.get("wall_seconds"),
                "includes_shared": True,
                "cpu_source": "ciscr's own record (results.json: each stage's CPU time, summed "
                              "over its invocations)"}
    wall = read(rd / "wall.json") or {}
    if not invocations_complete(rd, wall):
        return {"cpu_seconds": None, "wall_seconds": None, "includes_shared": False,
                "cpu_source": "unknown: " + (missing_stage_cpu(rd, res) or "an invocation was "
                              "killed before ciscr recorded CPU time in its checkpoints") +
                              " (rerun the row to measure it)"}
    return {"cpu_seconds": wall.get("cpu_seconds"), "wall_seconds": wall.get("seconds"),
            "includes_shared": False,
            "cpu_source": wall.get("cpu_source", "wait4 of the benchmark's own invocations")}


def collect(rd: Path, split: int, row: str, seed: int) -> dict[str, Any]:
    """One finished run's figures: val mIoU (its last checkpoint), per-class IoU, its training
    iterations (stages copied from another run included), its own measured wall / CPU seconds,
    the precision and CPU of each invocation, and its logged evaluations over training."""
    res = read(rd / "results.json")
    final = res["final_metrics"]
    cost = run_cost(rd)
    machines = [json.loads(x) for x in (rd / "machine.jsonl").read_text().splitlines()
                if x.strip()] if (rd / "machine.jsonl").exists() else []
    iterations, evals = 0, []
    for st in [s for s in res["stages"] if s in TRAIN_STAGES]:
        recs = read_jsonl(rd / st / "train.jsonl") if (rd / st / "train.jsonl").exists() else []
        evals += [(iterations + r["iteration"], r["val_miou"]) for r in recs if "val_miou" in r]
        iterations += max((r["iteration"] for r in recs), default=0)
    if not evals or evals[-1][0] != iterations:  # the final evaluation (the last checkpoint)
        evals.append((iterations, final["miou"]))
    return {"row": row, "seed": seed, "labeled": int(split), "val_miou": final["miou"],
            "iou": final["iou"], "class_names": final.get("class_names"),
            "iterations": iterations, **cost,
            "precision": sorted({precision_name(m["precision"]) for m in machines}),
            "machines": sorted({f"{m['machine']} (bf16 {'native' if m['bf16_native'] else 'emulated'})"
                                for m in machines}),
            "evals": evals, "run_dir": str(rd),
            "diagnostics": read(rd / "label_diagnostics.json"), "monitor": online_monitor(rd),
            "config": {k: read_yaml(rd / "config.yaml").get("train", {}).get(k)
                       for k in ("epochs", "unlabeled_epochs", "iters_per_epoch", "amp")}}


def online_monitor(rd: Path) -> dict[str, float] | None:
    """An online run's own monitor over the last quarter of its logged steps (train.jsonl):
    the share of unlabeled pixels that passed the mask and, scored against the pool's ground
    truth (logged, never trained on), the accuracy of the pseudo labels and of those passed."""
    path = rd / "online" / "train.jsonl"
    recs = [r for r in read_jsonl(path) if "mask_ratio" in r] if path.exists() else []
    if not recs:
        return None
    last = recs[len(recs) * 3 // 4:]
    return {k: statistics.fmean(r[k] for r in last) for k in
            ("mask_ratio", "pseudo_acc", "pseudo_acc_selected") if all(k in r for r in last)}


def with_stage1(row: str, own: dict[str, Any], stage1: dict[str, Any] | None) -> dict[str, Any]:
    """A run's total CPU and wall seconds: CISC-R's include its stage 1, the split's suponly run
    (shared, not retrained), unless its own record already does (``includes_shared``); None
    where a part is unknown. The one rule the queue (the CPU given to suponly_compute_ciscr)
    and the report (every cost comparison) both use."""
    keys = ("cpu_seconds", "wall_seconds")
    if row != "ciscr" or own.get("includes_shared"):
        return {k: own.get(k) for k in keys}
    sup = stage1 or {}
    return {k: None if own.get(k) is None or sup.get(k) is None else own[k] + sup[k]
            for k in keys}


def add_totals(runs: dict) -> None:
    """``cpu_minutes`` / ``wall_minutes``: each run's total (with_stage1), the figure every cost
    comparison uses."""
    for (split, row, seed), r in runs.items():
        total = with_stage1(row, r, runs.get((split, "suponly", seed)))
        r["cpu_minutes"] = None if total["cpu_seconds"] is None else total["cpu_seconds"] / 60
        r["wall_minutes"] = None if total["wall_seconds"] is None else total["wall_seconds"] / 60


def vals(runs: dict, split: int, row: str, seeds: list[int], key: str = "val_miou") -> list:
    return [(runs.get((split, row, s)) or {}).get(key) for s in seeds]


def mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    got = [x for x in xs if x is not None]
    if not got:
        return None, None
    return statistics.fmean(got), (statistics.stdev(got) if len(got) > 1 else None)


# --------------------------------------------------------------------------- tables


def table_split(runs: dict, split: int, rows: list[str], seeds: list[int],
                labels: dict[str, str]) -> list[str]:
    out = [f"| {split} labels | val mIoU, mean ± std | per seed | minus SupOnly (paired ± SE) "
           "| minus SupOnly at its CPU time | iterations | CPU min | wall min | precision |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        xs = vals(runs, split, r, seeds)
        if all(x is None for x in xs):
            continue
        got = [runs[(split, r, s)] for s in seeds if runs.get((split, r, s))]
        m, sd = mean_std(xs)
        per = " / ".join(fmt(x) for x in xs)
        _, d_sup = paired(xs, vals(runs, split, "suponly", seeds))
        _, d_cmp = paired(xs, vals(runs, split, compute_row_of(runs, split, r, seeds), seeds))
        cost = {k: mean_std([g[k] for g in got])[0] for k in ("iterations", "cpu_minutes",
                                                               "wall_minutes")}
        prec = ", ".join(sorted({p for g in got for p in g["precision"]})) or "n/a"
        out.append(f"| {labels[r]} | {fmt(m, sd)} | {per} | {d_sup if r != 'suponly' else ''} "
                   f"| {d_cmp if r in SSL else ''} | {_num(cost['iterations'])} "
                   f"| {_num(cost['cpu_minutes'], 1)} | {_num(cost['wall_minutes'], 1)} | {prec} |")
    return out


def _num(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def compute_row_of(runs: dict, split: int, row: str, seeds: list[int]) -> str:
    """The SupOnly run given ``row``'s CPU time (its compute_match.json says which rows)."""
    for name in ("suponly_compute", f"suponly_compute_{row}"):
        for s in seeds:
            rec = runs.get((split, name, s))
            if rec and row in (read(Path(rec["run_dir"]) / "compute_match.json") or {}).get("rows", []):
                return name
    return f"suponly_compute_{row}"


def table_per_class(runs: dict, split: int, rows: list[str], seeds: list[int],
                    labels: dict[str, str]) -> list[str]:
    names = next((r["class_names"] for r in runs.values() if r.get("class_names")), None)
    if not names:
        return ["(no finished run)"]
    out = ["| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        got = [runs[(split, r, s)] for s in seeds if runs.get((split, r, s))]
        if got:
            cells = [fmt(statistics.fmean([g["iou"][k] or 0.0 for g in got]))
                     for k in range(len(names))]
            out.append(f"| {labels[r]} (n={len(got)}) | " + " | ".join(cells) + " |")
    return out


def table_plans(runs: dict, splits: list[int], seeds: list[int], compute: dict) -> list[str]:
    out = ["| split | seed | SupOnly run | given the CPU time of | CPU min given | SupOnly's "
           "CPU min at N | its iterations |", "|---|---|---|---|---|---|---|"]
    for split in splits:
        for s in seeds:
            for name in compute:
                rec = runs.get((split, name, s))
                plan = read(Path(rec["run_dir"]) / "compute_match.json") if rec else None
                if plan:
                    out.append(f"| {split} | {s} | {name} | {', '.join(plan['rows'])} "
                               f"| {plan['cpu_seconds'] / 60:.1f} "
                               f"| {plan['suponly_cpu_seconds'] / 60:.1f} | {plan['iterations']} |")
    return out


def budget_lines(runs: dict, split: int, seeds: list[int], rows: list[str]) -> list[str]:
    """Per seed, what its finished main and compute runs cost together against the issue's
    budget (one (split, seed) of main rows in <= 150 minutes of wall, two runs at a time on 2
    cores): their CPU minutes (CISC-R's without its shared stage 1, counted once, in SupOnly)
    over the 2 cores, a lower bound on that wall, and their measured wall minutes over 2."""
    out = []
    for s in seeds:
        got = [r for r in rows if runs.get((split, r, s))]
        cpus = [own_minutes(runs, (split, r, s)) for r in got]
        if not got or any(c is None for c in cpus):
            continue
        cpu = sum(cpus)
        wall = sum(own_minutes(runs, (split, r, s), "wall_minutes") or 0.0 for r in got)
        out.append(f"- seed {s} ({', '.join(got)}): {cpu:.0f} CPU min, {cpu / 2:.0f} min of "
                   f"wall on 2 cores at best; measured wall / 2: {wall / 2:.0f} min "
                   f"(the issue's budget: 150)")
    return out


def own_minutes(runs: dict, key: tuple[int, str, int], kind: str = "cpu_minutes") -> float | None:
    """A finished run's CPU (or, ``kind="wall_minutes"``, wall) minutes without the shared
    stage 1 it did not train (CISC-R's: its split's suponly run, counted there)."""
    r = runs.get(key)
    if not r or r.get(kind) is None or key[1] != "ciscr":
        return r.get(kind) if r else None
    sup = (runs.get((key[0], "suponly", key[2])) or {}).get(kind)
    return None if sup is None else r[kind] - sup


def estimate_cpu(runs: dict, split: int, row: str, spec: dict) -> tuple[float | None, str]:
    """A queued run's CPU minutes estimated from measured runs, and the basis: the mean of
    the same row's finished runs at this split, else at any split (a step costs the same at
    every split); a curve row: its multiple of SupOnly's; a compute row: the CPU time of the
    rows it is given (the rule); else (None, "no run of its kind measured yet")."""
    def mean_of(r: str, own: bool = True) -> tuple[float | None, str]:
        for where, keys in (("this split", [k for k in runs if k[0] == split and k[1] == r]),
                            ("another split", [k for k in runs if k[1] == r])):
            got = [c for k in keys if (c := own_minutes(runs, k) if own else
                                       runs[k].get("cpu_minutes")) is not None]
            if got:
                return statistics.fmean(got), f"{r}: {len(got)} run(s) at {where}"
        return None, "no run of its kind measured yet"

    est, basis = mean_of(row)
    if est is None and row in spec["curve"]:
        sup, _ = mean_of("suponly")
        if sup is not None:
            return spec["curve"][row] * sup, f"{spec['curve'][row]} x SupOnly's at N"
    if est is None and row in spec["compute"]:
        given = [e for r in spec["compute"][row] if (e := mean_of(r, own=False)[0]) is not None]
        if given:
            return statistics.fmean(given), f"the CPU time of {', '.join(spec['compute'][row])}"
    return est, basis


def queued_lines(runs: dict, queued: list[tuple[int, int, str]], spec: dict) -> list[str]:
    """The runs the queue has not started, in its order, one line per (split, row) with its
    seeds and estimated CPU minutes each, and what they add up to on 2 cores: what the rest of
    the protocol costs. suponly_compute_unimatch runs only where the rule needs it (UniMatch's
    CPU time not within 10 % of UniMatch + CISC's), so it is listed but not counted."""
    if not queued:
        return ["(nothing)"]
    groups: dict[tuple[int, str], list[int]] = {}
    for split, seed, row in queued:
        groups.setdefault((split, row), []).append(seed)
    out = ["| labels | row | seeds | estimated CPU min each | from |", "|---|---|---|---|---|"]
    total, unknown = 0.0, 0
    for (split, row), seeds in groups.items():
        est, basis = estimate_cpu(runs, split, row, spec)
        if row == "suponly_compute_unimatch":
            basis = "only where the rule needs it: not counted"
        elif est is None:
            unknown += len(seeds)
        else:
            total += est * len(seeds)
        out.append(f"| {split} | {spec['labels'][row]} | {', '.join(map(str, seeds))} "
                   f"| {_num(est, 0)} | {basis} |")
    return out + ["", f"In all about {total:.0f} CPU min, {total / 120:.1f} h on 2 cores at two "
                  "runs at a time" + (f", plus {unknown} run(s) not estimated" if unknown else "")
                  + " (estimates from the measured runs, not measurements)."]


def curve_points(runs: dict, split: int, seed: int, curve: dict, iters: int) -> list[tuple]:
    """SupOnly's learning curve: (iterations, val mIoU of the LAST checkpoint, CPU minutes)
    of every SupOnly run of (split, seed), each its own schedule."""
    names = ["suponly", *curve, "suponly_compute", "suponly_compute_unimatch",
             "suponly_compute_ciscr"]
    pts = {(r["iterations"], r["val_miou"], r["cpu_minutes"])
           for n in names if (r := runs.get((split, n, seed)))}
    return sorted(pts)


def break_even(points: list[tuple], target: float) -> tuple[float | None, str]:
    """Where SupOnly's measured curve (``curve_points``: iterations, mIoU, CPU minutes), linear
    between its runs, first reaches ``target`` mIoU: (CPU minutes, how), or (None, why not)."""
    pts = sorted((p[2], p[1], p[0]) for p in points if p[2] is not None)
    if not pts:
        return None, "no SupOnly run measured"
    if pts[0][1] >= target:
        return pts[0][0], f"at most: its smallest run ({pts[0][2]} iterations) is already there"
    for (c0, m0, i0), (c1, m1, i1) in zip(pts, pts[1:], strict=False):
        if m0 < target <= m1:
            return c0 + (c1 - c0) * (target - m0) / (m1 - m0), \
                f"linear between its runs of {i0} and {i1} iterations"
    return None, f"beyond its longest measured run ({pts[-1][2]} iterations)"


def break_even_lines(runs: dict, split: int, seed: int, curve: dict,
                     labels: dict[str, str]) -> list[str]:
    """Per semi-supervised row (one seed): the CPU time at which SupOnly's curve reaches the
    row's mIoU, over the row's own CPU time: the cost the row (e.g. by section 2's levers)
    would have to come down to for the unlabeled images to pay per CPU hour at its mIoU."""
    pts = curve_points(runs, split, seed, curve, 0)
    out = []
    for row in SSL:
        r = runs.get((split, row, seed))
        if not r or r.get("cpu_minutes") is None:
            continue
        cpu, how = break_even(pts, r["val_miou"])
        got = (f"SupOnly's curve reaches that at about {cpu:.1f} CPU min ({how}): the row pays "
               f"per CPU hour at {cpu / r['cpu_minutes']:.2f} x its measured cost or less"
               if cpu is not None else f"SupOnly's curve does not reach it ({how})")
        out.append(f"- {labels[row]}: {fmt(r['val_miou'])} at {r['cpu_minutes']:.1f} CPU min; "
                   + got)
    return out or ["(no semi-supervised row finished with its CPU time)"]


def lever_costs_line(levers_json: Path, lever_overrides: list[list[str]]) -> str:
    """Section 2's levers (the option rows' overrides) next to those ratios: each one's step
    cost as a share of a UniMatch + CISC step, from camvid_levers.json (a step, not a run:
    evaluations, the bank's refresh and pseudo-labelling are outside it)."""
    rec = read(levers_json) or {}
    steps, over = rec.get("mean_step_seconds", {}), rec.get("overrides", {})
    ref = steps.get("unimatch_cisc")
    levers = {k: v / ref for k, v in steps.items() if ref and over.get(k) in lever_overrides}
    if not levers:
        return f"(no lever costs measured: {levers_json.name} is missing)"
    each = ", ".join(f"`{' '.join(over[k])}` {x:.2f}" for k, x in sorted(levers.items(),
                                                                         key=lambda kv: kv[1]))
    return (f"Section 2's levers, one setting each, cost per step as a share of a UniMatch + CISC "
            f"step ({levers_json.name}, `python benchmarks/camvid_levers.py`): {each}; what "
            "each does to mIoU is its option row.")


def table_curve(points: list[tuple]) -> list[str]:
    out = ["| iterations | val mIoU (last checkpoint) | CPU min | gain over the previous |",
           "|---|---|---|---|"]
    prev = None
    for it, m, cpu in points:
        gain = "" if prev is None else f"{100 * (m - prev[1]):+.2f} (x{it / prev[0]:.1f} steps)"
        out.append(f"| {it} | {fmt(m)} | {_num(cpu, 1)} | {gain} |")
        prev = (it, m)
    return out


DIAG_COLUMNS = (("pseudo_miou", "pseudo-label mIoU"), ("pseudo_acc", "pixel accuracy"),
                ("mask_ratio", "passed the mask"), ("mask_precision", "right where passed"),
                ("taught", "right and passed"))


def table_diagnostics(runs: dict, split: int, rows: list[str], seeds: list[int],
                      labels: dict[str, str]) -> list[str]:
    """The final models' pseudo labels on the unlabeled pool (camvid_labels_diagnostics.py),
    each online row's own monitor over its last quarter, mean over the seeds diagnosed."""
    out = ["| row (seeds) | " + " | ".join(t for _, t in DIAG_COLUMNS) + " | AUROC confidence "
           "| AUROC CISC | training, last quarter: passed / right / right where passed |",
           "|---|" + "---|" * (len(DIAG_COLUMNS) + 3)]
    for r in rows:
        got = [d for s in seeds if (d := (runs.get((split, r, s)) or {}).get("diagnostics"))]
        if not got:
            continue
        cells = [pct([g[k] for g in got]) for k, _ in DIAG_COLUMNS]
        cells += [f"{statistics.fmean(g['auroc'][n] for g in got):.3f}" for n in ("confidence", "cisc")]
        mons = [m for s in seeds if (m := (runs.get((split, r, s)) or {}).get("monitor"))]
        cells.append(" / ".join(pct([m.get(k) for m in mons]) for k in
                                ("mask_ratio", "pseudo_acc", "pseudo_acc_selected")) if mons else "")
        out.append(f"| {labels[r]} ({len(got)}) | " + " | ".join(cells) + " |")
    return out if len(out) > 2 else ["(no run diagnosed yet: `python "
                                     "benchmarks/camvid_labels_diagnostics.py --all`)"]


def pct(xs: list[float | None]) -> str:
    """The mean of the known values, in percent, one decimal (n/a when none)."""
    got = [x for x in xs if x is not None]
    return "n/a" if not got else f"{100 * statistics.fmean(got):.1f}"


def table_taught(runs: dict, split: int, rows: list[str], seeds: list[int],
                 labels: dict[str, str]) -> list[str]:
    """Per class: the pool's share, then each diagnosed row's pseudo-label IoU and the share of
    the class its unlabeled loss would teach right (passed the mask and right), in percent."""
    diag = _diagnosed(runs, split, rows, seeds)
    if not diag:
        return []
    names = next(iter(diag.values()))[0]["classes"]
    out = ["| class | share of the pool | " + " | ".join(
        f"{labels[r]}: IoU / taught" for r in diag) + " |", "|---|---|" + "---|" * len(diag)]
    for k, name in enumerate(names):
        share = pct([d["per_class"]["gt_share"][k] for v in diag.values() for d in v])
        cells = [f"{pct([d['per_class']['pseudo_iou'][k] for d in v])} / "
                 f"{pct([d['per_class']['taught'][k] for d in v])}" for v in diag.values()]
        out.append(f"| {name} | {share} | " + " | ".join(cells) + " |")
    return out


def _diagnosed(runs: dict, split: int, rows: list[str], seeds: list[int]) -> dict[str, list]:
    """Each row's diagnostics over the seeds diagnosed (rows with none left out)."""
    diag = {r: [d for s in seeds if (d := (runs.get((split, r, s)) or {}).get("diagnostics"))]
            for r in rows}
    return {r: v for r, v in diag.items() if v}


def diagnostic_findings(runs: dict, split: int, rows: list[str], seeds: list[int]) -> list[str]:
    """What the semi-supervised rows' diagnostics show at ``split`` (means over the seeds
    diagnosed; the issue's "what the diagnostics show" where a target is missed): the classes
    no row teaches, how right the passed pixels are and how many pass, and whether the CISC
    weight or the confidence tells right pseudo labels from wrong ones better."""
    diag = _diagnosed(runs, split, rows, seeds)
    if not diag:
        return []
    names = next(iter(diag.values()))[0]["classes"]

    def cls(r: str, key: str, k: int) -> float:
        return statistics.fmean(d["per_class"][key][k] for d in diag[r])

    def span(get: Callable[[dict], float], scale: float = 100.0, digits: int = 1) -> str:
        """min-max over the rows of each row's mean over its seeds."""
        xs = [scale * statistics.fmean(get(d) for d in diag[r]) for r in diag]
        return f"{min(xs):.{digits}f}-{max(xs):.{digits}f}"

    starved = [k for k in range(len(names)) if all(cls(r, "taught", k) < 0.01 for r in diag)]
    out = []
    if starved:
        share = 100 * sum(cls(r, "gt_share", k) for k in starved for r in diag) / len(diag)
        best = max(100 * cls(r, "pseudo_iou", k) for k in starved for r in diag)
        out.append(f"- Classes no semi-supervised row teaches (under 1 % of the class's pool "
                   f"pixels pass the mask and are right, in every row): "
                   f"{', '.join(names[k] for k in starved)}, {share:.1f} % of the pool's pixels; "
                   f"their pseudo-label IoU is at most {best:.1f} in any row.")
    right, passed = span(lambda d: d["mask_precision"]), span(lambda d: d["mask_ratio"])
    out.append(f"- Where pixels pass the mask their labels are right {right} % of the time; "
               f"{passed} % of the pool's pixels pass (the range over the rows).")
    conf, cisc = (span(lambda d, n=n: d["auroc"][n], 1.0, 3) for n in ("confidence", "cisc"))
    worse = sum(statistics.fmean(d["auroc"]["cisc"] for d in v)
                < statistics.fmean(d["auroc"]["confidence"] for d in v) for v in diag.values())
    out.append(f"- Telling right pseudo labels from wrong ones (AUROC): the confidence {conf}, "
               f"the CISC weight {cisc}; the CISC weight separates less well than the confidence "
               f"in {worse} of {len(diag)} rows.")
    return out


# --------------------------------------------------------------------------- targets


def best_of(runs: dict, split: int, a: str, b: str, seeds: list[int]) -> list[float | None]:
    return [None if x is None or y is None else max(x, y)
            for x, y in zip(vals(runs, split, a, seeds), vals(runs, split, b, seeds), strict=True)]


def best_compute_pair(runs: dict, split: int, seeds: list[int]) -> tuple[list, list]:
    """Per seed: the best semi-supervised row's mIoU and SupOnly's at that row's CPU time."""
    xs, refs = [], []
    for s in seeds:
        cands = [(runs[(split, r, s)]["val_miou"], r) for r in SSL if runs.get((split, r, s))]
        best = max(cands) if len(cands) == len(SSL) else None
        ref = runs.get((split, compute_row_of(runs, split, best[1], [s]), s)) if best else None
        xs.append(best[0] if best and ref else None)
        refs.append(ref["val_miou"] if best and ref else None)
    return xs, refs


def targets(runs: dict, splits: list[int], seeds: list[int], judged: bool) -> list[dict]:
    small, large = min(splits), max(splits)
    sup = {k: vals(runs, k, "suponly", seeds) for k in splits}
    checks = [(f"{small} labels, equal steps: the better of UniMatch / UniMatch + CISC >= "
               "SupOnly + 6", best_of(runs, small, "unimatch", "unimatch_cisc", seeds), sup[small], 6.0),
              (f"{small} labels, equal CPU time: the best semi-supervised row >= SupOnly given "
               "that row's CPU time + 0", *best_compute_pair(runs, small, seeds), 0.0),
              (f"{small} labels, equal steps: CISC-R >= SupOnly + 4",
               vals(runs, small, "ciscr", seeds), sup[small], 4.0)]
    if large != small:
        checks.append((f"{large} labels, equal steps: the better of UniMatch / UniMatch + CISC "
                       ">= SupOnly + 3", best_of(runs, large, "unimatch", "unimatch_cisc", seeds),
                       sup[large], 3.0))
    checks += [(f"{k} labels: UniMatch + CISC >= UniMatch", vals(runs, k, "unimatch_cisc", seeds),
                vals(runs, k, "unimatch", seeds), 0.0) for k in sorted(splits)]
    out = []
    for text, xs, ref, need in checks:
        d, n, verdict = judge(xs, ref, need, judged, "not the protocol")
        out.append({"target": text, "difference": d, "seeds": n, "verdict": verdict})
    return out


# --------------------------------------------------------------------------- figures


def figures(runs: dict, splits: list[int], seeds: list[int], labels: dict[str, str],
            curve: dict, stem: Path) -> list[str]:
    """Two PNGs: val mIoU against labeled images (one line per main row) and, at the smallest
    split, val mIoU against CPU minutes (each run's logged evaluations, SupOnly's curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per row in both panels; seeds differ by line style (SupOnly: and by marker).
    color = {r: f"C{i}" for i, r in enumerate(["suponly", *SSL, "suponly_compute", "ciscr_fresh",
                                                "fixmatch", "stpp"])}
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in ["suponly", *SSL, "suponly_compute"]:
        pts = [(k, *mean_std(vals(runs, k, r, seeds))) for k in sorted(splits)]
        pts = [(k, m, sd or 0.0) for k, m, sd in pts if m is not None]
        # The seeds behind each mean, per split: rows finish seeds at different times.
        n = "/".join(str(sum(v is not None for v in vals(runs, k, r, seeds))) for k, *_ in pts)
        if pts:
            ax[0].errorbar([p[0] for p in pts], [100 * p[1] for p in pts],
                           yerr=[100 * p[2] for p in pts], marker="o", capsize=3,
                           label=f"{labels[r]} (seeds: {n})", color=color[r])
    ax[0].set(xlabel="labeled images", ylabel="val mIoU (%), mean ± std over seeds",
              title="CamVid: the label curve")
    small = min(splits)
    for r in [*SSL, "ciscr_fresh", "fixmatch", "stpp"]:
        for s, style in zip(seeds, ["-", ":", "-.", "--"] * len(seeds), strict=False):
            rec = runs.get((small, r, s))
            if rec and rec["evals"] and rec["cpu_minutes"]:
                per_it = rec["cpu_minutes"] / rec["iterations"]
                ax[1].plot([it * per_it for it, _ in rec["evals"]],
                           [100 * m for _, m in rec["evals"]], marker=".", alpha=0.8,
                           color=color[r], linestyle=style, label=f"{labels[r]} s{s}")
    for i, s in enumerate(seeds):
        pts = curve_points(runs, small, s, curve, 0)
        if pts:
            ax[1].plot([p[2] for p in pts], [100 * p[1] for p in pts], color="k",
                       linestyle=["--", ":", "-."][i % 3], marker="osD"[i % 3],
                       label=f"SupOnly, last checkpoint of runs of each length, s{s}")
    ax[1].set(xlabel="CPU minutes (1 thread)", ylabel="val mIoU (%)",
              title=f"{small} labels: mIoU against CPU time")
    # Legends below the panels: inside, some placement always hides a point or an error bar.
    for a in ax:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:  # nothing finished yet: no empty legend
            a.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    png = stem.with_suffix(".png")
    fig.savefig(png.with_suffix(".tmp.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    png.with_suffix(".tmp.png").replace(png)
    return [f"![label curve and CPU time]({png.name})",
            "", "Right panel: a run's evaluations are placed at CPU minutes = its measured CPU "
            "time x the share of its iterations done (pseudo-labelling and evaluations spread "
            "evenly: an approximation); the dashed line is SupOnly's curve from the last "
            "checkpoints of whole runs, each with its own learning-rate schedule."]


# --------------------------------------------------------------------------- the report


def machines(runs: dict) -> list[str]:
    return sorted({m for r in runs.values() for m in r["machines"]}) or ["(not recorded)"]


def headline(runs: dict, splits: list[int], seeds: list[int], cmd: str,
             labels: dict[str, str]) -> str:
    """One line for README "Results": at the smallest split, each semi-supervised row's paired
    difference with SupOnly at equal steps and with SupOnly at that row's CPU time."""
    small = min(splits)
    sup = vals(runs, small, "suponly", seeds)
    parts = []
    for r in SSL:
        d, d_txt = paired(vals(runs, small, r, seeds), sup)
        dc, dc_txt = paired(vals(runs, small, r, seeds),
                            vals(runs, small, compute_row_of(runs, small, r, seeds), seeds))
        in_all = stages_in_all(runs, small, r)
        steps = "at equal steps" if in_all is None else f"at N steps per stage ({in_all} in all)"
        if d is not None:
            parts.append(f"{labels.get(r, r)} {d_txt} {steps}"
                         + (f", {dc_txt} at equal CPU time" if dc is not None else ""))
    if not parts:
        return f"CamVid label curve: no semi-supervised row finished yet (`{cmd}`)."
    return (f"CamVid label curve, {small} labeled images, mIoU points over SupOnly, paired by "
            f"seed (n: the seeds of {len(seeds)} finished for both): {'; '.join(parts)} "
            f"(`{cmd}`; docs/results/camvid_labels.md).")


def advice(runs: dict, splits: list[int], seeds: list[int], labels: dict[str, str],
           curve: dict) -> str:
    """The sentence README "Results" gives a user, written from the measured paired differences
    at the smallest split: does the best semi-supervised row pay per step (against SupOnly at N)
    and per CPU hour (against SupOnly given its CPU time), and how much SupOnly gained from
    doubling its steps (its curve, seed 0): the case for training longer instead."""
    small = min(splits)
    sup = vals(runs, small, "suponly", seeds)
    per_step = {r: paired(vals(runs, small, r, seeds), sup) for r in SSL}
    per_step = {r: v for r, v in per_step.items() if v[0] is not None}
    if not per_step:
        return "Not written yet: no semi-supervised row has finished."
    best = max(per_step, key=lambda r: per_step[r][0])
    d, d_txt = per_step[best]
    n = sum(x is not None and y is not None
            for x, y in zip(vals(runs, small, best, seeds), sup, strict=True))
    in_all = stages_in_all(runs, small, best)
    stages = "" if in_all is None else f" (N per training stage, {in_all} in all)"
    n_its = ", ".join(map(str, iterations_of(runs, small, "suponly"))) or "n/a"
    out = [f"With {small} labeled images and N = {n_its} steps ({n} of "
           f"{len(seeds)} seeds so far), the best semi-supervised row here, {labels[best]}"
           f"{stages}, {'gains' if d > 0 else 'does not gain'} over SupOnly at N steps "
           f"({d_txt} mIoU points). "]
    per_cpu = {r: paired(vals(runs, small, r, seeds),
                         vals(runs, small, compute_row_of(runs, small, r, seeds), seeds))
               for r in per_step}
    measured = {r: v for r, v in per_cpu.items() if v[0] is not None}
    pending = [labels[r] for r in per_step if r not in measured]
    later = f" ({', '.join(pending)}: not measured yet)" if pending else ""
    if not measured:
        return "".join(out) + "Per CPU hour: not measured yet (SupOnly given a row's CPU time " \
            "has not finished)."
    lead = max(measured, key=lambda r: measured[r][0])
    each = "; ".join(f"{labels[r]} {v[1]}" for r, v in measured.items())
    if measured[lead][0] >= 0:
        return "".join(out) + (f"Per CPU hour, {labels[lead]} still leads SupOnly trained for "
                               f"the same CPU time ({each}){later}: on this budget the unlabeled "
                               "images pay per CPU hour too.")
    out.append(f"Per CPU hour, SupOnly trained for the same CPU time is ahead of every "
               f"semi-supervised row measured ({each}){later}: on this budget, train SupOnly "
               "longer before paying for an unlabeled branch")
    pts = curve_points(runs, small, seeds[0], curve, 0)
    doubling = [(b[1] - a[1]) for a, b in zip(pts, pts[1:], strict=False) if b[0] == 2 * a[0]]
    out.append(f" (SupOnly gained {100 * doubling[-1]:+.2f} points from its last measured "
               "doubling of steps, seed 0); use the unlabeled images once more steps stop "
               "paying." if doubling else ".")
    return "".join(out)


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


def iterations_of(runs: dict, split: int, row: str) -> list[int]:
    """The training iterations of ``row``'s finished runs at ``split`` (sorted, distinct)."""
    return sorted({r["iterations"] for (k, name, _), r in runs.items() if k == split and name == row})


def stages_in_all(runs: dict, split: int, row: str) -> str | None:
    """``row``'s iterations in all ("1440") where they differ from SupOnly's N (CISC-R's
    stages of N each); None at equal steps."""
    its = iterations_of(runs, split, row)
    return None if its == iterations_of(runs, split, "suponly")[:1] else "/".join(map(str, its))


INTRO = ("Every row from ImageNet on the same labeled split of its seed, val mIoU of the LAST "
         "checkpoint (101 val images). N = {iters} iterations per training stage (the rule: "
         "benchmarks/camvid_labels.py's header). Costs are each run's own measured CPU and wall "
         "time on 2 cores, two runs at a time, one thread each, from ciscr's own record "
         "(results.json: each stage's CPU time summed over the invocations that ran it, kept in "
         "its checkpoints, so a session's end loses nothing measured) or, for runs finished "
         "before ciscr kept it, the wait4 sum of the benchmark's invocations; CISC-R's include "
         "its stage 1 (the SupOnly run). Wall time also counts any time the queue was paused "
         "(SIGSTOP while the test suite or CI was timed on the same machine); CPU time does "
         "not, which is why every comparison uses CPU time.")
DIAG_INTRO = ("Each run's FINAL model labels its split's unlabeled pool as an online step labels "
              "its weak view, scored against the pool's ground truth (never trained on; "
              "`benchmarks/camvid_labels_diagnostics.py`, run by the queue after each run): "
              "pseudo-label mIoU and pixel accuracy, the share of pixels that pass the confidence "
              "mask, the share of those that are right, the share of all pixels that pass and "
              "are right, and the AUROC of telling right from wrong labels by the confidence and "
              "by the CISC weight (the labeled images' prototype bank through the same model); "
              "then the online rows' own monitor over the last quarter of training (the pixels "
              "passed, the online labels' accuracy, their accuracy where passed). A SupOnly row "
              "shows what its pseudo labels would have been. Percent, mean over the seeds "
              "diagnosed.")


def md_head(runs: dict, cmd: str, judged: bool, iters: int, tgt: list[dict],
            tip: str) -> list[str]:
    """The page's title, command, protocol and machines, then the targets and the advice."""
    return [f"# CamVid protocol 4: the label curve{'' if judged else ' (NOT the protocol)'}", "",
            f"Command: `{cmd}` (resumable; `--report-only` rewrites this page). Generated "
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}; nothing typed by hand.",
            "", INTRO.format(iters=iters), "",
            "Machines (CPU, bf16 support, as recorded by each invocation):",
            *[f"- {m}" for m in machines(runs)], "",
            *[f"- CPU time of `l{k[0]}/{k[1]}_s{k[2]}`: {r['cpu_source']}" for k, r in
              sorted(runs.items()) if not r["cpu_source"].startswith(("wait4", "ciscr's own"))],
            "", "## Targets", "", *[f"- {t['target']}: {t['verdict']}" for t in tgt], "",
            "## When it pays (the sentence README gives users, written from the figures below)",
            "", tip, ""]


def md_splits(runs: dict, splits: list[int], seeds: list[int], order: list[str],
              labels: dict[str, str]) -> list[str]:
    """Per split: the rows' table, their per-class IoU and what a seed's rows cost together."""
    md = []
    for split in splits:
        md += [f"## {split} labeled images", "", *table_split(runs, split, order, seeds, labels),
               "", "Per-class IoU (mean over the seeds finished):", "",
               *table_per_class(runs, split, order, seeds, labels), ""]
        cost = budget_lines(runs, split, seeds, order)
        md += ["What a seed's finished main and compute rows cost together:", "", *cost, ""] \
            if cost else []
    return md


def md_diagnostics(runs: dict, splits: list[int], seeds: list[int], rows: list[str],
                   labels: dict[str, str]) -> list[str]:
    """The pseudo-label diagnostics per split, and per class at the smallest split; a row named
    twice (a main row that is also an option) is tabled once."""
    rows = list(dict.fromkeys(rows))
    md = ["## Diagnostics: what the unlabeled branch could learn from", "", DIAG_INTRO, ""]
    for split in splits:
        md += [f"{split} labels:", "", *table_diagnostics(runs, split, rows, seeds, labels), ""]
    md += [f"Per class at {min(splits)} labels (pseudo-label IoU / share of the class's "
                 "pixels that pass the mask and are right), mean over the seeds diagnosed:", "",
                 *table_taught(runs, min(splits), ["suponly", *SSL], seeds, labels), ""]
    for split in splits:
        found = diagnostic_findings(runs, split, SSL, seeds)
        md += [f"What the semi-supervised rows' diagnostics show at {split} labels (read off "
               "the tables above):", "", *found, ""] if found else []
    return md


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
    options = ["suponly", "unimatch_cisc", *spec["levers"], "ciscr", "ciscr_fresh", "fixmatch",
               "stpp"]
    md = [*md_head(runs, cmd, judged, spec["iters"], tgt, tip),
          *md_splits(runs, splits, seeds, order, labels),
          "## Options (seed 0, the smallest split)", "",
          *table_split(runs, small, options, seeds[:1], labels), "",
          stage_start(runs, small, seeds[0]), "",
          *md_diagnostics(runs, splits, seeds, [*order, *options[2:]], labels),
          "## SupOnly's learning curve (smallest split, seed 0)", "",
          *table_curve(curve_points(runs, small, seeds[0], spec["curve"], spec["iters"])), "",
          "Where the semi-supervised rows would pay per CPU hour (seed 0, an estimate read off "
          "that curve, not a measurement):", "",
          *break_even_lines(runs, small, seeds[0], spec["curve"], labels), "",
          lever_costs_line(out / "camvid_levers.json", spec.get("lever_overrides", [])), "",
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
        "runs": [{k: v for k, v in r.items() if k != "class_names"} for r in runs.values()]})
    if judged:
        update_readme(Path(args.out).parents[1] / "README.md",
                      headline(runs, splits, seeds, cmd, labels) + "\n\n"
                      + f"![the label curve](docs/results/{stem.name}.png)\n\n" + tip,
                      README_MARK)
    return stem.with_suffix(".md")
