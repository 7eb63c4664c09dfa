"""Is the CISC map a reliability signal? A diagnostic of a finished CISC-R run (stage 1 + pseudo0).

    python benchmarks/camvid_diagnostics.py runs/camvid-bench/ciscr_l0.125_s0

The premise of rectification (Eq. 7) is that the per-pixel weight ``w = 1 - |m_u - m'_u|`` is
high where the pseudo label is right and low where it is wrong. This measures it on the
unlabeled pool, whose ground truth the benchmark has (it never enters training):

- for every unlabeled image, its stage-1 pseudo label y (``pseudo0``), the stage-1 model M0 (the
  stage-2 teacher) and, for each pixel, the CISC map of the pixel's OWN pseudo class k = y(p)
  against the prototype of a labeled image drawn from the class-k query list (CS lists of the
  run, one draw per image and class, seeded), so w(p) = m'(p) as in the all-class bank mode;
- the same with a labeled image drawn from ALL labeled images containing k (the paper's RS);
- the same with the CS lists built with the class-balanced Eq. 10 (``method.distance=balanced``);
- and, as the reference every self-training paper thresholds on, M0's softmax confidence.

Each signal is scored by the AUROC of separating correctly from wrongly pseudo-labelled pixels
(0.5 = no information) and by its mean on both; pixels are read on a 1-in-4 grid.

It also splits the unlabeled pool into reliable / unreliable halves by the CISC distance (Eq.
10, summed over the pseudo classes, Algorithm 1) in both forms, the paper's pixel mean and the
balanced one, and scores each half's pseudo labels against the ground truth (paper Fig. 10
shape). The pixel-mean split is the run's own selection, recomputed: it must match
``selection/half_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ciscr.cisc import anchor_distance, cisc_map  # noqa: E402
from ciscr.engine.evaluate import ConfusionMatrix  # noqa: E402
from ciscr.pseudo import eval_mode, load_eval_image, read_labels  # noqa: E402
from ciscr.selection import (  # noqa: E402
    class_anchors,
    class_fractions,
    compute_labeled_prototypes,
    image_distances,
    query_eligible,
    query_lists_cs,
    split_unlabeled_cisc,
)
from ciscr.utils.io import atomic_write_json  # noqa: E402
from ciscr.utils.misc import autocast  # noqa: E402

BINS = 200
STEP = 4  # pixel subsampling of the statistics


def auroc_from_hist(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC of a score in [0, 1] from its histograms on positives and negatives (ties count
    one half): P(score of a random positive > score of a random negative)."""
    p, n = pos.astype(np.float64), neg.astype(np.float64)
    if p.sum() == 0 or n.sum() == 0:
        return float("nan")
    below = np.cumsum(n) - n  # negatives in strictly lower bins
    return float((p * (below + 0.5 * n)).sum() / (p.sum() * n.sum()))


def own_class_map(feats: torch.Tensor, y: torch.Tensor, protos: dict[int, torch.Tensor]) -> torch.Tensor:
    """(H, W) CISC value of each pixel against the prototype of its own pseudo class (0 where the
    class has no prototype). feats (1, C, h, w), y (H, W) long, protos: class -> (C,)."""
    out = torch.zeros(y.shape, dtype=torch.float32)
    for k, v in protos.items():
        region = y == k
        if region.any():
            out[region] = cisc_map(feats, v.view(1, -1), tuple(y.shape))[0][region]
    return out


class Tally:
    """Histograms of one signal over correct and wrong pixels."""

    def __init__(self) -> None:
        self.pos = np.zeros(BINS, np.int64)
        self.neg = np.zeros(BINS, np.int64)

    def add(self, score: torch.Tensor, correct: torch.Tensor) -> None:
        b = (score.clamp(0, 1) * (BINS - 1)).round().long().numpy()
        c = correct.numpy()
        self.pos += np.bincount(b[c], minlength=BINS)
        self.neg += np.bincount(b[~c], minlength=BINS)

    def summary(self) -> dict[str, float]:
        centres = np.linspace(0, 1, BINS)
        return {
            "auroc": auroc_from_hist(self.pos, self.neg),
            "mean_correct": float((self.pos * centres).sum() / max(self.pos.sum(), 1)),
            "mean_wrong": float((self.neg * centres).sum() / max(self.neg.sum(), 1)),
            "pixels_correct": int(self.pos.sum()),
            "pixels_wrong": int(self.neg.sum()),
        }


def draw_prototypes(lists: dict[int, list[int]], bank: torch.Tensor, rng) -> dict[int, torch.Tensor]:
    return {k: bank[ids[rng.integers(len(ids))], k] for k, ids in lists.items() if ids}


