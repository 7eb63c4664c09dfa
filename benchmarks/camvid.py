"""CamVid: does semi-supervision pay? SupOnly vs the stage-wise family (ST, ST++, CISC-R) vs the
online family (FixMatch, UniMatch, UniMatch + CISC), and the options that change the unlabeled
loss, on one protocol (``configs/camvid.yaml``).

Every run is a plain ``ciscr run camvid ...`` in its own directory, so the benchmark is
resumable: rerun the command and finished runs are only re-read. The report
(``docs/results/camvid.md`` + ``.json``) is generated from the runs' own artefacts, with what is
not finished yet said as such.

    python benchmarks/camvid.py                        # everything, seed by seed
    python benchmarks/camvid.py --seeds 0 --methods suponly,unimatch
    python benchmarks/camvid.py --report-only

The protocol: 1/8 labeled (46 of 367), seeds 0, 1, 2 (the seed also draws the labeled split, so
differences are paired by seed); stage 1 = the budget read off SupOnly's learning curve
(``camvid_budget.py``; capped for cost, see ``configs/camvid.yaml``);
every stage on unlabeled images runs ``train.unlabeled_epochs`` passes over its own list, raised
until it shows the labeled images as often as stage 1 did (``ciscr.pipeline.unlabeled_stage_cfg``).

Sharing, to spend the budget on what differs (exact: same config, same seed, deterministic CPU
training): SupOnly is stage 1 of the ST++ and ST runs (ST reuses ST++'s stage1/ and pseudo0/,
which differ only by ST++'s two snapshot files); CISC-R (bank) and the option rows built on it
reuse stage1/, pseudo0/ and selection/ of the CISC-R run with the same seed.

Durability: runs/ is git-ignored and lives on one machine. Every report first copies the small
artefacts of each finished stage into ``docs/results/camvid-runs/`` (``archive.py``; commit it),
and a run missing from runs/ is read from there, and not rerun, once it has finished.
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import archive  # noqa: E402  (benchmarks/, on sys.path when run as a script)

from ciscr.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402

# Rows: name -> (label, preset, extra overrides). The first block is the comparison, the second
# the options of the unlabeled loss / warm start, each measured against the row it modifies.
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "suponly": ("SupOnly (stage 1 of ST and ST++)", "st", []),
    "st": ("ST (ST++'s form: mixed list, cutout)", "st", []),
    "stpp": ("ST++", "stpp", []),
    "ciscr": ("CISC-R (query, one class)", "ciscr", []),
    "ciscr_bank": ("CISC-R (bank, all classes)", "ciscr_bank", []),
    "fixmatch": ("FixMatch", "fixmatch", []),
    "unimatch": ("UniMatch", "unimatch", []),
    "unimatch_cisc": ("UniMatch + CISC (ours)", "unimatch_cisc", []),
    "bank_conf": ("CISC-R (bank) x teacher confidence", "ciscr_bank",
                  ["method.confidence_weighting=true"]),
    "bank_thr": ("CISC-R (bank), confidence >= 0.9", "ciscr_bank",
                 ["method.confidence_threshold=0.9"]),
    "bank_ramp": ("CISC-R (bank), lambda 0.5 ramped over the first half", "ciscr_bank",
                  ["method.unlabeled_weight=0.5", "method.unlabeled_rampup=0.5"]),
    "bank_warm": ("CISC-R (bank), warm start (init=previous)", "ciscr_bank",
                  ["method.init=previous"]),
}
MAIN = ["suponly", "st", "stpp", "ciscr", "ciscr_bank", "fixmatch", "unimatch", "unimatch_cisc"]
OPTIONS = ["bank_conf", "bank_thr", "bank_ramp", "bank_warm"]
# Which row an option or a target is compared with.
BASE = {"bank_conf": "ciscr_bank", "bank_thr": "ciscr_bank", "bank_ramp": "ciscr_bank",
        "bank_warm": "ciscr_bank", "unimatch_cisc": "unimatch"}
SHARED_WITH = {**{r: ("ciscr", ("stage1", "pseudo0", "selection"))
                  for r in ("ciscr_bank", *OPTIONS)},
               # ST++'s stage 1 is SupOnly's plus two snapshot files (stability): same training.
               "st": ("stpp", ("stage1", "pseudo0"))}
# Order of the runs of one seed: the rows the targets need first (SupOnly/ST++ then ST on its
# stage 1, UniMatch, CISC-R, UniMatch + CISC), then the other baselines.
ORDER = ["stpp", "st", "unimatch", "ciscr", "ciscr_bank", "unimatch_cisc", "fixmatch", *OPTIONS]
# Rows no target needs: they run after the target rows of every seed. WHY: on 2 cores a seed
# of every row takes days; three seeds of the targets' rows come first (paired means with a
# standard error), the other rows after them.
LATER = ("fixmatch",)
COPIED = "copied_from.txt"  # marks a stage dir copied from another run (share_stages)
TRAIN_STAGES = ("stage1", "stage2", "stage3", "online")  # the stages that train (checkpoints)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared/data/camvid"))
    p.add_argument("--weights", default=str(REPO.parent / "shared/weights/mobilenet_v2_imagenet.pth"))
    p.add_argument("--methods", default=",".join(MAIN + OPTIONS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--labeled", default="0.125")
    p.add_argument("--runs", default=str(REPO / "runs/camvid-protocol2"))
    p.add_argument("--out", default=str(REPO / "docs/results"))
    p.add_argument("--name", default="camvid")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each with cores/jobs threads")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (repeatable). NOT the protocol: for a "
                        "smoke test of the whole benchmark, e.g. --set train.iters_per_epoch=2 "
                        "--set train.epochs=1 with its own --runs and --out")
    p.add_argument("--supersede", metavar="RUN",
                   help="take run directory RUN (e.g. unimatch_l0.125_s0) out of the protocol: "
                        "move it and its archived copy to the superseded folders with --reason "
                        "beside them, then report (stop the benchmark first)")
    p.add_argument("--reason", help="why RUN is superseded (REASON.txt; the report shows it)")
    p.add_argument("--as", dest="supersede_as", metavar="NAME",
                   help="its name there (default: RUN-<UTC time>)")
    return p.parse_args(argv)


def run_dir(args: argparse.Namespace, row: str, seed: int) -> Path:
    if row == "suponly":  # SupOnly = stage 1 of ST, or of ST++ before ST has copied it
        st, stpp = (run_dir(args, r, seed) for r in ("st", "stpp"))
        done = (stpp / "stage1" / "metrics.json").exists() and not (st / "stage1").exists()
        return stpp if done else st
    return Path(args.runs) / f"{row}_l{args.labeled}_s{seed}"


def archive_root(args: argparse.Namespace, superseded: bool = False) -> Path:
    """The committed copy of the runs' small artefacts, beside the report (:mod:`archive`)."""
    return Path(args.out) / f"{args.name}-runs{'-superseded' if superseded else ''}"


