"""The CamVid protocol-3 report (``benchmarks/camvid.py``): each finished run's figures read
from its own artefacts, the diagnostics computed once per run, and the markdown + JSON.

Nothing here trains; every figure is read from a run directory (live or archived) or computed
from its checkpoint (BN recalibration, the CISC diagnostic), never typed in.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ciscr.utils.io import atomic_write_bytes, atomic_write_json, read_jsonl

TRAIN_STAGES = ("stage1", "stage2", "stage3", "online")


def read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------- diagnostics


def after_run(rd: Path, row: str) -> None:
    """The diagnostics of a finished run (no training; cached in the run directory): BN
    recalibration of its final model; the CISC-weight diagnostic of CISC-R's selection and the
    class-by-class quality of its pseudo0 labels."""
    if not (rd / "results.json").exists():
        return
    bn_recalibration(rd)
    if row == "ciscr" and (rd / "selection" / "done.json").exists():
        import camvid_diagnostics

        camvid_diagnostics.cached(rd)  # RUN/diagnostics.json
    if row == "ciscr" and (rd / "pseudo0" / "done.json").exists():
        import camvid_pool_labels

        camvid_pool_labels.cached(rd)  # RUN/pool_labels.json


def bn_recalibration(rd: Path) -> None:
    """Recompute the final model's BatchNorm statistics from the CLEAN labeled images (no
    augmentation, training mode, cumulative average) and re-evaluate: does BN mixing clean and
    strongly augmented crops cost accuracy? Cached in RUN/bn_recalibration.json."""
    res = read(rd / "results.json")
    if res is None or (rd / "bn_recalibration.json").exists():
        return
    import torch

    from ciscr.config import load_config
    from ciscr.pseudo import load_eval_image
    from ciscr.run_services import evaluate_model, load_stage_model
    from ciscr.run_setup import setup_run

    cfg = load_config(rd / "config.yaml", ["train.progress=false"])
    ctx = setup_run(cfg, rd, torch.device("cpu"))
    model = load_stage_model(ctx, rd / res["final_stage"])
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative: every labeled image counts the same
    model.train()
    with torch.no_grad():
        for s in ctx.labeled:
            x = load_eval_image(s, cfg.data.mean, cfg.data.std, ctx.device)
            model(torch.cat([x, x.flip(-1)]))  # BN in training mode needs 2 values per channel
    after = evaluate_model(ctx, model.eval())["miou"]
    atomic_write_json(rd / "bn_recalibration.json",
                      {"before": res["final_metrics"]["miou"], "after": after})


# --------------------------------------------------------------------------- collecting


def online_curve(rd: Path) -> dict[str, Any] | None:
    """Mask ratio / online pseudo-label accuracy at 10 %, 50 % and 100 % of training."""
    path = rd / "online" / "train.jsonl"
    recs = [r for r in read_jsonl(path) if "mask_ratio" in r] if path.exists() else []
    if not recs:
        return None
    pick = {f"{p}%": recs[min(len(recs) - 1, max(0, round(p / 100 * len(recs)) - 1))]
            for p in (10, 50, 100)}
    return {k: {m: r.get(m) for m in ("mask_ratio", "pseudo_acc")} for k, r in pick.items()}


def training_cost(rd: Path, stages: list[str]) -> dict[str, float]:
    """Iterations of the run's own training stages (their train.jsonl) and the median seconds
    of a logged step (``step_seconds``: training alone, the seconds of one step)."""
    its, steps = 0, []
    for st in stages:
        path = rd / st / "train.jsonl"
        if st not in TRAIN_STAGES or not path.exists() or (rd / st / "copied_from.txt").exists():
            continue
        rows = read_jsonl(path)
        its += int(rows[-1]["iteration"]) if rows else 0
        steps += [r["step_seconds"] for r in rows if "step_seconds" in r]
    return {"iterations": its, "s_per_iteration": statistics.median(steps) if steps else None}


def collect(rd: Path | None, row: str, seed: int) -> dict[str, Any] | None:
    """One finished run's figures (None when not finished). ``wall_seconds``: what the row's
    own invocations took (wall.json; stages copied from another row are not in it)."""
    if rd is None:
        return None
    res = read(rd / "results.json")
    cfg = read_yaml(rd / "config.yaml")
    final, stages = res["final_metrics"], res["stages"]
    half = read(rd / "selection" / "half_quality.json")
    own = read(rd / "wall.json") or {}
    return {
        "row": row, "seed": seed, "labeled": cfg.get("data", {}).get("labeled"),
        "val_miou": final["miou"], "iou": final["iou"], "class_names": final.get("class_names"),
        "start": res.get("start"), "gain_over_start": res.get("gain_over_start"),
        "pseudo_before": (stages.get("pseudo0") or {}).get("pseudo_miou"),
        "pseudo_after": (stages.get("pseudo_final") or {}).get("pseudo_miou"),
        "half_quality": {k: (v or {}).get("miou") for k, v in (half or {}).items()} or None,
        **training_cost(rd, list(stages)),
        "wall_seconds": own.get("seconds"), "cpu_seconds": own.get("cpu_seconds"),
        "online": online_curve(rd), "bn_recalibrated": read(rd / "bn_recalibration.json"),
        "stage_val_miou": {k: v.get("val_miou") for k, v in stages.items()
                           if v and v.get("val_miou") is not None},
        "run_dir": str(rd),
    }


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------- tables


def fmt(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def paired(xs: list[float | None], ref: list[float | None]) -> tuple[float | None, str]:
    """(mean of x - ref over the seeds both have, as text '± SE (n)'), in mIoU points."""
    d = [100 * (x - r) for x, r in zip(xs, ref, strict=True) if x is not None and r is not None]
    if not d:
        return None, "n/a"
    if len(d) == 1:
        return d[0], f"{d[0]:+.2f} (n=1)"
    se = statistics.stdev(d) / len(d) ** 0.5
    return statistics.fmean(d), f"{statistics.fmean(d):+.2f} ± {se:.2f} (n={len(d)})"


def values(runs: dict, row: str, seeds: list[int], key: str = "val_miou") -> list[Any]:
    return [(runs.get((row, s)) or {}).get(key) for s in seeds]


def table_main(runs: dict, rows: list[str], seeds: list[int], labels: dict[str, str],
               control: str, base: str) -> list[str]:
    out = ["| method | val mIoU (%), mean ± std | per seed | minus the control (paired ± SE) "
           "| minus the base (paired ± SE) |", "|---|---|---|---|---|"]
    for r in rows:
        xs = values(runs, r, seeds)
        got = [x for x in xs if x is not None]
        if not got:
            out.append(f"| {labels[r]} | not finished | | | |")
            continue
        sd = statistics.stdev(got) if len(got) > 1 else None
        each = " / ".join("-" if x is None else f"{100 * x:.2f}" for x in xs)
        vs_c = paired(xs, values(runs, control, seeds))[1] if r not in (control, base) else ""
        vs_b = paired(xs, values(runs, base, seeds))[1] if r != base else ""
        out.append(f"| {labels[r]} | {fmt(statistics.fmean(got), sd)} (n={len(got)}) | {each} "
                   f"| {vs_c} | {vs_b} |")
    return out


def table_cost(runs: dict, rows: list[str], seeds: list[int], labels: dict[str, str]) -> list[str]:
    out = ["| method | training iterations | s / iteration (median logged step) | wall minutes "
           "(its own invocations) | CPU minutes |", "|---|---|---|---|---|"]
    for r in rows:
        got = [runs[(r, s)] for s in seeds if runs.get((r, s))]
        if not got:
            continue

        def mean(key: str, scale: float = 1.0, fmt_: str = "{:.0f}", got=got) -> str:
            xs = [g[key] for g in got if g.get(key) is not None]
            return fmt_.format(statistics.fmean(xs) / scale) if xs else "n/a"

        out.append(f"| {labels[r]} | {mean('iterations')} | {mean('s_per_iteration', 1, '{:.2f}')}"
                   f" | {mean('wall_seconds', 60, '{:.1f}')} | {mean('cpu_seconds', 60, '{:.1f}')} |")
    return out


def table_per_class(runs: dict, rows: list[str], seeds: list[int],
                    labels: dict[str, str]) -> list[str]:
    names = next((r["class_names"] for r in runs.values() if r and r["class_names"]), None)
    if not names:
        return ["(no finished run)"]
    out = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        got = [runs[(r, s)] for s in seeds if runs.get((r, s))]
        if got:
            cells = [fmt(statistics.fmean([g["iou"][k] or 0.0 for g in got]))
                     for k in range(len(names))]
            out.append(f"| {labels[r]} | " + " | ".join(cells) + " |")
    return out


def _mean(xs: list[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return statistics.fmean(got) if got else None


def table_pseudo(runs: dict, rows: list[str], seeds: list[int], labels: dict[str, str]) -> list[str]:
    out = ["| method | the base's labels (before) | final model's labels (after) | reliable half "
           "| unreliable half | BN from clean labeled images: before -> after |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        got = [runs[(r, s)] for s in seeds if runs.get((r, s))]
        if not got:
            continue
        halves = [g["half_quality"] or {} for g in got]
        bn = [g["bn_recalibrated"] for g in got if g["bn_recalibrated"]]
        bn_s = (f"{fmt(_mean([b['before'] for b in bn]))} -> {fmt(_mean([b['after'] for b in bn]))}"
                f" (n={len(bn)})" if bn else "n/a")
        out.append(f"| {labels[r]} | {fmt(_mean([g['pseudo_before'] for g in got]))} "
                   f"| {fmt(_mean([g['pseudo_after'] for g in got]))} "
                   f"| {fmt(_mean([h.get('reliable') for h in halves]))} "
                   f"| {fmt(_mean([h.get('unreliable') for h in halves]))} | {bn_s} |")
    return out


def table_online(runs: dict, rows: list[str], seeds: list[int], labels: dict[str, str]) -> list[str]:
    out = ["| method | share of unlabeled pixels used (10 % / 50 % / end of training) "
           "| online pseudo-label accuracy (same points) |", "|---|---|---|"]
    for r in rows:
        curves = [c for s in seeds if runs.get((r, s)) and (c := runs[(r, s)]["online"])]
        if curves:
            cell = [" / ".join(fmt(_mean([c[p][k] for c in curves])) for p in ("10%", "50%", "100%"))
                    for k in ("mask_ratio", "pseudo_acc")]
            out.append(f"| {labels[r]} | {cell[0]} | {cell[1]} |")
    return out


def targets(runs: dict, seeds: list[int], judged: bool,
            labels: dict[str, str] | None = None) -> list[str]:
    """Issue 24's targets on the paired means against the control (never tuned on them)."""
    def best(a: str, b: str) -> list[float | None]:
        return [max((x for x in pair if x is not None), default=None)
                for pair in zip(values(runs, a, seeds), values(runs, b, seeds), strict=True)]

    ctl = values(runs, "suponly_continued", seeds)
    checks = [("the better of UniMatch / UniMatch + CISC >= control + 4",
               best("unimatch", "unimatch_cisc"), ctl, 4.0),
              ("CISC-R (the better of query / bank) >= control + 2",
               best("ciscr", "ciscr_bank"), ctl, 2.0),
              ("CISC-R (the better of query / bank) >= ST++",
               best("ciscr", "ciscr_bank"), values(runs, "stpp", seeds), 0.0),
              ("UniMatch + CISC >= UniMatch", values(runs, "unimatch_cisc", seeds),
               values(runs, "unimatch", seeds), 0.0)]
    checks += [(f"{(labels or {}).get(r, r)} >= control", values(runs, r, seeds), ctl, 0.0)
               for r in ("stpp", "ciscr", "ciscr_bank", "unimatch", "unimatch_cisc")]
    return [f"- {text}: {judge(xs, ref, need, judged, 'overrides')[2]}"
            for text, xs, ref, need in checks]


