"""Loading a trained model for inference: a checkpoint.pt, a safetensors export, or an ONNX file.

``ciscr predict``, ``ciscr export``, the report and the figures all start from a file a run
wrote; this module turns it into a callable model and its normalised ``meta`` (class names,
palette, mean/std, config). It sits below all of them, so that ``export`` (which loads a
checkpoint) and ``predict`` (which may run an exported ONNX file) never import each other.
onnxruntime is imported lazily, only when an ``.onnx`` file is run.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ciscr.errors import CheckpointError, DependencyError

if TYPE_CHECKING:
    import torch
    from torch import nn

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# Metadata keys written into the ONNX file (JSON-encoded values), read back by load_onnx_model.
ONNX_META_KEYS = ("config", "class_names", "palette", "num_classes", "mean", "std", "stage",
                  "iteration")
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
    model, raw = load_onnx_model(path, str(device))
    return model, _normalise_meta(raw, Path(path))  # type: ignore[return-value]



def require_onnx(what: str, modules: tuple[str, ...] = ("onnx", "onnxruntime")) -> None:
    """Import the optional ONNX packages or raise one line saying how to install them."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise DependencyError(
                f"{what} needs the optional ONNX packages ({err}); install them with: "
                "pip install 'ciscr[onnx]'  (onnx, onnxruntime, onnxscript)"
            ) from None


# --------------------------------------------------------------------------- ONNX files


def onnx_session(path: str | os.PathLike, device: str = "cpu") -> Any:
    """An onnxruntime InferenceSession (CUDA provider when asked for and available)."""
    require_onnx("running an .onnx model", ("onnxruntime",))
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{path}: cannot load the ONNX model ({first})") from None


class OnnxSegmenter:
    """An onnxruntime session called like the PyTorch model (what predict_logits needs).

    ``model(x)`` with x (B,3,H,W) normalised returns an object whose ``logits`` is a tensor on
    x's device, so whole / sliding / multi-scale / flip prediction work unchanged.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.training = False

    def __call__(self, x: torch.Tensor) -> Any:
        import torch

        from ciscr.models import SegOutput

        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: arr})[0]
        return SegOutput(logits=torch.from_numpy(logits).to(x.device), features=None)

    def eval(self) -> OnnxSegmenter:
        return self


def read_onnx_metadata(path: Path, session: Any) -> dict[str, Any]:
    """The checkpoint-like meta stored by :func:`encode_metadata`."""
    raw = session.get_modelmeta().custom_metadata_map
    meta: dict[str, Any] = {}
    for key in ONNX_META_KEYS:
        if key in raw:
            try:
                meta[key] = json.loads(raw[key])
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: ONNX metadata '{key}' is not JSON") from None
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(
            f"{path}: ONNX file has no ciscr metadata (config, class names, palette); "
            "write it with: ciscr export CHECKPOINT --out model.onnx"
        )
    return meta


def load_onnx_model(path: str | os.PathLike, device: str = "cpu") -> tuple[OnnxSegmenter, dict]:
    """(callable model, raw meta) of an ONNX file written by ``ciscr export``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX file not found")
    session = onnx_session(path, device)
    return OnnxSegmenter(session), read_onnx_metadata(path, session)
