"""Figures of the CamVid benchmark, made from its run directories (``benchmarks/camvid.py``).

    python benchmarks/camvid_figures.py --runs runs/camvid-bench --out docs/results

Three PNGs, each a grid of a few images, chosen by a fixed rule (evenly spread over the sorted
ids, never by how good they look):

- ``<stem>_cisc_maps.png``: unlabeled images (half from the reliable, half from the unreliable
  CISC half), their stage-1 pseudo label, the labeled image queried for one class, and the CISC
  map of that class computed with the stage-1 model M0 (the stage-2 teacher).
- ``<stem>_pseudo_labels.png``: the same unlabeled images with their ground truth, the pseudo
  label before (M0) and after (the final CISC-R model) rectified training, and each label's mIoU
  against the ground truth.
- ``<stem>_predictions.png``: validation images, their ground truth and the predictions of
  SupOnly, ST++ and CISC-R (whole-image forward), with each prediction's mIoU on that image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ciscr.data.io import read_image, read_mask  # noqa: E402
from ciscr.report import spread  # noqa: E402
from ciscr.selection import image_miou  # noqa: E402
from ciscr.visualize import cisc_map_of, colorize, figure_png, highlight, predict_label  # noqa: E402

CELL = 2.6  # inches per panel


def smallest_class(label: np.ndarray, k: int, min_ratio: float) -> int:
    """The least frequent class covering >= ``min_ratio`` of the valid pixels, or -1.

    WHY the smallest: the largest class of a street scene is road or sky, whose CISC maps say
    little; the rectified loss picks uniformly among eligible classes during training.
    """
    counts = np.bincount(label[label < k].ravel(), minlength=k)[:k]
    ok = np.flatnonzero((counts > 0) & (counts >= min_ratio * max(counts.sum(), 1)))
    return int(ok[np.argmin(counts[ok])]) if ok.size else -1


def grid(rows: list[list[tuple[np.ndarray, str, dict]]], title: str, legend: tuple | None):
    """A Figure of image panels; each panel is (array, title, imshow kwargs)."""
    from matplotlib.figure import Figure

    from ciscr.visualize import class_legend

    ncol = max(len(r) for r in rows)
    fig = Figure(figsize=(CELL * ncol, CELL * 0.8 * len(rows) + 0.9), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), ncol))
    for r, row in enumerate(rows):
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(row):
                arr, text, kw = row[c]
                ax.imshow(arr, interpolation="nearest", **kw)
                ax.set_title(text, fontsize="small")
    fig.suptitle(title, fontsize="medium")
    if legend:
        class_legend(fig, *legend)
    return fig


class RunView:
    """What the figures need of one run directory: its data, checkpoints and pseudo labels."""

    def __init__(self, run_dir: Path):
        from ciscr.config import load_config
        from ciscr.data.formats import load_dataset

        self.dir = run_dir
        self.cfg = load_config(run_dir / "config.yaml")
        self.info, self.labeled, self.unlabeled, self.val = load_dataset(self.cfg.data, self.cfg.seed)
        self.k, self.ign = self.info.num_classes, self.cfg.data.ignore_index
        self._models: dict[str, tuple[Any, dict]] = {}

    def model(self, stage: str) -> tuple[Any, dict]:
        """(model, checkpoint meta) of a stage, loaded once."""
        from ciscr.loading import load_model_from_checkpoint

        if stage not in self._models:
            path = self.dir / stage / "checkpoint.pt"
            self._models[stage] = load_model_from_checkpoint(path, "cpu")
        return self._models[stage]

    def pseudo(self, stage: str, sid: str) -> np.ndarray:
        return read_mask(self.dir / stage / "labels" / f"{sid}.png", self.k, self.ign)

    def gt(self, sample) -> np.ndarray:
        return read_mask(sample.mask, self.k, self.ign)

    def figure_ids(self) -> list[tuple[str, str]]:
        """(id, half) of the unlabeled images in the figures: reliable and unreliable alternating."""
        import json

        split = json.loads((self.dir / "selection" / "unlabeled_split.json").read_text())
        rel, unrel = (spread(sorted(e["id"] for e in split[h]), 2)
                      for h in ("reliable", "unreliable"))  # fmt: skip
        pairs = zip([(i, "reliable") for i in rel], [(i, "unreliable") for i in unrel], strict=False)
        return [x for pair in pairs for x in pair]


def _label_panel(lab: np.ndarray, gt: np.ndarray, pal, name: str, k: int, ign: int) -> tuple:
    return (colorize(lab, pal, ign), f"{name} ({100 * image_miou(lab, gt, k, ign):.0f})", {})


def cisc_maps_figure(run: RunView, stem: str):
    """Image | pseudo label | queried labeled image (class highlighted) | CISC map, per row."""
    import json

    m0, meta = run.model("stage1")
    pal, names = meta["palette"], meta["class_names"]
    queries = json.loads((run.dir / "selection" / "queries.json").read_text())
    by_id = {s.id: s for s in run.labeled}
    unl = {s.id: s for s in run.unlabeled}
    rows = []
    for uid, half in run.figure_ids():
        pl = run.pseudo("pseudo0", uid)
        cls = smallest_class(pl, run.k, run.cfg.method.min_class_ratio)
        if cls < 0:
            continue
        qids = [e["id"] for e in queries.get(names[cls], []) if e.get("id") in by_id]
        if not qids:
            continue
        q = by_id[qids[0]]
        qimg, qgt, img = read_image(q.image), run.gt(q), read_image(unl[uid].image)
        cmap, _ = cisc_map_of(m0, img, qimg, qgt, cls, meta["mean"], meta["std"])
        region = qgt == cls
        rows.append([
            (img, f"{uid} ({half})", {}),
            (colorize(pl, pal, run.ign), "pseudo label (M0)", {}),
            (highlight(qimg, region, pal[cls]), f"query {q.id}: '{names[cls]}' {region.mean():.0%}", {}),
            (cmap, f"CISC map '{names[cls]}'", {"cmap": "inferno", "vmin": 0, "vmax": 1}),
        ])
    title = (f"{stem}: CISC maps with M0 (class: the smallest one covering >= "
             f"{run.cfg.method.min_class_ratio:.0%} of the pseudo label; query: first of its CS list)")
    return grid(rows, title, (names, pal))


def pseudo_figure(run: RunView, stem: str):
    """Image | ground truth | pseudo label before | after, per unlabeled image (mIoU in %)."""
    meta = run.model("stage1")[1]
    pal, names = meta["palette"], meta["class_names"]
    unl = {s.id: s for s in run.unlabeled}
    rows = []
    for uid, _ in run.figure_ids():
        gt = run.gt(unl[uid])
        rows.append([
            (read_image(unl[uid].image), uid, {}),
            (colorize(gt, pal, run.ign), "ground truth", {}),
            _label_panel(run.pseudo("pseudo0", uid), gt, pal, "before (M0)", run.k, run.ign),
            _label_panel(run.pseudo("pseudo_final", uid), gt, pal, "after (final)", run.k, run.ign),
        ])
    return grid(rows, f"{stem}: CISC-R pseudo labels before / after rectified training "
                      "(image mIoU %)", (names, pal))


def predictions_figure(models: dict[str, tuple[Any, dict]], run: RunView, stem: str, n: int = 4):
    """Val image | ground truth | each model's prediction (image mIoU %), per row."""
    meta = next(iter(models.values()))[1]
    pal, names = meta["palette"], meta["class_names"]
    rows = []
    for s in spread(sorted(run.val, key=lambda s: s.id), n):
        img, gt = read_image(s.image), run.gt(s)
        row = [(img, s.id, {}), (colorize(gt, pal, run.ign), "ground truth", {})]
        for name, (model, m) in models.items():
            pred = predict_label(model, img, m["mean"], m["std"])
            row.append(_label_panel(pred, gt, pal, name, run.k, run.ign))
        rows.append(row)
    return grid(rows, f"{stem}: validation predictions (image mIoU %)", (names, pal))


