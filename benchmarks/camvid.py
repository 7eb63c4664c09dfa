"""CamVid comparison of SupOnly, ST, ST++, CISC-R and CISC-R (bank), the paper's tables at CPU scale.

Every run is a plain ``ciscr run camvid ...`` in its own run directory, so the benchmark is
resumable: rerun the same command and finished runs are only re-read. The report
(``docs/results/camvid.md`` + ``camvid.json``), the figures (``camvid_figures.py``) and the
CISC-weight diagnostic (``camvid_diagnostics.py``) are generated from the runs' own artefacts.

    python benchmarks/camvid.py                                        # the full protocol
    python benchmarks/camvid.py --seeds 0 --labeled 0.125 --methods st,ciscr   # a subset
    python benchmarks/camvid.py --jobs 1                               # one run at a time
    python benchmarks/camvid.py --no-checks                            # the methods only

The protocol: 1/8 labeled with seeds 0, 1, 2 and 1/4 with seed 0, every method with the same
budget (``configs/camvid.yaml``). Beside it: one SupOnly run in fp32 (does bf16 keep accuracy?),
one SupOnly run with 3x the iterations (is it the budget?), and the stage-1 study: stage 1 alone
under each form of its loss, over ``--stage1-seeds`` (six: single stage-1 runs are noisy). Runs
go ``--jobs`` at a time, each with cores / jobs threads.

Sharing, to spend the budget on what differs between methods (both are exact: same config,
same seed, deterministic CPU training):
- SupOnly is stage 1 of the ST run (CE on the labeled images), not trained a second time.
- CISC-R (bank) reuses stage1/, pseudo0/ and selection/ of the CISC-R run with the same seed
  (they do not depend on the rectification mode).
- CISC-R (bank) from SupOnly's stage 1 reuses stage1/ and pseudo0/ of the ST run (without
  L_CISC, stage 1 is SupOnly's CE on the labeled images: the same model and pseudo labels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ciscr.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402

METHODS = ("suponly", "st", "stpp", "ciscr", "ciscr_bank", "ciscr_bank_sup1")
LABELS = {
    "suponly": "SupOnly",
    "st": "ST",
    "stpp": "ST++",
    "ciscr": "CISC-R (query, one class)",
    "ciscr_bank": "CISC-R (bank, all classes)",
    "ciscr_bank_sup1": "CISC-R (bank, all classes) from SupOnly's stage 1 (no L_CISC)",
}
# Rows of the comparison that are a preset plus overrides: the last one starts CISC-R's stages
# 2-3 from exactly ST's / ST++'s stage-1 model, to compare the rectified retraining with theirs.
VARIANTS = {"ciscr_bank_sup1": ("ciscr_bank", ["method.stage1_cisc_loss=false"])}
SHARED_WITH = {"ciscr_bank": ("ciscr", ("stage1", "pseudo0", "selection")),
               "ciscr_bank_sup1": ("st", ("stage1", "pseudo0"))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared/data/camvid"))
    p.add_argument("--weights", default=str(REPO.parent / "shared/weights/mobilenet_v2_imagenet.pth"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--labeled", default="0.125,0.25", help="comma list of labeled fractions")
    p.add_argument("--checks", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the checks beside the comparison (fp32, 3x budget, stage-1 "
                        "study: about 45 min more on 2 cores); --no-checks runs the methods only")
    p.add_argument("--stage1-seeds", default="0,1,2,3,4,5",
                   help="seeds of the stage-1 study (first fraction only; single stage-1 runs "
                        "are noisy, so it gets more seeds than the full methods)")
    p.add_argument("--extra-seeds-labeled", default="0.125",
                   help="fractions that get every seed; the others get the first seed only")
    p.add_argument("--runs", default=str(REPO / "runs/camvid-bench"))
    p.add_argument("--out", default=str(REPO / "docs/results"))
    p.add_argument("--name", default="camvid", help="report file stem")
    p.add_argument("--config", default="camvid")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at once, each with cores/jobs threads (default 2: on 2 cores two "
                        "1-thread runs finish sooner than one 2-thread run after another)")
    p.add_argument("--report-only", action="store_true",
                   help="only (re)write the report and figures from the runs that exist")
    p.add_argument("--note", default="", help="conditions of the runs, printed in the report")
    p.add_argument("overrides", nargs="*", help="extra key=value for every run (same budget)")
    return p.parse_args(argv)


def run_dir(args: argparse.Namespace, method: str, labeled: str, seed: int) -> Path:
    name = "st" if method == "suponly" else method  # SupOnly = stage 1 of ST
    return Path(args.runs) / f"{name}_l{labeled}_s{seed}"


# Not methods of the comparison: checks run beside it, each (preset, extra overrides).
# SupOnly in fp32: does bf16 keep accuracy? The stage-1 checks separate what CISC-R's stage 1
# changes from SupOnly's: L_CISC itself, the pair form of the loss (CE_i + CE_j: twice SupOnly's
# CE scale at the same learning rate), class-sharing partners vs any partner, duplicated views.
FP32_CHECK = "suponly_fp32"
NO_SCORING = "method.score_final_pseudo=false"  # stage-1 checks: val mIoU is all we read
SHARED = "method.pair_views=shared"  # partner views as ciscr made them before the fix
PAIRS_ONLY = ["method.cisc_weight=0", "method.pair_loss_norm=image"]
BUDGET_CHECK, BUDGET_FACTOR = "suponly_x3", 3  # SupOnly with 3x the iterations: is it the budget?
CHECKS = {
    FP32_CHECK: ("suponly", ["train.amp=none"]),
    BUDGET_CHECK: ("suponly", []),  # + train.epochs = BUDGET_FACTOR x the config's (below)
    "stage1_suponly": ("suponly", [NO_SCORING]),
    "stage1_pairs_only": ("suponly_cisc", [*PAIRS_ONLY, SHARED, NO_SCORING]),
    "stage1_double_ce": ("suponly_cisc", ["method.cisc_weight=0", SHARED, NO_SCORING]),
    "stage1_image_norm": ("suponly_cisc", ["method.pair_loss_norm=image", SHARED, NO_SCORING]),
    "stage1_ind_pairs_only": ("suponly_cisc", [*PAIRS_ONLY, NO_SCORING]),
    "stage1_random_pairs": ("suponly_cisc", [*PAIRS_ONLY, "method.pair_partner=random",
                                             NO_SCORING]),
    "stage1_ind_image_norm": ("suponly_cisc", ["method.pair_loss_norm=image", NO_SCORING]),
    "stage1_paper": ("suponly_cisc", [NO_SCORING]),
}
# Stage-1 table rows: (label, the run of a main-protocol seed, the check for other seeds,
# whether the row gets the extra --stage1-seeds). SupOnly is stage 1 of ST; the paper's L1 with
# the default settings is stage 1 of CISC-R.
STAGE1_ROWS = {
    "suponly": ("SupOnly: mean CE over a batch of 8 images", "st", "stage1_suponly", True),
    "ind_pairs_only": ("(CE_i + CE_j) / 2 on 4 class-sharing pairs, no L_CISC",
                       None, "stage1_ind_pairs_only", True),
    "random_pairs": ("(CE_i + CE_j) / 2 on 4 pairs of ANY two images (`pair_partner=random`)",
                     None, "stage1_random_pairs", True),
    "ind_image_norm": ("(CE_i + CE_j + L_CISC) / 2 (`pair_loss_norm=image`: SupOnly's CE scale)",
                       None, "stage1_ind_image_norm", True),
    "paper": ("CE_i + CE_j + L_CISC per pair (the paper's L1; CISC-R's stage 1, the default)",
              "ciscr", "stage1_paper", True),
    "pairs_only": ("(CE_i + CE_j) / 2 on class-sharing pairs, no L_CISC; shared views",
                   None, "stage1_pairs_only", False),
    "double_ce": ("CE_i + CE_j per pair, no L_CISC (twice SupOnly's CE scale); shared views",
                  None, "stage1_double_ce", False),
    "image_norm": ("(CE_i + CE_j + L_CISC) / 2 (`pair_loss_norm=image`); shared views",
                   None, "stage1_image_norm", False),
}


def stage1_source(row: str, seed: int, main_seeds: list[int]) -> str | None:
    """The run that holds a stage-1 table cell, or None where the row skips that seed."""
    _, main_run, check, extra = STAGE1_ROWS[row]
    if main_run is not None and seed in main_seeds:
        return main_run
    if seed in main_seeds or extra:
        return check
    return None


def config_epochs(args: argparse.Namespace) -> int:
    from ciscr.config import load_config, resolve_config_path

    return load_config(resolve_config_path(args.config), list(args.overrides)).train.epochs


def ciscr_command(args: argparse.Namespace, method: str, labeled: str, seed: int) -> list[str]:
    name, extra = {**CHECKS, **VARIANTS}.get(method, (method, []))
    if method == BUDGET_CHECK:
        extra = [*extra, f"train.epochs={BUDGET_FACTOR * config_epochs(args)}"]
    return [
        sys.executable, "-m", "ciscr", "run", args.config, "--out",
        str(run_dir(args, method, labeled, seed)),
        f"data.root={args.data}", f"model.pretrained={args.weights}",
        f"method.name={name}", f"seed={seed}", f"data.labeled={labeled}",
        "train.progress=false", *args.overrides, *extra,
    ]


def wall_line(args: argparse.Namespace, plan: list, checks: list) -> list[str]:
    """Total run time of the methods and of the checks (each run's wall.json, summed, divided by
    the runs at once): what the whole command costs on this machine."""
    def hours(runs: list) -> float:
        dirs = {run_dir(args, m, f, s) for m, f, s in runs}  # SupOnly and ST share one run
        secs = sum((read(d / "wall.json") or {}).get("seconds", 0.0) for d in dirs)
        return secs / 3600 / args.jobs

    return [f"- run time ({args.jobs} runs at a time): methods {hours(plan):.1f} h, checks "
            f"{60 * hours(checks):.0f} min (each run's own wall time, summed, / {args.jobs})"]


def find_row(rows: list[dict], method: str, labeled: str, seed: int) -> dict | None:
    """The collected result of one run of the comparison, or None if it has none yet."""
    return next((r for r in rows if (r["method"], r["labeled"], r["seed"])
                 == (method, labeled, seed)), None)  # fmt: skip


def amp_check(args: argparse.Namespace, rows: list[dict], labeled: str, seed: int) -> list[str]:
    """The bf16-vs-fp32 line of the report: SupOnly (stage 1) trained both ways, same seed."""
    fp32 = read(run_dir(args, FP32_CHECK, labeled, seed) / "stage1" / "done.json")
    bf16 = find_row(rows, "suponly", labeled, seed)
    if not fp32 or not bf16:
        return []
    amp = "bf16" if "train.amp=none" not in args.overrides else "fp32"
    return [f"- precision check (SupOnly, 1/{round(1 / float(labeled))}, seed {seed}): val mIoU "
            f"{fmt(bf16['val_miou'])} with `train.amp={amp}` (the setting of every run above) vs "
            f"{fmt(fp32['val_miou'])} in fp32 (speed: `speed_cpu.md`, measured side by side)"]


def budget_check(args: argparse.Namespace, rows: list[dict], labeled: str, seed: int) -> list[str]:
    """The budget line of the report: SupOnly with the protocol's iterations vs 3x as many."""
    long = read(run_dir(args, BUDGET_CHECK, labeled, seed) / "stage1" / "metrics.json")
    base = find_row(rows, "suponly", labeled, seed)
    if not long or not base:
        return []

    def learned(iou: list) -> int:
        return sum(1 for x in iou if x is not None and x > 0.01)

    return [f"- budget check (SupOnly, 1/{round(1 / float(labeled))}, seed {seed}): val mIoU "
            f"{fmt(base['val_miou'])} with the protocol's iterations, {learned(base['iou'])} of "
            f"{len(base['iou'])} classes above 1% IoU; {fmt(long['miou'])} and "
            f"{learned(long['iou'])} classes with {BUDGET_FACTOR}x the iterations "
            f"(`train.epochs={BUDGET_FACTOR * config_epochs(args)}`)"]


