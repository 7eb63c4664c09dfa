"""The online weak-to-strong family: FixMatch, UniMatch and UniMatch + CISC rectification.

One training run; every step sees a labeled batch, an unlabeled batch and a second unlabeled
batch to CutMix with. Read :meth:`OnlineStep.__call__` top to bottom for the whole method:

1. the mixing images' weak views -> the current model in eval mode, no gradient -> pseudo label
   and confidence (UniMatch predicts them in eval mode);
2. labeled + unlabeled weak views in one forward (train mode; two where the unlabeled views
   are smaller, ``train.unlabeled_resolution``), with UniMatch's feature perturbation (FP) on
   the unlabeled rows -> CE on the labeled part; the weak predictions (detached) are the
   pseudo labels;
3. each strong view, CutMixed with the mixing image's strong view inside its box, supervised
   by the pseudo label mixed by the same box (labels, confidence, validity and CISC weight);
4. loss = w_l * CE_l + lambda * sum_v w_v * L_v, each L_v = sum(CE * mask) / #valid pixels
   (pixels under the threshold count 0 but stay in the denominator, as FixMatch / UniMatch).

FixMatch = one strong view, no FP, loss (CE_l + L_s) / 2 (UniMatch's fixmatch.py); UniMatch =
two strong views + FP, (CE_l + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 (its paper and code). ciscr
keeps their unlabeled weights but gives CE_l weight 1 (``method.labeled_weight``; 0.5 restores
the published form): the labeled loss then trains exactly as in SupOnly, the control it must beat.
With ``cisc`` (ours) each unlabeled pixel's mask is multiplied by (``mask``) or replaced by
(``alone``) its CISC weight: the cosine of its feature with the prototype of its pseudo class,
taken from a bank of the labeled images' prototypes refreshed from the current model every N
steps, or from a memory fed by every step's labeled batch (see :class:`OnlineStep`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ciscr import cisc, dist
from ciscr.engine.losses import class_balanced, labeled_loss

# --------------------------------------------------------------------------- pure functions


def cutmix(x: torch.Tensor, x_mix: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paste ``x_mix`` into ``x`` inside ``box``.

    Args:
        x, x_mix: (B, ...) with the box's (H, W) as their last two dims (images (B, 3, H, W)
            or per-pixel maps (B, H, W)).
        box: (B, H, W), 1 / True where ``x_mix`` is taken.
    Returns:
        Tensor shaped like ``x``.
    """
    b = box.bool()
    if x.dim() == 4:
        b = b.unsqueeze(1)
    return torch.where(b, x_mix, x)


