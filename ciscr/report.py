"""``ciscr report``: one self-contained ``report.html`` for a run directory.

The page has no external resource at all (no URL, script or web font): CSS is inline and every
figure is an inline base64 PNG, so it can be mailed or archived as one file. Sections:

    header      method, dataset, dates, the result (val mIoU of the LAST checkpoint of the
                final stage), stage status (what is missing in a killed run)
    config      the resolved config.yaml (collapsible)
    curves      loss terms and val mIoU per training stage (train.jsonl)
    iou         per-class IoU of every training stage
    pseudo      pseudo-label quality vs ground truth, pseudo0 -> pseudo1 -> pseudo_final
    selection   scores of the unlabeled images (reliable vs unreliable), their pseudo-label
                mIoU, query list sizes per class
    time        seconds per stage: training, evaluation, pseudo-labelling, selection
    cisc        CISC maps of a few unlabeled images, computed now with the stage-1 model (M0)
    labels      pseudo labels before / after (pseudo0 vs later sets, with ground truth)
    predictions the final model on a few validation images vs ground truth

A run may be incomplete: every section draws what exists and says what is missing. A section
that fails for an unexpected reason is replaced by a note (and logged with its traceback)
rather than failing the whole report, because the report is written at the end of long runs.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ciscr.errors import CiscrError, DataError

# One job per module: ciscr.run_facts reads the run directory, this module renders the page.
from ciscr.run_facts import (  # noqa: F401 - expected_stages etc. re-exported
    ALL_STAGES,
    PSEUDO_SETS,
    TRAIN_STAGES,
    _class_names,
    _final_metrics,
    _final_stage,
    _load_json,
    _read_run,
    _Run,
    expected_stages,
    read_train_log,
    stage_status,
)

log = logging.getLogger("ciscr")

REPORT_NAME = "report.html"
PSEUDO_ABOUT = {
    "pseudo0": "by M0 (stage 1), every unlabeled image",
    "pseudo1": "by M1 (stage 2), unreliable half only",
    "pseudo_final": "by the final model, every unlabeled image",
}
NO_GALLERY = "galleries disabled (max_gallery = 0)."
LOSS_KEYS = ("loss", "ce", "cisc", "ce_labeled", "ce_unlabeled", "loss_s1", "loss_s2", "loss_fp")
# The online family's share of unlabeled pixels that pass the threshold, and the accuracy of its
# online pseudo labels (where ground truth exists; scoring only), plotted beside val mIoU.
ONLINE_KEYS = ("mask_ratio", "pseudo_acc", "pseudo_acc_selected")


# --------------------------------------------------------------------------- html helpers


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(v: Any, absent: str = "absent") -> str:
    """A fraction as a percentage with two decimals; None -> ``absent``."""
    if v is None:
        return absent
    try:
        return f"{100 * float(v):.2f}"
    except (TypeError, ValueError):
        return _esc(v)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _note(text: str, kind: str = "info") -> str:
    return f'<p class="note {kind}">{_esc(text)}</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """A table from already-escaped cell HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fig_img(fig: Any, alt: str, dpi: int = 80) -> str:
    from ciscr.visualize import figure_png

    return _img(figure_png(fig, dpi=dpi), alt)


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items evenly spaced through ``items`` (first and last included), in order."""
    if n <= 0 or not items:
        return []
    if len(items) <= n:
        return list(items)
    if n == 1:
        return [items[0]]
    picks = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in picks]


# --------------------------------------------------------------------------- sections


def _section_header(run: _Run) -> str:
    method = (run.results or {}).get("method") or (run.cfg.method.name if run.cfg else "?")
    final = _final_stage(run)
    fm, source = _final_metrics(run)
    rows = [
        ("run directory", _esc(run.dir.resolve())),
        ("method", _esc(method)),
        ("dataset", _esc(_dataset_text(run))),
    ]
    if run.cfg is not None:
        m = run.cfg.model
        rows.append(
            (
                "model",
                _esc(
                    f"DeepLabV3+ {m.backbone}, output stride {m.output_stride}, "
                    f"{m.channels} channels"
                ),
            )
        )
    rows.append(("run date", _esc(_run_date(run))))
    rows.append(("report made", _esc(dt.datetime.now().strftime("%Y-%m-%d %H:%M"))))
    if fm is not None:
        rows.append(
            (
                "result",
                f"<b>val mIoU {_pct(fm.get('miou'), '?')}</b> "
                f"({_esc(final)}, last checkpoint; from {_esc(source)})",
            )
        )
    else:
        rows.append(("result", f"<b>not available</b>: {_esc(final)} has no metrics yet"))
    rows += _start_rows(run)
    best = _best_epoch(run, final)
    if best:
        rows.append(("best epoch on val", _esc(best)))
    body = _table(["", ""], [list(r) for r in rows], "kv")
    warning = (run.results or {}).get("warning")
    return body + (_note(warning, "warn") if warning else "") + _status_html(run)


def _start_rows(run: _Run) -> list[tuple[str, str]]:
    """Did the unlabeled images help: the result against the run's own supervised start."""
    res = run.results or {}
    start = res.get("start")
    if not start:
        return []
    gain = 100 * res["gain_over_start"]
    return [("supervised start", f"val mIoU {_pct(start['val_miou'], '?')} ({_esc(start['stage'])})"),
            ("gain over the start", f"<b>{gain:+.2f} mIoU</b>")]