def balanced_cs_lists(run, m0, kw: dict, anchors: torch.Tensor) -> dict[int, list[int]]:
    """The CS query lists (as indices into ``run.labeled``) that ``method.distance=balanced``
    would build from this run's stage-1 model: same eligibility rule, balanced D_k."""
    d, frac = image_distances(m0, run.labeled, "gt", anchors, return_fractions=True,
                              balanced=True, **kw)
    ids = [s.id for s in run.labeled]
    lists = query_lists_cs(ids, query_eligible(frac, run.cfg.method.query_min_class_ratio), d)
    index = {sid: i for i, sid in enumerate(ids)}
    return {k: [index[i] for i in v] for k, v in lists.items()}


def half_quality(halves: tuple[list[str], list[str]], conf: dict[str, torch.Tensor],
                 k: int) -> dict:
    """Pseudo-label mIoU of each half (reliable, unreliable), pooling its images' confusion."""
    out = {}
    for name, half in zip(("reliable", "unreliable"), halves, strict=True):
        cm = ConfusionMatrix(k)
        cm.mat = sum(conf[i] for i in half)
        out[name] = cm.compute()["miou"]
    return out


def diagnose(run_dir: Path, max_images: int = 0) -> dict[str, Any]:
    """The signals' statistics over the run's unlabeled images (all, or ``max_images``)."""
    from camvid_figures import RunView

    run = RunView(run_dir)
    m0, meta = run.model("stage1")
    d, amp = run.cfg.data, run.cfg.train.amp
    kw = {"num_classes": run.k, "mean": d.mean, "std": d.std, "amp": amp, "ignore_index": run.ign}
    bank, present = compute_labeled_prototypes(m0, run.labeled, **kw)
    anchors = class_anchors(bank, present)
    index = {s.id: i for i, s in enumerate(run.labeled)}
    queries = json.loads((run_dir / "selection" / "queries.json").read_text())
    lists = {
        "cisc_cs": {k: [index[e["id"]] for e in queries.get(n, []) if e.get("id") in index]
                    for k, n in enumerate(meta["class_names"])},
        "cisc_all_labeled": {k: np.flatnonzero(present[:, k].numpy()).tolist()
                             for k in range(run.k)},
        "cisc_cs_balanced": balanced_cs_lists(run, m0, kw, anchors),
    }
    tallies = {name: Tally() for name in (*lists, "confidence", "cisc_x_confidence")}
    dists: dict[str, list[np.ndarray]] = {"pixel": [], "balanced": []}  # Eq. 10, per image
    pseudo_present: list[np.ndarray] = []
    conf: dict[str, torch.Tensor] = {}
    rng = np.random.default_rng(0)
    samples = run.unlabeled[:max_images] if max_images else run.unlabeled
    with eval_mode(m0), torch.no_grad():
        for s in samples:
            img = load_eval_image(s, d.mean, d.std, "cpu")
            size = tuple(img.shape[-2:])
            pl = read_labels(s, run_dir / "pseudo0" / "labels", size, run.k, run.ign)
            y = torch.from_numpy(np.array(pl, dtype=np.int64))
            gt = torch.from_numpy(np.array(read_labels(s, "gt", size, run.k, run.ign), np.int64))
            with autocast("cpu", amp):
                out = m0(img)
            prob = torch.softmax(out.logits.float(), 1)[0].amax(0)
            feats = out.features.float()
            sub = (slice(None, None, STEP), slice(None, None, STEP))
            valid = ((gt != run.ign) & (y != run.ign))[sub]
            correct = (y == gt)[sub][valid]
            w = {}
            for name, ls in lists.items():
                w[name] = own_class_map(feats, y, draw_prototypes(ls, bank, rng))
                tallies[name].add(w[name][sub][valid], correct)
            tallies["confidence"].add(prob[sub][valid], correct)
            tallies["cisc_x_confidence"].add((w["cisc_cs"] * prob)[sub][valid], correct)
            for form, rows in dists.items():
                rows.append(anchor_distance(feats, y.unsqueeze(0), anchors, ignore_index=run.ign,
                                            balanced=form == "balanced")[0].numpy())
            pseudo_present.append(class_fractions(pl, run.k) > 0)
            cm = ConfusionMatrix(run.k, ignore_index=run.ign)
            cm.update(y, gt)  # as the run scores its halves (pseudo labels have no void)
            conf[s.id] = cm.mat
    res: dict[str, Any] = {name: t.summary() for name, t in tallies.items()}
    # Algorithm 1's split, by the library's own function, once per form of the distance.
    ids = [s.id for s in samples]
    halves = {form: split_unlabeled_cisc(ids, np.stack(rows), np.stack(pseudo_present))[:2]
              for form, rows in dists.items()}
    res["halves"] = {form: half_quality(h, conf, run.k) for form, h in halves.items()}
    res["images"] = len(samples)
    if not max_images:
        res["same_split_as_run"] = same_side_share(run_dir, halves["pixel"][0], ids)
    return res


