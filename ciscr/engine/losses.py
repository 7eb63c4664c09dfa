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
