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
import contextlib
import glob
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ciscr.errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("ciscr")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MODES = ("whole", "sliding", "multiscale")
AMP_MODES = ("none", "bf16", "fp16")
OVERLAY_FORMATS = ("jpg", "png", "none")
# What RunContext.meta stores; export_metadata / the safetensors reader use the same keys.
META_KEYS = ("config", "class_names", "palette", "num_classes", "mean", "std", "stage")


# --------------------------------------------------------------------------- model loading


def export_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """Encode a checkpoint ``meta`` as safetensors metadata (str -> JSON str) for export_weights.

    ``export_weights(path, model, export_metadata(meta))`` writes a file that
    :func:`load_model_from_checkpoint` (and so ``ciscr predict``) can run on its own.
    """
    return {k: json.dumps(meta[k]) for k in META_KEYS if k in meta}


def _decode_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    """Inverse of :func:`export_metadata` (values that are not JSON stay plain strings)."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    if not isinstance(out.get("config"), dict):
        raise CheckpointError(
            f"{path}: safetensors metadata has no ciscr 'config'; export it with "
            "export_weights(path, model, ciscr.predict.export_metadata(meta))"
        )
    return out


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    try:  # torch.save writes a zip ("PK"); safetensors starts with a u64 length, then '{'
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[:2] != b"PK" and head[8:9] == b"{"


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, raw meta) of a checkpoint.pt or a safetensors export."""
    from ciscr.engine.checkpoint import load_checkpoint, load_weights

    if path.is_dir():
        found = sorted(str(p.relative_to(path)) for p in path.glob("*/checkpoint.pt"))
        hint = f"; pass one of: {', '.join(found)}" if found else ""
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file{hint}")
    if path.is_file() and _is_safetensors(path):
        state, raw = load_weights(path)
        return state, _decode_metadata(raw, path)
    ckpt = load_checkpoint(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: checkpoint has no 'model' weights")
    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(
            f"{path}: checkpoint has no meta (model config, class names, palette); predict "
            "needs a checkpoint.pt written by ciscr train/run"
        )
    return ckpt["model"], {**meta, "iteration": ckpt.get("iteration")}


def _normalise_meta(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Fill defaults (names, palette, mean/std) and check that the pieces agree."""
    from ciscr.config import config_to_dict, from_dict
    from ciscr.data.io import default_palette

    cfg = from_dict(meta["config"], f"{path} config")
    names = meta.get("class_names")
    k = meta.get("num_classes") or (len(names) if names else 0)
    if not isinstance(k, int) or k < 1:
        raise CheckpointError(f"{path}: meta has no valid num_classes ({k!r})")
    names = list(names) if names else [f"class_{i}" for i in range(k)]
    if len(names) != k:
        raise CheckpointError(f"{path}: meta lists {len(names)} class names for {k} classes")
    pal = np.asarray(meta.get("palette") or [], dtype=np.int64).reshape(-1, 3)
    if pal.size and (pal.min() < 0 or pal.max() > 255):
        raise CheckpointError(f"{path}: meta palette has values outside 0-255")
    full = default_palette(max(k, 1)).astype(np.int64)
    full[: min(len(pal), k)] = pal[:k]  # missing colours fall back to the default palette
    return {
        **meta,
        "config": config_to_dict(cfg),
        "class_names": names,
        "palette": full.tolist(),
        "num_classes": k,
        "mean": [float(v) for v in (meta.get("mean") or cfg.data.mean)],
        "std": [float(v) for v in (meta.get("std") or cfg.data.std)],
        "checkpoint": str(path),
    }


def load_model_from_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint alone, in eval mode on ``device``.

    Args:
        path: a ``checkpoint.pt`` written by ciscr train/run (``weights_only`` loading), or a
            ``.safetensors`` file from ``export_weights(..., export_metadata(meta))``.
        device: ``auto`` / ``cpu`` / ``cuda[:N]`` / ``mps`` or a torch.device.

    Returns:
        (model, meta): ``model(x)`` maps (B,3,H,W) normalised images to SegOutput(logits
        (B,K,H,W), ...). ``meta`` has ``config`` (dict), ``class_names`` (K), ``palette``
        (K lists of 3 ints), ``num_classes``, ``mean``, ``std``, ``checkpoint`` (the path), and
        ``stage`` / ``iteration`` when the checkpoint recorded them.

    Raises:
        CheckpointError: missing/corrupt file, no meta, weights that do not fit the config.
    """
    import torch

    from ciscr.config import from_dict
    from ciscr.dist import resolve_device
    from ciscr.models import build_model

    path = Path(path)
    state, raw_meta = _read_checkpoint(path)
    meta = _normalise_meta(raw_meta, path)
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    model_cfg = from_dict(meta["config"]).model.model_copy(update={"pretrained": ""})
    model = build_model(model_cfg, meta["num_classes"])
    # A DDP-wrapped state_dict has "module." in front of every key.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
        raise CheckpointError(
            f"{path}: weights do not fit model.backbone={model_cfg.backbone} ({first})"
        ) from None
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(
            f"{path}: weights do not fit model.backbone={model_cfg.backbone} ({what}, "
            f"{len(missing)} missing / {len(unexpected)} unexpected keys)"
        )
    return model.to(dev).eval(), meta


def is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def load_model(
    path: str | os.PathLike, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint / safetensors file (PyTorch) or an ``.onnx`` file from ``ciscr export``
    (onnxruntime, the optional extra ``ciscr[onnx]``): (callable model, normalised meta)."""
    if not is_onnx(path):
        from ciscr.models import inference_layout

        model, meta = load_model_from_checkpoint(path, device)
        return inference_layout(model), meta
    from ciscr.export import load_onnx_model

    model, raw = load_onnx_model(path, str(device))
    return model, _normalise_meta(raw, Path(path))  # type: ignore[return-value]


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


# --------------------------------------------------------------------------- prediction


@dataclass
class _Item:
    """One input image and where its outputs go."""

    index: int
    path: Path
    size: tuple[int, int]  # (H, W)
    mask: str
    overlay: str | None


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