def superseded_root(args: argparse.Namespace) -> Path:
    return Path(str(args.runs).rstrip("/") + "-superseded")


def finished_dir(args: argparse.Namespace, row: str, seed: int,
                 marker: str | None = None) -> Path | None:
    """Where the finished run's artefacts (``marker``: its results.json by default) are: its
    directory under runs/ or, when the machine that trained it is gone, its archived copy
    (runs/ first, for SupOnly's two runs too); None while it is not finished, or when it was
    made with another config than the benchmark's now (a protocol change must not let an old
    result stand in a table: supersede it, ``--supersede``). SupOnly is finished once stage 1
    of ST or ST++ is."""
    candidates = ("st", "stpp") if row == "suponly" else (row,)
    rows = {run_dir(args, r, seed).name: r for r in candidates}  # directory name -> its row
    marker = marker or ("stage1/metrics.json" if row == "suponly" else "results.json")
    return archive.locate([run_dir(args, r, seed) for r in rows.values()], archive_root(args),
                          marker, lambda rd: current_protocol(args, rows[rd.name], seed, rd))


def row_overrides(args: argparse.Namespace, row: str, seed: int) -> list[str]:
    _, preset, extra = ROWS[row]
    return [f"data.root={args.data}", f"model.pretrained={args.weights}",
            f"method.name={preset}", f"seed={seed}", f"data.labeled={args.labeled}",
            "train.progress=false", *extra, *args.overrides]


def supersede(args: argparse.Namespace) -> None:
    """Move run ``--supersede`` (under runs/, and its archived copy) into the superseded
    folders with REASON.txt: the report then lists it apart and the benchmark runs it afresh.
    WHY a command: by hand, the archived copy is easily left behind, and it would stand in the
    tables (when its config still matches) and keep the run from being redone."""
    name = args.supersede
    if not args.reason or not args.reason.strip():
        raise SystemExit("--supersede needs --reason TEXT")
    new = args.supersede_as or f"{name}-{datetime.now(timezone.utc):%Y%m%d%H%M}"
    moves = [(a, b) for a, b in ((Path(args.runs) / name, superseded_root(args) / new),
                                 (archive_root(args) / name, archive_root(args, True) / new))
             if a.is_dir()]
    if not moves:
        raise SystemExit(f"--supersede: no run {name!r} in {args.runs} or {archive_root(args)}")
    if clash := [str(b) for _, b in moves if b.exists()]:
        raise SystemExit(f"--supersede: {clash[0]} exists; choose another --as NAME")
    for a, b in moves:
        b.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(a, b)
        atomic_write_bytes(b / "REASON.txt", (" ".join(args.reason.split()) + "\n").encode())
        print(f"superseded: {a} -> {b}", flush=True)


def current_protocol(args: argparse.Namespace, row: str, seed: int, rd: Path) -> bool:
    """Whether the run in ``rd`` was made with the config this benchmark would run for ``row``
    now (paths aside: the data and weights may lie elsewhere on another machine); warns when
    not."""
    import yaml

    from ciscr.config import load_config
    from ciscr.errors import ConfigError
    from ciscr.pipeline import check_same_config

    saved = yaml.safe_load((rd / "config.yaml").read_text()) if (rd / "config.yaml").exists() else {}
    paths = [f"data.root={saved.get('data', {}).get('root', args.data)}",
             f"model.pretrained={saved.get('model', {}).get('pretrained', args.weights)}"]
    try:
        check_same_config(load_config("camvid", row_overrides(args, row, seed) + paths),
                          rd / "config.yaml")
    except (ConfigError, OSError) as err:
        print(f"warning: {rd} is not counted: {err}", file=sys.stderr)
        return False
    return True


