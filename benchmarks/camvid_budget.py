"""SupOnly's learning curve on CamVid: where does stage 1 stop improving?

Trains SupOnly (``ciscr train camvid``) for several epoch budgets and seeds, evaluating every
5 epochs (a logged curve; it never selects anything), and writes the table and the figure that
the protocol's stage-1 budget (``train.epochs`` in ``configs/camvid.yaml``) is chosen from:

    python benchmarks/camvid_budget.py                  # runs what is missing, then the report
    python benchmarks/camvid_budget.py --report-only

Resumable: every run is a plain ``ciscr train`` in its own directory under
``runs/camvid-budget``; a finished run is only re-read. Output: ``docs/results/camvid_budget.md``,
``.json`` and ``.png`` (training loss and val mIoU against iterations). Finished runs' small
artefacts are copied into ``docs/results/camvid_budget-runs/`` (``archive.py``) and read from
there when runs/ lacks them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import archive  # noqa: E402  (benchmarks/, on sys.path when run as a script)

from ciscr.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", default="20,40,80,160,320,640", help="stage-1 budgets to compare")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--runs", default=str(REPO / "runs/camvid-budget"))
    p.add_argument("--out", default=str(REPO / "docs/results"))
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def run_dir(args: argparse.Namespace, epochs: int, seed: int) -> Path:
    return Path(args.runs) / f"suponly_e{epochs}_s{seed}"


def command(args: argparse.Namespace, epochs: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "ciscr", "train", "camvid", "--out",
            str(run_dir(args, epochs, seed)), "method.name=suponly", f"seed={seed}",
            f"train.epochs={epochs}", "train.eval_every_epochs=5", "train.progress=false"]


def run_missing(args: argparse.Namespace, plan: list[tuple[int, int]]) -> None:
    for e, s in plan:
        rd = run_dir(args, e, s)
        if archive.locate([rd], archive_root(args), "results.json"):  # here or archived
            continue
        cmd = command(args, e, s)
        print("$", shlex.join(cmd), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        subprocess.run(cmd, cwd=REPO, env=env, check=True)


def read_curve(rd: Path) -> dict | None:
    """Loss (every logged iteration) and val mIoU (every 5 epochs) of one run, or None."""
    path = rd / "stage1" / "train.jsonl"
    if not path.exists():
        return None
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    done = rd / "stage1" / "metrics.json"
    final = json.loads(done.read_text()) if done.exists() else None
    return {"loss": [(r["iteration"], r["loss"]) for r in recs if "loss" in r],
            "val": [(r["iteration"], r["val_miou"]) for r in recs if "val_miou" in r],
            "final": final}


def archive_root(args: argparse.Namespace) -> Path:
    """The committed copy of the finished runs' small artefacts (:mod:`archive`)."""
    return Path(args.out) / "camvid_budget-runs"


def load_curves(args: argparse.Namespace, plan: list[tuple[int, int]]) -> dict:
    """Each run's curve from its directory here, else from its archived copy, else (a finished
    run only) from the study's previous JSON record, marked ``"from_record"``: the runs that
    record was made from were lost with their machine before the archive existed."""
    record = Path(args.out) / "camvid_budget.json"
    previous = json.loads(record.read_text()) if record.exists() else {}
    curves = {}
    for e, s in plan:
        rd = run_dir(args, e, s)
        c = read_curve(rd) or read_curve(archive_root(args) / rd.name)
        old = previous.get(f"e{e}_s{s}")
        if c is None and old and old.get("final"):
            c = {**old, "from_record": True}
        curves[(e, s)] = c
    return curves


def provenance(curves: dict[tuple[int, int], dict]) -> list[str]:
    """Which curves no run directory backs (read from the previous JSON record)."""
    old = [f"{e} epochs s{s}" for (e, s), c in sorted(curves.items()) if c and c.get("from_record")]
    if not old:
        return []
    return [f"- read from the previous `camvid_budget.json` (their runs were lost with the "
            f"machine that trained them, before their artefacts were archived): {', '.join(old)}"]


LEVEL = 1.0  # mIoU points: doubling the budget gains less than this -> stage 1 has levelled off


def learned(iou: list) -> int:
    return sum(1 for x in iou if x is not None and x > 0.01)


