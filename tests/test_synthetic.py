"""The procedural dataset: determinism, caching, class coverage, folder-format output."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from ciscr.config import DataCfg, SyntheticCfg
from ciscr.data import synthetic
from ciscr.data.formats import load_dataset
from ciscr.data.io import read_image, read_mask
from ciscr.data.synthetic import class_names, make_synthetic, render_scene
from ciscr.errors import DataError

SMALL = SyntheticCfg(num_train=6, num_val=2, size=40, num_classes=5)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_identical_bytes_other_seed_different(tmp_path):
    a = make_synthetic(tmp_path / "a", SMALL, seed=3)
    b = make_synthetic(tmp_path / "b", SMALL, seed=3)
    c = make_synthetic(tmp_path / "c", SMALL, seed=4)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert a.name == b.name != c.name and a.name.startswith("synthetic-")
    assert len(fa) == 6 + 2 + 6 + 2 + 3  # images, masks, classes/palette/manifest
    assert fa == fb
    assert fa["images/train/train_00000.png"] != fc["images/train/train_00000.png"]
    assert fa["classes.txt"] == b"background\ndisc\nsquare\ntriangle\nring\n"
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]


def test_existing_dataset_is_reused(tmp_path, monkeypatch):
    first = make_synthetic(tmp_path, SMALL, seed=0)

    def boom(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(synthetic, "_generate", boom)
    assert make_synthetic(tmp_path, SMALL, seed=0) == first
    (first / "manifest.json").unlink()  # an incomplete folder is never trusted
    with pytest.raises(DataError, match="incomplete synthetic dataset"):
        make_synthetic(tmp_path, SMALL, seed=0)


def test_scene_content_classes_and_void():
    k = 6
    masks, images = [], []
    for i in range(60):
        img, mask = render_scene(np.random.default_rng([0, 0, i]), 48, k)
        images.append(img)
        masks.append(mask)
    assert images[0].shape == (48, 48, 3) and images[0].dtype == np.uint8
    counts = np.bincount(np.stack(masks).ravel(), minlength=256)
    assert set(np.flatnonzero(counts)) == set(range(k)) | {255}  # every class, void, nothing else
    frac = counts / counts.sum()
    assert 0.5 < frac[0] < 0.95  # background dominates but objects are substantial
    assert 0.002 < frac[255] < 0.03  # about 1% void edges
    assert all(len(np.unique(m)) >= 2 for m in masks)  # every scene has an object
    # object colours overlap across classes: the mean colour alone does not separate classes
    assert np.std([im.reshape(-1, 3).mean(0) for im in images], axis=0).min() > 10


def test_class_names_distinct_up_to_20():
    names = class_names(20)
    assert names[:4] == ["background", "disc", "square", "triangle"]
    assert len(set(names)) == 20 and names[13] == "disc-checker"


def test_load_synthetic_as_folder_dataset(tmp_path):
    small16 = SMALL.model_copy(update={"num_train": 16})
    cfg = DataCfg(format="synthetic", root=str(tmp_path), synthetic=small16)
    info, lab, unl, val = load_dataset(cfg, seed=0)
    assert info.name == "synthetic" and info.num_classes == 5 and info.background_class == 0
    assert info.class_names[1] == "disc" and info.palette[1] == (128, 0, 0)
    assert len(lab) == 2 and len(unl) == 14 and len(val) == 2  # default labeled = 1/8
    assert lab[0].id.startswith("train_") and val[0].id == "val_00000"
    mask = read_mask(lab[0].mask, info.num_classes, expect_size=(40, 40))
    assert read_image(lab[0].image).shape == (40, 40, 3) and mask.max() <= 255
    assert Image.open(lab[0].mask).mode == "P"
    # another run seed: the same images (cached), another labeled draw
    other = load_dataset(cfg, seed=1)
    assert [s.image for s in other[3]] == [s.image for s in val]
    assert {s.id for s in other[1]} != {s.id for s in lab}


def test_generation_is_fast(tmp_path):
    cfg = SyntheticCfg(num_train=80, num_val=20, size=96, num_classes=6)
    t = time.perf_counter()
    make_synthetic(tmp_path, cfg, seed=0)
    # 100 images; the real target is 300 in < 5 s, keep slack for a loaded test machine
    assert time.perf_counter() - t < 4.0
