"""``ciscr profile``: where the time of a real (synthetic) run goes, stage by stage.

Three passes over the same config, two of them real ``ciscr run`` s
(:func:`ciscr.runner.run_training`) of every method asked for (default ST and CISC-R) in a
scratch directory:

1. **timed**: no profiler. Every stage's wall time comes from the run's own records (the
   ``done.json`` of each stage, :mod:`ciscr.timing.stages`), plus the setup (dataset checks) and the
   report, timed around the calls: the ST vs CISC-R comparison in real runs, free of profiler
   overhead.
2. **interleaved** (:mod:`ciscr.timing.steptime`): the training stages of the timed runs planned
   again and trained side by side in one process, a block of steps each in turn, so that a
   drift of the machine's speed cancels out of the ratios; the stage targets are judged on it.
3. **profiled**: the same runs under ``cProfile``, one profile per stage, summed into fixed
   categories (:data:`CATEGORIES`: train-batch loading and augmentation on the main process,
   the student step, the rectifier and its query-mode teacher passes, evaluation, checkpoints,
   TTA pseudo-labelling, prototypes and distances, report building) plus the functions with the
   most own time; and ``torch.profiler`` over a window of training iterations of each
   training stage (ops by self CPU time).

Stages are found by wrapping the pipeline's stage functions (:data:`STAGE_FUNCTIONS`) for the
duration of a run, so the pipeline itself carries no profiling code.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import os
import pstats
import shlex
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciscr.errors import ConfigError
from ciscr.timing.common import (
    at_least,
    comma_list,
    fmt,
    header,
    load_noise,
    md_table,
    measured,
    print_and_write,
    spelled,
    table,
)
from ciscr.timing.stages import STAGE_ORDER, stage_kind, stage_time_rows

STAGE_TARGET = 1.15  # a CISC-R training stage / the ST stage at the same settings (issue 13)
METHODS = ("st", "ciscr")
# "At the same settings": ST trains on CISC-R's two streams here (a labeled and an unlabeled
# batch per step), not on ST++'s mixed list of one batch, so a step of each sees as many images;
# and it keeps the config's recipe (confidence threshold, whose maps are loaded with every
# pseudo label, and init) instead of ST's preset, so that what differs is CISC-R's own work.
SAME_SETTINGS = {"st": ["method.retrain_batches=split", "method.cutout=false",
                        "method.stage1_cisc_loss=false"]}
# (module, attribute, how the stage is named from the call's arguments)
STAGE_FUNCTIONS: tuple[tuple[str, str, Callable[[tuple], str]], ...] = (
    ("ciscr.run_setup", "setup_run", lambda a: "setup"),
    ("ciscr.pipeline", "stage1", lambda a: "stage1"),
    # pseudo_stage lives in run_services (finish_run's pseudo_final calls it there) and is
    # imported by the pipeline (pseudo0, pseudo1): both names are wrapped.
    ("ciscr.pipeline", "pseudo_stage", lambda a: str(a[1])),
    ("ciscr.run_services", "pseudo_stage", lambda a: str(a[1])),
    ("ciscr.pipeline", "selection_stage", lambda a: "selection"),
    ("ciscr.pipeline", "retrain_stage", lambda a: str(a[1])),
    ("ciscr.report", "write_report", lambda a: "report"),
)
TORCH_WINDOW = (5, 10)  # torch.profiler: skip 5 training iterations of a stage, record 10


# --------------------------------------------------------------------------- instrumentation


@dataclass
class StageRecord:
    """One stage call: its wall time and (profiled pass) its cProfile / torch.profiler data."""

    name: str
    seconds: float
    stats: pstats.Stats | None = None
    torch_ops: list[dict[str, Any]] = field(default_factory=list)
    torch_window: dict[str, float] = field(default_factory=dict)


class _TorchWindow:
    """torch.profiler over iterations [skip, skip + n) of the current training stage, started
    and stopped from a wrapper of ``ciscr.engine.train._one_step`` (the data loading between
    two steps falls inside the window); the step and the rectifier are labelled."""

    def __init__(self, skip: int, n: int, outer: cProfile.Profile | None = None) -> None:
        self.skip, self.n, self.outer = skip, n, outer
        self.paused = 0.0  # seconds spent in torch.profiler's own bookkeeping
        self.calls, self.prof, self.t0 = 0, None, 0.0
        self.ops: list[dict[str, Any]] = []
        self.window: dict[str, float] = {}

    def before_step(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        if self.calls == self.skip:
            with self._outer_paused():
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.calls == self.skip + self.n and self.prof is not None:
            with self._outer_paused():
                self.finish()
        self.calls += 1

    @contextlib.contextmanager
    def _outer_paused(self) -> Iterator[None]:
        """Keep torch.profiler's own start-up and result parsing out of the stage's cProfile."""
        t0 = time.perf_counter()
        if self.outer is not None:
            self.outer.disable()
        try:
            yield
        finally:
            if self.outer is not None:
                self.outer.enable()
            self.paused += time.perf_counter() - t0

    def finish(self) -> None:
        """Stop (at step skip + n + 1, or at the end of a shorter stage) and keep the figures.

        A full window is n whole iterations: n steps and the n batch loads that follow them.
        A stage that ends first leaves a shorter window whose tail holds the stage's final
        evaluation and checkpoint (``complete`` False).
        """
        if self.prof is None:
            return
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        labels = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in ("step", "rectifier")}
        done = self.calls - self.skip
        self.window = {"iterations": done, "complete": done == self.n, "wall_s": wall,
                       "step_s": labels.get("step", 0.0),
                       "rectifier_s": labels.get("rectifier", 0.0)}  # fmt: skip
        rows = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                for e in events if e.key not in ("step", "rectifier")]  # fmt: skip
        self.ops = sorted(rows, key=lambda r: -r["self_s"])[:12]
        self.prof = None


@contextlib.contextmanager
def _patched(module: Any, name: str, wrapper: Callable) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, wrapper(original))
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def instrument(records: list[StageRecord], profiled: bool) -> Iterator[None]:
    """Record every stage call into ``records``; with ``profiled``, under cProfile and (for
    training stages) a torch.profiler window, the train step and the Rectifier call labelled
    for torch.profiler (the step's wrapper also moves the window on)."""
    from torch.profiler import record_function

    import ciscr.engine.train as train
    from ciscr.engine.steps import Rectifier

    state: dict[str, _TorchWindow | None] = {"window": None}

    def stage(namer: Callable[[tuple], str], fn: Callable) -> Callable:
        def run(*args: Any, **kw: Any) -> Any:
            name = namer(args)
            prof = cProfile.Profile() if profiled else None
            train = profiled and name.startswith("stage")
            win = _TorchWindow(*TORCH_WINDOW, outer=prof) if train else None
            state["window"] = win
            t0 = time.perf_counter()
            try:
                with prof or contextlib.nullcontext():
                    return fn(*args, **kw)
            finally:
                # the stage's time without torch.profiler's start-up and parsing
                wall = time.perf_counter() - t0 - (win.paused if win else 0.0)
                if win is not None:
                    win.finish()
                stats = pstats.Stats(prof, stream=io.StringIO()) if prof else None
                records.append(StageRecord(name, wall, stats,
                                           *((win.ops, win.window) if win else ())))
                state["window"] = None

        return run

    def step(fn: Callable) -> Callable:
        def one_step(*args: Any, **kw: Any) -> Any:
            if state["window"] is not None:
                state["window"].before_step()
            with record_function("step"):
                return fn(*args, **kw)

        return one_step

    def rectifier(fn: Callable) -> Callable:
        def call(self: Any, *args: Any, **kw: Any) -> Any:
            with record_function("rectifier"):
                return fn(self, *args, **kw)

        return call

    with contextlib.ExitStack() as stack:
        for mod, attr, namer in STAGE_FUNCTIONS:
            stack.enter_context(_patched(importlib.import_module(mod), attr,
                                         lambda fn, namer=namer: stage(namer, fn)))
        if profiled:
            stack.enter_context(_patched(train, "_one_step", step))
            stack.enter_context(_patched(Rectifier, "__call__", rectifier))
        yield


# --------------------------------------------------------------------------- cProfile categories

Key = tuple[str, int, str]
NEXT: Key = ("~", 0, "<built-in method builtins.next>")  # how cProfile names next()


def code_key(fn: Any, nested: str = "") -> Key | None:
    """The pstats key of a function (or of the function ``nested`` defined inside it)."""
    import inspect

    # unwrap: decorated functions (torch.no_grad) would otherwise give the decorator's code
    code = getattr(inspect.unwrap(getattr(fn, "__func__", fn)), "__code__", None)
    if code is None:
        return None
    if nested:
        inner = [c for c in code.co_consts if getattr(c, "co_name", None) == nested]
        if not inner:
            return None
        code = inner[0]
    return (code.co_filename, code.co_firstlineno, code.co_name)


def edge_seconds(stats: pstats.Stats, callee: Key | None, caller: Key | None = None) -> float:
    """Cumulative seconds of ``callee`` (only the calls made by ``caller`` when given)."""
    entry = stats.stats.get(callee) if callee else None  # type: ignore[attr-defined]
    if entry is None:
        return 0.0
    if caller is None:
        return float(entry[3])
    edge = entry[4].get(caller)
    return float(edge[3]) if edge else 0.0


# What each kind of stage spends its time on: (label, depth, functions). Depth 0 rows are
# disjoint and sum with "other" to the stage's time; depth 1 rows break down the row above
# them. A function is "module:qualname" under ciscr (":qualname/nested" for a function defined
# inside it, "next()" for the builtin), its cumulative time counted; "callee < caller" counts
# only the calls made by that caller (none where the caller does not exist).
GET, QP = "engine.train:_EpochIndexed.__getitem__", "engine.steps:Rectifier._query_prototypes"
LOOP = "engine.train:_run_iterations"
LOAD_MODEL = ("load the model", 0, ["run_services:load_stage_model"])
CATEGORIES: dict[str, list[tuple[str, int, list[str]]]] = {
    "training": [
        ("build the student", 0, ["run_services:fresh_model"]),
        ("teacher + prototype bank", 0, ["stage_plans:build_rectifier"]),
        # num_workers=0: the in-process batches only ever serve the training loop;
        # otherwise the loop's next() on the worker loader (evaluation uses a for loop)
        ("train batches: load + augment (main process)", 0,
         ["engine.streams:_InlineBatches.__next__",
          "data.datasets:WorkerSafeLoader.__iter__ < next()"]),
        ("labeled images / pairs", 1, [f"data.datasets:SegDataset.__getitem__ < {GET}",
                                       f"data.pairs:PairDataset.__getitem__ < {GET}"]),
        # read through a ConcatDataset, and only ever by the training loop
        ("unlabeled images + pseudo labels", 1, ["data.datasets:UnlabeledDataset.__getitem__"]),
        ("of which strong augmentation", 1, ["data.transforms:strong_photometric"]),
        ("of which image decoding (every caller)", 1, ["data.io:read_image"]),
        ("batches to device", 0, ["engine.train:_to_device"]),
        ("train step", 0, ["engine.train:_one_step"]),
        ("rectifier (teacher forward, CISC maps)", 1, ["engine.steps:Rectifier.__call__"]),
        ("query mode: teacher on queried images", 1, [QP]),
        # read in a list comprehension: its own frame before Python 3.12, inlined after
        ("query mode: load + augment queried images", 1,
         [f"data.datasets:SegDataset.__getitem__ < {c}" for c in (QP, f"{QP}/<listcomp>")]),
        ("logging (jsonl, TensorBoard)", 0,
         ["engine.train:_Logger.step", "engine.train:_Logger.__init__",
          "engine.train:_Logger.close", f"engine.train:_Logger.record < {LOOP}"]),
        ("checkpoints (save, resume)", 0, ["engine.train:_save", "engine.train:_resume",
                                           f"engine.checkpoint:save_checkpoint < {LOOP}"]),
        ("evaluation", 0, ["run_services:evaluate_model"]),
    ],
    "pseudo-labelling": [
        LOAD_MODEL,
        ("pseudo_label", 0, ["pseudo:pseudo_label"]),
        ("read + normalise images", 1, ["pseudo:load_eval_image"]),
        ("TTA forward passes", 1, ["engine.evaluate:predict_logits"]),
        ("write label PNGs", 1, ["data.io:save_mask_png"]),
        ("score against ground truth", 1, ["data.io:read_mask < pseudo:_label_part",
                                           "engine.evaluate:ConfusionMatrix.update < "
                                           "pseudo:_label_part"]),
    ],
    "selection": [
        LOAD_MODEL,
        ("labeled prototypes (anchors)", 0, ["selection:compute_labeled_prototypes"]),
        ("labeled distances (query lists)", 0,
         ["selection:image_distances < pipeline:selection_stage"]),
        ("unlabeled distances (halves)", 0,
         ["selection:image_distances < pipeline:_split_unlabeled", "selection:crop_level_scores",
          "selection:stability_scores"]),
        ("per-image mIoU (AS query lists)", 0, ["selection:per_image_miou"]),
        ("write selection files", 0,
         ["selection:write_selection", "pipeline:_write_half_quality"]),
        ("of which image reading (every caller)", 1, ["pseudo:load_eval_image"]),
        ("of which teacher forward passes", 1, ["selection:_features"]),
        ("of which Eq. 10 distances", 1, ["cisc:anchor_distance"]),
    ],
    "report": [(f"section {n}", 0, [f"report:_section_{n}"]) for n in (
        "header", "curves", "iou", "pseudo_quality", "selection", "time", "cisc", "labels",
        "predictions")],
    "setup": [("load the dataset lists", 0, ["data.formats:load_dataset"]),
              ("decode + check every image and mask", 0, ["data.check:validate_samples"])],
}  # fmt: skip


def _key_of(where: str) -> Key | None:
    """The pstats key of a function named as in :data:`CATEGORIES`."""
    if where == "next()":
        return NEXT
    path, _, nested = where.partition("/")
    module, _, qualname = path.partition(":")
    obj = importlib.import_module(f"ciscr.{module}")
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return code_key(obj, nested)


def breakdown(rec: StageRecord) -> list[dict[str, Any]]:
    """Seconds per category of one profiled stage, then "other" (the rest of the stage)."""
    if rec.stats is None:
        return []
    rows, top = [], 0.0
    for label, depth, functions in CATEGORIES[rec.name if rec.name in ("setup", "report")
                                              else stage_kind(rec.name)]:
        sec = 0.0
        for f in functions:
            callee, by, caller = f.partition(" < ")
            caller_key = _key_of(caller) if by else None
            if caller_key is not None or not by:  # a caller that does not exist makes no calls
                sec += edge_seconds(rec.stats, _key_of(callee), caller_key)
        top += sec if depth == 0 else 0.0
        rows.append({"label": label, "depth": depth, "seconds": sec})
    rows.append({"label": "other", "depth": 0, "seconds": max(0.0, rec.seconds - top)})
    return rows


def top_functions(stats: pstats.Stats, n: int = 10, ciscr: bool = False) -> list[dict[str, Any]]:
    """The ``n`` functions with the most own time (``tottime``), any module; with ``ciscr``,
    the ``n`` ciscr functions with the most cumulative time: what "other" is made of."""
    rows = []
    for (path, line, name), (_cc, calls, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if ciscr and (f"{os.sep}ciscr{os.sep}" not in path or path.endswith("profiling.py")):
            continue
        where = name if path == "~" else f"{_short(path)}:{line}({name})"
        rows.append({"function": where, "calls": calls, "own_s": tt, "cumulative_s": ct})
    return sorted(rows, key=lambda r: -r["cumulative_s" if ciscr else "own_s"])[:n]


def _short(path: str) -> str:
    """A readable path: from the package folder on (ciscr/..., torch/...)."""
    parts = Path(path).parts
    for anchor in ("ciscr", "torch", "kornia", "PIL", "numpy", "tqdm", "tensorboard"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) :])
    return Path(path).name