def judge(xs: list[float | None], ref: list[float | None], need: float, judged: bool,
          why_not: str) -> tuple[float | None, int, str]:
    """(paired mean difference in points, seeds paired, verdict) of the target "xs >= ref +
    need": MET / MISSED over the paired seeds (final at 3), or why it is not judged."""
    d, txt = paired(xs, ref)
    n = sum(x is not None and r is not None for x, r in zip(xs, ref, strict=True))
    if d is None:
        return d, n, "not measured yet"
    if not judged:
        return d, n, f"not judged ({why_not}): {txt}"
    return d, n, f"{'MET' if d >= need else 'MISSED'} ({txt}" + (
        ")" if n >= 3 else f"; {n} of 3 seeds, not final)")


def run_pairs(runs: dict, row: str, ref: str, seeds: list[int]) -> list[tuple[dict, dict]]:
    """(row's record, ref's record) for each seed where both finished."""
    return [(runs[(row, s)], runs[(ref, s)]) for s in seeds
            if runs.get((row, s)) and runs.get((ref, s))]


def class_differences(pairs: list[tuple[dict, dict]]) -> tuple[list[str], list[float]]:
    """(class names, mean over the pairs of row IoU - ref IoU per class, in IoU points)."""
    names = pairs[0][0]["class_names"] or []
    return names, [statistics.fmean(100 * ((a["iou"][k] or 0.0) - (b["iou"][k] or 0.0))
                                    for a, b in pairs) for k in range(len(names))]


