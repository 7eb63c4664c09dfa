"""How long the README's test command takes: ``python -m pytest -q``, timed on this machine.

Runs the suite once as a fresh process (what "Test it" runs after the install), then writes
``docs/results/test_suite.md`` with the wall time, the pass/skip counts, the machine and its load
average, pytest's slowest test phases, and the README's sentence between its ``test-suite-time``
marks. Run it on a quiet machine (it measures wall time; the result is marked NOISY when the
load average at the end, the minute the suite itself ran last, exceeds the cores: the one at the
start still counts whatever ran the minute before):

    python benchmarks/suite_time.py
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from camvid_report import machine, update_readme  # noqa: E402  (beside this file)

from ciscr.utils.io import atomic_write_bytes  # noqa: E402

COMMAND = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
README_MARK = ("<!-- test-suite-time: written by benchmarks/suite_time.py -->",
               "<!-- /test-suite-time -->")


def summary_counts(output: str) -> str:
    """pytest's last summary line ('506 passed, 1 skipped in 461.2s'), without the time."""
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    if not lines:
        raise SystemExit("suite_time: no pytest summary line in the output")
    return re.sub(r"\s+in [\d.]+s.*$", "", lines[-1].strip("= "))


def slowest(output: str) -> list[str]:
    """pytest's "slowest durations" lines (``--durations`` in pyproject's addopts), as they are."""
    lines = output.splitlines()
    start = next((i for i, ln in enumerate(lines) if "slowest" in ln and "durations" in ln), None)
    if start is None:
        return []
    return [ln for ln in lines[start + 1:] if re.match(r"^\d+\.\d+s ", ln)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "test_suite.md")
    ap.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = subprocess.run(COMMAND, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    counts = summary_counts(res.stdout)
    if res.returncode != 0:
        print(res.stdout[-3000:], file=sys.stderr)
        raise SystemExit(f"suite_time: the suite failed ({counts}); nothing written")
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cores = os.cpu_count()
    busy = load1 > (cores or 1) + 0.5  # load0 still counts the minute before the suite
    text = "\n".join([
        "# The test suite's duration (`python -m pytest -q`, the README's test command)", "",
        f"- result: {counts}",
        f"- wall time: {wall / 60:.1f} min ({wall:.0f} s)",
        f"- machine: {machine()}; 1-min load average {load0:.1f} at the start, "
        f"{load1:.1f} at the end" + (" (NOISY: other processes were running)" if busy else ""),
        f"- date: {when}",
        f"- command: `python benchmarks/suite_time.py` (runs `{' '.join(COMMAND[1:])}`)", "",
    ])
    slow = slowest(res.stdout)
    if slow:  # where to look first when the suite nears its 10-minute limit
        text += "\n".join(["", "The slowest test phases (pytest's own durations):", "", "```",
                           *slow, "```", ""])
    atomic_write_bytes(args.out, text.encode())
    if not args.no_readme:
        line = (f"the suite ran in {wall / 60:.1f} minutes ({counts}) on {machine()}"
                + (" (NOISY: other processes were running)" if busy else "") + " "
                "([docs/results/test_suite.md](docs/results/test_suite.md), "
                "`python benchmarks/suite_time.py`).")
        update_readme(REPO / "README.md", line, README_MARK)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