def _dataset_text(run: _Run) -> str:
    if run.cfg is None:
        return "unknown (config.yaml missing)"
    d = run.cfg.data
    parts = [d.format]
    if d.split:
        parts.append(f"split {d.split}")
    elif d.labeled is not None:
        parts.append(f"labeled={d.labeled}")
    if d.root:
        parts.append(f"root {d.root}")
    data = run.dataset()
    if data is not None:
        info, lab, unl, val = data
        parts.append(
            f"{info.num_classes} classes, {len(lab)} labeled / {len(unl)} unlabeled / "
            f"{len(val)} val images"
        )
    return ", ".join(parts)


def _run_date(run: _Run) -> str:
    for name in ("results.json", "config.yaml"):
        p = run.dir / name
        if p.is_file():
            when = dt.datetime.fromtimestamp(p.stat().st_mtime)
            label = "finished" if name == "results.json" else "started"
            return f"{when:%Y-%m-%d %H:%M} ({label})"
    return "unknown"


def _best_epoch(run: _Run, stage: str) -> str:
    """The best per-epoch val mIoU, only if the run evaluated during training (labelled as a
    selection on the validation set: METHOD.md 6 keeps the last checkpoint as the result)."""
    series = read_train_log(run.dir / stage / "train.jsonl").get("val_miou")
    if not series:
        return ""
    it, best = max(series, key=lambda p: p[1])
    losses = read_train_log(run.dir / stage / "train.jsonl").get("loss") or series
    epochs = run.cfg.train.epochs if run.cfg is not None else 0
    last = max(p[0] for p in losses)
    epoch = f"epoch {round(it * epochs / last)}, " if epochs and last else ""
    return (
        f"{100 * best:.2f} ({epoch}iteration {it} of {stage}); selected on the validation "
        "set, so optimistic: not the result"
    )


def _status_html(run: _Run) -> str:
    rows, missing = [], []
    for name in expected_stages(run):
        st = stage_status(run, name)
        summary = run.json(name, "done.json") if st == "done" else None
        rows.append(
            [_esc(name), f'<span class="st {st}">{st}</span>', _esc(_summary_text(summary))]
        )
        if st != "done":
            missing.append(name)
    out = "<h3>Stages</h3>" + _table(["stage", "status", "summary"], rows)
    if run.results is None:
        out += _note(
            "results.json is missing: the run is incomplete (killed or still "
            "running); rerun the same command to finish it.",
            "warn",
        )
    if missing:
        out += _note(
            f"missing or incomplete: {', '.join(missing)}; sections below show what exists.", "warn"
        )
    for n in run.notes:
        out += _note(n, "warn")
    return out


def _summary_text(summary: Any) -> str:
    if not isinstance(summary, dict):
        return ""
    parts = []
    for k, v in summary.items():
        if k == "checkpoint":
            continue
        shown = _pct(v, "-") if k.endswith("miou") else v
        parts.append(f"{k} {shown}")
    return ", ".join(parts)


