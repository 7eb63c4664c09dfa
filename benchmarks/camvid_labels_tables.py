"""Protocol 4's tables, lines and figure (``benchmarks/camvid_labels.py``): per split, costs
and budgets, SupOnly's curve and the break-even reading off it, the diagnostics and what they
show, rendered from the run records (``camvid_labels_records``), the plans of the SupOnly runs
given a row's CPU time (their compute_match.json) and the levers' step costs
(camvid_levers.json).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from camvid_labels_records import (
    SSL,
    compute_row_of,
    compute_vals,
    curve_points,
    mean_std,
    own_minutes,
    same_machine,
    supervised_rows,
    vals,
)
from camvid_report import (
    fmt,
    paired,
    read,
)


def table_split(runs: dict, split: int, rows: list[str], seeds: list[int],
                labels: dict[str, str]) -> list[str]:
    out = [f"| {split} labels | val mIoU, mean ± std | per seed | minus SupOnly (paired ± SE) "
           "| minus SupOnly given this row's CPU time | iterations (per seed where they differ) "
           "| CPU min | wall min | precision |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        xs = vals(runs, split, r, seeds)
        if all(x is None for x in xs):
            continue
        got = [runs[(split, r, s)] for s in seeds if runs.get((split, r, s))]
        m, sd = mean_std(xs)
        per = " / ".join(fmt(x) for x in xs)
        _, d_sup = paired(xs, vals(runs, split, "suponly", seeds))
        _, d_cmp = paired(xs, compute_vals(runs, split, r, seeds))
        cost = {k: mean_std([g[k] for g in got])[0] for k in ("cpu_minutes", "wall_minutes")}
        its = sorted({g["iterations"] for g in got})  # per seed where they differ: no mean
        its_txt = " / ".join(str(runs[(split, r, s)]["iterations"]) if runs.get((split, r, s))
                             else "n/a" for s in seeds) if len(its) > 1 else str(its[0])
        prec = ", ".join(sorted({p for g in got for p in g["precision"]})) or "n/a"
        out.append(f"| {labels[r]} | {fmt(m, sd)} | {per} | {d_sup if r != 'suponly' else ''} "
                   f"| {d_cmp if r in SSL else ''} | {its_txt} "
                   f"| {_num(cost['cpu_minutes'], 1)} | {_num(cost['wall_minutes'], 1)} | {prec} |")
    return out


def mixed_lines(runs: dict, split: int, rows: list[str], seeds: list[int],
                labels: dict[str, str]) -> list[str]:
    """Where the runs of one table do not share a precision or a CPU (sessions may land on
    other machines: CPU minutes then compare within a machine only), which run used which."""
    got = [((r, s), rec) for r in rows for s in seeds if (rec := runs.get((split, r, s)))]
    out = []
    for key, what, compare in (("precision", "precision", "CPU minutes and mIoU"),
                               ("machines", "CPU", "CPU minutes")):
        kinds = sorted({k for _, rec in got for k in rec[key]})
        if len(kinds) > 1:
            per = "; ".join(f"{k}: " + ", ".join(f"{labels[r]} s{s}" for (r, s), rec in got
                                                 if k in rec[key]) for k in kinds)
            out.append(f"- Not one {what} for this table's runs ({per}): compare {compare} "
                       f"within one {what} only.")
    return out


def _num(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table_per_class(runs: dict, split: int, rows: list[str], seeds: list[int],
                    labels: dict[str, str]) -> list[str]:
    names = next((r["class_names"] for r in runs.values() if r.get("class_names")), None)
    if not names:
        return ["(no finished run)"]
    out = ["| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        got = [runs[(split, r, s)] for s in seeds if runs.get((split, r, s))]
        if got:
            cells = [fmt(statistics.fmean([g["iou"][k] or 0.0 for g in got]))
                     for k in range(len(names))]
            out.append(f"| {labels[r]} (n={len(got)}) | " + " | ".join(cells) + " |")
    return out


def class_gap_lines(runs: dict, split: int, seeds: list[int], labels: dict[str, str]) -> list[str]:
    """Per semi-supervised row, the classes it is ahead of / behind SupOnly given its CPU time
    on (IoU points, mean over the seeds where both finished, largest first): which classes the
    unlabeled branch's CPU time bought, against what more supervised steps bought."""
    out = []
    for r in SSL:
        pairs = [(runs[(split, r, s)], ref) for s in seeds if runs.get((split, r, s)) and
                 (ref := runs.get((split, compute_row_of(runs, split, r, s), s)))]
        if not pairs:
            continue
        names = pairs[0][0].get("class_names") or [str(k) for k in range(len(pairs[0][0]["iou"]))]
        gap = {n: 100 * statistics.fmean((a["iou"][k] or 0.0) - (b["iou"][k] or 0.0)
                                         for a, b in pairs) for k, n in enumerate(names)}
        ahead = sorted((g, n) for n, g in gap.items() if g > 0)[::-1]
        behind = sorted((g, n) for n, g in gap.items() if g < 0)
        out.append(f"- {labels[r]} (n={len(pairs)}): ahead on {len(ahead)} of {len(names)} "
                   "classes (" + (", ".join(f"{n} {g:+.1f}" for g, n in ahead) or "none")
                   + f"); behind on {len(behind)} ("
                   + (", ".join(f"{n} {g:+.1f}" for g, n in behind) or "none") + ")")
    return out


