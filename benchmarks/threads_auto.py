"""threads=auto vs torch's default (threads=0) vs threads=1, for ``ciscr eval`` on a machine that
another job keeps busy (issue 26): writes docs/results/threads_auto.md.

The other job is simulated: a process doing float32 matmuls with one torch thread per core, for
the length of the measurement. Every eval is a fresh ``ciscr eval`` process, in alternating
order (0, auto, 1, 0, auto, 1, ...), timed from start to exit (imports included), on a small
synthetic checkpoint trained first. Also one eval of each setting with no other job running.

    python benchmarks/threads_auto.py --work /tmp/threads_auto --rounds 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from camvid_report import machine  # noqa: E402  (beside this file)

SETTINGS = ("0", "auto", "1")
TRAIN = ["data.synthetic.num_train=16", "data.synthetic.num_val=60", "data.synthetic.size=160",
         "data.labeled=8", "train.epochs=1", "train.iters_per_epoch=2", "train.batch_size=4",
         "train.crop_size=96", "train.progress=false", "model.channels=64",
         "model.backbone=mobilenet_v2", "report=false", "threads=1"]
# The other job: every core busy with float32 matmuls until killed.
HOG = ("import torch, os; torch.set_num_threads(len(os.sched_getaffinity(0))); "
       "a = torch.randn(1024, 1024)\nwhile True: a @ a")


def ciscr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ciscr", *args], capture_output=True,
                          text=True, check=True, cwd=REPO)


def timed_eval(ckpt: Path, setting: str, out: Path) -> tuple[float, str]:
    """(seconds from start to exit, the threads line of -v) of one ``ciscr eval``."""
    t0 = time.perf_counter()
    res = ciscr("eval", str(ckpt), f"threads={setting}", "--out", str(out), "-v")
    seconds = time.perf_counter() - t0
    found = re.search(r"threads: \d+ \(.*\)$", res.stderr, re.MULTILINE)
    return seconds, found.group(0) if found else "?"


def measure(ckpt: Path, work: Path, rounds: int) -> dict[str, list[tuple[float, str]]]:
    got: dict[str, list[tuple[float, str]]] = {s: [] for s in SETTINGS}
    for _ in range(rounds):
        for s in SETTINGS:
            got[s].append(timed_eval(ckpt, s, work / f"eval_{s}.json"))
    return got


def row(name: str, got: dict[str, list[tuple[float, str]]]) -> str:
    cells = []
    for s in SETTINGS:
        times = " / ".join(f"{t:.1f}" for t, _ in got[s])
        cells.append(f"{times} (median {statistics.median(t for t, _ in got[s]):.1f})")
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/threads_auto"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "docs/results/threads_auto.md")
    args = ap.parse_args()
    run = args.work / "run"
    if not (run / "stage1" / "checkpoint.pt").exists():
        ciscr("train", "synthetic", "--out", str(run), f"data.root={args.work / 'data'}", *TRAIN)
    ckpt = run / "stage1" / "checkpoint.pt"
    load_before = os.getloadavg()[0]  # other users' work, if any: the quiet row is not idle
    quiet = measure(ckpt, args.work, 1)
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        time.sleep(5)  # the other job is running; the load average starts to show it
        busy = measure(ckpt, args.work, args.rounds)
        load = os.getloadavg()[0]
    finally:
        hog.kill()
        hog.wait()
    auto_lines = sorted({line for _, line in busy["auto"]})
    lines = [
        "# threads=auto vs torch's default on a busy machine (`ciscr eval`)", "",
        f"`python benchmarks/threads_auto.py --rounds {args.rounds}` on {machine()}; seconds "
        "per `ciscr eval` process (imports included) of a small synthetic checkpoint (60 val "
        "images, 160 px, MobileNetV2, 64 channels), the settings alternating.", "",
        "| machine | threads=0 (torch's default) | threads=auto | threads=1 |",
        "|---|---|---|---|",
        row(f"no simulated job (load average {load_before:.1f} at the start)", quiet),
        row(f"another job on every core (load average {load:.1f} at the end)", busy), "",
        f"- what threads=auto chose with the other job running: {'; '.join(auto_lines)}",
        f"- with no simulated job: {quiet['auto'][0][1]}",
    ]
    text = "\n".join(lines) + "\n"
    from ciscr.utils.io import atomic_write_text

    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
