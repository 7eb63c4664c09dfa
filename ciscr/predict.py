"""``ciscr predict``: segment your own images with a trained checkpoint.

The checkpoint carries everything needed (``meta``: model config, class names, palette,
normalisation), so no config file or dataset is involved. For every input image this writes

    <out>/<stem>.png            class-index PNG (mode P, the dataset palette), input size
    <out>/<stem>_overlay.jpg    the image blended with the class colours (``--overlay png|none``)
    <out>/predictions.json      one record per image + the checkpoint and meta that were used

Images of equal size are batched together (no resizing, so every mask is exactly the input
size). torch is imported lazily: this module is imported by ``ciscr --help`` to register the
sub-command, which must stay instant.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ciscr.errors import ConfigError, DataError

# One job per module: model loading is ciscr.loading (export uses it too), paths and files are
# ciscr.predict_io; this module runs the model over them and is the CLI. The names below stay
# importable from here, where users and tests found them.
from ciscr.loading import (  # noqa: F401 - re-exported
    META_KEYS,
    export_metadata,
    is_onnx,
    load_model,
    load_model_from_checkpoint,
)
from ciscr.predict_io import (  # noqa: F401 - re-exported
    IMAGE_EXTENSIONS,
    _check_no_overwrite,
    _image_size,
    _Item,
    _prepare_out,
    _previous_outputs,
    _read,
    _removed_on_failure,
    _write_outputs,
    blend_overlay,
    collect_inputs,
    output_names,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("ciscr")

MODES = ("whole", "sliding", "multiscale")
AMP_MODES = ("none", "bf16", "fp16")
OVERLAY_FORMATS = ("jpg", "png", "none")


# --------------------------------------------------------------------------- prediction


@dataclass
class _Settings:
    mode: str
    window: int
    stride_ratio: float
    scales: tuple[float, ...]
    flip: bool
    amp: str
    alpha: float
    batch_size: int


def _check_options(
    mode: str,
    window: int,
    scales: Sequence[float] | None,
    batch_size: int,
    amp: str,
    alpha: float,
    overlay: str,
) -> None:
    """Refuse bad options before any work, naming the command-line flag."""
    if mode not in MODES:
        raise ConfigError(f"--mode {mode}: must be one of {', '.join(MODES)}")
    if window < 0:
        raise ConfigError(f"--window {window}: must be >= 0 (0 = the checkpoint's window)")
    if scales is not None and (not scales or any(s <= 0 for s in scales)):
        raise ConfigError(f"--scales {','.join(map(str, scales))}: give positive scales")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    if amp not in AMP_MODES:
        raise ConfigError(f"--amp {amp}: must be one of {', '.join(AMP_MODES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha {alpha}: must lie in [0, 1]")
    if overlay not in OVERLAY_FORMATS:
        raise ConfigError(f"--overlay {overlay}: must be one of {', '.join(OVERLAY_FORMATS)}")


def _settings(
    meta: dict[str, Any],
    mode: str,
    window: int,
    scales: Sequence[float] | None,
    flip: bool,
    amp: str,
    alpha: float,
    batch_size: int,
) -> _Settings:
    """Options, with the checkpoint's eval settings where the user gave none."""
    ev, train = meta["config"].get("eval", {}), meta["config"].get("train", {})
    win = window or int(ev.get("window") or 0) or int(train.get("crop_size") or 0)
    if mode == "sliding" and win <= 0:
        raise ConfigError("--mode sliding needs --window N (the checkpoint records none)")
    return _Settings(
        mode=mode,
        # As in `ciscr eval`: multiscale also slides this window over scales larger than it
        # (which bounds memory on big photos); whole mode has no window.
        window=0 if mode == "whole" else win,
        stride_ratio=float(ev.get("stride_ratio") or 2 / 3),
        scales=tuple(float(s) for s in (scales or ev.get("scales") or (1.0,))),
        flip=flip,
        amp=amp,
        alpha=alpha,
        batch_size=batch_size,
    )


def _scan(
    paths: list[Path],
    names: list[tuple[str, str | None]],
    skip_bad: bool,
    skipped: list[dict[str, str]],
) -> list[_Item]:
    """Read every header (a non-image fails here, before the model runs)."""
    items = []
    for i, (p, (mask, over)) in enumerate(zip(paths, names, strict=True)):
        try:
            size = _image_size(p)
        except DataError as err:
            _bad(err, p, skip_bad, skipped)
            continue
        items.append(_Item(i, p, size, mask, over))
    return items


