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
    ) -> None:
        if views not in ("independent", "shared"):
            raise ValueError(f"views must be 'independent' or 'shared', got {views!r}")
        if partners not in ("class", "random"):
            raise ValueError(f"partners must be 'class' or 'random', got {partners!r}")
        self.labeled, self.present, self.background, self.seed = labeled, present, background, seed
        self.views, self.partners = views, partners
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.present)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        # Partner choice is keyed on (seed, epoch, i) like the augmentation: resumable.
        g = make_generator(self.seed + 7, self.epoch, i)
        n = len(self.present)
        if self.partners == "random":
            j, k = pick_random_partner(i, n, g)
        else:
            j, k = pick_partner(i, self.present, self.background, g)
        self.labeled.set_epoch(self.epoch)
        a = self.labeled[i]
        self.labeled.set_epoch(partner_epoch(self.epoch, i, n, self.views))
        b = self.labeled[j]
        return {
            "image": a["image"], "mask": a["mask"], "image2": b["image"], "mask2": b["mask"],
            "cls": torch.tensor(k, dtype=torch.long), "index": i, "index2": j,
        }
