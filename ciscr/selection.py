"""CISC-based selection (Algorithm 1, Eq. 8-10) and the baselines of METHOD.md section 8.

* Labeled side: per-class query lists (CS = smallest anchor distance, RS = random, AS = best
  training mIoU), always built from the labeled split IN USE: the functions only ever see
  labeled ids, so an unlabeled image can never become a query (the released code's query lists
  leaked unlabeled ground truth, METHOD.md section 9).
* Unlabeled side: reliable / unreliable halves (CISC distance, ST++ stability, random).
* The per-image class prototypes of the labeled set double as the prototype bank (section 7).

Everything is deterministic: ties are broken by image id. Model-facing functions iterate over
``dist.shard(samples)`` and gather with ``all_gather_object`` + ``unshard``, so under torchrun
every rank returns exactly the single-process result, in input order.

Halves: with N candidates, ``ceil(N / 2)`` are kept (query lists, reliable unlabeled images),
so a class with one labeled image keeps it and an odd set gives the extra image to the kept half.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ciscr import dist
from ciscr.cisc import anchor_distance, anchors_from_prototypes, class_prototypes
from ciscr.data.formats import Sample
from ciscr.errors import CheckpointError, ConfigError, DataError
from ciscr.pseudo import eval_mode, load_eval_image, predict_sample, read_labels
from ciscr.utils.io import atomic_path, atomic_write_json, read_json
from ciscr.utils.misc import autocast

# Views averaged into a bank prototype: (scale, horizontal flip), used in this order.
BANK_VIEWS: tuple[tuple[float, bool], ...] = (
    (1.0, False), (1.0, True), (0.75, False), (0.75, True), (1.25, False),
    (1.25, True), (0.5, False), (0.5, True), (1.5, False), (1.5, True),
)  # fmt: skip

QUERIES_FILE = "queries.json"
SPLIT_FILE = "unlabeled_split.json"
META_FILE = "selection_meta.json"  # written last: its presence marks a complete selection


# --------------------------------------------------------------------------- helpers


def _half(n: int) -> int:
    """How many of n ranked candidates are kept: ceil(n / 2) (>= 1 whenever n >= 1)."""
    return math.ceil(n / 2)


def _finite_or(x: float, default: float) -> float:
    return float(x) if math.isfinite(float(x)) else default


def _json_num(x: float) -> float | None:
    """JSON has no NaN/inf: they are stored as null."""
    return float(x) if math.isfinite(float(x)) else None


def _features(model: nn.Module, x: torch.Tensor, amp: str) -> torch.Tensor:
    """Teacher features F of a normalised batch: float32 (B, C, h, w)."""
    with autocast(x.device, amp):
        out = model(x)
    return out.features.float()


# Images of one size whose teacher features are computed in one forward: on a CPU a batch of
# 8 is several times faster per image than single images (the profile of a synthetic run had
# the Eq. 10 distances of the unlabeled pool at 81% of the selection stage, one image at a time).
FEATURE_BATCH = 8


def _map_chunked(fn: Callable[[list[Sample]], list[Any]], samples: Sequence[Sample],
                 batch: int | None = None) -> list[Any]:
    """``fn`` over fixed chunks ``samples[i : i + batch]`` (one result per sample), rank-sharded
    by whole chunks; every rank gets the full list in input order. Fixed chunks make every
    image's batch the same whatever the number of processes (bit-identical results)."""
    batch = batch or FEATURE_BATCH
    chunks = [list(samples[i : i + batch]) for i in range(0, len(samples), batch)]
    mine = [fn(c) for c in dist.shard(chunks)]
    out = [r for part in dist.unshard(dist.all_gather_object(mine)) for r in part]
    assert len(out) == len(samples), "sharded results do not cover the sample list"
    return out