def write_figures(runs: Path, out: Path, stem: str = "camvid", labeled: str = "0.125",
                  seed: int = 0) -> list[Path]:
    """The three PNGs from the seed's runs; figures whose runs are missing are skipped."""
    from ciscr.loading import load_model_from_checkpoint
    from ciscr.utils.io import atomic_write_bytes

    d = {m: runs / f"{m}_l{labeled}_s{seed}" for m in ("st", "stpp", "ciscr")}
    if not (d["ciscr"] / "pseudo_final" / "done.json").exists():
        return []
    run = RunView(d["ciscr"])
    figs = {"cisc_maps": cisc_maps_figure(run, stem), "pseudo_labels": pseudo_figure(run, stem)}
    ckpts = {"SupOnly": d["st"] / "stage1", "ST++": d["stpp"] / "stage3",
             "CISC-R": d["ciscr"] / "stage3"}  # fmt: skip
    if all((c / "checkpoint.pt").exists() for c in ckpts.values()):
        models = {k: load_model_from_checkpoint(c / "checkpoint.pt", "cpu") for k, c in ckpts.items()}
        figs["predictions"] = predictions_figure(models, run, stem)
    written = []
    for name, fig in figs.items():
        written.append(out / f"{stem}_{name}.png")
        atomic_write_bytes(written[-1], figure_png(fig, dpi=70))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", default=str(REPO / "runs/camvid-bench"))
    p.add_argument("--out", default=str(REPO / "docs/results"))
    p.add_argument("--name", default="camvid")
    p.add_argument("--labeled", default="0.125")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for path in write_figures(Path(a.runs), Path(a.out), a.name, a.labeled, a.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
