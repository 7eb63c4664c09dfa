"""Dataset formats -> sample lists: which files make up the training pool and the val set.

Formats (``data.format``):

- ``folder``: ``root/images/<split>/*.{png,jpg,...}``, ``root/masks/<split>/<stem>.png``,
  ``root/classes.txt`` (one name per line), optional ``root/palette.txt`` (``R G B`` per line)
  and optional ``root/<split>.txt`` (one stem or file name per line: restricts and orders).
- ``voc``: UniMatch/ST++ layout (``JPEGImages/``, ``SegmentationClass/`` incl. SBD masks).
- ``cityscapes``: ``leftImg8bit/``, ``gtFine/*_labelTrainIds.png``.
- ``coco``: UniMatch layout ``train2017/``, ``val2017/``, ``masks/``.
- ``synthetic``: generated on first use (:mod:`ciscr.data.synthetic`), then read as ``folder``.

The one entry point is :func:`load_dataset`; it also applies the labeled/unlabeled partition.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ciscr.config import DataCfg, path_hint
from ciscr.data.io import default_palette, read_classes, read_palette, voc_palette
from ciscr.data.partition import (
    POOL_LISTS,
    VAL_LISTS,
    check_disjoint,
    partition_ids,
    read_packaged,
    resolve_split,
)
from ciscr.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_LABELED_FRACTION = 0.125
# The synthetic data set is the same for every run seed (like a real benchmark): the run seed
# only changes the labeled/unlabeled draw and the training randomness.
SYNTHETIC_DATA_SEED = 0

PASCAL_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
COCO_CLASSES = ("background",) + (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# format -> (name of its packaged lists, class names, palette or None = VOC colour map, bg)
STANDARD = {
    # VOC and COCO masks are drawn with the VOC colour map (background black) by convention.
    "voc": ("pascal", PASCAL_CLASSES, voc_palette(len(PASCAL_CLASSES)), 0),
    "cityscapes": ("cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, None),
    "coco": ("coco", COCO_CLASSES, voc_palette(len(COCO_CLASSES)), 0),
}


@dataclass(frozen=True)
class Sample:
    """One image; ``mask`` is None for pool images without ground truth (unlabeled only)."""

    id: str
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about the classes."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # (K, 3) RGB, for palette PNGs and overlays
    background_class: int | None  # never picked for rectification; None = every class


@dataclass
class _Source:
    """A format reader's result: the pool, val, and a packaged labeled list if there is one."""

    info: DatasetInfo
    pool: list[Sample]
    val: list[Sample]
    labeled_ids: list[str] | None = None  # None: partition the pool with data.labeled


# --------------------------------------------------------------------------- shared helpers


def _info(
    name: str,
    classes: tuple[str, ...],
    palette: Sequence[Sequence[int]] | np.ndarray | None,
    background: int | None,
    cfg: DataCfg,
) -> DatasetInfo:
    k = len(classes)
    pal = default_palette(k) if palette is None else palette
    bg = cfg.background_class if cfg.background_class is not None else background
    if bg is not None and not 0 <= bg < k:
        raise ConfigError(f"data.background_class={bg} but the dataset has {k} classes")
    if len(pal) < k:
        raise DataError(f"{name}: palette has {len(pal)} colours for {k} classes")
    colours = tuple((int(r), int(g), int(b)) for r, g, b in list(pal)[:k])
    return DatasetInfo(name, k, tuple(classes), colours, bg)


def _root(cfg: DataCfg) -> Path:
    if not cfg.root:
        raise ConfigError(f"data.root must be set for data.format={cfg.format}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a directory{path_hint('data.root', cfg.root)}")
    return root


