"""Data sources: image/mask I/O, the five formats, packaged splits and partitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ciscr.config import DataCfg
from ciscr.data.formats import (
    COCO_CLASSES,
    PASCAL_CLASSES,
    Sample,
    load_dataset,
    read_listed,
)
from ciscr.data.io import (
    default_palette,
    read_classes,
    read_image,
    read_mask,
    read_palette,
    voc_palette,
    write_mask_png,
)
from ciscr.data.partition import (
    available_splits,
    check_disjoint,
    partition_ids,
    resolve_split,
)
from ciscr.errors import ConfigError, DataError

# --------------------------------------------------------------------------- fixture helpers


def _img(path: Path, h: int = 8, w: int = 10, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w, 3), value, dtype=np.uint8)
    arr[0, 0] = (1, 2, 3)
    Image.fromarray(arr).save(path)
    return path


def _mask(path: Path, h: int = 8, w: int = 10, value: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), value, dtype=np.uint8), mode="L").save(path)
    return path


def _folder_tree(root: Path) -> Path:
    """train: a, b, c with masks, d without; val: v1, v2 with masks."""
    for stem in ("a", "b", "c", "d"):
        _img(root / "images" / "train" / f"{stem}.jpg")
        if stem != "d":
            _mask(root / "masks" / "train" / f"{stem}.png")
    for stem in ("v1", "v2"):
        _img(root / "images" / "val" / f"{stem}.png")
        _mask(root / "masks" / "val" / f"{stem}.png")
    (root / "classes.txt").write_text("background\ncat\n\ndog\n")
    (root / "palette.txt").write_text("0 0 0\n10 20 30\n40, 50, 60\n")
    return root


def _voc_tree(root: Path, stems: list[str]) -> Path:
    for s in stems:
        _img(root / "JPEGImages" / f"{s}.jpg")
        _mask(root / "SegmentationClass" / f"{s}.png")
    return root


def _lines(stems: list[str]) -> str:
    return "".join(f"JPEGImages/{s}.jpg SegmentationClass/{s}.png\n" for s in stems)


# --------------------------------------------------------------------------- io


def test_read_image_and_errors(tmp_path):
    arr = read_image(_img(tmp_path / "x.png", 5, 7, 42))
    assert arr.shape == (5, 7, 3) and arr.dtype == np.uint8
    assert arr[1, 1].tolist() == [42, 42, 42] and arr[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(DataError, match=r"missing\.png: cannot read image \(file not found\)"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"junk\.png: cannot read image"):
        read_image(tmp_path / "junk.png")
    data = (tmp_path / "x.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png: cannot read image"):
        read_image(tmp_path / "cut.png")


def test_mask_roundtrip_palette_indices(tmp_path):
    mask = np.array([[0, 1, 2], [255, 20, 1]], dtype=np.uint8)
    write_mask_png(tmp_path / "m.png", mask, voc_palette(21))
    img = Image.open(tmp_path / "m.png")
    assert img.mode == "P"
    # P mode gives the indices (not grey levels of the palette colours)
    assert read_mask(tmp_path / "m.png", 21).tolist() == mask.tolist()
    assert img.getpalette()[3:6] == [128, 0, 0]
    assert img.getpalette()[255 * 3 : 256 * 3] == [224, 224, 192]
    assert not list(tmp_path.glob(".*tmp"))  # temp file renamed away


def test_mask_validation_errors(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png: mask is RGB; expected a single-channel"):
        read_mask(tmp_path / "rgb.png", 3)
    bad = np.array([[0, 1, 7], [9, 255, 2]], dtype=np.uint8)
    Image.fromarray(bad, mode="L").save(tmp_path / "bad.png")
    with pytest.raises(
        DataError, match=r"bad\.png: mask values 7, 9 are not class ids in \[0, 3\)"
    ):
        read_mask(tmp_path / "bad.png", 3)
    assert read_mask(tmp_path / "bad.png", 10).tolist() == bad.tolist()  # 255 = ignore is fine
    with pytest.raises(
        DataError, match=r"bad\.png: mask size \(H, W\)=\(2, 3\) differs .*\(3, 2\)"
    ):
        read_mask(tmp_path / "bad.png", 10, expect_size=(3, 2))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    with pytest.raises(DataError, match=r"corrupt\.png: cannot read mask"):
        read_mask(tmp_path / "corrupt.png", 3)


def test_palette_classes_files(tmp_path):
    assert voc_palette(4).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert len({tuple(c) for c in voc_palette(256).tolist()}) == 256
    # A dataset without palette.txt: class 0 (often "other") is not drawn black.
    assert default_palette(4).tolist() == [[128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert len({tuple(c) for c in default_palette(256).tolist()}) == 256
    (tmp_path / "p.txt").write_text("# colours\n1 2 3\n\n4,5,6\n")
    assert read_palette(tmp_path / "p.txt").tolist() == [[1, 2, 3], [4, 5, 6]]
    (tmp_path / "q.txt").write_text("1 2 3\n1 2 300\n")
    with pytest.raises(DataError, match=r"q\.txt:2: expected 'R G B'"):
        read_palette(tmp_path / "q.txt")
    (tmp_path / "c.txt").write_text("bg\ncat\ncat\n")
    with pytest.raises(DataError, match="'cat' appears more than once"):
        read_classes(tmp_path / "c.txt")


# --------------------------------------------------------------------------- folder format


def test_folder_format(tmp_path):
    root = _folder_tree(tmp_path / "ds")
    cfg = DataCfg(format="folder", root=str(root), labeled=2)
    info, lab, unl, val = load_dataset(cfg, seed=0)
    assert info.name == "ds" and info.num_classes == 3
    assert info.class_names == ("background", "cat", "dog") and info.background_class == 0
    assert info.palette == ((0, 0, 0), (10, 20, 30), (40, 50, 60))
    assert len(lab) == 2 and all(s.mask is not None for s in lab)
    assert {s.id for s in lab} | {s.id for s in unl} == {"a", "b", "c", "d"}
    assert "d" in {s.id for s in unl}  # no mask: can only be unlabeled
    assert [s.id for s in val] == ["v1", "v2"]
    assert val[0] == Sample("v1", root / "images/val/v1.png", root / "masks/val/v1.png")
    # the same seed gives the same draw
    assert [s.id for s in load_dataset(cfg, seed=0)[1]] == [s.id for s in lab]
    _, _, _, val1 = load_dataset(cfg.model_copy(update={"max_val_images": 1}), seed=0)
    assert [s.id for s in val1] == ["v1"]


def test_folder_order_file_and_errors(tmp_path):
    root = _folder_tree(tmp_path / "ds")
    (root / "train.txt").write_text("images/train/c.png masks/train/c.png\nb\n")
    cfg = DataCfg(format="folder", root=str(root), labeled=0.5)
    _, lab, unl, _ = load_dataset(cfg, seed=3)
    assert sorted(s.id for s in lab + unl) == ["b", "c"] and len(lab) == 1
    (root / "train.txt").write_text("b\nzzz\n")
    with pytest.raises(DataError, match=r"train\.txt:2: no image 'zzz'"):
        load_dataset(cfg, seed=0)
    (root / "train.txt").write_text("b\n/abs/c.png\n")
    with pytest.raises(DataError, match=r"train\.txt:2: path '/abs/c.png' is absolute"):
        load_dataset(cfg, seed=0)
    (root / "train.txt").unlink()
    (root / "masks/val/v2.png").unlink()
    with pytest.raises(DataError, match=r"v2\.png: validation image has no mask"):
        load_dataset(cfg, seed=0)
    with pytest.raises(ConfigError, match="data.split is for the packaged"):
        load_dataset(cfg.model_copy(update={"split": "1_8"}), seed=0)
    with pytest.raises(DataError, match=r"classes\.txt: not found"):
        load_dataset(cfg.model_copy(update={"root": str(tmp_path)}), seed=0)


def test_folder_stem_collision_uses_relpaths(tmp_path):
    root = _folder_tree(tmp_path / "ds")
    _img(root / "images/val/a.png")
    _mask(root / "masks/val/a.png")
    _, lab, unl, val = load_dataset(DataCfg(format="folder", root=str(root), labeled=1), 0)
    assert sorted(s.id for s in lab + unl) == ["train/a", "train/b", "train/c", "train/d"]
    assert [s.id for s in val] == ["val/a", "val/v1", "val/v2"]


# --------------------------------------------------------------------------- list formats


def test_voc_lists(tmp_path):
    root = _voc_tree(tmp_path, ["l1", "l2", "u1", "u2", "v1"])
    (root / "SegmentationClass/u2.png").unlink()  # unlabeled masks are optional
    cfg = DataCfg(format="voc", root=str(root))
    src = read_listed(cfg, root, (_lines(["l1", "l2"]), _lines(["u1", "u2"]), _lines(["v1"])))
    assert src.info.num_classes == 21 and src.info.background_class == 0
    assert src.info.class_names[15] == "person" and src.info.palette[1] == (128, 0, 0)
    assert [s.id for s in src.pool] == ["l1", "l2", "u1", "u2"]
    assert src.labeled_ids == ["l1", "l2"]
    assert src.pool[2].mask == root / "SegmentationClass/u1.png" and src.pool[3].mask is None
    assert src.val[0].image == root / "JPEGImages/v1.jpg"
    assert len(PASCAL_CLASSES) == 21 and len(COCO_CLASSES) == 81


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/etc/passwd SegmentationClass/l1.png", r"lab\.txt:2: path '/etc/passwd' is absolute"),
        ("JPEGImages/../../x.jpg SegmentationClass/l1.png", r"lab\.txt:2: .* leaves the dataset"),
        ("JPEGImages/nope.jpg SegmentationClass/l1.png", r"lab\.txt:2: .*nope\.jpg does not exist"),
        ("JPEGImages/l2.jpg SegmentationClass/gone.png", r"lab\.txt:2: .*gone\.png does not exist"),
        ("JPEGImages/l2.jpg", r"lab\.txt:2: expected '<image path> <mask path>'"),
    ],
)
def test_list_line_errors(tmp_path, line, message):
    root = _voc_tree(tmp_path, ["l1", "l2", "v1"])
    cfg = DataCfg(format="voc", root=str(root))
    lists = (_lines(["l1"]) + line + "\n", None, _lines(["v1"]))
    with pytest.raises(DataError, match=message):
        read_listed(cfg, root, lists, ("lab.txt", "unl.txt", "val.txt"), pool_dir="JPEGImages")


def test_overlapping_lists_rejected(tmp_path):
    root = _voc_tree(tmp_path, ["l1", "u1", "v1"])
    cfg = DataCfg(format="voc", root=str(root))
    lists = (_lines(["l1"]), _lines(["u1", "l1"]), _lines(["v1"]))
    with pytest.raises(DataError, match="'JPEGImages/l1.jpg' is both labeled and unlabeled"):
        read_listed(cfg, root, lists)
    lists = (_lines(["l1", "l1"]), _lines(["u1"]), _lines(["v1"]))
    with pytest.raises(DataError, match="'JPEGImages/l1' is listed more than once"):
        read_listed(cfg, root, lists)
    with pytest.raises(DataError, match="image 'l1' is both labeled and unlabeled"):
        check_disjoint(["l1", "x"], ["l1", "y"])


def test_cityscapes_lists(tmp_path):
    rel = []
    for split, city, stem in [("train", "aachen", "aachen_0_1"), ("val", "bonn", "bonn_0_2")]:
        img = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
        msk = f"gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png"
        _img(tmp_path / img)
        _mask(tmp_path / msk)
        rel.append(f"{img} {msk}\n")
    cfg = DataCfg(format="cityscapes", root=str(tmp_path))
    src = read_listed(cfg, tmp_path, (rel[0], "", rel[1]))
    assert src.info.num_classes == 19 and src.info.background_class is None
    assert src.info.class_names[0] == "road" and src.info.palette[0] == (128, 64, 128)
    assert [s.id for s in src.pool] == ["aachen_0_1_leftImg8bit"]
    assert src.val[0].mask.name == "bonn_0_2_gtFine_labelTrainIds.png"


def test_coco_unlabeled_is_rest_of_train2017(tmp_path):
    for s in ("001", "002", "003"):
        _img(tmp_path / "train2017" / f"{s}.jpg")
        if s != "003":
            _mask(tmp_path / "masks" / f"{s}.png")
    _img(tmp_path / "val2017/009.jpg")
    _mask(tmp_path / "masks/009.png")
    cfg = DataCfg(format="coco", root=str(tmp_path))
    lab = "train2017/002.jpg masks/002.png\n"
    src = read_listed(cfg, tmp_path, (lab, None, "val2017/009.jpg masks/009.png\n"))
    assert src.info.num_classes == 81 and src.info.class_names[1] == "person"
    assert [s.id for s in src.pool] == ["002", "001", "003"] and src.labeled_ids == ["002"]
    assert src.pool[1].mask == tmp_path / "masks/001.png" and src.pool[2].mask is None


def test_standard_format_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.root must be set"):
        load_dataset(DataCfg(format="voc"), 0)
    with pytest.raises(ConfigError, match="needs data.split"):
        load_dataset(DataCfg(format="voc", root=str(tmp_path)), 0)
    with pytest.raises(ConfigError, match="not both"):
        load_dataset(DataCfg(format="voc", root=str(tmp_path), split="1_8", labeled=10), 0)
    # a packaged split over an empty root: the first missing file of the labeled list
    with pytest.raises(DataError, match=r"<split 1_8: labeled>:1: .*2009_000898\.jpg does not"):
        load_dataset(DataCfg(format="voc", root=str(tmp_path), split="1_8"), 0)


# --------------------------------------------------------------------------- packaged splits


def _count(text: str | None) -> int:
    return len([ln for ln in (text or "").splitlines() if ln.strip()])


def test_resolve_packaged_splits():
    lab, unl = resolve_split("pascal", "1_8")
    assert _count(lab) == 1323 and _count(unl) == 10582 - 1323
    assert lab.startswith("JPEGImages/2009_000898.jpg SegmentationClass/2009_000898.png")
    assert resolve_split("pascal", "stpp/pascal/1_8/split_0") == (lab, unl)
    assert resolve_split("pascal", "stpp/pascal/1_8")[0] == lab
    assert resolve_split("pascal", "stpp/pascal/1_8/split_1")[0] != lab
    assert _count(resolve_split("pascal", "unimatch/pascal/1_4")[0]) == 2646
    assert _count(resolve_split("pascal", "1.4k")[0]) == 1464
    lab_c, unl_c = resolve_split("cityscapes", "1_30")
    assert _count(lab_c) == 100 and _count(unl_c) == 2875
    lab_coco, unl_coco = resolve_split("coco", "1_512")
    assert _count(lab_coco) == 232 and unl_coco is None
    assert "stpp/pascal/1_8/split_0" in available_splits()
    assert all(n.split("/")[1] == "coco" for n in available_splits("coco"))


def test_resolve_split_errors():
    with pytest.raises(
        ConfigError, match=r"'1_9' is not a packaged pascal split; available: .*1_8"
    ):
        resolve_split("pascal", "1_9")
    with pytest.raises(ConfigError, match="empty upstream"):
        resolve_split("pascal", "stpp/pascal/732/split_1")
    with pytest.raises(ConfigError, match="is a cityscapes split, not a pascal one"):
        resolve_split("pascal", "stpp/cityscapes/1_30/split_0")


# --------------------------------------------------------------------------- partitions


def test_partition_fraction_count_rounding():
    ids = [f"i{k:02d}" for k in range(10)]
    for spec, n in [(0.25, 3), (0.01, 1), (0.99, 9), (4, 4), ("1/8", 1), ("0.5", 5), ("10", 10)]:
        lab, unl = partition_ids(ids, spec, seed=1)
        assert len(lab) == n, spec
        assert set(lab).isdisjoint(unl) and sorted(lab + unl) == ids
        assert lab == [i for i in ids if i in set(lab)]  # pool order kept
    with pytest.raises(ConfigError, match="the training pool has 10 images"):
        partition_ids(ids, 11, seed=0)
    with pytest.raises(ConfigError, match="neither a fraction, a count nor a list file"):
        partition_ids(ids, "no_such_file.txt", seed=0)


def test_partition_deterministic_and_order_free():
    ids = [f"img{k}" for k in range(100)]
    a = partition_ids(ids, 0.5, seed=7)
    assert a == partition_ids(ids, 0.5, seed=7)
    assert a[0] != partition_ids(ids, 0.5, seed=8)[0]
    # listing order does not change which ids are drawn
    assert set(partition_ids(ids[::-1], 0.5, seed=7)[0]) == set(a[0])


def test_partition_list_file(tmp_path):
    ids = ["a", "b", "train/c", "d"]
    (tmp_path / "lab.txt").write_text("b\n\nimages/train/c.png\n")
    lab, unl = partition_ids(ids, str(tmp_path / "lab.txt"), seed=0)
    assert lab == ["b", "train/c"] and unl == ["a", "d"]
    (tmp_path / "lab.txt").write_text("b\nzz\n")
    with pytest.raises(DataError, match=r"lab\.txt:2: labeled id 'zz' is not in the training pool"):
        partition_ids(ids, str(tmp_path / "lab.txt"), seed=0)


def test_a_labeled_id_without_mask_says_so_and_where_it_looked(tmp_path):
    root = _folder_tree(tmp_path / "data")  # d.jpg has no mask
    (tmp_path / "ids.txt").write_text("a\nd\n")
    cfg = DataCfg(format="folder", root=str(root), labeled=str(tmp_path / "ids.txt"))
    expected = root / "masks" / "train" / "d.png"
    with pytest.raises(DataError) as info:
        load_dataset(cfg, seed=0)
    assert str(info.value) == (
        f"{tmp_path / 'ids.txt'}:2: labeled id 'd' has no mask (looked for {expected})"
    )
    (tmp_path / "ids.txt").write_text("a\nzz\n")  # a real typo is still "not in the pool"
    with pytest.raises(DataError, match="labeled id 'zz' is not in the training pool"):
        load_dataset(cfg, seed=0)


def test_a_folder_dataset_without_palette_draws_class_0_visibly(tmp_path):
    root = _folder_tree(tmp_path / "data")
    (root / "palette.txt").unlink()
    info, *_ = load_dataset(DataCfg(format="folder", root=str(root), labeled=2), seed=0)
    assert info.palette[0] != (0, 0, 0)
    assert info.palette == tuple(tuple(int(v) for v in c) for c in default_palette(3))