def table_plans(runs: dict, splits: list[int], seeds: list[int], compute: dict) -> list[str]:
    """Each finished compute run's plan, the CPU time it then used (its steps are fixed by the
    plan; their cost varies run to run by several percent on one machine); whether the runs
    whose CPU times it divides (SupOnly at N and the rows it was given) ran on one CPU and
    precision, where the rule's ratio holds; and where the compute run itself ran (its steps
    are fixed by that ratio: another machine changes its own CPU minutes and, in another
    precision, its arithmetic, not its steps)."""
    out = ["| split | seed | SupOnly run | given the CPU time of | CPU min given | SupOnly's "
           "CPU min at N | its iterations | CPU min it used | the divided runs' CPU "
           "| the run's own CPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for split in splits:
        for s in seeds:
            for name in compute:
                rec = runs.get((split, name, s))
                plan = read(Path(rec["run_dir"]) / "compute_match.json") if rec else None
                if plan:
                    divided = [runs.get((split, r, s)) or {} for r in ["suponly", *plan["rows"]]]
                    ratio = _where(divided)
                    mine = _cpus([rec])
                    own = ("not recorded" if not mine else "the same"
                           if _where([rec, *divided]) == "one" else "; ".join(mine))
                    out.append(f"| {split} | {s} | {name} | {', '.join(plan['rows'])} "
                               f"| {plan['cpu_seconds'] / 60:.1f} "
                               f"| {plan['suponly_cpu_seconds'] / 60:.1f} | {plan['iterations']} "
                               f"| {_num(rec.get('cpu_minutes'), 1)} | {ratio} | {own} |")
    return out


def _cpus(recs: list[dict]) -> list[str]:
    """The CPUs (with bf16 support) and precisions ``recs`` recorded, one string each."""
    return sorted({f"{m}, {'+'.join(r.get('precision') or ['precision not recorded'])}"
                   for r in recs for m in r.get("machines", [])})


def _where(recs: list[dict]) -> str:
    """'one' where ``recs`` all recorded one CPU in one precision, else which (MIXED: the
    rule's ratio of CPU times is not matched), or 'not recorded'."""
    if not all(r.get("machines") for r in recs):
        return "not recorded"
    cpus = _cpus(recs)
    return "one" if len(cpus) == 1 else "MIXED (not matched): " + "; ".join(cpus)


BUDGET_MIN = 150  # the wall minutes for one (split, seed) of main rows on 2 cores


def budget_lines(runs: dict, split: int, seeds: list[int], rows: list[str]) -> list[str]:
    """Per seed, what its finished main and compute runs cost together against the issue's
    budget (one (split, seed) of main rows in <= 150 minutes of wall, two runs at a time on 2
    cores): their CPU minutes (CISC-R's without its shared stage 1, counted once, in SupOnly)
    over the 2 cores, a lower bound on that wall, and their measured wall minutes over 2."""
    out = []
    for s in seeds:
        got = [r for r in rows if runs.get((split, r, s))]
        cpus = [own_minutes(runs, (split, r, s)) for r in got]
        if not got or any(c is None for c in cpus):
            continue
        cpu = sum(cpus)
        wall = sum(own_minutes(runs, (split, r, s), "wall_minutes") or 0.0 for r in got)
        verdict = ("within it" if cpu / 2 <= BUDGET_MIN else
                   f"OVER it by {cpu / 2 - BUDGET_MIN:.0f} min even at best")
        out.append(f"- seed {s} ({', '.join(got)}): {cpu:.0f} CPU min, {cpu / 2:.0f} min of "
                   f"wall on 2 cores at best; measured wall / 2: {wall / 2:.0f} min "
                   f"(the issue's budget: {BUDGET_MIN}; {verdict})")
    return out


def estimate_cpu(runs: dict, split: int, row: str, spec: dict) -> tuple[float | None, str]:
    """A queued run's CPU minutes estimated from measured runs, and the basis: the mean of
    the same row's finished runs at this split, else at any split (a step costs the same at
    every split); a curve row: its multiple of SupOnly's; a compute row: the CPU time of the
    rows it is given (the rule); else (None, "no run of its kind measured yet")."""
    def mean_of(r: str, own: bool = True) -> tuple[float | None, str]:
        for where, keys in (("this split", [k for k in runs if k[0] == split and k[1] == r]),
                            ("another split", [k for k in runs if k[1] == r])):
            got = [c for k in keys if (c := own_minutes(runs, k) if own else
                                       runs[k].get("cpu_minutes")) is not None]
            if got:
                return statistics.fmean(got), f"{r}: {len(got)} run(s) at {where}"
        return None, "no run of its kind measured yet"

    est, basis = mean_of(row)
    if est is None and row in spec["curve"]:
        sup, _ = mean_of("suponly")
        if sup is not None:
            return spec["curve"][row] * sup, f"{spec['curve'][row]} x SupOnly's at N"
    if est is None and row in spec["compute"]:
        given = [e for r in spec["compute"][row] if (e := mean_of(r, own=False)[0]) is not None]
        if given:
            return statistics.fmean(given), f"the CPU time of {', '.join(spec['compute'][row])}"
    return est, basis


def queued_lines(runs: dict, queued: list[tuple[int, int, str]], spec: dict) -> list[str]:
    """The runs the queue has not started, in its order, one line per (split, row) with its
    seeds and estimated CPU minutes each, and what they add up to on 2 cores: what the rest of
    the protocol costs. suponly_compute_unimatch runs only where the rule needs it (UniMatch's
    CPU time not within 10 % of UniMatch + CISC's), so it is listed but not counted."""
    if not queued:
        return ["(nothing)"]
    groups: dict[tuple[int, str], list[int]] = {}
    for split, seed, row in queued:
        groups.setdefault((split, row), []).append(seed)
    out = ["| labels | row | seeds | estimated CPU min each | from |", "|---|---|---|---|---|"]
    total, unknown = 0.0, 0
    for (split, row), seeds in groups.items():
        est, basis = estimate_cpu(runs, split, row, spec)
        if row == "suponly_compute_unimatch":
            basis = "only where the rule needs it: not counted"
        elif est is None:
            unknown += len(seeds)
        else:
            total += est * len(seeds)
            if row == "ciscr":  # own_minutes: its stage 1 is the SupOnly run, counted there
                basis += " (without its stage 1, the SupOnly run's)"
        out.append(f"| {split} | {spec['labels'][row]} | {', '.join(map(str, seeds))} "
                   f"| {_num(est, 0)} | {basis} |")
    return out + ["", f"In all about {total:.0f} CPU min, {total / 120:.1f} h on 2 cores at two "
                  "runs at a time" + (f", plus {unknown} run(s) not estimated" if unknown else "")
                  + " (estimates from the measured runs, not measurements)."]


def break_even(points: list[tuple], target: float) -> tuple[float | None, str]:
    """Where SupOnly's measured curve (``curve_points``: iterations, mIoU, CPU minutes), linear
    between its runs, first reaches ``target`` mIoU: (CPU minutes, how), or (None, why not)."""
    pts = sorted((p[2], p[1], p[0]) for p in points if p[2] is not None)
    if not pts:
        return None, "no SupOnly run measured"
    if pts[0][1] >= target:
        return pts[0][0], f"at most: its smallest run ({pts[0][2]} iterations) is already there"
    for (c0, m0, i0), (c1, m1, i1) in zip(pts, pts[1:], strict=False):
        if m0 < target <= m1:
            return c0 + (c1 - c0) * (target - m0) / (m1 - m0), \
                f"linear between its runs of {i0} and {i1} iterations"
    return None, f"beyond its longest measured run ({pts[-1][2]} iterations)"


def break_even_lines(runs: dict, split: int, seed: int, curve: dict,
                     labels: dict[str, str], rows: list[str] | None = None) -> list[str]:
    """Per semi-supervised row (one seed; ``rows``, default the main ones): the CPU time at
    which SupOnly's curve reaches the row's mIoU, over the row's own CPU time: the cost the row
    (e.g. by section 2's levers) would have to come down to for the unlabeled images to pay
    per CPU hour at its mIoU (at or above 1: it pays already)."""
    ref = runs.get((split, "suponly", seed)) or {}
    pts = curve_points(runs, split, seed, curve, like=ref)  # CPU minutes of one machine
    out = []
    for row in rows or SSL:
        r = runs.get((split, row, seed))
        if not r or r.get("cpu_minutes") is None:
            continue
        if not same_machine(r, ref):
            out.append(f"- {labels[row]}: not read off the curve (it ran on another CPU or in "
                       "another precision than SupOnly's run at N)")
            continue
        cpu, how = break_even(pts, r["val_miou"])
        ratio = None if cpu is None else cpu / r["cpu_minutes"]
        got = (f"SupOnly's curve reaches that at about {cpu:.1f} CPU min ({how}): to break "
               f"even per CPU hour the row would have to cost {ratio:.2f} x its "
               f"measured CPU time or less (<= {cpu:.1f} CPU min) at the same mIoU"
               + (": it pays per CPU hour already" if ratio >= 1 else "")
               if cpu is not None else f"SupOnly's curve does not reach it ({how})")
        out.append(f"- {labels[row]}: {fmt(r['val_miou'])} at {r['cpu_minutes']:.1f} CPU min; "
                   + got)
    return out or ["(no semi-supervised row finished with its CPU time)"]


def lever_costs_line(levers_json: Path, lever_overrides: list[list[str]]) -> str:
    """Section 2's levers (the option rows' overrides) next to those ratios: each one's step
    cost as a share of a UniMatch + CISC step, from camvid_levers.json (a step, not a run:
    evaluations, the bank's refresh and pseudo-labelling are outside it)."""
    rec = read(levers_json) or {}
    steps, over = rec.get("mean_step_seconds", {}), rec.get("overrides", {})
    ref = steps.get("unimatch_cisc")
    levers = {k: v / ref for k, v in steps.items() if ref and over.get(k) in lever_overrides}
    if not levers:
        return f"(no lever costs measured: {levers_json.name} is missing)"
    each = ", ".join(f"`{' '.join(over[k])}` {x:.2f}" for k, x in sorted(levers.items(),
                                                                         key=lambda kv: kv[1]))
    return (f"Section 2's levers, one setting each, cost per step as a share of a UniMatch + CISC "
            f"step ({levers_json.name}, `python benchmarks/camvid_levers.py`): {each}; what "
            "each does to mIoU is its option row. These are per step; a run's ratio is higher "
            "(its evaluations, the bank's refresh and pseudo-labelling do not shrink), so compare "
            "a lever's whole run, its option row, with the break-even shares above.")


def table_curve(points: list[tuple]) -> list[str]:
    out = ["| iterations | val mIoU (last checkpoint) | CPU min | gain over the previous |",
           "|---|---|---|---|"]
    prev = None
    for it, m, cpu in points:
        gain = "" if prev is None else f"{100 * (m - prev[1]):+.2f} (x{it / prev[0]:.1f} steps)"
        out.append(f"| {it} | {fmt(m)} | {_num(cpu, 1)} | {gain} |")
        prev = (it, m)
    return out


DIAG_COLUMNS = (("pseudo_miou", "pseudo-label mIoU"), ("pseudo_acc", "pixel accuracy"),
                ("mask_ratio", "passed the mask"), ("mask_precision", "right where passed"),
                ("taught", "right and passed"))


DIAG_INTRO = ("Each run's FINAL model labels its split's unlabeled pool as an online step labels "
              "its weak view, scored against the pool's ground truth (never trained on; "
              "`benchmarks/camvid_labels_diagnostics.py`, run by the queue after each run): "
              "pseudo-label mIoU and pixel accuracy, the share of pixels that pass the confidence "
              "mask, the share of those that are right, the share of all pixels that pass and "
              "are right, and the AUROC of telling right from wrong labels by the confidence and "
              "by the CISC weight (the labeled images' prototype bank through the same model); "
              "then the online rows' own monitor over the last quarter of training (the pixels "
              "passed, the online labels' accuracy, their accuracy where passed). A SupOnly row "
              "shows what its pseudo labels would have been. Percent, mean over the seeds "
              "diagnosed.")


def table_diagnostics(runs: dict, split: int, rows: list[str], seeds: list[int],
                      labels: dict[str, str]) -> list[str]:
    """The final models' pseudo labels on the unlabeled pool (camvid_labels_diagnostics.py),
    each online row's own monitor over its last quarter, mean over the seeds diagnosed."""
    out = ["| row (seeds) | " + " | ".join(t for _, t in DIAG_COLUMNS) + " | AUROC confidence "
           "| AUROC CISC | training, last quarter: passed / right / right where passed |",
           "|---|" + "---|" * (len(DIAG_COLUMNS) + 3)]
    for r in rows:
        got = [d for s in seeds if (d := (runs.get((split, r, s)) or {}).get("diagnostics"))]
        if not got:
            continue
        cells = [pct([g[k] for g in got]) for k, _ in DIAG_COLUMNS]
        cells += [f"{statistics.fmean(g['auroc'][n] for g in got):.3f}" for n in ("confidence", "cisc")]
        mons = [m for s in seeds if (m := (runs.get((split, r, s)) or {}).get("monitor"))]
        cells.append(" / ".join(pct([m.get(k) for m in mons]) for k in
                                ("mask_ratio", "pseudo_acc", "pseudo_acc_selected")) if mons else "")
        out.append(f"| {labels[r]} ({len(got)}) | " + " | ".join(cells) + " |")
    return out if len(out) > 2 else ["(no run diagnosed yet: `python "
                                     "benchmarks/camvid_labels_diagnostics.py --all`)"]


def pct(xs: list[float | None]) -> str:
    """The mean of the known values, in percent, one decimal (n/a when none)."""
    got = [x for x in xs if x is not None]
    return "n/a" if not got else f"{100 * statistics.fmean(got):.1f}"


def table_taught(runs: dict, split: int, rows: list[str], seeds: list[int],
                 labels: dict[str, str]) -> list[str]:
    """Per class: the pool's share, then each diagnosed row's pseudo-label IoU, the share of
    the class its unlabeled loss would teach right (passed the mask and right), and how often
    the pixels labelled as the class that pass the mask are right (n/a: none passed), in
    percent."""
    diag = _diagnosed(runs, split, rows, seeds)
    if not diag:
        return []
    names = next(iter(diag.values()))[0]["classes"]
    out = ["| class | share of the pool | " + " | ".join(
        f"{labels[r]}: IoU / taught / right where passed" for r in diag) + " |",
        "|---|---|" + "---|" * len(diag)]
    for k, name in enumerate(names):
        share = pct([d["per_class"]["gt_share"][k] for v in diag.values() for d in v])
        cells = [" / ".join(pct([d["per_class"].get(key, [None] * len(names))[k] for d in v])
                            for key in ("pseudo_iou", "taught", "mask_precision"))
                 for v in diag.values()]
        out.append(f"| {name} | {share} | " + " | ".join(cells) + " |")
    return out


def _diagnosed(runs: dict, split: int, rows: list[str], seeds: list[int]) -> dict[str, list]:
    """Each row's diagnostics over the seeds diagnosed (rows with none left out)."""
    diag = {r: [d for s in seeds if (d := (runs.get((split, r, s)) or {}).get("diagnostics"))]
            for r in rows}
    return {r: v for r, v in diag.items() if v}


def diagnostic_findings(runs: dict, split: int, rows: list[str], seeds: list[int]) -> list[str]:
    """What the semi-supervised rows' diagnostics show at ``split`` (means over the seeds
    diagnosed; the issue's "what the diagnostics show" where a target is missed): the classes
    no row teaches, how right the passed pixels are and how many pass, and whether the CISC
    weight or the confidence tells right pseudo labels from wrong ones better."""
    diag = _diagnosed(runs, split, rows, seeds)
    if not diag:
        return []
    names = next(iter(diag.values()))[0]["classes"]

    def cls(r: str, key: str, k: int) -> float | None:
        """Row r's mean over its seeds (a ratio with a zero denominator, None, left out)."""
        got = [x for d in diag[r] if key in d["per_class"]
               and (x := d["per_class"][key][k]) is not None]
        return statistics.fmean(got) if got else None

    def over_rows(key: str, k: int) -> str:
        """Class k's ``key`` in percent, mean over the rows that have it."""
        got = [x for r in diag if (x := cls(r, key, k)) is not None]
        return f"{100 * statistics.fmean(got):.1f}" if got else "n/a"

    def span(get: Callable[[dict], float], scale: float = 100.0, digits: int = 1) -> str:
        """min-max over the rows of each row's mean over its seeds."""
        xs = [scale * statistics.fmean(get(d) for d in diag[r]) for r in diag]
        return f"{min(xs):.{digits}f}-{max(xs):.{digits}f}"

    starved = [k for k in range(len(names))
               if all((cls(r, "taught", k) or 0.0) < 0.01 for r in diag)]
    out = []
    if starved:
        share = 100 * sum(cls(r, "gt_share", k) or 0.0 for k in starved for r in diag) / len(diag)
        best = max(100 * (cls(r, "pseudo_iou", k) or 0.0) for k in starved for r in diag)
        split_iou = ""
        if all("precision" in d["per_class"] for v in diag.values() for d in v):
            split_iou = (" (precision / recall of their pseudo labels, mean over the rows: "
                         + ", ".join(f"{names[k]} {over_rows('precision', k)} / "
                                     f"{over_rows('recall', k)}" for k in starved) + ")")
        out.append(f"- Classes no semi-supervised row teaches (under 1 % of the class's pool "
                   f"pixels pass the mask and are right, in every row): "
                   f"{', '.join(names[k] for k in starved)}, {share:.1f} % of the pool's pixels; "
                   f"their pseudo-label IoU is at most {best:.1f} in any row{split_iou}.")
    right, passed = span(lambda d: d["mask_precision"]), span(lambda d: d["mask_ratio"])
    worst = min(((x, names[k]) for k in range(len(names)) for r in diag
                 if (x := cls(r, "mask_precision", k)) is not None), default=None)
    low = "" if worst is None else (
        f" That is pixel-weighted, so the large classes set it; per class (the pixels labelled "
        f"as it that pass) it falls to {100 * worst[0]:.1f} % ({worst[1]}) in the worst row.")
    out.append(f"- Where pixels pass the mask their labels are right {right} % of the time; "
               f"{passed} % of the pool's pixels pass (the range over the rows).{low}")
    conf, cisc = (span(lambda d, n=n: d["auroc"][n], 1.0, 3) for n in ("confidence", "cisc"))
    worse = sum(statistics.fmean(d["auroc"]["cisc"] for d in v)
                < statistics.fmean(d["auroc"]["confidence"] for d in v) for v in diag.values())
    out.append(f"- Telling right pseudo labels from wrong ones (AUROC): the confidence {conf}, "
               f"the CISC weight {cisc}; the CISC weight separates less well than the confidence "
               f"in {worse} of {len(diag)} rows.")
    return out


def md_diagnostics(runs: dict, splits: list[int], seeds: list[int], rows: list[str],
                   labels: dict[str, str]) -> list[str]:
    """The pseudo-label diagnostics per split, and per class at each split diagnosed; a row
    named twice (a main row that is also an option) is tabled once."""
    rows = list(dict.fromkeys(rows))
    md = ["## Diagnostics: what the unlabeled branch could learn from", "", DIAG_INTRO, ""]
    for split in splits:
        md += [f"{split} labels:", "", *table_diagnostics(runs, split, rows, seeds, labels), ""]
    for split in sorted(splits):
        taught = table_taught(runs, split, ["suponly", *SSL], seeds, labels)
        md += [f"Per class at {split} labels (pseudo-label IoU / share of the class's pixels "
               "that pass the mask and are right / share of the pixels labelled as the class "
               "that pass the mask and are right, n/a where none pass), mean over the seeds "
               "diagnosed:", "", *taught, ""] if taught else []
    for split in splits:
        found = diagnostic_findings(runs, split, SSL, seeds)
        md += [f"What the semi-supervised rows' diagnostics show at {split} labels (read off "
               "the tables above):", "", *found, ""] if found else []
    return md


def _label_curve_panel(ax, runs: dict, splits: list[int], seeds: list[int],
                       labels: dict[str, str], color: dict[str, str]) -> None:
    """The left panel: val mIoU (mean ± std over seeds) against labeled images, a line a row."""
    rows0 = ["suponly", *SSL, "suponly_compute"]
    for i, r in enumerate(rows0):
        # Each row a little to the side (log x: the same nudge at every split), so the error
        # bars of rows at one split do not hide each other.
        nudge = 1 + 0.025 * (i - (len(rows0) - 1) / 2)
        pts = [(k, *mean_std(vals(runs, k, r, seeds))) for k in sorted(splits)]
        pts = [(k, m, sd or 0.0) for k, m, sd in pts if m is not None]
        # The seeds behind each mean, per split: rows finish seeds at different times.
        n = "/".join(str(sum(v is not None for v in vals(runs, k, r, seeds))) for k, *_ in pts)
        if pts:
            ax.errorbar([p[0] * nudge for p in pts], [100 * p[1] for p in pts],
                        yerr=[100 * p[2] for p in pts], marker="o", capsize=3,
                        label=f"{labels[r]} (seeds: {n})", color=color[r])
    ax.set(xlabel="labeled images (log scale; rows nudged apart)",
           ylabel="val mIoU (%), mean ± std over seeds", title="CamVid: the label curve",
           xscale="log", xticks=sorted(splits), xticklabels=[str(k) for k in sorted(splits)],
           xlim=(min(splits) / 1.25, max(splits) * 1.25))
    ax.minorticks_off()


def figures(runs: dict, splits: list[int], seeds: list[int], labels: dict[str, str],
            curve: dict, stem: Path) -> list[str]:
    """Two PNGs: val mIoU against labeled images (one line per main row) and, at the smallest
    split, val mIoU against CPU minutes (each run's logged evaluations, SupOnly's curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per row in both panels; seeds differ by line style (SupOnly: and by marker).
    color = {r: f"C{i}" for i, r in enumerate(["suponly", *SSL, "suponly_compute", "ciscr_fresh",
                                                "fixmatch", "stpp"])}
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    _label_curve_panel(ax[0], runs, splits, seeds, labels, color)
    small = min(splits)
    left_out = []  # runs not on their seed's SupOnly run's CPU and precision
    for r in [*SSL, "ciscr_fresh", "fixmatch", "stpp"]:
        for s, style in zip(seeds, ["-", ":", "-.", "--"] * len(seeds), strict=False):
            rec, ref = runs.get((small, r, s)), runs.get((small, "suponly", s)) or {}
            if rec and not same_machine(rec, ref):
                left_out.append(f"{labels[r]} s{s}")
            elif rec and rec["evals"] and rec["cpu_minutes"]:
                per_it = rec["cpu_minutes"] / rec["iterations"]
                xs = rec.get("evals_cpu_minutes") or [it * per_it for it, _ in rec["evals"]]
                ax[1].plot(xs,
                           [100 * m for _, m in rec["evals"]], marker=".", alpha=0.8,
                           color=color[r], linestyle=style, label=f"{labels[r]} s{s}")
    for i, s in enumerate(seeds):
        ref = runs.get((small, "suponly", s)) or {}
        pts = curve_points(runs, small, s, curve, like=ref)
        left_out += [f"{labels.get(n, n)} s{s}" for n in supervised_rows(curve)
                     if (rec := runs.get((small, n, s))) and not same_machine(rec, ref)]
        if pts:
            ax[1].plot([p[2] for p in pts], [100 * p[1] for p in pts], color="k",
                       linestyle=["--", ":", "-."][i % 3], marker="osD"[i % 3],
                       label=f"SupOnly, last checkpoint of runs of each length, s{s}")
    ax[1].set(xlabel="CPU minutes (1 thread)", ylabel="val mIoU (%)",
              title=f"{small} labels: mIoU against CPU time")
    # Legends below the panels: inside, some placement always hides a point or an error bar.
    for a in ax:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:  # nothing finished yet: no empty legend
            a.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    png = stem.with_suffix(".png")
    fig.savefig(png.with_suffix(".tmp.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    png.with_suffix(".tmp.png").replace(png)
    return [f"![label curve and CPU time]({png.name})",
            "", "Right panel: a run's evaluations are placed stage by stage at the CPU minutes "
            "of the stages before (pseudo-labelling and selection included) plus the stage's "
            "own CPU time x the share of its iterations done (its evaluations spread evenly "
            "over it: an approximation; a run without a per-stage CPU record spreads its whole "
            "CPU time over its iterations); the black lines (one line style and marker per seed) are "
            "SupOnly's curve from the last checkpoints of whole runs, each with its own "
            "learning-rate schedule. Each seed's runs are drawn only where they ran on the CPU "
            "and in the precision of its SupOnly run at N (CPU minutes compare only there); "
            "left out: " + (", ".join(left_out) or "none") + "."]