def table_option_vs_main(runs: dict, varies: dict[str, str], seeds: list[int],
                         labels: dict[str, str]) -> list[str]:
    """Each option row against the main row whose method it varies (same seed, same base):
    the difference and the classes it moved most, read from the runs' per-class IoU."""
    out = ["| option | the main row it varies | minus that row (paired) | the 3 classes it moved "
           "most (IoU points vs that row) |", "|---|---|---|---|"]
    for opt, main in varies.items():
        pairs = run_pairs(runs, opt, main, seeds)
        if not pairs:
            continue
        d = paired([a["val_miou"] for a, _ in pairs], [m["val_miou"] for _, m in pairs])[1]
        names, per = class_differences(pairs)
        most = sorted(range(len(names)), key=lambda k: -abs(per[k]))[:3]
        out.append(f"| {labels[opt]} | {labels[main]} | {d} | "
                   + ", ".join(f"{names[k]} {per[k]:+.1f}" for k in most) + " |")
    return out if len(out) > 2 else []


def table_where_lost(runs: dict, rows: list[str], seeds: list[int], labels: dict[str, str],
                     control: str) -> list[str]:
    """For each row below the control on the paired mean: the classes where it lost most IoU
    against the control (mean over seeds), read from the runs' per-class IoU."""
    out = ["| method | minus the control | the 3 classes it lost most on (IoU points vs control) |",
           "|---|---|---|"]
    for r in rows:
        pairs = run_pairs(runs, r, control, seeds)
        if not pairs:
            continue
        d = statistics.fmean(100 * (a["val_miou"] - c["val_miou"]) for a, c in pairs)
        if d >= 0:
            continue
        names, per = class_differences(pairs)
        worst = sorted(range(len(names)), key=lambda k: per[k])[:3]
        out.append(f"| {labels[r]} | {d:+.2f} | "
                   + ", ".join(f"{names[k]} {per[k]:+.1f}" for k in worst) + " |")
    return out if len(out) > 2 else ["(no row below the control)"]


