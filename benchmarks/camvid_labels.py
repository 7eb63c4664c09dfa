"""CamVid protocol 4, the label curve: with few labels, every method trained from ImageNet for
the same steps, does the unlabeled data pay, and does it pay per CPU hour?

Per split (12, 23 and 46 labeled images: 1/32, 1/16, 1/8 of the 367-image pool, drawn with the
seed; the rest of the pool unlabeled) and seed, every row trains from ImageNet on the same split:

- ``suponly``: N iterations on the labeled images;
- ``unimatch``, ``unimatch_cisc`` (ours): N iterations;
- ``ciscr``: CISC-R (bank), stage 1 = the split's ``suponly`` run (shared, not retrained), then
  stages 2 and 3 of N iterations each (3N in all), each continuing from the stage before
  (``method.init=previous``); ``ciscr_fresh`` (seed 0 at 12 labels) is the paper's form, stages
  2 and 3 from ImageNet: the measurement behind that choice (docs/METHOD-NOTES.md);
- ``suponly_compute``: SupOnly given the measured CPU time of the row it is compared with (the
  rule below).

SupOnly's learning curve at 12 labels: N/2 and 2N (seed 0, with seed 0's rows), N, and the
CPU-time rows (their own schedule lengths: 2.6N and 4.15N at seed 0) are its points; 8N
(seed 0) runs after the options. The figure, and the report's advice on training longer (the
gain per doubling between the two longest runs). WHY no 4N run, and 8N not first (the plan
before 2026-12-07): the ~4N CPU-time row is that point already, at every seed, and 8N alone
costs ~3 h of CPU (one core for a whole session); the 46-label seeds, which the issue requires,
come first. Options (12 labels, after the 46-label seeds, before 23 labels; each at the seed
whose SupOnly and UniMatch + CISC ran on the CPU and in the precision of the machine the queue
runs on, seed 0 where none did, one already started at its seed: ``option_seed``): first
the five of section 2's levers on the online step's cost (one strong view; an unlabeled batch
of 2; the unlabeled branch every 2nd step; unlabeled views at half resolution; the CutMix
partner from the same batch, which drops the mixing images' pseudo-labelling forward), each one
setting, whose step cost ``benchmarks/camvid_levers.py`` measures (WHY first: they work on the
equal-CPU-time target the 12-label seeds missed), then FixMatch and ST++ (stages shared with
CISC-R).

    python benchmarks/camvid_labels.py                 # the whole queue, resumable
    python benchmarks/camvid_labels.py --splits 12 --seeds 0
    python benchmarks/camvid_labels.py --report-only

**N** (fixed before any semi-supervised row ran, the same for every row and split): the largest
240 x 2^k iterations (k >= 0; 240 = 20 passes of 12 iterations) for which one (split, seed) of
main rows fits 150 minutes of wall time on the 2-core machine, two jobs at a time, at the step
costs measured before the queue started (one thread per job: SupOnly ~2.1 s, UniMatch ~6.4 s,
UniMatch + CISC ~8.5 s per fp32 step; the issue's pilot and this protocol's first minutes). Its
CPU time is then ~N x (2.1 + 6.4 + 8.5 + 2 x c (CISC-R's two stages, c not yet measured
then: its first logged steps, on a machine shared with a test run, took 4.5-5 s, so c <= 5) +
2.1 x 3.5 (``suponly_compute``)) s <= N x 34 s, over two cores <= N x 17 s of wall plus
evaluations: N = 480 (<= ~140 min), while 960 would take twice the budget. The report's cost
table gives each row's measured CPU and wall minutes, and what a seed's rows took together
against the 150 minutes (CISC-R's stages and its own SupOnly-at-its-CPU-time run came out
dearer than that estimate: the report says by how much). 480 iterations = 40 passes over 12
batches (``iters_per_epoch`` 12 in every stage: the 12-label split's one batch of 8 repeated,
as every split alike).
At 46 labels, protocol 3's SupOnly bases (from ImageNet, 1200 iterations, three seeds,
``benchmarks/camvid.py``) are not reused: the issue reuses them only where N matches, and N is
480 here; ``suponly`` at 46 labels trains its own N.

**suponly_compute** (the CPU-time rule): SupOnly trains N x CPU(row) / CPU(suponly) iterations,
rounded to whole passes of 12, where CPU(x) is the measured CPU seconds of a finished run (all
its own invocations: training, evaluations, pseudo-labelling; CISC-R's includes its stage 1,
the ``suponly`` run). ``suponly_compute`` is matched to UniMatch + CISC's CPU time, or to the
mean of UniMatch's and UniMatch + CISC's where the two are within 10 %; UniMatch (when not) and
CISC-R (unless within 10 % of that figure) get their own run, ``suponly_compute_<row>``.

Every run is ``ciscr run camvid ... train.amp=auto`` (bf16 where this CPU runs it natively,
else fp32) in ``runs/camvid_labels/l<labeled>/<row>_s<seed>``; each invocation records its wall
and CPU seconds (wall.json) and the CPU, its bf16 support and the precision used
(machine.jsonl). Two runs at a time, one torch thread each; every run resumes from its last
checkpoint when the command is rerun. After each run that uses the unlabeled pool (and
``suponly``), ``camvid_labels_diagnostics.py`` scores its final model's pseudo labels on the
pool per class (the diagnostics the issue asks for where a target is missed; outside the run's
CPU record). Finished stages are archived into the committed
``docs/results/camvid_labels-runs/`` and the report is written after every run
(``camvid_labels_records.py`` reads each run, ``camvid_labels_tables.py`` renders the tables and
the figure, ``camvid_labels_report.py`` judges the targets and writes the page).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import archive  # noqa: E402  (benchmarks/, on sys.path when run as a script)
import camvid  # noqa: E402
import camvid_labels_diagnostics as diagnostics  # noqa: E402
import camvid_labels_records  # noqa: E402
import camvid_labels_report  # noqa: E402
import camvid_report  # noqa: E402

from ciscr.utils.io import atomic_write_json, read_jsonl  # noqa: E402

N_ITERS = 480  # the rule in the header
IPE = 12  # iterations per pass, every stage
EVAL_EVERY = 10  # passes between logged val evaluations (the CPU-minute figure); never selects
SPLITS = (12, 46, 23)  # the queue's order (queue()): the smallest split carries the headline
COMMON = ["train.progress=false", "train.amp=auto", f"train.iters_per_epoch={IPE}",
          f"train.eval_every_epochs={EVAL_EVERY}", "method.score_final_pseudo=false"]
_BANK = ["method.stage1_cisc_loss=false"]  # stage 1 IS the suponly run (shared)
# row -> (label, method preset, extra overrides)
CURVE = {f"suponly_{k}n": k for k in (0.5, 2, 8)}  # SupOnly's curve: N x these iterations
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "suponly": ("SupOnly", "suponly", []),
    "unimatch": ("UniMatch", "unimatch", []),
    "unimatch_cisc": ("UniMatch + CISC (ours)", "unimatch_cisc", []),
    "ciscr": ("CISC-R (bank), stages continued", "ciscr_bank", [*_BANK, "method.init=previous"]),
    "suponly_compute": ("SupOnly, UniMatch (+ CISC)'s CPU time", "suponly", []),
    "suponly_compute_unimatch": ("SupOnly, UniMatch's CPU time", "suponly", []),
    "suponly_compute_ciscr": ("SupOnly, CISC-R's CPU time", "suponly", []),
    "ciscr_fresh": ("CISC-R (bank), stages from ImageNet (the paper)", "ciscr_bank",
                    [*_BANK, "method.init=fresh"]),
    "fixmatch": ("FixMatch", "fixmatch", []),
    "stpp": ("ST++", "stpp", []),
    **{row: (f"SupOnly, {k} N iterations", "suponly", []) for row, k in CURVE.items()},
    # Section 2's levers on the online step's cost, one setting each (their step cost:
    # benchmarks/camvid_levers.py); options until the report shows one helps across seeds.
    "unimatch_cisc_1view": ("UniMatch + CISC, one strong view", "unimatch_cisc",
                            ["method.strong_views=1"]),
    "unimatch_cisc_ub2": ("UniMatch + CISC, unlabeled batch 2", "unimatch_cisc",
                          ["train.unlabeled_batch_size=2"]),
    "unimatch_cisc_every2": ("UniMatch + CISC, unlabeled branch every 2nd step",
                             "unimatch_cisc", ["method.unlabeled_every=2"]),
    "unimatch_cisc_halfres": ("UniMatch + CISC, unlabeled views at half resolution",
                              "unimatch_cisc", ["train.unlabeled_resolution=0.5"]),
    "unimatch_cisc_batchmix": ("UniMatch + CISC, CutMix partner from the same batch",
                               "unimatch_cisc", ["method.mix_source=batch"]),
}
LEVER_ROWS = ["unimatch_cisc_1view", "unimatch_cisc_ub2", "unimatch_cisc_every2",
              "unimatch_cisc_halfres", "unimatch_cisc_batchmix"]
OPTION_ROWS = [*LEVER_ROWS, "fixmatch", "stpp"]  # at the seed of this machine: option_seed()
MAIN = ["suponly", "unimatch", "unimatch_cisc", "ciscr", "suponly_compute"]
COMPUTE = {"suponly_compute": ["unimatch_cisc", "unimatch"],
           "suponly_compute_unimatch": ["unimatch"], "suponly_compute_ciscr": ["ciscr"]}
# A (split, seed)'s main rows in the order they are started, two at a time: the longest first
# on the two cores (measured cost per row), a row waiting for what it needs (needs()) never
# holding a core while another row can run.
ORDER = ["suponly", "unimatch_cisc", "unimatch", "ciscr", "suponly_compute"]
SHARED_WITH = {"ciscr": ("suponly", ("stage1",)),
               "ciscr_fresh": ("ciscr", ("stage1", "pseudo0", "selection")),
               "stpp": ("ciscr", ("stage1", "pseudo0"))}
MATCH = "compute_match.json"  # in a suponly_compute run: the rows and CPU it was given
MACHINE = "machine.jsonl"  # in every run: one line per invocation (CPU, bf16, precision)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared/data/camvid"),
                   help="CamVid in ciscr's folder format (default: %(default)s)")
    p.add_argument("--weights", default=str(REPO.parent / "shared/weights/mobilenet_v2_imagenet.pth"),
                   help="ImageNet MobileNetV2 weights, '' for none (default: %(default)s)")
    p.add_argument("--splits", default=",".join(map(str, SPLITS)),
                   help="labeled images per split, in the queue's order (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="seeds (default: %(default)s)")
    p.add_argument("--no-options", action="store_true",
                   help="main rows only (no SupOnly curve, ciscr_fresh, FixMatch, ST++ or levers)")
    p.add_argument("--iters", type=int, default=N_ITERS,
                   help="N per training stage (default %(default)s; NOT the protocol otherwise)")
    p.add_argument("--runs", default=str(REPO / "runs/camvid_labels"),
                   help="where runs train and resume (default: %(default)s)")
    p.add_argument("--out", default=str(REPO / "docs/results"),
                   help="the report, its JSON and figure, and the archive of finished runs "
                        "(default: %(default)s)")
    p.add_argument("--name", default="camvid_labels",
                   help="the report's file stem (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at once, each with cores/jobs threads (default: %(default)s)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the report from the finished runs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (repeatable); NOT the protocol: for a "
                        "smoke test, with its own --runs and --out")
    args = p.parse_args(argv)
    # Bad paths stop here with one line, before any run is started (and fails in its log).
    if not args.report_only and not Path(args.data).is_dir():
        p.error(f"--data {args.data}: not a directory (CamVid in ciscr's folder format)")
    if not args.report_only and args.weights and not Path(args.weights).is_file():
        p.error(f"--weights {args.weights}: no such file (ImageNet MobileNetV2; '' for none)")
    return args


# --------------------------------------------------------------------------- where runs are


def split_runs(args: argparse.Namespace, split: int) -> Path:
    return Path(args.runs) / f"l{split}"


def split_archive(args: argparse.Namespace, split: int) -> Path:
    return Path(args.out) / f"{args.name}-runs" / f"l{split}"


def run_dir(args: argparse.Namespace, split: int, row: str, seed: int) -> Path:
    return split_runs(args, split) / f"{row}_s{seed}"


def finished_dir(args: argparse.Namespace, split: int, row: str, seed: int) -> Path | None:
    """The finished run (live, else archived) when made with this protocol's config; else None."""
    return archive.locate([run_dir(args, split, row, seed)], split_archive(args, split),
                          "results.json", lambda rd: current_protocol(args, split, row, seed, rd))


