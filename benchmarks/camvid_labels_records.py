"""Protocol 4's run records (``benchmarks/camvid_labels.py``): each finished run's figures
read from its own artefacts (val mIoU, per-class IoU, iterations, measured CPU and wall time,
its logged evaluations, diagnostics), and the small reads over them that the tables and the
report share.

Nothing here trains and nothing is typed in: every figure comes from a run directory (live or
archived under ``docs/results/camvid_labels-runs/``).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from camvid_report import (
    TRAIN_STAGES,
    read,
    read_yaml,
)

from ciscr.utils.io import read_jsonl
from ciscr.utils.misc import precision_name

SSL = ["unimatch", "unimatch_cisc", "ciscr"]


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
    iterations, evals, cpu_at = 0, [], []
    cpu_before = 0.0  # CPU seconds of the stages before this one (None: one is not known)
    for st, info in res["stages"].items():
        stage_cpu = info.get("cpu_seconds") if isinstance(info, dict) else None
        if st in TRAIN_STAGES:
            recs = read_jsonl(rd / st / "train.jsonl") if (rd / st / "train.jsonl").exists() else []
            its = max((r["iteration"] for r in recs), default=0)
            for r in recs:
                if "val_miou" in r:
                    evals.append((iterations + r["iteration"], r["val_miou"]))
                    cpu_at.append(None if cpu_before is None or stage_cpu is None or not its else
                                  (cpu_before + stage_cpu * r["iteration"] / its) / 60)
            iterations += its
        cpu_before = None if cpu_before is None or stage_cpu is None else cpu_before + stage_cpu
    if not evals or evals[-1][0] != iterations:  # the final evaluation (the last checkpoint)
        evals.append((iterations, final["miou"]))
        cpu_at.append(None if cpu_before is None else cpu_before / 60)
    return {"row": row, "seed": seed, "labeled": int(split), "val_miou": final["miou"],
            "iou": final["iou"], "class_names": final.get("class_names"),
            "iterations": iterations, **cost,
            "precision": sorted({precision_name(m["precision"]) for m in machines}),
            "machines": sorted({f"{m['machine']} (bf16 {'native' if m['bf16_native'] else 'emulated'})"
                                for m in machines}),
            "evals": evals, "run_dir": str(rd),
            # Each evaluation's CPU minutes, stage by stage (a stage's CPU spread over its own
            # iterations; pseudo-labelling and selection between stages): the figure's x.
            "evals_cpu_minutes": cpu_at if None not in cpu_at else None,
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


def own_minutes(runs: dict, key: tuple[int, str, int], kind: str = "cpu_minutes") -> float | None:
    """A finished run's CPU (or, ``kind="wall_minutes"``, wall) minutes without the shared
    stage 1 it did not train (CISC-R's: its split's suponly run, counted there)."""
    r = runs.get(key)
    if not r or r.get(kind) is None or key[1] != "ciscr":
        return r.get(kind) if r else None
    sup = (runs.get((key[0], "suponly", key[2])) or {}).get(kind)
    return None if sup is None else r[kind] - sup


def vals(runs: dict, split: int, row: str, seeds: list[int], key: str = "val_miou") -> list:
    return [(runs.get((split, row, s)) or {}).get(key) for s in seeds]


def mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    got = [x for x in xs if x is not None]
    if not got:
        return None, None
    return statistics.fmean(got), (statistics.stdev(got) if len(got) > 1 else None)


def machines(runs: dict) -> list[str]:
    return sorted({m for r in runs.values() for m in r["machines"]}) or ["(not recorded)"]


COMPUTE_ROWS = ["suponly_compute", "suponly_compute_unimatch", "suponly_compute_ciscr"]


def supervised_rows(curve: dict) -> list[str]:
    """Every SupOnly row: at N, the curve's, and those given a row's CPU time."""
    return ["suponly", *curve, *COMPUTE_ROWS]


def curve_points(runs: dict, split: int, seed: int, curve: dict,
                 like: dict | None = None) -> list[tuple]:
    """SupOnly's learning curve: (iterations, val mIoU of the LAST checkpoint, CPU minutes)
    of every SupOnly run of (split, seed), each its own schedule; with ``like`` (a run
    record), only the runs of its CPU and precision (:func:`same_machine`)."""
    pts = {(r["iterations"], r["val_miou"], r["cpu_minutes"])
           for n in supervised_rows(curve) if (r := runs.get((split, n, seed)))
           and (like is None or same_machine(r, like))}
    return sorted(pts)


def same_machine(a: dict, b: dict) -> bool:
    """Whether two run records ran on the same CPUs in the same precisions: only then do their
    CPU minutes compare."""
    return all(a.get(k) == b.get(k) for k in ("machines", "precision"))


def iterations_of(runs: dict, split: int, row: str) -> list[int]:
    """The training iterations of ``row``'s finished runs at ``split`` (sorted, distinct)."""
    return sorted({r["iterations"] for (k, name, _), r in runs.items() if k == split and name == row})


