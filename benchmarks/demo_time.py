"""How long a new user waits for ``ciscr demo``: the README's first command, timed.

Runs ``ciscr demo`` as a fresh process in an empty folder, with an empty synthetic-data cache
(nothing generated or trained before), and writes ``docs/results/demo_cpu.md`` with the wall
time, the machine and the demo's own table. Run it on a quiet machine (nothing else using the
cores): it measures wall time.

    python benchmarks/demo_time.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from camvid import machine  # noqa: E402  (beside this file)

from ciscr.utils.io import atomic_write_bytes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(REPO / "docs/results"))
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        # An empty cache: the synthetic data is generated as on a fresh install.
        env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "cache"), "HOME": tmp}
        cmd = [sys.executable, "-m", "ciscr", "demo", "--out", str(Path(tmp) / "demo")]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"ciscr demo failed:\n{res.stderr[-3000:]}")
    table = res.stdout[res.stdout.index("method "):] if "method " in res.stdout else res.stdout
    lines = ["# `ciscr demo`: the time a new user waits", "",
             "- command: `python benchmarks/demo_time.py` (runs `ciscr demo` in an empty folder "
             "with an empty data cache)",
             f"- machine: {machine()}; load average before the run: {load:.2f}",
             f"- generated: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}", "",
             f"**Wall time: {wall:.0f} s** (data generation, every training run of the demo, their "
             "evaluation and reports).", "", "The demo's table:", "", "```", table.rstrip(), "```", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "demo_cpu.md", ("\n".join(lines) + "\n").encode())
    print(f"{wall:.0f} s -> {out / 'demo_cpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
