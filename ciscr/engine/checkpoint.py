"""Checkpoints: atomic ``torch.save``, safe ``weights_only`` loading, RNG state, weight export.

A checkpoint is a dict of plain values (tensors, dicts, lists, tuples, numbers, strings, bools,
None) plus the marker ``{'ciscr_checkpoint': FORMAT_VERSION}``. Plain values are what
``torch.load(weights_only=True)`` accepts, so loading a checkpoint never runs pickled code;
:func:`save_checkpoint` checks the contents BEFORE writing, so a stray numpy array fails at the
first save, not at the resume hours later.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ciscr.errors import CheckpointError
from ciscr.utils.io import atomic_path

MARKER = "ciscr_checkpoint"
FORMAT_VERSION = 1

# Exact types (not isinstance): numpy scalars subclass float/int but unpickle as numpy objects,
# which weights_only loading refuses.
_SCALARS = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)
_CONTAINERS = (dict, OrderedDict, list, tuple)


def _check_value(value: Any, where: str) -> None:
    t = type(value)
    if t in _SCALARS or t in (torch.Tensor, nn.Parameter):
        return
    if t in (dict, OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise TypeError(f"checkpoint key {where}[{k!r}]: {type(k).__name__} key")
            _check_value(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple):
        for i, v in enumerate(value):
            _check_value(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint value {where}: {t.__module__}.{t.__qualname__} cannot be loaded with "
        "weights_only=True; convert it (tensor, list, number, str, dict)"
    )


def validate_state(state: dict[str, Any]) -> None:
    """Raise TypeError naming the first value that ``weights_only`` loading would refuse."""
    if type(state) not in (dict, OrderedDict):
        raise TypeError(f"checkpoint state must be a dict, not {type(state).__name__}")
    _check_value(state, "state")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (+ the format marker) to ``path`` atomically (temp file, fsync, rename).

    A crash mid-write leaves the previous file at ``path`` intact and no temp file behind.
    """
    validate_state(state)
    payload = {MARKER: FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as err:
            raise _as_os_error(err, tmp) from None


# How torch's C++ zip writer reports a failed write (it hides the errno).
_WRITE_FAILURES = ("unexpected pos", "file write failed", "failed writing")


def _as_os_error(err: RuntimeError, tmp: Path) -> BaseException:
    """A failed write inside torch.save (e.g. the disk filled up) as the OSError it really is,
    so that atomic_path reports it in one line; any other RuntimeError is returned unchanged."""
    if not any(m in str(err) for m in _WRITE_FAILURES):
        return err
    if shutil.disk_usage(tmp.parent).free < 1 << 20:  # checked before the temp file is removed
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, "the write failed: disk full, quota exceeded or I/O error")


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: checkpoint is corrupt or truncated ({why})")


def _check_archive(path: Path) -> None:
    """torch.save writes a zip archive with a CRC per record: verify them all.

    ``torch.load`` alone misses a flipped byte inside tensor data (it does not check CRCs) and
    reports truncation with assorted exceptions; this turns all of that into one message.
    """
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err.strerror or err})") from None
    # A truncated checkpoint still starts with the zip signature; a file that does not was
    # never one (a text file renamed .pt, another program's output): say that, not "corrupt".
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise _corrupt(path, "empty file")
    if head != b"PK\x03\x04":
        raise CheckpointError(f"{path}: not a ciscr checkpoint (not a file written by "
                              "torch.save; evaluate the checkpoint.pt of a run's stage)")
    try:
        if not zipfile.is_zipfile(path):
            raise _corrupt(path, "not a zip archive")
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except CheckpointError:
        raise
    except Exception as err:  # BadZipFile, EOFError, zlib.error, OSError, ...
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    if bad is not None:
        raise _corrupt(path, f"CRC mismatch in record {bad}")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Returns the saved dict (without the marker). Raises CheckpointError for a missing,
    unreadable, corrupt/truncated, unsafe or non-ciscr file, with one line naming ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    _check_archive(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointError(
                f"{path}: not a ciscr checkpoint (it holds objects that weights_only loading "
                "refuses to unpickle)"
            ) from None
        raise _corrupt(path, f"UnpicklingError: {err}") from None
    except Exception as err:  # truncation shows up as RuntimeError, EOFError, KeyError, ...
        first = str(err).splitlines()[0] if str(err) else ""
        raise _corrupt(path, f"{type(err).__name__}: {first}") from None
    if not isinstance(obj, dict) or MARKER not in obj:
        raise CheckpointError(
            f"{path}: not a ciscr checkpoint (no '{MARKER}' marker); pass a checkpoint.pt "
            "written by ciscr"
        )
    if not isinstance(obj[MARKER], int) or obj[MARKER] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {obj[MARKER]!r} is newer than this ciscr reads "
            f"({FORMAT_VERSION}); upgrade ciscr"
        )
    return {k: v for k, v in obj.items() if k != MARKER}


# --------------------------------------------------------------------------- RNG state


def get_rng_state() -> dict[str, Any]:
    """torch (CPU + every CUDA device), python ``random`` and numpy state, weights_only-safe.

    Tuples of ints become lists and numpy's key array becomes a list of ints, so the dict can go
    into a checkpoint as is.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [
            str(np_kind),
            [int(k) for k in np_keys],
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA only if saved and the counts match)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- weight export


def export_weights(path: str | os.PathLike, model: nn.Module, meta: dict[str, str]) -> None:
    """Write the model's state_dict as a safetensors file (atomic), with string ``meta``.

    ``meta`` (e.g. backbone, num_classes, mean/std as JSON strings) is what ``ciscr predict``
    needs to rebuild the model. A DDP wrapper is unwrapped so the keys have no ``module.``.
    """
    from safetensors.torch import save_file

    bad = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"export_weights: metadata must map str to str (bad keys: {bad})")
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    # safetensors wants contiguous CPU tensors that do not share storage.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(meta))


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an :func:`export_weights` file: (state_dict on CPU, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(
            f"{path}: not a readable safetensors weight file ({type(err).__name__}: {err})"
        ) from None
    return tensors, meta