def stages_in_all(runs: dict, split: int, row: str) -> str | None:
    """``row``'s iterations in all ("1440") where they differ from SupOnly's N (CISC-R's
    stages of N each); None at equal steps."""
    its = iterations_of(runs, split, row)
    return None if its == iterations_of(runs, split, "suponly")[:1] else "/".join(map(str, its))


def compute_row_of(runs: dict, split: int, row: str, seed: int) -> str:
    """The SupOnly run given ``row``'s CPU time at (split, seed): the one ``row``'s record names
    (``compute_partner``: the queue reads it off the CPU-time rule, seed by seed), else the one
    whose plan (compute_match.json) lists ``row``, else ``row``'s own."""
    partner = (runs.get((split, row, seed)) or {}).get("compute_partner")
    if partner:
        return partner
    for name in ("suponly_compute", f"suponly_compute_{row}"):
        rec = runs.get((split, name, seed))
        if rec and row in (read(Path(rec["run_dir"]) / "compute_match.json") or {}).get("rows", []):
            return name
    return f"suponly_compute_{row}"


NEAR_STEPS = 1.5  # "about equal steps": within this factor (CISC-R's 3N: 960 to 2160)


def nearest_steps(runs: dict, split: int, row: str, seeds: list[int]) -> tuple[list, list]:
    """Per seed, the SupOnly run (any ``suponly*`` row: N, the curve, the CPU-time runs) whose
    iterations are nearest ``row``'s (by ratio; the fewer on a tie) and within
    ``NEAR_STEPS`` times of them, picked by steps alone, never by mIoU: (its mIoU per seed, its
    iterations per seed), None where either is missing or no SupOnly run is that near.
    WHY: CISC-R trains 3N in all, so "SupOnly at N" compares 3N steps with N; this is the
    comparison at about equal steps."""
    out_m, out_i = [], []
    for s in seeds:
        r = runs.get((split, row, s))
        sup = [v for (k, name, seed), v in runs.items()
               if k == split and seed == s and name.startswith("suponly") and r
               and abs(math.log(v["iterations"] / r["iterations"])) <= math.log(NEAR_STEPS)]
        if not r or not sup:
            out_m.append(None)
            out_i.append(None)
            continue
        best = min(sup, key=lambda v: (abs(math.log(v["iterations"] / r["iterations"])),
                                       v["iterations"]))
        out_m.append(best["val_miou"])
        out_i.append(best["iterations"])
    return out_m, out_i


def compute_vals(runs: dict, split: int, row: str, seeds: list[int]) -> list[float | None]:
    """Per seed, the val mIoU of SupOnly given ``row``'s CPU time at that seed (None: not run)."""
    return [(runs.get((split, compute_row_of(runs, split, row, s), s)) or {}).get("val_miou")
            for s in seeds]
