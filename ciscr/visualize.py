"""``ciscr visualize``: the CISC map of any image against a chosen labeled image and class.

    ciscr visualize run/stage1/checkpoint.pt --image U.png --labeled L.png --mask L_mask.png \\
        --cls disc --out fig.png

The figure has four panels: the image, the model's prediction on it (or a pseudo label),
the labeled image with the chosen class's mask highlighted, and the CISC map (Eq. 6: cosine
between every pixel's feature and the class prototype of the labeled image, Eq. 5) as a
heatmap. :func:`cisc_figure` is shared with the report's gallery (:mod:`ciscr.report`).

matplotlib and torch are imported lazily: this module is imported by ``ciscr --help`` to
register the sub-command, which must stay instant. Figures are built on
``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no global state, no display).
"""

from __future__ import annotations

import argparse
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ciscr.errors import ConfigError, DataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import nn

log = logging.getLogger("ciscr")

IGNORE_COLOUR = (224, 224, 192)  # the void colour of ciscr's palette PNGs (data/io.py)
MAX_SIDE = 768  # longer image side fed to the model: keeps a CPU figure to seconds


# --------------------------------------------------------------------------- small helpers


def colorize(
    mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255
) -> np.ndarray:
    """Class-index mask -> RGB with the dataset palette.

    Args:
        mask: integer (H, W) class ids; ``ignore_index`` and ids beyond the palette are drawn
            in the void colour.
        palette: (K, 3) RGB colours.

    Returns:
        uint8 (H, W, 3).
    """
    lut = np.tile(np.asarray(IGNORE_COLOUR, dtype=np.uint8), (256, 1))
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    lut[: len(pal)] = pal
    if ignore_index < 256:
        lut[ignore_index] = IGNORE_COLOUR
    return lut[np.clip(mask, 0, 255).astype(np.uint8)]


def fit_size(arr: np.ndarray, max_side: int, nearest: bool = False) -> np.ndarray:
    """Downscale an (H, W[, 3]) uint8 array so that its longer side is at most ``max_side``."""
    from PIL import Image

    h, w = arr.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return arr
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(arr).resize(size, resample))


