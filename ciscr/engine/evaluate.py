"""Prediction (whole / sliding window / multi-scale + flip) and mIoU evaluation.

mIoU comes from ONE dataset-level confusion matrix (not an average of per-image scores), summed
over ranks with ``all_reduce``. The same :func:`predict_logits` serves evaluation, TTA pseudo
labels (scales x flip) and ``ciscr predict``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ciscr import dist
from ciscr.config import EvalCfg
from ciscr.errors import ConfigError
from ciscr.utils.misc import autocast

# --------------------------------------------------------------------------- confusion matrix


class ConfusionMatrix:
    """K x K pixel counts: row = ground-truth class, column = predicted class."""

    def __init__(
        self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = 255
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count pixels. pred, target: same shape ((N,H,W) or flat), integer class indices.

        Pixels whose target is ``ignore_index`` or outside [0, K) are skipped.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target {tuple(target.shape)}")
        k = self.num_classes
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        valid = (target != self.ignore_index) & (target >= 0) & (target < k)
        if bool(((pred[valid] < 0) | (pred[valid] >= k)).any()):
            raise ValueError(f"predictions outside [0, {k})")
        idx = target[valid] * k + pred[valid]
        self.mat += torch.bincount(idx, minlength=k * k).reshape(k, k)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (e.g. per-worker matrices); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} into {self.num_classes} classes")
        self.mat += other.mat.to(self.mat.device)
        return self

    def reset(self) -> None:
        self.mat.zero_()

    def reduce_from_all_processes(self) -> None:
        """Sum the counts of every rank (no-op in one process)."""
        dist.all_reduce_sum(self.mat)

    def compute(self) -> dict[str, Any]:
        """Metrics as plain Python numbers (fractions in [0, 1], JSON-safe).

        - ``iou``: per class, ``None`` for a class absent from BOTH ground truth and predictions
          (union 0: its IoU is undefined, so it is neither counted as 0 nor silently dropped;
          it is listed in ``absent_classes``). A class only predicted has IoU 0 and counts.
        - ``miou``: mean of the defined IoUs (0.0 if no pixel was counted at all).
        - ``acc``: pixel accuracy; ``mean_acc``: mean recall over classes present in the GT.
        - ``num_pixels``: counted (non-ignored) pixels.
        """
        h = self.mat.double().cpu()
        tp, gt, pr = h.diag(), h.sum(1), h.sum(0)
        union = gt + pr - tp
        iou = [float(tp[c] / union[c]) if union[c] > 0 else None for c in range(len(tp))]
        defined = [v for v in iou if v is not None]
        total = float(h.sum())
        recalls = [float(tp[c] / gt[c]) for c in range(len(tp)) if gt[c] > 0]
        return {
            "miou": sum(defined) / len(defined) if defined else 0.0,
            "iou": iou,
            "absent_classes": [c for c, v in enumerate(iou) if v is None],
            "acc": float(tp.sum()) / total if total > 0 else 0.0,
            "mean_acc": sum(recalls) / len(recalls) if recalls else 0.0,
            "num_pixels": int(total),
        }


# --------------------------------------------------------------------------- prediction


def _probs(model: nn.Module, x: torch.Tensor, flip: bool, amp: str) -> torch.Tensor:
    """Softmax of one forward (averaged with the flipped forward if ``flip``): (B,K,H,W) fp32."""
    with autocast(x.device, amp):
        probs = model(x).logits.float().softmax(1)
        if flip:
            flipped = model(x.flip(-1)).logits.float().softmax(1).flip(-1)
            probs = (probs + flipped) / 2
    return probs


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, size); the last one is flush with the end."""
    n = max(math.ceil((size - window) / stride), 0) + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


def _sliding(
    model: nn.Module,
    x: torch.Tensor,
    num_classes: int,
    window: int,
    stride: int,
    flip: bool,
    amp: str,
) -> torch.Tensor:
    """Average window softmaxes over overlapping square windows: (B,3,H,W) -> (B,K,H,W)."""
    b, _, h, w = x.shape
    # An image smaller than the window is padded (bottom/right, with 0 = the mean colour after
    # normalisation) so that every forward sees the window size the model was trained on.
    ph, pw = max(window - h, 0), max(window - w, 0)
    xp = F.pad(x, (0, pw, 0, ph)) if ph or pw else x
    hp, wp = h + ph, w + pw
    acc = torch.zeros(b, num_classes, hp, wp, device=x.device)
    count = torch.zeros(1, 1, hp, wp, device=x.device)
    for y0 in _window_starts(hp, window, stride):
        for x0 in _window_starts(wp, window, stride):
            crop = xp[:, :, y0 : y0 + window, x0 : x0 + window]
            acc[:, :, y0 : y0 + window, x0 : x0 + window] += _probs(model, crop, flip, amp)
            count[:, :, y0 : y0 + window, x0 : x0 + window] += 1
    return (acc / count)[:, :, :h, :w]