def machine() -> str:
    """The CPU, its core count and torch's version: what every figure here is measured on."""
    import torch

    from ciscr.utils.misc import cpu_model_name

    return f"{cpu_model_name()}, {os.cpu_count()} cores, torch {torch.__version__}"


def seed_times(archive_dir: Path) -> list[str]:
    seeds = read(archive_dir / "seeds.json") or {}
    out = []
    for s, rec in sorted(seeds.items()):
        first = datetime.fromisoformat(rec["first_start"])
        last = datetime.fromisoformat(rec["last_finish"])
        out.append(f"- seed {s}: first start {rec['first_start']} -> last finish "
                   f"{rec['last_finish']}: {(last - first).total_seconds() / 60:.0f} min wall "
                   f"({rec['active_seconds'] / 60:.0f} min of benchmark activity over "
                   f"{rec['invocations']} invocation(s))")
    return out or ["- no seed finished a benchmark invocation yet"]


def in_progress(runs_root: Path) -> list[str]:
    """One line per started, unfinished run under runs/: the stage it trains and its
    checkpoint's iteration of the stage's total (what a lost machine would cost)."""
    from ciscr.engine.checkpoint import load_checkpoint

    out = []
    for rd in sorted(p for p in runs_root.glob("*_s*") if p.is_dir()):
        if (rd / "results.json").exists():
            continue
        done = [p.name for p in sorted(rd.iterdir()) if (p / "done.json").exists()]
        busy = [st for st in TRAIN_STAGES
                if (rd / st / "checkpoint.pt").exists() and st not in done]
        where = "no checkpoint yet"
        if busy:
            ck = load_checkpoint(rd / busy[0] / "checkpoint.pt")
            where = f"{busy[0]} at iteration {ck['iteration']}/{ck['total_iters']}"
        out.append(f"- in progress: `{rd.name}`: {where}"
                   + (f" (done: {', '.join(done)})" if done else ""))
    return out