def share_stages(args: argparse.Namespace, method: str, labeled: str, seed: int) -> None:
    if method not in SHARED_WITH:
        return
    source, stages = SHARED_WITH[method]
    src, dst = run_dir(args, source, labeled, seed), run_dir(args, method, labeled, seed)
    for stage in stages:
        if (src / stage / "done.json").exists() and not (dst / stage).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src / stage, dst / stage)


def run_one(args: argparse.Namespace, method: str, labeled: str, seed: int) -> None:
    """Run (or finish) one method; wall time of every invocation is added to wall.json.

    With ``--jobs 1`` the run prints to this terminal; otherwise to ``RUN_DIR/run.log``.
    """
    rd = run_dir(args, method, labeled, seed)
    if (rd / "results.json").exists():
        return
    share_stages(args, method, labeled, seed)
    cmd = ciscr_command(args, method, labeled, seed)
    print("$", shlex.join(cmd), flush=True)
    # WHY: N torch processes each using every core slow each other down several-fold.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_job(args.jobs))}
    rd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.jobs == 1:
        proc = subprocess.run(cmd, cwd=REPO, env=env)
    else:
        with open(rd / "run.log", "a") as log:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    add_wall_time(rd, time.perf_counter() - t0)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}), log in {rd}: {shlex.join(cmd)}")
    print(f"done: {rd.name} ({time.perf_counter() - t0:.0f} s)", flush=True)