def _section_config(run: _Run) -> str:
    if run.cfg_text is None:
        return _note("config.yaml is missing.", "warn")
    return (
        "<details><summary>resolved config (config.yaml)</summary>"
        f"<pre>{_esc(run.cfg_text)}</pre></details>"
    )


def _curve_figure(stage: str, series: dict[str, list[tuple[int, float]]], final: float | None):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2), layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)
    for k in LOSS_KEYS:
        if series.get(k):
            xs, ys = zip(*series[k], strict=True)
            # Markers when there are few points: a one-point line is invisible.
            marker = "o" if len(xs) < 30 else None
            ax_loss.plot(xs, ys, label=k, lw=2.0 if k == "loss" else 1.2, marker=marker, ms=4)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title(f"{stage}: training loss")
    ax_loss.legend(fontsize="small")
    ax_loss.grid(alpha=0.3)
    if series.get("val_miou"):
        xs, ys = zip(*series["val_miou"], strict=True)
        ax_val.plot(xs, [100 * y for y in ys], marker="o", label="val mIoU (per epoch)")
    for k in ONLINE_KEYS:
        if series.get(k):
            xs, ys = zip(*series[k], strict=True)
            ax_val.plot(xs, [100 * y for y in ys], ls="--", lw=1.0, label=f"{k} (%)")
    if final is not None:
        last = max((p[0] for p in series.get("loss", [])), default=0)
        ax_val.plot(
            [last],
            [100 * final],
            marker="*",
            ms=14,
            ls="",
            color="C3",
            label=f"last checkpoint: {100 * final:.2f}",
        )
    ax_val.set_xlabel("iteration")
    ax_val.set_ylabel("mIoU (%)")
    ax_val.set_title(f"{stage}: validation mIoU")
    ax_val.legend(fontsize="small")
    ax_val.grid(alpha=0.3)
    return fig


def _section_curves(run: _Run) -> str:
    out = []
    for stage in TRAIN_STAGES:
        if stage not in expected_stages(run) and not (run.dir / stage).is_dir():
            continue
        series = read_train_log(run.dir / stage / "train.jsonl")
        if not series:
            out.append(_note(f"{stage}: no training log ({stage}/train.jsonl missing)", "warn"))
            continue
        metrics = run.json(stage, "metrics.json") or {}
        fig = _curve_figure(stage, series, metrics.get("miou"))
        out.append(f"<h3>{_esc(stage)}</h3>" + _fig_img(fig, f"{stage} training curves"))
    return "".join(out) or _note("no training stage has a log yet.", "warn")


def _iou_cells(metrics: dict[str, Any] | None, k: int) -> list[str]:
    if metrics is None:
        return ["missing"] * (k + 1)
    iou = list(metrics.get("iou") or [])
    iou += [None] * (k - len(iou))
    return [f"<b>{_pct(metrics.get('miou'), '?')}</b>"] + [_pct(v) for v in iou[:k]]


def _section_iou(run: _Run) -> str:
    names = _class_names(run)
    final = _final_stage(run)
    stages = [s for s in TRAIN_STAGES if s in expected_stages(run) or (run.dir / s).is_dir()]
    cols = {s: _iou_cells(run.json(s, "metrics.json"), len(names)) for s in stages}
    fm, _ = _final_metrics(run)
    if fm is not None:
        cols[final] = _iou_cells(fm, len(names))
    header = ["class"] + [_esc(s) + (" (final)" if s == final else "") for s in cols]
    rows = [["<b>mIoU</b>"] + [c[0] for c in cols.values()]]
    rows += [[_esc(n)] + [c[i + 1] for c in cols.values()] for i, n in enumerate(names)]
    out = _table(header, rows, "num")
    out += _note(
        "IoU in % on the validation split, last checkpoint of each stage; 'absent' = "
        "the class is in neither the ground truth nor the predictions (not counted)."
    )
    if fm is None:
        out += _note(f"the final stage ({final}) has no metrics: the run is incomplete.", "warn")
    return out


