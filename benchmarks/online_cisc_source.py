"""Online CISC (UniMatch + CISC): where should the labeled class prototypes come from?

    python benchmarks/online_cisc_source.py RUN [RUN ...] [--stale RUN CHECKPOINT EARLIER]
        [--out docs/results/online_cisc_source.md]

Issue 12 asks to decide between prototypes refreshed from the current model every N
iterations and an EMA, and to measure. ciscr has both (``method.prototype_source``):

- ``memory``: every step's labeled batch (already forwarded for its CE loss) gives batch
  prototypes, kept as an EMA (:class:`ciscr.engine.online.ProtoMemory`). No extra forward
  pass; but the prototypes come from augmented crops in train-mode BatchNorm, averaged over
  steps whose model has since moved;
- ``bank``: every labeled image, whole, in eval mode, through the current model, every
  ``method.prototype_refresh`` steps (:func:`ciscr.online.labeled_bank`): a pass over the
  labeled set per refresh; stale by up to that many steps in between.

This scores, at a checkpoint and without training, the CISC weights each source gives:

- ``memory`` / ``trained_bank``: what the checkpoint holds (a run keeps the memory in both
  modes, and its bank as last refreshed in bank mode);
- ``bank``: a bank refreshed from the checkpoint's model (a refresh's best case);
- ``stale_bank`` (``--stale``): the bank refreshed from an EARLIER checkpoint's model, applied
  to the later model's features: what training uses just before its next refresh;
- ``averaged_bank`` (with ``--stale``): the bank refreshed from the equal-weight average of the
  two checkpoints' models (:func:`averaged_model`), a stand-in for the third option, an EMA
  copy of the model (a mean teacher): an EMA averages the recent iterates, and over a
  ``ckpt_every``-step window the trajectory is taken as straight, so the window's endpoints
  stand for it. Mean age of the weights: half a window (25 steps at ``ckpt_every`` 50, like an
  EMA of decay 0.96); what a training run with an EMA copy would give is not measured;
- ``simulated_memory``, where the checkpoint has no memory (UniMatch without CISC): the EMA
  memory simulated at the checkpoint's model (:func:`simulated_memory`);
- the model's confidence, the reference.

Every unlabeled pixel gets its pseudo label (the model's argmax on the whole image), its
confidence and its CISC weight under each source (``class_weights``, as the training step).
A signal is scored by the AUROC of telling correctly from wrongly pseudo-labelled pixels, on
all pixels and on those above the confidence threshold: ``unimatch_cisc`` multiplies the
threshold mask by the weight, so only those are weighted. The unlabeled pool's ground truth
only scores, it never trains. Also: the cosine of each source's class prototypes with the
refreshed bank's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from camvid_diagnostics import Tally  # noqa: E402

from ciscr.engine.online import class_weights  # noqa: E402
from ciscr.online import labeled_bank  # noqa: E402
from ciscr.pseudo import eval_mode, load_eval_image, read_labels  # noqa: E402
from ciscr.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from ciscr.utils.misc import autocast  # noqa: E402

STEP = 4  # pixel subsampling of the statistics (as camvid_diagnostics)
RESULT = "online_cisc_source.json"
SIGNALS = {
    "memory": "CISC weight, the run's EMA memory (`prototype_source=memory`)",
    "simulated_memory": "CISC weight, an EMA memory simulated at the model at hand (no drift)",
    "trained_bank": "CISC weight, the run's bank as last refreshed (`prototype_source=bank`)",
    "bank": "CISC weight, a bank refreshed from the model at hand (a refresh's best case)",
    "stale_bank": "CISC weight, the bank refreshed from the earlier model (`--stale`)",
    "averaged_bank": "CISC weight, a bank from the average of the model at hand and the earlier "
                     "one (an EMA copy's stand-in)",
    "confidence": "confidence (reference)",
}


def checkpoint_sources(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    """The prototypes saved in an online checkpoint ({"memory" / "trained_bank": (protos (K, C),
    known (K,))}, whichever it has) and its "iteration/total"."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("step_state") or {}
    out = {name: (src["protos"].float(), src["known"].bool())
           for name, key in (("memory", "memory"), ("trained_bank", "bank"))
           if (src := state.get(key)) and src.get("protos") is not None}
    return out, f"{ckpt['iteration']}/{ckpt['total_iters']}"


SIM_STEPS = 40  # simulated memory: 0.9 ** 40 = 1.5 % weight left on the first batch


