"""Test-time-augmented pseudo-labelling of unlabeled images (METHOD.md section 6, steps 2 and 5).

Every unlabeled image is predicted on the full image with multi-scale x flip TTA (softmax
averaged, argmax) and written as ``<out_dir>/<id>.png`` (palette PNG). The set appears
atomically (:func:`ciscr.utils.io.atomic_dir`): a run killed half-way leaves nothing at
``out_dir`` and a restart redoes the whole set. Per-image resumption is deliberately not
offered: it would need a per-file validity check and labelling is a small part of a stage.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ciscr import dist
from ciscr.data.formats import Sample
from ciscr.data.io import default_palette, read_image, read_mask, save_mask_png
from ciscr.data.transforms import normalize, to_tensor
from ciscr.engine.evaluate import ConfusionMatrix, predict_logits
from ciscr.errors import DataError
from ciscr.utils.io import atomic_dir

log = logging.getLogger(__name__)

TTA_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)


CONF_DIR = "_confidence"  # sub-folder of a label folder with the teacher's confidence maps
GRAY_PALETTE = [(v, v, v) for v in range(256)]


def pseudo_path(label_dir: str | Path, sample_id: str) -> Path:
    """Where the pseudo label of ``sample_id`` lives inside a pseudo-label folder."""
    return Path(label_dir) / f"{sample_id}.png"


def load_eval_image(
    sample: Sample, mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> torch.Tensor:
    """Full image with the evaluation transform (no resize): float (1, 3, H, W) on ``device``."""
    x = normalize(to_tensor(read_image(sample.image)), mean, std)
    return x.unsqueeze(0).to(device)


def read_labels(
    sample: Sample,
    label_source: str | Path,
    size: tuple[int, int],
    num_classes: int,
    ignore_index: int = 255,
) -> np.ndarray:
    """uint8 (H, W) labels of ``sample``: its ground truth (``label_source="gt"``) or its pseudo
    label in the folder ``label_source`` (pass a :class:`~pathlib.Path` for folders)."""
    if isinstance(label_source, str) and label_source == "gt":
        if sample.mask is None:
            raise DataError(f"{sample.image}: image '{sample.id}' has no ground-truth mask")
        path = Path(sample.mask)
    else:
        path = pseudo_path(label_source, sample.id)
    return read_mask(path, num_classes, ignore_index, size)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (BN statistics, no dropout) and restore its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _predict(
    model: nn.Module,
    x: torch.Tensor,
    *,
    num_classes: int,
    scales: Sequence[float],
    flip: bool,
    amp: str,
    with_confidence: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """int64 (B, H, W) argmax of the TTA-averaged softmax at input size (and, with
    ``with_confidence``, its max probability (B, H, W) float)."""
    whole = tuple(scales) == (1.0,) and not flip
    probs = predict_logits(
        model,
        x,
        "whole" if whole else "multiscale",
        num_classes=num_classes,
        scales=tuple(scales),
        flip=flip,
        amp=amp,
    )
    if with_confidence:
        conf, pred = probs.max(dim=1)
        return pred, conf
    return probs.argmax(dim=1)


def predict_sample(
    model: nn.Module,
    sample: Sample,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    amp: str = "none",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> np.ndarray:
    """uint8 (H, W) prediction of one full image (TTA when ``scales``/``flip`` ask for it).

    The caller puts the model in eval mode (see :func:`eval_mode`).
    """
    x = load_eval_image(sample, mean, std, device)
    pred = _predict(model, x, num_classes=num_classes, scales=scales, flip=flip, amp=amp)
    return pred[0].to(torch.uint8).cpu().numpy()


def predict_dataset(
    model: nn.Module, samples: Sequence[Sample], **kw: Any
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(id, uint8 (H, W) prediction)`` for each sample, in order, one at a time.

    A generator so memory stays bounded on large sets; ``kw`` as :func:`predict_sample`. No
    sharding: the caller passes its part. The model is in eval mode while the generator runs.
    """
    batch_size = kw.pop("batch_size", PREDICT_BATCH)
    with_conf = kw.pop("with_confidence", False)
    with eval_mode(model):
        for group in _same_size_batches(
            samples, kw["mean"], kw["std"], kw.get("device", "cpu"), batch_size
        ):
            ids, x = [s.id for s, _ in group], torch.cat([t for _, t in group])
            pred = _predict(
                model,
                x,
                num_classes=kw["num_classes"],
                scales=kw.get("scales", (1.0,)),
                flip=kw.get("flip", False),
                amp=kw.get("amp", "none"),
                with_confidence=with_conf,
            )
            if with_conf:
                # Confidence travels as uint8 (255 = 1.0): 1/255 resolution is plenty for a
                # threshold or a weight, and a PNG per image keeps the set atomic and small.
                pred, conf = pred
                conf8 = (conf.float() * 255).round().to(torch.uint8).cpu().numpy()
                yield from zip(ids, pred.to(torch.uint8).cpu().numpy(), conf8, strict=True)
            else:
                yield from zip(ids, pred.to(torch.uint8).cpu().numpy(), strict=True)


# Images of equal size are predicted together: a batch of 8 small images runs several times
# faster per image on a CPU than one at a time, and datasets are mostly of one size.
PREDICT_BATCH = 8