def row_iterations(args: argparse.Namespace, split: int, row: str, seed: int) -> int | None:
    """The iterations of each training stage of ``row`` (None: a compute row not planned yet)."""
    if row in CURVE:
        return int(CURVE[row] * args.iters)
    if row in COMPUTE:
        rec = camvid_report.read(run_dir(args, split, row, seed) / MATCH) or camvid_report.read(
            split_archive(args, split) / f"{row}_s{seed}" / MATCH)
        return rec["iterations"] if rec else None
    return args.iters


def row_overrides(args: argparse.Namespace, split: int, row: str, seed: int,
                  iterations: int) -> list[str]:
    _, preset, extra = ROWS[row]
    passes = iterations // IPE
    return [f"data.root={args.data}", f"model.pretrained={args.weights}",
            f"method.name={preset}", f"seed={seed}", f"data.labeled={split}", *COMMON,
            f"train.epochs={passes}", f"train.unlabeled_epochs={passes}", *extra, *args.overrides]


def current_protocol(args: argparse.Namespace, split: int, row: str, seed: int,
                     rd: Path) -> bool:
    """Whether ``rd`` was made with the config this benchmark runs for ``row`` (data and weight
    paths aside: another machine puts them elsewhere); warns when not."""
    import yaml

    from ciscr.config import load_config
    from ciscr.errors import ConfigError
    from ciscr.run_setup import check_same_config

    iterations = row_iterations(args, split, row, seed)
    saved = yaml.safe_load((rd / "config.yaml").read_text()) if (rd / "config.yaml").exists() else {}
    keep = [f"data.root={saved.get('data', {}).get('root', args.data)}",
            f"model.pretrained={saved.get('model', {}).get('pretrained', args.weights)}"]
    try:
        cfg = load_config("camvid", row_overrides(args, split, row, seed, iterations or 0) + keep)
        check_same_config(cfg, rd / "config.yaml")
    except (ConfigError, OSError) as err:
        print(f"warning: {rd} is not counted: {err}", file=sys.stderr)
        return False
    return True


