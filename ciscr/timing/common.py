"""What every timing tool shares, written once: the round-robin timing, the machine and its
noise, the markdown tables, and the report files.

``ciscr bench`` (:mod:`ciscr.timing.bench`) and ``ciscr profile``
(:mod:`ciscr.timing.profiling`, with :mod:`ciscr.timing.steptime`) measure different things
the same way: side by side, in rounds, on a machine that may be busy; they report medians in
markdown tables and write ``<name>.md`` + ``<name>.json``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def now() -> str:
    """The local date and time of a report, to the second."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- timing


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_round_robin(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds of each call, ``warmup`` untimed then ``repeats`` timed rounds over all ``fns``.

    Every round visits every function once; the starting point rotates by one each round so
    no variant always runs right after the same neighbour (cache state, clock boost, ...).
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------- the machine


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model and flags, cores, threads, versions, accelerator, load average."""
    cpu, flags = platform.processor() or "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags.split(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_avg_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_noise(m: dict[str, Any], when: str, threads: str) -> tuple[bool, str]:
    """(busy, the note's first sentence): was the machine busy ``when`` (e.g. "during the run
    "), from its 1-min load average at the start and end, which counts this run's own threads
    too; ``threads`` says how many this run used."""
    la0, la1 = m["load_avg_start"][0], m.get("load_avg_end", [float("nan")])[0]
    busy = max(la0, la1) > m["threads"] + 0.5
    note = ((f"NOISY: other processes were using this machine {when}" if busy
             else f"The machine looked idle {when}")
            + f"(1-min load average {la0:.1f} at the start, {la1:.1f} at the end, "
            f"{m['cores']} cores, {threads}).")  # fmt: skip
    return busy, note


def machine_line(m: dict[str, Any], threads: bool) -> str:
    """The report header's ``- machine:`` line (with the torch threads if ``threads``)."""
    thr = f"{m['threads']} threads, " if threads else ""
    return (f"- machine: {m['cpu']}, {m['cores']} cores, avx512_bf16 {m['avx512_bf16']}, torch "
            f"{m['torch']}, {thr}python {m['python']}, {m['platform']}")


# --------------------------------------------------------------------------- reports


def fmt(x: Any, spec: str = ".3f") -> str:
    """A number in a table cell; ``-`` for a figure that does not exist."""
    return "-" if x is None else format(x, spec)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table, columns padded so it also reads well on a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [line(headers), rule, *(line(r) for r in rows)]


def write_report_files(res: dict[str, Any], text: str, out_dir: Path,
                       name: str) -> tuple[Path, Path]:
    """``<name>.md`` (``text``) and ``<name>.json`` (``res``) in ``out_dir``, atomically."""
    from ciscr.utils.io import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    atomic_write_json(js, res)
    atomic_write_text(md, text)
    return md, js


def print_and_write(text: str, out: Path | None, write: Callable[[Path], tuple[Path, Path]]) -> int:
    """What both commands end with: the report on stdout, and its files under ``--out``."""
    print(text)
    if out is not None:
        md, js = write(out)
        print(f"wrote {md} and {js}")
    return 0
