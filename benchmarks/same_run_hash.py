"""Fingerprint of a seeded synthetic run, for refactors that must not change behaviour.

    python benchmarks/same_run_hash.py [--work DIR] [--compare HASHES.json] [--save HASHES.json]

Runs small seeded CPU runs of the three kinds of method (CISC-R query mode and ST++: the
stage-wise family with selection; UniMatch + CISC: the online family) and ``ciscr train``
through the CLI of the checkout it lives in, then hashes every metric, selection list, pseudo
label and checkpoint tensor, bitwise. Timing fields (seconds, dates, hosts) are left out: they
differ between any two runs. The runs always go to the same folder (the data check's fingerprint
and the checkpoints' config hold absolute paths). Same hashes before and after a change = the
change left training, evaluation and checkpoints as they were.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# The resume test's tiny recipe (tests/test_resume.py): ~10 s per run on one core.
ARGS = [
    "train.epochs=2", "train.unlabeled_epochs=0", "train.iters_per_epoch=3", "train.batch_size=4",
    "train.crop_size=32", "train.lr=0.02", "train.ckpt_every=2", "train.log_every=1",
    "train.eval_every_epochs=1", "train.progress=false", "data.synthetic.num_train=24",
    "data.synthetic.num_val=4", "data.synthetic.size=32", "data.labeled=8",
    "model.backbone=mobilenet_v2", "report=false", "method.tta_scales=[1.0]", "device=cpu",
    "data.synthetic.num_classes=4", "data.synthetic.max_distractors=3",
    "method.stage1_cisc_loss=true", "method.init=fresh", "method.confidence_threshold=0",
]  # fmt: skip
RUNS = {
    "ciscr": ["run", "method.name=ciscr"],
    "stpp": ["run", "method.name=stpp"],
    "unimatch_cisc": ["run", "method.name=unimatch_cisc"],
    "train": ["train"],
}
# Keys whose values are clocks, places or machines, never results (the data check's fingerprint
# hashes the files' mtimes).
VOLATILE = re.compile(r"second|time|date|host|wall|elapsed|started|finished|pid|version|fingerprint|"
                      r"machine|python|torch|platform|cpu_count|threads")


def _clean(obj: Any, root: str) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v, root) for k, v in sorted(obj.items()) if not VOLATILE.search(str(k))}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<work>")
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)  # 1-d: 0-dim tensors cannot be viewed
        raw = t.view(torch.uint8).numpy().tobytes()
        return f"{t.dtype}{tuple(obj.shape)}:" + hashlib.sha256(raw).hexdigest()
    return obj


def _file_digest(path: Path, root: str) -> str | None:
    if path.suffix == ".pt":
        obj = _clean(torch.load(path, map_location="cpu", weights_only=True), root)
    elif path.suffix == ".json":
        obj = _clean(json.loads(path.read_text()), root)
    elif path.suffix == ".jsonl":
        obj = [_clean(json.loads(line), root) for line in path.read_text().splitlines() if line]
    elif path.suffix == ".png":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        return None  # config.yaml (paths), tensorboard events and report.html (clocks)
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fingerprint(run_dir: Path, work: Path) -> dict[str, str]:
    """sha256 of every result file below ``run_dir`` (relative path -> digest); ``work`` (the
    folder of the runs and their data, which differs between calls) is written as <work>."""
    out = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        digest = _file_digest(path, str(work))
        if digest is not None:
            out[str(path.relative_to(run_dir))] = digest
    return out


def run_all(work: Path) -> dict[str, dict[str, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}  # fmt: skip
    data = work / "data"
    hashes = {}
    for name, (cmd, *extra) in RUNS.items():
        out = work / name
        argv = [sys.executable, "-m", "ciscr", cmd, "synthetic", "--out", str(out), *ARGS,
                f"data.root={data}", *extra]  # fmt: skip
        subprocess.run(argv, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        hashes[name] = fingerprint(out, work)
        total = hashlib.sha256(json.dumps(hashes[name], sort_keys=True).encode()).hexdigest()
        print(f"{name:14s} {len(hashes[name]):4d} files  {total[:16]}", flush=True)
    return hashes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ciscr_same_run_hash",
                    help="folder of the runs (emptied first; kept afterwards)")
    ap.add_argument("--save", type=Path, help="write the per-file hashes here")
    ap.add_argument("--compare", type=Path, help="compare with hashes saved by --save")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    hashes = run_all(args.work)
    if args.save:
        args.save.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    total = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    print(f"all            {total}")
    if args.compare:
        before = json.loads(args.compare.read_text())
        diff = [f"{run}/{f}" for run in before.keys() | hashes.keys()
                for f in before.get(run, {}).keys() | hashes.get(run, {}).keys()
                if before.get(run, {}).get(f) != hashes.get(run, {}).get(f)]
        print("same as before" if not diff else "DIFFERENT: " + ", ".join(sorted(diff)))
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
