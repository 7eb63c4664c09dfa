"""Protocol 4's diagnostics: what the unlabeled branch could learn from, per class.

    python benchmarks/camvid_labels_diagnostics.py RUN_DIR [RUN_DIR ...]
    python benchmarks/camvid_labels_diagnostics.py --all    # every finished run of the queue

Where a target of ``benchmarks/camvid_labels.py`` is missed, the issue asks what the
diagnostics show. For a finished run, its FINAL model (the last training stage's checkpoint)
labels the run's unlabeled pool the way an online step labels its weak view (eval mode,
softmax max and argmax, ``confidence_and_label``; the whole image, not a training crop). The
benchmark knows the pool's ground truth (it never enters training), so per class:

- ``gt_share``: the class's share of the pool's valid pixels;
- ``pseudo_iou``: IoU of the pseudo labels with the ground truth (what a teacher this good
  gives); ``pseudo_miou`` averages it over the classes; ``precision`` and ``recall`` split it:
  the share of the pixels labelled as the class that are right, and of the class's pixels
  labelled right (a low IoU from wrong labels, or from missed pixels);
- ``mask_ratio``: the share of the pixels labelled as the class whose confidence passes the
  run's ``method.confidence_threshold`` (the mask ratio per class; a run without one, SupOnly,
  is scored at the online methods' 0.95);
- ``mask_precision``: the share of those that are right;
- ``taught``: the share of the class's ground-truth pixels that pass AND are right: how much
  of the class the unlabeled loss teaches correctly;
- the AUROC of telling right from wrong pseudo labels by the confidence and by the CISC weight
  (``class_weights`` against the prototype bank of the labeled images through the same model,
  as UniMatch + CISC trains), on a 1-in-4 pixel grid.

A SupOnly run's final model is scored the same way: what its pseudo labels would have been.
The result is RUN_DIR/label_diagnostics.json (a top-level text file: the benchmark archives
it with the run); it needs the run's checkpoint, so it is computed while ``runs/`` has it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from camvid_diagnostics import STEP, Tally  # noqa: E402  (beside this file)

from ciscr.config import METHOD_PRESETS  # noqa: E402
from ciscr.engine.online import class_weights, confidence_and_label  # noqa: E402
from ciscr.pseudo import eval_mode, load_eval_image, read_labels  # noqa: E402
from ciscr.utils.io import atomic_write_json  # noqa: E402
from ciscr.utils.misc import autocast  # noqa: E402

OUT = "label_diagnostics.json"
COUNTS = ("gt", "pred", "hit", "passed", "passed_hit")  # per-class pixel counts


def final_stage(rd: Path) -> str:
    """The run's last training stage (the one whose checkpoint is its result)."""
    if (rd / "online" / "done.json").exists():
        return "online"
    stages = sorted((d.name for d in rd.glob("stage*") if (d / "done.json").exists()),
                    key=lambda s: int(s[5:]) if s[5:].isdigit() else -1)
    if not stages:
        raise FileNotFoundError(f"{rd}: no finished training stage")
    return stages[-1]


def count_pixels(label: torch.Tensor, passed: torch.Tensor, gt: torch.Tensor,
                 k: int, ignore_index: int) -> dict[str, np.ndarray]:
    """Per-class pixel counts of one image (COUNTS), void ground truth left out.
    label, gt: (H, W) long; passed: (H, W) bool (confidence >= threshold)."""
    valid = gt != ignore_index
    lab, g, ok = label[valid], gt[valid], passed[valid]
    hit = lab == g

    def bins(x: torch.Tensor) -> np.ndarray:
        return np.bincount(x.numpy(), minlength=k)[:k].astype(np.int64)

    return {"gt": bins(g), "pred": bins(lab), "hit": bins(lab[hit]), "passed": bins(lab[ok]),
            "passed_hit": bins(lab[ok & hit])}


