"""CamVid protocol 3: does semi-supervision pay over the labeled images alone, one seed's whole
table inside one session?

Per seed: a **base** (SupOnly from ImageNet, ``train.epochs`` of ``configs/camvid.yaml``),
trained once; then every row trains the config's T iterations FROM the base
(``model.init``): the control **SupOnly, continued** (labeled images only, same T and schedule),
ST++, CISC-R (query / bank), UniMatch and UniMatch + CISC. FixMatch, the paper's fresh-stage
form and the unlabeled-loss options are one-seed option rows, run after the main rows.

    python benchmarks/camvid.py                      # seeds 0, 1, 2 in order, then the options
    python benchmarks/camvid.py --seeds 0 --no-options
    python benchmarks/camvid.py --report-only

Every run is a plain ``ciscr run camvid ...`` in its own directory under ``runs/camvid/``, so the
benchmark is resumable (rerun it; finished runs are only re-read). Two runs at a time, one torch
thread each (the base, alone, takes every core). The report (``docs/results/camvid.md`` +
``.json``) is generated from the runs' own artefacts.

Durability: each report first copies the small artefacts of every finished stage into the
committed ``docs/results/camvid-runs/`` (``archive.py``), and a finished run is read from there
when runs/ lost it. A row counts only if made with the benchmark's config (paths aside) FROM ITS
SEED'S BASE (the sha256 of the base checkpoint, recorded by both): a lost machine costs at most
the seed in flight, whose base is then retrained and whose rows rerun.

Sharing (exact: the same base, the same config of those stages): CISC-R (bank) and the option
rows on CISC-R reuse stage1/, pseudo0/ and selection/ of CISC-R (query); ST++ reuses its pseudo0/
(the base's TTA labels: the same for every stage-wise row).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import archive  # noqa: E402  (benchmarks/, on sys.path when run as a script)
import camvid_report  # noqa: E402

from ciscr.utils.io import atomic_write_json  # noqa: E402

BASE_ROW = "suponly_base"
CONTROL = "suponly_continued"
# name -> (label, method preset, extra overrides)
ROWS: dict[str, tuple[str, str, list[str]]] = {
    BASE_ROW: ("SupOnly base (from ImageNet)", "suponly", []),
    CONTROL: ("SupOnly, continued (the control)", "suponly", []),
    "stpp": ("ST++", "stpp", []),
    "ciscr": ("CISC-R (query)", "ciscr", []),
    "ciscr_bank": ("CISC-R (bank)", "ciscr_bank", []),
    "unimatch": ("UniMatch", "unimatch", []),
    "unimatch_cisc": ("UniMatch + CISC (ours)", "unimatch_cisc", []),
    "fixmatch": ("FixMatch", "fixmatch", []),
    "ciscr_fresh": ("CISC-R (query), the paper's stages from ImageNet", "ciscr",
                    ["method.init=fresh"]),
    "bank_conf": ("CISC-R (bank) x teacher confidence", "ciscr_bank",
                  ["method.confidence_weighting=true"]),
    "bank_thr": ("CISC-R (bank), confidence >= 0.9", "ciscr_bank",
                 ["method.confidence_threshold=0.9"]),
    "bank_ramp": ("CISC-R (bank), lambda 0.5 ramped over the first half", "ciscr_bank",
                  ["method.unlabeled_weight=0.5", "method.unlabeled_rampup=0.5"]),
    "stpp_thr": ("ST++, confidence >= 0.95 (CISC-R's threshold)", "stpp",
                 ["method.confidence_threshold=0.95"]),
    "bank_cb": ("CISC-R (bank), confident pixels class-balanced", "ciscr_bank",
                ["method.class_balance=true"]),
    "unicisc_cb": ("UniMatch + CISC, confident pixels class-balanced", "unimatch_cisc",
                   ["method.class_balance=true"]),
}
MAIN = [CONTROL, "stpp", "ciscr", "ciscr_bank", "unimatch", "unimatch_cisc"]
# bank_conf first: seed 0's CISC diagnostic (docs/results/camvid.md) found teacher confidence a
# better signal of a wrong pseudo label than the CISC weight (its AUROC table).
# stpp_thr: ST++ (the published recipe) lost most of the main rows on seed 0, on the classes the
# base under-labels, the cause the threshold removed from CISC-R (docs/METHOD-NOTES.md).
# bank_cb, unicisc_cb: the pool diagnostic (the report's "the base's pseudo labels, class by
# class") shows the 0.95 threshold keeping 93 % of road's pixels and 11 % of fence's, and the
# rows losing to the control on fence, pavement and car (seeds 0-1): class_balance gives each
# class back its pseudo-label share of the loss (ciscr.engine.losses.class_balanced;
# docs/METHOD-NOTES.md says what the rows measured).
# The options run as two chains, OPTIONS' first half and its second, the costly ciscr_fresh last.
OPTIONS = ["bank_cb", "stpp_thr", "fixmatch", "bank_thr",
           "unicisc_cb", "bank_conf", "bank_ramp", "ciscr_fresh"]
# The two job slots of a seed after its base, each a chain run in order: the costliest first,
# balanced by the measured cost per row (the report's cost table: seed 0 took 21 + 18 + 11 + 15
# = 65 min of wall in the first, 29 + 28 = 57 in the second); a row that shares stages follows
# its source in the same chain.
CHAINS = [["ciscr", "ciscr_bank", CONTROL, "stpp"], ["unimatch_cisc", "unimatch"]]
SHARED_WITH: dict[str, tuple[str, tuple[str, ...]]] = {
    **{r: ("ciscr", ("stage1", "pseudo0", "selection"))
       for r in ("ciscr_bank", "ciscr_fresh", "bank_conf", "bank_thr", "bank_ramp", "bank_cb")},
    "stpp": ("ciscr", ("pseudo0",)),
    "stpp_thr": ("ciscr", ("pseudo0",)),
}
COPIED = "copied_from.txt"  # marks a stage dir copied from another run (share_stages)
BASE_SHA = "base_sha256.txt"  # in the base's run dir: the sha256 of its stage-1 checkpoint
SEEDS_FILE = "seeds.json"  # in the archive: each seed's first start, last finish, active time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared/data/camvid"))
    p.add_argument("--weights", default=str(REPO.parent / "shared/weights/mobilenet_v2_imagenet.pth"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--option-seeds", default="0", help="seeds of the option rows")
    p.add_argument("--no-options", action="store_true", help="main rows only")
    p.add_argument("--labeled", default="0.125")
    p.add_argument("--runs", default=str(REPO / "runs/camvid"))
    p.add_argument("--out", default=str(REPO / "docs/results"))
    p.add_argument("--name", default="camvid")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with cores/jobs threads")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (repeatable). NOT the protocol: for a "
                        "smoke test, e.g. --set train.epochs=2 --set train.warm_epochs=1, with "
                        "its own --runs and --out")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- where runs are


def run_dir(args: argparse.Namespace, row: str, seed: int) -> Path:
    return Path(args.runs) / f"{row}_s{seed}"


def archive_root(args: argparse.Namespace) -> Path:
    return Path(args.out) / f"{args.name}-runs"


def base_checkpoint(args: argparse.Namespace, seed: int) -> Path:
    return run_dir(args, BASE_ROW, seed) / "stage1" / "checkpoint.pt"


def base_sha(args: argparse.Namespace, seed: int) -> str | None:
    """The sha256 of the seed's finished base checkpoint (live, else archived), or None."""
    rd = archive.locate([run_dir(args, BASE_ROW, seed)], archive_root(args), BASE_SHA)
    return (rd / BASE_SHA).read_text().strip() if rd else None