def ciscr_command(args: argparse.Namespace, row: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "ciscr", "run", "camvid", "--out", str(run_dir(args, row, seed)),
            *row_overrides(args, row, seed)]


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def share_stages(args: argparse.Namespace, row: str, seed: int) -> None:
    if row not in SHARED_WITH:
        return
    source, stages = SHARED_WITH[row]
    src, dst = run_dir(args, source, seed), run_dir(args, row, seed)
    for stage in stages:
        if (src / stage / "done.json").exists() and not (dst / stage).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src / stage, dst / stage)
            # The machine time of a copied stage belongs to its source run (the report's total).
            (dst / stage / COPIED).write_text(f"{src / stage}\n")


def run_one(args: argparse.Namespace, row: str, seed: int) -> None:
    """Run (or finish) one row; the wall time of every invocation is added to wall.json."""
    if finished_dir(args, row, seed) is not None:  # here, or archived from another machine
        return
    rd = run_dir(args, row, seed)
    share_stages(args, row, seed)
    cmd = ciscr_command(args, row, seed)
    print("$", shlex.join(cmd), flush=True)
    # WHY: N torch processes each using every core slow each other down several-fold.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_job(args.jobs))}
    rd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(rd / "run.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        # wait4: this child's own CPU time (user + sys), which another job sharing the cores
        # does not inflate the way it inflates wall time.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    add_wall_time(rd, time.perf_counter() - t0, usage.ru_utime + usage.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}), log in {rd}/run.log")
    print(f"done: {rd.name} ({time.perf_counter() - t0:.0f} s)", flush=True)


def add_wall_time(rd: Path, seconds: float, cpu_seconds: float) -> None:
    """Add one invocation's wall and CPU seconds to RUN/wall.json (a resumed run has several)."""
    path = rd / "wall.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    atomic_write_json(path, {"seconds": old.get("seconds", 0.0) + seconds,
                             "cpu_seconds": old.get("cpu_seconds", 0.0) + cpu_seconds})


def chains(rows: list[str], seeds: list[int]) -> list[list[tuple[str, int]]]:
    """Independent sequences of runs: the rows the targets need seed by seed (a cut-short
    benchmark still compares its first rows on the same seeds), then the other comparison rows
    (:data:`LATER`) seed by seed, then the options; a comparison run that shares stages
    follows its source, an option (queued after every source) runs on its own."""
    wanted = [r for r in ORDER if r in rows or (r == "st" and "suponly" in rows)]
    out: list[list[tuple[str, int]]] = []
    first = [r for r in wanted if r not in OPTIONS and r not in LATER]
    later = [r for r in wanted if r in LATER]
    for r, s in [(r, s) for s in seeds for r in first] + [(r, s) for s in seeds for r in later]:
        src = SHARED_WITH.get(r, (None,))[0]
        head = next((c for c in out if (src, s) in c), None)
        if head is None:
            out.append([(r, s)])
        else:
            head.append((r, s))
    return out + [[(r, s)] for s in seeds for r in wanted if r in OPTIONS]


def run_all(args: argparse.Namespace, rows: list[str], seeds: list[int], argv: list[str]) -> None:
    lock = threading.Lock()

    def run_chain(chain: list[tuple[str, int]]) -> None:
        for r, s in chain:
            run_one(args, r, s)
            after_run(args, r, s)
            with lock:  # the report follows every finished run
                report(args, rows, seeds, argv)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_chain, c) for c in chains(rows, seeds)]
    errors = [str(e) for f in futures if (e := f.exception()) is not None]
    if errors:
        raise SystemExit("\n".join(errors))


# --------------------------------------------------------------------------- collecting


def read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def online_curve(rd: Path) -> dict[str, Any] | None:
    """Mask ratio / online pseudo-label accuracy at 10 %, 50 % and 100 % of training."""
    path = rd / "online" / "train.jsonl"
    if not path.exists():
        return None
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "mask_ratio" in r]
    if not recs:
        return None
    pick = {f"{p}%": recs[min(len(recs) - 1, max(0, round(p / 100 * len(recs)) - 1))]
            for p in (10, 50, 100)}
    return {k: {m: r.get(m) for m in ("mask_ratio", "pseudo_acc", "pseudo_acc_selected")}
            for k, r in pick.items()}


def stage_iterations(rd: Path, stages: list[str]) -> int:
    """Training iterations of the run's ``stages`` (their train.jsonl's last record): the
    machine-independent cost of a method."""
    from ciscr.utils.io import read_jsonl

    logs = [read_jsonl(p) for st in stages if st in TRAIN_STAGES
            if (p := rd / st / "train.jsonl").exists()]
    return sum(int(rows[-1]["iteration"]) for rows in logs if rows)


