"""Tests of ciscr.pseudo with a tiny fake teacher whose prediction is the nearest class colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import ciscr.pseudo as pseudo
from ciscr.data.formats import Sample
from ciscr.errors import DataError
from ciscr.models import SegOutput

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # normalised image = RGB / 255
COLOURS = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]  # class 0 black, 1 red, 2 green
PALETTE = [(10, 20, 30), (40, 50, 60), (70, 80, 90)]


class NearestColour(nn.Module):
    """logits_k = -20 * ||pixel - colour_k||^2 (a per-pixel rule: flips commute with it);
    features = 4x4 average pooling of the image (non-negative, stride 4)."""

    def __init__(self, colours=COLOURS) -> None:
        super().__init__()
        self.register_buffer("colours", torch.tensor(colours, dtype=torch.float32) / 255)

    def forward(self, x: torch.Tensor) -> SegOutput:
        d = (x.unsqueeze(1) - self.colours[None, :, :, None, None]).pow(2).sum(2)
        return SegOutput(-20 * d, F.avg_pool2d(x.clamp_min(0), 4, ceil_mode=True))


def write_image(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def uniform(path: Path, colour, size=(8, 8)) -> Path:
    return write_image(path, np.broadcast_to(np.array(colour), (*size, 3)).copy())


def write_mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)
    return path


def run(model, samples, out, **kw):
    kw = {"num_classes": 3, "mean": MEAN, "std": STD, "palette": PALETTE, "progress": False, **kw}
    return pseudo.pseudo_label(model, samples, out, **kw)


def test_one_palette_png_per_unlabeled_id(tmp_path):
    samples = [
        Sample("a", uniform(tmp_path / "img/a.png", COLOURS[1]), None),
        Sample("b", uniform(tmp_path / "img/b.png", COLOURS[2], (12, 8)), None),
        Sample("sub/c", uniform(tmp_path / "img/c.png", (20, 10, 5)), None),  # near black
    ]
    model = NearestColour().train()
    out = tmp_path / "pseudo0"
    res = run(model, samples, out)  # full default TTA: 5 scales x flip, exact on flat images
    assert res == {"num_images": 3, "num_scored": 0, "miou": None}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "a.png",
        "b.png",
        "sub/c.png",
    ]
    for sid, cls, shape in [("a", 1, (8, 8)), ("b", 2, (12, 8)), ("sub/c", 0, (8, 8))]:
        img = Image.open(out / f"{sid}.png")
        assert img.mode == "P"
        assert np.array_equal(np.asarray(img), np.full(shape, cls, np.uint8))
        assert img.getpalette()[:9] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert model.training  # the caller's mode is restored
    assert not (tmp_path / ".pseudo0.tmp").exists()


def test_quality_against_ground_truth_by_hand(tmp_path):
    # Left half red -> predicted 1, right half black -> predicted 0.
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = COLOURS[1]
    gt = np.ones((8, 8), np.uint8)
    gt[:4, 4:] = 0  # top-right: correct
    gt[4:, 4:] = 2  # bottom-right: predicted 0, truly 2
    gt[0, 0] = 255  # ignored pixel: not counted
    samples = [
        Sample("x", write_image(tmp_path / "x.png", rgb), write_mask(tmp_path / "x_gt.png", gt)),
        Sample("y", uniform(tmp_path / "y.png", COLOURS[2]), None),  # no gt: not scored
    ]
    res = run(NearestColour(), samples, tmp_path / "out", scales=(1.0,), flip=True)
    # class 0: tp 16, pred 32, gt 16 -> 16/32; class 1: 31/31; class 2: 0/16. mIoU = 0.5.
    assert res["num_images"] == 2 and res["num_scored"] == 1
    assert res["iou"] == pytest.approx([0.5, 1.0, 0.0])
    assert res["miou"] == pytest.approx(0.5)
    assert res["num_pixels"] == 63
    written = np.asarray(Image.open(tmp_path / "out/x.png"))
    assert (written[:, :4] == 1).all() and (written[:, 4:] == 0).all()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    samples = [Sample(s, uniform(tmp_path / f"{s}.png", COLOURS[1]), None) for s in "abc"]
    real, calls = pseudo.save_mask_png, []

    def flaky(path, mask, palette):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("killed")
        real(path, mask, palette)

    monkeypatch.setattr(pseudo, "save_mask_png", flaky)
    out = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="killed"):
        run(NearestColour(), samples, out, scales=(1.0,), flip=False)
    assert not out.exists() and not (tmp_path / ".fresh.tmp").exists()

    # An existing set survives a failed rebuild untouched.
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.png").write_bytes(b"old")
    calls.clear()
    with pytest.raises(RuntimeError):
        run(NearestColour(), samples, old, scales=(1.0,), flip=False)
    assert [p.name for p in old.iterdir()] == ["keep.png"]


def test_duplicate_ids_refused(tmp_path):
    img = uniform(tmp_path / "a.png", COLOURS[1])
    with pytest.raises(DataError, match="twice"):
        run(NearestColour(), [Sample("a", img, None), Sample("a", img, None)], tmp_path / "o")


def test_predict_dataset_is_lazy_and_ordered(tmp_path):
    samples = [
        Sample("g", uniform(tmp_path / "g.png", COLOURS[2]), None),
        Sample("r", uniform(tmp_path / "r.png", COLOURS[1], (4, 12)), None),
        Sample("missing", tmp_path / "nope.png", None),
    ]
    gen = pseudo.predict_dataset(
        NearestColour(), samples, num_classes=3, mean=MEAN, std=STD, batch_size=1
    )
    sid, pred = next(gen)
    assert sid == "g" and pred.dtype == np.uint8 and (pred == 2).all()
    sid, pred = next(gen)
    assert sid == "r" and pred.shape == (4, 12) and (pred == 1).all()
    with pytest.raises(DataError, match="nope.png"):  # read only when reached
        next(gen)


def test_batched_prediction_equals_one_at_a_time(tmp_path):
    # Same-size images are batched together; the result must not depend on the batching.
    samples = [
        Sample(f"s{i}", uniform(tmp_path / f"s{i}.png", COLOURS[i % 3], size), None)
        for i, size in enumerate([(6, 6), (6, 6), (4, 12), (6, 6), (6, 6), (6, 6)])
    ]
    kw = dict(num_classes=3, mean=MEAN, std=STD, scales=(0.5, 1.0), flip=True)
    one = list(pseudo.predict_dataset(NearestColour(), samples, batch_size=1, **kw))
    many = list(pseudo.predict_dataset(NearestColour(), samples, batch_size=2, **kw))
    assert [i for i, _ in one] == [i for i, _ in many] == [s.id for s in samples]
    for (_, a), (_, b) in zip(one, many, strict=True):
        assert np.array_equal(a, b)