def threads_per_job(jobs: int) -> int:
    if os.environ.get("OMP_NUM_THREADS") and jobs == 1:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // jobs)


# Rough relative cost of one run, to start the longest chains first.
COST = {"st": 1.0, "stpp": 1.8, "ciscr": 2.0, "ciscr_bank": 1.3, "ciscr_bank_sup1": 1.2,
        **{c: 0.4 for c in CHECKS}, FP32_CHECK: 0.5, BUDGET_CHECK: 1.2}


def chains(plan: list[tuple[str, str, int]]) -> list[list[tuple[str, str, int]]]:
    """Independent sequences of runs: a run that shares stages from another follows it; SupOnly
    is the ST run. Seed by seed (so a cut-short benchmark still compares every method on the
    same seeds), the longest chains of a seed first."""
    runs = list(dict.fromkeys(("st" if m == "suponly" else m, f, s) for m, f, s in plan))
    out: list[list[tuple[str, str, int]]] = []
    for m, f, s in runs:
        src = SHARED_WITH.get(m, (None,))[0]
        head = next((c for c in out if (src, f, s) in c), None)
        if head is None:
            out.append([(m, f, s)])
        else:
            head.append((m, f, s))
    return sorted(out, key=lambda c: (c[0][2], -sum(COST[m] for m, _, _ in c)))


