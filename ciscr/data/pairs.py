"""Labeled image pairs that share a class, for the stage-1 loss L_CISC (METHOD.md section 4)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ciscr.data.datasets import make_generator


def class_presence(masks: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(N, K) bool: does class k occur in mask n (ignore pixels excluded)."""
    out = np.zeros((len(masks), num_classes), dtype=bool)
    for n, m in enumerate(masks):
        vals = np.unique(m)
        out[n, vals[vals < num_classes]] = True
    return out


def pick_partner(
    i: int, present: np.ndarray, background: int | None, g: torch.Generator
) -> tuple[int, int]:
    """A class ``k`` of image ``i`` and another image ``j != i`` that contains it.

    Returns ``(j, k)``; ``k == -1`` when no other labeled image shares a class with ``i`` (the
    pair then contributes only cross-entropy). An image is never paired with itself.
    """
    n = present.shape[0]
    classes = [int(k) for k in np.flatnonzero(present[i]) if k != background]
    order = torch.randperm(len(classes), generator=g).tolist() if classes else []
    for c in order:
        k = classes[c]
        partners = [j for j in np.flatnonzero(present[:, k]) if j != i]
        if partners:
            j = partners[int(torch.randint(len(partners), (1,), generator=g))]
            return int(j), k
    return pick_random_partner(i, n, g)


def pick_random_partner(i: int, n: int, g: torch.Generator) -> tuple[int, int]:
    """Any other image ``j != i``, uniformly; ``k = -1`` (no shared class: CE only).

    The control for :func:`pick_partner`: same pair-shaped batches, no class sharing.
    """
    return (i + 1 + int(torch.randint(max(n - 1, 1), (1,), generator=g))) % n, -1


PARTNER_EPOCHS = 2**62  # partner views use augmentation epochs disjoint from the anchors'


def partner_epoch(epoch: int, anchor: int, n: int, views: str) -> int:
    """The augmentation epoch of the partner drawn for ``anchor`` in ``epoch``.

    WHY keyed on the anchor: a partner is drawn at random, so one image is often the partner of
    several anchors in the same epoch; keyed on the epoch alone, those draws would be exact
    copies of each other (and with ``views="shared"`` of that image's own anchor view: the
    behaviour before the fix, kept to reproduce results made with it).
    """
    if views == "shared":
        return epoch
    return PARTNER_EPOCHS + epoch * n + anchor


def crop_class_shares(mask: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(K,) float: the share of the VALID pixels of a crop mask (H, W) each class covers."""
    m = mask.reshape(-1).long()
    m = m[(m != ignore_index) & (m >= 0) & (m < num_classes)]
    counts = torch.bincount(m, minlength=num_classes)[:num_classes].double()
    return counts / max(int(m.numel()), 1)


# The >= 3 % rule of the authors' cross.py: a partner is re-cropped up to TRIES times, and up to
# PARTNERS partners are tried per class, before the next class of the anchor crop is tried.
TRIES, PARTNERS = 5, 3


class PairDataset(Dataset):
    """Item i = (labeled image i, a partner sharing class ``cls``), both with weak augmentation.

    Keys of an item: ``image``, ``mask`` (image i), ``image2``, ``mask2`` (partner), ``cls``.
    ``partners="random"``: any other image, ``cls = -1`` (a control without class sharing).
    """

    def __init__(
        self,
        labeled: Dataset,
        present: np.ndarray,
        background: int | None,
        seed: int,
        views: str = "independent",
        partners: str = "class",
        min_ratio: float = 0.03,
        ignore_index: int = 255,
    ) -> None:
        if views not in ("independent", "shared"):
            raise ValueError(f"views must be 'independent' or 'shared', got {views!r}")
        if partners not in ("class", "random"):
            raise ValueError(f"partners must be 'class' or 'random', got {partners!r}")
        self.labeled, self.present, self.background, self.seed = labeled, present, background, seed
        self.views, self.partners = views, partners
        self.min_ratio, self.ignore_index = min_ratio, ignore_index
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.present)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        # Partner choice is keyed on (seed, epoch, i) like the augmentation: resumable.
        g = make_generator(self.seed + 7, self.epoch, i)
        n = len(self.present)
        self.labeled.set_epoch(self.epoch)
        a = self.labeled[i]
        if self.partners == "random" or self.min_ratio <= 0 or self.views == "shared":
            j, k = (pick_random_partner(i, n, g) if self.partners == "random"
                    else pick_partner(i, self.present, self.background, g))
            b = self._partner_view(i, j, 0, 0)
        else:
            j, k, b = self._ruled_partner(i, a["mask"], g)
        return {
            "image": a["image"], "mask": a["mask"], "image2": b["image"], "mask2": b["mask"],
            "cls": torch.tensor(k, dtype=torch.long), "index": i, "index2": j,
        }

    def _partner_view(self, anchor: int, j: int, attempt: int, tries: int) -> dict[str, Any]:
        """Partner ``j``'s crop number ``attempt`` for ``anchor`` in this epoch (its own
        augmentation epoch, so re-crops and other anchors' draws never repeat a view)."""
        n = len(self.present)
        key = partner_epoch(self.epoch, anchor, n, self.views)
        if tries:
            key = PARTNER_EPOCHS + (((self.epoch * n + anchor) * n + j) * PARTNERS * TRIES) + attempt
        self.labeled.set_epoch(key)
        return self.labeled[j]

    def _ruled_partner(self, i: int, mask_a: torch.Tensor, g: torch.Generator):
        """(j, k, partner view) such that class k covers >= ``min_ratio`` of the valid pixels
        of BOTH crops (the authors' ``get_pair`` / ``delete_low``); bounded tries, then
        (random partner, -1, its view): CE only."""
        k_num = self.present.shape[1]
        shares = crop_class_shares(mask_a, k_num, self.ignore_index)
        classes = [k for k in range(k_num) if shares[k] >= self.min_ratio and k != self.background]
        for c in torch.randperm(len(classes), generator=g).tolist():
            k = classes[c]
            partners = [int(j) for j in np.flatnonzero(self.present[:, k]) if j != i]
            order = torch.randperm(len(partners), generator=g).tolist()[:PARTNERS]
            for p, o in enumerate(order):
                j = partners[o]
                for t in range(TRIES):
                    b = self._partner_view(i, j, p * TRIES + t, TRIES)
                    if crop_class_shares(b["mask"], k_num, self.ignore_index)[k] >= self.min_ratio:
                        return j, k, b
        j, _ = pick_random_partner(i, len(self.present), g)
        return j, -1, self._partner_view(i, j, 0, 0)