def _bad(err: DataError, path: Path, skip_bad: bool, skipped: list[dict[str, str]]) -> None:
    if not skip_bad:
        raise DataError(f"{err} (use --skip-bad to skip unreadable images)") from None
    log.warning(f"warning: skipping {err}")
    skipped.append({"input": str(path), "error": str(err)})


def _batches(items: list[_Item], batch_size: int) -> Iterator[list[_Item]]:
    """Groups of equal-size images (first-seen order), at most ``batch_size`` each."""
    groups: dict[tuple[int, int], list[_Item]] = {}
    for it in items:
        groups.setdefault(it.size, []).append(it)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def _predict_batch(
    model: nn.Module,
    images: list[np.ndarray],
    meta: dict[str, Any],
    st: _Settings,
    device: torch.device,
) -> np.ndarray:
    """(B,H,W,3) uint8 images of one size -> (B,H,W) uint8 class ids."""
    import torch

    from ciscr.data.transforms import normalize, to_tensor
    from ciscr.engine.evaluate import predict_logits

    x = torch.stack([to_tensor(im) for im in images]).to(device, non_blocking=True)
    x = normalize(x, meta["mean"], meta["std"])
    probs = predict_logits(
        model,
        x,
        st.mode,
        num_classes=meta["num_classes"],
        window=st.window,
        stride_ratio=st.stride_ratio,
        scales=st.scales,
        flip=st.flip,
        amp=st.amp,
    )
    return probs.argmax(1).to(torch.uint8).cpu().numpy()


def _run(
    model: nn.Module,
    meta: dict[str, Any],
    items: list[_Item],
    st: _Settings,
    out: Path,
    device: torch.device,
    skip_bad: bool,
    skipped: list[dict[str, str]],
    progress: bool,
) -> list[dict[str, Any]]:
    """Predict every item batch by batch; decoding and writing run in a small thread pool."""
    import torch
    from tqdm.auto import tqdm

    palette = np.asarray(meta["palette"], dtype=np.uint8)
    names = meta["class_names"]
    records: dict[int, dict[str, Any]] = {}
    pending: list[tuple[int, Future]] = []
    bar = tqdm(
        total=len(items), unit="img", desc="predict", disable=not progress, dynamic_ncols=True
    )
    with (
        ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool,
        bar,
        torch.inference_mode(),
    ):
        for batch in _batches(items, st.batch_size):
            good = []
            for item, image in zip(batch, pool.map(_read, batch), strict=True):
                if isinstance(image, DataError):
                    _bad(image, item.path, skip_bad, skipped)
                    bar.update(1)
                else:
                    good.append((item, image))
            masks = _predict_batch(model, [im for _, im in good], meta, st, device) if good else []
            # Wait for the previous batch's writes only now (they overlapped with this forward),
            # so at most two batches of images are held in memory.
            records.update((i, f.result()) for i, f in pending)
            pending = [
                (
                    item.index,
                    pool.submit(_write_outputs, out, item, image, mask, palette, names, st.alpha),
                )
                for (item, image), mask in zip(good, masks, strict=True)
            ]
            bar.update(len(good))
        records.update((i, f.result()) for i, f in pending)
    return [records[i] for i in sorted(records)]


