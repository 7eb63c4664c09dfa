"""Labeled / unlabeled partitions: the packaged ST++ / UniMatch lists, and seeded random splits.

The packaged lists live (gzipped) in ``ciscr/data/splits/<source>/<dataset>/...`` (see the
README there). A split is named by its path below that folder, e.g. ``stpp/pascal/1_8/split_1``
or ``unimatch/coco/1_512``; short names (``1_8``, ``92``, ``1_30``) pick ST++ ``split_0`` for
pascal/cityscapes (the lists the CISC-R paper uses) and UniMatch for coco.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ciscr.errors import ConfigError, DataError
from ciscr.utils.misc import parse_number as _parse_number

SPLITS_DIR = Path(__file__).parent / "splits"
DATASETS = ("pascal", "cityscapes", "coco")
# Validation lists per dataset (ST++ and UniMatch ship the same pascal/cityscapes val lists).
VAL_LISTS = {
    "pascal": "stpp/pascal/val.txt.gz",
    "cityscapes": "stpp/cityscapes/val.txt.gz",
    "coco": "unimatch/coco/val.txt.gz",
}
# The whole training pool, for random partitions of a standard dataset (data.labeled).
POOL_LISTS = {
    "pascal": ("unimatch/pascal/train_aug.txt.gz",),
    "cityscapes": (
        "stpp/cityscapes/1_30/split_0/labeled.txt.gz",
        "stpp/cityscapes/1_30/split_0/unlabeled.txt.gz",
    ),
}


def read_packaged(relpath: str) -> str:
    """Text of a packaged gzip list (``relpath`` below ``ciscr/data/splits``)."""
    with gzip.open(SPLITS_DIR / relpath, "rt", encoding="utf-8") as f:
        return f.read()


def available_splits(dataset: str | None = None) -> list[str]:
    """Names of all packaged splits (optionally of one dataset), e.g. ``stpp/pascal/1_8/split_0``.

    Splits whose lists are empty upstream are listed too; :func:`resolve_split` rejects them.
    """
    names = sorted(
        p.parent.relative_to(SPLITS_DIR).as_posix() for p in SPLITS_DIR.rglob("labeled.txt.gz")
    )
    if dataset is not None:
        names = [n for n in names if n.split("/")[1] == dataset]
    return names


def _short_candidates(dataset: str, name: str) -> list[str]:
    if dataset == "coco":
        return [f"unimatch/coco/{name}"]
    # ST++ split_0 first (the paper's lists); ST++'s 1.4k has no split_N; else UniMatch.
    return [
        f"stpp/{dataset}/{name}/split_0",
        f"stpp/{dataset}/{name}",
        f"unimatch/{dataset}/{name}",
    ]


def _split_dir(dataset: str, name: str) -> str:
    """Map a short or full split name to its folder below SPLITS_DIR (ConfigError if unknown)."""
    if dataset not in DATASETS:
        raise ConfigError(
            f"no packaged splits for dataset '{dataset}' (have: {', '.join(DATASETS)})"
        )
    name = name.strip().strip("/")
    if "/" in name:
        parts = name.split("/")
        if len(parts) >= 2 and parts[1] != dataset:
            raise ConfigError(f"data.split '{name}' is a {parts[1]} split, not a {dataset} one")
        # 'stpp/pascal/1_8' (no split_N) means split_0, like the short name.
        candidates = [name, f"{name}/split_0"]
    else:
        candidates = _short_candidates(dataset, name)
    for cand in candidates:
        if (SPLITS_DIR / cand / "labeled.txt.gz").is_file():
            return cand
    raise ConfigError(
        f"data.split '{name}' is not a packaged {dataset} split; available: "
        + ", ".join(available_splits(dataset))
    )


def resolve_split(dataset: str, name: str) -> tuple[str, str | None]:
    """Texts of a packaged split's lists.

    Args:
        dataset: ``pascal`` | ``cityscapes`` | ``coco``.
        name: a short name (``1_8``) or a full one (``stpp/pascal/1_8/split_1``).

    Returns:
        (labeled list text, unlabeled list text or None where none is packaged: COCO).
    """
    folder = _split_dir(dataset, name)
    labeled = read_packaged(f"{folder}/labeled.txt.gz")
    unl_path = SPLITS_DIR / folder / "unlabeled.txt.gz"
    unlabeled = read_packaged(f"{folder}/unlabeled.txt.gz") if unl_path.is_file() else None
    if not labeled.strip() or (unlabeled is not None and not unlabeled.strip()):
        raise ConfigError(
            f"data.split '{folder}' is empty upstream (the original repository ships an empty "
            "list); use split_0 of that protocol"
        )
    return labeled, unlabeled


def check_disjoint(labeled: Sequence[str], unlabeled: Sequence[str], source: str = "") -> None:
    """Raise DataError naming one id that is both labeled and unlabeled."""
    both = set(labeled) & set(unlabeled)
    if both:
        where = f"{source}: " if source else ""
        raise DataError(
            f"{where}image '{min(both)}' is both labeled and unlabeled "
            f"({len(both)} overlapping ids)"
        )


def _ids_from_file(
    path: Path, pool: Sequence[str], no_mask: Mapping[str, str] | None = None
) -> list[str]:
    """Ids named in a list file: exact ids, or file names / paths whose stem is a pool id stem.

    ``no_mask``: images of the pool that have no mask (id -> where it was looked for); naming
    one of them is reported as a missing mask, not as an unknown image.
    """
    no_mask = no_mask or {}
    by_stem: dict[str, str] = {}
    for i in [*pool, *no_mask]:
        by_stem.setdefault(Path(i).name, i)
    known = set(pool) | set(no_mask)
    wanted: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        token = fields[0]
        name = Path(token).name
        found = token if token in known else by_stem.get(name, by_stem.get(Path(name).stem))
        if found is None:
            raise DataError(f"{path}:{lineno}: labeled id '{token}' is not in the training pool")
        if found in no_mask:
            raise DataError(
                f"{path}:{lineno}: labeled id '{token}' has no mask (looked for {no_mask[found]})"
            )
        wanted.append(found)
    if not wanted:
        raise DataError(f"{path}: labeled list is empty")
    return wanted


def _labeled_count(labeled: float | int, n: int) -> int:
    if isinstance(labeled, float):
        if not 0.0 < labeled < 1.0:
            raise ConfigError(f"data.labeled={labeled}: a fraction must lie in (0, 1)")
        # Round half up (not Python's half-to-even), keep >= 1 labeled and >= 1 unlabeled.
        return int(min(max(math.floor(labeled * n + 0.5), 1), max(n - 1, 1)))
    if labeled < 1 or labeled > n:
        raise ConfigError(f"data.labeled={labeled}: the training pool has {n} images")
    return int(labeled)


def partition_ids(
    ids: Sequence[str],
    labeled: float | int | str,
    seed: int,
    no_mask: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Split a pool of image ids into labeled and unlabeled ids.

    Args:
        ids: the training pool (unique ids).
        labeled: a fraction in (0, 1) (rounded, at least 1, at most len-1), a count, a string
            holding either ('0.125', '20', '1/8'), or the path of a file of ids (one per line).
        seed: the draw is a deterministic function of (sorted ids, labeled, seed).
        no_mask: other pool images, which have no mask (id -> where the mask was looked for):
            a list file naming one gets a "has no mask" error.

    Returns:
        (labeled ids, unlabeled ids), both in pool order, disjoint and covering the pool.
    """
    pool = list(ids)
    if len(set(pool)) != len(pool):
        raise DataError("the training pool has duplicate image ids")
    if isinstance(labeled, str):
        num = _parse_number(labeled)
        if num is None:
            path = Path(labeled).expanduser()
            if not path.is_file():
                from ciscr.config import path_hint

                raise ConfigError(f"data.labeled='{labeled}' is neither a fraction, a count nor "
                                  f"a list file{path_hint('data.labeled', labeled)}")
            chosen = set(_ids_from_file(path, pool, no_mask))
            lab = [i for i in pool if i in chosen]
            return lab, [i for i in pool if i not in chosen]
        labeled = num
    if isinstance(labeled, bool) or not isinstance(labeled, (int, float)):
        raise ConfigError(f"data.labeled={labeled!r}: expected a fraction, a count or a file")
    if isinstance(labeled, float) and labeled >= 1.0 and labeled.is_integer():
        labeled = int(labeled)
    if not pool:
        raise DataError("the training pool is empty")
    k = _labeled_count(labeled, len(pool))
    # Draw over the *sorted* ids so the result does not depend on file-system listing order.
    order = sorted(pool)
    perm = np.random.default_rng(seed).permutation(len(order))
    chosen = {order[j] for j in perm[:k]}
    return [i for i in pool if i in chosen], [i for i in pool if i not in chosen]