# --------------------------------------------------------------------------- the CPU-time rule


def cpu_seconds(args: argparse.Namespace, split: int, row: str, seed: int) -> float | None:
    """A finished run's measured CPU seconds (CISC-R's with its stage 1, the suponly run, by
    camvid_labels_records.with_stage1); None when not finished or not known."""
    rd = finished_dir(args, split, row, seed)
    if rd is None:
        return None
    own = camvid_labels_records.run_cost(rd)
    stage1 = None
    if row == "ciscr" and not own["includes_shared"]:
        srd = finished_dir(args, split, "suponly", seed)
        stage1 = camvid_labels_records.run_cost(srd) if srd else None
    return camvid_labels_records.with_stage1(row, own, stage1)["cpu_seconds"]


def compute_plan(args: argparse.Namespace, split: int, seed: int,
                 row: str) -> dict[str, object] | None:
    """What ``row`` (a suponly_compute row) is given by the rule in the header: {"rows": the
    rows matched, "cpu_seconds": their (mean) CPU time, "iterations": its steps, "needed":
    whether the rule asks for this run at all}; None until the rows it needs have finished."""
    cpu = {r: cpu_seconds(args, split, r, seed) for r in ("suponly", "unimatch", "unimatch_cisc")}
    if row == "suponly_compute_ciscr":
        cpu["ciscr"] = cpu_seconds(args, split, "ciscr", seed)
    if any(v is None for v in cpu.values()):
        return None
    pair_close = abs(cpu["unimatch"] - cpu["unimatch_cisc"]) <= 0.1 * cpu["unimatch_cisc"]
    shared = ["unimatch_cisc", "unimatch"] if pair_close else ["unimatch_cisc"]
    shared_cpu = sum(cpu[r] for r in shared) / len(shared)
    if row == "suponly_compute":
        rows, needed = shared, True
    elif row == "suponly_compute_unimatch":
        rows, needed = ["unimatch"], not pair_close
    else:
        rows, needed = ["ciscr"], abs(cpu["ciscr"] - shared_cpu) > 0.1 * shared_cpu
    given = sum(cpu[r] for r in rows) / len(rows)
    iterations = max(IPE, round(args.iters * given / cpu["suponly"] / IPE) * IPE)
    return {"rows": rows, "cpu_seconds": given, "suponly_cpu_seconds": cpu["suponly"],
            "iterations": iterations, "needed": needed}


