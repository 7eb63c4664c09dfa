"""Paired geometric augmentation (torch) and strong photometric augmentation (kornia).

Conventions:
- Images are float tensors (3, H, W) in [0, 1] until :func:`normalize`; masks are integer
  tensors (H, W). Every geometric op takes a *list* of masks and applies the very same
  resize/crop/flip to all of them (labeled: gt; unlabeled: pseudo label and the optional gt that
  is used only for scoring), so image and masks stay pixel-aligned.
- All randomness is drawn from an explicit ``torch.Generator`` (the datasets seed one per sample
  from ``(seed, epoch, index)``), never from the global RNG: a resumed run reproduces every
  augmentation exactly, and results do not depend on ``num_workers``.
- The recipe follows ST++/UniMatch (METHOD.md section 6): random scale 0.5-2.0 (image bilinear,
  masks nearest), pad right/bottom (image 0, mask ignore) then random crop, horizontal flip;
  strong = colour jitter (0.5, 0.5, 0.5, 0.25) p=0.8, grayscale p=0.2, gaussian blur p=0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as KA
import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Largest seed drawn from a sample's generator to seed kornia (which uses the global RNG).
_SEED_HIGH = 2**62


def to_tensor(img: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) array -> float (3, H, W) tensor in [0, 1]."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    # torch.tensor copies: decoded images are often read-only numpy views (from_numpy warns).
    return torch.tensor(img).permute(2, 0, 1).float().div_(255.0)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(3, H, W) or (B, 3, H, W) image in [0, 1] -> ``(x - mean) / std`` per channel."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=g, dtype=torch.float64))


def _resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    # "nearest-exact" samples at pixel centres like PIL's NEAREST, i.e. on the same grid as
    # bilinear with align_corners=False; plain "nearest" would shift labels by up to a pixel.
    out = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")
    return out[0, 0].to(mask.dtype)


def random_scale(
    img: Tensor, masks: Sequence[Tensor], scale_range: tuple[float, float], g: torch.Generator
) -> tuple[Tensor, list[Tensor]]:
    """Resize image and masks by one factor drawn uniformly from ``scale_range``.

    Args:
        img: (3, H, W) float. masks: each (H, W) integer.
    Returns:
        (3, h, w) image (bilinear, antialiased like PIL when shrinking) and (h, w) masks
        (nearest), with ``h = round(H * s)``, ``w = round(W * s)`` (at least 1).
    """
    s = _uniform(scale_range[0], scale_range[1], g)
    h, w = img.shape[-2:]
    size = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
    if size == (h, w):
        return img, list(masks)
    out = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0), [_resize_mask(m, size) for m in masks]


def pad_to(
    img: Tensor, masks: Sequence[Tensor], size: int, ignore_index: int = 255
) -> tuple[Tensor, list[Tensor]]:
    """Pad right/bottom to at least ``size x size``: image with 0, masks with ``ignore_index``."""
    h, w = img.shape[-2:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == 0 and pw == 0:
        return img, list(masks)
    img = F.pad(img, (0, pw, 0, ph), value=0.0)
    return img, [F.pad(m, (0, pw, 0, ph), value=ignore_index) for m in masks]


def random_crop(
    img: Tensor,
    masks: Sequence[Tensor],
    size: int,
    g: torch.Generator,
    ignore_index: int = 255,
) -> tuple[Tensor, list[Tensor]]:
    """Pad (see :func:`pad_to`) then cut the same random ``size x size`` window from all.

    Returns:
        (3, size, size) image and (size, size) masks.
    """
    img, masks = pad_to(img, masks, size, ignore_index)
    h, w = img.shape[-2:]
    # x before y, as ST++/UniMatch draw them.
    x = int(torch.randint(0, w - size + 1, (1,), generator=g))
    y = int(torch.randint(0, h - size + 1, (1,), generator=g))
    return img[:, y : y + size, x : x + size], [m[y : y + size, x : x + size] for m in masks]


def random_hflip(
    img: Tensor, masks: Sequence[Tensor], g: torch.Generator, p: float = 0.5
) -> tuple[Tensor, list[Tensor]]:
    """Flip image (3, H, W) and masks (H, W) left-right together with probability ``p``."""
    if float(torch.rand(1, generator=g)) < p:
        return img.flip(-1), [m.flip(-1) for m in masks]
    return img, list(masks)


def blur_kernel_size(h: int, w: int) -> int:
    """Odd gaussian kernel side ~ 10% of the shorter image side (at least 3)."""
    k = max(3, int(0.1 * min(h, w)))
    return k if k % 2 == 1 else k + 1


def strong_photometric(
    img: Tensor,
    g: torch.Generator,
    jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
    p_jitter: float = 0.8,
    p_gray: float = 0.2,
    p_blur: float = 0.5,
    sigma: tuple[float, float] = (0.1, 2.0),
) -> Tensor:
    """Strong photometric augmentation of one image; geometry is untouched.

    Args:
        img: (3, H, W) float in [0, 1].
        g: the sample's generator; one integer is drawn from it to seed kornia.
    Returns:
        (3, H, W) float in [0, 1].
    """
    seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=g))
    h, w = img.shape[-2:]
    ops = torch.nn.Sequential(
        # ColorJitter (not ColorJiggle) uses torchvision's formulas, as ST++/UniMatch do.
        KA.ColorJitter(*jitter, p=p_jitter),
        KA.RandomGrayscale(p=p_gray),
        KA.RandomGaussianBlur(blur_kernel_size(h, w), sigma, p=p_blur),
    )
    # kornia samples its parameters from the global RNG; fork it and seed it from the sample's
    # generator so the result depends only on (seed, epoch, index) and nothing leaks out.
    devices = [img.device] if img.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = ops(img[None])
    return out[0].clamp_(0.0, 1.0)


def random_box(
    h: int,
    w: int,
    g: torch.Generator,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    redraw_area: bool = False,
) -> Tensor:
    """A random rectangle, as UniMatch's CutMix boxes (and, with ``redraw_area``, ST++'s
    cutout) draw it.

    With probability ``p``: area share in ``area``, aspect ratio in ``ratio`` and position
    re-drawn until the box fits inside the image. UniMatch draws the area once and re-draws the
    rest; ST++'s cutout re-draws the area too (``redraw_area``), which favours small boxes
    (large ones fit less often). Returns an (h, w) uint8 mask, 1 inside the box (all 0
    otherwise).
    """
    box = torch.zeros(h, w, dtype=torch.uint8)
    if float(torch.rand(1, generator=g)) >= p:
        return box
    size = _uniform(area[0], area[1], g) * h * w
    for attempt in range(1000):  # bounded: a sampled box almost always fits within a few tries
        if redraw_area and attempt:
            size = _uniform(area[0], area[1], g) * h * w
        r = _uniform(ratio[0], ratio[1], g)
        bw, bh = int((size / r) ** 0.5), int((size * r) ** 0.5)
        x = int(torch.randint(0, w, (1,), generator=g))
        y = int(torch.randint(0, h, (1,), generator=g))
        if x + bw <= w and y + bh <= h:
            box[y : y + bh, x : x + bw] = 1
            return box
    return box


def cutout(
    img: Tensor, mask: Tensor, g: torch.Generator, p: float = 0.5, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """ST++'s cutout: with probability ``p`` a random box of the image (3, H, W) in [0, 1] is
    filled with uniform noise per pixel and the same box of the label (H, W) is ignored."""
    box = random_box(img.shape[-2], img.shape[-1], g, p, redraw_area=True).bool()
    if not bool(box.any()):
        return img, mask
    noise = torch.rand(img.shape, generator=g, dtype=img.dtype)
    img = torch.where(box, noise, img)
    return img, mask.masked_fill(box, ignore_index)


class TrainTransform:
    """Weak, geometric augmentation: random scale -> pad + random crop -> horizontal flip.

    ``__call__(img (3,H,W) in [0,1], masks [(H,W), ...], g)`` returns the
    ``(3, crop, crop)`` image and the ``(crop, crop)`` masks, all transformed identically.
    """

    def __init__(
        self,
        crop_size: int,
        scale_range: tuple[float, float] = (0.5, 2.0),
        ignore_index: int = 255,
        flip_p: float = 0.5,
    ) -> None:
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.ignore_index = ignore_index
        self.flip_p = flip_p

    def __call__(
        self, img: Tensor, masks: Sequence[Tensor], g: torch.Generator
    ) -> tuple[Tensor, list[Tensor]]:
        img, masks = random_scale(img, masks, self.scale_range, g)
        img, masks = random_crop(img, masks, self.crop_size, g, self.ignore_index)
        return random_hflip(img, masks, g, self.flip_p)


class StrongTransform:
    """Strong photometric augmentation of one (3, H, W) [0, 1] image (see
    :func:`strong_photometric`); apply it after :class:`TrainTransform`."""

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        return strong_photometric(img, g)


class EvalTransform:
    """uint8 (H, W, 3) -> normalised float (3, H, W); no resize, no randomness."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: np.ndarray) -> Tensor:
        return normalize(to_tensor(img), self.mean, self.std)