def run_all(args: argparse.Namespace, plan: list[tuple[str, str, int]]) -> None:
    """Every run of the plan, ``args.jobs`` at a time; a failure does not stop the others."""
    def run_chain(chain: list[tuple[str, str, int]]) -> None:
        for m, f, s in chain:
            run_one(args, m, f, s)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_chain, c) for c in chains(plan)]
    errors = [str(e) for f in futures if (e := f.exception()) is not None]
    if errors:
        raise SystemExit("\n".join(errors))


def add_wall_time(rd: Path, seconds: float) -> None:
    path = rd / "wall.json"
    total = json.loads(path.read_text())["seconds"] if path.exists() else 0.0
    rd.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds": total + seconds}))


# --------------------------------------------------------------------------- collecting


def read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def collect_run(args: argparse.Namespace, method: str, labeled: str, seed: int) -> dict | None:
    rd = run_dir(args, method, labeled, seed)
    res = read(rd / "results.json") or partial_results(rd, method)
    if res is None:
        return None
    if method == "suponly":
        final = read(rd / "stage1" / "metrics.json")
        pseudo_after = res["stages"].get("pseudo0", {}).get("pseudo_miou")
        wall = (read(rd / "stage1" / "done.json") or {}).get("wall_seconds")
    else:
        final = res["final_metrics"]
        pseudo_after = res["stages"].get("pseudo_final", {}).get("pseudo_miou")
        wall = (read(rd / "wall.json") or {}).get("seconds")
    half = read(rd / "selection" / "half_quality.json") if method in ("stpp", "ciscr", "ciscr_bank_sup1") else None
    return {
        "method": method, "labeled": labeled, "seed": seed, "run_dir": str(rd),
        "val_miou": final["miou"], "iou": final["iou"], "class_names": final.get("class_names"),
        "pseudo_before": res["stages"].get("pseudo0", {}).get("pseudo_miou"),
        "pseudo_after": pseudo_after,
        "half_quality": {k: (v or {}).get("miou") for k, v in (half or {}).items()} or None,
        "wall_seconds": wall,
        "stage_val_miou": {st: d.get("val_miou") for st, d in res["stages"].items()
                           if st.startswith("stage") and d and d.get("val_miou") is not None},
    }