def _section_pseudo_quality(run: _Run) -> str:
    names = _class_names(run)
    sets = [s for s in PSEUDO_SETS if (run.dir / s).is_dir() or s in expected_stages(run)]
    if not sets:
        return _note("this method makes no pseudo labels.")
    cols, about = {}, []
    for s in sets:
        q = run.json(s, "quality.json")
        scored = q is not None and q.get("miou") is not None
        cols[s] = _iou_cells(q if scored else None, len(names))
        if not scored:
            cols[s] = ["no gt" if (run.dir / s / "done.json").is_file() else "missing"] * len(
                cols[s]
            )
        n = (q or {}).get("num_images")
        about.append(f"{s}: {PSEUDO_ABOUT[s]}" + (f" ({n} images scored)" if n else ""))
    header = ["class"] + [_esc(s) for s in cols]
    rows = [["<b>mIoU</b>"] + [c[0] for c in cols.values()]]
    rows += [[_esc(n)] + [c[i + 1] for c in cols.values()] for i, n in enumerate(names)]
    out = _table(header, rows, "num")
    out += "<ul>" + "".join(f"<li>{_esc(a)}</li>" for a in about) + "</ul>"
    return out + _note(
        "Quality of the pseudo labels of the unlabeled images against their own "
        "ground truth, where it exists (paper Table 5). Reporting only: never "
        "used for training or selection."
    )