# --------------------------------------------------------------------------- the runs


def run_method(cfg: Any, out: Path, profiled: bool) -> list[StageRecord]:
    """One ``ciscr run`` of ``cfg`` into ``out`` (must not exist), instrumented; its printed
    summary is swallowed (the profile prints its own)."""
    from ciscr.runner import run_training

    records: list[StageRecord] = []
    with instrument(records, profiled), contextlib.redirect_stdout(io.StringIO()):
        run_training(cfg, out)
    return records


def method_config(config: str, method: str, overrides: Sequence[str]) -> Any:
    """The config of one method: the user's config and overrides with ``method.name``; a
    CISC-R variant other than the config's own gets its preset's recipe, ST gets
    :data:`SAME_SETTINGS`."""
    from ciscr.config import load_config, preset_overrides

    preset = [] if method in SAME_SETTINGS else preset_overrides(method, config)
    return load_config(config, [f"method.name={method}", *preset,
                                *SAME_SETTINGS.get(method, []), *overrides,
                                "train.progress=false"])


def timed_rows(run_dir: Path, records: Sequence[StageRecord]) -> list[dict[str, Any]]:
    """The timed pass of one method: done.json rows, plus setup and report from the wrappers."""
    by = {r.name: r.seconds for r in records}
    return [*stage_time_rows(run_dir), *({"stage": n, "kind": n, "seconds": {}, "total": by[n]}
                                         for n in ("setup", "report") if n in by)]


