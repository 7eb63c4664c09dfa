"""The maths of CISC-R: prototypes, CISC maps and the losses built on them (METHOD.md 2-5, 7).

Pure tensor functions, no state. Shapes: B batch, C feature channels, K classes, features at
feature resolution (h, w), labels / masks / maps at label resolution (H, W). Label tensors are
integer (B, H, W) with ``ignore_index`` (255) for void pixels.

Paper equations:

- Eq. 5 :func:`prototype`: masked average of the features (resized to the mask).
- Eq. 6 / 9 / 14 :func:`cisc_map`: per-pixel cosine between features and a prototype/anchor.
- Eq. 7 :func:`rectified_ce`: pseudo-label CE weighted by ``1 - |1[y == k] - map|``;
  :func:`rectified_ce_all` is our every-class variant (METHOD.md 3, last point).
- Eq. 8 :func:`anchors_from_prototypes` (with :func:`class_prototypes`): class anchors.
- Eq. 10 :func:`anchor_distance`: per-class BCE distance of an image to the anchors.
- Eq. 11 :func:`cisc_pair_loss`: symmetric BCE between two labeled images sharing a class.

Why every BCE here goes through :func:`_bce`: ``torch.nn.functional.binary_cross_entropy`` is
banned under CUDA autocast ("unsafe to autocast") and imprecise in half precision, so it runs
in float32 with autocast switched off. Torch clamps its logs to >= -100, so a map value of
exactly 0 (or 1) against the opposite target costs 100 rather than inf; the maps are clamped to
[0, 1] (METHOD.md 2), not to [eps, 1 - eps].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "anchor_distance",
    "anchors_from_prototypes",
    "cisc_map",
    "cisc_map_multi",
    "cisc_maps",
    "cisc_pair_loss",
    "class_prototypes",
    "multi_prototypes",
    "pick_query_class",
    "prototype",
    "rectified_ce",
    "rectified_ce_all",
]

PROTO_EPS = 5e-4  # Eq. 5 denominator guard, as in the released code
COS_EPS = 1e-8  # norm floor of the cosine: a zero prototype gives a map of zeros
DISTANCE_EPS = 1e-4  # Eq. 10 maps are clamped to [eps, 1 - eps] (see anchor_distance)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of (B, N, h, w) to (B, N, *size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x  # bilinear resizing to the same size is the identity
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x / max(||x||, COS_EPS)`` along ``dim``: the normalisation torch's cosine_similarity uses."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(COS_EPS)


def _bce(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-element BCE in float32 with autocast off (see the module docstring)."""
    with torch.autocast(device_type=prob.device.type, enabled=False):
        return F.binary_cross_entropy(prob.float(), target.float(), reduction="none")


def _valid_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``valid`` (same shape); 0 (still in the graph) if none is valid."""
    total = (values * valid.to(values.dtype)).sum()
    return total / valid.sum().clamp_min(1).to(values.dtype)


# --------------------------------------------------------------------------- Eq. 5 and 6


def prototype(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 5: masked average pooling of the features.

    Args:
        features: (B, C, h, w), resized bilinearly (align_corners=False) to the mask size.
        mask: (B, H, W) in {0, 1}; bool, int or float.

    Returns:
        (B, C): ``sum(F_up * m) / (sum(m) + 5e-4)``; an empty mask gives the zero vector.
    """
    m = mask.float()
    # sum(resize(F) * m) == sum(F * resize^T(m)): bilinear resizing is linear, so the mask is
    # moved to feature resolution by the transposed resize instead of upsampling all C feature
    # channels to label resolution (WHY: that upsample and its backward were most of what
    # L_CISC added to a stage-1 step, and its memory at Cityscapes size). Exact up to rounding.
    weights = _resize_transposed(m, tuple(features.shape[-2:])).to(features.dtype)
    summed = torch.einsum("bchw,bhw->bc", features, weights)
    return summed / (m.sum(dim=(1, 2)) + PROTO_EPS).unsqueeze(1)


def _interp_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in): the 1-D linear interpolation (align_corners=False) from n_in to n_out
    points, i.e. column i is the resized unit vector e_i."""
    eye = torch.eye(n_in, device=device).unsqueeze(0)  # (1, n_in channels, n_in points)
    if n_in == n_out:
        return eye[0]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T


def _resize_transposed(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) -> (..., *size): the adjoint of :func:`_resize` from ``size`` to (H, W).

    Bilinear resizing is separable, ``up(F) = A_h F A_w^T``, so its adjoint is
    ``A_h^T m A_w`` with the 1-D interpolation matrices A (tested against autograd)."""
    (h, w), (big_h, big_w) = size, m.shape[-2:]
    a_h = _interp_matrix(h, big_h, m.device)  # (H, h)
    a_w = _interp_matrix(w, big_w, m.device)  # (W, w)
    return torch.einsum("Hh,...HW,Ww->...hw", a_h, m, a_w)


