"""What the authors' >= 3 % rule changes in the crops CISC-R trains on (issue 11, item 3).

    python benchmarks/camvid_pairs.py            # -> docs/results/camvid_pairs.md / .json

No model is involved: this draws the crops that training draws, with the protocol's settings
(``configs/camvid.yaml``: 1/8 labeled, crop and scale range of the config), and counts.

- Stage 1 (L_CISC pairs): every labeled image is an anchor once per epoch; its partner and
  shared class are drawn by :class:`ciscr.data.pairs.PairDataset` with the rule off
  (``min_ratio=0``: one crop, the class picked from the full masks) and on (the class covers
  >= 3 % of the valid pixels of BOTH crops; the partner re-cropped, other partners tried). For
  each: the share of pairs that carry L_CISC, the share of those whose class covers >= 3 % of
  both crops, the share whose class is absent from a crop, and the crops decoded per pair.
- Query mode (stage 2/3): for each class, a labeled image where the class covers >= 3 % of the
  whole image (the query lists' condition, ``method.query_min_class_ratio``) is cropped as the
  queried labeled image is: the share of single crops with the class on >= 3 % of their valid
  pixels (rule off: the rest gave a prototype of a sliver or, when absent, weight 1), and with
  the rule (up to 15 crops of up to 3 images) the share that still finds none (weight 1).

Deterministic by seed; takes about a minute on one core.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ciscr.config import load_config  # noqa: E402
from ciscr.data.datasets import SegDataset, make_generator  # noqa: E402
from ciscr.data.formats import load_dataset  # noqa: E402
from ciscr.data.io import read_mask  # noqa: E402
from ciscr.data.pairs import PairDataset, class_presence, crop_class_shares  # noqa: E402
from ciscr.engine.steps import Rectifier  # noqa: E402
from ciscr.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402

RATIO = 0.03


class CountingSet(SegDataset):
    """A SegDataset that counts the crops it decodes (the rule's cost in data loading)."""

    loads = 0

    def __getitem__(self, i: int) -> dict[str, Any]:
        CountingSet.loads += 1
        return super().__getitem__(i)


def setup(args: argparse.Namespace):
    cfg = load_config("camvid", [f"data.root={args.data}", f"seed={args.seed}"])
    info, labeled, _, _ = load_dataset(cfg.data, cfg.seed)
    d, t = cfg.data, cfg.train
    ds = CountingSet(labeled, num_classes=info.num_classes, ignore_index=d.ignore_index,
                     mean=d.mean, std=d.std, train=True, crop_size=t.crop_size,
                     scale_range=t.scale_range, seed=cfg.seed)
    masks = [read_mask(s.mask, info.num_classes, d.ignore_index) for s in labeled]
    return cfg, info, ds, masks


def pair_stats(ds: CountingSet, present: np.ndarray, k_num: int, min_ratio: float,
               epochs: int, seed: int, ignore: int, background: int | None) -> dict[str, float]:
    pairs = PairDataset(ds, present, background, seed, min_ratio=min_ratio, ignore_index=ignore)
    n, carry, ok, absent = 0, 0, 0, 0
    CountingSet.loads = 0
    for e in range(epochs):
        pairs.set_epoch(e)
        for i in range(len(pairs)):
            item = pairs[i]
            n, k = n + 1, int(item["cls"])
            if k < 0:
                continue
            carry += 1
            a = crop_class_shares(item["mask"], k_num, ignore)[k]
            b = crop_class_shares(item["mask2"], k_num, ignore)[k]
            ok += int(a >= RATIO and b >= RATIO)
            absent += int(a == 0 or b == 0)
    return {"pairs": n, "carry_cisc": carry / n, "both_crops_ge_3pct": ok / max(carry, 1),
            "class_absent_from_a_crop": absent / max(carry, 1), "crops_per_pair": CountingSet.loads / n}


def query_stats(ds: CountingSet, masks: list[np.ndarray], k_num: int, draws: int, seed: int,
                ignore: int) -> dict[str, float]:
    """Queried-crop statistics over ``draws`` draws of each class that has query images, each
    crop drawn by the rectifier's own function (:meth:`Rectifier._query_view`): the rule off
    returns the single crop, the rule on re-crops (its first try is that same crop)."""
    lists = {k: [j for j, m in enumerate(masks) if (m[m != ignore] == k).mean() >= RATIO]
             for k in range(k_num)}
    off, on = (Rectifier(None, "query", "one", k_num, lists, seed, ignore_index=ignore,
                         labeled=ds, min_query_ratio=r) for r in (0.0, RATIO))
    first, absent, none_found, n = 0, 0, 0, 0
    for k, ids in lists.items():
        for d in range(draws if ids else 0):
            j = ids[int(torch.randint(len(ids), (1,), generator=make_generator(seed, d, k)))]
            crop = off._query_view(k, j, d, make_generator(seed + 17, d, k))
            share = crop_class_shares(crop["mask"], k_num, ignore)[k]
            first, absent = first + int(share >= RATIO), absent + int(share == 0)
            none_found += on._query_view(k, j, d, make_generator(seed + 17, d, k)) is None
            n += 1
    return {"draws": n, "single_crop_ge_3pct": first / max(n, 1),
            "single_crop_class_absent": absent / max(n, 1), "rule_finds_none": none_found / max(n, 1)}


def markdown(res: dict[str, Any], cmd: str, cfg) -> list[str]:
    off, on, q = res["pairs_rule_off"], res["pairs_rule_on"], res["query"]
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    return [
        "# CamVid: the >= 3 % rule in the crops CISC-R trains on (issue 11, item 3)", "",
        f"- command: `{cmd}`",
        f"- generated: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; no model, crops only",
        f"- protocol: `configs/camvid.yaml` (crop {cfg.train.crop_size}, scale "
        f"{cfg.train.scale_range[0]}-{cfg.train.scale_range[1]}), seed {cfg.seed}'s 1/8 split "
        f"({res['labeled']} labeled images)", "",
        "## Stage 1: pairs for L_CISC", "",
        f"{res['epochs']} epochs x {res['labeled']} anchors = {off['pairs']} pairs each.", "",
        "| rule | pairs carrying L_CISC | of those: class >= 3 % of both crops | class absent "
        "from a crop | crops decoded per pair |", "|---|---|---|---|---|",
        *(f"| {name} | {pct(s['carry_cisc'])} | {pct(s['both_crops_ge_3pct'])} | "
          f"{pct(s['class_absent_from_a_crop'])} | {s['crops_per_pair']:.2f} |"
          for name, s in (("off (min_class_ratio=0)", off), ("on (0.03, the default)", on))),
        "", "## Query mode: the queried labeled crop", "",
        f"{q['draws']} draws ({res['query_draws']} per class with a query image).", "",
        "| single crop: class >= 3 % | single crop: class absent | with the rule: no crop "
        "found in 15 tries (weight 1) |", "|---|---|---|",
        f"| {pct(q['single_crop_ge_3pct'])} | {pct(q['single_crop_class_absent'])} | "
        f"{pct(q['rule_finds_none'])} |", "",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared/data/camvid"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--query-draws", type=int, default=60)
    p.add_argument("--out", default=str(REPO / "docs/results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg, info, ds, masks = setup(args)
    k, ig = info.num_classes, cfg.data.ignore_index
    bg = cfg.data.background_class if cfg.data.background_class is not None else info.background_class
    present = class_presence(masks, k)
    res = {"labeled": len(masks), "epochs": args.epochs, "query_draws": args.query_draws,
           "pairs_rule_off": pair_stats(ds, present, k, 0.0, args.epochs, cfg.seed, ig, bg),
           "pairs_rule_on": pair_stats(ds, present, k, RATIO, args.epochs, cfg.seed, ig, bg),
           "query": query_stats(ds, masks, k, args.query_draws, cfg.seed, ig)}
    cmd = "python benchmarks/camvid_pairs.py " + shlex.join(argv)
    out = Path(args.out)
    atomic_write_json(out / "camvid_pairs.json", {"command": cmd.strip(), **res})
    md = out / "camvid_pairs.md"
    atomic_write_bytes(md, ("\n".join(markdown(res, cmd.strip(), cfg)) + "\n").encode())
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