def profile_runs(config: str, overrides: Sequence[str], methods: Sequence[str], work: Path,
                 passes: Sequence[str], repeats: int = 1) -> dict[str, Any]:
    """Both passes for every method (see the module docstring); returns the JSON result:
    ``timed`` (the first timed round), ``timed_more`` (the other ``repeats - 1``) and
    ``profiled``. A timed round runs the methods in turn and, when ST and another method are
    asked for, ST once more at the end (``st_end``): the CISC-R runs are bracketed by two ST
    runs, which cancels a drift of the machine's speed over the round, and the two ST runs,
    the same work, show how much the machine's speed moved (:func:`noise_control`)."""
    out: dict[str, Any] = {"timed": {}, "timed_more": [], "profiled": {}}
    cfgs = {m: method_config(config, m, overrides) for m in methods}
    paired = "st" in methods and len(methods) > 1
    for r in range(repeats if "timed" in passes else 0):
        rnd = {}
        for method in [*methods, *([ST_END] if paired else [])]:
            run_dir = work / f"{method}-timed{r or ''}"
            cfg = cfgs["st" if method == ST_END else method]
            rnd[method] = timed_rows(run_dir, run_method(cfg, run_dir, False))
        if r:
            out["timed_more"].append(rnd)
        else:
            out["timed"] = rnd
    if "interleaved" in passes and paired:  # over the first timed round's runs
        from ciscr.timing.steptime import interleaved_pass

        out["interleaved"] = interleaved_pass({m: (c, work / f"{m}-timed") for m, c in cfgs.items()})
    for method in methods if "profiled" in passes else ():
        out["profiled"][method] = [
            {"stage": rec.name, "seconds": rec.seconds, "categories": breakdown(rec),
             "top_functions": top_functions(rec.stats),
             "top_ciscr_cumulative": top_functions(rec.stats, 12, ciscr=True),
             "torch_window": rec.torch_window, "torch_ops": rec.torch_ops}
            for rec in run_method(cfgs[method], work / f"{method}-profiled", True)]  # fmt: skip
    return out