def _safe_relpath(text: str, where: str) -> str:
    """Normalise a list entry; refuse absolute paths and paths leaving the dataset root."""
    if text.startswith(("/", "\\")) or (len(text) > 1 and text[1] == ":"):
        raise DataError(f"{where}: path '{text}' is absolute; list paths are relative to data.root")
    norm = posixpath.normpath(text.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise DataError(f"{where}: path '{text}' leaves the dataset root")
    return norm


def parse_list(
    text: str, root: Path, source: str, need_mask: bool
) -> list[tuple[Path, Path | None]]:
    """Parse ``<image relpath> [<mask relpath>]`` lines and check that the files exist.

    Args:
        text: the list's content; ``source`` names it in errors (``<source>:<line>: ...``).
        need_mask: labeled/val lists need the mask file; for unlabeled lists a missing mask is
            allowed (mask None: it would only be used to score pseudo labels).

    Returns:
        (image path, mask path or None) per line, in list order.
    """
    out: list[tuple[Path, Path | None]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{source}:{lineno}"
        if len(fields) > 2 or (need_mask and len(fields) != 2):
            raise DataError(f"{where}: expected '<image path> <mask path>', got {line.strip()!r}")
        image = root / _safe_relpath(fields[0], where)
        if not image.is_file():
            raise DataError(f"{where}: {image} does not exist")
        mask = root / _safe_relpath(fields[1], where) if len(fields) == 2 else None
        if mask is not None and not mask.is_file():
            if need_mask:
                raise DataError(f"{where}: {mask} does not exist")
            mask = None
        out.append((image, mask))
    return out


def _assign_ids(groups: list[list[tuple[Path, Path | None]]], root: Path) -> list[list[Sample]]:
    """Ids are file stems; if two images share a stem, every id becomes its relpath sans suffix."""
    stems = [img.stem for group in groups for img, _ in group]
    unique = len(set(stems)) == len(stems)

    def ident(img: Path) -> str:
        if unique:
            return img.stem
        rel = img.relative_to(root).as_posix() if img.is_relative_to(root) else img.as_posix()
        return rel.rsplit(".", 1)[0]

    out = [[Sample(ident(img), img, mask) for img, mask in group] for group in groups]
    ids = [s.id for group in out for s in group]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{root}: image '{dup}' is listed more than once")
    return out


# --------------------------------------------------------------------------- folder format


def _folder_split(root: Path, split: str, what: str) -> list[tuple[Path, Path | None]]:
    """Images of ``root/images/<split>`` (ordered by ``root/<split>.txt`` if present)."""
    img_dir = root / "images" / split
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: {what} image folder not found (data.{what}_split={split!r})")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    by_stem: dict[str, Path] = {}
    for p in images:
        if p.stem in by_stem:
            raise DataError(f"{img_dir}: two images share the name '{p.stem}' ({p.name})")
        by_stem[p.stem] = p
    order_file = root / f"{split}.txt"
    if order_file.is_file():
        images = []
        for lineno, line in enumerate(order_file.read_text().splitlines(), start=1):
            if not line.split():
                continue
            # Only the stem is used, but an entry leaving the root is a mistake worth naming.
            stem = Path(_safe_relpath(line.split()[0], f"{order_file}:{lineno}")).stem
            if stem not in by_stem:
                raise DataError(f"{order_file}:{lineno}: no image '{stem}' in {img_dir}")
            images.append(by_stem[stem])
    if not images:
        raise DataError(f"{img_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    mask_dir = root / "masks" / split
    out = []
    for p in images:
        mask = mask_dir / f"{p.stem}.png"
        out.append((p, mask if mask.is_file() else None))
    return out


def _read_folder(cfg: DataCfg, root: Path, name: str | None = None) -> _Source:
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise DataError(f"{classes_file}: not found (a folder dataset lists its classes there)")
    classes = tuple(read_classes(classes_file))
    pal_file = root / "palette.txt"
    palette = read_palette(pal_file) if pal_file.is_file() else None
    if palette is not None and len(palette) < len(classes):
        raise DataError(f"{pal_file}: {len(palette)} colours for {len(classes)} classes")
    is_bg = classes[0].lower() in ("background", "_background_", "bg")
    info = _info(name or root.name, classes, palette, 0 if is_bg else None, cfg)
    pool = _folder_split(root, cfg.train_split, "train")
    val = _folder_split(root, cfg.val_split, "val")
    for img, mask in val:
        if mask is None:
            raise DataError(
                f"{img}: validation image has no mask "
                f"(expected {root / 'masks' / cfg.val_split / (img.stem + '.png')})"
            )
    pool_s, val_s = _assign_ids([pool, val], root / "images")
    return _Source(info, pool_s, val_s)


# --------------------------------------------------------------------------- list formats


def read_listed(
    cfg: DataCfg,
    root: Path,
    lists: tuple[str, str | None, str],
    names: tuple[str, str, str] = ("labeled list", "unlabeled list", "val list"),
    pool_dir: str | None = None,
) -> _Source:
    """A voc/cityscapes/coco dataset from list texts (labeled, unlabeled or None, val).

    With ``unlabeled`` None the unlabeled images are every image of ``root/<pool_dir>`` not in the
    labeled list (COCO: the UniMatch unlabeled lists are not available); their mask is
    ``root/masks/<stem>.png`` where it exists. Tests call this with tiny hand-made lists.
    """
    dataset, classes, palette, bg = STANDARD[cfg.format]
    info = _info(dataset, classes, palette, bg, cfg)
    labeled = parse_list(lists[0], root, names[0], need_mask=True)
    if lists[1] is not None:
        unlabeled = parse_list(lists[1], root, names[1], need_mask=False)
    else:
        unlabeled = _unlisted(root, pool_dir or "train2017", labeled)
    val = parse_list(lists[2], root, names[2], need_mask=True)
    rel = [[img.relative_to(root).as_posix() for img, _ in group] for group in (labeled, unlabeled)]
    check_disjoint(rel[0], rel[1], f"{names[0]} / {names[1]}")
    lab_s, unl_s, val_s = _assign_ids([labeled, unlabeled, val], root)
    return _Source(info, lab_s + unl_s, val_s, [s.id for s in lab_s])


def _unlisted(
    root: Path, pool_dir: str, labeled: list[tuple[Path, Path | None]]
) -> list[tuple[Path, Path | None]]:
    folder = root / pool_dir
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found (needed for the unlabeled pool)")
    taken = {img.name for img, _ in labeled}
    out: list[tuple[Path, Path | None]] = []
    for img in sorted(folder.iterdir()):
        if img.suffix.lower() in IMAGE_EXTENSIONS and img.name not in taken:
            mask = root / "masks" / f"{img.stem}.png"
            out.append((img, mask if mask.is_file() else None))
    return out


def _read_standard(cfg: DataCfg, root: Path) -> _Source:
    dataset = STANDARD[cfg.format][0]
    val_text = read_packaged(VAL_LISTS[dataset])
    val_name = f"<packaged {VAL_LISTS[dataset]}>"
    if cfg.split and cfg.labeled is not None:
        raise ConfigError("set data.split (a packaged list) or data.labeled, not both")
    if cfg.split:
        lab, unl = resolve_split(dataset, cfg.split)
        names = (f"<split {cfg.split}: labeled>", f"<split {cfg.split}: unlabeled>", val_name)
        return read_listed(cfg, root, (lab, unl, val_text), names)
    if cfg.labeled is None:
        raise ConfigError(
            f"data.format={cfg.format} needs data.split (e.g. '1_8'; see `ciscr info`) "
            "or data.labeled (a fraction, count or list file)"
        )
    # A seeded random partition of the whole training pool.
    if dataset == "coco":
        src = read_listed(cfg, root, ("", None, val_text), ("", "", val_name))
    else:
        pool = "".join(read_packaged(p).rstrip("\n") + "\n" for p in POOL_LISTS[dataset])
        names = (f"<packaged {dataset} pool>", "", val_name)
        src = read_listed(cfg, root, ("", pool, val_text), names)
    src.labeled_ids = None
    return src


# --------------------------------------------------------------------------- entry points


def _read_source(cfg: DataCfg) -> _Source:
    if cfg.format in STANDARD:
        return _read_standard(cfg, _root(cfg))
    if cfg.split:
        raise ConfigError(
            f"data.split is for the packaged voc/cityscapes/coco lists; with "
            f"data.format={cfg.format} use data.labeled (fraction, count or list file)"
        )
    if cfg.format == "folder":
        return _read_folder(cfg, _root(cfg))
    if cfg.format == "synthetic":
        from ciscr.data.synthetic import make_synthetic  # generator only needed here

        cache = Path(cfg.root or "~/.cache/ciscr").expanduser()
        root = make_synthetic(cache, cfg.synthetic, SYNTHETIC_DATA_SEED)
        folder_cfg = cfg.model_copy(update={"train_split": "train", "val_split": "val"})
        return _read_folder(folder_cfg, root, name="synthetic")
    raise ConfigError(f"data.format={cfg.format!r} is not supported")


def _expected_mask(cfg: DataCfg, sample: Sample) -> str:
    """Where the mask of a pool image without one was looked for (for error messages)."""
    if cfg.format in ("folder", "synthetic"):
        img = sample.image  # root/images/<split>/<name> -> root/masks/<split>/<stem>.png
        return str(img.parents[2] / "masks" / img.parent.name / f"{img.stem}.png")
    if cfg.format == "coco":
        return str(_root(cfg) / "masks" / f"{sample.image.stem}.png")
    return f"a mask path on its line of the {cfg.format} pool list"


def load_dataset(
    cfg: DataCfg, seed: int
) -> tuple[DatasetInfo, list[Sample], list[Sample], list[Sample]]:
    """Read a dataset and split its pool into labeled and unlabeled samples.

    Args:
        cfg: the ``data`` section.
        seed: seeds the random labeled draw (folder/synthetic or data.labeled); packaged splits
            (data.split) do not depend on it.

    Returns:
        (info, labeled, unlabeled, val). Every labeled and val sample has a mask; unlabeled ones
        may have one (used only to score pseudo labels). ``data.max_val_images`` is applied.
    """
    src = _read_source(cfg)
    if src.labeled_ids is None:
        with_mask = [s.id for s in src.pool if s.mask is not None]
        if not with_mask:
            raise DataError(f"{cfg.root or src.info.name}: no training image has a mask")
        spec = cfg.labeled if cfg.labeled is not None else DEFAULT_LABELED_FRACTION
        no_mask = {s.id: _expected_mask(cfg, s) for s in src.pool if s.mask is None}
        lab_ids, _ = partition_ids(with_mask, spec, seed, no_mask)
    else:
        lab_ids = src.labeled_ids
    chosen = set(lab_ids)
    labeled = [s for s in src.pool if s.id in chosen]
    unlabeled = [s for s in src.pool if s.id not in chosen]
    check_disjoint([s.id for s in labeled], [s.id for s in unlabeled])
    val = src.val[: cfg.max_val_images] if cfg.max_val_images else src.val
    return src.info, labeled, unlabeled, val


def list_samples(cfg: DataCfg, subset: str, seed: int = 0) -> list[Sample]:
    """One subset (``labeled`` | ``unlabeled`` | ``val``) of :func:`load_dataset`."""
    _, labeled, unlabeled, val = load_dataset(cfg, seed)
    subsets = {"labeled": labeled, "unlabeled": unlabeled, "val": val}
    if subset not in subsets:
        raise ValueError(f"subset must be one of {sorted(subsets)}, got {subset!r}")
    return subsets[subset]
