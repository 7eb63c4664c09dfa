"""``ciscr demo``: SupOnly vs ST vs CISC-R on the built-in synthetic dataset, in minutes on a CPU.

SupOnly is stage 1 of the ST run (same seed, CE on the labeled images only), so it is not
trained twice. Every run is resumable: rerunning ``ciscr demo`` continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ciscr.config import load_config
from ciscr.runner import run_training


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{100 * x:6.2f}"


def demo_table(st: dict[str, Any], ciscr: dict[str, Any], seconds: dict[str, float]) -> str:
    """Side-by-side table of the three methods (val mIoU, pseudo-label mIoU, wall time)."""
    s, c = st["stages"], ciscr["stages"]
    rows = [
        ("SupOnly (stage 1 of ST)", s["stage1"]["val_miou"],
         s.get("pseudo0", {}).get("pseudo_miou"), None),
        ("ST (self-training)", st["final_metrics"]["miou"],
         s.get("pseudo_final", {}).get("pseudo_miou"), seconds["st"]),
        ("CISC-R", ciscr["final_metrics"]["miou"],
         c.get("pseudo_final", {}).get("pseudo_miou"), seconds["ciscr"]),
    ]
    lines = [
        f"{'method':<26}{'val mIoU':>10}{'pseudo mIoU':>13}{'wall s':>9}",
        "-" * 58,
    ]
    for name, val, pseudo, sec in rows:
        wall = "" if sec is None else f"{sec:9.0f}"
        lines.append(f"{name:<26}{_pct(val):>10}{_pct(pseudo):>13}{wall}")
    lines.append(
        "pseudo mIoU: the model's TTA labels of the unlabeled pool against their ground truth "
        "(used for scoring only, never for training)."
    )
    return "\n".join(lines)


def run_demo(out: Path, overrides: list[str]) -> dict[str, Any]:
    results, seconds = {}, {}
    for name in ("st", "ciscr"):
        cfg = load_config("synthetic", [f"method.name={name}", *overrides])
        print(f"\n=== {name}: ciscr run synthetic method.name={name} --out {out / name}")
        t0 = time.perf_counter()
        results[name] = run_training(cfg, out / name)
        seconds[name] = time.perf_counter() - t0
    print("\n" + demo_table(results["st"], results["ciscr"], seconds))
    print(f"runs: {out}/st, {out}/ciscr  (wall s counts only work done in this invocation)")
    return results