def same_side_share(run_dir: Path, reliable: list[str], ids: list[str]) -> float:
    """Share of the images that the recomputed pixel-mean split puts on the same side as the
    run's own selection did (1.0 = this script reproduces Algorithm 1 exactly)."""
    split = json.loads((run_dir / "selection" / "unlabeled_split.json").read_text())
    theirs, ours = {e["id"] for e in split["reliable"]}, set(reliable)
    return sum((i in ours) == (i in theirs) for i in ids) / len(ids)


def cached(run_dir: Path) -> dict[str, Any]:
    """diagnose(), stored in RUN/diagnostics.json (computed once; delete the file to redo)."""
    path = run_dir / "diagnostics.json"
    if path.exists():
        res = json.loads(path.read_text())
        if all(key in res for key in (*LABELS, "halves")):  # else: from an older version
            return res
    res = diagnose(run_dir)
    atomic_write_json(path, res)
    return res


LABELS = {
    "cisc_cs": "CISC weight, query from the CS list (as trained)",
    "cisc_all_labeled": "CISC weight, query from any labeled image with the class (RS-like)",
    "cisc_cs_balanced": "CISC weight, query from the CS list of the balanced Eq. 10 "
                        "(`method.distance=balanced`)",
    "confidence": "M0 softmax confidence (reference)",
    "cisc_x_confidence": "CISC weight (CS list) x M0 confidence (`method.confidence_weighting`)",
}


def markdown(results: list[dict[str, Any]], run_dirs: list[Path]) -> list[str]:
    """A table of the signals, mean ± std over runs (seeds)."""
    import statistics

    def ms(key: str, field: str) -> str:
        xs = [r[key][field] for r in results]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.fmean(xs):.3f}" + (f" ± {sd:.3f}" if len(xs) > 1 else "")

    rows = ["| signal | AUROC correct vs wrong | mean on correct px | mean on wrong px |",
            "|---|---|---|---|"]
    for key, label in LABELS.items():
        rows.append(f"| {label} | {ms(key, 'auroc')} | {ms(key, 'mean_correct')} | "
                    f"{ms(key, 'mean_wrong')} |")
    wrong = [r["confidence"]["pixels_wrong"] / max(r["confidence"]["pixels_wrong"]
                                                   + r["confidence"]["pixels_correct"], 1)
             for r in results]
    runs = ", ".join(f"`{Path(d).name}`" for d in run_dirs)
    halves = ["| Eq. 10 distance | reliable half | unreliable half | gap |", "|---|---|---|---|"]
    for form, label in (("pixel", "pixel mean (the paper; the runs' own selection)"),
                        ("balanced", "class-balanced (`method.distance=balanced`)")):
        rel = [100 * r["halves"][form]["reliable"] for r in results]
        unrel = [100 * r["halves"][form]["unreliable"] for r in results]
        gap = [a - b for a, b in zip(rel, unrel, strict=True)]
        halves.append(f"| {label} | {pm(rel)} | {pm(unrel)} | {pm(gap)} |")
    return [f"Over {len(results)} run(s) ({runs}; {results[0]['images']} unlabeled images each, "
            f"{100 * statistics.fmean(wrong):.1f}% of the sampled pixels wrongly pseudo-labelled "
            "on average):", "", *rows, "",
            "Pseudo-label mIoU (%) of the reliable / unreliable halves of the unlabeled pool when "
            "Algorithm 1 ranks images by each form of the Eq. 10 distance (stage-1 model and "
            "labels of the same runs; the pixel-mean split recomputed here puts "
            f"{pm([100 * r.get('same_split_as_run', float('nan')) for r in results])}% of the "
            "images on the same side as the runs' own selection did):", "", *halves]


def pm(xs: list[float]) -> str:
    """mean ± std (plain mean for one value), two decimals."""
    import statistics

    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--max-images", type=int, default=0, help="0 = every unlabeled image")
    a = p.parse_args(argv)
    res = diagnose(a.run_dir, a.max_images)
    print("\n".join(markdown([res], [a.run_dir])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