def _equal_size_runs(images: list[torch.Tensor]) -> list[list[int]]:
    """Positions of consecutive images of one size: [[0, 1, 2], [3], [4, 5]]."""
    runs: list[list[int]] = []
    for i, img in enumerate(images):
        if runs and images[runs[-1][0]].shape == img.shape:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _labels_tensor(labels: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(labels.astype(np.int64)).unsqueeze(0).to(device)


def _presence(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) bool: which classes occur in a uint8 label map (ignore pixels excluded)."""
    return class_fractions(labels, num_classes) > 0


def class_fractions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) float64: share of the valid pixels (labels < num_classes) that each class covers."""
    counts = np.bincount(labels.ravel(), minlength=256)[:num_classes].astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def query_eligible(fractions: Any, min_ratio: float) -> np.ndarray:
    """(N, K) bool: labeled images that may be queried for class k.

    An image is eligible for k if k covers at least ``min_ratio`` of its valid pixels. WHY: with
    Eq. 10 a labeled image where k covers a handful of pixels gets a SMALL D_k (its BCE is
    dominated by the many correct negatives), so CS would rank exactly those images first, and
    their class-k prototype is the mean of a few boundary pixels. Where no image reaches the
    ratio for a class, any image containing it stays eligible (the class is still rectified).

    Args:
        fractions: (N, K) class shares, from :func:`class_fractions` of each ground truth.
    """
    f = _as_numpy(fractions).astype(np.float64)
    present = f > 0
    big = present & (f >= min_ratio)
    return np.where(big.any(axis=0, keepdims=True), big, present)


def image_miou(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255
) -> float:
    """mIoU of one prediction against one label map, over the classes in their union.

    Pixels where ``target == ignore_index`` are skipped. Returns a float in [0, 1] (NaN if there
    is no valid pixel).
    """
    valid = target != ignore_index
    p = pred[valid].astype(np.int64)
    t = target[valid].astype(np.int64)
    inter = np.bincount(t[p == t], minlength=num_classes)[:num_classes]
    area_p = np.bincount(p, minlength=num_classes)[:num_classes]
    area_t = np.bincount(t, minlength=num_classes)[:num_classes]
    union = area_p + area_t - inter
    seen = union > 0
    if not seen.any():
        return float("nan")
    return float((inter[seen] / union[seen]).mean())


# --------------------------------------------------------------------------- prototypes / bank


def _view_prototypes(
    model: nn.Module,
    img: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    amp: str,
    views: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypes (1, K, C) averaged over the first ``views`` entries of :data:`BANK_VIEWS`."""
    total, present = None, None
    for scale, flip in BANK_VIEWS[:views]:
        x = img
        if scale != 1.0:
            x = F.interpolate(img, scale_factor=scale, mode="bilinear", align_corners=False)
        if flip:
            x = x.flip(-1)
        feats = _features(model, x, amp)
        if flip:
            feats = feats.flip(-1)  # back into the label's frame; prototype() resizes to it
        protos, present = class_prototypes(feats, labels, num_classes, ignore_index)
        total = protos if total is None else total + protos
    return total / views, present


def compute_labeled_prototypes(
    model: nn.Module,
    labeled_samples: Sequence[Sample],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    amp: str = "none",
    views: int = 1,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes (Eq. 5) of every labeled image from the teacher and its ground truth.

    Features come from the full image with the evaluation transform; ``views > 1`` averages
    extra views (hflip, rescaled: :data:`BANK_VIEWS`). This is also the prototype bank.

    Returns ``protos`` float32 (N, K, C) on CPU (zero rows for absent classes) and ``present``
    bool (N, K).
    """
    if not 1 <= views <= len(BANK_VIEWS):
        raise ConfigError(f"method.bank_views: must lie in [1, {len(BANK_VIEWS)}], got {views}")
    device = torch.device(device)

    def one(s: Sample) -> tuple[np.ndarray, np.ndarray]:
        img = load_eval_image(s, mean, std, device)
        lab = read_labels(s, "gt", tuple(img.shape[-2:]), num_classes, ignore_index)
        p, pres = _view_prototypes(
            model, img, _labels_tensor(lab, device), num_classes, ignore_index, amp, views
        )
        return p[0].float().cpu().numpy(), pres[0].bool().cpu().numpy()

    with eval_mode(model):
        rows = dist.map_sharded(one, labeled_samples)
    if not rows:
        raise DataError("the labeled set is empty: no prototypes can be computed")
    protos = torch.from_numpy(np.stack([r[0] for r in rows]))
    present = torch.from_numpy(np.stack([r[1] for r in rows]))
    return protos, present


def class_anchors(protos: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Class anchors a_k (Eq. 8): mean of the class-k prototypes of the labeled images that
    contain k. ``protos`` (N, K, C), ``present`` (N, K) -> (K, C); all-zero for absent classes."""
    return anchors_from_prototypes(protos, present)


def save_bank(
    path: str | Path, protos: torch.Tensor, present: torch.Tensor, ids: Sequence[str]
) -> None:
    """Write a prototype bank (safetensors, atomic). Call on the main rank only."""
    from safetensors.torch import save_file

    if protos.shape[:2] != present.shape or protos.shape[0] != len(ids):
        raise ValueError(f"bank shapes disagree: {tuple(protos.shape)} {tuple(present.shape)}")
    tensors = {
        "protos": protos.detach().float().cpu().contiguous(),
        "present": present.detach().bool().cpu().contiguous(),
    }
    meta = {"format": "ciscr-prototype-bank-v1", "ids": json.dumps(list(ids))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_bank(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read a bank written by :func:`save_bank` -> (protos (N,K,C), present (N,K), ids)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: prototype bank not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            protos, present = f.get_tensor("protos"), f.get_tensor("present")
        ids = json.loads(meta["ids"])
    except Exception as err:  # any corruption: header, missing key, bad JSON
        raise CheckpointError(f"{path}: not a readable prototype bank ({err})") from None
    if protos.shape[:2] != present.shape or len(ids) != protos.shape[0]:
        raise CheckpointError(f"{path}: inconsistent prototype bank (shapes do not match)")
    return protos, present, ids


# --------------------------------------------------------------------------- distances (Eq. 10)


def image_distances(
    model: nn.Module,
    samples: Sequence[Sample],
    label_source: str | Path,
    anchors: torch.Tensor,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    amp: str = "none",
    ignore_index: int = 255,
    return_fractions: bool = False,
    balanced: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Distance D_k(x) of each image to each class anchor (Eq. 10), float32 (N, K) on CPU.

    Labels come from the ground truth (``label_source="gt"``, labeled images) or from a
    pseudo-label folder (a Path, unlabeled images). D is NaN where an anchor is all-zero (class
    absent from the labeled set). With ``return_fractions`` also returns the (N, K) float64 share
    of valid pixels each class covers in the labels used (> 0 where the class is present).
    ``balanced``: the class-balanced D of :func:`ciscr.cisc.anchor_distance`.
    """
    device = torch.device(device)
    anchors = anchors.to(device)

    def chunk(part: list[Sample]) -> list[tuple[np.ndarray, np.ndarray]]:
        imgs = [load_eval_image(s, mean, std, device) for s in part]
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for run in _equal_size_runs(imgs):
            feats = _features(model, torch.cat([imgs[i] for i in run]), amp)
            for j, i in enumerate(run):
                size = tuple(imgs[i].shape[-2:])
                lab = read_labels(part[i], label_source, size, num_classes, ignore_index)
                d = anchor_distance(feats[j : j + 1], _labels_tensor(lab, device), anchors,
                                    ignore_index=ignore_index, balanced=balanced)
                out.append((d[0].float().cpu().numpy(), class_fractions(lab, num_classes)))
        return out

    with eval_mode(model):
        rows = _map_chunked(chunk, samples)
    k = anchors.shape[0]
    d = torch.from_numpy(np.stack([r[0] for r in rows]) if rows else np.zeros((0, k), np.float32))
    if not return_fractions:
        return d
    frac = np.stack([r[1] for r in rows]) if rows else np.zeros((0, num_classes))
    return d, torch.from_numpy(frac)


def _crop_starts(length: int, crop: int) -> list[int]:
    """Non-overlapping windows; the last one is shifted inwards so every crop is full-size."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, crop))
    if starts[-1] + crop < length:
        starts.append(length - crop)
    return starts


def _presence_score(d: np.ndarray, present: np.ndarray) -> float:
    """Sum of D_k over the classes present (NaN skipped); inf when no class has a distance."""
    vals = d[present & np.isfinite(d)]
    return float(vals.sum()) if vals.size else math.inf


def _crop_scores(
    model: nn.Module,
    img: torch.Tensor,
    lab: np.ndarray,
    anchors: torch.Tensor,
    crop: int,
    num_classes: int,
    amp: str,
    ignore_index: int,
    balanced: bool = False,
) -> list[float]:
    """Score of every crop window of one image (1, 3, H, W) with labels (H, W)."""
    h, w = lab.shape
    scores = []
    for y0 in _crop_starts(h, crop):
        for x0 in _crop_starts(w, crop):
            lc = np.ascontiguousarray(lab[y0 : y0 + crop, x0 : x0 + crop])
            feats = _features(model, img[..., y0 : y0 + crop, x0 : x0 + crop], amp)
            lt = _labels_tensor(lc, img.device)
            d = anchor_distance(feats, lt, anchors, ignore_index=ignore_index, balanced=balanced)
            scores.append(_presence_score(d[0].float().cpu().numpy(), _presence(lc, num_classes)))
    return scores


def crop_level_scores(
    model: nn.Module,
    samples: Sequence[Sample],
    label_source: str | Path,
    anchors: torch.Tensor,
    crop: int,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    amp: str = "none",
    ignore_index: int = 255,
    balanced: bool = False,
) -> dict[str, float]:
    """Crop-level CISC score per image (Table 8 option, ``method.crop_selection``).

    The teacher runs on each ``crop`` x ``crop`` window (non-overlapping, the last row/column
    shifted inwards), as the student sees crops in training; each crop gets the score of
    :func:`split_unlabeled_cisc` on its own labels. SIMPLIFICATION: selection stays image-level;
    an image's score is the median of its finite crop scores (inf if none), to be split with
    :func:`split_by_score` (ascending).
    """
    device = torch.device(device)
    anchors = anchors.to(device)

    def one(s: Sample) -> float:
        img = load_eval_image(s, mean, std, device)
        lab = read_labels(s, label_source, tuple(img.shape[-2:]), num_classes, ignore_index)
        scores = _crop_scores(model, img, lab, anchors, crop, num_classes, amp, ignore_index,
                              balanced)
        finite = [v for v in scores if math.isfinite(v)]
        return float(np.median(finite)) if finite else math.inf

    with eval_mode(model):
        vals = dist.map_sharded(one, samples)
    return {s.id: v for s, v in zip(samples, vals, strict=True)}


# --------------------------------------------------------------------------- query lists


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_rows(ids: Sequence[str], *arrays: np.ndarray) -> None:
    for a in arrays:
        if a.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids but an array has {a.shape[0]} rows")


def _rank_per_class(
    ids: Sequence[str], present: np.ndarray, key: Callable[[int, int], float]
) -> dict[int, list[str]]:
    """For each class k: the images containing k sorted by (key(i, k), id), first half kept."""
    out: dict[int, list[str]] = {}
    for k in range(present.shape[1]):
        cands = sorted(np.flatnonzero(present[:, k]).tolist(), key=lambda i: (key(i, k), ids[i]))
        out[k] = [ids[i] for i in cands[: _half(len(cands))]]
    return out


def query_lists_cs(ids: Sequence[str], present: Any, D: Any) -> dict[int, list[str]]:
    """CS query lists (Algorithm 1): for each class k, the labeled images containing k ranked by
    D_k ascending, first ceil(half) kept (>= 1). ``ids`` (N) are LABELED ids, ``present`` (N, K)
    bool, ``D`` (N, K). NaN distances rank last; a class no labeled image contains gets []
    (the caller falls back to another class / plain CE)."""
    present, D = _as_numpy(present).astype(bool), _as_numpy(D)
    _check_rows(ids, present, D)
    return _rank_per_class(ids, present, lambda i, k: _finite_or(D[i, k], math.inf))


def query_lists_rs(ids: Sequence[str], present: Any, seed: int) -> dict[int, list[str]]:
    """RS query lists: a random ceil(half) of the labeled images containing each class (kept in
    id order). Deterministic in ``seed``, independent per class."""
    present = _as_numpy(present).astype(bool)
    _check_rows(ids, present)
    out: dict[int, list[str]] = {}
    for k in range(present.shape[1]):
        cands = sorted(np.flatnonzero(present[:, k]).tolist(), key=lambda i: ids[i])
        rng = np.random.default_rng([seed, k])
        keep = rng.permutation(len(cands))[: _half(len(cands))]
        out[k] = sorted(ids[cands[j]] for j in keep)
    return out


def query_lists_as(ids: Sequence[str], present: Any, miou: Any) -> dict[int, list[str]]:
    """AS query lists: per class, the ceil(half) of the labeled images containing it with the
    highest training mIoU (``miou`` (N,), from :func:`per_image_miou`; NaN ranks last)."""
    present, miou = _as_numpy(present).astype(bool), _as_numpy(miou).astype(np.float64)
    _check_rows(ids, present, miou)
    return _rank_per_class(ids, present, lambda i, k: -_finite_or(miou[i], -math.inf))


def distance_table(ids: Sequence[str], D: Any) -> dict[int, dict[str, float]]:
    """{k: {id: D[i, k]}}: the values stored next to CS query lists by :func:`write_selection`."""
    D = _as_numpy(D)
    return {k: {sid: float(D[i, k]) for i, sid in enumerate(ids)} for k in range(D.shape[1])}


def per_image_miou(
    model: nn.Module,
    labeled_samples: Sequence[Sample],
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    amp: str = "none",
    ignore_index: int = 255,
) -> np.ndarray:
    """(N,) mIoU of the model's whole-image prediction against each labeled image's ground truth
    (classes in the union of both, ignore pixels skipped): the AS ranking key."""
    kw = dict(num_classes=num_classes, mean=mean, std=std, device=device, amp=amp)

    def one(s: Sample) -> float:
        pred = predict_sample(model, s, **kw)
        gt = read_labels(s, "gt", pred.shape, num_classes, ignore_index)
        return image_miou(pred, gt, num_classes, ignore_index)

    with eval_mode(model):
        vals = dist.map_sharded(one, labeled_samples)
    return np.asarray(vals, dtype=np.float64)


# --------------------------------------------------------------------------- unlabeled halves


def split_by_score(
    ids: Sequence[str], scores: dict[str, float], *, ascending: bool = True
) -> tuple[list[str], list[str]]:
    """Rank ids by score (``ascending``: smallest first), ties by id; NaN/inf rank last. The
    first ceil(N/2) are reliable. Returns (reliable ids, unreliable ids), each in ranked order."""
    sign = 1.0 if ascending else -1.0
    worst = math.inf

    def key(sid: str) -> tuple[float, str]:
        v = float(scores[sid])
        return (sign * v if math.isfinite(v) else worst, sid)

    order = sorted(ids, key=key)
    n = _half(len(order))
    return order[:n], order[n:]


def split_unlabeled_cisc(
    ids: Sequence[str], D: Any, present_in_pseudo: Any, all_classes: bool = False
) -> tuple[list[str], list[str], dict[str, float]]:
    """CISC split (Algorithm 1): score = sum of D_k over the classes present in the image's
    pseudo label (NaN skipped; inf when none has a distance); ``all_classes``: over every class
    with a distance, as Eq. 10 / Algorithm 1 write it (``method.image_score=all``). The
    ceil(N/2) smallest scores are reliable. ``D``, ``present_in_pseudo``: (N, K).
    Returns (reliable, unreliable, scores)."""
    D, pres = _as_numpy(D), _as_numpy(present_in_pseudo).astype(bool)
    if all_classes:
        pres = np.ones_like(pres)
    _check_rows(ids, D, pres)
    scores = {sid: _presence_score(D[i], pres[i]) for i, sid in enumerate(ids)}
    rel, unrel = split_by_score(ids, scores, ascending=True)
    return rel, unrel, scores


def split_unlabeled_stpp(
    ids: Sequence[str],
    preds_by_snapshot: Sequence[dict[str, np.ndarray]],
    final: dict[str, np.ndarray],
    num_classes: int,
) -> tuple[list[str], list[str], dict[str, float]]:
    """ST++ stability split: score = mean over the earlier snapshots of the image mIoU between
    the snapshot's prediction and the final model's; the ceil(N/2) HIGHEST are reliable."""
    if not preds_by_snapshot:
        raise ConfigError("method.stpp_snapshots: ST++ selection needs >= 1 earlier checkpoint")
    scores = {
        sid: float(
            np.mean([image_miou(p[sid], final[sid], num_classes) for p in preds_by_snapshot])
        )
        for sid in ids
    }
    rel, unrel = split_by_score(ids, scores, ascending=False)
    return rel, unrel, scores


def stability_scores(
    snapshots: Sequence[nn.Module],
    final: nn.Module,
    samples: Sequence[Sample],
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    amp: str = "none",
) -> dict[str, float]:
    """Streaming ST++ scores (memory bounded: one image's predictions at a time), rank-sharded.
    Equals the scores of :func:`split_unlabeled_stpp`; split with ``split_by_score(...,
    ascending=False)``."""
    if not snapshots:
        raise ConfigError("method.stpp_snapshots: ST++ selection needs >= 1 earlier checkpoint")
    kw = dict(num_classes=num_classes, mean=mean, std=std, device=device, amp=amp)

    def one(s: Sample) -> float:
        ref = predict_sample(final, s, **kw)
        vals = [image_miou(predict_sample(m, s, **kw), ref, num_classes) for m in snapshots]
        return float(np.mean(vals))

    with contextlib.ExitStack() as stack:
        for m in (final, *snapshots):
            stack.enter_context(eval_mode(m))
        vals = dist.map_sharded(one, samples)
    return {s.id: v for s, v in zip(samples, vals, strict=True)}


def split_unlabeled_random(
    ids: Sequence[str], seed: int
) -> tuple[list[str], list[str], dict[str, float]]:
    """Blind 2-stage: a random ceil(N/2) is "reliable". Scores are the uniform draws used (the
    smallest are reliable), so the split is reproducible from the written file."""
    rng = np.random.default_rng(seed)
    ordered = sorted(ids)  # independent of the input order
    scores = {sid: float(v) for sid, v in zip(ordered, rng.random(len(ordered)), strict=True)}
    rel, unrel = split_by_score(ordered, scores, ascending=True)
    return rel, unrel, scores


# --------------------------------------------------------------------------- files


@dataclass
class Selection:
    """What :func:`read_selection` returns."""

    queries: dict[int, list[str]]
    reliable: list[str]
    unreliable: list[str]
    scores: dict[str, float | None]
    meta: dict[str, Any] = field(default_factory=dict)


def write_selection(
    out_dir: str | Path,
    queries: dict[int, list[str]],
    reliable: Sequence[str],
    unreliable: Sequence[str],
    scores: dict[str, float],
    meta: dict[str, Any] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    query_scores: dict[int, dict[str, float]] | None = None,
) -> None:
    """Write queries.json ``{class_name: [{id, D}]}``, unlabeled_split.json ``{reliable:
    [{id, score}], unreliable: [...]}`` and selection_meta.json (last; marks completeness), each
    atomically. Non-finite numbers become null. Call on the main rank only."""
    out_dir = Path(out_dir)
    num_classes = max(queries, default=-1) + 1
    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    if len(names) < num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    qs = query_scores or {}
    qjson = {
        names[k]: [
            {"id": sid, "D": _json_num(qs.get(k, {}).get(sid, math.nan))}
            for sid in queries.get(k, [])
        ]
        for k in range(num_classes)
    }

    def entries(part: Sequence[str]) -> list[dict[str, Any]]:
        return [{"id": sid, "score": _json_num(scores.get(sid, math.nan))} for sid in part]

    atomic_write_json(out_dir / QUERIES_FILE, qjson)
    atomic_write_json(
        out_dir / SPLIT_FILE, {"reliable": entries(reliable), "unreliable": entries(unreliable)}
    )
    atomic_write_json(out_dir / META_FILE, {**(meta or {}), "class_names": names[:num_classes]})


def _check_ids(path: Path, found: Sequence[str], allowed: Sequence[str] | None, what: str) -> None:
    if allowed is None:
        return
    bad = sorted(set(found) - set(allowed))
    if bad:
        raise DataError(
            f"{path}: {len(bad)} ids are not in the {what} split in use (e.g. '{bad[0]}'); "
            "delete the selection so it is rebuilt"
        )


def read_selection(
    out_dir: str | Path,
    *,
    labeled_ids: Sequence[str] | None = None,
    unlabeled_ids: Sequence[str] | None = None,
) -> Selection:
    """Read what :func:`write_selection` wrote. With ``labeled_ids`` / ``unlabeled_ids``, every
    query must be a labeled id and every split entry an unlabeled id (DataError otherwise): a
    stale selection from another split must never leak unlabeled ground truth into training."""
    out_dir = Path(out_dir)
    for name in (META_FILE, QUERIES_FILE, SPLIT_FILE):
        if not (out_dir / name).is_file():
            raise DataError(f"{out_dir / name}: selection file missing (selection incomplete)")
    try:
        meta = read_json(out_dir / META_FILE)
        qjson = read_json(out_dir / QUERIES_FILE)
        sjson = read_json(out_dir / SPLIT_FILE)
        index = {n: k for k, n in enumerate(meta["class_names"])}
        queries = {index[n]: [e["id"] for e in v] for n, v in qjson.items()}
        reliable = [e["id"] for e in sjson["reliable"]]
        unreliable = [e["id"] for e in sjson["unreliable"]]
        scores = {e["id"]: e["score"] for e in sjson["reliable"] + sjson["unreliable"]}
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{out_dir}: corrupt selection files ({err})") from None
    _check_ids(
        out_dir / QUERIES_FILE, [i for v in queries.values() for i in v], labeled_ids, "labeled"
    )
    _check_ids(out_dir / SPLIT_FILE, reliable + unreliable, unlabeled_ids, "unlabeled")
    return Selection(queries, reliable, unreliable, scores, meta)