def compute_partner(args: argparse.Namespace, split: int, seed: int, row: str) -> str | None:
    """The SupOnly run the rule gives ``row``'s CPU time to at (split, seed): its own
    ``suponly_compute_<row>`` where the rule needs one, else the shared ``suponly_compute``;
    None for a row the rule does not match, or while the rule waits for the runs it reads."""
    own = f"suponly_compute_{row}"
    if row == "unimatch_cisc":
        return "suponly_compute"
    if own not in COMPUTE:
        return None
    plan = compute_plan(args, split, seed, own)
    return None if plan is None else own if plan["needed"] else "suponly_compute"


# --------------------------------------------------------------------------- running


def machine_record() -> dict[str, object]:
    """This invocation's CPU, whether it runs bf16 natively, and the precision auto picks."""
    from ciscr.utils.misc import cpu_has_fast_bf16, resolve_amp

    return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": camvid_report.machine(), "bf16_native": cpu_has_fast_bf16(),
            "precision": resolve_amp("auto", "cpu")}


def share_stages(args: argparse.Namespace, split: int, row: str, seed: int) -> None:
    """Copy the stages ``row`` shares with its source run (finished there, absent here)."""
    if row not in SHARED_WITH:
        return
    source, stages = SHARED_WITH[row]
    camvid.copy_stages(run_dir(args, split, source, seed), run_dir(args, split, row, seed), stages)