def cisc_map(features: torch.Tensor, proto: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Eq. 6 (and 9, 14): CISC map, the cosine of every pixel's feature with a prototype.

    The cosine is taken at feature resolution (eps 1e-8, so a zero prototype gives 0), then
    resized bilinearly to ``size`` and clamped to [0, 1] (rounding can give 1.0000001, which
    would make BCE fail).

    Args:
        features: (B, C, h, w).
        proto: (B, C), one prototype per image.
        size: (H, W) of the output.

    Returns:
        (B, H, W) in [0, 1].
    """
    dtype = torch.promote_types(features.dtype, proto.dtype)
    p = proto.to(dtype)[:, :, None, None]
    cos = F.cosine_similarity(features.to(dtype), p, dim=1, eps=COS_EPS)  # (B, h, w)
    return _resize(cos.unsqueeze(1), size).squeeze(1).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- Eq. 7


def rectified_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    cmap: torch.Tensor,
    cls: torch.Tensor,
    ignore_index: int = 255,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 7: pseudo-label CE weighted per pixel by ``w = 1 - |1[target == cls] - cmap|``.

    Pixels pseudo-labelled ``cls`` get weight ``cmap``, all others ``1 - cmap``. An image with
    ``cls == -1`` (no class could be picked) gets weight 1 everywhere (plain CE). The weights are
    constants: no gradient reaches ``cmap``.

    Args:
        logits: (B, K, H, W) student logits.
        target: (B, H, W) pseudo labels, ``ignore_index`` for void.
        cmap: (B, H, W) CISC maps in [0, 1] (rows with cls == -1 are not read).
        cls: (B,) long, the queried class per image or -1.
        pixel_weight: optional (B, H, W) constant multiplier of ``w`` (e.g. a confidence mask;
            a pixel with weight 0 still counts in the denominator, as in FixMatch).

    Returns:
        Scalar: sum of ``w * CE`` over non-ignored pixels / their number (whole batch pooled);
        0 (keeping the graph) when no pixel is valid.
    """
    target = target.long()
    k = cls.view(-1, 1, 1).to(target.device)
    with torch.no_grad():
        in_class = (target == k).to(cmap.dtype)
        w = 1.0 - (in_class - cmap).abs()
        w = torch.where(k >= 0, w, torch.ones_like(w)).float()
        if pixel_weight is not None:
            w = w * pixel_weight.float()
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    return _valid_mean(w * ce.float(), target != ignore_index)


def rectified_ce_all(
    logits: torch.Tensor,
    target: torch.Tensor,
    cmaps: torch.Tensor,
    ignore_index: int = 255,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every-class variant of Eq. 7 (ours): each pixel is weighted by the map of its own class.

    For a pixel pseudo-labelled c, Eq. 7 with k = c gives ``1 - |1 - m_c| = m_c``, so
    ``w = cmaps[c]``; a NaN or negative entry means "no map for this class" and gives w = 1.

    Relation to :func:`rectified_ce`: when the pseudo label contains a single class k (plus
    void), this equals ``rectified_ce(logits, target, cmaps[:, k], k)``. With several classes
    they differ on the pixels of the other classes: the one-class loss weights them by
    ``1 - m_k``, this one by their own class map (or 1 when it is missing).

    Args:
        logits: (B, K, H, W); target: (B, H, W) pseudo labels; cmaps: (B, K, H, W).
        pixel_weight: optional (B, H, W) constant multiplier (see :func:`rectified_ce`).

    Returns:
        Scalar, averaged over the non-ignored pixels of the batch (0 with graph if none).
    """
    target = target.long()
    num_classes = cmaps.shape[1]
    with torch.no_grad():
        # Void (and any out-of-range) pixels read class 0's map; they are masked out below.
        idx = torch.where((target >= 0) & (target < num_classes), target, 0)
        m = cmaps.gather(1, idx.unsqueeze(1)).squeeze(1).float()
        w = torch.where(torch.isnan(m) | (m < 0), torch.ones_like(m), m)
        if pixel_weight is not None:
            w = w * pixel_weight.float()
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    return _valid_mean(w * ce.float(), target != ignore_index)


# --------------------------------------------------------------------------- Eq. 11


def _one_sided_bce(
    feat_u: torch.Tensor,
    labels_u: torch.Tensor,
    proto: torch.Tensor,
    k: torch.Tensor,
    ignore_index: int,
    bce_eps: float = 0.0,
) -> torch.Tensor:
    """BCE(cisc_map(feat_u, proto), 1[labels_u == k]) averaged over non-void pixels of u."""
    cmap = cisc_map(feat_u, proto, tuple(labels_u.shape[-2:]))
    if bce_eps > 0:
        cmap = cmap.clamp(bce_eps, 1.0 - bce_eps)
    target = labels_u == k
    return _valid_mean(_bce(cmap, target), labels_u != ignore_index)


def cisc_pair_loss(
    feat_a: torch.Tensor,
    labels_a: torch.Tensor,
    feat_b: torch.Tensor,
    labels_b: torch.Tensor,
    cls: torch.Tensor,
    ignore_index: int = 255,
    bce_eps: float = 0.0,
) -> torch.Tensor:
    """Eq. 11, symmetric: ``BCE(cos(F_a, v_b^k), m_a^k) + BCE(cos(F_b, v_a^k), m_b^k)``.

    The prototypes come from the current features and are NOT detached, so the gradient
    reaches both images' features through both terms. The prototype masks ``labels == k``
    already exclude void pixels. Each BCE is averaged over the non-void pixels of its side of
    the batch (pooled over the batch, like the CE), and computed in float32 (see module doc).

    Args:
        feat_a, feat_b: (B, C, h, w) features of the paired images.
        labels_a, labels_b: (B, H, W) ground truth.
        cls: (B,) long, the class shared by each pair.
        bce_eps: 0 (default, METHOD.md 2) feeds the [0, 1] maps to BCE as they are. Where a
            map is exactly 0 on a positive pixel (feature orthogonal to the prototype: with
            non-negative features, no shared active channel) torch's BCE backward divides by
            1e-12, giving gradients around 1e11. ``bce_eps > 0`` clamps the maps to
            [bce_eps, 1 - bce_eps] inside the BCE, which bounds them by about 1 / bce_eps.

    Returns:
        Scalar loss.
    """
    with torch.autocast(device_type=feat_a.device.type, enabled=False):
        fa, fb = feat_a.float(), feat_b.float()
        k = cls.view(-1, 1, 1).to(labels_a.device)
        proto_a = prototype(fa, labels_a == k)
        proto_b = prototype(fb, labels_b == k)
        loss_a = _one_sided_bce(fa, labels_a, proto_b, k, ignore_index, bce_eps)
        loss_b = _one_sided_bce(fb, labels_b, proto_a, k, ignore_index, bce_eps)
    return loss_a + loss_b


# --------------------------------------------------------------------------- Eq. 8 and 10


def class_prototypes(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 for every class of every image in one pass (one-hot masks + einsum).

    Labels outside [0, num_classes) (void) belong to no class.

    Args:
        features: (B, C, h, w); labels: (B, H, W).

    Returns:
        protos (B, K, C), equal to :func:`prototype` with mask ``labels == k``;
        present (B, K) bool, True where the class has at least one pixel.
    """
    labels = labels.long()
    inside = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    idx = torch.where(inside, labels, num_classes).unsqueeze(1)  # void -> an extra channel
    b, h, w = labels.shape
    # Float one-hot built by scatter (F.one_hot would allocate int64 first: 2x the memory).
    onehot = torch.zeros(b, num_classes + 1, h, w, device=features.device).scatter_(1, idx, 1.0)
    onehot = onehot[:, :num_classes]  # (B, K, H, W)
    counts = onehot.sum(dim=(2, 3))  # (B, K)
    # The masks go to feature resolution by the transposed resize (see prototype()).
    weights = _resize_transposed(onehot, tuple(features.shape[-2:])).to(features.dtype)
    summed = torch.einsum("bchw,bkhw->bkc", features, weights)
    return summed / (counts + PROTO_EPS).unsqueeze(-1), counts > 0


def anchors_from_prototypes(protos: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Eq. 8: anchor of class k = mean of the class-k prototypes of the images containing k.

    Args:
        protos: (N, K, C); present: (N, K) bool.

    Returns:
        (K, C); all zeros for a class no image contains.
    """
    p = present.to(protos.dtype).unsqueeze(-1)  # (N, K, 1)
    return (protos * p).sum(0) / p.sum(0).clamp_min(1)


def anchor_distance(
    features: torch.Tensor,
    labels: torch.Tensor,
    anchors: torch.Tensor,
    ignore_index: int = 255,
    chunk: int = 8,
    balanced: bool = False,
    eps: float = DISTANCE_EPS,
) -> torch.Tensor:
    """Eq. 10 per class: ``D[b, k] = mean_valid BCE(cisc_map(F_b, a_k), 1[labels_b == k])``.

    The maps are clamped to [eps, 1 - eps] inside the BCE. WHY: torch clamps log(0) to -100, so
    one exact-zero cosine on a class-k pixel (non-negative features sharing no active channel
    with the anchor) would weigh as much as ~200 ordinary pixels; with eps = 1e-4 it costs
    -log(1e-4) = 9.2. ``eps=0`` gives the unclamped form.

    ``balanced=True`` (ours, ``method.distance=balanced``): the mean of the BCE over class-k
    pixels and the BCE over the other valid pixels, so the class's own pixels weigh as much as
    everything else whatever its area (WHY: the paper's pixel mean is dominated by the correct
    negatives, so the smaller class k is in an image, the smaller D_k). Where one of the two
    groups is empty, D is the mean over the other (= the paper's D).

    The cosine maps of ``chunk`` anchors are computed at once ((B, chunk, h, w), then resized),
    which bounds memory to B * chunk * H * W floats (COCO has K = 81).

    NaN entries: a class whose anchor is all zeros (no labeled image has it), and every class
    of an image with no valid pixel (the mean is undefined). Selection must skip them.

    Args:
        features: (B, C, h, w); labels: (B, H, W); anchors: (K, C).

    Returns:
        (B, K) float32 distances.
    """
    size = tuple(labels.shape[-2:])
    labels = labels.long()
    valid = (labels != ignore_index).float()  # (B, H, W)
    n_valid = valid.sum(dim=(1, 2))  # (B,)
    f_unit = _unit(features.float(), dim=1)
    a_unit = _unit(anchors.float().to(features.device), dim=1)
    out = []
    for start in range(0, anchors.shape[0], chunk):
        ks = torch.arange(start, min(start + chunk, anchors.shape[0]), device=labels.device)
        cos = torch.einsum("bchw,kc->bkhw", f_unit, a_unit[ks])
        cmaps = _resize(cos, size).clamp(eps, 1.0 - eps)  # (B, k, H, W)
        target = labels.unsqueeze(1) == ks.view(1, -1, 1, 1)
        bce = _bce(cmaps, target) * valid.unsqueeze(1)
        if balanced:
            out.append(_balanced_mean(bce, target.float() * valid.unsqueeze(1), valid))
        else:
            out.append(bce.sum(dim=(2, 3)) / n_valid.unsqueeze(1))  # 0/0 = NaN: no valid pixel
    dist = torch.cat(out, dim=1)
    absent = anchors.to(dist.device).abs().sum(dim=1) == 0
    return dist.masked_fill(absent.unsqueeze(0), float("nan"))


def _balanced_mean(bce: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, k): mean of the positive-pixel mean and the negative-pixel mean of ``bce``
    (B, k, H, W), already zero off ``valid`` (B, H, W); an empty group drops out (NaN if both)."""
    neg = valid.unsqueeze(1) - pos
    n_pos, n_neg = pos.sum(dim=(2, 3)), neg.sum(dim=(2, 3))
    m_pos = (bce * pos).sum(dim=(2, 3)) / n_pos.clamp_min(1)
    m_neg = (bce * neg).sum(dim=(2, 3)) / n_neg.clamp_min(1)
    groups = (n_pos > 0).float() + (n_neg > 0).float()
    return (m_pos + m_neg) / groups  # 0/0 = NaN for no valid pixel


# --------------------------------------------------------------------------- query class


def pick_query_class(
    target: torch.Tensor,
    num_classes: int,
    min_ratio: float = 0.03,
    exclude: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """METHOD.md 3: one class per image to rectify, uniformly among the eligible classes.

    Eligible: present in the pseudo label on at least ``min_ratio`` of its valid pixels (labels
    in [0, num_classes)), and not ``exclude`` (the background class, where there is one).
    Exactly B uniform numbers are drawn from ``generator`` whatever the labels, so the random
    stream (and a resumed run) does not depend on the data.

    Args:
        target: (B, H, W) pseudo labels.

    Returns:
        (B,) long on ``target``'s device, -1 where no class is eligible.
    """
    b = target.shape[0]
    t = target.long().reshape(b, -1)
    inside = (t >= 0) & (t < num_classes)
    idx = torch.where(inside, t, num_classes)
    counts = torch.zeros(b, num_classes + 1, dtype=torch.long, device=t.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx))
    counts = counts[:, :num_classes]
    n_valid = counts.sum(dim=1, keepdim=True)
    eligible = (counts > 0) & (counts >= min_ratio * n_valid)
    if exclude is not None and 0 <= exclude < num_classes:
        eligible[:, exclude] = False
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(b, generator=generator, device=device).to(t.device)
    n_elig = eligible.sum(dim=1)
    rank = (u * n_elig).long().clamp(max=(n_elig - 1).clamp_min(0))  # which eligible class
    # The chosen class is the (rank+1)-th eligible one: first k with cumsum == rank + 1.
    hit = eligible & (eligible.long().cumsum(dim=1) == (rank + 1).unsqueeze(1))
    chosen = hit.long().argmax(dim=1)
    return torch.where(n_elig > 0, chosen, torch.full_like(chosen, -1))


# --------------------------------------------------------------------------- Table 3 ablation


def _kmeans(x: torch.Tensor, n: int, iters: int) -> torch.Tensor:
    """Euclidean k-means of the rows of x (P, C) into n centres, deterministic init.

    Init by farthest-point sampling: first the point farthest from the mean, then repeatedly
    the point farthest from its nearest chosen centre. An empty cluster keeps its centre.
    """
    centres = [x[(x - x.mean(0)).pow(2).sum(1).argmax()]]
    nearest = (x - centres[0]).pow(2).sum(1)
    for _ in range(1, n):
        centres.append(x[nearest.argmax()])
        nearest = torch.minimum(nearest, (x - centres[-1]).pow(2).sum(1))
    c = torch.stack(centres)  # (n, C)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)  # (P,)
        onehot = F.one_hot(assign, n).to(x.dtype)  # (P, n)
        sizes = onehot.sum(0)  # (n,)
        means = onehot.t() @ x / sizes.clamp_min(1).unsqueeze(1)
        c = torch.where((sizes > 0).unsqueeze(1), means, c)
    return c


def multi_prototypes(
    features: torch.Tensor, mask: torch.Tensor, n: int, iters: int = 5
) -> torch.Tensor:
    """Several prototypes per mask (Table 3 "MP"): k-means over the masked pixels.

    Features are resized to the mask size as in :func:`prototype`; the masked pixels of each
    image are clustered into ``n`` groups (see :func:`_kmeans`) and each centre is a prototype.
    With n = 1 the result is the plain mean of the masked pixels, i.e. :func:`prototype` up to
    its 5e-4 denominator guard. An empty mask gives n zero vectors; fewer masked pixels than n
    give repeated centres (harmless for :func:`cisc_map_multi`, which takes a max).

    Args:
        features: (B, C, h, w); mask: (B, H, W) in {0, 1}; n: prototypes per image.

    Returns:
        (B, n, C).
    """
    b, c = features.shape[:2]
    f_up = _resize(features, tuple(mask.shape[-2:]))
    out = features.new_zeros(b, n, c)
    for i in range(b):
        pixels = f_up[i].flatten(1).t()[mask[i].flatten() > 0.5]  # (P, C)
        if pixels.shape[0] > 0:
            out[i] = _kmeans(pixels, n, iters)
    return out


def cisc_maps(features: torch.Tensor, protos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Eq. 6 for K prototypes per image at once: ``out[b, k] = cisc_map(features[b], protos[b, k])``.

    Args:
        features: (B, C, h, w); protos: (B, K, C); size: (H, W).

    Returns:
        (B, K, H, W) in [0, 1].
    """
    return _resize(_cosines(features, protos), size).clamp(0.0, 1.0)


def _cosines(features: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) x (B, n, C) -> (B, n, h, w): cosine of every pixel with each prototype."""
    dtype = torch.promote_types(features.dtype, protos.dtype)
    return torch.einsum(
        "bchw,bnc->bnhw", _unit(features.to(dtype), dim=1), _unit(protos.to(dtype), dim=2)
    )


def cisc_map_multi(
    features: torch.Tensor, protos: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """CISC map against several prototypes: the max over prototypes of the cosine map.

    Max at feature resolution, then bilinear resize and clamp to [0, 1], as :func:`cisc_map`
    (with one prototype the two are equal).

    Args:
        features: (B, C, h, w); protos: (B, n, C); size: (H, W).

    Returns:
        (B, H, W) in [0, 1].
    """
    best = _cosines(features, protos).amax(dim=1, keepdim=True)  # (B, 1, h, w)
    return _resize(best, size).squeeze(1).clamp(0.0, 1.0)