def _same_size_batches(samples, mean, std, device, batch_size: int):
    """Loaded batches ``[(sample, x)]``: runs of equal-size images inside fixed chunks.

    Chunks are ``samples[i : i + batch_size]`` at multiples of ``batch_size``, so a batch never
    depends on what precedes it: :func:`shard_chunks` hands whole chunks to ranks, and every
    image is then predicted in exactly the batch it gets in a single-process run (float results
    of a convolution can depend on the batch it runs in).
    """
    for start in range(0, len(samples), batch_size):
        group: list[tuple[Sample, torch.Tensor]] = []
        for s in samples[start : start + batch_size]:
            x = load_eval_image(s, mean, std, device)
            if group and group[0][1].shape != x.shape:
                yield group
                group = []
            group.append((s, x))
        if group:
            yield group


def shard_chunks(samples: Sequence[Sample], batch_size: int = PREDICT_BATCH) -> list[Sample]:
    """This rank's share of ``samples`` in whole prediction chunks (see _same_size_batches)."""
    chunks = [list(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    return [s for chunk in dist.shard(chunks) for s in chunk]


def _check_unique(samples: Sequence[Sample]) -> None:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise DataError(f"{s.image}: image id '{s.id}' appears twice in the unlabeled list")
        seen.add(s.id)


def _label_part(
    model: nn.Module,
    samples: Sequence[Sample],
    work: Path,
    cm: ConfusionMatrix | None,
    *,
    palette: np.ndarray | Sequence[Sequence[int]],
    progress: bool,
    ignore_index: int,
    **pred_kw: Any,
) -> int:
    """Label this rank's samples into ``work``; returns how many were scored against gt."""
    from tqdm.auto import tqdm

    scored = 0
    bar = tqdm(total=len(samples), desc="pseudo-labelling", unit="img", dynamic_ncols=True,
               disable=not (progress and dist.is_main()))
    with_conf = pred_kw.get("with_confidence", False)
    for i, (sid, pred, *conf) in enumerate(predict_dataset(model, samples, **pred_kw)):
        s = samples[i]
        path = pseudo_path(work, sid)
        path.parent.mkdir(parents=True, exist_ok=True)  # ids may contain '/' (Cityscapes)
        save_mask_png(path, pred, palette)  # no per-file temp: the whole folder is atomic
        if with_conf:
            cpath = pseudo_path(work / CONF_DIR, sid)
            cpath.parent.mkdir(parents=True, exist_ok=True)
            save_mask_png(cpath, conf[0], GRAY_PALETTE)
        if cm is not None and s.mask is not None:
            # Ground truth of unlabeled images is used ONLY to score the pseudo labels (Table 5);
            # it never reaches training.
            gt = read_mask(Path(s.mask), pred_kw["num_classes"], ignore_index, pred.shape)
            device = pred_kw["device"]
            cm.update(
                torch.from_numpy(pred.astype(np.int64)).unsqueeze(0).to(device),
                torch.from_numpy(gt.astype(np.int64)).unsqueeze(0).to(device),
            )
            scored += 1
        bar.update(1)
    bar.close()
    return scored


def pseudo_label(
    model: nn.Module,
    samples: Sequence[Sample],
    out_dir: str | Path,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    scales: Sequence[float] = TTA_SCALES,
    flip: bool = True,
    device: torch.device | str = "cpu",
    amp: str = "none",
    palette: np.ndarray | Sequence[Sequence[int]] | None = None,
    progress: bool = True,
    score: bool = True,
    ignore_index: int = 255,
    confidence: bool = False,
) -> dict[str, Any]:
    """Write the TTA pseudo label of every sample to ``out_dir/<id>.png``, atomically as a set.

    ``confidence``: also write the TTA softmax maximum of every pixel as a uint8 PNG (255 =
    1.0) to ``out_dir/_confidence/<id>.png``, inside the same atomic folder.

    Under torchrun every rank labels whole chunks of ``samples`` (:func:`shard_chunks`) into rank 0's temporary folder
    (which must be on a shared filesystem); rank 0 renames it into place after a barrier. The
    model is used in eval mode and left in the mode it came in.

    Returns ``{"num_images", "num_scored", **ConfusionMatrix.compute()}`` where the metrics score
    the pseudo labels against the ground truth of the samples that have one (``score=True``);
    with nothing scored, ``miou`` is None.
    """
    samples = list(samples)
    _check_unique(samples)
    palette = default_palette(num_classes) if palette is None else palette
    cm = ConfusionMatrix(num_classes, device, ignore_index) if score else None
    pred_kw = dict(num_classes=num_classes, mean=mean, std=std, device=device, amp=amp,
                   scales=scales, flip=flip, with_confidence=confidence)
    ctx = atomic_dir(out_dir) if dist.is_main() else contextlib.nullcontext(None)
    with ctx as work:
        # Everyone writes into rank 0's temp folder; gathering its name also acts as a barrier
        # guaranteeing the folder exists before anyone writes.
        work = Path(dist.all_gather_object(str(work) if work is not None else None)[0])
        mine = shard_chunks(samples)
        scored = _label_part(model, mine, work, cm, palette=palette, progress=progress,
                             ignore_index=ignore_index, **pred_kw)
        num_scored = sum(dist.all_gather_object(scored))  # also waits for every rank's files
        if dist.is_main():
            missing = [s.id for s in samples if not pseudo_path(work, s.id).is_file()]
            if missing:
                raise RuntimeError(f"pseudo labels missing for {len(missing)} images: {missing[:3]}")
    dist.barrier()  # nobody reads out_dir before rank 0 has renamed it
    result: dict[str, Any] = {"num_images": len(samples), "num_scored": num_scored}
    if cm is not None:
        cm.reduce_from_all_processes()
        if num_scored:
            result.update(cm.compute())
    result.setdefault("miou", None)
    return result
