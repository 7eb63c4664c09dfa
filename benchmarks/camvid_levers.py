"""Issue 32, section 2: what each lever on the online step's cost buys, in CPU seconds per step.

A UniMatch (+ CISC) step costs ~3-4x a SupOnly step on CamVid (protocol 4's measured runs), which
is why semi-supervision loses per CPU hour there. This times one short real run per lever
setting, the protocol's own command (``ciscr run camvid``, 12 labels, seed 0, fp32 or what
``train.amp=auto`` picks, one thread), and tabulates the step time (``step_seconds`` of
train.jsonl: batch loading + step, evaluations excluded), its mean rather than its median
(a lever may alternate cheap and full steps), against SupOnly's and UniMatch + CISC's. One setting per lever; the lever's mIoU is a protocol-4 row of its own (not here).

    python benchmarks/camvid_levers.py            # -> docs/results/camvid_levers.md / .json

Run it alone on the machine (it measures time): each run trains ``--steps`` iterations (the
first ``--skip`` logged steps not counted: allocator and caches warming up). The runs live in
``runs/camvid_levers/`` and a rerun reuses finished ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from camvid_labels import ROWS  # noqa: E402  (beside this file: protocol 4's lever rows)
from camvid_report import machine  # noqa: E402

from ciscr.utils.io import atomic_write_bytes, atomic_write_json, read_jsonl  # noqa: E402

# name -> (what it changes, method preset, overrides); the first two are the references.
LEVERS: dict[str, tuple[str, str, list[str]]] = {
    "suponly": ("SupOnly (reference)", "suponly", []),
    "unimatch_cisc": ("UniMatch + CISC as published (reference)", "unimatch_cisc", []),
    "one_strong_view": ("one strong view instead of two", "unimatch_cisc",
                        ROWS["unimatch_cisc_1view"][2]),
    "half_unlabeled_batch": ("unlabeled batch 2 instead of 4", "unimatch_cisc",
                             ROWS["unimatch_cisc_ub2"][2]),
    "no_feature_perturbation": ("no feature-perturbation branch", "unimatch_cisc",
                                ["method.feature_perturbation=false"]),
    "prototype_memory": ("CISC prototypes from a memory of the labeled batches, no bank "
                         "forward", "unimatch_cisc", ["method.prototype_source=memory"]),
    "unlabeled_every_2": ("the unlabeled branch every 2nd step", "unimatch_cisc",
                          ROWS["unimatch_cisc_every2"][2]),
    "half_resolution_unlabeled": ("unlabeled views at half resolution", "unimatch_cisc",
                                  ROWS["unimatch_cisc_halfres"][2]),
    "mix_from_batch": ("the CutMix partner from the same batch: no mixing batch, no "
                       "pseudo-labelling forward for it", "unimatch_cisc",
                       ROWS["unimatch_cisc_batchmix"][2]),
    "unimatch": ("UniMatch without CISC", "unimatch", []),
}
# Levers the issue names that ciscr has no setting for yet: said, not faked.
MISSING: list[str] = []


def run_lever(args: argparse.Namespace, name: str) -> Path:
    """Run (or reuse) the short run of one lever; its directory."""
    _, preset, extra = LEVERS[name]
    out = Path(args.runs) / name
    if (out / "results.json").exists():
        return out
    cmd = [sys.executable, "-m", "ciscr", "run", "camvid", "--out", str(out),
           f"data.root={args.data}", f"model.pretrained={args.weights}", f"method.name={preset}",
           "seed=0", "data.labeled=12", "data.check=false", "data.max_val_images=2",
           "train.progress=false", "train.amp=auto", "train.log_every=1", "train.epochs=1",
           "train.unlabeled_epochs=1", f"train.iters_per_epoch={args.steps}",
           "train.eval_every_epochs=0", "method.score_final_pseudo=false", "report=false",
           "threads=1", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return out


def step_seconds(rd: Path, skip: int) -> list[float]:
    """The logged seconds of each step of the run's one training stage, first ``skip`` left out."""
    stage = "online" if (rd / "online").is_dir() else "stage1"
    recs = [r for r in read_jsonl(rd / stage / "train.jsonl") if "step_seconds" in r]
    return [float(r["step_seconds"]) for r in recs[skip:]]


def format_table(med: dict[str, float], steps: int, skip: int) -> str:
    """The page: one row per lever, its mean step and its ratios to the two references."""
    ref, sup = med["unimatch_cisc"], med["suponly"]
    rows = [f"| {LEVERS[n][0]} | `{' '.join(LEVERS[n][2]) or '-'}` | {s:.2f} | {s / sup:.2f} | "
            f"{s / ref:.2f} |" for n, s in med.items()]
    return "\n".join([
        "# Issue 32, section 2: the online step's cost per lever (CamVid, 12 labels)", "",
        f"Command: `python benchmarks/camvid_levers.py --steps {steps} --skip {skip}`; generated "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} on {machine()}, one torch "
        "thread, train.amp=auto. Mean `step_seconds` (batch loading + step) of steps "
        f"{skip + 1}-{steps} of one short run per setting. Not counted: the CISC bank's refresh "
        "(every 50 steps a forward of the labeled images) and the evaluations. A few steps "
        "of a short run give a rough figure (the machine's noise is not averaged out); a "
        "lever's protocol-4 row measures its CPU time over a whole run, and its mIoU.", "",
        "| setting | overrides | s / step | x SupOnly | x UniMatch + CISC |",
        "|---|---|---|---|---|", *rows, "",
        "Levers of the issue with no setting in ciscr yet: " + ("; ".join(MISSING) or "none")
        + ". The cheaper pseudo-labelling forward is `method.mix_source=batch`: the weak view "
        "is one forward already (shared with the labeled batch); the mixing images' own "
        "forward is the one it removes.", "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/camvid"))
    ap.add_argument("--weights", default=str(REPO.parent / "shared/weights/mobilenet_v2_imagenet.pth"))
    ap.add_argument("--runs", default=str(REPO / "runs/camvid_levers"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = ap.parse_args()
    med = {name: statistics.mean(step_seconds(run_lever(args, name), args.skip))
           for name in LEVERS}
    text = format_table(med, args.steps, args.skip)
    atomic_write_bytes(args.out / "camvid_levers.md", text.encode())
    atomic_write_json(args.out / "camvid_levers.json",
                      {"machine": machine(), "steps": args.steps, "skip": args.skip,
                       "mean_step_seconds": med,
                       "overrides": {n: LEVERS[n][2] for n in LEVERS}})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
