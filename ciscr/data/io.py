"""Reading images and class-index masks (validated), writing palette PNGs, class/palette files.

Every user-fixable problem (missing file, corrupt file, RGB mask, out-of-range class values,
mask/image size mismatch) raises :class:`~ciscr.errors.DataError` with one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ciscr.errors import DataError
from ciscr.utils.io import atomic_path

PathLike = str | os.PathLike

# Colour of the ignore index (255) in written palette PNGs: the PASCAL VOC boundary colour.
IGNORE_COLOUR = (224, 224, 192)


def _open(path: PathLike, what: str) -> Image.Image:
    """Open and fully decode an image file; any failure becomes a one-line DataError."""
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file only fails here, not in open()
    except FileNotFoundError:
        raise DataError(f"{path}: cannot read {what} (file not found)") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: cannot read {what} (not a recognised image format)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read {what} ({err})") from None
    return img


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as RGB.

    Returns:
        uint8 array (H, W, 3). Grey, palette and RGBA images are converted to RGB.
    """
    img = _open(path, "image")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _mask_array(img: Image.Image, path: PathLike) -> np.ndarray:
    """Class indices of a decoded mask image, refusing colour masks."""
    if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA"):
        raise DataError(
            f"{path}: mask is {img.mode}; expected a single-channel class-index PNG "
            "(mode L or P, one class index per pixel)"
        )
    # Mode P yields the palette *indices* (the class ids), which is exactly what we want;
    # never convert("L"), that would turn indices into grey levels of the palette colours.
    arr = np.asarray(img)
    if arr.dtype == bool:  # mode "1"
        return arr.astype(np.uint8)
    if arr.dtype != np.uint8:  # 16/32-bit grey: accept only if every value fits a byte
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"{path}: mask values exceed 255 (max {int(arr.max())})")
        arr = arr.astype(np.uint8)
    return arr


def read_mask(
    path: PathLike,
    num_classes: int,
    ignore_index: int = 255,
    expect_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read and validate a single-channel class-index mask.

    Args:
        path: PNG (mode L or P) whose pixel values are class ids in [0, K) or ``ignore_index``.
        num_classes: K.
        ignore_index: the void value that is allowed besides the classes.
        expect_size: (H, W) of the paired image; a different mask size is an error.

    Returns:
        uint8 array (H, W).
    """
    arr = _mask_array(_open(path, "mask"), path)
    if expect_size is not None and tuple(arr.shape[:2]) != tuple(expect_size):
        raise DataError(
            f"{path}: mask size (H, W)={tuple(arr.shape[:2])} differs from the image size "
            f"(H, W)={tuple(expect_size)}"
        )
    counts = np.bincount(arr.ravel(), minlength=256)
    present = np.flatnonzero(counts)
    bad = [int(v) for v in present if v >= num_classes and v != ignore_index]
    if bad:
        shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise DataError(
            f"{path}: mask values {shown} are not class ids in [0, {num_classes}) "
            f"nor the ignore index {ignore_index}"
        )
    return arr


def _palette_bytes(palette: np.ndarray | Sequence[Sequence[int]]) -> list[int]:
    """A 256-entry flat PIL palette: the class colours, then black, 255 = ignore colour."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[255] = IGNORE_COLOUR
    given = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    pal[: len(given)] = given
    return pal.ravel().tolist()


def save_mask_png(path: PathLike, mask: np.ndarray, palette: np.ndarray) -> None:
    """Write a P-mode PNG directly (no temp file): for files inside an atomic folder."""
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(_palette_bytes(palette))
    img.save(path, format="PNG")


def write_mask_png(path: PathLike, mask: np.ndarray, palette: np.ndarray) -> None:
    """Write a class-index mask (H, W) uint8 as a palette PNG, atomically (temp + rename).

    Args:
        mask: (H, W) integer class ids in [0, 255].
        palette: (K, 3) uint8 colours of classes 0..K-1; index 255 is drawn as IGNORE_COLOUR.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    with atomic_path(path) as tmp:
        save_mask_png(tmp, mask, palette)


def read_palette(path: PathLike) -> np.ndarray:
    """Read a palette file: one ``R G B`` line (0-255) per class, in class order.

    Returns:
        uint8 array (K, 3).
    """
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        text = line.split("#", 1)[0].replace(",", " ").strip()
        if not text:
            continue
        parts = text.split()
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != 3 or not all(0 <= v <= 255 for v in vals):
            raise DataError(f"{path}:{lineno}: expected 'R G B' with values 0-255, got {line!r}")
        rows.append(vals)
    if not rows:
        raise DataError(f"{path}: palette file has no colours")
    return np.asarray(rows, dtype=np.uint8)


def read_classes(path: PathLike) -> list[str]:
    """Read ``classes.txt``: one class name per line (blank lines skipped), class 0 first."""
    names = [ln.strip() for ln in _read_text(path).splitlines() if ln.strip()]
    if not names:
        raise DataError(f"{path}: class list is empty (one class name per line expected)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: class name '{dup[0]}' appears more than once")
    return names


def _read_text(path: PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None


def voc_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map: deterministic and distinct for up to 256 classes.

    Returns:
        uint8 array (K, 3); class 0 is black (VOC's background colour).
    """
    ids = np.arange(num_classes)
    pal = np.zeros((num_classes, 3), dtype=np.int64)
    c = ids.copy()
    # Spread the bits of the class id over the high bits of R, G and B (VOC devkit algorithm).
    for shift in range(7, -1, -1):
        for ch in range(3):
            pal[:, ch] |= ((c >> ch) & 1) << shift
        c >>= 3
    return pal.astype(np.uint8)


def default_palette(num_classes: int) -> np.ndarray:
    """Colours for a dataset that gives none: the VOC colour map shifted by one class.

    Class k gets VOC colour k + 1, so class 0 (often the user's "background" or "other") is
    dark red, not black: a black class 0 makes overlays of it look burnt. Still distinct for
    up to 256 classes (VOC ids 1..256 map to distinct colours).

    Returns:
        uint8 array (K, 3).
    """
    return voc_palette(num_classes + 1)[1:]