def _score_histogram(rel: list[float], unrel: list[float], xlabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    both = rel + unrel
    bins = np.linspace(min(both), max(both), 21) if max(both) > min(both) else 10
    if rel:
        ax.hist(rel, bins=bins, color="#2a9d8f", alpha=0.8, label=f"reliable ({len(rel)})")
    if unrel:
        ax.hist(unrel, bins=bins, color="#e76f51", alpha=0.8, label=f"unreliable ({len(unrel)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("unlabeled images")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _section_selection(run: _Run) -> str:
    if "selection" not in expected_stages(run):
        return _note("this method does not select (no query lists, no reliable split).")
    if stage_status(run, "selection") == "missing":
        return _note("selection/ is missing: the run stopped before the selection.", "warn")
    split = run.json("selection", "unlabeled_split.json")
    meta = run.json("selection", "selection_meta.json") or {}
    out = []
    if split is None:
        out.append(_note("selection/unlabeled_split.json is missing.", "warn"))
    else:
        out.append(_split_html(run, split, meta))
    out.append(_queries_html(run.json("selection", "queries.json")))
    return "".join(out)


def _split_html(run: _Run, split: dict[str, Any], meta: dict[str, Any]) -> str:
    rel = [e["score"] for e in split.get("reliable", []) if e.get("score") is not None]
    unrel = [e["score"] for e in split.get("unreliable", []) if e.get("score") is not None]
    how = meta.get("selection", "cisc")
    xlabel = {
        "cisc": "D: distance to the class anchors (lower = reliable)",
        "stpp": "stability across stage-1 checkpoints (higher = reliable)",
    }.get(how, "score")
    out = ""
    if rel or unrel:
        out += _fig_img(_score_histogram(rel, unrel, xlabel), "selection scores")
    else:
        out += _note("no selection scores (the split is not score-based).")
    quality = run.json("selection", "half_quality.json") or {}
    rows = []
    for half in ("reliable", "unreliable"):
        entries, q = split.get(half, []), quality.get(half)
        rows.append(
            [half, str(len(entries)), _pct(q.get("miou"), "-") if isinstance(q, dict) else "no gt"]
        )
    out += _table(["half", "images", "pseudo0 mIoU vs gt"], rows, "num")
    return out + _note(
        f"selection: {how}; pseudo-label mIoU of each half against its ground "
        "truth, where it exists (paper Fig. 10)."
    )


def _queries_html(queries: dict[str, Any] | None) -> str:
    if queries is None:
        return _note("selection/queries.json is missing.", "warn")
    rows = []
    for name, entries in queries.items():
        ids = [e.get("id", "?") for e in entries[:3]]
        more = " ..." if len(entries) > 3 else ""
        rows.append([_esc(name), str(len(entries)), _esc(", ".join(ids) + more)])
    return "<h3>Query lists (labeled images per class)</h3>" + _table(
        ["class", "queries", "first ids"], rows
    )


# --------------------------------------------------------------------------- galleries


def _load_model(run: _Run, stage: str):
    """(model, meta) of a stage's checkpoint, or (None, reason)."""
    from ciscr.loading import load_model_from_checkpoint

    path = run.dir / stage / "checkpoint.pt"
    if not path.is_file():
        return None, f"{stage}/checkpoint.pt is missing"
    try:
        return load_model_from_checkpoint(path, run.device)
    except CiscrError as err:
        return None, str(err)


def _read_label(path: Path, k: int, ignore: int) -> np.ndarray | None:
    from ciscr.data.io import read_mask

    if not path.is_file():
        return None
    try:
        return read_mask(path, k, ignore)
    except DataError:
        return None


def pick_class(label: np.ndarray, k: int, background: int | None, min_ratio: float) -> int:
    """The most frequent non-background class of a pseudo label covering >= ``min_ratio`` of
    its valid pixels, or -1 (the figure's stand-in for the training rule's random pick)."""
    counts = np.bincount(label[label < k].ravel(), minlength=k)[:k].astype(np.int64)
    valid = counts.sum()
    if background is not None and 0 <= background < k:
        counts[background] = 0
    best = int(counts.argmax())
    return best if counts[best] > 0 and counts[best] >= min_ratio * valid else -1


def _gallery_ids(run: _Run, unlabeled: list, n: int) -> list[tuple[str, str]]:
    """(id, half) for n unlabeled images, alternating reliable / unreliable where split."""
    split = run.json("selection", "unlabeled_split.json") or {}
    rel = [e["id"] for e in split.get("reliable", [])]
    unrel = [e["id"] for e in split.get("unreliable", [])]
    if not rel and not unrel:
        return [(s.id, "") for s in spread(unlabeled, n)]
    a = [(i, "reliable") for i in spread(rel, n - min(len(unrel), n // 2))]
    b = [(i, "unreliable") for i in spread(unrel, n - len(a))]
    return [x for pair in zip(a, b, strict=False) for x in pair] + a[len(b) :] + b[len(a) :]


def _section_cisc(run: _Run, n: int) -> str:
    data = run.dataset()
    if data is None:
        return _note(f"skipped: {run._data_error}", "warn")
    info, labeled, unlabeled, _ = data
    labels = run.dir / "pseudo0" / "labels"
    if not labels.is_dir():
        return _note(
            "skipped: no pseudo0 labels (method without self-training, or the run "
            "stopped before pseudo-labelling)."
        )
    model, meta = _load_model(run, "stage1")
    if model is None:
        return _note(f"skipped: {meta}", "warn")
    queries = run.json("selection", "queries.json") or {}
    by_id = {s.id: s for s in labeled}
    figs, skipped = [], []
    for uid, half in _gallery_ids(run, [s for s in unlabeled], n * 3):
        if len(figs) >= n:
            break
        fig = _cisc_one(run, model, meta, uid, half, labels, queries, by_id, unlabeled)
        if isinstance(fig, str):
            skipped.append(fig)
        else:
            figs.append(_fig_img(fig, f"CISC map of {uid}"))
    out = _note(
        "CISC maps computed now with the stage-1 model (M0, the stage-2 teacher): the "
        "class is the most frequent non-background class of the pseudo label, the query "
        "the first labeled image of its query list."
    )
    out += "".join(figs) or _note("no image could be drawn: " + "; ".join(skipped[:3]), "warn")
    return out


def _class_and_query(run: _Run, pl: np.ndarray, meta, queries, by_id) -> tuple[int, Any, str]:
    """(class, query id or None, a remark for the title); class -1 if none can be shown."""
    from ciscr.data.io import read_mask

    k, ign, names = meta["num_classes"], run.cfg.data.ignore_index, meta["class_names"]
    data = run.dataset()
    bg = data[0].background_class if data else run.cfg.data.background_class
    cls, remark = pick_class(pl, k, bg, run.cfg.method.min_class_ratio), ""
    if cls < 0:
        # A barely trained M0 may predict background only: show the class with the longest
        # query list instead, and say so.
        ranked = [c for c in range(k) if c != bg and queries.get(names[c])]
        if not ranked:
            return -1, None, ""
        cls = max(ranked, key=lambda c: len(queries[names[c]]))
        remark = f"; '{names[cls]}' is not in the pseudo label"
    qid = next((e["id"] for e in queries.get(names[cls], []) if e.get("id") in by_id), None)
    if qid is None:  # no selection: any labeled image showing the class will do
        hits = (i for i, s in by_id.items() if (read_mask(s.mask, k, ign) == cls).any())
        qid = next(hits, None)
    return cls, qid, remark


def _cisc_one(run, model, meta, uid, half, labels, queries, by_id, unlabeled):
    """One gallery figure, or a string saying why this image was skipped."""
    from ciscr.data.io import read_image, read_mask
    from ciscr.visualize import cisc_figure

    k, ign = meta["num_classes"], run.cfg.data.ignore_index
    sample = next((s for s in unlabeled if s.id == uid), None)
    pl = _read_label(labels / f"{uid}.png", k, ign)
    if sample is None or pl is None:
        return f"{uid}: no pseudo label or not in the unlabeled split"
    cls, qid, remark = _class_and_query(run, pl, meta, queries, by_id)
    if cls < 0:
        return f"{uid}: no non-background class to show"
    if qid is None:
        return f"{uid}: no labeled image of '{meta['class_names'][cls]}'"
    q = by_id[qid]
    title = f"{uid}" + (f" ({half})" if half else "") + f" vs query {qid}{remark}"
    lab_mask = read_mask(q.mask, k, ign)
    return cisc_figure(
        model,
        read_image(sample.image),
        read_image(q.image),
        lab_mask,
        cls,
        meta,
        pseudo=pl,
        title=title,
    )


def _accuracy(pred: np.ndarray, gt: np.ndarray | None, ignore: int) -> str:
    if gt is None or pred.shape != gt.shape:
        return ""
    valid = gt != ignore
    return f" ({(pred[valid] == gt[valid]).mean():.0%} px)" if valid.any() else ""


def _grid_figure(
    rows: list[list[tuple[str, np.ndarray | None]]],
    row_labels: list[str],
    names: Sequence[str],
    palette: Sequence[Sequence[int]],
):
    """A grid of RGB panels (rows of (title, image or None = empty cell)) with a legend of
    the class colours."""
    from matplotlib.figure import Figure

    from ciscr.visualize import class_legend

    ncols = max(len(r) for r in rows)
    fig = Figure(figsize=(2.6 * ncols, 2.5 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (cells, label) in enumerate(zip(rows, row_labels, strict=True)):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(cells) and cells[c][1] is not None:
                ax.imshow(cells[c][1], interpolation="nearest")
                ax.set_title(cells[c][0], fontsize="small")
            else:
                ax.set_axis_off()
        axes[r][0].set_ylabel(label, fontsize="small")
    class_legend(fig, names, palette)
    return fig


def _section_labels(run: _Run, n: int) -> str:
    from ciscr.data.io import read_image
    from ciscr.visualize import colorize, fit_size

    data = run.dataset()
    if data is None:
        return _note(f"skipped: {run._data_error}", "warn")
    info, _, unlabeled, _ = data
    k, ign = info.num_classes, run.cfg.data.ignore_index
    sets = [s for s in PSEUDO_SETS if (run.dir / s / "labels").is_dir()]
    if "pseudo0" not in sets:
        return _note("skipped: no pseudo0 labels.")
    rows, labels = [], []
    for s in spread(
        [u for u in unlabeled if (run.dir / "pseudo0/labels" / f"{u.id}.png").is_file()], n
    ):
        gt = _read_label(Path(s.mask), k, ign) if s.mask else None
        cells = [("image", fit_size(read_image(s.image), 384))]
        for name in sets:
            pl = _read_label(run.dir / name / "labels" / f"{s.id}.png", k, ign)
            img = None if pl is None else fit_size(colorize(pl, info.palette, ign), 384, True)
            cells.append((name + ("" if pl is None else _accuracy(pl, gt, ign)), img))
        cells.append(
            (
                "ground truth",
                None if gt is None else fit_size(colorize(gt, info.palette, ign), 384, True),
            )
        )
        rows.append(cells)
        labels.append(s.id)
    if not rows:
        return _note("no pseudo label to show.", "warn")
    out = _fig_img(
        _grid_figure(rows, labels, info.class_names, info.palette), "pseudo labels before and after"
    )
    return out + _note(
        "Pseudo labels before (pseudo0) and after (later sets); % = pixel "
        "accuracy against the ground truth where it exists."
    )


def _section_predictions(run: _Run, n: int) -> str:
    from ciscr.data.io import read_image

    data = run.dataset()
    if data is None:
        return _note(f"skipped: {run._data_error}", "warn")
    info, _, _, val = data
    final = _final_stage(run)
    model, meta = _load_model(run, final)
    if model is None:
        return _note(f"skipped: {meta} (final stage {final})", "warn")
    rows, labels = [], []
    for s in spread(val, n):
        rows.append(
            _prediction_row(model, meta, read_image(s.image), s.mask, run.cfg.data.ignore_index)
        )
        labels.append(s.id)
    if not rows:
        return _note("the validation split is empty.", "warn")
    grid = _grid_figure(rows, labels, meta["class_names"], meta["palette"])
    out = _fig_img(grid, "predictions vs ground truth")
    return out + _note(
        f"Final model ({final}, last checkpoint), one whole-image forward pass; "
        "errors: red = wrong, grey = void in the ground truth."
    )


def _prediction_row(model, meta, image: np.ndarray, mask_path, ignore: int):
    from ciscr.visualize import colorize, fit_size, predict_label

    image = fit_size(image, 512)
    k = meta["num_classes"]
    pred = predict_label(model, image, meta["mean"], meta["std"])
    gt = _read_label(Path(mask_path), k, ignore) if mask_path else None
    if gt is not None:
        gt = fit_size(gt, 512, nearest=True)
    cells = [
        ("image", image),
        ("prediction" + _accuracy(pred, gt, ignore), colorize(pred, meta["palette"], ignore)),
    ]
    if gt is not None:
        err = np.full(gt.shape + (3,), 255, np.uint8)
        err[(pred != gt) & (gt != ignore)] = (220, 40, 40)
        err[gt == ignore] = (160, 160, 160)
        cells += [("ground truth", colorize(gt, meta["palette"], ignore)), ("errors", err)]
    return cells


# --------------------------------------------------------------------------- the page

def _section_time(run: _Run) -> str:
    """Training / evaluation / pseudo-labelling / selection seconds of every finished stage."""
    from ciscr.timing import NOTE, stage_time_rows, time_table

    rows = stage_time_rows(run.dir)
    if not rows:
        return _note("no stage has a time record yet (done.json without wall_seconds).")
    header, body = time_table(rows)
    cells = [[_esc(c) for c in r] for r in body]
    return _table([_esc(h) for h in header], cells, "num") + _note(f"Seconds {NOTE}.")


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
 color:#1d2433;background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:1.2em 1.6em 4em;background:#fff}
h1{margin:.2em 0 .4em;font-size:1.7em}h2{border-bottom:2px solid #dde3ea;padding-bottom:.2em;
 margin-top:2em}h3{margin:1.2em 0 .4em}
nav a{margin-right:1em;color:#2b5d9b;text-decoration:none}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d5dbe3;padding:.25em .6em;text-align:left}
thead th{background:#eef2f6}table.num td+td{text-align:right}
table.kv thead{display:none}table.kv td:first-child{font-weight:600;background:#f4f6f9}
img{max-width:100%;height:auto;display:block;margin:.6em 0}
pre{background:#f4f6f9;padding:.8em;overflow:auto;font-size:.85em}
.note{color:#4a5568;font-size:.9em;margin:.4em 0}
.note.warn{color:#8a4b00;background:#fff4e0;border-left:4px solid #f0a020;padding:.4em .6em}
.st{padding:0 .5em;border-radius:3px;font-size:.85em}
.st.done{background:#d8f3e3}.st.incomplete{background:#ffe7c2}.st.missing{background:#fbd5d5}
details summary{cursor:pointer;font-weight:600}
"""

SECTIONS: tuple[tuple[str, str], ...] = (
    ("config", "Configuration"),
    ("curves", "Training curves"),
    ("iou", "Per-class IoU"),
    ("pseudo", "Pseudo-label quality"),
    ("selection", "Selection"),
    ("time", "Time per stage"),
    ("cisc", "CISC maps"),
    ("labels", "Pseudo labels before / after"),
    ("predictions", "Predictions vs ground truth"),
)


def _safe(fn: Callable[..., str], *args: Any) -> str:
    """A section's HTML, or a note if it failed: a report must never lose a finished run."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - deliberately broad, see the module docstring
        log.warning("report: section %s failed", fn.__name__, exc_info=True)
        return _note(f"this section could not be drawn ({type(err).__name__}: {err})", "warn")


def build_html(run_dir: Path, *, max_gallery: int = 6, device: str = "cpu") -> str:
    """The report page of a run directory as one HTML string (see the module docstring)."""
    run = _read_run(Path(run_dir), device)
    n = max(0, max_gallery)
    builders: dict[str, Callable[[], str]] = {
        "config": lambda: _section_config(run),
        "curves": lambda: _section_curves(run),
        "iou": lambda: _section_iou(run),
        "pseudo": lambda: _section_pseudo_quality(run),
        "selection": lambda: _section_selection(run),
        "time": lambda: _section_time(run),
        "cisc": lambda: _section_cisc(run, n) if n else _note(NO_GALLERY),
        "labels": lambda: _section_labels(run, n) if n else _note(NO_GALLERY),
        "predictions": lambda: _section_predictions(run, n) if n else _note(NO_GALLERY),
    }
    header = _safe(_section_header, run)
    body = [
        f'<section id="{key}"><h2>{_esc(title)}</h2>{_safe(builders[key])}</section>'
        for key, title in SECTIONS
    ]
    nav = "".join(f'<a href="#{k}">{_esc(t)}</a>' for k, t in SECTIONS)
    method = (run.results or {}).get("method") or (run.cfg.method.name if run.cfg else "run")
    title = f"ciscr report: {method} - {run.dir.resolve().name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{_esc(title)}</h1><nav>{nav}</nav><section id="summary">{header}</section>'
        + "".join(body)
        + "</main></body></html>\n"
    )


def write_report(run_dir: Path, *, max_gallery: int = 6, device: str = "cpu") -> Path:
    """Write ``RUN/report.html`` atomically and return its path.

    Args:
        run_dir: a run directory of ``ciscr train`` / ``ciscr run`` (complete or not).
        max_gallery: images per gallery (CISC maps, pseudo labels, predictions); 0 = none.
        device: where the galleries' forward passes run (``cpu`` by default: the report must
            not compete with a training job for GPU memory).

    Raises:
        DataError: ``run_dir`` is not a run directory.
    """
    from ciscr.utils.io import atomic_write

    run_dir = Path(run_dir)
    page = build_html(run_dir, max_gallery=max(0, max_gallery), device=device)
    out = run_dir / REPORT_NAME
    atomic_write(out, lambda tmp: _write_readable(tmp, page))
    return out


def _write_readable(tmp: Path, page: str) -> None:
    tmp.write_text(page, encoding="utf-8")
    # mkstemp creates 0600 files; a report is meant to be shared (e.g. served over HTTP).
    os.chmod(tmp, 0o644)


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``ciscr report`` to the CLI (called by ciscr.cli while it builds its parser)."""
    from ciscr.commands import command

    p = sub.add_parser(
        "report",
        help="(re)build RUN_DIR/report.html, one self-contained page",
        description="Writes RUN_DIR/report.html: curves, IoU tables, pseudo-label "
        "quality, selection and image galleries, with every figure inline.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory (--out of run)")
    p.add_argument(
        "--max-gallery",
        type=int,
        default=6,
        metavar="N",
        help="images per gallery (default 6; 0 = no galleries)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    command("report")(_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    print(write_report(args.run_dir, max_gallery=args.max_gallery, device=args.device))
    return 0


__all__ = [
    "build_html",
    "expected_stages",
    "pick_class",
    "read_train_log",
    "register_cli",
    "stage_status",
    "write_report",
]