# --------------------------------------------------------------------------- comparison, targets

# Which ST stage a CISC-R stage is compared with: ST (retrain=one) has one retraining stage.
ST_PARTNER = {"stage1": "stage1", "stage2": "stage2", "stage3": "stage2"}
CISCR_METHODS = ("ciscr", "ciscr_bank")  # the CISC-R variants whose stages are compared with ST
ST_END = "st_end"  # ST run again at the end of every timed round: the A/A control
# The A/A control's largest |end / start - 1| for which the targets are judged. On a shared
# (virtual) machine the same work can run markedly slower a few minutes later (the A/A table
# of docs/results/profile_cpu.md); a 15 % target cannot be read through that, and the targets
# then say "inconclusive" instead of PASS or FAIL.
NOISE_LIMIT = 0.10
# The stages whose ratio is a target. ciscr's CISC-R is the bank mode (the default of every
# config). The paper's query mode runs the teacher on a queried labeled batch as well in
# stages 2-3, by design (METHOD.md 7: about 1.7x ST's compute), so those rows are shown but
# are not targets; its stage 1 (the paper's L_CISC on labeled pairs) is the same step in both
# modes, so it is one.
TARGET_STAGES = {"ciscr_bank": ("stage1", "stage2", "stage3"), "ciscr": ("stage1",)}
Timed = dict[str, list[dict[str, Any]]]  # one timed round: method -> its stage rows


