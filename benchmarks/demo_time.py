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
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from camvid_report import machine  # noqa: E402  (beside this file)

from ciscr.utils.io import atomic_write_bytes  # noqa: E402


def reference_step_ms(steps: int = 20) -> float:
    """Median time of one plain training step of the demo's model (8 crops of 64 px, the
    synthetic config's precision, torch's default threads): the machine's speed at the time of
    the measurement, so that a demo time can be compared with one measured on another day."""
    import torch

    from ciscr.config import load_config
    from ciscr.models.factory import build_model
    from ciscr.utils.misc import autocast, resolve_amp

    cfg = load_config("synthetic", [])
    model = build_model(cfg.model, cfg.data.synthetic.num_classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 64, 64, generator=g)
    y = torch.randint(0, cfg.data.synthetic.num_classes, (8, 64, 64), generator=g)
    amp = resolve_amp(cfg.train.amp, torch.device("cpu"))
    times = []
    for _ in range(steps + 3):  # 3 warm-up steps
        t0 = time.perf_counter()
        with autocast("cpu", amp):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[3:])


# The largest change of the reference step across the demo for which its wall time counts as
# a quiet machine's: WHY, a shared 2-core machine's speed can halve within minutes, and a wall
# time measured through that says nothing about the demo.
STEADY_LIMIT = 0.15


def steadiness(before_ms: float, after_ms: float) -> list[str]:
    """A warning paragraph when the machine's speed moved more than :data:`STEADY_LIMIT`
    during the measurement, else nothing."""
    change = after_ms / before_ms - 1
    if abs(change) <= STEADY_LIMIT:
        return []
    return [f"> NOISY: the reference step changed by {100 * change:+.0f} % during the demo "
            f"(limit {100 * STEADY_LIMIT:.0f} %): this wall time is not a quiet machine's; "
            "rerun the command when the machine is steady.", ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(REPO / "docs/results"))
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    step_before = reference_step_ms()
    with tempfile.TemporaryDirectory() as tmp:
        # An empty cache: the synthetic data is generated as on a fresh install.
        env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "cache"), "HOME": tmp}
        cmd = [sys.executable, "-m", "ciscr", "demo", "--out", str(Path(tmp) / "demo")]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"ciscr demo failed:\n{res.stderr[-3000:]}")
    step_after = reference_step_ms()
    table = res.stdout[res.stdout.index("method "):] if "method " in res.stdout else res.stdout
    lines = ["# `ciscr demo`: the time a new user waits", "",
             "- command: `python benchmarks/demo_time.py` (runs `ciscr demo` in an empty folder "
             "with an empty data cache)",
             f"- machine: {machine()}; load average before the run: {load:.2f}",
             f"- generated: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- the machine's speed then: one plain training step of the demo's model (8 crops "
             f"of 64 px) took {step_before:.0f} ms before the demo and {step_after:.0f} ms after "
             "(median of 20; `reference_step_ms` in this script)", "",
             f"**Wall time: {wall:.0f} s** (data generation, every training run of the demo, their "
             "evaluation and reports).", "", *steadiness(step_before, step_after),
             "The demo's table:", "", "```", table.rstrip(), "```", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "demo_cpu.md", ("\n".join(lines) + "\n").encode())
    print(f"{wall:.0f} s -> {out / 'demo_cpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