FINAL_STAGE = {"suponly": "stage1", "st": "stage2", "stpp": "stage3", "ciscr": "stage3",
               "ciscr_bank_sup1": "stage3",
               "ciscr_bank": "stage3"}


def partial_results(rd: Path, method: str) -> dict | None:
    """A run whose final stage is trained but whose closing pseudo-label scoring was cut off:
    its val mIoU is final; its 'after' pseudo-label mIoU is reported as n/a."""
    final = FINAL_STAGE["st" if method == "suponly" else method]
    if not (rd / final / "done.json").exists():
        return None
    stages = {p.name: read(p / "done.json") for p in sorted(rd.iterdir())
              if (p / "done.json").exists()}
    return {"stages": stages, "final_metrics": read(rd / final / "metrics.json")}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    import torch

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def table_miou(rows: list[dict], methods: list[str], fractions: list[str]) -> list[str]:
    out = ["| method | " + " | ".join(f"1/{round(1 / float(f))} labeled" for f in fractions) + " |",
           "|---|" + "---|" * len(fractions)]
    for m in methods:
        cells = []
        for f in fractions:
            xs = [r["val_miou"] for r in rows if r["method"] == m and r["labeled"] == f]
            each = " / ".join(f"{100 * x:.1f}" for x in xs)
            cells.append(f"{fmt(*mean_std(xs))} (n={len(xs)}: {each})" if xs else "not run")
        out.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return out


def table_per_class(rows: list[dict], methods: list[str], fraction: str) -> list[str]:
    sel = [r for r in rows if r["labeled"] == fraction]
    names = next((r["class_names"] for r in sel if r["class_names"]), None)
    if not names:
        return ["(no finished run)"]
    out = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in methods:
        runs = [r for r in sel if r["method"] == m]
        if not runs:
            continue
        cells = []
        for k in range(len(names)):
            xs = [r["iou"][k] for r in runs if r["iou"][k] is not None]
            cells.append(fmt(statistics.fmean(xs)) if xs else "absent")
        out.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return out


