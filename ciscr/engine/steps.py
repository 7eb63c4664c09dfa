"""Step functions: what one training iteration computes, per method.

- :func:`supervised_step`: CE on labeled images (SupOnly).
- :func:`pair_step`: stage 1 of CISC-R, CE on labeled pairs sharing a class + L_CISC (Eq. 11-12).
- :func:`retrain_step`: stages 2/3, CE on labeled + (rectified) CE on pseudo-labeled images
  (Eq. 7). With ``rectifier=None`` it is plain self-training (ST / ST++).

Each factory returns ``step(model, batches, iteration) -> (loss, scalars)`` for
:func:`ciscr.engine.train.train_stage`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ciscr import cisc
from ciscr.data.datasets import make_generator
from ciscr.data.pairs import PARTNERS, TRIES, crop_class_shares
from ciscr.engine.losses import ce_loss, class_balanced, labeled_loss

FeatureFn = Callable[[torch.Tensor], torch.Tensor]

# Non-negative features make cos = 0 exactly wherever a pixel shares no active channel with the
# prototype; torch's BCE backward then divides by 1e-12 and one such pixel yields a 1e11-size
# gradient. Keeping the map inside [eps, 1 - eps] bounds it and changes the loss by < 1e-4.
PAIR_BCE_EPS = 1e-4

QUERY_EPOCHS = 1_000_000  # augmentation epochs of queried labeled crops (disjoint from training)


def supervised_step(ignore_index: int = 255, ohem: tuple[float, int] | None = None):
    """CE (or, with ``ohem``, :func:`ciscr.engine.losses.ohem_ce`) on ``batches['labeled']``."""

    def step(model: nn.Module, batches: dict[str, dict[str, Any]], it: int):
        b = batches["labeled"]
        loss = labeled_loss(model(b["image"]).logits, b["mask"], ignore_index, ohem)
        return loss, {"ce": float(loss.detach())}

    return step


def pair_step(
    use_cisc: bool, cisc_weight: float = 1.0, ignore_index: int = 255, norm: str = "pair"
):
    """Stage 1: ``L1 = CE_i + CE_j + L_CISC(i, j)`` on ``batches['pairs']`` (METHOD.md 4).

    The prototypes come from the current model and are not detached. A pair whose shared class
    was cropped out of either image contributes CE only. ``norm="image"`` halves L1 (the loss
    per image): WHY, per pair the CE term is twice SupOnly's mean CE, so at the same learning
    rate the paper's form trains stage 1 with twice SupOnly's CE step.
    """
    if norm not in ("pair", "image"):
        raise ValueError(f"norm must be 'pair' or 'image', got {norm!r}")
    scale = 0.5 if norm == "image" else 1.0

    def step(model: nn.Module, batches: dict[str, dict[str, Any]], it: int):
        b = batches["pairs"]
        n = b["image"].shape[0]
        out = model(torch.cat([b["image"], b["image2"]]))
        ce_i = ce_loss(out.logits[:n], b["mask"], ignore_index)
        ce_j = ce_loss(out.logits[n:], b["mask2"], ignore_index)
        loss = ce_i + ce_j
        scalars = {"ce": float((ce_i + ce_j).detach()) / 2}
        if use_cisc:
            cls = b["cls"]
            has = lambda m: (m == cls.view(-1, 1, 1)).flatten(1).any(1)  # noqa: E731
            valid = (cls >= 0) & has(b["mask"]) & has(b["mask2"])
            if bool(valid.any()):
                fa, fb = out.features[:n][valid], out.features[n:][valid]
                l_cisc = cisc.cisc_pair_loss(
                    fa, b["mask"][valid], fb, b["mask2"][valid], cls[valid], ignore_index,
                    bce_eps=PAIR_BCE_EPS,
                )
                loss = loss + cisc_weight * l_cisc
                scalars["cisc"] = float(l_cisc.detach())
        return scale * loss, scalars

    return step


@dataclass
class Rectifier:
    """Computes the CISC maps that weight the pseudo-label loss (Eq. 6-7), with a frozen teacher.

    ``mode``: "query" (paper: run the teacher on a queried labeled image every step), "bank"
    (ours: prototypes of every labeled image precomputed once per stage), "anchor"
    (Anchor-Guide, Eq. 14: the class anchor is the prototype). ``classes``: "one" (paper: one
    class per image) or "all" (every class present; needs bank or anchor).
    """

    features: FeatureFn
    mode: str
    classes: str
    num_classes: int
    query_lists: dict[int, list[int]]
    seed: int
    min_ratio: float = 0.03
    background: int | None = None
    ignore_index: int = 255
    labeled: Any = None  # dataset with set_epoch, for "query" mode
    bank: torch.Tensor | None = None  # (N, K, C)
    bank_present: torch.Tensor | None = None  # (N, K) bool
    anchors: torch.Tensor | None = None  # (K, C)
    num_prototypes: int = 1  # > 1: k-means prototypes of the queried mask ("query" mode only)
    min_query_ratio: float = 0.03  # the queried crop must show the class on this share
    _has_query: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        has = torch.zeros(self.num_classes + 1, dtype=torch.bool)
        for k, ids in self.query_lists.items():
            has[k] = len(ids) > 0
        if self.mode == "anchor" and self.anchors is not None:
            has[: self.num_classes] = self.anchors.norm(dim=1) > 0
        self._has_query = has  # last entry = the ignore class, never queryable

    @torch.no_grad()
    def __call__(self, x_u: torch.Tensor, y_u: torch.Tensor, it: int) -> dict[str, torch.Tensor]:
        g = make_generator(self.seed + 13, it, 0)
        feats = self.features(x_u).float()
        size = tuple(y_u.shape[-2:])
        if self.classes == "all":
            return {"cmaps": self._all_class_maps(feats, y_u, size, g)}
        cls = self._pick_classes(y_u, g)
        protos, cls = self._prototypes(cls, g, it, feats.device, feats.shape[1])
        if protos.dim() == 3:  # several prototypes per class (Table 3): max over them
            return {"cmap": cisc.cisc_map_multi(feats, protos, size), "cls": cls}
        return {"cmap": cisc.cisc_map(feats, protos, size), "cls": cls}

    def _pick_classes(self, y_u: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # Classes without any query image cannot be rectified: hide them from the picker, so
        # it falls back to another class, or to plain CE (-1) when none is left (METHOD.md 3).
        idx = torch.where(y_u == self.ignore_index, self.num_classes, y_u).clamp(max=self.num_classes)
        target = torch.where(self._has_query.to(y_u.device)[idx], y_u, self.ignore_index)
        return cisc.pick_query_class(
            target.cpu(), self.num_classes, self.min_ratio, self.background, g
        ).to(y_u.device)

    def _random_query(self, k: int, g: torch.Generator) -> int:
        ids = self.query_lists[k]
        return ids[int(torch.randint(len(ids), (1,), generator=g))]

    def _prototypes(self, cls: torch.Tensor, g: torch.Generator, it: int, device, c: int) -> tuple:
        # c = the teacher's feature width, read off the features already computed (a probe
        # forward per step used to find it when there is no bank / anchor).
        protos = torch.zeros(len(cls), c, device=device)
        if self.mode == "anchor":
            ok = cls >= 0
            protos[ok] = self.anchors.to(device)[cls[ok]].float()
            return protos, cls
        picks = [(b, int(k), self._random_query(int(k), g)) for b, k in enumerate(cls) if k >= 0]
        if self.mode == "bank":
            for b, k, j in picks:
                protos[b] = self.bank[j, k].to(device).float()
            return protos, cls
        return self._query_prototypes(picks, protos, cls, it, device)

    def _query_view(self, k: int, j: int, it: int, g: torch.Generator) -> dict[str, Any] | None:
        """A crop of a query image for class ``k`` in which k covers >= ``min_query_ratio`` of
        the valid pixels: query image ``j`` re-cropped up to TRIES times, then other query
        images of the list (PARTNERS in all); None if every try fails (-> weight 1)."""
        for attempt in range(PARTNERS * TRIES):
            if attempt and attempt % TRIES == 0:
                j = self._random_query(k, g)
            # Own augmentation draws per (iteration, attempt), still resumable; attempt 0 keeps
            # the keys of the single crop drawn before this rule existed.
            self.labeled.set_epoch(QUERY_EPOCHS + it + attempt * 1_000_000_000)
            item = self.labeled[j]
            if self.min_query_ratio <= 0:
                return item
            if crop_class_shares(item["mask"], self.num_classes, self.ignore_index)[k] >= (
                self.min_query_ratio
            ):
                return item
        return None

    def _query_prototypes(self, picks, protos, cls, it: int, device) -> tuple:
        """Paper mode: run the teacher on the queried labeled images (weak augmentation)."""
        g = make_generator(self.seed + 17, it, 0)
        views = [(b, k, self._query_view(k, j, it, g)) for b, k, j in picks]
        cls = cls.clone()
        for b, _, v in views:
            if v is None:
                cls[b] = -1
        picks = [(b, k, v) for b, k, v in views if v is not None]
        if not picks:
            return protos, cls
        items = [v for _, _, v in picks]
        x = torch.stack([d["image"] for d in items]).to(device)
        y = torch.stack([d["mask"] for d in items]).to(device)
        feats = self.features(x).float()
        rows = torch.tensor([b for b, _, _ in picks], device=device)
        ks = torch.tensor([k for _, k, _ in picks], device=device)
        mask = (y == ks.view(-1, 1, 1)).float()
        if self.num_prototypes > 1:
            p = cisc.multi_prototypes(feats, mask, self.num_prototypes)
            protos = protos.unsqueeze(1).repeat(1, self.num_prototypes, 1)
            empty = p.flatten(1).norm(dim=1) == 0
        else:
            p = cisc.prototype(feats, mask)
            empty = p.norm(dim=1) == 0
        protos[rows] = p
        cls[rows[empty]] = -1  # the class was cropped out of the query image (rule off)
        return protos, cls

    def _all_class_maps(self, feats, y_u, size, g) -> torch.Tensor:
        """(B, K, H, W): the map of every class present in each pseudo label, -1 elsewhere."""
        b, k = y_u.shape[0], self.num_classes
        present = torch.zeros(b, k, dtype=torch.bool)
        protos = torch.zeros(b, k, feats.shape[1], device=feats.device)
        classes_in = [set(torch.unique(y_u[i]).tolist()) for i in range(b)]
        for c in range(k):  # the queries drawn class by class, image by image (resumable order)
            if not bool(self._has_query[c]):
                continue
            rows = [i for i in range(b) if c in classes_in[i]]
            if not rows:
                continue
            present[rows, c] = True
            if self.mode == "anchor":
                protos[rows, c] = self.anchors[c].to(feats.device).float()
            else:
                js = [self._random_query(c, g) for _ in rows]
                protos[rows, c] = self.bank[js, c].to(feats.device).float()
        # All maps in one batched cosine + resize, not one per class (same values).
        cmaps = cisc.cisc_maps(feats, protos, size)
        return torch.where(present.to(feats.device)[:, :, None, None], cmaps, -1.0)


@dataclass(frozen=True)
class UnlabeledLoss:
    """How much each pseudo-labelled pixel counts: ``lambda(t) * mask * weight``.

    ``weight``: lambda; ``rampup_iters``: lambda ramps up as exp(-5 (1 - t/T)^2) over the first
    T iterations (Laine & Aila's sigmoid ramp); ``threshold``: pixels whose teacher confidence
    is below it count 0 (they stay in the denominator, as in FixMatch); ``by_confidence``:
    multiply by the confidence itself; ``class_balance`` (needs ``num_classes``): each class of
    the pseudo labels keeps its share of the loss (:func:`~ciscr.engine.losses.class_balanced`).
    """

    weight: float = 1.0
    rampup_iters: int = 0
    threshold: float = 0.0
    by_confidence: bool = False
    class_balance: bool = False
    num_classes: int = 0

    def lam(self, it: int) -> float:
        if self.rampup_iters <= 0 or it >= self.rampup_iters:
            return self.weight
        return self.weight * math.exp(-5.0 * (1.0 - it / self.rampup_iters) ** 2)

    def pixel_weights(self, conf: torch.Tensor | None, labels: torch.Tensor | None = None,
                      valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, H, W) weights from the teacher confidence (B, H, W), or None when all are 1;
        ``labels`` (B, H, W) and ``valid`` (B, H, W) bool, the pixels the loss counts: what
        ``class_balance`` balances over."""
        if conf is None or (self.threshold <= 0 and not self.by_confidence):
            return None
        w = torch.ones_like(conf)
        if self.threshold > 0:
            w = w * (conf >= self.threshold).to(w.dtype)
        w = w * conf if self.by_confidence else w
        if self.class_balance:
            if labels is None or valid is None or self.num_classes < 1:
                raise ValueError("class_balance needs the pseudo labels, their valid pixels "
                                 "and num_classes")
            w = class_balanced(w, labels, valid, self.num_classes)
        return w


def retrain_step(
    rectifier: Rectifier | None, ignore_index: int = 255, unl: UnlabeledLoss = UnlabeledLoss()
):
    """Stages 2/3 on separate streams: CE(labeled) + lambda(t) * L'_u(pseudo-labeled), with L'_u
    the rectified CE (Eq. 7), or plain CE without a rectifier (ST / ST++ in 'split' form)."""

    def step(model: nn.Module, batches: dict[str, dict[str, Any]], it: int):
        lb, ub = batches["labeled"], batches["unlabeled"]
        weights = rectifier(ub["image"], ub["pseudo"], it) if rectifier is not None else None
        n = lb["image"].shape[0]
        logits = model(torch.cat([lb["image"], ub["image"]])).logits
        loss_l = ce_loss(logits[:n], lb["mask"], ignore_index)
        pw = unl.pixel_weights(ub.get("conf"), ub["pseudo"], ub["pseudo"] != ignore_index)
        if weights is None:
            loss_u = ce_loss(logits[n:], ub["pseudo"], ignore_index, weight_map=pw)
        elif "cmaps" in weights:
            loss_u = cisc.rectified_ce_all(logits[n:], ub["pseudo"], weights["cmaps"],
                                           ignore_index, pixel_weight=pw)
        else:
            loss_u = cisc.rectified_ce(logits[n:], ub["pseudo"], weights["cmap"], weights["cls"],
                                       ignore_index, pixel_weight=pw)
        lam = unl.lam(it)
        scalars = {"ce_labeled": float(loss_l.detach()), "ce_unlabeled": float(loss_u.detach()),
                   "lambda": lam}
        return loss_l + lam * loss_u, scalars

    return step


def mixed_step(ignore_index: int = 255, unl: UnlabeledLoss = UnlabeledLoss()):
    """ST++'s retraining step on ONE mixed batch (labeled and pseudo-labelled items together):
    one CE mean over every valid pixel; pseudo-labelled rows weighted by ``unl`` (all 1 by
    default, i.e. exactly ST++'s loss)."""

    def step(model: nn.Module, batches: dict[str, dict[str, Any]], it: int):
        b = batches["mixed"]
        pseudo_rows = b["is_pseudo"].view(-1, 1, 1).bool()
        is_pseudo = pseudo_rows.to(b["conf"].dtype)
        pw = unl.pixel_weights(b["conf"], b["mask"], (b["mask"] != ignore_index) & pseudo_rows)
        w_pseudo = unl.lam(it) * (pw if pw is not None else torch.ones_like(b["conf"]))
        w = (1.0 - is_pseudo) + is_pseudo * w_pseudo
        loss = ce_loss(model(b["image"]).logits, b["mask"], ignore_index, weight_map=w)
        return loss, {"ce": float(loss.detach()), "lambda": unl.lam(it)}

    return step