def _per_iteration(row: dict[str, Any]) -> float | None:
    """Training seconds / iterations (checkpoints and per-epoch evaluations included)."""
    it, train = row.get("iterations"), row["seconds"].get("training")
    return train / it if it and train is not None else None


def _step_seconds(row: dict[str, Any]) -> float | None:
    """The median step time of the stage's log (batch + step only), else :func:`_per_iteration`
    (runs logged before ``step_seconds`` existed)."""
    return row.get("step_median") or _per_iteration(row)


def _st_seconds(timed: Timed, stage: str) -> float | None:
    """ST's step time of ``stage`` in a round: the mean of its runs at the start and the end
    of the round (the start's alone when the round has no ``st_end``)."""
    xs = [_step_seconds(r) for m in ("st", ST_END) for r in timed.get(m, []) if r["stage"] == stage]
    xs = [x for x in xs if x]
    return sum(xs) / len(xs) if xs else None


def _round_ratios(timed: Timed) -> dict[tuple[str, str], tuple]:
    """{(CISC-R variant, stage): (ST stage, CISC-R s, ST s, ratio)} of one timed round."""
    st_stages = {r["stage"] for r in timed.get("st", [])}
    out = {}
    for method in CISCR_METHODS:
        for r in timed.get(method, []):
            partner = ST_PARTNER.get(r["stage"], "")
            if r["kind"] == "training" and partner in st_stages:
                a, b = _step_seconds(r), _st_seconds(timed, partner)
                out[method, r["stage"]] = (partner, a, b, a / b if a and b else None)
    return out


def noise_control(timed: Timed, more: Sequence[Timed] = ()) -> dict[str, Any] | None:
    """The A/A control: ST's step time at the end of each round / at its start, per training
    stage (the same work twice). ``deviation`` = the largest |ratio - 1| over the rounds and
    stages; None without ``st_end`` runs."""
    ratios: dict[str, list[float]] = {}
    for rnd in (timed, *more):
        start = {r["stage"]: _step_seconds(r) for r in rnd.get("st", [])}
        for r in rnd.get(ST_END, []):
            a, b = _step_seconds(r), start.get(r["stage"])
            if r["kind"] == "training" and a and b:
                ratios.setdefault(r["stage"], []).append(a / b)
    if not ratios:
        return None
    dev = max(abs(x - 1) for xs in ratios.values() for x in xs)
    return {"ratios": ratios, "deviation": dev, "limit": NOISE_LIMIT, "quiet": dev <= NOISE_LIMIT}


def compare_stages(timed: Timed, more: Sequence[Timed] = ()) -> list[dict[str, Any]]:
    """CISC-R training stages vs ST's at the same settings, for each CISC-R variant that was
    run: seconds per step (:func:`_step_seconds`) of each, and their ratio; with further timed
    rounds (``more``), ``ratio`` is the median of the rounds' ratios (``ratios`` lists them)."""
    rounds = [_round_ratios(t) for t in (timed, *more)]
    out = []
    for key, (st_stage, a, b, _) in rounds[0].items():
        ratios = [rd[key][3] for rd in rounds if key in rd and rd[key][3] is not None]
        out.append({"method": key[0], "stage": key[1], "st_stage": st_stage,
                    "ciscr_s_per_it": a, "st_s_per_it": b, "ratios": ratios,
                    "ratio": statistics.median(ratios) if ratios else None})  # fmt: skip
    return out


def compare_interleaved(inter: dict[str, Any]) -> list[dict[str, Any]]:
    """CISC-R training stages vs ST's in the interleaved pass: median seconds per step of each
    and the median over rounds of their ratio within a round; the A/A row (ST's stage 2
    against a second plan of itself) first."""
    from ciscr.timing.steptime import AA_KEY, paired_ratio

    times, out = inter["times"], []
    pairs = [(AA_KEY, "st stage2")] + [
        (key, f"st {ST_PARTNER[key.split()[1]]}") for key in times
        if key.split()[0] in CISCR_METHODS and key.split()[1] in ST_PARTNER]  # fmt: skip
    for key, st_key in pairs:
        if key in times and st_key in times:
            out.append({"key": key, "st_key": st_key,
                        "s_per_step": statistics.median(times[key]),
                        "st_s_per_step": statistics.median(times[st_key]),
                        "ratio": paired_ratio(times[key], times[st_key])})
    return out