def table_stages(rows: list[dict], methods: list[str], fraction: str) -> list[str]:
    """Val mIoU after each stage (mean over seeds): where each method gains or loses."""
    out = ["| method | stage 1 | stage 2 | stage 3 |", "|---|---|---|---|"]
    for m in methods:
        runs = [r for r in rows if r["method"] == m and r["labeled"] == fraction]
        if m == "suponly" or not runs:
            continue
        cells = []
        for st in ("stage1", "stage2", "stage3"):
            xs = [r["stage_val_miou"][st] for r in runs if st in r["stage_val_miou"]]
            cells.append(f"{fmt(statistics.fmean(xs))} (n={len(xs)})" if xs else "-")
        out.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return out


def table_pseudo(rows: list[dict], methods: list[str], fraction: str) -> list[str]:
    out = ["| method | pseudo labels of stage-1 model (before) | of the final model (after) "
           "| reliable half | unreliable half | wall time (min) |", "|---|---|---|---|---|---|"]
    for m in methods:
        runs = [r for r in rows if r["method"] == m and r["labeled"] == fraction]
        if not runs:
            continue

        def avg(key: str, runs=runs) -> float | None:
            xs = [r[key] for r in runs if r[key] is not None]
            return statistics.fmean(xs) if xs else None

        def half(part: str, runs=runs) -> float | None:
            xs = [r["half_quality"][part] for r in runs
                  if r["half_quality"] and r["half_quality"].get(part) is not None]
            return statistics.fmean(xs) if xs else None

        wall = avg("wall_seconds")
        wall_s = f"{wall / 60:.1f}" if wall else "n/a"
        out.append(f"| {LABELS[m]} | {fmt(avg('pseudo_before'))} | {fmt(avg('pseudo_after'))} "
                   f"| {fmt(half('reliable'))} | {fmt(half('unreliable'))} | {wall_s} |")
    return out


def diagnostics(args: argparse.Namespace, plan: list[tuple[str, str, int]]) -> list[str]:
    """The CISC-map reliability diagnostic of every CISC-R run with a selection, per fraction
    (computed once per run, cached in RUN/diagnostics.json)."""
    from camvid_diagnostics import cached, markdown  # beside this file

    out = []
    for f in dict.fromkeys(f for _, f, _ in plan):
        dirs = [run_dir(args, "ciscr", f, s) for m, ff, s in plan if m == "ciscr" and ff == f]
        dirs = [d for d in dirs if (d / "selection" / "done.json").exists()]
        if dirs:
            out += [f"### 1/{round(1 / float(f))} labeled", "",
                    *markdown([cached(d) for d in dirs], dirs), ""]
    if not out:
        return []
    return ["## Diagnostic: how well does the CISC weight tell right from wrong pseudo labels?", "",
            "Each pixel of each unlabeled image gets w = the CISC map of its own stage-1 pseudo "
            "class against a queried labeled prototype (model M0, the stage-2 teacher): the weight "
            "the rectified loss gives it. AUROC = how well w separates correctly from wrongly "
            "pseudo-labelled pixels (ground truth of the unlabeled pool, never used in training; "
            "0.5 = no information). M0's softmax confidence is the reference signal that "
            "confidence-thresholding methods use. `benchmarks/camvid_diagnostics.py`.", "", *out]


