"""``ciscr predict``'s paths and files: which inputs, which output names, reading and writing.

Everything here is plain file handling (no model): expanding files / folders / globs into
images, distinct output names, image headers, the mask + overlay writers, and the output
folder's safety rules (never overwrite an input, never take an earlier run's outputs as
inputs, leave nothing behind on failure). ``ciscr.predict`` runs the model between them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ciscr.errors import ConfigError, DataError

log = logging.getLogger("ciscr")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# --------------------------------------------------------------------------- inputs


def _is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _list_dir(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    # Hidden files are skipped: they include half-written temp files of atomic writes.
    return sorted(p for p in files if p.is_file() and _is_image(p) and not p.name.startswith("."))


def collect_inputs(
    inputs: Sequence[str | os.PathLike],
    recursive: bool = False,
    exclude: Iterable[str | os.PathLike] = (),
) -> list[Path]:
    """Expand files, folders and glob patterns into image paths (input order, no duplicates).

    Folders yield their image files (``IMAGE_EXTENSIONS``, sorted; sub-folders only with
    ``recursive``, which also enables ``**`` in patterns). A file named explicitly is taken
    whatever its extension. Files in ``exclude`` (an earlier run's masks and overlays) are left
    out, so that rerunning on a folder that contains the results does not predict them.

    Raises:
        DataError: a path that neither exists nor is a pattern, or nothing matched at all.
    """
    skip = {Path(p).resolve() for p in exclude}
    found: list[Path] = []
    for item in inputs:
        text, path = str(item), Path(item)
        if path.is_dir():
            files = _list_dir(path, recursive)
        elif path.is_file():
            files = [path]
        elif any(c in text for c in "*?["):
            matches = glob.glob(text, recursive=recursive)
            files = sorted(Path(m) for m in matches if Path(m).is_file() and _is_image(m))
        else:
            raise DataError(f"{text}: no such file or folder")
        if not files:
            log.warning(f"warning: {text}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        found.extend(files)
    seen: set[Path] = set()
    out: list[Path] = []
    for p in found:
        key = p.resolve()
        if key in seen or key in skip:
            continue
        seen.add(key)
        out.append(p)
    if not out:
        shown = " ".join(str(i) for i in inputs)
        raise DataError(f"no images matched {shown} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return out


def output_names(paths: Sequence[Path], overlay: str = "jpg") -> list[tuple[str, str | None]]:
    """(mask file name, overlay file name or None) for each input, all distinct.

    Inputs sharing a stem (``a/x.png``, ``b/x.jpg``) are prefixed with their parent folder
    (``a_x``, ``b_x``); any remaining clash gets ``_2``, ``_3``... Comparison ignores case, as
    macOS and Windows file systems do.
    """
    stems = Counter(p.stem.lower() for p in paths)
    used: set[str] = set()
    names: list[tuple[str, str | None]] = []
    for p in paths:
        base = p.stem if stems[p.stem.lower()] == 1 else f"{p.parent.name or 'root'}_{p.stem}"
        stem, n = base, 1
        while True:
            mask = f"{stem}.png"
            over = f"{stem}_overlay.{overlay}" if overlay != "none" else None
            wanted = {mask.lower()} | ({over.lower()} if over else set())
            if not wanted & used:
                break
            n += 1
            stem = f"{base}_{n}"
        used |= wanted
        names.append((mask, over))
    return names


# --------------------------------------------------------------------------- image I/O


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header, without decoding the pixels; DataError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DataError(f"{path}: cannot read image (file not found)") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: cannot read image (not a recognised image format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    return h, w


def blend_overlay(
    image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float
) -> np.ndarray:
    """``(1 - alpha) * image + alpha * palette[mask]``.

    Args:
        image: uint8 (H, W, 3). mask: integer (H, W) class ids < len(palette).
        palette: uint8 (K, 3). alpha: weight of the class colour in [0, 1].

    Returns:
        uint8 (H, W, 3).
    """
    colours = palette[mask].astype(np.float32)
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _save_overlay(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    from ciscr.utils.io import atomic_path

    fmt = "JPEG" if path.suffix.lower() == ".jpg" else "PNG"
    with atomic_path(path) as tmp:  # the temp name ends in .tmp: give PIL the format
        Image.fromarray(rgb, mode="RGB").save(
            tmp, format=fmt, **({"quality": 92} if fmt == "JPEG" else {})
        )


@dataclass
class _Item:
    """One input image and where its outputs go."""

    index: int
    path: Path
    size: tuple[int, int]  # (H, W)
    mask: str
    overlay: str | None



def _write_outputs(
    out: Path,
    item: _Item,
    image: np.ndarray,
    mask: np.ndarray,
    palette: np.ndarray,
    class_names: list[str],
    alpha: float,
) -> dict[str, Any]:
    """Mask PNG + overlay (atomic), and the image's JSON record."""
    from ciscr.data.io import write_mask_png

    mask_path = out / item.mask
    write_mask_png(mask_path, mask, palette)
    overlay_path = None
    if item.overlay is not None:
        overlay_path = out / item.overlay
        _save_overlay(overlay_path, blend_overlay(image, mask, palette, alpha))
    counts = np.bincount(mask.ravel(), minlength=len(class_names))[: len(class_names)]
    fractions = counts / max(mask.size, 1)
    return {
        "input": str(item.path),
        "mask": str(mask_path),
        "overlay": str(overlay_path) if overlay_path is not None else None,
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "class_pixel_fractions": {
            n: round(float(f), 6) for n, f in zip(class_names, fractions, strict=True)
        },
    }


def _read(item: _Item) -> np.ndarray | DataError:
    """Decoded RGB image, or the DataError (returned, so that a thread pool can carry it)."""
    from ciscr.data.io import read_image

    try:
        image = read_image(item.path)
    except DataError as err:
        return err
    if image.shape[:2] != item.size:  # e.g. a multi-frame file whose header lied
        return DataError(f"{item.path}: decoded size {image.shape[:2]} differs from its header")
    return image


def _previous_outputs(out: Path) -> list[Path]:
    """Masks/overlays an earlier ``predict`` wrote into ``out`` (never taken as inputs)."""
    try:
        old = json.loads((out / "predictions.json").read_text())
        records = old.get("predictions", [])
        names = [Path(r[k]).name for r in records for k in ("mask", "overlay") if r.get(k)]
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return []
    return [out / n for n in names]


def _check_no_overwrite(out: Path, paths: list[Path], names: list[tuple[str, str | None]]) -> None:
    inputs = {p.resolve() for p in paths}
    for mask, over in names:
        for name in (mask, over):
            if name is not None and (out / name).resolve() in inputs:
                raise ConfigError(
                    f"--out {out}: writing {name} would overwrite an input image; "
                    "choose another output folder"
                )


def _prepare_out(out: Path) -> None:
    from ciscr.utils.io import check_writable_dir

    check_writable_dir(out)


@contextlib.contextmanager
def _removed_on_failure(out: Path) -> Iterator[None]:
    """A failed predict leaves nothing behind: the output folder goes if this call made it.

    A folder that existed before is left alone (it may hold an earlier run's results).
    """
    created = out
    while not created.parent.exists() and created.parent != created.parent.parent:
        created = created.parent  # the topmost folder that mkdir(parents=True) will create
    fresh = not out.exists()
    try:
        yield
    except BaseException:
        if fresh:
            shutil.rmtree(created, ignore_errors=True)
        raise