def targets(timed: Timed, more: Sequence[Timed] = (),
            inter: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The issue's targets, per CISC-R variant: every training stage <= 1.15x ST's, and
    pseudo-labelling (pseudo0, pseudo1) + selection < one training stage (the mean of its
    training stages' training seconds; first timed round). A stage is judged on the
    interleaved pass when there is one (``value``; the timed ratio is ``timed``), else on the
    timed pass (:func:`compare_stages`), inconclusive when its A/A control is over the limit."""
    noise = noise_control(timed, more)
    judged = inter or noise is None or noise["quiet"]
    paired = {c["key"]: c["ratio"] for c in (compare_interleaved(inter) if inter else [])}
    out = []
    for c in compare_stages(timed, more):
        if c["stage"] in TARGET_STAGES[c["method"]]:
            value = paired.get(f"{c['method']} {c['stage']}") if inter else c["ratio"]
            ok = value is not None and value <= STAGE_TARGET
            out.append({"target": f"{c['method']} {c['stage']} / ST {c['st_stage']} (s per step)",
                        "value": value, "timed": c["ratio"], "limit": f"<= {STAGE_TARGET:.2f}",
                        "pass": ok if judged else None})  # fmt: skip
    for method in CISCR_METHODS:
        rows = timed.get(method, [])
        train = [r["seconds"]["training"] for r in rows if r["kind"] == "training"]
        side = sum(r["total"] for r in rows if r["stage"] in ("pseudo0", "selection", "pseudo1"))
        if train:
            mean = sum(train) / len(train)
            out.append({"target": f"{method} pseudo0 + selection + pseudo1 / mean training "
                                  "stage", "value": side / mean, "limit": "< 1.00",
                        "pass": side < mean})  # fmt: skip
    return out


# --------------------------------------------------------------------------- report


def _header(res: dict[str, Any]) -> list[str]:
    m = res["machine"]
    busy, note = load_noise(m, "", f"{m['threads']} torch threads")
    note += " Rerun the same command on a quiet machine for final figures." if busy else ""
    return header(res, f"ciscr profile: {m['cpu']} ({m['cores']} cores, {m['threads']} torch "
                  "threads)", note, False, [
        f"- device: {m['device']}; train.amp {res['amp']} (resolved: {res['amp_resolved']})",
        f"- config: `{res['config']}` with `{' '.join(res['overrides']) or '(no overrides)'}`;"
        f" methods {', '.join(res['methods'])}; wall time {res['wall_s']:.0f} s"])  # fmt: skip


def _timed_table(res: dict[str, Any]) -> list[str]:
    by = {m: {r["stage"]: r for r in rows} for m, rows in res["timed"].items()}
    stages = [s for s in ("setup", *STAGE_ORDER, "report") if any(s in b for b in by.values())]

    def cells(r: dict[str, Any] | None) -> list[str]:  # total s, eval s, s/it, step s
        return ["-"] * 4 if r is None else [
            fmt(r["total"], ".1f"), fmt(r["seconds"].get("evaluation"), ".1f"),
            fmt(_per_iteration(r)), fmt(r.get("step_median"))]  # fmt: skip

    body = [[s, *(c for m in by for c in cells(by[m].get(s)))] for s in stages]
    total = [c for rows in res["timed"].values()
             for c in (fmt(sum(r["total"] for r in rows), ".1f"), "", "", "")]  # fmt: skip
    head = ["stage", *(f"{m} {c}" for m in by for c in ("total s", "eval s", "s/it", "step s"))]
    return md_table(head, [*body, ["total", *total]])


def _category_table(stages: list[dict[str, Any]]) -> list[str]:
    """One column per stage of the same kind; seconds and share of the stage."""
    head = ["", *(f"{s['stage']} s" for s in stages), *(f"{s['stage']} %" for s in stages)]
    body = []
    for i, c in enumerate(stages[0]["categories"]):
        secs = [s["categories"][i]["seconds"] for s in stages]
        shares = [x / s["seconds"] if s["seconds"] else 0 for x, s in zip(secs, stages,
                                                                            strict=True)]
        body.append([("- " if c["depth"] else "") + c["label"], *(fmt(x, ".2f") for x in secs),
                     *(f"{x:.0%}" for x in shares)])
    body.append(["stage total", *(fmt(s["seconds"], ".2f") for s in stages),
                 *("100%" for _ in stages)])
    return md_table(head, body)


def _profiled_sections(method: str, stages: list[dict[str, Any]]) -> list[str]:
    out = []
    groups = {"training stages": [s for s in stages if s["stage"].startswith("stage")],
              "pseudo-labelling": [s for s in stages if s["stage"].startswith("pseudo")]}
    groups.update({s["stage"]: [s] for s in stages
                   if s["stage"] in ("selection", "setup", "report")})
    for title, group in groups.items():
        if group:
            out += ["", f"### {method}: {title} (cProfile, seconds per category)", "",
                    *_category_table(group)]
    for s in stages:
        w = s.get("torch_window") or {}
        if s["torch_ops"]:
            out += ["", f"### {method} {s['stage']}: torch.profiler over {w.get('iterations')} "
                    f"iterations ({w.get('wall_s', 0):.2f} s; labelled step "
                    f"{w.get('step_s', 0):.2f} s, of which rectifier {w.get('rectifier_s', 0):.2f}"
                    " s)", "", *table(s["torch_ops"][:8], [("op", "op", ""),
                                      ("self CPU s", "self_s", ".3f"), ("calls", "calls", "")])]
    for s in stages:
        if s["stage"] not in ("setup", "report"):
            out += ["", f"### {method} {s['stage']}: functions with the most own time", "",
                    *table(s["top_functions"][:6], [
                        ("function", "function", ""), ("calls", "calls", ""),
                        ("own s", "own_s", ".3f"), ("cumulative s", "cumulative_s", ".3f")])]
    return out


HOW = """\
## How it is measured

- Timed pass: `ciscr run` of each method into a scratch folder, no profiler. Stage times are
  the runs' own records (`wall_seconds`, `eval_seconds` in each stage's `done.json`: the
  figures `report.html` shows); `setup` (dataset lists and image checks) and `report`
  (report.html) are timed around their calls. `s/it` = training seconds (the final
  evaluation excluded) / iterations. `step s` = the median over the stage's log records of
  `step_seconds` (mean time of loading a batch and training on it since the previous record;
  checkpoints and evaluations excluded): the median shrugs off a moment when another process
  took the cores, and the targets compare it. CISC-R's stage 3 is compared with ST's stage 2
  (ST retrains once), with the same iterations and batch sizes. With `--repeats N` the timed
  pass runs N rounds (every method once per round, in turn) and a ratio is the median of the
  rounds' ratios.
- A/A control: with ST and another method, every timed round ends with ST again (`st_end`);
  a CISC-R stage is compared with the mean of the two ST runs that bracket it, and the two ST
  runs' ratio shows how much the machine's speed moved during the round. Over
  the limit the stage targets are inconclusive: on a shared virtual machine the same step can
  run markedly slower a few minutes later.
- Interleaved pass (`ciscr/timing/steptime.py`): the training stages of the first timed round's runs
  planned again by the pipeline's own functions (same streams, step, teacher, bank, optimiser
  settings) and trained side by side in one process, a block of steps each in turn; a drift of
  the machine's speed hits every stage of a round alike, so the ratio (median over rounds of
  the ratio within a round) resolves a few per cent where the timed pass's runs, minutes
  apart, cannot. The stage targets are judged on it when it ran.
