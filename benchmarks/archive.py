"""Keep a long benchmark's evidence when the machine that trained its runs is gone.

A benchmark's runs live under the git-ignored ``runs/`` of one machine: checkpoints and
pseudo-label images, too large to commit. Its report reads only their small text artefacts
(the resolved config, each stage's done.json / metrics.json, training logs, selection lists).
:func:`mirror` copies those of every FINISHED stage into a folder committed beside the report,
and :func:`locate` finds a run's figures there when ``runs/`` no longer has them.

WHY: a 320-epoch CamVid run outlives a session, and a session's machine may come without the
previous machine's ``runs/``. On 2026-11-30 every run of protocol 2 and of the budget study was
lost that way, with only the committed reports left. Unfinished stages are not kept: without
their checkpoints they cannot resume anyway, and a half-written log is not a result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ciscr.utils.io import atomic_write_bytes

SUFFIXES = (".json", ".jsonl", ".yaml", ".txt")  # never checkpoints, images or arrays
MAX_BYTES = 4 << 20  # a text artefact larger than this is not one the reports read
SKIP_DIRS = {"tb"}  # TensorBoard events: the same figures as train.jsonl


def _texts(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return [p for p in files
            if p.is_file() and p.suffix in SUFFIXES and p.stat().st_size <= MAX_BYTES
            and SKIP_DIRS.isdisjoint(p.relative_to(folder).parts)]


def small_artefacts(run: Path, unfinished: bool = False) -> list[Path]:
    """The files of ``run`` worth keeping, relative to it (none before a stage has finished):
    its own top-level text files and those of every finished stage directory (one with
    done.json; every stage directory with ``unfinished``: a superseded run never resumes, and
    where it stopped is part of its record), at any depth."""
    stages = sorted(d for d in run.iterdir()
                    if d.is_dir() and (unfinished or (d / "done.json").exists()))
    if not stages:  # nothing finished: nothing to keep (its config alone is no result)
        return []
    out = _texts(run, recursive=False)
    for stage in stages:
        out += _texts(stage, recursive=True)
    return sorted(p.relative_to(run) for p in out)


def mirror(runs_root: Path, archive_root: Path, unfinished: bool = False) -> int:
    """Copy the small artefacts (:func:`small_artefacts`) of every run directory under
    ``runs_root`` into ``archive_root/<run>/`` (atomically, changed files only; nothing is ever
    deleted there). Returns the number of files written."""
    if not runs_root.is_dir():
        return 0
    written = 0
    for run in sorted(p for p in runs_root.iterdir() if p.is_dir()):
        for rel in small_artefacts(run, unfinished):
            data, dst = (run / rel).read_bytes(), archive_root / run.name / rel
            if not dst.exists() or dst.read_bytes() != data:
                atomic_write_bytes(dst, data)
                written += 1
    return written


def locate(live: list[Path], archive_root: Path, marker: str,
           accept: Callable[[Path], bool] | None = None) -> Path | None:
    """The first of the ``live`` run directories holding ``marker`` (a file relative to the
    run), else the first archived copy of one of them (``archive_root/<name>``) that does;
    with ``accept``, only a directory it accepts counts."""
    for rd in [*live, *(archive_root / d.name for d in live)]:
        if (rd / marker).exists() and (accept is None or accept(rd)):
            return rd
    return None