def protocol2_reference(out: Path) -> str:
    """Protocol 2's finished SupOnly s0 (3840 iterations from ImageNet): where the rows stand
    against a supervised run with about twice their compute (its committed record)."""
    rec = read(out / "protocol2" / "camvid.json") or {}
    sup = [r for r in rec.get("runs", []) if r.get("row") == "suponly" and r.get("seed") == 0]
    if not sup:
        return "- reference: protocol 2's SupOnly s0 record not found"
    r = sup[0]
    return (f"- reference (protocol 2, docs/results/protocol2/camvid.md): SupOnly s0 from ImageNet "
            f"for {r.get('iterations')} iterations: {fmt(r['val_miou'])} val mIoU; each row here "
            "trains B + T iterations in all (the base's and its own)")


def write(args: argparse.Namespace, runs: dict, seeds: list[int], opt_seeds: list[int],
          argv: list[str], spec: dict[str, Any]) -> Path:
    """docs/results/<name>.md and .json. ``spec``: labels, main, options, base, control."""
    labels, base, control = spec["labels"], spec["base"], spec["control"]
    rows = [base, *spec["main"]]
    out = Path(args.out)
    cmd = "python benchmarks/camvid.py " + shlex.join(a for a in argv if a != "--report-only")
    missing = [f"{labels[r]} s{s}" for s in seeds for r in rows if not runs.get((r, s))]
    lines = [
        "# CamVid: does semi-supervision pay? (protocol 3: every method from the seed's "
        "supervised base)", "",
        f"- command: `{cmd.strip()}`", f"- machine: {machine()}",
        f"- generated: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from `{args.runs}` and "
        f"the archived artefacts of finished stages in `{args.name}-runs/`",
        f"- runs: {args.jobs} at a time, one torch thread each; the base alone with every core",
        *([f"- OVERRIDES, NOT THE PROTOCOL: {' '.join(args.overrides)}"] if args.overrides else []),
        "- protocol: `configs/camvid.yaml` (its header says why each size); 1/8 labeled (46 "
        "images, the split drawn with the seed), the rest of the 367 train images unlabeled "
        "(their ground truth only scores pseudo labels); val (101) for mIoU; result = the LAST "
        "checkpoint. The base: SupOnly from ImageNet, B iterations; every other row: T "
        "iterations from the base (two-stage methods T/2 per stage).",
        protocol2_reference(out),
        *([f"- NOT FINISHED: {', '.join(missing)}"] if missing else []),
        *in_progress(Path(args.runs)), "",
        "## Targets (paired by seed with SupOnly, continued)", "",
        *targets(runs, seeds, judged=not args.overrides, labels=labels), "",
        "## Validation mIoU", "", *table_main(runs, rows, seeds, labels, control, base), "",
        "## Cost per row and each seed's wall time", "",
        *table_cost(runs, rows, seeds, labels), "", *seed_times(out / f"{args.name}-runs"), "",
        "Wall minutes grow when other processes share the cores; CPU minutes do not. A row that "
        "reuses another's stages (CISC-R bank: CISC-R's pseudo labels and selection; ST++: its "
        "pseudo labels) does not count their time.", "",
        "## Where the rows below the control lose", "",
        *table_where_lost(runs, spec["main"], seeds, labels, control), "",
        "## Per-class IoU (%), mean over seeds", "",
        *table_per_class(runs, rows, seeds, labels), "",
        "## Pseudo-label mIoU (%) of the unlabeled pool, and BatchNorm", "",
        "'before' = TTA labels of the base (the stage-wise rows' pseudo0); 'after' = of the final "
        "model; halves = the base's labels of the reliable / unreliable halves of the row's "
        "selection. Last column: val mIoU of the final model as trained -> with BN statistics "
        "recomputed from the clean labeled images (no training).", "",
        *table_pseudo(runs, rows, seeds, labels), "",
        "## Online methods over training", "",
        *table_online(runs, ["unimatch", "unimatch_cisc", "fixmatch"], seeds + opt_seeds,
                      labels), "",
        *table_diagnostic(runs, seeds), "",
        *table_pool_labels(runs, seeds), "",
        *table_recipe_change(runs, spec, labels, out / RECIPE1), "",
        *(["## Option rows (one seed each)", "",
           *table_main(runs, [control, *spec["options"]], opt_seeds, labels, control, base), "",
           *table_option_vs_main(runs, spec.get("varies", {}), opt_seeds, labels), ""]
          if opt_seeds else []),
        "## Superseded protocols", "",
        "- protocol 2 (each method from ImageNet, 3840-iteration stage 1; one run finished in "
        "eight sessions): docs/results/protocol2/camvid.md",
        "- protocol 1: docs/results/protocol1/camvid.md; the runs lost on 2026-11-30: "
        "docs/results/camvid_superseded_2026-11-30.md",
    ]
    md = out / f"{args.name}.md"
    atomic_write_bytes(md, ("\n".join(lines) + "\n").encode())
    repo = out.resolve().parents[1]
    if not args.overrides and args.name == "camvid" and out.resolve() == repo / "docs/results":
        update_readme(repo / "README.md", headline(runs, seeds, labels, cmd.strip()))
    atomic_write_json(out / f"{args.name}.json", {
        "command": cmd.strip(), "machine": machine(), "overrides": args.overrides,
        "runs": [r for r in runs.values() if r]})
    return md