def row_overrides(args: argparse.Namespace, row: str, seed: int) -> list[str]:
    _, preset, extra = ROWS[row]
    init = [] if row == BASE_ROW else [f"model.init={base_checkpoint(args, seed)}"]
    return [f"data.root={args.data}", f"model.pretrained={args.weights}",
            f"method.name={preset}", f"seed={seed}", f"data.labeled={args.labeled}",
            # The precision protocol 3 was run at (bf16 autocast, native on its CPUs); the
            # packaged config's `auto` would make fp32 runs elsewhere, not this protocol.
            "train.progress=false", "train.amp=bf16", *init, *extra, *args.overrides]


def current_protocol(args: argparse.Namespace, row: str, seed: int, rd: Path) -> bool:
    """Whether the run in ``rd`` was made with the config this benchmark would run for ``row``
    now (data / weight / init paths aside: another machine puts them elsewhere) and, for a row,
    from its seed's current base; warns when not."""
    import yaml

    from ciscr.config import load_config
    from ciscr.errors import ConfigError
    from ciscr.run_setup import check_same_config
    from ciscr.warmstart import warm_config

    saved = yaml.safe_load((rd / "config.yaml").read_text()) if (rd / "config.yaml").exists() else {}
    model = saved.get("model", {})
    keep = [f"data.root={saved.get('data', {}).get('root', args.data)}",
            f"model.pretrained={model.get('pretrained', args.weights)}"]
    if row != BASE_ROW:
        sha = base_sha(args, seed)
        if not sha or model.get("init_sha256") != sha:
            print(f"warning: {rd} is not counted: not trained from seed {seed}'s current base",
                  file=sys.stderr)
            return False
        keep += [f"model.init={model.get('init')}", f"model.init_sha256={sha}"]
    try:
        cfg = load_config("camvid", row_overrides(args, row, seed) + keep)
        check_same_config(warm_config(cfg), rd / "config.yaml")
    except (ConfigError, OSError) as err:
        print(f"warning: {rd} is not counted: {err}", file=sys.stderr)
        return False
    return True