def collect(args: argparse.Namespace, row: str, seed: int) -> dict | None:
    """One finished run's figures, or None. ``wall_seconds`` sums its stages' own times
    (done.json; a stage copied from another run counts in both rows: it is part of both
    methods); ``machine_seconds`` is what this row's own invocations took (wall.json)."""
    rd = finished_dir(args, row, seed)
    if rd is None:
        return None
    res = read(rd / "results.json")
    if row == "suponly":
        final, stages = read(rd / "stage1" / "metrics.json"), (res or {}).get("stages", {})
        stages = {k: v for k, v in stages.items() if k in ("stage1", "pseudo0")} or {
            "stage1": read(rd / "stage1" / "done.json") or {}}
        own = None  # part of the ST / ST++ run's machine time
    else:
        final, stages = res["final_metrics"], res["stages"]
        own = read(rd / "wall.json") or {}
    names = ["stage1"] if row == "suponly" else list(stages)
    half = read(rd / "selection" / "half_quality.json") if row in ("stpp", "ciscr") else None
    return {
        "row": row, "seed": seed, "run_dir": str(rd), "val_miou": final["miou"],
        "iou": final["iou"], "class_names": final.get("class_names"),
        "pseudo_before": stages.get("pseudo0", {}).get("pseudo_miou"),
        "pseudo_after": (stages.get("pseudo0", {}) if row == "suponly"
                         else stages.get("pseudo_final", {})).get("pseudo_miou"),
        "half_quality": {k: (v or {}).get("miou") for k, v in (half or {}).items()} or None,
        "wall_seconds": sum((stages.get(n) or {}).get("wall_seconds") or 0.0 for n in names),
        "own_stage_seconds": None if row == "suponly" else sum(
            (v or {}).get("wall_seconds") or 0.0 for n, v in stages.items()
            if not (rd / n / COPIED).exists()),
        "iterations": stage_iterations(rd, names),
        "machine_seconds": own.get("seconds") if own else None,
        "cpu_seconds": own.get("cpu_seconds") if own else None, "online": online_curve(rd),
        "stage_val_miou": {k: v.get("val_miou") for k, v in stages.items()
                           if v and v.get("val_miou") is not None},
        # SupOnly shares the ST run's directory, not its final model
        "bn_recalibrated": None if row == "suponly" else read(rd / "bn_recalibration.json"),
    }


# --------------------------------------------------------------------------- BN diagnostic


def after_run(args: argparse.Namespace, row: str, seed: int) -> None:
    """The diagnostics of a finished run, computed as soon as it is finished (no training;
    cached in the run directory, so the report shows them while later runs still train)."""
    bn_recalibration(args, row, seed)
    rd = run_dir(args, row, seed)
    if row == "ciscr" and (rd / "selection" / "done.json").exists():
        import camvid_diagnostics

        camvid_diagnostics.cached(rd)  # RUN/diagnostics.json
    if row == "unimatch_cisc" and (rd / "online" / "done.json").exists():
        import online_cisc_source

        online_cisc_source.cached(rd)  # RUN/online_cisc_source.json


def table_diagnostic(args: argparse.Namespace, seeds: list[int]) -> list[str]:
    """The CISC-weight diagnostic (``camvid_diagnostics.py``) of the CISC-R runs that have it."""
    import camvid_diagnostics

    dirs = [d / "diagnostics.json" for s in seeds
            if (d := finished_dir(args, "ciscr", s, "diagnostics.json"))]
    if not dirs:
        return ["(no CISC-R run with its stage 1, pseudo labels and selection diagnosed yet)"]
    results = [json.loads(d.read_text()) for d in dirs]
    results = [r for r in results if all(k in r for k in camvid_diagnostics.LABELS)]
    if not results:
        return ["(diagnostics of an older version: rerun the benchmark to redo them)"]
    return ["Each pixel of each unlabeled image gets w = the CISC map of its own stage-1 pseudo "
            "class against a queried labeled prototype (model M0, the stage-2 teacher): the "
            "weight the rectified loss gives it. AUROC = how well a signal separates correctly "
            "from wrongly pseudo-labelled pixels (the unlabeled pool's ground truth, never used "
            "in training; 0.5 = no information).", "",
            *camvid_diagnostics.markdown(results, [d.parent for d in dirs])]


def table_online_source(args: argparse.Namespace, seeds: list[int]) -> list[str]:
    """EMA memory vs refreshed bank of the UniMatch + CISC runs (``online_cisc_source.py``)."""
    import online_cisc_source

    paths = [d / online_cisc_source.RESULT for s in seeds
             if (d := finished_dir(args, "unimatch_cisc", s, online_cisc_source.RESULT))]
    if not paths:
        return ["(no finished UniMatch + CISC run measured yet)"]
    return ["The CISC weight of each unlabeled pixel (its pseudo class under the final model, "
            "whole image) under the run's bank as last refreshed (what it trained with), its "
            "EMA memory (the alternative, kept by every run) and a bank refreshed from the final "
            "model, scored as in the diagnostic below "
            "(`python benchmarks/online_cisc_source.py RUN`).", "",
            *online_cisc_source.markdown([json.loads(p.read_text()) for p in paths],
                                         [p.parent for p in paths])]


def bn_recalibration(args: argparse.Namespace, row: str, seed: int) -> None:
    """Recompute the final model's BatchNorm statistics from the CLEAN labeled images (no
    augmentation, training mode, cumulative average) and re-evaluate: does BN mixing clean and
    strongly augmented crops cost accuracy? No training; cached in RUN/bn_recalibration.json."""
    rd = run_dir(args, row, seed)
    res = read(rd / "results.json")
    if row == "suponly" or res is None or (rd / "bn_recalibration.json").exists():
        return
    import torch

    from ciscr.config import load_config
    from ciscr.pipeline import evaluate_model, load_stage_model, setup_run
    from ciscr.pseudo import load_eval_image

    cfg = load_config(rd / "config.yaml", ["train.progress=false"])
    ctx = setup_run(cfg, rd, torch.device("cpu"))
    model = load_stage_model(ctx, rd / res["final_stage"])
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative: every labeled image counts the same
    model.train()
    with torch.no_grad():
        for s in ctx.labeled:
            x = load_eval_image(s, cfg.data.mean, cfg.data.std, ctx.device)
            # With its mirror image: BN in training mode needs 2 values per channel (ASPP pool).
            model(torch.cat([x, x.flip(-1)]))
    after = evaluate_model(ctx, model.eval())["miou"]
    atomic_write_json(rd / "bn_recalibration.json",
                      {"before": res["final_metrics"]["miou"], "after": after})


