"""The checks that need a GPU, as one prepared script: ciscr's CUDA paths have never run on
the CPU machines that build and test it, so a session lent a GPU runs this, once.

    python3 benchmarks/gpu_check.py --out DIR                # on a CUDA machine
    python3 benchmarks/gpu_check.py --out DIR --device cpu   # the same checks on a CPU

Each check is a plain ciscr command in its own subprocess (with a timeout), on a small
synthetic task: every method's whole pipeline (train, pseudo-label, select, retrain,
evaluate) on the device in bf16; fp16 autocast with loss scaling (CUDA only); channels_last;
a run SIGKILLed after its first retraining checkpoint and resumed, which must end with the
same validation mIoU as an uninterrupted run; one process under torchrun (NCCL); predict on
the device; ONNX export; and on CUDA ``ciscr bench`` (a quick one, and the README's
ResNet-101 speed run, written as speed_cuda.md). Writes DIR/gpu_check.md and .json: each
check's command, exit status, seconds and the last lines of its output. Exit status 1 if a
check failed.

On the lent H200 machine (its python3 has torch 2.11, onnx and onnxruntime, but not pydantic
or kornia), from the repo root here, once (the folder is git-ignored)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 \
      annotated-types==0.8.0 kornia==0.9.0 kornia_rs==0.2.0

then one device call with ``carry=[".whl"]`` and ``timeout_s=600``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target
    /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
    python3 benchmarks/gpu_check.py --out /tmp/gc; cp /tmp/gc/*.md /tmp/gc/*.json $OUT/

(only a few files come back from $OUT: the reports, not the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = [sys.executable]
METHODS = ["suponly", "st", "stpp", "ciscr", "ciscr_bank", "fixmatch", "unimatch", "unimatch_cisc"]
# A synthetic task small enough for seconds per run, large enough to run every stage.
SMALL = ["data.synthetic.num_train=24", "data.synthetic.num_val=6", "data.labeled=8",
         "train.epochs=2", "train.unlabeled_epochs=1", "train.iters_per_epoch=3",
         "train.batch_size=4", "train.ckpt_every=1", "model.channels=32",
         "method.tta_scales=[1.0]", "method.tta_flip=false", "method.score_final_pseudo=false",
         "train.progress=false", "report=false"]
CPU_SMALL = ["data.synthetic.size=32", "train.crop_size=32", "model.backbone=mobilenet_v2"]


@dataclass
class Check:
    name: str
    cmd: list[str]
    timeout: int = 300
    verify: Callable[[], str | None] | None = None  # after rc 0: None = pass, else why not
    kill_in_stage2: bool = False  # SIGKILL once stage 2 has a checkpoint, then rerun (resume)
    result: dict = field(default_factory=dict)


def ciscr(*args: str) -> list[str]:
    return [*PY, "-m", "ciscr", *args]


def run_cmd(out: Path, name: str, device: str, *extra: str) -> list[str]:
    small = SMALL + (CPU_SMALL if device == "cpu" else [])
    return ciscr("run", "synthetic", "--out", str(out / name), f"device={device}", *small, *extra)


def final_miou(run_dir: Path) -> float | None:
    path = run_dir / "results.json"
    return json.loads(path.read_text())["final_metrics"]["miou"] if path.exists() else None


def checks(out: Path, device: str) -> list[Check]:
    runs = out / "runs"
    cs = [Check("info", ciscr("info"), 60)]
    cs += [Check(f"run {m} (bf16)", run_cmd(runs, m, device, f"method.name={m}",
                                            "train.amp=bf16")) for m in METHODS]
    if device.startswith("cuda"):  # fp16 needs a GradScaler, which ciscr refuses off CUDA
        cs.append(Check("run ciscr_bank (fp16, loss scaling)",
                        run_cmd(runs, "fp16", device, "method.name=ciscr_bank", "train.amp=fp16")))
    cs.append(Check("run unimatch (bf16, channels_last)",
                    run_cmd(runs, "cl", device, "method.name=unimatch", "train.amp=bf16",
                            "train.channels_last=true")))
    ref, killed = runs / "ciscr_bank", runs / "resumed"
    cs.append(Check("SIGKILL in stage 2, resume: same val mIoU",
                    run_cmd(runs, "resumed", device, "method.name=ciscr_bank", "train.amp=bf16"),
                    verify=lambda: same_miou(ref, killed), kill_in_stage2=True))
    cs.append(Check("torchrun, 1 process", [*PY, "-m", "torch.distributed.run", "--standalone",
                                            "--nproc_per_node", "1", "-m", "ciscr", *run_cmd(
                                                runs, "torchrun", device, "method.name=unimatch",
                                                "train.amp=bf16")[3:]]))
    ckpt = runs / "ciscr_bank" / "stage3" / "checkpoint.pt"
    cs.append(Check("predict on the device", ciscr("predict", str(ckpt), str(out / "images"),
                                                   "--out", str(out / "pred"), "--device", device,
                                                   "--amp", "bf16", "--no-progress")))
    cs.append(Check("export ONNX (verified by onnxruntime)",
                    ciscr("export", str(ckpt), "--out", str(out / "model.onnx"))))
    if device.startswith("cuda"):  # on a CPU the test suite runs bench (minutes here)
        cs.append(Check("bench --quick", ciscr("bench", "--quick", "--device", device)))
        cs.append(Check("bench ResNet-101 (speed_cuda.md)", ciscr(
            "bench", "--device", device, "--backbone", "resnet101", "--crop", "321", "--batch",
            "16", "--classes", "21", "--no-memory", "--out", str(out)), 420))
    return cs


def same_miou(ref: Path, resumed: Path) -> str | None:
    a, b = final_miou(ref), final_miou(resumed)
    if a is None or b is None:
        return f"missing results.json ({ref.name}: {a}, {resumed.name}: {b})"
    return None if a == b else f"val mIoU {b!r} after the resume, {a!r} without the kill"


def run_check(c: Check, log: Path) -> None:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(c.cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        killed = None
        if c.kill_in_stage2:
            killed = kill_after_first_checkpoint(proc, Path(c.cmd[c.cmd.index("--out") + 1]))
            proc.wait()
            proc = subprocess.Popen(c.cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            rc = proc.wait(timeout=c.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    why = c.verify() if rc == 0 and c.verify else None
    if killed is False:  # the check would prove nothing
        why = "the run ended before stage 2 wrote a checkpoint: it was never killed"
    tail = log.read_text(errors="replace").splitlines()[-15:]
    c.result = {"name": c.name, "command": shlex.join(c.cmd), "rc": rc,
                "seconds": round(time.perf_counter() - t0, 1),
                "passed": rc == 0 and why is None, "why": why, "tail": tail}


def kill_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, limit: float = 300) -> bool:
    """SIGKILL the run as soon as stage 2 has written a checkpoint; False if it ended first."""
    t0 = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - t0 < limit:
        if (run_dir / "stage2" / "checkpoint.pt").exists():
            os.killpg(proc.pid, signal.SIGKILL)
            return True
        time.sleep(0.05)
    return False


def sample_images(folder: Path, n: int = 2) -> None:
    """A few PNGs for predict (two sizes: one batch each)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48 + 16 * i, 64, 3), dtype=np.uint8)).save(
            folder / f"img{i}.png")