def _resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(t.shape[-2:]) == size:
        return t
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    mode: str = "whole",
    *,
    num_classes: int,
    window: int = 0,
    stride_ratio: float = 2 / 3,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp: str = "none",
) -> torch.Tensor:
    """Class probabilities of a batch, softmax-averaged over the chosen views.

    Args:
        model: returns an object with ``.logits`` (B,K,h,w) at input size. The caller puts it in
            eval mode.
        image: (B,3,H,W) normalised images.
        mode: ``whole`` = one forward; ``sliding`` = square windows of side ``window`` with
            stride ``window * stride_ratio`` (image padded if smaller than a window);
            ``multiscale`` = each scale in ``scales`` (bilinear, align_corners=False), predicted
            whole, or by sliding window when ``window > 0`` and the scaled image exceeds it.
        flip: also predict the horizontally flipped input (every window / scale).

    Returns:
        (B,K,H,W) float32 probabilities (despite the name: averaged softmaxes, not logits).
        Computed under ``torch.inference_mode`` (the result cannot enter autograd).
    """
    if mode == "whole":
        return _probs(model, image, flip, amp)
    if window <= 0 and mode == "sliding":
        raise ConfigError("eval.window must be > 0 for eval.mode=sliding")
    stride = max(1, int(window * stride_ratio))
    if mode == "sliding":
        return _sliding(model, image, num_classes, window, stride, flip, amp)
    if mode != "multiscale":
        raise ConfigError(f"eval.mode={mode}: must be whole, sliding or multiscale")
    if not scales:
        raise ConfigError("eval.scales is empty; give at least one scale for multiscale mode")
    h, w = image.shape[-2:]
    total = torch.zeros(image.shape[0], num_classes, h, w, device=image.device)
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        xs = _resize(image, size)
        if window > 0 and max(size) > window:
            p = _sliding(model, xs, num_classes, window, stride, flip, amp)
        else:
            p = _probs(model, xs, flip, amp)
        total += _resize(p, (h, w))
    return total / len(scales)


# --------------------------------------------------------------------------- evaluation


def eval_indices(n: int, rank: int, world: int) -> list[int]:
    """Dataset indices rank ``rank`` evaluates: strided, WITHOUT padding.

    Use ``Subset(val_set, eval_indices(len(val_set), dist.rank(), dist.world_size()))`` instead
    of a DistributedSampler, which pads with repeated samples so that counts would be off.
    """
    return dist.shard(list(range(n)), rank, world)