def labeled_fraction_note(
    labeled_spec: float | int | str | None,
    num_labeled: int,
    num_masked: int,
    pool_size: int,
    default: float,
) -> tuple[str | None, str | None]:
    """(the rule a labeled *fraction* followed, with its numbers; a warning or None).

    A fraction counts only the pool images that have a mask (an image without one can never be
    labeled), which a user with 8 masks in a 40-image pool cannot guess: ``0.5`` gives 4, not 20.
    (None, None) for a count or a list file: those say exactly what they do.
    """
    spec = default if labeled_spec is None else labeled_spec
    value = _parse_number(spec) if isinstance(spec, str) else spec
    if not isinstance(value, float) or isinstance(value, bool) or value >= 1.0:
        return None, None
    shown = f"data.labeled={spec}" + (" (the default)" if labeled_spec is None else "")
    line = (f"labeled: {shown} -> {num_labeled} of the {num_masked} images that have masks "
            f"(round({value:g} x {num_masked}); the pool has {pool_size} images)")
    # Only where some pool images have no mask: there the masks are the user's labels, and a
    # fraction silently leaves some unused. In a fully masked pool (CamVid, the benchmarks) a
    # fraction is the protocol, the other masks only score pseudo labels.
    if num_masked == pool_size or num_labeled >= num_masked:
        return line, None
    warning = (f"warning: {shown} labels {num_labeled} of the {num_masked} images that have "
               f"masks; the other {num_masked - num_labeled} masks only score pseudo labels. "
               f"To train on every mask: data.labeled={num_masked}")
    return line, warning
