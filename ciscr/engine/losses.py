"""Segmentation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    weight_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel-wise cross-entropy averaged over the NON-ignored pixels.

    Args:
        logits: (B, K, H, W) raw scores (any float dtype; computed in fp32).
        target: (B, H, W) int64 labels in [0, K) or ``ignore_index``.
        weight_map: optional (B, H, W) per-pixel weights (e.g. the rectifying weight ``w`` of
            METHOD.md section 3). Treated as a constant: no gradient flows into it.

    Returns:
        Scalar ``sum(w * CE) / #valid``. With no valid pixel it is 0 but still attached to the
        graph so ``backward()`` and DDP's gradient sync keep working.
    """
    # reduction="none" gives 0 (and zero gradient) at ignored pixels, so the sum counts only
    # valid ones; with none valid the result is an attached 0. Dividing by a clamped tensor
    # count (not int(...)) avoids a GPU->CPU sync every step.
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    if weight_map is not None:
        if weight_map.shape != per_pixel.shape:
            raise ValueError(
                f"weight_map shape {tuple(weight_map.shape)} != target shape "
                f"{tuple(per_pixel.shape)}"
            )
        per_pixel = per_pixel * weight_map.detach().to(per_pixel.dtype)
    n_valid = (target != ignore_index).sum().clamp_min(1)
    return per_pixel.sum() / n_valid


def class_balanced(
    weight: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Rescale per-pixel weights so that each class keeps its pseudo-label share of the loss.

    A confidence threshold keeps most pixels of the easy classes and few of the hard ones (on
    CamVid at 0.95: 93 % of road's pixels, 11 % of fence's, none of bicyclist's), so the
    unlabeled loss shifts to the easy classes. Here the weights choose WHICH pixels of a class
    teach, but no longer HOW MUCH the class counts: for every class c whose valid pixels carry
    some weight, ``weight' = weight * N_c / sum_{valid, c} weight`` with N_c its number of valid
    pixels, so its weights sum to N_c as they would without the threshold. With a loss divided
    by the number of valid pixels, that is sum_c (N_c / N) * (the weighted CE mean over c's
    pixels). A class whose pixels all weigh 0 stays at 0: nothing of it is trusted.

    Args:
        weight: (B, H, W) float >= 0 (the confidence mask, or any pixel weight).
        labels: (B, H, W) int64 pseudo labels; values outside [0, K) only where ``valid`` is False.
        valid: (B, H, W) bool, the pixels the loss counts (their weight is rescaled; the
            others are returned unchanged).
        num_classes: K.
    Returns:
        (B, H, W) weights, same dtype as ``weight``; the counts are over the whole batch.
    """
    lab = labels.masked_fill(~valid, 0).clamp(0, num_classes - 1)
    w32 = weight.float()
    w = w32 * valid
    # One masked sum per class, not a weighted bincount / index_add: those add floats with
    # atomics on CUDA, in no fixed order, and the result would differ from run to run.
    s, n = torch.zeros(num_classes, device=w.device), torch.zeros(num_classes, device=w.device)
    for c in range(num_classes):
        hit = lab == c
        s[c], n[c] = (w * hit).sum(), (valid & hit).sum()
    scale = torch.where(s > 0, n / s.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return torch.where(valid, w32 * scale[lab], w32).to(weight.dtype)


def ohem_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = 255,
) -> torch.Tensor:
    """CE over the hard pixels only (online hard example mining), as UniMatch's labeled loss on
    Cityscapes (its ``ProbOhemCrossEntropy2d``).

    A valid pixel is hard when the softmax probability of its true class is <= ``thresh``; if
    fewer than ``min_kept`` are, the threshold rises to the ``min_kept``-th smallest
    probability so that the ``min_kept`` hardest pixels count. With fewer valid pixels than
    ``min_kept``, every valid pixel counts (plain :func:`ce_loss`).

    Args:
        logits: (B, K, H, W); target: (B, H, W) in [0, K) or ``ignore_index``.
        min_kept: >= 1, pixels of THIS batch (the caller scales it with the batch).
    Returns:
        Scalar: the mean CE of the kept pixels (attached 0 when none is valid).
    """
    valid = target != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0 or min_kept > n_valid:
        return ce_loss(logits, target, ignore_index)
    with torch.no_grad():  # which pixels count; the loss itself is plain CE on them
        safe = torch.where(valid, target, torch.zeros_like(target))
        p_true = logits.detach().float().softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
        p_true = torch.where(valid, p_true, torch.ones_like(p_true))  # never hard
        kth = float(p_true.flatten().kthvalue(min(max(min_kept, 1), p_true.numel())).values)
        threshold = max(float(thresh), kth)
        kept = valid & (p_true <= threshold)
    return ce_loss(logits, torch.where(kept, target, torch.full_like(target, ignore_index)),
                   ignore_index)


def labeled_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    ohem: tuple[float, int] | None = None,
) -> torch.Tensor:
    """The labeled images' loss: :func:`ce_loss`, or with ``ohem = (thresh, min_kept per
    image)`` :func:`ohem_ce` (``method.labeled_loss``)."""
    if ohem is None:
        return ce_loss(logits, target, ignore_index)
    thresh, per_image = ohem
    return ohem_ce(logits, target, thresh, per_image * target.shape[0], ignore_index)