def simulated_memory(model, run, steps: int = SIM_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The EMA memory a run without one would hold at this model: ``steps`` labeled batches of
    training crops (the run's augmentation, seed and batch size) through a copy of the model in
    train mode (batch statistics, as the training forward), without gradient. Its best case:
    the model does not move between the batches. Unlike training, the batch statistics come
    from the labeled crops alone (training forwards them with the weak unlabeled views)."""
    import copy

    from ciscr.data.datasets import SegDataset
    from ciscr.engine.online import ProtoMemory, batch_prototypes

    d, t, m = run.cfg.data, run.cfg.train, run.cfg.method
    ds = SegDataset(run.labeled, run.k, run.ign, d.mean, d.std, train=True,
                    crop_size=t.crop_size, scale_range=t.scale_range, seed=run.cfg.seed)
    memory, net = ProtoMemory(run.k, m.prototype_momentum), copy.deepcopy(model).train()
    # Train mode draws dropout masks: seeded, and forked so the caller's stream is untouched.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.cfg.seed)
        for step in range(steps):
            items = []
            for n in range(step * t.batch_size, (step + 1) * t.batch_size):
                ds.set_epoch(n // len(ds))  # a new epoch, new crops
                items.append(ds[n % len(ds)])
            images = torch.stack([x["image"] for x in items])
            masks = torch.stack([x["mask"] for x in items])
            with autocast("cpu", t.amp):
                feats = net(images).features.float()
            sums, counts = batch_prototypes(feats, masks, run.k, m.min_class_ratio, run.ign)
            memory.update(sums / counts.clamp_min(1.0).unsqueeze(1), counts > 0)
    return memory.protos, memory.known


def averaged_model(a: torch.nn.Module, b: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``a`` holding the equal-weight average of ``a``'s and ``b``'s floating-point
    state: parameters and BatchNorm running statistics (an EMA copy averages both; integer
    counters are ``a``'s)."""
    import copy

    avg, sb = copy.deepcopy(a), b.state_dict()
    avg.load_state_dict({k: (v + sb[k]) / 2 if v.is_floating_point() else v
                         for k, v in a.state_dict().items()})
    return avg


def prototype_cosines(a: torch.Tensor, b: torch.Tensor, known: torch.Tensor) -> list[float | None]:
    """Per class, cos(a_k, b_k) where both sources know the class, else None."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=1)
    return [float(c) if ok else None for c, ok in zip(cos, known.tolist(), strict=True)]


def measure(run_dir: Path, max_images: int = 0, checkpoint: Path | None = None,
            stale: Path | None = None) -> dict[str, Any]:
    """The signals' statistics over the run's unlabeled images (all, or ``max_images``), at
    ``checkpoint`` (default: the run's online/checkpoint.pt); ``stale``: an earlier checkpoint
    of the same run whose model gives the stale bank."""
    from camvid_figures import RunView

    from ciscr.loading import load_model_from_checkpoint

    run = RunView(run_dir)
    path = checkpoint or run_dir / "online" / "checkpoint.pt"
    model, _ = load_model_from_checkpoint(path, "cpu")
    sources, iteration = checkpoint_sources(path)
    d, amp, m = run.cfg.data, run.cfg.train.amp, run.cfg.method
    bank = labeled_bank(run.labeled, run.k, mean=d.mean, std=d.std, ignore_index=run.ign,
                        min_ratio=m.min_class_ratio, amp=amp, device="cpu")
    sources["bank"] = bank(model, 0)
    if "memory" not in sources:
        sources["simulated_memory"] = simulated_memory(model, run)
    if stale is not None:
        earlier = load_model_from_checkpoint(stale, "cpu")[0]
        sources["stale_bank"] = bank(earlier, 0)
        sources["averaged_bank"] = bank(averaged_model(model, earlier), 0)
    tallies = {f"{sig}{where}": Tally() for sig in (*sources, "confidence")
               for where in ("", "_confident")}
    samples = run.unlabeled[:max_images] if max_images else run.unlabeled
    with eval_mode(model):
        for s in samples:
            img = load_eval_image(s, d.mean, d.std, "cpu")
            gt = torch.from_numpy(np.array(
                read_labels(s, "gt", tuple(img.shape[-2:]), run.k, run.ign), np.int64))
            with autocast("cpu", amp):
                out = model(img)
            conf, label = out.logits.float().softmax(1).max(1)
            feats = out.features.float()
            score = {name: class_weights(feats, p, k, label) for name, (p, k) in sources.items()}
            score["confidence"] = conf
            sub = (0, slice(None, None, STEP), slice(None, None, STEP))
            valid = (gt != run.ign)[sub[1:]]
            correct = (label[sub] == gt[sub[1:]])[valid]
            confident = (conf[sub] >= m.confidence_threshold)[valid]
            for sig, w in score.items():
                v = w[sub][valid]
                tallies[sig].add(v, correct)
                tallies[f"{sig}_confident"].add(v[confident], correct[confident])
    fresh = sources["bank"]
    return {"iteration": iteration, "images": len(samples), "threshold": m.confidence_threshold,
            "labeled_images": len(run.labeled), "stale_from": str(stale) if stale else None,
            "prototype_cosine": {name: prototype_cosines(p, fresh[0], k & fresh[1])
                                 for name, (p, k) in sources.items() if name != "bank"},
            **{name: t.summary() for name, t in tallies.items()}}


def cached(run_dir: Path, checkpoint: Path | None = None, stale: Path | None = None) -> dict[str, Any]:
    """measure() of every unlabeled image, stored in RUN/online_cisc_source.json, or beside
    ``checkpoint`` for a stale pair (computed once; delete the file to redo)."""
    path = run_dir / RESULT
    if checkpoint is not None:
        path = checkpoint.with_name(f"{checkpoint.stem}.{stale.stem if stale else 'own'}.{RESULT}")
    if path.exists():
        res = json.loads(path.read_text())
        # else: from an older version of this script (no averaged bank for a stale pair)
        if "stale_from" in res and (stale is None or "averaged_bank" in res):
            return res
    res = measure(run_dir, 0, checkpoint, stale)
    atomic_write_json(path, res)
    return res


def markdown(results: list[dict[str, Any]], run_dirs: list[Path]) -> list[str]:
    """A table of the signals that every result has, mean ± std over the results (runs)."""
    import statistics

    def cell(key: str, field: str) -> str:
        """mean ± std over the results, three decimals."""
        xs = [r[key][field] for r in results]
        sd = f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else ""
        return f"{statistics.fmean(xs):.3f}{sd}"

    def pixels(r: dict[str, Any], key: str) -> int:
        return r[key]["pixels_correct"] + r[key]["pixels_wrong"]

    share = statistics.fmean(100 * pixels(r, "confidence_confident") / max(pixels(r, "confidence"), 1)
                             for r in results)
    rows = ["| signal | AUROC, all pixels | AUROC, pixels >= threshold | mean on correct / "
            "wrong, pixels >= threshold |", "|---|---|---|---|"]
    for sig, label in SIGNALS.items():
        if all(sig in r for r in results):
            c = f"{sig}_confident"
            rows.append(f"| {label} | {cell(sig, 'auroc')} | {cell(c, 'auroc')} | "
                        f"{cell(c, 'mean_correct')} / {cell(c, 'mean_wrong')} |")
    cosines = []
    for name in results[0]["prototype_cosine"]:
        cos = [x for r in results for x in r["prototype_cosine"].get(name, []) if x is not None]
        if cos:
            cosines.append(f"- {SIGNALS[name].split(', ', 1)[1]}: {min(cos):.3f} to "
                           f"{max(cos):.3f} (median {float(np.median(cos)):.3f}, {len(cos)} "
                           "class prototypes)")
    runs = ", ".join(f"`{Path(d).name}` at iteration {r['iteration']}"
                     + (f" (stale bank from `{Path(r['stale_from']).name}`)" if r["stale_from"]
                        else "") for d, r in zip(run_dirs, results, strict=True))
    return [f"Over {len(results)} checkpoint(s) ({runs}; {results[0]['images']} unlabeled "
            f"images each; {share:.1f} % of their pixels above the threshold "
            f"{results[0]['threshold']}):", "", *rows, "",
            "Cosine of each class prototype with the refreshed bank's:", "", *cosines, "",
            f"A refresh costs a forward pass of each of the {results[0]['labeled_images']} "
            "labeled images; the memory costs none."]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dirs", type=Path, nargs="*",
                   help="online CISC runs: each measured at its online/checkpoint.pt")
    p.add_argument("--stale", nargs=3, action="append", type=Path, default=[],
                   metavar=("RUN", "CHECKPOINT", "EARLIER"),
                   help="measure CHECKPOINT of RUN with, besides, the bank refreshed from the "
                   "model of EARLIER, an earlier checkpoint of the same run (repeatable)")
    p.add_argument("--max-images", type=int, default=0,
                   help="0 = every unlabeled image (then each measurement is cached: in "
                   "RUN/" + RESULT + ", or beside CHECKPOINT)")
    p.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    a = p.parse_args(argv)
    if not a.run_dirs and not a.stale:
        p.error("give a run directory or --stale")
    # One table per measurement: they are different conditions, not seeds of one.
    done = [(d, measure(d, a.max_images) if a.max_images else cached(d)) for d in a.run_dirs]
    done += [(r, measure(r, a.max_images, c, e) if a.max_images else cached(r, c, e))
             for r, c, e in a.stale]
    lines = []
    for d, res in done:
        reason = d / "REASON.txt"
        text = " ".join(reason.read_text().split()) if reason.exists() else ""  # a superseded run says why: its checkpoints still measure
        why = [f"A superseded run (its REASON.txt): {text}", ""] if text else []
        lines += [f"## `{d.name}`", "", *why, *markdown([res], [d]), ""]
    if a.out:
        from camvid_report import machine

        head = ["# Online CISC: labeled prototypes from an EMA memory, a refreshed bank, or an EMA copy?", "",
                f"- command: `python benchmarks/online_cisc_source.py {shlex.join(argv)}`",
                f"- machine: {machine()}",
                f"- generated: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                "- what and why: the docstring of the command (`--help`). A `--stale` pair is two "
                "copies of a run's online/checkpoint.pt taken while it trained, the run's "
                "`train.ckpt_every` steps apart (`runs/` is not in the repository).",
                "- a section per checkpoint measured; the tables of two sections come from "
                "different models, so compare rows within a section.", ""]
        atomic_write_bytes(a.out, ("\n".join(head + lines)).encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
