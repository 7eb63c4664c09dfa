"""What every timing tool shares, written once: the round-robin timing, the machine and its
noise, the report's header, tables and files.

``ciscr bench`` (:mod:`ciscr.timing.bench`) and ``ciscr profile``
(:mod:`ciscr.timing.profiling`, with :mod:`ciscr.timing.steptime`) measure different things
the same way: side by side, in rounds, on a machine that may be busy; they report medians in
markdown tables and write ``<name>.md`` + ``<name>.json``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
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


def in_rounds(measures: dict[str, Callable[[], float]], repeats: int, warmup: int,
              rotate: bool = True) -> dict[str, list[float]]:
    """{name: what its measurement returned in each counted round}: ``warmup`` uncounted then
    ``repeats`` counted rounds, each calling every measurement once.

    WHY rounds: a change of the machine's speed (another process, clock boost) then hits every
    variant of a round alike. With ``rotate`` the starting point moves by one each round, so no
    variant always runs right after the same neighbour (cache state, ...).
    """
    names = list(measures)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names) if rotate else 0
        for n in names[shift:] + names[:shift]:
            x = measures[n]()
            if r >= warmup:
                out[n].append(x)
    return out


def time_round_robin(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds of each call of ``fns``, timed in rotating rounds (:func:`in_rounds`)."""

    def timed(fn: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t0

        return run

    return in_rounds({n: timed(fn) for n, fn in fns.items()}, repeats, warmup)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def timing_row(name: str, times: Sequence[float], images: float, **fields: Any) -> dict[str, Any]:
    """A result row of timed runs: ``name``, ``fields``, the median, the runs, their spread
    ((max - min) / median) and images per second at the median."""
    m = median(times)
    return {"name": name, **fields, "median_s": m, "times_s": times,
            "spread": (max(times) - min(times)) / m, "images_per_s": images / m}  # fmt: skip


# --------------------------------------------------------------------------- the machine


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model and flags, cores, threads, versions, accelerator, load average."""
    from ciscr.utils.misc import cpu_flags, cpu_model_name

    cpu, flags = cpu_model_name(), cpu_flags()
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "avx512_bf16": "avx512_bf16" in flags, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device), "load_avg_start": list(os.getloadavg())}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@contextlib.contextmanager
def measured(command: str, device: torch.device, **fields: Any) -> Iterator[dict[str, Any]]:
    """The result of a tool's run, to fill in: date, command, machine and ``fields``; on
    leaving, the load average at the end (see :func:`load_noise`) and the wall time."""
    res = {"date": now(), "command": command, "machine": machine_info(device), **fields}
    t0 = time.perf_counter()
    yield res
    res["machine"]["load_avg_end"] = list(os.getloadavg())
    res["wall_s"] = time.perf_counter() - t0


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


def header(res: dict[str, Any], title: str, note: str, threads: bool,
           more: Sequence[str]) -> list[str]:
    """A report's first lines: title, the noise note, date, command, the machine (with the
    torch threads if ``threads``), then ``more``."""
    m = res["machine"]
    thr = f"{m['threads']} threads, " if threads else ""
    return [f"# {title}", "", "> " + note, "", f"- date: {res['date']}",
            f"- command: `{res['command']}`",
            f"- machine: {m['cpu']}, {m['cores']} cores, avx512_bf16 {m['avx512_bf16']}, torch "
            f"{m['torch']}, {thr}python {m['python']}, {m['platform']}", *more]  # fmt: skip


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


# A table column: (header, the row's key or a function of the row, the cell's format spec;
# "" prints the value as it is).
Column = tuple[str, Any, str]


def table(rows: Sequence[Any], columns: Sequence[Column]) -> list[str]:
    """A markdown table of ``rows`` (dicts, or anything the columns' functions read): one
    line per row, its cells read and formatted (:func:`fmt`) as ``columns`` say."""

    def cell(row: Any, key: str | Callable[[Any], Any], spec: str) -> str:
        return fmt(key(row) if callable(key) else row.get(key), spec)

    return md_table([c[0] for c in columns], [[cell(r, k, s) for _, k, s in columns] for r in rows])


def print_and_write(res: dict[str, Any], text: str, out: Path | None, name: str) -> int:
    """What both commands end with: the report on stdout and, under ``out``, ``<name>.md``
    (``text``) and ``<name>.json`` (``res``), written atomically."""
    from ciscr.utils.io import atomic_write_json, atomic_write_text

    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        md, js = out / f"{name}.md", out / f"{name}.json"
        atomic_write_json(js, res)
        atomic_write_text(md, text)
        print(f"wrote {md} and {js}")
    return 0


# --------------------------------------------------------------------------- command line


def comma_list(text: str, flag: str, choices: Sequence[str]) -> list[str]:
    """The items of a comma list option, each one of ``choices`` (else a one-line error)."""
    from ciscr.errors import ConfigError

    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or any(x not in choices for x in items):
        raise ConfigError(f"{flag} {text}: choose among {','.join(choices)}")
    return items


def at_least(args: Any, lowest: dict[str, int]) -> None:
    """A one-line error for the first option of ``lowest`` (dest: bound) given below it."""
    from ciscr.errors import ConfigError

    for dest, low in lowest.items():
        v = getattr(args, dest)
        if v is not None and v < low:
            raise ConfigError(f"--{dest.replace('_', '-')} {v}: must be >= {low}")


def spelled(args: Any, defaults: dict[str, Any]) -> list[str]:
    """The options of ``args`` whose value differs from its default in ``defaults`` (dest:
    default), as command-line words: a switch alone, any other option with its value."""
    out: list[str] = []
    for dest, default in defaults.items():
        v = getattr(args, dest)
        if v != default:
            out += [f"--{dest.replace('_', '-')}", *([] if v is True else [str(v)])]
    return out