def table(curves: dict[tuple[int, int], dict], epochs: list[int], seeds: list[int]) -> list[str]:
    out = ["| stage-1 epochs | iterations | val mIoU (%), last checkpoint | classes > 1 % IoU |",
           "|---|---|---|---|"]
    for e in epochs:
        runs = [curves.get((e, s)) for s in seeds]
        fin = [r["final"] for r in runs if r and r["final"]]
        if not fin:
            out.append(f"| {e} | - | not finished | - |")
            continue
        its = max(i for r in runs if r for i, _ in r["loss"])
        xs = [f["miou"] for f in fin]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        each = " / ".join(f"{100 * x:.1f}" for x in xs)
        out.append(f"| {e} | {its} | {100 * statistics.fmean(xs):.2f} ± {100 * sd:.2f} "
                   f"(n={len(xs)}: {each}) | {' / '.join(str(learned(f['iou'])) for f in fin)} |")
    return out


def reading(curves: dict[tuple[int, int], dict], epochs: list[int], seeds: list[int]) -> list[str]:
    """What the table says about the protocol's budget, computed (no number typed by hand)."""
    from ciscr.config import load_config

    means = {}
    for e in epochs:
        fin = [c["final"]["miou"] for s in seeds if (c := curves.get((e, s))) and c["final"]]
        if fin:
            means[e] = statistics.fmean(fin)
    used = load_config("camvid").train.epochs
    out = [f"- the protocol's stage-1 budget (`configs/camvid.yaml`): train.epochs = {used}"]
    done = sorted(means)
    if len(done) >= 2:
        a, b = done[-2], done[-1]
        out.append(f"- from {a} to {b} epochs (the two largest finished budgets) the mean val "
                   f"mIoU moves by {100 * (means[b] - means[a]):+.2f} points over the seeds "
                   f"finished; budgets not finished yet: "
                   f"{', '.join(str(e) for e in epochs if e not in means) or 'none'}")
    last = [v for s in seeds if (c := curves.get((used, s))) and c.get("val")
            for i, v in c["val"] if i > 2 * max(j for j, _ in c["val"]) / 3]
    if last:
        out.append(f"- val mIoU over the last third of the {used}-epoch run(s): "
                   f"{100 * min(last):.1f} to {100 * max(last):.1f} ({len(last)} evaluations)")
    if used in means and any(e > used for e in done):
        e = min(e for e in done if e > used)
        gain = 100 * (means[e] - means[used])
        verdict = ("levelled off" if gain < LEVEL else "still improving: the protocol's SupOnly "
                   "has not converged, and every method is compared at that budget")
        out.append(f"- at the protocol's budget: {used} -> {e} epochs moves SupOnly by "
                   f"{gain:+.2f} points: {verdict} (rule: levelled off when the gain of doubling "
                   f"is below {LEVEL:g} point)")
    return out


def figure(curves: dict[tuple[int, int], dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_l, ax_v = fig.subplots(1, 2)
    for (e, s), c in sorted(curves.items()):
        if not c:
            continue
        it, loss = zip(*c["loss"], strict=True)
        ax_l.plot(it, loss, lw=0.8, label=f"{e} epochs, seed {s}")
        if c["val"]:
            vi, vm = zip(*c["val"], strict=True)
            ax_v.plot(vi, [100 * v for v in vm], marker="o", ms=3, label=f"{e} epochs, seed {s}")
    ax_l.set(xlabel="iteration", ylabel="training CE", title="SupOnly training loss")
    ax_v.set(xlabel="iteration", ylabel="val mIoU (%)", title="SupOnly val mIoU (logged only)")
    ax_v.legend(fontsize=7)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    epochs = [int(x) for x in args.epochs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    plan = [(e, s) for s in seeds for e in epochs]
    if not args.report_only:
        run_missing(args, plan)
    archive.mirror(Path(args.runs), archive_root(args))  # finished runs outlive this machine
    curves = load_curves(args, plan)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure(curves, out / "camvid_budget.png")
    cmd = "python benchmarks/camvid_budget.py " + shlex.join(argv or sys.argv[1:])
    lines = ["# CamVid: SupOnly's stage-1 budget (learning curves)", "",
             f"- command: `{cmd.strip()}`",
             f"- generated: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from `{args.runs}`",
             "- each run: `ciscr train camvid method.name=suponly train.epochs=E "
             "train.eval_every_epochs=5` (1/8 labeled = 46 images, repeated twice per epoch: "
             "12 iterations per epoch at batch 8). The val curve is logged, never used to pick a "
             "checkpoint; the result of a run is its last checkpoint.", *provenance(curves), "",
             *table(curves, epochs, seeds), "", *reading(curves, epochs, seeds), "",
             "![curves](camvid_budget.png)", ""]
    atomic_write_bytes(out / "camvid_budget.md", ("\n".join(lines) + "\n").encode())
    atomic_write_json(out / "camvid_budget.json",
                      {f"e{e}_s{s}": c for (e, s), c in curves.items()})
    print(out / "camvid_budget.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