def finished_dir(args: argparse.Namespace, row: str, seed: int,
                 marker: str = "results.json") -> Path | None:
    """The finished run's directory under runs/, else its archived copy; None while it is not
    finished or not made by the current protocol from the seed's current base."""
    return archive.locate([run_dir(args, row, seed)], archive_root(args), marker,
                          lambda rd: current_protocol(args, row, seed, rd))


# --------------------------------------------------------------------------- running


def ciscr_command(args: argparse.Namespace, row: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "ciscr", "run", "camvid", "--out", str(run_dir(args, row, seed)),
            *row_overrides(args, row, seed)]


def share_stages(args: argparse.Namespace, row: str, seed: int) -> None:
    if row not in SHARED_WITH:
        return
    source, stages = SHARED_WITH[row]
    copy_stages(run_dir(args, source, seed), run_dir(args, row, seed), stages)


def copy_stages(src: Path, dst: Path, stages: tuple[str, ...]) -> None:
    """Copy each of ``stages`` finished in run ``src`` and absent from run ``dst``, marked as
    copied (COPIED names the source)."""
    for stage in stages:
        if (src / stage / "done.json").exists() and not (dst / stage).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src / stage, dst / stage)
            # The machine time of a copied stage belongs to its source run (the report's total).
            (dst / stage / COPIED).write_text(f"{src / stage}\n")


def run_one(args: argparse.Namespace, row: str, seed: int, threads: int) -> None:
    """Run (or finish) one row unless it is finished (here or archived)."""
    if finished_dir(args, row, seed) is not None:
        return
    share_stages(args, row, seed)
    launch(args, row, seed, threads)


def launch(args: argparse.Namespace, row: str, seed: int, threads: int) -> None:
    """``ciscr run`` of one row with ``threads`` torch threads (:func:`run_command`)."""
    run_command(run_dir(args, row, seed), ciscr_command(args, row, seed), threads)


def run_command(rd: Path, cmd: list[str], threads: int) -> None:
    """Run ``cmd`` (a ``ciscr run --out rd``) with ``threads`` torch threads, its output in
    ``rd/run.log``; the wall and CPU time of every invocation go to wall.json."""
    print("$", shlex.join(cmd), flush=True)
    # WHY: N torch processes each using every core slow each other down several-fold.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    rd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(rd / "run.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        # wait4: this child's own CPU time, which a job sharing the cores does not inflate.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    add_wall_time(rd, time.perf_counter() - t0, usage.ru_utime + usage.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}), log in {rd}/run.log")
    print(f"done: {rd.name} ({time.perf_counter() - t0:.0f} s)", flush=True)


def add_wall_time(rd: Path, seconds: float, cpu_seconds: float) -> None:
    path = rd / "wall.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    # invocations: how many exited (protocol 4 compares it with the starts in machine.jsonl).
    atomic_write_json(path, {"seconds": old.get("seconds", 0.0) + seconds,
                             "cpu_seconds": old.get("cpu_seconds", 0.0) + cpu_seconds,
                             "invocations": old.get("invocations", 1 if old else 0) + 1})


