"""How many CPU threads torch uses, and whether other work already keeps the cores busy.

Two jobs that each start one torch thread per core slow each other down many times over
(threads spin waiting for a core the other job holds). ``threads=auto`` (the default) starts as
many threads as cores are free when the command starts; every command that runs a model warns
the same way (:func:`oversubscription_warning`) when a fixed thread count meets a busy machine.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

# torch's own default (one thread per core, or OMP_NUM_THREADS), read before anything in
# ciscr changes it: threads=auto never starts more than torch would by itself.
_TORCH_DEFAULT = torch.get_num_threads()
# When this process started: its own work must not count as "other work" (below).
_START = time.monotonic()
_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset / container CPU sets
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _own_share() -> float:
    """This process's part of the 1-minute load average: its mean parallelism so far (CPU
    seconds / seconds alive), weighted as the kernel's 1-minute average weighs a load that
    started that long ago. WHY: the demo's later rows follow its own earlier work."""
    alive = max(time.monotonic() - _START, 1e-3)
    return time.process_time() / alive * (1.0 - math.exp(-alive / 60.0))


def _running_now(samples: int = 5, gap: float = 0.02) -> float | None:
    """Threads runnable right now besides this one (mean of a few reads of /proc/loadavg's
    4th field; Linux only, else None)."""
    counts = []
    try:
        for i in range(samples):
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)  # minus the reader
            if i + 1 < samples:
                time.sleep(gap)
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, sum(counts) / len(counts))


@dataclass(frozen=True)
class Load:
    """The machine's load when a command starts."""

    average: float  # the 1-minute load average, as ``uptime`` shows it
    others: float  # the part other work adds: see :func:`machine_load`
    cores: int

    @property
    def free(self) -> int:
        """Cores other work leaves idle (at least one)."""
        return max(1, round(self.cores - self.others))


def machine_load() -> Load | None:
    """The load average and what other work adds to it (None where there is none: Windows).

    Other work = the smaller of (load average - this process's own share) and the threads
    runnable right now. Both must show the machine busy: the load average alone still counts
    work that ended seconds ago (a pip install, the demo's previous row) and the snapshot
    alone is noisy.
    """
    try:
        average = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    others = max(0.0, average - _own_share())
    now = _running_now()
    if now is not None:
        others = min(others, now)
    return Load(average, others, usable_cores())


def auto_threads(processes: int = 1, load: Load | None = None) -> int:
    """``threads=auto``: the free cores at start, shared between the processes, capped at
    torch's default; OMP_NUM_THREADS / MKL_NUM_THREADS, when set, win (torch honours them)."""
    if processes == 1 and any(v in os.environ for v in _ENV):
        return _TORCH_DEFAULT
    load = load if load is not None else machine_load()
    free = load.free if load is not None else usable_cores()
    per_process = max(1, free // max(processes, 1))
    return per_process if processes > 1 else min(per_process, _TORCH_DEFAULT)


def apply_threads(setting: int | str, processes: int = 1) -> str:
    """Set torch's threads from the ``threads`` setting; returns how they were chosen.

    ``N`` > 0: N. ``0``: torch's default (all cores, or OMP_NUM_THREADS), ``cores / processes``
    under torchrun on a CPU. ``auto``: :func:`auto_threads`.
    """
    if setting == "auto":
        load = machine_load()
        n = auto_threads(processes, load)
        torch.set_num_threads(n)
        if processes == 1 and any(v in os.environ for v in _ENV):
            return f"threads=auto: {n} ({', '.join(v for v in _ENV if v in os.environ)} set)"
        busy = "" if load is None else f", load from other work {load.others:.1f}"
        return f"threads=auto: {n} of {usable_cores()} core(s){busy}"
    if isinstance(setting, int) and setting > 0:
        torch.set_num_threads(setting)
        return f"threads={setting}"
    if processes > 1 and not torch.cuda.is_available():
        # Under torchrun on a CPU box every process would otherwise use all cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    return "threads=0: torch's default"


def oversubscription_warning(threads: int, processes: int = 1,
                             load: Load | None = None) -> str | None:
    """A warning when other work already keeps the cores busy, or None."""
    load = load if load is not None else machine_load()
    if load is None:
        return None
    wanted = threads * processes
    if load.others < 1.0 or wanted <= load.free:
        return None
    free = max(1, load.free // max(processes, 1))  # per process
    return (
        f"WARNING: this machine is busy (load average {load.average:.1f} on {load.cores} "
        f"core(s), {load.others:.1f} of it other work) and torch will start {wanted} thread(s): "
        f"sharing cores can slow this 3-20x; set threads=auto or threads={free} (or "
        f"OMP_NUM_THREADS={free}), see README > Troubleshooting"
    )


def load_line() -> str:
    """``ciscr info``: the load now, and what threads=auto would start."""
    load = machine_load()
    if load is None:
        return "no load average on this platform (threads=auto uses every core)"
    return (f"load average {load.average:.2f} on {load.cores} core(s), {load.others:.1f} of it "
            f"other work now: threads=auto would start {auto_threads(1, load)}")