def write_report(args: argparse.Namespace, rows: list[dict], methods, fractions, argv,
                 extra: list[str] = ()) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/camvid.py " + shlex.join(a for a in argv if a != "--report-only")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# CamVid: SupOnly vs ST vs ST++ vs CISC-R ({args.name})", "",
        f"- command: `{cmd.strip()}`",
        f"- machine: {machine()}",
        f"- generated: {when} from the run directories under `{args.runs}`",
        f"- extra overrides for every method (same budget): `{' '.join(args.overrides) or 'none'}`",
        f"- runs: {args.jobs} at a time, {threads_per_job(args.jobs)} torch thread(s) each",
        *([f"- conditions: {args.note}"] if args.note else []),
        *getattr(args, "header", []),
        "- protocol: CamVid train (367) as the pool, the labeled fraction drawn with the seed, the"
        " rest unlabeled (their ground truth only scores pseudo labels); val (101) for mIoU;"
        " MobileNetV2 ImageNet init; `configs/camvid.yaml`. Result = LAST checkpoint of the final"
        " stage. SupOnly is stage 1 of the ST run.", "",
        "## Validation mIoU (%), mean ± std over seeds (paper Tables 9-10 shape)", "",
        *table_miou(rows, methods, fractions), "",
    ]
    for f in fractions:
        lines += [f"## Per-class IoU (%), 1/{round(1 / float(f))} labeled, mean over seeds", "",
                  *table_per_class(rows, methods, f), "",
                  f"## Pseudo-label mIoU (%) on the unlabeled pool, 1/{round(1 / float(f))} "
                  "labeled (Table 5 / Fig. 10 shape)", "",
                  "'before' = TTA labels of the stage-1 model; 'after' = of the final model; "
                  "halves = the stage-1 labels of the reliable / unreliable halves chosen by the "
                  "method's selection (CISC distance for CISC-R, stability for ST++). Wall time: "
                  "the run's own stages only (CISC-R (bank) reuses CISC-R's stage 1, pseudo0 and "
                  "selection, which are counted in CISC-R's time; the SupOnly-stage-1 variant "
                  "reuses ST's stage 1 and pseudo0; SupOnly's is stage 1 of the ST run).", "",
                  *table_pseudo(rows, methods, f), "",
                  f"## Val mIoU (%) after each stage, 1/{round(1 / float(f))} labeled", "",
                  "Stage 1 of ST and ST++ is SupOnly; stage 1 of CISC-R adds L_CISC (Eq. 11-12); "
                  "CISC-R (bank) shares CISC-R's stage 1; the SupOnly-stage-1 variant shares ST's. "
                  "ST stops after stage 2.", "",
                  *table_stages(rows, methods, f), ""]
    lines += list(extra)
    md = out / f"{args.name}.md"
    atomic_write_bytes(md, ("\n".join(lines) + "\n").encode())
    atomic_write_json(out / f"{args.name}.json",
                      {"command": cmd.strip(), "machine": machine(), "generated": when, "runs": rows})
    return md


def stage1_values(args: argparse.Namespace, labeled: str, seeds: list[int],
                  main_seeds: list[int]) -> dict[str, list[float | None]]:
    """Stage-1 val mIoU of every row of the stage-1 table, per seed (None: not run)."""
    out = {}
    for row in STAGE1_ROWS:
        xs = []
        for s in seeds:
            src = stage1_source(row, s, main_seeds)
            done = read(run_dir(args, src, labeled, s) / "stage1" / "done.json") if src else None
            xs.append((done or {}).get("val_miou"))
        out[row] = xs
    return out


def paired_difference(xs: list[float | None], ref: list[float | None]) -> str:
    """Mean of x - ref over the seeds both have (same seed = same labeled split), ± its standard
    error; in mIoU points."""
    d = [100 * (x - r) for x, r in zip(xs, ref, strict=True) if x is not None and r is not None]
    if len(d) < 2:
        return "n/a"
    se = statistics.stdev(d) / len(d) ** 0.5
    return f"{statistics.fmean(d):+.2f} ± {se:.2f} (n={len(d)})"