def ensure_base(args: argparse.Namespace, seed: int, rows: list[str]) -> None:
    """Train the seed's base unless it is finished; retrain it when its checkpoint is gone (a
    lost machine) while a row still has to start from it."""
    from ciscr.utils.io import file_sha256

    rd, ckpt = run_dir(args, BASE_ROW, seed), base_checkpoint(args, seed)
    pending = [r for r in rows if finished_dir(args, r, seed) is None]
    if pending and not ckpt.exists() and (rd / "results.json").exists():
        raise SystemExit(f"{rd} is finished but its checkpoint is gone: move it away to retrain")
    if pending and not ckpt.exists():
        try:  # trained here, alone on the machine (its archived copy cannot seed rows)
            launch(args, BASE_ROW, seed, os.cpu_count() or 1)
        except RuntimeError as err:
            raise SystemExit(f"the base failed: {err}") from None
    if ckpt.exists() and not (rd / BASE_SHA).exists():
        (rd / BASE_SHA).write_text(file_sha256(ckpt) + "\n")


def run_seed(args: argparse.Namespace, seed: int, chains: list[list[str]], argv: list[str],
             record: str | None = None) -> None:
    """The seed's base, then its rows in ``args.jobs`` chains; the report after every run.
    The time goes to the seed's record (``record``: under another key, for the option rows)."""
    rows = [r for c in chains for r in c]
    if all(finished_dir(args, r, seed) for r in rows):
        return
    t0, started = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    ensure_base(args, seed, rows)
    safe_report(args, argv)
    lock = threading.Lock()

    def run_chain(chain: list[str]) -> None:
        for r in chain:
            run_one(args, r, seed, max(1, (os.cpu_count() or 1) // args.jobs))
            camvid_report.after_run(run_dir(args, r, seed), r)
            with lock:
                safe_report(args, argv)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_chain, c) for c in chains]
    record_seed_time(args, record or str(seed), started, time.perf_counter() - t0)
    errors = [str(e) for f in futures if (e := f.exception()) is not None]
    if errors:
        raise SystemExit("\n".join(errors))


def record_seed_time(args: argparse.Namespace, seed: str, started: str, active: float) -> None:
    """Add one invocation's time to the seed's record (committed beside the archive): first
    start, last finish, and the active seconds summed over invocations."""
    path = archive_root(args) / SEEDS_FILE
    seeds = json.loads(path.read_text()) if path.exists() else {}
    rec = seeds.get(seed, {})
    seeds[seed] = {"first_start": rec.get("first_start", started),
                        "last_finish": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "active_seconds": rec.get("active_seconds", 0.0) + active,
                        "invocations": rec.get("invocations", 0) + 1}
    atomic_write_json(path, seeds)


def safe_report(args: argparse.Namespace, argv: list[str]) -> None:
    """The report after a run; a report bug must not stop the training queue."""
    try:
        report(args, argv)
    except Exception as err:  # noqa: BLE001
        print(f"warning: the report failed ({type(err).__name__}: {err}); training goes on",
              file=sys.stderr, flush=True)


def varies() -> dict[str, str]:
    """Option row -> the main row of the same method preset, which it varies by its overrides
    (FixMatch has none)."""
    return {o: ROWS[o][1] for o in OPTIONS if ROWS[o][1] in MAIN}


def report(args: argparse.Namespace, argv: list[str]) -> Path:
    archive.mirror(Path(args.runs), archive_root(args))
    seeds = [int(s) for s in args.seeds.split(",")]
    opt_seeds = [] if args.no_options else [int(s) for s in args.option_seeds.split(",")]
    runs = {(r, s): camvid_report.collect(finished_dir(args, r, s), r, s)
            for s in seeds for r in [BASE_ROW, *MAIN]}
    runs.update({(r, s): camvid_report.collect(finished_dir(args, r, s), r, s)
                 for s in opt_seeds for r in OPTIONS})
    spec = {"labels": {r: v[0] for r, v in ROWS.items()}, "main": MAIN, "options": OPTIONS,
            "base": BASE_ROW, "control": CONTROL, "varies": varies()}
    return camvid_report.write(args, runs, seeds, opt_seeds, argv, spec)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.report_only:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))  # diagnostics
        for s in [int(x) for x in args.seeds.split(",")]:
            run_seed(args, s, CHAINS, argv)
        if not args.no_options:
            for s in [int(x) for x in args.option_seeds.split(",")]:
                half = (len(OPTIONS) + 1) // 2
                run_seed(args, s, [OPTIONS[:half], OPTIONS[half:]], argv, f"{s} (options)")
    print(report(args, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