def eval_chunk_indices(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Dataset indices rank ``rank`` evaluates: whole chunks ``[k * batch_size, (k + 1) *
    batch_size)`` dealt round-robin to the ranks, WITHOUT padding.

    Chunks (not single images) are dealt so that :func:`evaluate` predicts every image in the
    same batch whatever the number of processes: a convolution's float result can depend on
    the batch it runs in, and the mIoU of a torchrun job must equal a single process's.
    """
    chunks = [list(range(i, min(n, i + batch_size))) for i in range(0, n, max(1, batch_size))]
    return [i for chunk in dist.shard(chunks, rank, world) for i in chunk]


def _grouped(batches: Iterable[dict[str, Any]], batch_size: int) -> Iterable[dict[str, Any]]:
    """Join consecutive single-image batches into batches of up to ``batch_size`` images of
    one size and one chunk (dataset ``index // batch_size``, see :func:`eval_chunk_indices`).

    WHY: on a CPU one image at a time is several times slower per image than a batch
    (measured 120 vs 28 ms per 64x64 image in bf16, ResNet-18: the weights are converted to
    bf16 on every call). Loaders of more than one image per batch are passed through.
    """
    group: list[dict[str, Any]] = []

    def key(b: dict[str, Any]) -> tuple:
        index = b.get("index")
        chunk = int(index[0]) // batch_size if isinstance(index, torch.Tensor) else None
        return tuple(b["image"].shape[-2:]), chunk

    def flush() -> dict[str, Any]:
        out = {"image": torch.cat([b["image"] for b in group]),
               "mask": torch.cat([b["mask"] for b in group])}  # fmt: skip
        group.clear()
        return out

    for b in batches:
        if batch_size <= 1 or b["image"].shape[0] != 1:
            yield b
            continue
        if group and (key(group[0]) != key(b) or len(group) >= batch_size):
            yield flush()
        group.append(b)
    if group:
        yield flush()


def _progress(loader: Iterable, total: int | None, enabled: bool) -> Iterable:
    if not (enabled and dist.is_main()):
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, total=total, desc="eval", leave=False, dynamic_ncols=True)


def _loader_len(loader: Iterable, max_batches: int) -> int | None:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return max_batches or None
    return min(n, max_batches) if max_batches else n


def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    num_classes: int,
    eval_cfg: EvalCfg,
    device: torch.device | str,
    amp: str = "none",
    ignore_index: int = 255,
    progress: bool = True,
    max_batches: int = 0,
    crop_size: int = 0,
) -> dict[str, Any]:
    """mIoU of ``model`` on ``loader`` (batches of {'image': (B,3,H,W), 'mask': (B,H,W)}).

    Every pixel of every batch the loader yields is counted once, then the confusion matrix is
    summed over ranks: in a torchrun job each rank must iterate over a disjoint part of the
    data (see :func:`eval_indices`; a DistributedSampler's padding would count images twice).
    ``eval_cfg.window == 0`` means ``crop_size`` (train.crop_size). ``max_batches`` > 0 stops
    early. The model's train/eval mode is restored afterwards. Returns
    :meth:`ConfusionMatrix.compute`'s dict.
    """
    window = eval_cfg.window or crop_size
    if eval_cfg.mode == "sliding" and window <= 0:
        raise ConfigError("eval.mode=sliding needs eval.window > 0 (or a train.crop_size)")
    cm = ConfusionMatrix(num_classes, device, ignore_index)
    was_training = model.training
    model.eval()
    try:
        batches = _progress(loader, _loader_len(loader, max_batches), progress)
        # max_batches counts the loader's batches, before they are grouped
        limited = (b for i, b in enumerate(batches) if not max_batches or i < max_batches)
        for batch in _grouped(limited, eval_cfg.batch_size):
            image = batch["image"].to(device, non_blocking=True)
            probs = predict_logits(
                model,
                image,
                eval_cfg.mode,
                num_classes=num_classes,
                window=window,
                stride_ratio=eval_cfg.stride_ratio,
                scales=eval_cfg.scales,
                flip=eval_cfg.flip,
                amp=amp,
            )
            cm.update(probs.argmax(1), batch["mask"].to(device))
    finally:
        model.train(was_training)
    cm.reduce_from_all_processes()
    return cm.compute()


def eval_settings(eval_cfg: EvalCfg, crop_size: int) -> dict[str, Any]:
    """What an evaluation actually did, for its JSON record (window 0 resolved to the crop)."""
    window = eval_cfg.window or crop_size
    return {
        "mode": eval_cfg.mode,
        "scales": list(eval_cfg.scales) if eval_cfg.mode == "multiscale" else [1.0],
        "window": window if eval_cfg.mode != "whole" else None,
        "stride_ratio": eval_cfg.stride_ratio if eval_cfg.mode != "whole" else None,
        "flip": eval_cfg.flip,
    }


def eval_warning(eval_cfg: EvalCfg) -> str | None:
    """A warning when the settings do not do what their name says, or None.

    ``multiscale`` with a single scale is not multi-scale: it predicts at that scale, by
    sliding window wherever the image exceeds the window (so at scale 1 it equals
    ``sliding``), and the JSON would call it multiscale.
    """
    if eval_cfg.mode == "multiscale" and len(set(eval_cfg.scales)) < 2:
        scale = eval_cfg.scales[0] if eval_cfg.scales else 1.0
        return (
            f"warning: eval.mode=multiscale with eval.scales=[{scale}] is single-scale (the same "
            "as eval.mode=sliding at scale 1); give several scales, e.g. "
            "eval.scales=[0.75,1.0,1.25]"
        )
    return None


def format_miou_table(metrics: dict[str, Any], class_names: Sequence[str] = ()) -> str:
    """Plain-text table: one row per class (IoU % or 'absent'), then mIoU and pixel accuracy."""
    ious = metrics["iou"]
    names = [class_names[c] if c < len(class_names) else f"class_{c}" for c in range(len(ious))]
    width = max([len("pixel acc"), *(len(n) for n in names)])
    lines = [f"{'class':<{width}}  {'IoU %':>7}", "-" * (width + 9)]
    for name, v in zip(names, ious, strict=True):
        lines.append(f"{name:<{width}}  {'absent' if v is None else f'{100 * v:.2f}':>7}")
    n_def = sum(v is not None for v in ious)
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}  {100 * metrics['miou']:>7.2f}  (over {n_def} classes)")
    if "acc" in metrics:
        lines.append(f"{'pixel acc':<{width}}  {100 * metrics['acc']:>7.2f}")
    return "\n".join(lines)