def stage1_ablation(args: argparse.Namespace, labeled: str, seeds: list[int],
                    main_seeds: list[int]) -> list[str]:
    """Val mIoU of stage 1 under each form of its loss, per seed (what CISC-R starts from)."""
    values = stage1_values(args, labeled, seeds, main_seeds)
    refs = ("suponly", "ind_pairs_only")  # SupOnly; the same pairs without L_CISC
    out = ["| stage-1 loss | " + " | ".join(f"s{s}" for s in seeds)
           + " | mean ± std (n) | minus SupOnly | minus CE-only pairs |",
           "|---|" + "---|" * (len(seeds) + 3)]
    for row, (label, *_rest) in STAGE1_ROWS.items():
        xs = values[row]
        got = [x for x in xs if x is not None]
        mean = f"{fmt(*mean_std(got))} ({len(got)})" if got else "n/a"
        diffs = [paired_difference(xs, values[r]) if r != row else "" for r in refs]
        out.append(f"| {label} | " + " | ".join(fmt(x) if x is not None else "-" for x in xs)
                   + f" | {mean} | " + " | ".join(diffs) + " |")
    return [f"## Stage 1: which part of CISC-R's loss costs accuracy (1/{round(1 / float(labeled))} "
            "labeled, val mIoU %)", "",
            "Stage-1 models only (no self-training), same budget; the seed also draws the labeled "
            "split, so the last two columns compare each row with SupOnly, and with the same "
            "class-sharing pairs trained without L_CISC, on the same 46 images (mean difference "
            "in points over the seeds both rows have ± its standard error). Seeds "
            f"{', '.join(map(str, main_seeds))} of the SupOnly and paper-L1 rows are stage 1 of the "
            "ST and CISC-R runs above, the other cells are `stage1_*` check runs. Views: each "
            "partner image gets its own augmentation (the default) unless the row says 'shared' "
            "(`method.pair_views=shared`: the partner was a copy of its own anchor view, ciscr "
            "before the fix).", "", *out, ""]


def missing_runs(plan: list[tuple[str, str, int]], rows: list[dict]) -> list[str]:
    """A report line naming the planned runs that have no result yet (none if all have)."""
    done = {(r["method"], r["labeled"], r["seed"]) for r in rows}
    left = [f"{LABELS[m]} 1/{round(1 / float(f))} seed {s}" for m, f, s in plan
            if (m, f, s) not in done]  # fmt: skip
    if not left:
        return []
    return ["- **NOT FINISHED** when this report was written (rerun the command: it resumes): "
            + ", ".join(left)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    fractions = [f for f in args.labeled.split(",") if f]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    stage1_seeds = list(dict.fromkeys(seeds + [int(s) for s in args.stage1_seeds.split(",") if s]))
    every_seed = set(args.extra_seeds_labeled.split(","))
    plan = [(m, f, s) for f in fractions for s in (seeds if f in every_seed else seeds[:1])
            for m in methods]
    checks = [(FP32_CHECK, fractions[0], seeds[0]), (BUDGET_CHECK, fractions[0], seeds[0])] + [
        (src, fractions[0], s) for s in stage1_seeds for row in STAGE1_ROWS
        if (src := stage1_source(row, s, seeds)) in CHECKS]
    if not args.report_only:
        run_all(args, [*plan, *(checks if args.checks else [])])
    rows = [r for m, f, s in plan if (r := collect_run(args, m, f, s)) is not None]
    args.header = missing_runs(plan, rows)
    args.header += wall_line(args, plan, checks)
    args.header += amp_check(args, rows, fractions[0], seeds[0])
    args.header += budget_check(args, rows, fractions[0], seeds[0])
    extra = stage1_ablation(args, fractions[0], stage1_seeds, seeds) + diagnostics(args, plan)
    md = write_report(args, rows, methods, fractions, argv, extra)
    print(md.read_text())
    from camvid_figures import write_figures  # beside this file

    for path in write_figures(Path(args.runs), Path(args.out), args.name, fractions[0], seeds[0]):
        print("figure:", path)
    # The run report (curves, selection, CISC-map gallery) of the figures' CISC-R run, beside them.
    report = run_dir(args, "ciscr", fractions[0], seeds[0]) / "report.html"
    if report.exists():
        atomic_write_bytes(Path(args.out) / f"{args.name}_ciscr_report.html", report.read_bytes())
        print("report:", Path(args.out) / f"{args.name}_ciscr_report.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