def run_one(args: argparse.Namespace, split: int, row: str, seed: int, threads: int) -> None:
    """Run (or finish) one row unless it is finished (here or archived) or not needed."""
    if finished_dir(args, split, row, seed) is not None:
        return
    rd = run_dir(args, split, row, seed)
    if row in COMPUTE and row_iterations(args, split, row, seed) is None:
        plan = compute_plan(args, split, seed, row)
        if plan is None:
            raise RuntimeError(f"{rd.name}: the rows whose CPU time it is given are not finished")
        if not plan["needed"]:
            print(f"skip: {rd.name} (the rule shares suponly_compute)", flush=True)
            return
        rd.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rd / MATCH, plan)
    share_stages(args, split, row, seed)
    rd.mkdir(parents=True, exist_ok=True)
    with open(rd / MACHINE, "a") as f:
        f.write(json.dumps(machine_record()) + "\n")
    cmd = [sys.executable, "-m", "ciscr", "run", "camvid", "--out", str(rd),
           *row_overrides(args, split, row, seed, row_iterations(args, split, row, seed))]
    camvid.run_command(rd, cmd, threads)


def diagnose(args: argparse.Namespace, split: int, row: str, seed: int, threads: int) -> None:
    """A finished run's diagnostics (camvid_labels_diagnostics.py: its final model's pseudo
    labels on the unlabeled pool), while its checkpoint is here; not for SupOnly's longer runs
    (the curve and compute rows: the issue asks about the rows that use the pool). Outside the
    run's own CPU record; a failure is reported and the queue goes on."""
    rd = run_dir(args, split, row, seed)
    if (row in CURVE or row in COMPUTE or (rd / diagnostics.OUT).exists() or not (rd / "results.json").exists()
            or not any(rd.glob("*/checkpoint.pt"))):
        return
    cmd = [sys.executable, str(Path(diagnostics.__file__).resolve()), str(rd)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    print(done.stdout.strip() if done.returncode == 0 else
          f"warning: diagnostics of {rd} failed: {done.stderr.strip().splitlines()[-1:]}",
          file=sys.stdout if done.returncode == 0 else sys.stderr, flush=True)


def needs(row: str) -> list[str]:
    """The rows ``row`` starts from or is given the CPU time of (same split and seed)."""
    deps = ["suponly", *COMPUTE[row]] if row in COMPUTE else []
    return deps + ([SHARED_WITH[row][0]] if row in SHARED_WITH else [])


def run_queue(args: argparse.Namespace, tasks: list[tuple[int, int, str]],
              argv: list[str]) -> None:
    """The queue's (split, seed, row) tasks, ``args.jobs`` at a time: each free worker starts
    the first task (in queue order) whose needs are finished, so no core idles while a row
    waits (e.g. suponly_compute for the rows whose CPU time it is given) or while the last
    row of one (split, seed) runs alone (the next seed's first rows start beside it); the
    report after every run."""
    cond = threading.Condition()
    pending, running, failed = list(tasks), set(), []
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def done(split: int, seed: int, row: str) -> bool:  # finished with its CPU time known
        if cpu_seconds(args, split, row, seed) is not None:
            return True
        rd = finished_dir(args, split, row, seed)
        if rd is not None and (rd / "wall.json").exists():
            raise RuntimeError(f"{rd}: finished, but its CPU time is unknown (an invocation was "
                               "killed before ciscr recorded CPU time in its checkpoints): move "
                               "it away to rerun it")
        return False

    def take() -> tuple[int, int, str] | None:  # under cond
        while pending and not failed:
            task = next((t for t in pending
                         if all(done(t[0], t[1], d) for d in needs(t[2]))), None)
            if task is not None:
                pending.remove(task)
                running.add(task)
                return task
            if not running:
                raise RuntimeError(f"{pending} wait for rows that are neither finished nor "
                                   "queued")
            cond.wait(timeout=30)
        return None

    def worker() -> None:
        while True:
            with cond:
                task = take()
            if task is None:
                return
            split, seed, row = task
            try:
                run_one(args, split, row, seed, threads)
                diagnose(args, split, row, seed, threads)
            except BaseException:
                failed.append(task)
                raise
            finally:
                with cond:
                    running.discard(task)
                    safe_report(args, argv)
                    cond.notify_all()

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(worker) for _ in range(args.jobs)]
    errors = [str(e) for f in futures if (e := f.exception()) is not None]
    if errors:
        raise SystemExit("\n".join(errors))


