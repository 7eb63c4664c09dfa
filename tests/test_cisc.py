"""Tests of ciscr.cisc against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ciscr import cisc

IGN = 255
R2 = 1 / math.sqrt(2)  # cos of 45 degrees


def feats(*pixels: tuple[float, ...]) -> torch.Tensor:
    """One image whose pixels are given left to right on a single row: (1, C, 1, len)."""
    return torch.tensor(pixels, dtype=torch.float32).t().reshape(1, len(pixels[0]), 1, -1)


# --------------------------------------------------------------------------- prototype


def test_prototype_same_resolution_by_hand():
    # Channel 0 = [[1, 2], [3, 4]], channel 1 = [[0, 1], [0, 1]], mask = top row.
    # sum(F * m) = (1 + 2, 0 + 1) = (3, 1); sum(m) = 2 -> v = (3, 1) / 2.0005.
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    m = torch.tensor([[[1, 1], [0, 0]]])
    v = cisc.prototype(f, m)
    assert v.shape == (1, 2)
    assert torch.allclose(v, torch.tensor([[3 / 2.0005, 1 / 2.0005]]))


def test_prototype_upsamples_bilinearly():
    # One channel, 1x2 features [0, 4] resized to 1x4 with align_corners=False:
    # source x = (dst + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> [0, 1, 3, 4] (edges clamp).
    # Mask [1, 1, 0, 0] -> v = (0 + 1) / 2.0005. Bool mask accepted.
    f = torch.tensor([[[[0.0, 4.0]]]])
    m = torch.tensor([[[True, True, False, False]]])
    assert torch.allclose(cisc.prototype(f, m), torch.tensor([[1 / 2.0005]]))
    # Mask on the right half: (3 + 4) / 2.0005.
    m2 = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    assert torch.allclose(cisc.prototype(f, m2), torch.tensor([[7 / 2.0005]]))


@pytest.mark.parametrize("h,w,H,W", [(16, 16, 64, 64), (8, 11, 33, 41), (13, 7, 40, 21),
                                     (40, 30, 20, 15)])
def test_prototype_equals_upsampling_the_features(h, w, H, W):
    # prototype() moves the mask to feature resolution with the transposed resize instead of
    # upsampling the features: the same Eq. 5 value, checked against the direct form and the
    # transposed resize against autograd's adjoint of F.interpolate.
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 6, h, w, generator=g, dtype=torch.float64)
    m = torch.rand(3, H, W, generator=g) > 0.5
    up = F.interpolate(f, size=(H, W), mode="bilinear", align_corners=False)
    direct = torch.einsum("bchw,bhw->bc", up, m.double()) / (m.sum((1, 2)) + cisc.PROTO_EPS)[:, None]
    assert torch.allclose(cisc.prototype(f, m), direct, atol=1e-6)
    z = torch.zeros(3, 1, h, w, dtype=torch.float64, requires_grad=True)
    (adj,) = torch.autograd.grad(F.interpolate(z, size=(H, W), mode="bilinear",
                                               align_corners=False), z, m.double()[:, None])
    assert torch.allclose(cisc._resize_transposed(m.float(), (h, w)).double(), adj[:, 0],
                          atol=1e-6)


def test_prototype_empty_mask_is_zero():
    f = torch.rand(2, 3, 2, 2) + 1
    m = torch.zeros(2, 4, 4, dtype=torch.long)
    m[1, 0, 0] = 1
    v = cisc.prototype(f, m)
    assert torch.equal(v[0], torch.zeros(3))
    assert v[1].abs().sum() > 0


# --------------------------------------------------------------------------- cisc_map


def test_cisc_map_by_hand_with_resize():
    # Pixels (1, 0) and (1, 1) against prototype (1, 0): cos = 1, 1/sqrt2.
    # Resized 1x2 -> 1x4: [1, 0.75 + 0.25/sqrt2, 0.25 + 0.75/sqrt2, 1/sqrt2].
    f = feats((1.0, 0.0), (1.0, 1.0))
    out = cisc.cisc_map(f, torch.tensor([[2.0, 0.0]]), (1, 4))
    expected = torch.tensor([[[1.0, 0.75 + 0.25 * R2, 0.25 + 0.75 * R2, R2]]])
    assert out.shape == (1, 1, 4)
    assert torch.allclose(out, expected)


def test_cisc_maps_equal_one_cisc_map_per_class():
    g = torch.Generator().manual_seed(1)
    f, protos = torch.randn(2, 5, 4, 6, generator=g), torch.randn(2, 3, 5, generator=g)
    protos[1, 2] = 0.0  # a zero prototype gives a zero map, as in cisc_map
    maps = cisc.cisc_maps(f, protos, (8, 12))
    assert maps.shape == (2, 3, 8, 12)
    for k in range(3):
        assert torch.allclose(maps[:, k], cisc.cisc_map(f, protos[:, k], (8, 12)), atol=1e-6)


def test_cisc_map_clamps_and_zero_prototype():
    # Pixel (-1, 0) has cos -1 with (1, 0): clamped to 0. Pixel (3, 0): cos 1.
    f = feats((-1.0, 0.0), (3.0, 0.0))
    out = cisc.cisc_map(f, torch.tensor([[1.0, 0.0]]), (1, 2))
    assert torch.equal(out, torch.tensor([[[0.0, 1.0]]]))
    # A zero prototype (empty mask) gives a map of zeros, not NaN.
    zero = cisc.cisc_map(f.abs(), torch.zeros(1, 2), (2, 2))
    assert torch.equal(zero, torch.zeros(1, 2, 2))
    # Maps never exceed 1, even for identical vectors with awkward rounding.
    g = torch.full((1, 256, 2, 2), 0.1)
    assert cisc.cisc_map(g, torch.full((1, 256), 0.1), (3, 3)).max() <= 1.0


def test_gradcheck_prototype_and_cisc_map():
    gen = torch.Generator().manual_seed(0)
    f = (torch.rand(2, 3, 2, 2, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    m = torch.tensor([[[1, 0, 0], [1, 1, 0], [0, 0, 1]], [[0, 1, 1], [0, 0, 0], [1, 0, 0]]])
    assert torch.autograd.gradcheck(lambda x: cisc.prototype(x, m), (f,))
    # Positive features and prototype: cos strictly inside (0, 1), away from the clamp's kinks.
    p = (torch.rand(2, 3, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, q: cisc.cisc_map(x, q, (3, 3)), (f, p))


# --------------------------------------------------------------------------- rectified CE

# Logits (0, ln 3) -> softmax (1/4, 3/4): CE is ln 4 for target 0, ln(4/3) for target 1.
LN4, LN43 = math.log(4), math.log(4 / 3)


def logits_13(n: int) -> torch.Tensor:
    return torch.tensor([0.0, math.log(3)]).view(1, 2, 1, 1).expand(1, 2, 1, n).clone()


def test_rectified_ce_by_hand():
    # target [0, 1, void], cls 0, cmap [0.8, 0.3, 0.9]:
    # w = [1 - |1 - 0.8|, 1 - |0 - 0.3|, -] = [0.8, 0.7]; loss = (0.8 ln4 + 0.7 ln4/3) / 2.
    logits = logits_13(3)
    target = torch.tensor([[[0, 1, IGN]]])
    cmap = torch.tensor([[[0.8, 0.3, 0.9]]])
    loss = cisc.rectified_ce(logits, target, cmap, torch.tensor([0]))
    assert loss.item() == pytest.approx((0.8 * LN4 + 0.7 * LN43) / 2, rel=1e-6)
    # cls 1: w = [1 - 0.8, 1 - |1 - 0.3|] = [0.2, 0.3].
    loss1 = cisc.rectified_ce(logits, target, cmap, torch.tensor([1]))
    assert loss1.item() == pytest.approx((0.2 * LN4 + 0.3 * LN43) / 2, rel=1e-6)


def test_rectified_ce_no_class_is_plain_ce_and_batch_pooling():
    # Image 0: cls -1 -> w = 1: CE (ln4, ln4/3). Image 1: cls 1, target [1, void], cmap 0.5
    # -> w 0.5 on one valid pixel with CE ln4/3. Pooled over 3 valid pixels.
    logits = torch.cat([logits_13(2), logits_13(2)])
    target = torch.tensor([[[0, 1]], [[1, IGN]]])
    cmap = torch.tensor([[[0.0, 0.0]], [[0.5, 0.5]]])
    loss = cisc.rectified_ce(logits, target, cmap, torch.tensor([-1, 1]))
    assert loss.item() == pytest.approx((LN4 + LN43 + 0.5 * LN43) / 3, rel=1e-6)
    # All images -1 -> exactly torch's CE with ignore_index.
    plain = cisc.rectified_ce(logits, target, cmap, torch.tensor([-1, -1]))
    ref = F.cross_entropy(logits, target, ignore_index=IGN)
    assert torch.allclose(plain, ref)


def test_rectified_ce_weights_have_no_gradient_and_empty_keeps_graph():
    logits = logits_13(2).requires_grad_()
    cmap = torch.tensor([[[0.4, 0.6]]], requires_grad=True)
    loss = cisc.rectified_ce(logits, torch.tensor([[[0, 1]]]), cmap, torch.tensor([0]))
    loss.backward()
    assert cmap.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # No valid pixel: loss 0 that still backpropagates.
    logits2 = logits_13(2).requires_grad_()
    empty = cisc.rectified_ce(logits2, torch.full((1, 1, 2), IGN), cmap, torch.tensor([0]))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.equal(logits2.grad, torch.zeros_like(logits2))


def test_rectified_ce_all_by_hand():
    # target [0, 1, 1, void]; map of class 0 = [0.8, ...]; map of class 1 = [., 0.6, NaN, .]
    # -> w = [0.8, 0.6, 1 (NaN = no map)]; loss = (0.8 ln4 + 0.6 ln4/3 + ln4/3) / 3.
    logits = logits_13(4)
    target = torch.tensor([[[0, 1, 1, IGN]]])
    nan = float("nan")
    cmaps = torch.tensor([[[[0.8, 0.1, 0.1, 0.1]], [[0.2, 0.6, nan, 0.3]]]])
    loss = cisc.rectified_ce_all(logits, target, cmaps)
    assert loss.item() == pytest.approx((0.8 * LN4 + 0.6 * LN43 + LN43) / 3, rel=1e-6)
    # A negative entry also means "no map": class 0 map -1 -> w = 1 on pixel 0.
    cmaps[0, 0, 0, 0] = -1.0
    loss2 = cisc.rectified_ce_all(logits, target, cmaps)
    assert loss2.item() == pytest.approx((LN4 + 0.6 * LN43 + LN43) / 3, rel=1e-6)


def test_rectified_ce_all_equals_one_class_when_label_has_one_class():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=gen)
    target = torch.full((2, 4, 4), 2)
    target[0, 0] = IGN
    cmap = torch.rand(2, 4, 4, generator=gen)
    cmaps = torch.full((2, 3, 4, 4), float("nan"))
    cmaps[:, 2] = cmap
    one = cisc.rectified_ce(logits, target, cmap, torch.tensor([2, 2]))
    all_ = cisc.rectified_ce_all(logits, target, cmaps)
    assert torch.allclose(one, all_)


# --------------------------------------------------------------------------- pair loss


def bce(p: float, t: int) -> float:
    return -math.log(p) if t == 1 else -math.log(1 - p)


def test_cisc_pair_loss_by_hand_and_symmetric():
    # k = 1. Image a: pixels (1,1) [k], (1,3) [class 0], (5,5) [void].
    # Image b: pixels (2,0) [k], (1,2) [class 0].
    # v_b = (2,0)/1.0005 ~ direction (1,0): cos over a = 1/sqrt2, 1/sqrt10 (void ignored)
    #   -> side a = (-ln(1/sqrt2) - ln(1 - 1/sqrt10)) / 2.
    # v_a = (1,1)/1.0005 ~ direction (1,1): cos over b = 1/sqrt2, 3/sqrt10
    #   -> side b = (-ln(1/sqrt2) - ln(1 - 3/sqrt10)) / 2.
    fa = feats((1.0, 1.0), (1.0, 3.0), (5.0, 5.0))
    fb = feats((2.0, 0.0), (1.0, 2.0))
    la = torch.tensor([[[1, 0, IGN]]])
    lb = torch.tensor([[[1, 0]]])
    cls = torch.tensor([1])
    side_a = (bce(R2, 1) + bce(1 / math.sqrt(10), 0)) / 2
    side_b = (bce(R2, 1) + bce(3 / math.sqrt(10), 0)) / 2
    loss = cisc.cisc_pair_loss(fa, la, fb, lb, cls)
    assert loss.item() == pytest.approx(side_a + side_b, rel=1e-5)
    # Symmetric: swapping the roles gives the same value.
    swapped = cisc.cisc_pair_loss(fb, lb, fa, la, cls)
    assert swapped.item() == pytest.approx(loss.item(), rel=1e-6)


def test_cisc_pair_loss_is_sum_of_one_sided_bces():
    gen = torch.Generator().manual_seed(2)
    fa, fb = torch.rand(2, 4, 3, 3, generator=gen), torch.rand(2, 4, 3, 3, generator=gen)
    la = torch.randint(0, 3, (2, 6, 6), generator=gen)
    lb = torch.randint(0, 3, (2, 6, 6), generator=gen)
    la[:, 0] = IGN
    cls = torch.tensor([0, 2])
    k = cls.view(-1, 1, 1)

    def one_side(f, lab, proto):
        cmap = cisc.cisc_map(f, proto, (6, 6))
        valid = lab != IGN
        return F.binary_cross_entropy(cmap[valid], (lab == k).float()[valid])

    expected = one_side(fa, la, cisc.prototype(fb, lb == k)) + one_side(
        fb, lb, cisc.prototype(fa, la == k)
    )
    assert torch.allclose(cisc.cisc_pair_loss(fa, la, fb, lb, cls), expected)


def test_cisc_pair_loss_gradient_reaches_both_images():
    gen = torch.Generator().manual_seed(3)
    fa = (torch.rand(1, 4, 2, 2, generator=gen) + 0.1).requires_grad_()
    fb = (torch.rand(1, 4, 2, 2, generator=gen) + 0.1).requires_grad_()
    la = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]])
    lb = torch.tensor([[[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]]])
    loss = cisc.cisc_pair_loss(fa, la, fb, lb, torch.tensor([1]))
    loss.backward()
    assert fa.grad.abs().sum() > 0 and fb.grad.abs().sum() > 0
    # Side a alone, with F_a frozen: F_b is reached only through its (undetached) prototype.
    fb2 = fb.detach().clone().requires_grad_()
    only_proto = cisc._one_sided_bce(
        fa.detach(), la, cisc.prototype(fb2, lb == 1), torch.tensor([1]).view(-1, 1, 1), IGN
    )
    only_proto.backward()
    assert fb2.grad.abs().sum() > 0  # the prototype is not detached


def test_cisc_pair_loss_under_bf16_autocast_is_float32():
    fa = torch.rand(1, 4, 2, 2, dtype=torch.bfloat16) + 0.1
    lab = torch.tensor([[[1, 0], [0, 1]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cisc.cisc_pair_loss(fa, lab, fa, lab, torch.tensor([1]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --------------------------------------------------------------------------- anchors


def test_class_prototypes_by_hand_and_equal_to_prototype():
    # Pixels (1,0) [0], (3,2) [0], (0,4) [1], (9,9) [void]; K = 3.
    # Class 0: (4, 2)/2.0005; class 1: (0, 4)/1.0005; class 2 absent -> 0.
    f = feats((1.0, 0.0), (3.0, 2.0), (0.0, 4.0), (9.0, 9.0))
    lab = torch.tensor([[[0, 0, 1, IGN]]])
    protos, present = cisc.class_prototypes(f, lab, 3)
    expected = torch.tensor([[[4 / 2.0005, 2 / 2.0005], [0.0, 4 / 1.0005], [0.0, 0.0]]])
    assert torch.allclose(protos, expected)
    assert present.tolist() == [[True, True, False]]
    # Random case with resizing: equal to prototype() per class.
    gen = torch.Generator().manual_seed(4)
    f = torch.rand(2, 5, 3, 3, generator=gen)
    lab = torch.randint(0, 4, (2, 7, 7), generator=gen)
    lab[0, :2] = IGN
    protos, present = cisc.class_prototypes(f, lab, 4)
    for k in range(4):
        assert torch.allclose(protos[:, k], cisc.prototype(f, lab == k), atol=1e-6)
        assert torch.equal(present[:, k], (lab == k).flatten(1).any(1))


def test_anchors_from_prototypes_by_hand():
    # Class 0 in both images: (1 + 3) / 2 = 2; class 1 only in image 0: 5; class 2 in none: 0.
    protos = torch.tensor([[[1.0], [5.0], [8.0]], [[3.0], [7.0], [9.0]]])
    present = torch.tensor([[True, True, False], [True, False, False]])
    anchors = cisc.anchors_from_prototypes(protos, present)
    assert torch.equal(anchors, torch.tensor([[2.0], [5.0], [0.0]]))


def test_anchor_distance_by_hand_and_nan():
    # Pixels (1,0) [0], (0,1) [1], (3,3) [void]; anchors a0 = (1,0), a1 = (1,1), a2 = 0.
    # a0: cos [1, 0] vs target [1, 0] -> BCE 0, 0 -> D = 0.
    # a1: cos [1/sqrt2, 1/sqrt2] vs [0, 1] -> (-ln(1 - 1/sqrt2) - ln(1/sqrt2)) / 2.
    # a2: zero anchor -> NaN.
    f = feats((1.0, 0.0), (0.0, 1.0), (3.0, 3.0))
    lab = torch.tensor([[[0, 1, IGN]]])
    anchors = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    d = cisc.anchor_distance(f, lab, anchors)
    assert d.shape == (1, 3)
    # The maps are clamped to [eps, 1 - eps] (Eq. 10 form of ciscr): a perfect map costs
    # -ln(1 - eps) per pixel instead of 0; eps=0 gives the paper's unclamped D.
    assert d[0, 0].item() == pytest.approx(-math.log(1 - cisc.DISTANCE_EPS), rel=1e-3)
    assert cisc.anchor_distance(f, lab, anchors, eps=0.0)[0, 0].item() == pytest.approx(
        0.0, abs=1e-6)
    assert d[0, 1].item() == pytest.approx((bce(R2, 0) + bce(R2, 1)) / 2, rel=1e-5)
    assert math.isnan(d[0, 2].item())


def test_balanced_anchor_distance_by_hand():
    # Pixels (1,0) [0], (0,1) [0], (1,1) [1], (2,2) [void]. Anchor a1 = (1,1): cos = R2, R2, 1.
    # class 1, pixel mean: (bce(R2,0) + bce(R2,0) + 0) / 3; balanced: (0 + bce(R2,0)) / 2.
    # Anchor a2 = (1,0) for a class absent from the image: no positive pixel, so balanced = the
    # negative mean = the pixel mean.
    f = feats((1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (2.0, 2.0))
    lab = torch.tensor([[[0, 0, 1, IGN]]])
    anchors = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    # eps=0: the unclamped maps, so a perfect pixel costs exactly 0 in these hand values
    plain = cisc.anchor_distance(f, lab, anchors, eps=0.0)
    bal = cisc.anchor_distance(f, lab, anchors, balanced=True, eps=0.0)
    assert plain[0, 1].item() == pytest.approx(2 * bce(R2, 0) / 3, rel=1e-5)
    assert bal[0, 1].item() == pytest.approx(bce(R2, 0) / 2, rel=1e-5)
    # class 2 absent from the labels: negatives only, both forms agree
    assert bal[0, 2].item() == pytest.approx(plain[0, 2].item(), rel=1e-6)


def test_balanced_distance_does_not_favour_images_where_the_class_is_small():
    # Same features everywhere except the class-k pixels, which the anchor matches poorly
    # (cos = R2). With the pixel mean, the image with ONE such pixel out of 10 looks closer to
    # the anchor than the image with five; balanced, both get the same distance.
    def image(n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        px = [(1.0, 1.0) if i < n_pos else (0.0, 1.0) for i in range(10)]
        lab = torch.tensor([[[1 if i < n_pos else 0 for i in range(10)]]])
        return feats(*px), lab

    anchor = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # class 1's anchor; class 0 unused
    (f1, l1), (f5, l5) = image(1), image(5)
    plain = [cisc.anchor_distance(f, lab, anchor)[0, 1].item() for f, lab in ((f1, l1), (f5, l5))]
    bal = [cisc.anchor_distance(f, lab, anchor, balanced=True)[0, 1].item()
           for f, lab in ((f1, l1), (f5, l5))]
    assert plain[0] < plain[1]
    assert bal[0] == pytest.approx(bal[1], rel=1e-5)


def test_anchor_distance_matches_loop_over_cisc_map_for_any_chunk():
    gen = torch.Generator().manual_seed(5)
    f = torch.rand(2, 4, 3, 3, generator=gen)
    lab = torch.randint(0, 5, (2, 6, 6), generator=gen)
    lab[1, 0] = IGN
    anchors = torch.rand(5, 4, generator=gen)
    valid = lab != IGN
    ref = torch.empty(2, 5)
    for k in range(5):
        cmap = cisc.cisc_map(f, anchors[k].expand(2, -1), (6, 6))
        for b in range(2):
            t = (lab[b] == k).float()
            ref[b, k] = F.binary_cross_entropy(cmap[b][valid[b]], t[valid[b]])
    for chunk in (1, 2, 8):
        assert torch.allclose(cisc.anchor_distance(f, lab, anchors, chunk=chunk), ref, atol=1e-5)


# --------------------------------------------------------------------------- query class


def label_image() -> torch.Tensor:
    # 100 pixels: 10 void, 50 of class 0, 35 of class 1, 3 of class 2 (3/90 = 3.3% >= 3%),
    # 2 of class 3 (2/90 = 2.2% < 3%).
    flat = torch.tensor([IGN] * 10 + [0] * 50 + [1] * 35 + [2] * 3 + [3] * 2)
    return flat.view(10, 10)


def test_pick_query_class_threshold_and_background():
    t = label_image().expand(300, 10, 10)
    picks = cisc.pick_query_class(t, 4, 0.03, None, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1, 2}  # class 3 is under 3%
    counts = torch.bincount(picks, minlength=4)[:3].float()
    assert (counts - 100).abs().max() < 35  # roughly uniform over 3 eligible classes
    no_bg = cisc.pick_query_class(t, 4, 0.03, 0, torch.Generator().manual_seed(0))
    assert set(no_bg.tolist()) == {1, 2}
    strict = cisc.pick_query_class(t, 4, 0.04, 0, torch.Generator().manual_seed(0))
    assert set(strict.tolist()) == {1}  # 3/90 < 4%


def test_pick_query_class_none_and_determinism():
    t = torch.stack([torch.full((4, 4), IGN), torch.zeros(4, 4, dtype=torch.long)])
    picks = cisc.pick_query_class(t, 3, exclude=0, generator=torch.Generator().manual_seed(0))
    assert picks.tolist() == [-1, -1]  # all void; only background
    assert picks.dtype == torch.long
    t = label_image().expand(20, 10, 10)
    a = cisc.pick_query_class(t, 4, generator=torch.Generator().manual_seed(7))
    b = cisc.pick_query_class(t, 4, generator=torch.Generator().manual_seed(7))
    c = cisc.pick_query_class(t, 4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- multi prototypes


def test_multi_prototypes_by_hand():
    # Pixels (1,0), (1,0), (0,1), (0,2), (7,7) [outside the mask]. Mean of masked = (0.5, 0.75).
    # Farthest from the mean: (0,2) (squared distance 1.8125); then farthest from (0,2): (1,0).
    # k-means converges to centres (0, 1.5) and (1, 0), in that order.
    f = feats((1.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.0, 2.0), (7.0, 7.0))
    m = torch.tensor([[[1, 1, 1, 1, 0]]])
    protos = cisc.multi_prototypes(f, m, 2)
    assert torch.allclose(protos, torch.tensor([[[0.0, 1.5], [1.0, 0.0]]]))
    # Max over prototypes: pixels (1,0) -> 1, (1,1) -> 1/sqrt2, (0,3) -> 1.
    out = cisc.cisc_map_multi(feats((1.0, 0.0), (1.0, 1.0), (0.0, 3.0)), protos, (1, 3))
    assert torch.allclose(out, torch.tensor([[[1.0, R2, 1.0]]]))


def test_multi_prototypes_single_and_empty():
    gen = torch.Generator().manual_seed(6)
    f = torch.rand(2, 3, 2, 2, generator=gen)
    m = torch.zeros(2, 4, 4)
    m[0, :2] = 1
    protos = cisc.multi_prototypes(f, m, 1)
    # n = 1: the plain mean, i.e. prototype() without its 5e-4 guard.
    assert torch.allclose(protos[0, 0], cisc.prototype(f, m)[0] * 8.0005 / 8)
    assert torch.equal(protos[1], torch.zeros(1, 3))
    # cisc_map_multi with one prototype equals cisc_map.
    p = torch.rand(2, 3, generator=gen)
    assert torch.allclose(
        cisc.cisc_map_multi(f, p.unsqueeze(1), (5, 5)), cisc.cisc_map(f, p, (5, 5)), atol=1e-6
    )


def test_bce_log_clamp_and_bce_eps():
    # torch's BCE clamps log at -100: p = 0 with target 1 (and p = 1 with target 0) cost 100.
    assert cisc._bce(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])).tolist() == [100, 100]
    # Pair loss: F_a pixels (1,0), (0,1), both class 1; F_b = (1,0) [1], (0,0) [0].
    # v_b ~ (1,0): cos over a = [1, 0] vs [1, 1] -> side a = (0 + 100) / 2 = 50.
    # v_a ~ (1,1): cos over b = [1/sqrt2, 0] vs [1, 0] -> side b = -ln(1/sqrt2) / 2.
    fa = feats((1.0, 0.0), (0.0, 1.0)).requires_grad_()
    fb = feats((1.0, 0.0), (0.0, 0.0))
    la, lb, cls = torch.tensor([[[1, 1]]]), torch.tensor([[[1, 0]]]), torch.tensor([1])
    loss = cisc.cisc_pair_loss(fa, la, fb, lb, cls)
    assert loss.item() == pytest.approx(50 + math.log(2) / 4, rel=1e-5)
    loss.backward()
    assert fa.grad.abs().max() > 1e10  # the orthogonal positive pixel: 1e-12 floor in BCE
    # bce_eps = 1e-4: that pixel costs -ln(1e-4) instead of 100 and the gradient is bounded.
    fa2 = fa.detach().clone().requires_grad_()
    loss2 = cisc.cisc_pair_loss(fa2, la, fb, lb, cls, bce_eps=1e-4)
    assert loss2.item() == pytest.approx(-math.log(1e-4) / 2 + math.log(2) / 4, rel=1e-4)
    loss2.backward()
    assert fa2.grad.abs().max() < 1e5
