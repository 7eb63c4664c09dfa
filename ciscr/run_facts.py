"""The facts of a run directory, gathered for the report: what exists, what is missing.

Reading only (no HTML, no figures): results.json, config.yaml and the stage folders become a
:class:`_Run`, with the stages the configured method makes, each one's status, the final stage
and its metrics, the class names and the training curves. ``ciscr.report`` renders them; a
run may be incomplete, so every reader returns None / "missing" rather than failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciscr.errors import CiscrError, DataError

TRAIN_STAGES = ("stage1", "stage2", "stage3", "online")
PSEUDO_SETS = ("pseudo0", "pseudo1", "pseudo_final")
ALL_STAGES = ("stage1", "pseudo0", "selection", "stage2", "pseudo1", "stage3", "online",
              "pseudo_final")


# --------------------------------------------------------------------------- reading the run


@dataclass
class _Run:
    """What the report knows about a run directory (everything optional)."""

    dir: Path
    results: dict[str, Any] | None
    cfg: Any | None  # ciscr.config.Config
    cfg_text: str | None
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    _data: Any = None
    _data_error: str | None = None

    def json(self, *parts: str) -> Any:
        return _load_json(self.dir.joinpath(*parts), self.notes)

    def dataset(self) -> tuple[Any, list, list, list] | None:
        """(info, labeled, unlabeled, val) from the run's config, or None (noted once)."""
        if self._data is None and self._data_error is None:
            if self.cfg is None:
                self._data_error = "config.yaml missing: the dataset cannot be located"
            else:
                from ciscr.data.formats import load_dataset

                try:
                    self._data = load_dataset(self.cfg.data, self.cfg.seed)
                except CiscrError as err:
                    self._data_error = f"dataset not readable ({err})"
        return self._data


def _load_json(path: Path, notes: list[str]) -> Any:
    """Parsed JSON, or None if the file is missing; a corrupt file adds a note."""
    from ciscr.utils.io import read_json

    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        notes.append(f"{path}: unreadable ({err})")
        return None


def _read_run(run_dir: Path, device: str) -> _Run:
    from ciscr.config import load_config

    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    notes: list[str] = []
    results = _load_json(run_dir / "results.json", notes)
    cfg = cfg_text = None
    if (run_dir / "config.yaml").is_file():
        cfg_text = (run_dir / "config.yaml").read_text()
        try:
            cfg = load_config(run_dir / "config.yaml")
        except CiscrError as err:
            notes.append(f"config.yaml: not usable ({err})")
    if cfg_text is None and results is None and not any((run_dir / s).is_dir() for s in ALL_STAGES):
        raise DataError(
            f"{run_dir}: not a ciscr run directory (no config.yaml, results.json or stage folders)"
        )
    return _Run(run_dir, results, cfg, cfg_text, notes, device)


def expected_stages(run: _Run) -> list[str]:
    """The stage folders the configured method makes (its recipe's), in order."""
    if run.cfg is None:
        return [s for s in ALL_STAGES if (run.dir / s).is_dir()]
    from ciscr.methods import stage_names

    names = stage_names(run.cfg.method)
    # pseudo_final exists only where the unlabeled images have ground truth: expected only
    # when a finished run lists it, or the folder was started.
    done = (run.results or {}).get("stages", {})
    if "pseudo_final" in done or (run.dir / "pseudo_final").is_dir():
        names.append("pseudo_final")
    return names


def stage_status(run: _Run, name: str) -> str:
    """done | incomplete (folder without done.json) | missing."""
    d = run.dir / name
    if (d / "done.json").is_file():
        return "done"
    return "incomplete" if d.is_dir() else "missing"


def _final_stage(run: _Run) -> str:
    if run.results and run.results.get("final_stage"):
        return str(run.results["final_stage"])
    if run.cfg is not None:
        from ciscr.methods import stage_names

        return [s for s in stage_names(run.cfg.method) if s in TRAIN_STAGES][-1]
    done = [s for s in TRAIN_STAGES if (run.dir / s).is_dir()]
    return done[-1] if done else "stage1"


def _class_names(run: _Run) -> list[str]:
    fm = (run.results or {}).get("final_metrics") or {}
    if fm.get("class_names"):
        return list(fm["class_names"])
    for s in TRAIN_STAGES:
        m = run.json(s, "metrics.json")
        if m and m.get("class_names"):
            return list(m["class_names"])
    data = run.dataset()
    if data is not None:
        return list(data[0].class_names)
    return []  # unknown: the tables show mIoU only


def _final_metrics(run: _Run) -> tuple[dict[str, Any] | None, str]:
    """(metrics of the final stage's last checkpoint, where they came from)."""
    fm = (run.results or {}).get("final_metrics")
    if fm:
        return fm, "results.json"
    final = _final_stage(run)
    m = run.json(final, "metrics.json")
    return m, f"{final}/metrics.json"


def read_train_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Series per scalar of a train.jsonl: ``{key: [(iteration, value), ...]}``, sorted.

    A resumed stage logs some iterations twice: the LAST record of an iteration wins (per
    key, since validation records share the iteration of a step record).
    """
    from ciscr.utils.io import read_jsonl

    series: dict[str, dict[int, float]] = {}
    for rec in read_jsonl(path):
        it = rec.get("iteration")
        if not isinstance(it, int):
            continue
        for k, v in rec.items():
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k, {})[it] = float(v)
    return {k: sorted(v.items()) for k, v in series.items()}