def predict_paths(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    mode: str = "whole",
    window: int = 0,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    batch_size: int = 4,
    device: str = "auto",
    amp: str = "none",
    alpha: float = 0.5,
    overlay: str = "jpg",
    recursive: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Segment images with a trained checkpoint; write masks, overlays and predictions.json.

    Args:
        checkpoint: see :func:`load_model_from_checkpoint`, or an ``.onnx`` file written by
            ``ciscr export`` (run with onnxruntime; ``amp`` must be ``none``).
        inputs: image files, folders, glob patterns (see :func:`collect_inputs`).
        out: output folder (created).
        mode: ``whole`` | ``sliding`` (square windows of side ``window``) | ``multiscale``
            (each of ``scales``; scaled images larger than ``window`` are slid). ``window`` 0 means
            the checkpoint's ``eval.window`` or ``train.crop_size``; ``scales`` None means its
            ``eval.scales``. ``flip`` adds horizontally flipped views.
        batch_size: images of equal size predicted together.
        amp: ``none`` | ``bf16`` | ``fp16`` (CUDA only) autocast.
        alpha: weight of the class colours in the overlay; ``overlay``: jpg | png | none.
        skip_bad: warn about and skip unreadable images instead of failing (DataError).

    Returns:
        One record per predicted image, in input order: ``input``, ``mask``, ``overlay``
        (paths), ``height``, ``width``, ``class_pixel_fractions`` ({class name: fraction}).
    """
    from ciscr.dist import resolve_device
    from ciscr.utils.io import atomic_write_json

    _check_options(mode, window, scales, batch_size, amp, alpha, overlay)
    out = Path(out)
    paths = collect_inputs(inputs, recursive, exclude=_previous_outputs(out))
    names = output_names(paths, overlay)
    _check_no_overwrite(out, paths, names)
    dev = resolve_device(device)
    _check_amp(amp, dev, checkpoint)
    skipped: list[dict[str, str]] = []
    items = _scan(paths, names, skip_bad, skipped)  # a non-image fails before the model loads
    if not items:
        raise DataError(f"none of the {len(paths)} input image(s) could be read")
    model, meta = load_model(checkpoint, dev)
    st = _settings(meta, mode, window, scales, flip, amp, alpha, batch_size)
    with _removed_on_failure(out):
        _prepare_out(out)
        records = _run(model, meta, items, st, out, dev, skip_bad, skipped, progress)
        if not records:  # every image failed to decode (with skip_bad)
            raise DataError(f"none of the {len(paths)} input image(s) could be read")
        summary = {
            "checkpoint": str(checkpoint),
            "meta": meta,
            "settings": {**asdict(st), "device": str(dev)},
            "predictions": records,
            "skipped": skipped,
        }
        atomic_write_json(out / "predictions.json", summary)
    return records


def _check_amp(amp: str, dev: Any, checkpoint: str | os.PathLike) -> None:
    """--amp against the device and the model kind (before anything is read or written)."""
    if amp == "fp16" and dev.type != "cuda":
        raise ConfigError(f"--amp fp16 needs a CUDA device (device is {dev}); use bf16 or none")
    if amp != "none" and is_onnx(checkpoint):
        raise ConfigError(f"--amp {amp}: an ONNX model runs in the precision it was exported "
                          "in; use --amp none")


# --------------------------------------------------------------------------- CLI


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of numbers"
        ) from None
    if not scales or any(s <= 0 for s in scales):
        raise argparse.ArgumentTypeError(f"'{text}': give positive scales, e.g. 0.75,1,1.25")
    return scales


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``ciscr predict`` to the CLI (called by ciscr.cli while it builds its parser)."""
    from ciscr.commands import command

    p = sub.add_parser(
        "predict",
        help="segment your own images with a trained checkpoint",
        description="Writes <out>/<stem>.png (class-index palette PNG, input size), "
        "<out>/<stem>_overlay.jpg and <out>/predictions.json. Put INPUTs before the options.",
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        metavar="CHECKPOINT",
        help="checkpoint.pt from ciscr train/run (its meta holds classes, palette, "
        "normalisation and model config), an .onnx file from ciscr export (run with "
        "onnxruntime: pip install 'ciscr[onnx]'), or a .safetensors file written by "
        "export_weights(path, model, ciscr.predict.export_metadata(meta))",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders or (quoted) glob patterns such as 'photos/*.jpg'; "
        f"folders yield {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mode", choices=MODES, default="whole", help="default: whole")
    p.add_argument(
        "--window",
        type=int,
        default=0,
        help="sliding-window side (default: the checkpoint's eval.window or crop size)",
    )
    p.add_argument(
        "--scales",
        type=_parse_scales,
        default=None,
        help="multiscale factors, e.g. 0.75,1,1.25 (default: the checkpoint's)",
    )
    p.add_argument("--flip", action="store_true", help="also predict flipped images and average")
    p.add_argument("--batch-size", type=int, default=4, help="images of equal size per forward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--amp", choices=AMP_MODES, default="none", help="autocast (fp16: CUDA only)")
    p.add_argument("--alpha", type=float, default=0.5, help="class colour weight in overlays")
    p.add_argument("--overlay", choices=OVERLAY_FORMATS, default="jpg", help="overlay format")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders, allow **")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="warn about unreadable images and go on (default: stop with an error)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    command("predict")(cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """``ciscr predict``: run :func:`predict_paths` and print a one-line summary."""
    records = predict_paths(
        args.checkpoint,
        args.inputs,
        args.out,
        mode=args.mode,
        window=args.window,
        scales=args.scales,
        flip=args.flip,
        batch_size=args.batch_size,
        device=args.device,
        amp=args.amp,
        alpha=args.alpha,
        overlay=args.overlay,
        recursive=args.recursive,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
    )
    print(f"predicted {len(records)} image(s) -> {args.out} (see predictions.json)")
    return 0


__all__ = [
    "IMAGE_EXTENSIONS",
    "blend_overlay",
    "collect_inputs",
    "export_metadata",
    "load_model",
    "load_model_from_checkpoint",
    "output_names",
    "predict_paths",
    "register_cli",
]