def masked_ce(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """``sum(CE * weight * valid) / #valid`` (UniMatch's unlabeled loss).

    Args:
        logits: (B, K, H, W); target: (B, H, W) int64 in [0, K); weight: (B, H, W) float
            (the confidence mask, or a CISC weight); valid: (B, H, W) bool (False on padding).
    Returns:
        Scalar; 0 (attached to the graph) when no pixel is valid.
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    v = valid.to(ce.dtype)
    return (ce * weight.to(ce.dtype) * v).sum() / v.sum().clamp_min(1.0)


def confidence_and_label(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, H, W) logits -> (max softmax probability (B, H, W) float32, argmax (B, H, W))."""
    conf, label = logits.detach().float().softmax(dim=1).max(dim=1)
    return conf, label


def class_weights(
    features: torch.Tensor,
    protos: torch.Tensor,
    known: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """The CISC weight of every pixel: cosine of its feature with its class's prototype.

    Args:
        features: (B, C, h, w); protos: (K, C); known: (K,) bool, classes that have a
            prototype; labels: (B, H, W) in [0, K).
    Returns:
        (B, H, W) float32 in [0, 1] (the map resized bilinearly, as Eq. 6); 1 where the pixel's
        class has no prototype yet (it cannot be checked: plain weight, METHOD.md 3).
    """
    f = F.normalize(features.float(), dim=1, eps=cisc.COS_EPS)
    p = F.normalize(protos.float(), dim=1, eps=cisc.COS_EPS)
    cos = torch.einsum("bchw,kc->bkhw", f, p)
    cos = F.interpolate(cos, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    w = cos.gather(1, labels.long().unsqueeze(1)).squeeze(1).clamp(0.0, 1.0)
    return torch.where(known.to(labels.device)[labels.long()], w, torch.ones_like(w))


def batch_prototypes(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    min_ratio: float,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of the class prototypes (Eq. 5) of a labeled batch over the images where the class
    covers >= ``min_ratio`` of the valid pixels (the 3 % rule: no prototype from a sliver).

    Sums and counts, not means, so that processes can add theirs (all_reduce) before dividing.

    Args:
        features: (B, C, h, w); labels: (B, H, W).
    Returns:
        sums (K, C) float32 and counts (K,) float32 (images that qualified per class).
    """
    protos, present = cisc.class_prototypes(features.float(), labels, num_classes, ignore_index)
    lab = labels.long().flatten(1)
    inside = (lab >= 0) & (lab < num_classes)
    valid = (lab != ignore_index).sum(1).clamp_min(1).float()  # (B,)
    # Pixels per class in one pass (void -> an extra bin), not one comparison per class.
    idx = torch.where(inside, lab, num_classes)
    counts = torch.zeros(lab.shape[0], num_classes + 1, device=lab.device)
    counts = counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=counts.dtype))[:, :-1]
    ok = (present & (counts / valid.unsqueeze(1) >= min_ratio)).float()  # (B, K)
    return (protos * ok.unsqueeze(-1)).sum(0), ok.sum(0)


# --------------------------------------------------------------------------- the step


@dataclass
class ProtoMemory:
    """Class prototypes of the labeled batches under the current model, kept as an EMA
    (``method.prototype_source=memory``).

    Each step already computes the labeled batch's features in its training forward, so the
    memory costs no forward pass; the EMA (momentum m) smooths over the few images of one
    batch. Its prototypes come from augmented crops in train-mode BatchNorm, though, and lag
    the moving model; see :class:`OnlineStep` for how it compares with the bank (the default).
    Saved in the checkpoint, so a resumed run continues identically.
    """

    num_classes: int
    momentum: float
    protos: torch.Tensor | None = None  # (K, C)
    known: torch.Tensor | None = None  # (K,) bool

    def update(self, protos: torch.Tensor, found: torch.Tensor) -> None:
        protos, found = protos.detach().float(), found.detach()
        if self.protos is None:
            self.protos = torch.zeros_like(protos)
            self.known = torch.zeros_like(found)
        # A class seen for the first time takes the batch prototype as it is.
        m = torch.where(self.known, self.momentum, 0.0).to(protos.dtype).unsqueeze(1)
        new = m * self.protos + (1.0 - m) * protos
        self.protos = torch.where(found.unsqueeze(1), new, self.protos)
        self.known = self.known | found

    def state_dict(self) -> dict[str, Any]:
        return {"protos": self.protos, "known": self.known}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.protos, self.known = state.get("protos"), state.get("known")


@dataclass(frozen=True)
class OnlineRecipe:
    """What an online method computes (``ciscr.config.MethodCfg`` resolves into this)."""

    strong_views: int = 2
    fp: bool = True
    fp_p: float = 0.5
    threshold: float = 0.95
    class_balance: bool = False  # each class keeps its pseudo-label share (losses.class_balanced)
    cisc: str = "none"  # none | mask | alone
    # ciscr: 1.0, the labeled CE as SupOnly trains it (method.labeled_weight); UniMatch's code:
    # 0.5, i.e. (CE_l + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2.
    weight_labeled: float = 1.0
    weight_views: tuple[float, ...] = (0.125, 0.125)
    weight_fp: float = 0.25
    unlabeled_weight: float = 1.0  # lambda, times everything unlabeled
    min_ratio: float = 0.03
    ignore_index: int = 255
    prototype_source: str = "bank"  # bank | memory (cisc only; see OnlineStep)
    refresh: int = 50  # bank: recomputed every this many steps
    ohem: tuple[float, int] | None = None  # labeled loss: (thresh, min_kept per image) or CE
    unlabeled_every: int = 1  # the unlabeled branch on every k-th step only (method.unlabeled_every)
    mix_source: str = "stream"  # stream | batch: the CutMix partner (method.mix_source)


def recipe_weights(strong_views: int, fp: bool) -> tuple[float, tuple[float, ...], float]:
    """Loss weights (labeled, each strong view, FP) as FixMatch / UniMatch publish them (ciscr
    replaces the labeled one by ``method.labeled_weight``): the unlabeled half is split 1:1 between the strong views and the FP branch when FP is on."""
    views = (0.5 if fp else 1.0) / strong_views
    return 0.5, tuple(0.5 * views for _ in range(strong_views)), 0.25 if fp else 0.0


# bank_fn(model, it) -> the labeled images' class prototypes (K, C) and which classes have one
# (K,), computed by the model (eval mode, whole images) at step ``it`` (which may pick the
# images): the stage supplies it, the step calls it.
BankFn = Callable[[nn.Module, int], tuple[torch.Tensor, torch.Tensor]]


class LabeledAndWeak(NamedTuple):
    """The model's outputs on a labeled batch and on the unlabeled weak views (step 2)."""

    logits_l: torch.Tensor
    logits_w: torch.Tensor
    features_l: torch.Tensor
    features_w: torch.Tensor
    fp_logits: torch.Tensor | None


def forward_labeled_and_weak(model: nn.Module, x_l: torch.Tensor, x_w: torch.Tensor, fp: bool,
                             fp_p: float) -> LabeledAndWeak:
    """Step 2's forward (train mode), with UniMatch's feature perturbation on the weak rows.

    One forward of both batches, as UniMatch does (BatchNorm normalises them together), when
    their sizes match; two when they do not (``train.unlabeled_resolution`` < 1 makes the
    unlabeled views smaller than the labeled crops: a cheaper unlabeled branch, whose
    BatchNorm statistics are then the unlabeled batch's own).
    x_l (B_l, 3, H, W), x_w (B_u, 3, h, w).
    """
    n_l, n_u = x_l.shape[0], x_w.shape[0]
    if x_l.shape[-2:] == x_w.shape[-2:]:
        out = model(torch.cat([x_l, x_w]), fp_last=n_u if fp else 0, fp_p=fp_p)
        return LabeledAndWeak(out.logits[:n_l], out.logits[n_l:], out.features[:n_l],
                              out.features[n_l:], out.fp_logits)
    out_l = model(x_l)
    out_w = model(x_w, fp_last=n_u if fp else 0, fp_p=fp_p)
    return LabeledAndWeak(out_l.logits, out_w.logits, out_l.features, out_w.features,
                          out_w.fp_logits)


def merge_bank(
    old: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new bank, where a class the new one lacks (absent from the images of this refresh)
    keeps its previous prototype. (protos (K, C), known (K,)) each."""
    protos, known = new[0].detach().float(), new[1].detach().bool()
    if old is None:
        return protos, known
    old_p, old_k = old[0].to(protos.device), old[1].to(known.device)
    return torch.where(known.unsqueeze(1), protos, old_p), known | old_k


class OnlineStep:
    """``step(model, batches, it) -> (loss, scalars)`` for the online family.

    With CISC the prototypes come from ``recipe.prototype_source``: ``bank`` = the labeled
    images (all, or a bounded sample per refresh), whole, in eval mode, through the current
    model (``bank_fn``), recomputed every ``recipe.refresh`` steps (:func:`merge_bank`);
    ``memory`` = the EMA of each step's labeled-batch prototypes
    (:class:`ProtoMemory`, no extra forward pass). WHY the bank by default, measured without
    training at CamVid checkpoints (two runs made with ST++'s decoder dropouts, one with
    UniMatch's decoder; ``benchmarks/online_cisc_source.py``,
    docs/results/online_cisc_source.md): a freshly refreshed bank's weights tell right from
    wrong pseudo labels clearly better than the one real memory measured, which drifts with
    the model; against a memory simulated without drift (the memory's best case) the bank
    leads at some checkpoints and trails at others. A bank from averaged weights (a stand-in
    for an EMA copy of the model) scores level with the fresh bank or below it, so no EMA copy
    is kept. Its price: one pass over (at most ``prototype_bank_images``) labeled images, no
    backward, every N steps. The memory is kept in both modes (it is free), so every run's
    last checkpoint compares the two.
    """

    def __init__(self, recipe: OnlineRecipe, num_classes: int, momentum: float = 0.9,
                 bank_fn: BankFn | None = None) -> None:
        self.r, self.num_classes = recipe, num_classes
        self.memory = ProtoMemory(num_classes, momentum) if recipe.cisc != "none" else None
        if recipe.cisc != "none" and recipe.prototype_source == "bank" and bank_fn is None:
            raise ValueError("prototype_source='bank' needs a bank_fn")
        self.bank_fn = bank_fn if recipe.cisc != "none" else None
        self.bank: tuple[torch.Tensor, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        bank = None if self.bank is None else {"protos": self.bank[0], "known": self.bank[1]}
        return {"memory": self.memory.state_dict() if self.memory is not None else None,
                "bank": bank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.memory is not None and state.get("memory"):
            self.memory.load_state_dict(state["memory"])
        if state.get("bank"):
            self.bank = (state["bank"]["protos"], state["bank"]["known"])

    def _refresh_bank(self, model: nn.Module, it: int) -> None:
        """Recompute the bank at every ``refresh``-th step (and when there is none: a run's or
        an old checkpoint's first step). The unwrapped model: under DDP each rank forwards only
        its share of the labeled images, which DDP's per-forward collectives would not allow."""
        if self.r.prototype_source == "bank" and self.bank_fn is not None and (
                self.bank is None or it % self.r.refresh == 0):
            self.bank = merge_bank(self.bank, self.bank_fn(getattr(model, "module", model), it))

    def labeled_only(self, it: int) -> bool:
        """Whether step ``it`` skips the unlabeled branch (``unlabeled_every`` k > 1: all but
        the k-th, 2k-th ... steps; (it + 1) so that logged iterations, multiples of
        train.log_every, are unlabeled steps whenever k divides log_every)."""
        return self.r.unlabeled_every > 1 and (it + 1) % self.r.unlabeled_every != 0

    def streams_at(self, it: int) -> tuple[str, ...] | None:
        """The streams step ``it`` reads (the training loop loads only these); None = all."""
        if self.labeled_only(it):
            return ("labeled",)
        return ("labeled", "unlabeled") if self.r.mix_source == "batch" else None

    def __call__(self, model: nn.Module, batches: dict[str, dict[str, Any]], it: int):
        r, lb = self.r, batches["labeled"]
        self._refresh_bank(model, it)
        if self.labeled_only(it):
            loss_l = labeled_loss(model(lb["image"]).logits, lb["mask"], r.ignore_index, r.ohem)
            return r.weight_labeled * loss_l, {"ce_labeled": float(loss_l.detach())}
        ub = batches["unlabeled"]
        out_mix = None
        if r.mix_source == "stream":
            mb = batches["mix"]
            with torch.no_grad():  # 1. the mixing images' pseudo labels, eval mode as UniMatch
                model.eval()
                out_mix = model(mb["image_w"])
                model.train()
        out = forward_labeled_and_weak(model, lb["image"], ub["image_w"], r.fp, r.fp_p)  # 2.
        loss_l = labeled_loss(out.logits_l, lb["mask"], r.ignore_index, r.ohem)
        conf_w, label_w = confidence_and_label(out.logits_w)
        protos = self._prototypes(out, lb)
        w_w = self._weights(conf_w, label_w, ub["valid"], out.features_w.detach(), protos)
        if out_mix is None:  # mix_source=batch: each image's partner is the one before it
            mb = {k: v.roll(1, 0) for k, v in ub.items() if k.startswith(("image_s", "valid"))}
            label_mix, w_mix = label_w.roll(1, 0), w_w.roll(1, 0)
        else:
            conf_mix, label_mix = confidence_and_label(out_mix.logits)
            w_mix = self._weights(conf_mix, label_mix, mb["valid"], out_mix.features, protos)
        strong = torch.cat([cutmix(ub[f"image_s{v}"], mb[f"image_s{v}"], ub[f"box{v}"])
                            for v in range(1, r.strong_views + 1)])
        logits_s = model(strong).logits.chunk(r.strong_views)  # 3. the strong views
        loss_u, scalars = torch.zeros((), device=loss_l.device), {}
        for v, logits in enumerate(logits_s, start=1):
            box = ub[f"box{v}"]
            lv = masked_ce(logits, cutmix(label_w, label_mix, box), cutmix(w_w, w_mix, box),
                           cutmix(ub["valid"], mb["valid"], box))
            loss_u = loss_u + r.weight_views[v - 1] * lv
            scalars[f"loss_s{v}"] = float(lv.detach())
        if r.fp:
            lfp = masked_ce(out.fp_logits, label_w, w_w, ub["valid"])
            loss_u = loss_u + r.weight_fp * lfp
            scalars["loss_fp"] = float(lfp.detach())
        loss = r.weight_labeled * loss_l + r.unlabeled_weight * loss_u  # 4.
        scalars.update(self._monitor(loss_l, label_w, w_w, ub, r.ignore_index))
        return loss, scalars

    def _prototypes(self, out: LabeledAndWeak, lb) -> tuple[torch.Tensor, torch.Tensor] | None:
        """CISC's class prototypes for this step (protos (K, C), known (K,)), None without CISC;
        the memory takes the labeled batch's prototypes first (kept in both sources)."""
        r = self.r
        if self.memory is None:
            return None
        sums, counts = batch_prototypes(out.features_l.detach(), lb["mask"],
                                        self.num_classes, r.min_ratio, r.ignore_index)
        # Every process adds its share of the labeled batch: identical memories on all ranks.
        sums, counts = dist.all_reduce_sum(sums), dist.all_reduce_sum(counts)
        self.memory.update(sums / counts.clamp_min(1.0).unsqueeze(1), counts > 0)
        protos, known = ((self.memory.protos, self.memory.known) if r.prototype_source == "memory"
                         else self.bank)
        return protos.to(out.features_w.device), known

    def _weights(self, conf: torch.Tensor, label: torch.Tensor, valid: torch.Tensor,
                 features: torch.Tensor,
                 protos: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Per-pixel weights of unlabeled images (conf, label, valid (B, H, W); features
        (B, C, h, w)): the confidence mask (class-balanced with ``class_balance``), times
        (``mask``) or instead of it (``alone``) the CISC weight against ``protos``."""
        r = self.r
        w = (conf >= r.threshold).float()
        if r.class_balance:
            w = class_balanced(w, label, valid, self.num_classes)
        if protos is None:
            return w
        c = class_weights(features, protos[0], protos[1], label)
        return c if r.cisc == "alone" else w * c

    @staticmethod
    def _monitor(loss_l, label_w, w_w, ub, ignore_index: int) -> dict[str, float]:
        """What the report plots: the share of unlabeled pixels that pass, and (only where
        ground truth exists, never used for training) the accuracy of the online labels."""
        valid = ub["valid"]
        n = valid.sum().clamp_min(1)
        out = {"ce_labeled": float(loss_l.detach()),
               "mask_ratio": float(((w_w > 0) & valid).sum() / n),
               "weight_mean": float((w_w * valid).sum() / n)}
        gt = ub.get("gt")
        if gt is not None:
            scored = valid & (gt != ignore_index)
            if bool(scored.any()):
                hit = (label_w == gt) & scored
                out["pseudo_acc"] = float(hit.sum() / scored.sum())
                sel = scored & (w_w > 0)
                if bool(sel.any()):
                    out["pseudo_acc_selected"] = float((hit & sel).sum() / sel.sum())
        return out
