"""Small runtime helpers: seeding, mixed precision, timing, parameter counts."""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from ciscr.dist import resolve_device
from ciscr.errors import ConfigError

__all__ = [
    "Timer",
    "autocast",
    "autocast_context",
    "count_parameters",
    "cpu_has_fast_bf16",
    "make_grad_scaler",
    "resolve_amp",
    "resolve_device",
    "seed_everything",
]

AMP_MODES = ("none", "bf16", "fp16")
# What ``train.amp`` accepts: the modes above, or "auto" (see :func:`resolve_amp`).
AMP_SETTINGS = ("auto", *AMP_MODES)
# /proc/cpuinfo flags of CPUs that execute bf16 matrix products natively (AVX512-BF16 dot
# products, AMX tiles). Without them oneDNN emulates bf16 with fp32 maths plus conversions,
# which is slower than plain fp32.
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def seed_everything(
    seed: int, deterministic: bool = True, device: torch.device | str | None = None
) -> None:
    """Seed python ``random``, numpy and torch (all devices); optionally ask for determinism.

    On CPU (or when ``device`` is None) ``deterministic`` turns on
    ``torch.use_deterministic_algorithms(True, warn_only=True)``: warn-only because a few ops
    have no deterministic kernel and a warning is better than a crash. On CUDA it only pins
    cuDNN (deterministic, no benchmark): full deterministic mode needs CUBLAS_WORKSPACE_CONFIG
    and makes scatter/interpolate backward much slower.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too
    dev = _as_device(device) if device is not None else None
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if dev is None or dev.type == "cpu":
        torch.use_deterministic_algorithms(deterministic, warn_only=True)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` (empty where it is unreadable,
    e.g. macOS or Windows). ``cpuinfo``: the file's text, for tests."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm64
            return set(value.split())
    return set()


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else the platform's processor string, else
    "unknown"): what a speed figure is recorded with."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_has_fast_bf16(flags: set[str] | None = None) -> bool:
    """True when the CPU runs bf16 matmuls / convolutions natively (AVX512-BF16 or AMX) and
    torch's oneDNN backend can use them. ``flags``: CPU flags (default: this machine's)."""
    if flags is None:
        return _this_cpu_fast_bf16()
    if not any(f in flags for f in FAST_BF16_FLAGS):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


@functools.cache
def _this_cpu_fast_bf16() -> bool:
    # Cached: autocast() resolves "auto" on every training step and every predicted image.
    return cpu_has_fast_bf16(cpu_flags())


def resolve_amp(amp: str, device: torch.device | str, *, fast_cpu_bf16: bool | None = None) -> str:
    """The autocast mode ``amp`` means on ``device``: "auto" becomes "bf16" where bf16 is fast
    (a CUDA device that supports it; a CPU with native bf16, see :func:`cpu_has_fast_bf16`)
    and "none" elsewhere (MPS, older CPUs: emulated bf16 is slower than fp32). Explicit modes
    are returned unchanged. ``fast_cpu_bf16`` overrides the CPU check (tests)."""
    if amp != "auto":
        return amp
    dev = _as_device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "none"
    if dev.type == "cpu":
        fast = cpu_has_fast_bf16() if fast_cpu_bf16 is None else fast_cpu_bf16
        return "bf16" if fast else "none"
    return "none"


def precision_name(amp: str) -> str:
    """The arithmetic a resolved ``train.amp`` mode trains in, as results and reports name it:
    "none" -> "fp32", "bf16" / "fp16" unchanged (``auto`` must be resolved first:
    :func:`resolve_amp`)."""
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"precision_name: {amp!r} is not a resolved train.amp mode")
    return "fp32" if amp == "none" else amp


def _check_amp(device: torch.device, amp: str) -> None:
    if amp not in AMP_SETTINGS:
        raise ConfigError(f"train.amp={amp}: must be one of {', '.join(AMP_SETTINGS)}")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16 on CPU")


@contextlib.contextmanager
def autocast(device: torch.device | str, amp: str) -> Iterator[None]:
    """``torch.autocast`` for ``amp`` in {'auto', 'none', 'bf16', 'fp16'} on ``device``.

    'auto' is resolved by :func:`resolve_amp`; 'none' is a no-op; fp16 is refused off CUDA (CPU
    fp16 kernels are slow or missing and there is no loss scaling there) with a ConfigError
    naming ``train.amp``.
    """
    dev = _as_device(device)
    _check_amp(dev, amp)
    amp = resolve_amp(amp, dev)
    if amp == "none":
        yield
        return
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    with torch.autocast(device_type=dev.type, dtype=dtype):
        yield


# DESIGN.md's name for the same thing.
autocast_context = autocast


def make_grad_scaler(device: torch.device | str, amp: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 on CUDA (the only case that needs loss scaling), else None.

    bf16 has fp32's exponent range, so its gradients do not underflow and need no scaler.
    """
    dev = _as_device(device)
    _check_amp(dev, amp)
    if resolve_amp(amp, dev) == "fp16" and dev.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


class Timer:
    """Wall-clock stopwatch: ``with Timer() as t: ...; t.elapsed`` (seconds).

    ``elapsed`` also reads the running time while still inside the block.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stop: float | None = None

    def __enter__(self) -> Timer:
        self.start, self.stop = time.perf_counter(), None
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = time.perf_counter()

    @property
    def elapsed(self) -> float:
        end = self.stop if self.stop is not None else time.perf_counter()
        return end - self.start


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parse_number(text: str) -> float | int | None:
    """'0.125' -> 0.125, '20' -> 20, '1/8' or '1_8' -> 0.125; anything else -> None."""
    t = text.strip().replace("_", "/")
    try:
        if "/" in t:
            return float(Fraction(t))
        return int(t) if t.isdigit() else float(t)
    except (ValueError, ZeroDivisionError):
        return None
