"""Eager validation of every image and mask a run will read, BEFORE any training starts.

A corrupt JPEG or an RGB mask found hours into stage 2 wastes the run; found here it costs one
cheap pass over the files (masks fully decoded: their values must be checked; JPEG images decoded
at 1/8 scale, which still reads the whole file, so truncation is caught). Under torchrun the pass
is sharded over the ranks and every rank raises the same error.

The result is cached in ``<run dir>/data_check.json`` under a fingerprint of the sample list
(ids, paths, file sizes and modification times, K, ignore index): a resumed run with unchanged
files skips the pass, a run whose files changed re-checks them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ciscr import dist
from ciscr.data.formats import Sample
from ciscr.data.io import read_mask
from ciscr.errors import CiscrError, DataError
from ciscr.utils.io import atomic_write_json

CHECK_FILE = "data_check.json"
CHECK_VERSION = 1


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file after checking that it decodes; DataError naming the file."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.format == "JPEG":
                # DCT-domain downscaling: the whole stream is still entropy-decoded (truncation
                # and corruption are caught) at a fraction of the cost of a full decode.
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            img.load()
    except FileNotFoundError:
        raise DataError(f"{path}: cannot read image (file not found)") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: cannot read image (not a recognised image format)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    return h, w


def check_sample(sample: Sample, num_classes: int, ignore_index: int) -> np.ndarray | None:
    """Validate one sample: image decodes; mask (if any) single-channel, same size, values in
    [0, K) or ``ignore_index``. Returns the (K,) bool class presence of its mask (None without
    a mask). Raises DataError naming the bad file."""
    size = image_size(Path(sample.image))
    if sample.mask is None:
        return None
    mask = read_mask(sample.mask, num_classes, ignore_index, expect_size=size)
    return np.bincount(mask.ravel(), minlength=256)[:num_classes] > 0


def _stat(path: Path | None) -> list[Any]:
    if path is None:
        return [None]
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None]  # checked (and reported) by the validation pass itself
    return [str(path), st.st_size, st.st_mtime_ns]


def fingerprint(groups: dict[str, Sequence[Sample]], num_classes: int, ignore_index: int) -> str:
    """sha256 of what the check depends on: the sample lists and their files' size and mtime."""
    h = hashlib.sha256()
    h.update(json.dumps([CHECK_VERSION, num_classes, ignore_index]).encode())
    for name in sorted(groups):
        for s in groups[name]:
            row = [name, s.id, *_stat(Path(s.image)), *_stat(s.mask and Path(s.mask))]
            h.update(json.dumps(row).encode())
    return h.hexdigest()


def _check_part(
    part: list[tuple[int, str, Sample]], num_classes: int, ignore_index: int, progress: bool
) -> tuple[list[tuple[int, str]], list[list[int]]]:
    """((position, error message) pairs, class ids present in each labeled mask) of this rank."""

    def one(item: tuple[int, str, Sample]) -> tuple[str | None, np.ndarray | None]:
        try:
            return None, check_sample(item[2], num_classes, ignore_index)
        except CiscrError as err:
            return str(err), None

    bar = None
    if progress and dist.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(part), desc="checking data", leave=False, dynamic_ncols=True)
    errors: list[tuple[int, str]] = []
    present: list[list[int]] = []
    # PIL releases the GIL while decoding: threads overlap the file reads and the decoding.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for (pos, group, _), (err, pres) in zip(part, pool.map(one, part), strict=True):
            if err is not None:
                errors.append((pos, err))
            elif group == "labeled" and pres is not None:
                present.append(np.flatnonzero(pres).tolist())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return errors, present


def validate_samples(
    groups: dict[str, Sequence[Sample]],
    num_classes: int,
    ignore_index: int = 255,
    *,
    run_dir: Path | None = None,
    progress: bool = True,
) -> list[int]:
    """Check every image and mask of ``groups`` (``labeled`` / ``unlabeled`` / ``val``).

    Raises DataError with the first problem (in list order) and how many files have one.
    Returns the sorted class ids that occur in at least one labeled mask. With ``run_dir`` the
    result is cached in ``run_dir/data_check.json`` (written by the main rank).
    """
    fp = fingerprint(groups, num_classes, ignore_index)
    cache = run_dir / CHECK_FILE if run_dir is not None else None
    cached = _read_cache(cache, fp)
    if cached is not None:
        return cached
    order = ("labeled", "unlabeled", "val")
    names = sorted(groups, key=lambda n: (order.index(n) if n in order else len(order), n))
    items = [(name, s) for name in names for s in groups[name]]
    mine = dist.shard([(i, name, s) for i, (name, s) in enumerate(items)])
    errors, present = _check_part(mine, num_classes, ignore_index, progress)
    # Gather so that every rank raises the same error: the first bad file in list order.
    all_errors = sorted(e for part in dist.all_gather_object(errors) for e in part)
    if all_errors:
        n = len(all_errors)
        more = f" (and {n - 1} more bad file(s))" if n > 1 else ""
        raise DataError(f"{all_errors[0][1]}{more}")
    classes = sorted({k for part in dist.all_gather_object(present) for p in part for k in p})
    if cache is not None and dist.is_main():
        record = {
            "fingerprint": fp,
            "passed": True,
            "labeled_classes": classes,
            "num_samples": {name: len(v) for name, v in groups.items()},
        }
        atomic_write_json(cache, record)
    return classes


def _read_cache(cache: Path | None, fp: str) -> list[int] | None:
    if cache is None or not cache.is_file():
        return None
    try:
        record = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None  # unreadable cache: just check again
    if record.get("fingerprint") != fp or record.get("passed") is not True:
        return None
    return [int(k) for k in record.get("labeled_classes", [])]
