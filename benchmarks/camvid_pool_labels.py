"""The base's pseudo labels of the unlabeled pool, class by class, and what a confidence
threshold keeps of them: the diagnostic behind CISC-R's confidence threshold
(docs/METHOD-NOTES.md, "Recipe changes made from measurements").

    python benchmarks/camvid_pool_labels.py runs/camvid/ciscr_s0

Reads a finished stage-wise run's ``pseudo0/`` (the base's TTA labels and the teacher's
confidence maps, ``labels/_confidence``) and scores them against the pool's ground truth, which
never enters training. Per class: its share of the pool's pixels, the share the pseudo labels
give it (1.0 = as many pixels as the truth has), recall, precision and the class its missed
pixels go to most; then the pseudo labels' mIoU and the share of pixels kept at each threshold.
The result is cached in RUN/pool_labels.json (``cached``), which the CamVid report reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ciscr.pseudo import CONF_DIR  # noqa: E402
from ciscr.utils.io import atomic_write_json  # noqa: E402

THRESHOLDS = (0.0, 0.9, 0.95)  # none; the option row's; the online methods' and CISC-R's default


def confusions(run_dir: Path) -> tuple[list[str], dict[float, np.ndarray]]:
    """Class names and, per threshold, the (K, K) confusion matrix (rows = truth) of the pseudo
    labels whose teacher confidence is >= the threshold."""
    from camvid_figures import RunView
    from PIL import Image

    run = RunView(run_dir)
    k, labels = run.k, run_dir / "pseudo0" / "labels"
    mats = {t: np.zeros((k, k), np.int64) for t in THRESHOLDS}
    for s in run.unlabeled:
        gt = run.gt(s).astype(np.int64)
        y = run.pseudo("pseudo0", s.id).astype(np.int64)
        # uint8 palette PNG: the index is the confidence x 255 (ciscr.pseudo)
        conf = np.asarray(Image.open(labels / CONF_DIR / f"{s.id}.png"), np.float64) / 255
        valid = (gt < k) & (y < k)
        for t, mat in mats.items():
            keep = valid & (conf >= t - 1e-9)  # uint8 confidence: 1/255 steps
            mat += np.bincount(gt[keep] * k + y[keep], minlength=k * k).reshape(k, k)
    return list(run.info.class_names), mats


def summarise(names: list[str], mats: dict[float, np.ndarray]) -> dict[str, Any]:
    """Per-class statistics of the unthresholded labels and mIoU / kept share per threshold."""
    full = mats[0.0]
    gt_px, pred_px, tp = full.sum(1), full.sum(0), np.diag(full)
    classes = []
    for c, name in enumerate(names):
        missed = full[c].copy()
        missed[c] = 0
        classes.append({
            "name": name, "gt_share": gt_px[c] / max(gt_px.sum(), 1),
            "label_over_gt": pred_px[c] / max(gt_px[c], 1),
            "recall": tp[c] / max(gt_px[c], 1), "precision": tp[c] / max(pred_px[c], 1),
            "missed_to": names[int(missed.argmax())],
            "missed_to_share": missed.max() / max(gt_px[c], 1),
            # what the default threshold leaves of the class in the unlabeled loss
            "label_over_gt_095": mats[0.95].sum(0)[c] / max(gt_px[c], 1)})
    thresholds = []
    for t, mat in mats.items():
        inter = np.diag(mat)
        union = mat.sum(0) + mat.sum(1) - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
        thresholds.append({"threshold": t, "miou": float(np.nanmean(iou)),
                           "kept": mat.sum() / max(full.sum(), 1),
                           "wrong": 1 - inter.sum() / max(mat.sum(), 1)})
    return {"classes": classes, "thresholds": thresholds}


def cached(run_dir: Path) -> dict[str, Any]:
    """summarise(confusions()) stored in RUN/pool_labels.json (computed once)."""
    path = run_dir / "pool_labels.json"
    if path.exists():
        return json.loads(path.read_text())
    res = summarise(*confusions(run_dir))
    atomic_write_json(path, res)
    return res


def markdown(res: dict[str, Any]) -> list[str]:
    rows = ["| class | share of the pool's pixels | labelled share / true share | recall | "
            "precision | its missed pixels go most to | labelled share / true share, "
            "confidence >= 0.95 |", "|---|---|---|---|---|---|---|"]
    for c in res["classes"]:
        rows.append(f"| {c['name']} | {100 * c['gt_share']:.2f}% | {c['label_over_gt']:.2f} | "
                    f"{c['recall']:.2f} | {c['precision']:.2f} | {c['missed_to']} "
                    f"({100 * c['missed_to_share']:.0f}% of its pixels) | "
                    f"{c['label_over_gt_095']:.2f} |")
    thr = ["| teacher confidence >= | pixels kept | wrong among kept | pseudo-label mIoU (%) |",
           "|---|---|---|---|"]
    for t in res["thresholds"]:
        thr.append(f"| {t['threshold']:g} | {100 * t['kept']:.1f}% | {100 * t['wrong']:.1f}% | "
                   f"{100 * t['miou']:.2f} |")
    return [*rows, "", *thr]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished stage-wise run with pseudo0/")
    args = p.parse_args(argv)
    if not (args.run_dir / "pseudo0" / "done.json").exists():
        raise SystemExit(f"{args.run_dir}: no finished pseudo0/ (run a stage-wise method first)")
    print("\n".join(markdown(cached(args.run_dir))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
