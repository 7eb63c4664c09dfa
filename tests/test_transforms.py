"""Paired geometric augmentation keeps masks aligned; strong augmentation is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ciscr.data.transforms import (
    EvalTransform,
    TrainTransform,
    blur_kernel_size,
    normalize,
    pad_to,
    random_crop,
    random_hflip,
    random_scale,
    strong_photometric,
    to_tensor,
)

K = 6
STEP = 40  # class c is painted with red = c * STEP


def class_scene(h: int = 40, w: int = 52) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image (h, w, 3) whose colour encodes the class of uint8 mask (h, w).

    Blocks of 8 x 10 pixels; a 4 x 6 void (255) corner painted magenta.
    """
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy // 8) * 3 + (xx // 10)) % K
    mask = mask.astype(np.uint8)
    mask[:4, :6] = 255
    img = np.stack([mask * STEP, 255 - mask * STEP, 60 + mask * 20], axis=-1).astype(np.uint8)
    img[:4, :6] = (250, 5, 250)
    return img, mask


def decode(img01: torch.Tensor) -> torch.Tensor:
    """(3, H, W) [0, 1] image -> (H, W) class read back from the red channel (float)."""
    return img01[0] * 255.0 / STEP


def interior(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(H, W) bool: valid pixels whose (2r+1)^2 neighbourhood has one single class.

    The outer ``radius`` rows/columns are excluded: their neighbours were cropped away.
    """
    m = mask.float()[None, None]
    k = 2 * radius + 1
    hi = F.max_pool2d(m, k, 1)[0, 0]
    lo = -F.max_pool2d(-m, k, 1)[0, 0]
    out = torch.zeros_like(mask, dtype=torch.bool)
    out[radius:-radius, radius:-radius] = hi == lo
    return out & (mask != 255)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_to_tensor_and_normalize_hand_values():
    img = np.array([[[0, 255, 51]]], dtype=np.uint8)  # (1, 1, 3)
    t = to_tensor(img)
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    assert torch.allclose(t.flatten(), torch.tensor([0.0, 1.0, 0.2]))
    n = normalize(t, (0.5, 0.5, 0.2), (0.25, 0.5, 0.1))
    assert torch.allclose(n.flatten(), torch.tensor([-2.0, 1.0, 0.0]))
    e = EvalTransform((0.5, 0.5, 0.2), (0.25, 0.5, 0.1))(img)
    assert torch.equal(e, n)


def test_scale_two_is_exact_pixel_doubling_for_masks():
    img, mask = class_scene()
    m = torch.from_numpy(mask).long()
    out, (om,) = random_scale(to_tensor(img), [m], (2.0, 2.0), gen(0))
    assert out.shape == (3, 80, 104) and om.dtype == torch.int64
    assert torch.equal(om, m.repeat_interleave(2, 0).repeat_interleave(2, 1))
    # Bilinear colours equal the class colour wherever the 3x3 label neighbourhood is uniform.
    inner = interior(om, 1)
    assert inner.sum() > 0.5 * inner.numel()
    assert (decode(out)[inner] - om[inner].float()).abs().max() < 1e-3


def test_scale_draw_uses_generator_and_range():
    img = torch.zeros(3, 20, 30)
    sizes = set()
    for s in range(20):
        out, _ = random_scale(img, [], (0.5, 2.0), gen(s))
        h, w = out.shape[-2:]
        assert 10 <= h <= 40 and 15 <= w <= 60
        assert abs(w / h - 1.5) < 0.1  # one factor for both sides
        sizes.add((h, w))
    assert len(sizes) > 10
    a, _ = random_scale(img, [], (0.5, 2.0), gen(3))
    b, _ = random_scale(img, [], (0.5, 2.0), gen(3))
    assert a.shape == b.shape


def test_pad_and_crop_hand_computed():
    img = torch.arange(1, 19, dtype=torch.float32).view(3, 2, 3) / 20
    mask = torch.tensor([[0, 1, 2], [3, 4, 5]])
    out, (om,) = random_crop(img, [mask], 4, gen(0))
    # The padded canvas is exactly 4 x 4, so the only possible crop is the whole of it.
    assert out.shape == (3, 4, 4) and om.shape == (4, 4)
    assert torch.equal(out[:, :2, :3], img)
    assert torch.all(out[:, 2:, :] == 0) and torch.all(out[:, :, 3:] == 0)
    expected = torch.tensor([[0, 1, 2, 255], [3, 4, 5, 255], [255] * 4, [255] * 4])
    assert torch.equal(om, expected)
    # pad_to leaves big-enough inputs alone.
    same, _ = pad_to(out, [om], 3)
    assert same is out


def test_crop_is_a_window_of_the_input():
    img, mask = class_scene()
    t, m = to_tensor(img), torch.from_numpy(mask).long()
    offsets = set()
    for s in range(12):
        out, (om, om2) = random_crop(t, [m, m.clone()], 16, gen(s))
        assert torch.equal(om, om2)
        hits = [
            (y, x)
            for y in range(40 - 15)
            for x in range(52 - 15)
            if torch.equal(om, m[y : y + 16, x : x + 16])
            and torch.equal(out, t[:, y : y + 16, x : x + 16])
        ]
        assert hits, "crop is not a window of the input"
        offsets.add(hits[0])
    assert len(offsets) > 6


def test_hflip_all_or_nothing():
    img = torch.arange(6, dtype=torch.float32).view(1, 2, 3).expand(3, 2, 3)
    m1 = torch.tensor([[0, 1, 2], [3, 4, 5]])
    out, (a, b) = random_hflip(img, [m1, m1 + 1], gen(0), p=1.0)
    assert torch.equal(a, torch.tensor([[2, 1, 0], [5, 4, 3]]))
    assert torch.equal(b, a + 1) and torch.equal(out[0], a.float())
    out, (a, _) = random_hflip(img, [m1, m1], gen(0), p=0.0)
    assert torch.equal(a, m1) and torch.equal(out, img)
    flips = sum(not torch.equal(random_hflip(img, [m1], gen(s))[1][0], m1) for s in range(200))
    assert 70 < flips < 130


@pytest.mark.parametrize("scale", [(1.0, 1.0), (2.0, 2.0)])
def test_train_transform_exact_scales_keep_alignment(scale):
    img, mask = class_scene()
    t, m = to_tensor(img), torch.from_numpy(mask).long()
    tf = TrainTransform(32, scale)
    for s in range(8):
        out, (om, om2) = tf(t, [m, (m + 1) % 256], gen(s))
        assert out.shape == (3, 32, 32) and om.shape == (32, 32)
        assert torch.equal(om2, (om + 1) % 256)  # every mask got the same transform
        valid = om != 255
        if scale == (1.0, 1.0):
            # No resampling: every valid pixel keeps its exact class colour.
            assert torch.equal(decode(out)[valid].round().long(), om[valid])
        else:
            inner = interior(om, 1)
            assert inner.sum() > 0.4 * inner.numel()
            assert (decode(out)[inner] - om[inner].float()).abs().max() < 1e-3


def test_train_transform_random_scales_keep_alignment():
    img, mask = class_scene()
    t, m = to_tensor(img), torch.from_numpy(mask).long()
    tf = TrainTransform(24, (0.5, 2.0))
    checked = 0
    for s in range(16):
        out, (om,) = tf(t, [m], gen(s))
        valid = om != 255
        inner = interior(om, 2)
        checked += int(inner.sum())
        # Away from class boundaries the colour is the class colour exactly ...
        assert (decode(out)[inner] - om[inner].float()).abs().max() < 1e-3
        # ... and only a thin boundary band may read back as another class.
        wrong = (decode(out).round().long() != om) & valid
        assert wrong.sum() <= 0.25 * valid.sum()
    assert checked > 1000


def test_train_transform_pads_image_zero_and_masks_ignore():
    img, mask = class_scene()  # 40 x 52 -> x0.5 -> 20 x 26, padded to 32 x 32
    t, m = to_tensor(img), torch.from_numpy(mask).long()
    for s in range(6):
        out, (om,) = TrainTransform(32, (0.5, 0.5))(t, [m], gen(s))
        assert torch.all(out[:, 20:, :] == 0) and torch.all(om[20:, :] == 255)
        pad_cols = slice(26, 32) if om[10, 31] == 255 else slice(0, 6)  # flipped or not
        assert torch.all(out[:, :, pad_cols] == 0) and torch.all(om[:, pad_cols] == 255)
        body = slice(0, 26) if pad_cols.start == 26 else slice(6, 32)
        assert (om[:20, body] != 255).float().mean() > 0.9  # only the void corner


def test_train_transform_deterministic_given_generator():
    img, mask = class_scene()
    t, m = to_tensor(img), torch.from_numpy(mask).long()
    tf = TrainTransform(24, (0.5, 2.0))
    a, (am,) = tf(t, [m], gen(7))
    b, (bm,) = tf(t, [m], gen(7))
    assert torch.equal(a, b) and torch.equal(am, bm)
    diff = [not torch.equal(tf(t, [m], gen(s))[1][0], am) for s in range(8, 14)]
    assert any(diff)


def test_blur_kernel_size():
    assert blur_kernel_size(321, 321) == 33
    assert blur_kernel_size(20, 50) == 3
    assert blur_kernel_size(40, 60) == 5
    assert blur_kernel_size(100, 100) == 11


def test_strong_photometric_deterministic_and_isolated_from_global_rng():
    img, _ = class_scene(32, 32)
    t = to_tensor(img)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = strong_photometric(t, gen(5))
    assert torch.equal(torch.rand(3), expected_next)  # global RNG neither used nor advanced
    torch.manual_seed(999)  # a different global state must not matter
    b = strong_photometric(t, gen(5))
    assert torch.equal(a, b)
    assert a.shape == t.shape and a.min() >= 0 and a.max() <= 1
    outs = [strong_photometric(t, gen(s)) for s in range(10)]
    changed = [not torch.allclose(o, t, atol=1e-4) for o in outs]
    assert sum(changed) >= 7  # P(no op fires) = 0.2 * 0.8 * 0.5 = 8%
    assert len({o.sum().item() for o in outs}) >= 7  # different draws per generator


def test_strong_photometric_keeps_geometry():
    # A bright square on black: colour ops and a small blur must not move it.
    t = torch.zeros(3, 40, 40)
    t[:, 10:20, 22:34] = 1.0
    for s in range(6):
        o = strong_photometric(t, gen(s)).mean(0)
        ys, xs = torch.nonzero(o > o.max() * 0.5, as_tuple=True)
        assert abs(ys.float().mean().item() - 14.5) < 0.6
        assert abs(xs.float().mean().item() - 27.5) < 0.6


def test_cutout_redraws_its_area_as_st_pp_so_its_boxes_are_smaller_than_cutmixs():
    # ST++'s cutout re-draws the area with every try, UniMatch's CutMix keeps its first draw:
    # large areas fit less often, so cutout's mean box is clearly smaller (about 0.14 vs 0.21
    # of the image for areas drawn in [0.02, 0.4]).
    from ciscr.data.transforms import cutout, random_box

    g = torch.Generator().manual_seed(0)
    cutmix = [float(random_box(64, 64, g, 1.0).float().mean()) for _ in range(2000)]
    img, mask = torch.zeros(3, 64, 64), torch.zeros(64, 64, dtype=torch.long)
    erased = [float((cutout(img, mask, g, p=1.0)[1] == 255).float().mean()) for _ in range(2000)]
    assert 0.18 < sum(cutmix) / 2000 < 0.24
    assert 0.11 < sum(erased) / 2000 < 0.17