def table_diagnostic(runs: dict, seeds: list[int]) -> list[str]:
    """The CISC-weight diagnostic (``camvid_diagnostics.py``) of the CISC-R (query) runs."""
    import camvid_diagnostics

    found = [Path(r["run_dir"]) for s in seeds if (r := runs.get(("ciscr", s)))
             and (Path(r["run_dir"]) / "diagnostics.json").exists()]
    head = ["## Diagnostic: does the CISC weight tell right from wrong pseudo labels?", ""]
    if not found:
        return [*head, "(no CISC-R run diagnosed yet)"]
    results = [json.loads((d / "diagnostics.json").read_text()) for d in found]
    return [*head, "Each unlabeled pixel's weight under each signal (the base = the stage-2 "
            "teacher); AUROC = how well it separates correctly from wrongly pseudo-labelled "
            "pixels (the pool's ground truth, never used in training; 0.5 = no information).",
            "", *camvid_diagnostics.markdown(results, found)]


def table_pool_labels(runs: dict, seeds: list[int]) -> list[str]:
    """The base's pseudo labels class by class (``camvid_pool_labels.py``), first seed found."""
    import camvid_pool_labels

    head = ["## Diagnostic: the base's pseudo labels, class by class", ""]
    found = [(s, Path(r["run_dir"])) for s in seeds if (r := runs.get(("ciscr", s)))
             and (Path(r["run_dir"]) / "pool_labels.json").exists()]
    if not found:
        return [*head, "(no CISC-R run diagnosed yet)"]
    seed, rd = found[0]
    return [*head, f"Seed {seed} (`{rd.name}/pseudo0`: the base's TTA labels of the unlabeled "
            "pool, which every stage-wise row trains on), scored with the pool's ground truth "
            "(never used in training). A class labelled below its true share is taught "
            "as another class; the threshold table says what CISC-R's confidence threshold "
            "keeps (`python benchmarks/camvid_pool_labels.py RUN`).", "",
            *camvid_pool_labels.markdown(json.loads((rd / "pool_labels.json").read_text()))]