def highlight(image: np.ndarray, region: np.ndarray, colour: Sequence[int]) -> np.ndarray:
    """The image dimmed outside ``region`` and tinted with ``colour`` inside it.

    Args:
        image: uint8 (H, W, 3). region: bool (H, W).

    Returns:
        uint8 (H, W, 3).
    """
    img = image.astype(np.float32)
    tint = 0.5 * img + 0.5 * np.asarray(colour, dtype=np.float32)
    out = np.where(region[..., None], tint, 0.35 * img)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """PNG bytes of a figure (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def class_legend(
    fig: Figure,
    names: Sequence[str],
    palette: Sequence[Sequence[int]],
    classes: Sequence[int] | None = None,
) -> None:
    """A legend of class colours under the figure (``classes``: which ones; default all)."""
    from matplotlib.patches import Patch

    keep = range(len(names)) if classes is None else [k for k in classes if k < len(names)]
    handles = [Patch(color=np.asarray(palette[k]) / 255, label=names[k]) for k in keep]
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=min(len(handles), 8),
            frameon=False,
            fontsize="small",
        )


def parse_class(text: str | int, class_names: Sequence[str]) -> int:
    """A class given by index (``"3"``) or name (``"disc"``, case-insensitive) -> its index.

    Raises:
        ConfigError: naming ``--cls`` and listing the valid names.
    """
    names = list(class_names)
    s = str(text).strip()
    if s.lstrip("-").isdigit():
        k = int(s)
        if 0 <= k < len(names):
            return k
    else:
        lower = [n.lower() for n in names]
        if s.lower() in lower:
            return lower.index(s.lower())
    listed = ", ".join(f"{i}={n}" for i, n in enumerate(names))
    raise ConfigError(f"--cls {s}: not a class of this checkpoint; choose one of {listed}")


# --------------------------------------------------------------------------- the computation


def _features(model: nn.Module, image: np.ndarray, mean, std):
    """(1, C, h, w) features and (1, K, H, W) logits of one uint8 (H, W, 3) image."""

    from ciscr.data.transforms import normalize, to_tensor

    device = next(model.parameters()).device
    x = normalize(to_tensor(image), mean, std).unsqueeze(0).to(device)
    out = model(x)
    return out.features.float(), (out.logits.float() if out.logits is not None else None)


def predict_label(
    model: nn.Module, image: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """The model's class map of one uint8 (H, W, 3) image (one whole-image forward).

    Returns:
        uint8 (H, W) argmax of the logits.
    """
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, logits = _features(model, image, mean, std)
    finally:
        model.train(was_training)
    return logits[0].argmax(0).to(torch.uint8).cpu().numpy()


def cisc_map_of(
    model: nn.Module,
    image: np.ndarray,
    labeled: np.ndarray,
    mask: np.ndarray,
    cls: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[np.ndarray, np.ndarray | None]:
    """CISC map of ``image`` for class ``cls`` of the labeled image (Eq. 5 and 6).

    Args:
        model: returns SegOutput(logits (1,K,H,W), features (1,C,h,w)); put in eval mode here.
        image: uint8 (H, W, 3), the image to explain. labeled: uint8 (H', W', 3).
        mask: integer (H', W') ground truth of ``labeled``; the prototype is the masked average
            of the labeled features over ``mask == cls``.
        mean, std: the normalisation the model was trained with.

    Returns:
        (cmap float32 (H, W) in [0, 1], prediction uint8 (H, W) or None if the model gives no
        logits). An empty class mask gives the zero prototype and an all-zero map.
    """
    import torch

    from ciscr.cisc import cisc_map, prototype

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            f_u, logits = _features(model, image, mean, std)
            f_l, _ = _features(model, labeled, mean, std)
            region = torch.from_numpy(np.asarray(mask) == cls).unsqueeze(0).to(f_l.device)
            proto = prototype(f_l, region)
            cmap = cisc_map(f_u, proto, tuple(image.shape[:2]))[0]
    finally:
        model.train(was_training)
    pred = None if logits is None else logits[0].argmax(0).to(torch.uint8).cpu().numpy()
    return cmap.cpu().numpy().astype(np.float32), pred


def cisc_figure(
    model: nn.Module,
    image: np.ndarray,
    labeled: np.ndarray,
    mask: np.ndarray,
    cls: int,
    meta: dict[str, Any],
    *,
    pseudo: np.ndarray | None = None,
    max_side: int = MAX_SIDE,
    title: str = "",
) -> Figure:
    """Four panels: image | prediction (or ``pseudo``) | labeled image with the class mask |
    CISC map heatmap.

    Args:
        model: a trained ciscr model (the teacher whose features define the map).
        image: uint8 (H, W, 3). labeled: uint8 (H', W', 3). mask: integer (H', W') gt of
            ``labeled``. cls: class index.
        meta: checkpoint meta (``class_names``, ``palette``, ``mean``, ``std``) as returned by
            :func:`ciscr.loading.load_model_from_checkpoint`.
        pseudo: optional integer (H, W) pseudo label of ``image``; shown instead of the
            model's own prediction.
        max_side: images are downscaled to this longer side before the forward pass (speed).
        title: figure title (e.g. the image ids).

    Returns:
        a matplotlib Figure (Agg canvas; save with ``fig.savefig`` or :func:`figure_png`).
    """
    from matplotlib.figure import Figure

    names, palette = list(meta["class_names"]), meta["palette"]
    image, labeled = fit_size(image, max_side), fit_size(labeled, max_side)
    mask = fit_size(np.asarray(mask, dtype=np.uint8), max_side, nearest=True)
    if mask.shape != labeled.shape[:2]:
        raise DataError(
            f"mask size {mask.shape} differs from the labeled image {labeled.shape[:2]}"
        )
    cmap, pred = cisc_map_of(model, image, labeled, mask, cls, meta["mean"], meta["std"])
    shown = pred if pseudo is None else fit_size(np.asarray(pseudo, np.uint8), max_side, True)
    region = np.asarray(mask) == cls
    fig = Figure(figsize=(13, 3.7), layout="constrained")
    axes = fig.subplots(1, 4)
    axes[0].imshow(image)
    axes[0].set_title("image")
    label_name = "prediction" if pseudo is None else "pseudo label"
    if shown is not None:
        axes[1].imshow(colorize(shown, palette), interpolation="nearest")
    axes[1].set_title(label_name)
    axes[2].imshow(highlight(labeled, region, palette[cls]), interpolation="nearest")
    axes[2].set_title(f"query: '{names[cls]}' ({region.mean():.0%} of pixels)")
    im = axes[3].imshow(cmap, cmap="inferno", vmin=0.0, vmax=1.0)
    axes[3].set_title(f"CISC map of '{names[cls]}'")
    fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.02)
    for ax in axes:
        ax.set_axis_off()
    present = set(np.unique(shown).tolist() if shown is not None else []) | {cls}
    class_legend(fig, names, palette, sorted(present))
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


# --------------------------------------------------------------------------- the command


def visualize(
    checkpoint: Path,
    image: Path,
    labeled: Path,
    mask: Path,
    cls: str | int,
    out: Path,
    device: str = "cpu",
) -> Path:
    """``ciscr visualize``: write the four-panel CISC figure of ``image`` to ``out`` (PNG).

    Raises:
        ConfigError: unknown class (the message lists the checkpoint's classes).
        DataError: unreadable image/mask, size mismatch, or a class absent from the mask.
        CheckpointError: unusable checkpoint.
    """
    from ciscr.data.io import read_image, read_mask
    from ciscr.loading import load_model_from_checkpoint
    from ciscr.utils.io import atomic_write_bytes

    model, meta = load_model_from_checkpoint(checkpoint, device)
    k = parse_class(cls, meta["class_names"])
    img, lab = read_image(image), read_image(labeled)
    ignore = int(meta["config"].get("data", {}).get("ignore_index", 255))
    gt = read_mask(mask, meta["num_classes"], ignore, expect_size=lab.shape[:2])
    if not (gt == k).any():
        have = [meta["class_names"][c] for c in np.unique(gt) if c < meta["num_classes"]]
        raise DataError(
            f"{mask}: class '{meta['class_names'][k]}' has no pixel in this mask; it contains "
            f"{', '.join(have) or 'no class'}"
        )
    fig = cisc_figure(model, img, lab, gt, k, meta, title=f"{image.name} vs {labeled.name}")
    atomic_write_bytes(out, figure_png(fig, dpi=100))
    return out


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``ciscr visualize`` to the CLI (called by ciscr.cli while it builds its parser)."""
    from ciscr.commands import command

    p = sub.add_parser(
        "visualize",
        help="CISC map of an image against a labeled image and class (4-panel PNG)",
        description="Writes a PNG with the image, the model's prediction, the labeled image "
        "with the class mask, and the CISC map (cosine to the class prototype).",
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        metavar="CHECKPOINT",
        help="checkpoint.pt from ciscr train/run (e.g. RUN/stage1/checkpoint.pt)",
    )
    p.add_argument("--image", type=Path, required=True, help="the image to explain")
    p.add_argument("--labeled", type=Path, required=True, help="the labeled (query) image")
    p.add_argument(
        "--mask",
        type=Path,
        required=True,
        help="class-index PNG of the labeled image (its ground truth)",
    )
    p.add_argument("--cls", required=True, help="class index or name (see the checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="output PNG")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    command("visualize")(_cmd_visualize)


def _cmd_visualize(args: argparse.Namespace) -> int:
    out = visualize(
        args.checkpoint, args.image, args.labeled, args.mask, args.cls, args.out, args.device
    )
    print(f"written: {out}")
    return 0


__all__ = [
    "cisc_figure",
    "class_legend",
    "cisc_map_of",
    "colorize",
    "figure_png",
    "fit_size",
    "highlight",
    "parse_class",
    "predict_label",
    "register_cli",
    "visualize",
]