- Targets: every stage of CISC-R (bank), ciscr's default, and stage 1 of the paper's query
  mode (`ciscr`: its L_CISC step is the bank's when `method.stage1_cisc_loss` is on). The query
  mode's stages 2-3 run the teacher on a queried labeled batch too (METHOD.md 7): shown, not
  targets.
- Profiled pass: the same runs again, each stage under its own `cProfile` profile; a category
  is the cumulative time of the functions that do that work (named in `ciscr/timing/profiling.py`),
  `- ` rows break down the row above them, and `other` is the rest of the stage. cProfile
  slows Python-heavy code (data loading) more than torch kernels, so read shares here and
  absolute times in the timed pass.
- torch.profiler: iterations 6-15 of each training stage (fewer if the stage is shorter, then
  with its final evaluation), ops by self CPU time; `step` and `rectifier` are labelled.
"""


def _noise_section(noise: dict[str, Any] | None) -> list[str]:
    if noise is None:
        return []
    verdict = ("within the limit: the targets are judged" if noise["quiet"] else
               "OVER the limit: the machine's speed moved more than the targets' margin, so "
               "the stage targets are INCONCLUSIVE (rerun on a quiet machine)")
    return ["", "A/A control: ST run again at the end of each round, the same work as at its "
            f"start (end / start step time). Largest deviation {noise['deviation']:.2f}, limit "
            f"{noise['limit']:.2f}: {verdict}.", "",
            *table(list(noise["ratios"].items()), [
                ("ST stage", lambda r: r[0], ""),
                ("end / start per round", lambda r: " ".join(fmt(x, ".2f") for x in r[1]), "")])]


def _targets_section(tg: list[dict[str, Any]]) -> list[str]:
    if not tg:
        return []
    result = {True: "PASS", False: "FAIL", None: "INCONCLUSIVE"}
    n_pass, n_open = sum(t["pass"] is True for t in tg), sum(t["pass"] is None for t in tg)
    return ["", f"## Targets: {n_pass} of {len(tg)} pass"
            + (f", {n_open} inconclusive" if n_open else ""), "",
            "A stage is judged on the interleaved pass when it ran (`value`), else on the timed "
            "pass; `timed` is the timed pass's ratio.", "",
            *table(tg, [("target", "target", ""), ("value", "value", ".2f"),
                        ("timed", "timed", ".2f"), ("limit", "limit", ""),
                        ("result", lambda t: result[t["pass"]], "")])]


def _interleaved_section(inter: dict[str, Any] | None) -> list[str]:
    if not inter:
        return []
    return ["", "## Stage steps side by side (interleaved pass)", "",
            f"Every training stage of the timed runs planned again and trained in turn, "
            f"{inter['block']} steps (batch loading included) a round, {inter['rounds']} rounds "
            f"after {inter['warmup']} warm-up round(s); a ratio is the median over the rounds "
            "of the ratio within a round. The first row is the A/A control: ST's stage 2 "
            "against a second plan of itself (the resolution of this measurement).", "",
            *table(compare_interleaved(inter), [
                ("stage", "key", ""), ("vs", "st_key", ""), ("s per step", "s_per_step", ".4f"),
                ("vs s per step", "st_s_per_step", ".4f"), ("ratio", "ratio", ".2f")])]


def format_report(res: dict[str, Any]) -> str:
    """The markdown report (also printed)."""
    out = _header(res)
    if res["timed"]:
        out += ["", "## Time per stage (timed pass)", "", *_timed_table(res)]
        more = res.get("timed_more", [])
        comp = compare_stages(res["timed"], more)
        if comp:
            out += ["", f"CISC-R training stages vs ST (median seconds per step; {1 + len(more)}"
                    " timed round(s), the ratio is the median of the rounds'):", "",
                    *table(comp, [
                        ("CISC-R stage", lambda c: f"{c['method']} {c['stage']}", ""),
                        ("ST stage", "st_stage", ""), ("CISC-R step s", "ciscr_s_per_it", ".4f"),
                        ("ST step s", "st_s_per_it", ".4f"),
                        ("ratio per round", lambda c: " ".join(fmt(x, ".2f") for x in c["ratios"]),
                         ""), ("ratio", "ratio", ".2f")])]  # fmt: skip
        out += _noise_section(noise_control(res["timed"], more))
        out += _interleaved_section(res.get("interleaved"))
        out += _targets_section(targets(res["timed"], more, res.get("interleaved")))
    if res["profiled"]:
        out += ["", "## Where the time goes (profiled pass)"]
        for method, stages in res["profiled"].items():
            out += _profiled_sections(method, stages)
    return "\n".join([*out, "", HOW])


# --------------------------------------------------------------------------- CLI

PASSES = ("timed", "interleaved", "profiled")


def run_profile(config: str, overrides: Sequence[str], *, methods: Sequence[str] = METHODS,
                passes: Sequence[str] = PASSES, work: Path | None = None,
                command: str = "", repeats: int = 1) -> dict[str, Any]:
    """Profile ``methods`` on ``config`` (+ ``overrides``); runs go to ``work`` (kept) or to
    a temporary folder (removed). Returns the result (what the JSON file holds)."""
    import torch

    from ciscr.dist import resolve_device
    from ciscr.utils.misc import resolve_amp

    cfg = method_config(config, methods[0], overrides)  # a bad override fails here, before any run
    device = resolve_device(cfg.device)
    with measured(command, device, config=config, overrides=list(overrides),
                  methods=list(methods), passes=list(passes), amp=cfg.train.amp,
                  amp_resolved=resolve_amp(cfg.train.amp, device),
                  threads=torch.get_num_threads()) as res:  # fmt: skip
        tmp = None if work is not None else Path(tempfile.mkdtemp(prefix="ciscr-profile-"))
        try:
            res.update(profile_runs(config, overrides, methods, work or tmp, passes, repeats))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return res


def cmd_profile(args: argparse.Namespace) -> int:
    """``ciscr profile``: run, print the report, write it under ``--out`` if given."""
    import torch

    methods = comma_list(args.methods, "--methods",
                         ("suponly", "st", "stpp", "ciscr", "ciscr_bank"))
    passes = comma_list(args.passes, "--passes", PASSES)
    if "interleaved" in passes and "timed" not in passes:
        raise ConfigError(f"--passes {args.passes}: interleaved times the stages of the timed "
                          "runs; add timed")
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        raise ConfigError(f"--work {args.work}: exists and is not empty; profiles need new runs")
    at_least(args, {"threads": 0, "repeats": 1})
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["ciscr", "profile", args.config, *args.overrides, "--methods",
                          args.methods, "--passes", args.passes,
                          *spelled(args, {"threads": 0, "repeats": 1}),
                          *(["--out", str(args.out), "--name", args.name] if args.out else [])])
    res = run_profile(args.config, list(args.overrides), methods=methods, passes=passes,
                      work=args.work, command=command, repeats=args.repeats)
    return print_and_write(res, format_report(res), args.out, args.name)


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``ciscr profile`` to the CLI (called by ciscr.cli while it builds its parser)."""
    from ciscr.commands import command

    p = sub.add_parser(
        "profile",
        help="where a run's time goes: ST vs CISC-R stage by stage, cProfile, torch.profiler",
        description="Runs each method on CONFIG (default synthetic) timed, times the training "
        "stages of those runs side by side in one process (interleaved), and runs each again "
        "under cProfile / torch.profiler; prints the time per stage, the targets and a "
        "breakdown per stage, and (with --out) writes NAME.md and NAME.json.",
    )
    p.add_argument("config", nargs="?", default="synthetic", help="config (default synthetic)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default st,ciscr)")
    p.add_argument("--passes", default=",".join(PASSES),
                   help="timed,interleaved,profiled (default all three)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed rounds (default 1); ratios are the median over rounds")
    p.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="write NAME.md / NAME.json here")
    p.add_argument("--name", default="profile_cpu", help="file name stem (default profile_cpu)")
    command("profile")(cmd_profile)


__all__ = [
    "breakdown", "cmd_profile", "compare_stages", "edge_seconds", "format_report", "instrument",
    "register_cli", "run_profile", "targets",
]