# The seed-0 report before the recipe change of docs/METHOD-NOTES.md (kept unchanged).
RECIPE1 = "protocol3_recipe1/camvid.json"


def table_recipe_change(runs: dict, spec: dict[str, Any], labels: dict[str, str],
                        before_json: Path) -> list[str]:
    """What the recipe change moved: each row's val mIoU under recipe 1 (the kept record) and
    now, per seed both have; rows the change did not touch are the same run in both."""
    head = ["## What the recipe change moved (docs/METHOD-NOTES.md, 'Recipe changes made from "
            "measurements')", ""]
    before = read(before_json)
    if not before:
        return [*head, f"(no record {before_json.name})"]
    old = {(r["row"], r["seed"]): r for r in before["runs"]}
    rows = ["| method | seed | recipe 1 | now | change | minus the control, now |",
            "|---|---|---|---|---|---|"]
    for row in [*spec["main"], *spec["options"]]:
        for seed in sorted({s for _, s in old}):
            rec, now = old.get((row, seed)), runs.get((row, seed))
            ctrl = runs.get((spec["control"], seed))
            if not rec or not now:
                continue
            diff = 100 * (now["val_miou"] - rec["val_miou"])
            vs = f"{100 * (now['val_miou'] - ctrl['val_miou']):+.2f}" if ctrl else "n/a"
            rows.append(f"| {labels[row]} | {seed} | {fmt(rec['val_miou'])} | "
                        f"{fmt(now['val_miou'])} | {diff:+.2f} | {vs} |")
    return [*head, f"Recipe 1 = `{before_json.parent.name}/camvid.md`. Rows the change does not "
            "touch (the base, the control, ST++, the 0.9-threshold option) are the same runs "
            "in both.", "", *rows]


README_MARK = ("<!-- camvid-headline: written by benchmarks/camvid.py -->", "<!-- /camvid-headline -->")


def headline(runs: dict, seeds: list[int], labels: dict[str, str], cmd: str) -> str:
    """The report's headline in one line (README "Results"): each semi-supervised row's paired
    difference with the control, over the seeds finished so far."""
    ctl = values(runs, "suponly_continued", seeds)
    done = [s for s, c in zip(seeds, ctl, strict=True) if c is not None]
    parts = []
    for row in ("stpp", "ciscr", "ciscr_bank", "unimatch", "unimatch_cisc"):
        d, _ = paired(values(runs, row, seeds), ctl)
        if d is not None:
            parts.append(f"{labels[row]} {d:+.2f}")
    if not parts:
        return f"CamVid protocol 3: no row finished yet (`{cmd}`)."
    return (f"CamVid protocol 3, 1/8 labeled, seed(s) {', '.join(map(str, done))} of 3, mIoU "
            f"points over the control (SupOnly continued): {'; '.join(parts)} (`{cmd}`; "
            "docs/results/camvid.md, targets there).")


def update_readme(path: Path, line: str, marks: tuple[str, str] = README_MARK) -> None:
    """Replace the text between ``marks`` in ``path`` by ``line`` (nothing when absent)."""
    if not path.exists():
        return
    text = path.read_text()
    start, end = text.find(marks[0]), text.find(marks[1])
    if start < 0 or end < start:
        return
    new = text[:start + len(marks[0])] + "\n" + line + "\n" + text[end:]
    if new != text:
        atomic_write_bytes(path, new.encode())