def queue(args: argparse.Namespace) -> list[tuple[int, int, list[str]]]:
    """(split, seed, rows) in the order they start: the smallest split's seeds first (seed 0's
    own extras before seed 1: ciscr_fresh decides the CISC-R row), the largest split (the
    issue's other required one), the options and SupOnly's 8N at the smallest split (does
    doubling still pay? the report's advice), and the splits between last (23 labels: "where
    the budget allowed")."""
    splits, seeds = [int(x) for x in args.splits.split(",")], [int(x) for x in args.seeds.split(",")]
    extra_compute = ["suponly_compute_unimatch", "suponly_compute_ciscr"]
    out = []
    for split in splits:
        for seed in seeds:
            first = split == min(splits) and seed == seeds[0] and not args.no_options
            extras = ["ciscr_fresh", "suponly_0.5n", "suponly_2n"] if first else []
            out.append((split, seed, [*ORDER, *extras, *extra_compute]))
        if split == max(splits) and not args.no_options:
            small, at = min(splits), {}
            for row in OPTION_ROWS:
                at.setdefault(option_seed(args, small, seeds, row), []).append(row)
            out += [(small, seed, rows) for seed, rows in at.items()]
            out.append((small, seeds[0], ["suponly_8n"]))  # seed 0's curve
    return out


