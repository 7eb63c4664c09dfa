"""fp32 vs bf16 autocast: one training step of the CamVid benchmark's model, on this CPU.

Why it exists: on a CPU without native bf16 (no AVX512-BF16 / AMX) torch emulates bf16 and a
step is several times SLOWER than fp32, which is why the packaged configs use
``train.amp=auto`` and an explicit ``bf16`` there prints a warning (issue 33). This measures the
ratio where it runs and writes it with the CPU's name and bf16 support:

    python benchmarks/precision_ratio.py          # -> docs/results/precision_<cpu slug>.md

The step is the SupOnly training step the CamVid benchmark runs (the packaged ``camvid``
config's DeepLabV3+ MobileNetV2, batch 8, crop 224, 11 classes, random weights: speed does not
depend on them), with the same
``ciscr.engine.train._one_step``, timed round-robin (fp32, bf16 alternating, so drift on a
shared machine hits both), one torch thread as the benchmark's jobs use. Run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ciscr.config import load_config  # noqa: E402
from ciscr.engine.steps import supervised_step  # noqa: E402
from ciscr.engine.train import _one_step, new_stage_state  # noqa: E402
from ciscr.models import build_model  # noqa: E402
from ciscr.timing.common import machine_info, median, time_round_robin  # noqa: E402
from ciscr.utils.io import atomic_write_bytes  # noqa: E402
from ciscr.utils.misc import cpu_has_fast_bf16  # noqa: E402


def step_case(amp: str, batch: int, crop: int, classes: int):
    """A callable that runs one training step at ``amp`` ("none" | "bf16") of the packaged
    camvid config's model (its output stride, decoder width, dropouts)."""
    torch.manual_seed(0)
    camvid = load_config("camvid")
    model = build_model(camvid.model.model_copy(update={"pretrained": ""}), classes).train()
    cfg = camvid.train.model_copy(update={"amp": amp, "lr": 1e-6})
    st = new_stage_state(model, supervised_step(), cfg, 10**6, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batches = {"labeled": {"image": torch.randn(batch, 3, crop, crop, generator=g),
                           "mask": torch.randint(0, classes, (batch, crop, crop), generator=g)}}
    return lambda: _one_step(model, st, st.step, batches, 0, cfg, torch.device("cpu"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = {amp: step_case(amp, args.batch, args.crop, 11) for amp in ("none", "bf16")}
    times = time_round_robin(cases, args.repeats, args.warmup, lambda: None)
    fp32, bf16 = median(times["none"]), median(times["bf16"])
    m = machine_info(torch.device("cpu"))
    native = cpu_has_fast_bf16()
    slug = re.sub(r"[^a-z0-9]+", "_", m["cpu"].lower()).strip("_")[:40]
    text = "\n".join([
        f"# fp32 vs bf16 autocast, one training step: {m['cpu']}", "",
        f"- bf16 on this CPU: {'native (AVX512-BF16 / AMX)' if native else 'emulated (no AVX512-BF16 / AMX)'}; "
        f"train.amp=auto picks {'bf16' if native else 'fp32'}",
        f"- fp32 step: {fp32:.2f} s (median of {args.repeats}: "
        f"{', '.join(f'{t:.2f}' for t in times['none'])})",
        f"- bf16 step: {bf16:.2f} s (median of {args.repeats}: "
        f"{', '.join(f'{t:.2f}' for t in times['bf16'])})",
        f"- bf16 / fp32 time: {bf16 / fp32:.2f}x ({'faster' if bf16 < fp32 else 'slower'} in bf16)",
        f"- step: SupOnly, the camvid config's DeepLabV3+ MobileNetV2, batch {args.batch}, crop "
        f"{args.crop}, 11 classes, 1 torch thread",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; 1-min load average "
        f"{m['load_avg_start'][0]:.1f} at the start",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `python benchmarks/precision_ratio.py --repeats {args.repeats} --warmup "
        f"{args.warmup} --batch {args.batch} --crop {args.crop}`", "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / f"precision_{slug}.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