# --------------------------------------------------------------------------- report


def fmt(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def paired_difference(xs: list[float | None], ref: list[float | None]) -> str:
    """Mean of x - ref over the seeds both have (same seed = same labeled split), ± its standard
    error; in mIoU points."""
    d = [100 * (x - r) for x, r in zip(xs, ref, strict=True) if x is not None and r is not None]
    if len(d) < 2:
        return "n/a" if not d else f"{d[0]:+.2f} (n=1)"
    se = statistics.stdev(d) / len(d) ** 0.5
    return f"{statistics.fmean(d):+.2f} ± {se:.2f} (n={len(d)})"


def values(runs: dict, row: str, seeds: list[int], key: str = "val_miou") -> list[float | None]:
    return [(runs.get((row, s)) or {}).get(key) for s in seeds]


def table_main(runs: dict, rows: list[str], seeds: list[int]) -> list[str]:
    out = ["| method | val mIoU (%), mean ± std | per seed | minus SupOnly (paired, ± SE) "
           "| minus its base row | cost per run: training iterations / wall min |", "|---|---|---|---|---|---|"]
    sup = values(runs, "suponly", seeds)
    for r in rows:
        xs = values(runs, r, seeds)
        got = [x for x in xs if x is not None]
        if not got:
            out.append(f"| {ROWS[r][0]} | not run yet | | | | |")
            continue
        sd = statistics.stdev(got) if len(got) > 1 else None
        each = " / ".join("-" if x is None else f"{100 * x:.1f}" for x in xs)
        base = paired_difference(xs, values(runs, BASE[r], seeds)) if r in BASE else ""
        its = [i for i in values(runs, r, seeds, "iterations") if i]
        walls = [w for w in values(runs, r, seeds, "wall_seconds") if w]
        wall = f"{statistics.fmean(its):.0f}" if its else "n/a"
        wall += f" / {statistics.fmean(walls) / 60:.0f}" if walls else " / n/a"
        vs_sup = paired_difference(xs, sup) if r != "suponly" else ""
        out.append(f"| {ROWS[r][0]} | {fmt(statistics.fmean(got), sd)} (n={len(got)}) | {each} "
                   f"| {vs_sup} | {base} | {wall} |")
    return out


def table_per_class(runs: dict, rows: list[str], seeds: list[int]) -> list[str]:
    names = next((r["class_names"] for r in runs.values() if r and r["class_names"]), None)
    if not names:
        return ["(no finished run)"]
    out = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        got = [runs[(r, s)] for s in seeds if runs.get((r, s))]
        if got:
            cells = [fmt(statistics.fmean([g["iou"][k] or 0.0 for g in got]))
                     for k in range(len(names))]
            out.append(f"| {ROWS[r][0]} | " + " | ".join(cells) + " |")
    return out


def _mean(xs: list[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return statistics.fmean(got) if got else None


def table_pseudo(runs: dict, rows: list[str], seeds: list[int]) -> list[str]:
    out = ["| method | stage-1 labels (before) | final model's labels (after) | reliable half "
           "| unreliable half | BN from clean labeled images: before -> after |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        got = [runs[(r, s)] for s in seeds if runs.get((r, s))]
        if not got:
            continue
        halves = [g["half_quality"] or {} for g in got]
        bn = [g["bn_recalibrated"] for g in got if g["bn_recalibrated"]]
        bn_s = (f"{fmt(_mean([b['before'] for b in bn]))} -> {fmt(_mean([b['after'] for b in bn]))}"
                f" (n={len(bn)})" if bn else "n/a")
        out.append(f"| {ROWS[r][0]} | {fmt(_mean([g['pseudo_before'] for g in got]))} "
                   f"| {fmt(_mean([g['pseudo_after'] for g in got]))} "
                   f"| {fmt(_mean([h.get('reliable') for h in halves]))} "
                   f"| {fmt(_mean([h.get('unreliable') for h in halves]))} | {bn_s} |")
    return out


def table_online(runs: dict, seeds: list[int]) -> list[str]:
    out = ["| method | share of unlabeled pixels used (10 % / 50 % / end of training) "
           "| online pseudo-label accuracy (same points) |", "|---|---|---|"]
    for r in ("fixmatch", "unimatch", "unimatch_cisc"):
        curves = [runs[(r, s)]["online"] for s in seeds if runs.get((r, s)) and
                  runs[(r, s)]["online"]]
        if not curves:
            continue
        cell = [" / ".join(fmt(_mean([c[p][k] for c in curves])) for p in ("10%", "50%", "100%"))
                for k in ("mask_ratio", "pseudo_acc")]
        out.append(f"| {ROWS[r][0]} | {cell[0]} | {cell[1]} |")
    return out


def shipped_row() -> str:
    """The row of the method that ``ciscr run camvid`` trains (``method.name`` of the shipped
    config, without the options)."""
    import yaml

    cfg = yaml.safe_load((REPO / "ciscr/configs/camvid.yaml").read_text())
    return next(r for r, (_, preset, extra) in ROWS.items()
                if preset == cfg["method"]["name"] and not extra and r != "suponly")


def targets(runs: dict, seeds: list[int]) -> list[str]:
    """The issues' targets, checked on the paired means (never tuned on them)."""
    def diff(a: str, b: str) -> float | None:
        d = [x - y for x, y in zip(values(runs, a, seeds), values(runs, b, seeds), strict=True)
             if x is not None and y is not None]
        return 100 * statistics.fmean(d) if d else None

    run = shipped_row()
    checks = [("CISC-R >= SupOnly + 3", "ciscr", "suponly", 3.0, False),
              ("CISC-R >= ST++", "ciscr", "stpp", 0.0, False),
              ("UniMatch >= SupOnly + 5", "unimatch", "suponly", 5.0, False),
              ("UniMatch + CISC >= UniMatch", "unimatch_cisc", "unimatch", 0.0, False),
              (f"`ciscr run camvid` ({ROWS[run][0]}, the shipped config's method) beats "
               "`ciscr train camvid` (SupOnly) on the same labeled images", run, "suponly",
               0.0, True)]
    out = []
    for text, a, b, need, strict in checks:
        d = diff(a, b)
        met = d is not None and (d > need if strict else d >= need)
        verdict = "not measured yet" if d is None else (
            f"{'MET' if met else 'MISSED'} ({d:+.2f} points, paired mean)")
        out.append(f"- {text}: {verdict}")
    return out


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def superseded_reason(run_dir: Path) -> str:
    """The run's REASON.txt (why it was superseded) as one line ('' without one): it goes into
    a table cell, where a line break would end the row."""
    reason = run_dir / "REASON.txt"
    return " ".join(reason.read_text().split()) if reason.exists() else ""


def table_superseded(args: argparse.Namespace) -> list[str]:
    """Runs moved to ``RUNS-superseded/`` when the protocol changed under them: listed with the
    reason written beside them (REASON.txt) and their own final figures, never in the tables."""
    found = {}  # name -> directory: the archived copy, unless the run is still on this machine
    for root in (archive_root(args, superseded=True), superseded_root(args)):
        found.update({p.name: p for p in (root.iterdir() if root.is_dir() else []) if p.is_dir()})
    rows = []
    for rd in (found[k] for k in sorted(found)):
        # The last stage that trained (finished, or stopped when the run was superseded) and
        # the last one that finished (its val mIoU).
        stages = ("online", "stage3", "stage2", "stage1")
        last = next((s for s in stages if (rd / s / "train.jsonl").exists()), None)
        if last is None:
            continue
        why = superseded_reason(rd) or "-"
        log = (rd / last / "train.jsonl").read_text().splitlines()
        its = json.loads(log[-1]).get("iteration", "?") if log else "?"
        state = "" if (rd / last / "done.json").exists() else " (not finished)"
        final = next((s for s in stages if (rd / s / "done.json").exists()), None)
        miou = f"{100 * read(rd / final / 'done.json')['val_miou']:.2f} ({final})" if final else "-"
        s1 = (read(rd / "stage1" / "done.json") or {}).get("val_miou")
        rows.append(f"| `{rd.name}` | {why} | {last}: {its}{state} | {miou} | "
                    f"{'' if s1 is None else f'{100 * s1:.2f}'} |")
    earlier = sorted(Path(args.out).glob(f"{args.name}_superseded_*.md"))
    if not rows and not earlier:
        return []
    lost = [f"- runs superseded before their artefacts were archived, their directories lost "
            f"with the machine that held them: [{p.name}]({p.name})" for p in earlier]
    table = ["| run | why superseded | last stage trained: last logged iteration | val mIoU "
             "(the last finished training stage) | its stage 1's val mIoU |",
             "|---|---|---|---|---|", *rows]
    return ["## Superseded runs (an earlier protocol; not in any table above)", "",
            *(table if rows else []), *([""] if rows and lost else []), *lost, ""]


def in_progress(args: argparse.Namespace, runs: dict, rows: list[str],
                seeds: list[int]) -> list[str]:
    """One line per started, unfinished run: the stage it trains, its checkpoint's iteration of
    the stage's total, and what the rest of that stage takes at the run's recent median step
    time (a projection for planning machine time, not a measurement)."""
    from ciscr.engine.checkpoint import load_checkpoint
    from ciscr.engine.train import CKPT_NAME as CKPT
    from ciscr.utils.io import read_jsonl

    out = []
    for s in seeds:
        for r in rows:
            rd = run_dir(args, r, s)
            if r == "suponly" or runs.get((r, s)) or not rd.is_dir():
                continue
            done = [p.name for p in sorted(rd.iterdir()) if (p / "done.json").exists()]
            busy = [st for st in TRAIN_STAGES
                    if (rd / st / CKPT).exists() and st not in done]
            if not busy:
                out.append(f"- in progress: {ROWS[r][0]} s{s}: "
                           + (f"done {', '.join(done)}" if done else "started, no checkpoint yet"))
                continue
            ck = load_checkpoint(rd / busy[0] / CKPT)
            it, total = int(ck["iteration"]), int(ck["total_iters"])
            log = rd / busy[0] / "train.jsonl"
            recent = [x["step_seconds"] for x in (read_jsonl(log) if log.exists() else [])[-10:]
                      if "step_seconds" in x]
            eta = (f"; the rest of {busy[0]} ~{(total - it) * statistics.median(recent) / 3600:.1f}"
                   f" h at its recent {statistics.median(recent):.1f} s/step" if recent else "")
            out.append(f"- in progress: {ROWS[r][0]} s{s}: {busy[0]} at iteration {it}/{total} "
                       f"(its checkpoint){eta}")
    return out


def budget_reading() -> list[str]:
    """camvid_budget.py's computed reading of SupOnly's learning curves (its default runs)."""
    import camvid_budget as cb

    a = cb.parse_args([])
    epochs, seeds = [int(x) for x in a.epochs.split(",")], [int(x) for x in a.seeds.split(",")]
    curves = cb.load_curves(a, [(e, s) for s in seeds for e in epochs])
    return cb.reading(curves, epochs, seeds)


def repeatability(runs: dict, seeds: list[int]) -> str:
    """SupOnly at the protocol's budget trained twice with one seed: in the budget study and
    as stage 1 here. Same config and seed; the study evaluates every 5 epochs, which (until
    evaluation forked the random stream, 2026-11-30) shifted the dropout masks of the rest of
    its training. So the two are two draws of one configuration: their gap is the run-to-run
    noise a single seed carries, the scale of what 3 seeds must average out."""
    import camvid_budget as cb

    from ciscr.config import load_config

    a, e = cb.parse_args([]), load_config("camvid").train.epochs
    pairs = []
    for s in seeds:
        c = cb.load_curves(a, [(e, s)])[(e, s)]
        sup = (runs.get(("suponly", s)) or {}).get("val_miou")
        if c and c["final"] and sup is not None:
            pairs.append(f"seed {s}: {100 * c['final']['miou']:.2f} in the budget study, "
                         f"{100 * sup:.2f} here ({100 * (sup - c['final']['miou']):+.2f})")
    if not pairs:
        return "no seed has both runs finished yet"
    return "; ".join(pairs)


def pairs_reading(out: Path) -> str:
    """camvid_pairs.py's counts (docs/results/camvid_pairs.json), or how to make them."""
    res = read(out / "camvid_pairs.json")
    if res is None:
        return "not counted yet (`python benchmarks/camvid_pairs.py`)"
    off, on, q = res["pairs_rule_off"], res["pairs_rule_on"], res["query"]
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    return (f"stage-1 pairs whose class covers >= 3 % of both crops {pct(off['both_crops_ge_3pct'])}"
            f" -> {pct(on['both_crops_ge_3pct'])} (class absent from a crop "
            f"{pct(off['class_absent_from_a_crop'])} -> {pct(on['class_absent_from_a_crop'])}; "
            f"crops decoded per pair {off['crops_per_pair']:.1f} -> {on['crops_per_pair']:.1f}); "
            f"queried crops showing their class on >= 3 %: {pct(q['single_crop_ge_3pct'])} of "
            f"single crops -> all but {pct(q['rule_finds_none'])} with the rule "
            "(docs/results/camvid_pairs.md)")


def items_moved(args: argparse.Namespace, runs: dict, seeds: list[int]) -> list[str]:
    """Issue 11's 'what each item moved', from what is measured; an item no run isolates is
    said to be not isolated (nothing here is typed by hand)."""
    def d(a: str, b: str) -> str:
        return paired_difference(values(runs, a, seeds), values(runs, b, seeds))

    bn = [g["bn_recalibrated"] for g in runs.values() if g and g.get("bn_recalibrated")]
    bn_s = (paired_difference([b["after"] for b in bn], [b["before"] for b in bn])
            + " over the finished runs of every row" if bn else "no run recalibrated yet")
    return [
        "Paired differences in mIoU points (± SE over seeds); `n/a` = a row not finished yet.", "",
        "1. Stage budgets from each stage's data: the training iterations of each method are in "
        "the cost column above. Not isolated: protocol 1 (docs/results/protocol1) changed the "
        "budget, crop and resolution at once.",
        "2. SupOnly's budget from its learning curve (camvid_budget.md): "
        + " ".join(x.removeprefix("- ") + ";" for x in budget_reading())
        + " the same SupOnly configuration and seed trained twice (budget study, and stage 1 "
        "here; the study's evaluations shifted its dropout stream, and the two may have "
        "trained on different machines, each report naming its own: two random draws): "
        f"{repeatability(runs, seeds)}.",
        f"3. The >= 3 % rule: {pairs_reading(Path(args.out))}. Its effect on mIoU is not "
        "isolated (no CISC-R run with the rule off).",
        f"4. ST and ST++ as ST++ runs them: ST - SupOnly {d('st', 'suponly')}, ST++ - SupOnly "
        f"{d('stpp', 'suponly')}. The earlier 1:1 form (`method.retrain_batches=split`, no "
        "cutout) is not rerun on this protocol.",
        f"5. The unlabeled loss, each against CISC-R (bank): x teacher confidence "
        f"{d('bank_conf', 'ciscr_bank')}; confidence >= 0.9 {d('bank_thr', 'ciscr_bank')}; "
        f"lambda 0.5 ramped {d('bank_ramp', 'ciscr_bank')}. As signals, without training: the "
        "AUROC table of the diagnostic below (CISC weight, confidence, their product).",
        f"6. BatchNorm statistics from clean labeled images, after - before: {bn_s}. The Eq. 10 "
        "clamp and the separate stage-3 augmentation streams are corrections, not isolated.",
        f"7. Warm start (init=previous) - fresh init, on CISC-R (bank): "
        f"{d('bank_warm', 'ciscr_bank')}.",
    ]


COST_NOTE = (
    "Cost: training iterations summed over the method's training stages (independent of the "
    "machine, but an iteration's work differs: a UniMatch iteration trains a weak, two strong "
    "and a feature-perturbed view of each unlabeled image, an ST one a single view; UniMatch "
    "+ CISC adds a forward pass of the labeled images every `method.prototype_refresh` "
    "iterations), and "
    "wall minutes of its stages (done.json) summed, a stage copied from another row counted "
    "in both. Wall minutes grow when other processes share the cores.")


def report_argv(argv: list[str]) -> list[str]:
    """The arguments that make the report: without --report-only and the --supersede step."""
    out, skip = [], False
    for a in argv:
        if skip or a == "--report-only":
            skip = False
            continue
        if a in ("--supersede", "--reason", "--as"):
            skip = True
            continue
        if not a.startswith(("--supersede=", "--reason=", "--as=")):
            out.append(a)
    return out


def write_report(args: argparse.Namespace, runs: dict, rows: list[str], seeds: list[int],
                 argv: list[str]) -> Path:
    out = Path(args.out)
    cmd = "python benchmarks/camvid.py " + shlex.join(report_argv(argv))
    walls = [r["own_stage_seconds"] for r in runs.values() if r and r["own_stage_seconds"]]
    missing = [f"{ROWS[r][0]} s{s}" for s in seeds for r in rows if not runs.get((r, s))]
    main_rows = [r for r in rows if r in MAIN]
    opt_rows = [r for r in rows if r in OPTIONS]
    lines = [
        "# CamVid: does semi-supervision pay? (protocol 2)", "",
        f"- command: `{cmd.strip()}`", f"- machine: {machine()}",
        f"- generated: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from `{args.runs}` "
        f"and the archived artefacts of finished stages in `{archive_root(args).name}/` (runs "
        "finished on a machine whose runs/ is gone)",
        f"- runs: {args.jobs} at a time, {threads_per_job(args.jobs)} torch thread(s) each; "
        f"machine time of the finished runs {sum(walls) / 3600:.1f} h (their stages' own "
        "times, a stage copied between runs counted once; the unfinished runs' time not yet)",
        *([f"- OVERRIDES, NOT THE PROTOCOL: {' '.join(args.overrides)}"] if args.overrides
          else []),
        "- protocol: `configs/camvid.yaml`; 1/8 labeled (the split drawn with the seed), the "
        "rest of the 367 train images unlabeled (their ground truth only scores pseudo labels); "
        "val (101) for mIoU; result = the LAST checkpoint of the final stage.",
        *([f"- NOT FINISHED: {len(missing)} runs missing ({', '.join(missing[:8])}"
           f"{' ...' if len(missing) > 8 else ''})"] if missing else []),
        *in_progress(args, runs, rows, seeds), "",
        "## Targets" + (" (NOT judged: the runs use overrides)" if args.overrides else ""), "",
        *targets(runs, seeds), "",
        "## Validation mIoU", "", *table_main(runs, main_rows, seeds), "", COST_NOTE, "",
        *(["## Options of the unlabeled loss and warm start (paired with the row they modify)",
           "", *table_main(runs, opt_rows, seeds), ""] if opt_rows else []),
        "## Per-class IoU (%), mean over seeds", "", *table_per_class(runs, rows, seeds), "",
        "## Pseudo-label mIoU (%) of the unlabeled pool (Table 5 / Fig. 10 shape), and BatchNorm",
        "", "'before' = TTA labels of the stage-1 model; 'after' = of the final model; halves = "
        "the stage-1 labels of the reliable / unreliable halves of the method's selection. Last "
        "column: val mIoU of the final model as trained -> with BN statistics recomputed from "
        "the clean labeled images (no training).", "", *table_pseudo(runs, rows, seeds), "",
        "## Online methods over training", "", *table_online(runs, seeds), "",
        "## Online CISC: prototypes from a refreshed bank or an EMA memory?", "",
        *table_online_source(args, seeds), "",
        "## What each item of issue 11 moved", "", *items_moved(args, runs, seeds), "",
        "## Diagnostic: does the CISC weight tell right from wrong pseudo labels?", "",
        *table_diagnostic(args, seeds), "",
        *table_superseded(args),
    ]
    md = out / f"{args.name}.md"
    atomic_write_bytes(md, ("\n".join(lines) + "\n").encode())
    atomic_write_json(out / f"{args.name}.json", {
        "command": cmd.strip(), "machine": machine(),
        "runs": [r for r in runs.values() if r]})
    return md


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    rows = [r.strip() for r in args.methods.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.supersede:
        supersede(args)
    elif not args.report_only:
        import torch

        torch.set_num_threads(threads_per_job(args.jobs))  # the diagnostics run in this process
        run_all(args, rows, seeds, argv)  # after_run follows every run there, finished or not
    print(report(args, rows, seeds, argv))
    return 0


def report(args: argparse.Namespace, rows: list[str], seeds: list[int], argv: list[str]) -> Path:
    """Collect every run's figures and write the report (``--out``/``--name``.md and .json)."""
    # Every finished stage's small artefacts into the committed archive first: what finished
    # here outlives this machine's runs/ (archive.py).
    archive.mirror(Path(args.runs), archive_root(args))
    archive.mirror(superseded_root(args), archive_root(args, superseded=True), unfinished=True)
    runs = {(r, s): collect(args, r, s) for r in rows for s in seeds}
    return write_report(args, runs, rows, seeds, argv)


if __name__ == "__main__":
    raise SystemExit(main())