def write_report(out: Path, done: list[Check], device: str, argv: list[str]) -> Path:
    from ciscr.utils.io import atomic_write_bytes, atomic_write_json

    cmd = "python3 benchmarks/gpu_check.py " + shlex.join(argv)
    rows = [f"| {c.name} | {'PASS' if c.result['passed'] else 'FAIL'} | {c.result['rc']} | "
            f"{c.result['seconds']} | {c.result['why'] or ''} |" for c in done]
    lines = [f"# GPU check ({device})", "", f"- command: `{cmd.strip()}`",
             f"- machine: {machine(device)}",
             f"- generated: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}", "",
             "| check | result | exit | seconds | why |", "|---|---|---|---|---|", *rows, ""]
    for c in done:
        if not c.result["passed"]:
            lines += [f"## {c.name}", "", f"`{c.result['command']}`", "", "```",
                      *c.result["tail"], "```", ""]
    md = out / "gpu_check.md"
    atomic_write_bytes(md, ("\n".join(lines) + "\n").encode())
    atomic_write_json(out / "gpu_check.json", {"command": cmd.strip(), "device": device,
                                               "checks": [c.result for c in done]})
    return md


def machine(device: str) -> str:
    import torch

    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "no GPU"
    return f"{gpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the runs, logs and the report")
    p.add_argument("--device", default="cuda")
    p.add_argument("--only", default="", help="comma list of check-name prefixes")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    sample_images(out / "images")
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    todo = [c for c in checks(out, args.device)
            if not wanted or any(c.name.startswith(w) for w in wanted)]
    for i, c in enumerate(todo):
        run_check(c, out / "logs" / f"{i:02d}.log")
        print(f"{'PASS' if c.result['passed'] else 'FAIL'} {c.name} ({c.result['seconds']} s)",
              flush=True)
    print(write_report(out, todo, args.device, argv))
    return 0 if all(c.result["passed"] for c in todo) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
