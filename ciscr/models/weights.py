"""Pretrained backbone weights by name: ``model.pretrained=imagenet``.

``imagenet`` resolves, per backbone, the standard torchvision ImageNet ``.pth`` file. It is
looked up first in torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where torchvision and
``torch.hub`` put it, so many users already have it), otherwise downloaded there with a
progress bar. Its SHA-256 must start with the 8 hex digits torchvision writes into the file
name. :func:`torch.hub.download_url_to_file` downloads into a temporary ``.partial`` file next
to the destination, checks the hash and only then renames it, and deletes the temporary file
on any failure: the cache never holds a half-written or unverified file under the real name.

Any failure (offline, HTTP error, wrong hash) is one :class:`~ciscr.errors.WeightsError` line
naming the URL, the exact path where the file can be put by hand, and the alternative setting
``model.pretrained=PATH``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ciscr.config import WEIGHT_NAMES
from ciscr.errors import WeightsError
from ciscr.utils.io import file_sha256

__all__ = [
    "IMAGENET_WEIGHTS",
    "NAMED_WEIGHTS",
    "WeightFile",
    "hub_checkpoint_dir",
    "resolve_pretrained",
]

log = logging.getLogger("ciscr")


@dataclass(frozen=True)
class WeightFile:
    """A published weight file whose name ends in ``-<first 8 hex of its SHA-256>.pth``."""

    url: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str:
        """The SHA-256 prefix torchvision puts in the file name (``resnet50-0676ba61.pth``)."""
        match = re.search(r"-([0-9a-f]{8,64})\.\w+$", self.filename)
        if match is None:
            raise ValueError(f"{self.url}: file name carries no SHA-256 prefix")
        return match.group(1)


_TORCHVISION = "https://download.pytorch.org/models"

# backbone name -> torchvision's ImageNet file (the "V1" weights every DeepLab codebase uses).
IMAGENET_WEIGHTS: dict[str, WeightFile] = {
    "resnet18": WeightFile(f"{_TORCHVISION}/resnet18-f37072fd.pth"),
    "resnet50": WeightFile(f"{_TORCHVISION}/resnet50-0676ba61.pth"),
    "resnet101": WeightFile(f"{_TORCHVISION}/resnet101-63fe2227.pth"),
    "mobilenet_v2": WeightFile(f"{_TORCHVISION}/mobilenet_v2-b0353104.pth"),
}

# model.pretrained=<name> -> {backbone name: file}. Anything else is a local path.
NAMED_WEIGHTS: dict[str, dict[str, WeightFile]] = {"imagenet": IMAGENET_WEIGHTS}
assert set(NAMED_WEIGHTS) == set(WEIGHT_NAMES), "config.WEIGHT_NAMES must name them all"

# Cached files whose hash was already checked in this process: (path, size, mtime) keys, so
# that the three stages of a run read a 170 MB file once for hashing, not three times.
_VERIFIED: set[tuple[str, int, int]] = set()


def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch's own rule: TORCH_HOME, XDG_CACHE_HOME, ~/.cache)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _check_cached(path: Path, spec: WeightFile) -> None:
    """A file already in the cache must carry the published hash too (once per process)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    digest = file_sha256(path)
    if not digest.startswith(spec.hash_prefix):
        raise WeightsError(
            f"{path}: SHA-256 {digest[:8]}... does not match {spec.hash_prefix} of {spec.url} "
            "(damaged or a different file); delete it to download it again, or set "
            "model.pretrained=PATH to a local copy"
        )
    _VERIFIED.add(key)


def _download(url: str, dst: Path, hash_prefix: str, progress: bool = True) -> None:
    """Download *url* to *dst* via a verified temporary file (torch.hub's implementation)."""
    import torch.hub

    torch.hub.download_url_to_file(url, str(dst), hash_prefix=hash_prefix, progress=progress)


def _reason(err: BaseException) -> str:
    """A short, one-line cause: 'HTTP Error 404: Not Found', 'Connection refused', ..."""
    inner = getattr(err, "reason", None)  # URLError wraps the socket error
    text = str(inner if isinstance(inner, BaseException) else err).strip()
    return (text.splitlines() or [type(err).__name__])[0][:160]


def _fetch(spec: WeightFile, dst: Path, setting: str) -> None:
    """Download *spec* to *dst*; any failure is one WeightsError line telling what to do."""
    log.info("%s: downloading %s to %s", setting, spec.url, dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _download(spec.url, dst, spec.hash_prefix)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # URLError, HTTPError, timeouts, the hash RuntimeError, OSError
        raise WeightsError(
            f"{setting}: cannot download {spec.url} ({_reason(err)}); download it by hand to "
            f"{dst} or set model.pretrained=PATH to a local copy"
        ) from None


def resolve_pretrained(backbone: str, pretrained: str | os.PathLike) -> str:
    """The local file behind ``model.pretrained``: '' (random init), a path, or a name.

    A name (``imagenet``) is looked up in :data:`NAMED_WEIGHTS` for *backbone*, found in the
    hub cache or downloaded there, and its hash checked. Paths are returned unchanged (their
    existence is checked when they are loaded).

    Raises:
        WeightsError: no such weights for this backbone, or the download / hash failed.
    """
    text = str(pretrained)
    if text not in NAMED_WEIGHTS:
        return text
    table = NAMED_WEIGHTS[text]
    setting = f"model.pretrained={text}"
    if backbone not in table:
        raise WeightsError(
            f"{setting}: no {text} weights for model.backbone={backbone} "
            f"(available for: {', '.join(table)}); set model.pretrained=PATH"
        )
    spec = table[backbone]
    dst = hub_checkpoint_dir() / spec.filename
    if not dst.is_file():
        _fetch(spec, dst, setting)
    else:
        log.debug("%s: cache hit, %s", setting, dst)
    _check_cached(dst, spec)
    return str(dst)
