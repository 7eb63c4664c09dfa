"""``ciscr export``: a trained model as one ONNX file that is enough to segment an image.

The graph maps ``image`` (float32 (B,3,H,W): RGB in [0, 1], normalised ``(x - mean) / std``)
to ``logits`` (float32 (B,K,H,W), input size; argmax over K = class ids), with batch, height
and width dynamic. The file's metadata (``custom_metadata_map`` in onnxruntime) holds, as JSON
strings, everything else a user needs: ``class_names``, ``palette``, ``mean``, ``std``,
``num_classes`` and the training ``config``. ``ciscr predict model.onnx ...`` runs it with
onnxruntime and writes the same masks as from the checkpoint.

onnx, onnxruntime and onnxscript (torch's exporter) are the optional extra ``ciscr[onnx]``;
they are imported only here, lazily, so that the rest of ciscr never needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ciscr.errors import CheckpointError, ConfigError

# The ONNX names and the onnxruntime runner live with the other model loaders (predict runs an
# .onnx file without importing export); imported here too, their public place since export.
from ciscr.loading import (  # noqa: F401 - re-exported
    INPUT_NAME,
    ONNX_META_KEYS,
    OUTPUT_NAME,
    OnnxSegmenter,
    load_onnx_model,
    onnx_session,
    read_onnx_metadata,
    require_onnx,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("ciscr")

OPSET = 18
# onnxruntime must reproduce PyTorch's logits to within this fraction of their largest
# magnitude: float32 kernels sum in another order, nothing more (measured: ~1e-6 relative).
RELATIVE_TOLERANCE = 1e-3
# Two input sizes, odd and unequal, different batches: they exercise the dynamic axes.
VERIFY_SHAPES = ((1, 3, 96, 128), (2, 3, 75, 61))


def logits_module(model: nn.Module) -> nn.Module:
    """The exported module: ``model``'s ``logits`` alone (the CISC features stay behind)."""
    from torch import nn

    class _Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.inner(image).logits

    return _Logits(model).eval()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch's exporter warns about torchvision ops and deprecations that do not concern us."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def to_onnx_proto(model: nn.Module, opset: int = OPSET) -> Any:
    """The ONNX ModelProto of ``model`` (logits only) with dynamic batch, height and width."""
    import torch

    wrapped = logits_module(model)
    example = torch.zeros(2, 3, 64, 64)
    dyn = torch.export.Dim.DYNAMIC
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            wrapped,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"image": {0: dyn, 2: dyn, 3: dyn}},
            verbose=False,
        )
    return program.model_proto


def encode_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata (str -> JSON str) of a normalised checkpoint meta."""
    import ciscr

    out = {k: json.dumps(meta[k]) for k in ONNX_META_KEYS if meta.get(k) is not None}
    out["producer"] = json.dumps(f"ciscr {ciscr.__version__}")
    out["input"] = json.dumps(
        f"{INPUT_NAME}: float32 (B,3,H,W), RGB scaled to [0,1], then (x - mean) / std"
    )
    out["output"] = json.dumps(f"{OUTPUT_NAME}: float32 (B,K,H,W); argmax over K = class id")
    return out


def _save_proto(proto: Any, meta: dict[str, str], out: Path) -> None:
    """Attach the metadata and write the file atomically (one file, weights inside)."""
    import onnx

    from ciscr.utils.io import atomic_path

    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))


def verify_onnx(
    model: nn.Module, path: Path, shapes: tuple[tuple[int, ...], ...] = VERIFY_SHAPES
) -> float:
    """Largest |onnxruntime - PyTorch| logit difference over ``shapes``, relative to the largest
    PyTorch logit; raises CheckpointError above :data:`RELATIVE_TOLERANCE`."""
    import torch

    session = onnx_session(path)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            ref = model(x).logits.float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != ref.shape:
            raise CheckpointError(f"{path}: ONNX output shape {got.shape} != {ref.shape}")
        rel = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
        worst = max(worst, rel)
    if worst > RELATIVE_TOLERANCE:
        raise CheckpointError(
            f"{path}: onnxruntime differs from PyTorch by {worst:.2e} of the largest logit "
            f"(tolerance {RELATIVE_TOLERANCE:g}); the export is not trustworthy"
        )
    return worst


def export_onnx(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, verify: bool = True,
    opset: int = OPSET,
) -> dict[str, Any]:
    """Write ``out`` (.onnx) from a checkpoint.pt / .safetensors export; check it if ``verify``.

    Returns ``{"out", "num_classes", "max_relative_difference" (None without verify)}``.
    """
    from ciscr.loading import load_model_from_checkpoint

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"--out {out}: the file name must end in .onnx")
    require_onnx("ciscr export", ("onnx", "onnxruntime", "onnxscript"))
    model, meta = load_model_from_checkpoint(checkpoint, "cpu")
    proto = to_onnx_proto(model, opset)
    _save_proto(proto, encode_metadata(meta), out)
    worst = verify_onnx(model, out) if verify else None
    return {"out": str(out), "num_classes": meta["num_classes"], "max_relative_difference": worst}


# --------------------------------------------------------------------------- CLI


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``ciscr export`` to the CLI (called by ciscr.cli while it builds its parser)."""
    from ciscr.commands import command

    p = sub.add_parser(
        "export",
        help="write the model as an ONNX file (needs pip install 'ciscr[onnx]')",
        description="Writes an ONNX graph (input 'image' (B,3,H,W) normalised, output "
        "'logits' (B,K,H,W), dynamic batch/height/width) with the class names, palette and "
        "normalisation as metadata, then checks it against PyTorch with onnxruntime.",
        epilog="examples:\n  ciscr export runs/synth/stage3/checkpoint.pt --out synth.onnx\n"
        "  ciscr predict synth.onnx photos/ --out preds/",
    )
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                   help="checkpoint.pt from ciscr train/run (or a .safetensors export)")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the onnxruntime-vs-PyTorch check at two input sizes")
    command("export")(cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """``ciscr export``: run :func:`export_onnx` and say what was checked."""
    res = export_onnx(args.checkpoint, args.out, verify=not args.no_verify, opset=args.opset)
    size = Path(res["out"]).stat().st_size / 2**20
    print(f"written: {res['out']} ({size:.1f} MiB, {res['num_classes']} classes)")
    if res["max_relative_difference"] is not None:
        shapes = " and ".join("x".join(map(str, s)) for s in VERIFY_SHAPES)
        print(f"verified with onnxruntime at {shapes}: max |logit difference| = "
              f"{res['max_relative_difference']:.1e} of the largest logit "
              f"(tolerance {RELATIVE_TOLERANCE:g})")
    return 0


__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxSegmenter",
    "export_onnx",
    "load_onnx_model",
    "register_cli",
    "verify_onnx",
]