def summarize(counts: dict[str, np.ndarray], names: list[str]) -> dict[str, Any]:
    """The per-class figures of the module docstring from the pooled pixel counts."""
    c = {key: v.astype(np.float64) for key, v in counts.items()}

    def ratio(a: np.ndarray, b: np.ndarray) -> list[float | None]:
        return [float(x / y) if y > 0 else None for x, y in zip(a, b, strict=True)]

    union = c["gt"] + c["pred"] - c["hit"]
    per_class = {"gt_share": ratio(c["gt"], np.full_like(c["gt"], c["gt"].sum())),
                 "pseudo_iou": ratio(c["hit"], union), "precision": ratio(c["hit"], c["pred"]),
                 "recall": ratio(c["hit"], c["gt"]), "mask_ratio": ratio(c["passed"], c["pred"]),
                 "mask_precision": ratio(c["passed_hit"], c["passed"]),
                 "taught": ratio(c["passed_hit"], c["gt"])}
    ious = [x for x in per_class["pseudo_iou"] if x is not None]
    total = max(c["gt"].sum(), 1.0)
    return {"classes": names, "per_class": per_class,
            "pseudo_miou": float(np.mean(ious)) if ious else None,
            "pseudo_acc": float(c["hit"].sum() / total),
            "mask_ratio": float(c["passed"].sum() / total),
            "mask_precision": float(c["passed_hit"].sum() / max(c["passed"].sum(), 1.0)),
            "taught": float(c["passed_hit"].sum() / total)}


def diagnose(rd: Path, max_images: int = 0) -> dict[str, Any]:
    """The figures of the module docstring for one run directory."""
    from camvid_figures import RunView

    from ciscr.online import labeled_bank

    run, stage = RunView(rd), final_stage(rd)
    model, meta = run.model(stage)
    d, m, amp = run.cfg.data, run.cfg.method, run.cfg.train.amp
    # A run without a threshold (SupOnly): the online methods' own, what UniMatch would pass.
    tau = float(m.confidence_threshold or METHOD_PRESETS["unimatch"]["confidence_threshold"])
    bank = labeled_bank(run.labeled, run.k, mean=d.mean, std=d.std, ignore_index=run.ign,
                        min_ratio=m.min_class_ratio, amp=amp, device="cpu")
    protos, known = bank(model, 0)
    counts = {key: np.zeros(run.k, np.int64) for key in COUNTS}
    tallies = {"confidence": Tally(), "cisc": Tally()}
    samples = run.unlabeled[:max_images] if max_images else run.unlabeled
    with eval_mode(model), torch.no_grad():
        for s in samples:
            img = load_eval_image(s, d.mean, d.std, "cpu")
            gt = torch.from_numpy(np.asarray(read_labels(s, "gt", tuple(img.shape[-2:]), run.k,
                                                         run.ign), dtype=np.int64))
            with autocast("cpu", amp):
                out = model(img)
            conf, label = (t[0] for t in confidence_and_label(out.logits))
            w = class_weights(out.features.float(), protos, known, label.unsqueeze(0))[0]
            for key, v in count_pixels(label, conf >= tau, gt, run.k, run.ign).items():
                counts[key] += v
            sub = (slice(None, None, STEP), slice(None, None, STEP))
            valid = (gt != run.ign)[sub]
            right = (label == gt)[sub][valid]
            tallies["confidence"].add(conf[sub][valid], right)
            tallies["cisc"].add(w[sub][valid], right)
    res = summarize(counts, list(meta["class_names"]))
    res.update({"stage": stage, "iteration": meta.get("iteration"), "threshold": tau,
                "images": len(samples), "auroc": {n: t.summary()["auroc"]
                                                   for n, t in tallies.items()}})
    return res


def finished_runs(runs_root: Path) -> list[Path]:
    """Every finished run (results.json) under the queue's runs folder with a checkpoint left."""
    return sorted(rd for rd in runs_root.glob("l*/*") if (rd / "results.json").exists()
                  and any(rd.glob("*/checkpoint.pt")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dirs", nargs="*", type=Path)
    p.add_argument("--all", action="store_true",
                   help="every finished run under --runs that has no diagnostics yet")
    p.add_argument("--runs", type=Path, default=REPO / "runs/camvid_labels")
    p.add_argument("--max-images", type=int, default=0, help="0 = every unlabeled image")
    p.add_argument("--force", action="store_true", help="recompute existing diagnostics")
    a = p.parse_args(argv)
    dirs = list(a.run_dirs) + (finished_runs(a.runs) if a.all else [])
    if not dirs:
        p.error("give run directories or --all")
    for rd in dirs:
        if (rd / OUT).exists() and not a.force:
            continue
        res = diagnose(rd, a.max_images)
        atomic_write_json(rd / OUT, res)
        print(f"{rd}: pseudo mIoU {100 * res['pseudo_miou']:.2f}, mask ratio "
              f"{100 * res['mask_ratio']:.1f}%, right where passed "
              f"{100 * res['mask_precision']:.1f}%, AUROC confidence "
              f"{res['auroc']['confidence']:.3f} / CISC {res['auroc']['cisc']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