def _ran_here(rd: Path | None, here: dict[str, object]) -> bool:
    """Whether every invocation of the run in ``rd`` ran on this CPU in this precision."""
    recs = read_jsonl(rd / MACHINE) if rd is not None else []
    keys = ("machine", "bf16_native", "precision")
    return bool(recs) and all(r.get(k) == here[k] for r in recs for k in keys)


def option_seed(args: argparse.Namespace, split: int, seeds: list[int], row: str) -> int:
    """The seed an option row runs at: where it already started (it continues there), else the
    first seed whose SupOnly and UniMatch + CISC ran on this CPU in this precision, else the
    first seed. WHY: an option is judged against its seed's UniMatch + CISC (mIoU at equal
    steps) and against SupOnly's runs at its seed (per CPU hour: N and the CPU-time runs are
    SupOnly's curve there), CPU minutes compare only within one CPU and precision, and a
    session's machine is drawn by chance (12 labels: seeds 0 and 1 ran on an Intel Xeon in
    fp32, seed 2 on an AMD EPYC in bf16)."""
    for s in seeds:
        if run_dir(args, split, row, s).exists() or finished_dir(args, split, row, s):
            return s
    here = machine_record()
    return next((s for s in seeds if all(_ran_here(finished_dir(args, split, r, s), here)
                                         for r in ("suponly", "unimatch_cisc"))), seeds[0])


def safe_report(args: argparse.Namespace, argv: list[str]) -> None:
    """The report after a run; a report bug must not stop the training queue."""
    try:
        report(args, argv)
    except Exception as err:  # noqa: BLE001
        print(f"warning: the report failed ({type(err).__name__}: {err}); training goes on",
              file=sys.stderr, flush=True)


def not_started(args: argparse.Namespace, finished: set) -> list[tuple[int, int, str]]:
    """The queue's (split, seed, row) tasks neither finished (``finished``: the report's
    (split, row, seed) keys) nor started (a run folder), in its order; a compute row the rule
    does not need (its plan says so) is left out."""
    out = []
    for split, seed, rows in queue(args):
        for row in rows:
            if (split, row, seed) in finished or run_dir(args, split, row, seed).exists():
                continue
            plan = compute_plan(args, split, seed, row) if row in COMPUTE else None
            if plan is None or plan["needed"]:
                out.append((split, seed, row))
    return out


def shown_path(p: Path) -> str:
    """``p`` relative to the repository when inside it (the JSON is committed), else as is."""
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def report(args: argparse.Namespace, argv: list[str]) -> Path:
    splits, seeds = [int(x) for x in args.splits.split(",")], [int(x) for x in args.seeds.split(",")]
    runs = {}
    for split in splits:
        archive.mirror(split_runs(args, split), split_archive(args, split))
        for row in ROWS:
            for seed in seeds:
                rd = finished_dir(args, split, row, seed)
                if rd is not None:
                    rec = camvid_labels_records.collect(rd, split, row, seed)
                    # The committed copy, where a reader of the JSON can open it (runs/ is
                    # this machine's and ignored by git; run_dir stays the one read).
                    kept = split_archive(args, split) / rd.name
                    rec["archive"] = shown_path(kept if kept.exists() else rd)
                    if (partner := compute_partner(args, split, seed, row)) is not None:
                        rec["compute_partner"] = partner  # the rule's, for the tables
                    runs[(split, row, seed)] = rec
    spec = {"labels": {r: v[0] for r, v in ROWS.items()}, "main": MAIN, "compute": COMPUTE,
            "curve": CURVE, "iters": args.iters, "levers": LEVER_ROWS,
            "lever_overrides": [ROWS[r][2] for r in LEVER_ROWS], "queued": not_started(args, set(runs))}
    return camvid_labels_report.write(args, runs, splits, seeds, argv, spec)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.report_only:
        run_queue(args, [(split, seed, row) for split, seed, rows in queue(args)
                         for row in rows], argv)
    print(report(args, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
