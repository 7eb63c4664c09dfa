"""Tests of ciscr.selection: hand-made distance tables, and a fake teacher whose features are the
image colour, so prototypes, anchors and Eq. 10 distances can be worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ciscr import selection as sel
from ciscr.cisc import DISTANCE_EPS
from ciscr.data.formats import Sample
from ciscr.errors import CheckpointError, ConfigError, DataError
from ciscr.models import SegOutput

NAN = float("nan")
MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
RED, GREEN, YELLOW, BLACK = (255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 0, 0)
KW = {"num_classes": 3, "mean": MEAN, "std": STD}

# Eq. 10 by hand with anchors a0 = red, a1 = mean(yellow, green) = (0.5, 1, 0), a2 = 0:
# cos(yellow, a1) = 1.5 / (sqrt 2 * sqrt 1.25), cos(green, a1) = 1 / sqrt 1.25,
# cos(red, a1) = 0.5 / sqrt 1.25, cos(yellow, red) = 1 / sqrt 2.
D1_YELLOW = -math.log(1.5 / math.sqrt(2.5))  # target 1
D1_GREEN = -math.log(1 / math.sqrt(1.25))  # target 1
D1_RED = -math.log(1 - 0.5 / math.sqrt(1.25))  # target 0
D0_YELLOW = -math.log(1 - 1 / math.sqrt(2))  # target 0


class Colour(nn.Module):
    """features = 4x4 average pooling of the image (= its colour on flat regions);
    logits_k = -20 * ||pixel - colour_k||^2."""

    def __init__(self, colours=(BLACK, RED, GREEN)) -> None:
        super().__init__()
        self.register_buffer("colours", torch.tensor(colours, dtype=torch.float32) / 255)

    def forward(self, x: torch.Tensor) -> SegOutput:
        d = (x.unsqueeze(1) - self.colours[None, :, :, None, None]).pow(2).sum(2)
        return SegOutput(-20 * d, F.avg_pool2d(x.clamp_min(0), 4, ceil_mode=True))


def png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def flat(colour, size=(8, 8)) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (*size, 3)).copy()


def sample(root: Path, sid: str, rgb: np.ndarray, mask: np.ndarray | None) -> Sample:
    m = None if mask is None else png(root / "gt" / f"{sid}.png", mask)
    return Sample(sid, png(root / "img" / f"{sid}.png", rgb), m)


@pytest.fixture
def world(tmp_path):
    """Labeled A (yellow, all 1), B (green, all 1), C (red, all 0); class 2 never labeled.
    Unlabeled u1 yellow/1, u2 green/1, u3 red/0, u4 red/2 with pseudo labels in a folder."""
    full = lambda v: np.full((8, 8), v, np.uint8)  # noqa: E731
    labeled = [
        sample(tmp_path, "A", flat(YELLOW), full(1)),
        sample(tmp_path, "B", flat(GREEN), full(1)),
        sample(tmp_path, "C", flat(RED), full(0)),
    ]
    pdir = tmp_path / "pseudo"
    unl = []
    for sid, colour, cls in [("u1", YELLOW, 1), ("u2", GREEN, 1), ("u3", RED, 0), ("u4", RED, 2)]:
        png(pdir / f"{sid}.png", full(cls))
        unl.append(sample(tmp_path, sid, flat(colour), None))
    return labeled, unl, pdir


# --------------------------------------------------------------------------- end to end


def test_prototypes_anchors_distances_and_selection_by_hand(world):
    labeled, unl, pdir = world
    model = Colour()
    protos, present = sel.compute_labeled_prototypes(model, labeled, **KW)
    assert protos.shape == (3, 3, 3) and protos.dtype == torch.float32
    assert present.tolist() == [[False, True, False], [False, True, False], [True, False, False]]
    scale = 64 / (64 + 5e-4)  # Eq. 5 denominator guard
    assert torch.allclose(protos[0, 1], torch.tensor([1.0, 1.0, 0.0]) * scale)
    assert torch.equal(protos[0, 0], torch.zeros(3))
    anchors = sel.class_anchors(protos, present)
    assert torch.allclose(anchors, torch.tensor([[1, 0, 0], [0.5, 1, 0], [0, 0, 0]]) * scale)

    ids = [s.id for s in labeled]
    d = sel.image_distances(model, labeled, "gt", anchors, **KW)
    # A perfect map costs -ln(1 - eps) per pixel with Eq. 10's clamp (cisc.DISTANCE_EPS), not 0.
    perfect = -math.log(1 - DISTANCE_EPS)
    want = [[D0_YELLOW, D1_YELLOW, NAN], [perfect, D1_GREEN, NAN], [perfect, D1_RED, NAN]]
    assert torch.allclose(d, torch.tensor(want), atol=1e-5, equal_nan=True)
    assert sel.query_lists_cs(ids, present, d) == {0: ["C"], 1: ["A"], 2: []}

    du, pres_u = sel.image_distances(model, unl, pdir, anchors, **KW, return_fractions=True)
    assert (pres_u[:, 2] > 0).tolist() == [False, False, False, True]
    rel, unrel, scores = sel.split_unlabeled_cisc([s.id for s in unl], du, pres_u)
    assert rel == ["u3", "u1"] and unrel == ["u2", "u4"]
    assert scores["u1"] == pytest.approx(D1_YELLOW, abs=1e-5)
    assert scores["u4"] == math.inf  # only a class without anchor: ranked last
    assert model.training  # the caller's mode is restored


def test_crop_level_scores_median_of_crops(tmp_path):
    rgb = np.concatenate([flat(YELLOW), flat(GREEN)], axis=1)  # 8 x 16: two 8x8 crops
    s = sample(tmp_path, "wide", rgb, np.full((8, 16), 1, np.uint8))
    anchors = torch.tensor([[1.0, 0, 0], [0.5, 1, 0], [0, 0, 0]])
    scores = sel.crop_level_scores(Colour(), [s], "gt", anchors, 8, **KW)
    assert scores["wide"] == pytest.approx((D1_YELLOW + D1_GREEN) / 2, abs=1e-5)
    assert sel._crop_starts(10, 4) == [0, 4, 6]
    assert sel._crop_starts(8, 4) == [0, 4] and sel._crop_starts(3, 4) == [0]


def test_bank_views_and_roundtrip(world, tmp_path):
    labeled, _, _ = world
    protos, present = sel.compute_labeled_prototypes(Colour(), labeled, **KW, views=3)
    one, _ = sel.compute_labeled_prototypes(Colour(), labeled, **KW, views=1)
    assert torch.allclose(protos, one, atol=1e-5)  # flat images look the same in every view
    with pytest.raises(ConfigError, match="bank_views"):
        sel.compute_labeled_prototypes(Colour(), labeled, **KW, views=11)

    path = tmp_path / "bank.safetensors"
    sel.save_bank(path, protos, present, ["A", "B", "C"])
    p2, pres2, ids = sel.load_bank(path)
    assert torch.equal(p2, protos) and torch.equal(pres2, present) and ids == ["A", "B", "C"]
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(CheckpointError, match="bank.safetensors"):
        sel.load_bank(path)
    with pytest.raises(CheckpointError, match="not found"):
        sel.load_bank(tmp_path / "none.safetensors")


# --------------------------------------------------------------------------- query lists


IDS = ["b", "a", "c", "d"]
PRESENT = np.array([[1, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 1], [1, 1, 0, 1]], bool)


def test_query_lists_cs_halves_ties_and_nan():
    d = np.array([[0.2, 9, 9, 0.5], [0.2, 9, 9, 9], [0.1, 9, 9, 0.4], [NAN, 0.7, 9, 0.6]])
    q = sel.query_lists_cs(IDS, PRESENT, d)
    # class 0: c (0.1), then the tie a/b by id, NaN last; keep ceil(4/2) = 2.
    assert q == {0: ["c", "a"], 1: ["d"], 2: [], 3: ["c", "b"]}
    assert all(set(v) <= set(IDS) for v in q.values())
    with pytest.raises(ValueError):
        sel.query_lists_cs(IDS[:3], PRESENT, d)


def test_class_fractions_by_hand():
    lab = np.array([[0, 0, 1, 255], [2, 0, 0, 255]], np.uint8)  # 6 valid pixels, 255 ignored
    assert sel.class_fractions(lab, 3).tolist() == pytest.approx([4 / 6, 1 / 6, 1 / 6])
    assert sel.class_fractions(np.full((2, 2), 255, np.uint8), 3).tolist() == [0.0, 0.0, 0.0]


def test_query_eligible_drops_images_where_the_class_is_a_few_pixels():
    # class 0 covers 1% of image b but 30-50% of the others; class 1 only ever covers 1%.
    frac = np.array([[0.01, 0.0], [0.3, 0.01], [0.5, 0.0]])
    elig = sel.query_eligible(frac, 0.03)
    assert elig.tolist() == [[False, False], [True, True], [True, False]]
    assert sel.query_eligible(frac, 0.0).tolist() == (frac > 0).tolist()  # the paper's rule
    # The defect it fixes: Eq. 10 gives the 1%-image the smallest D_0, so CS would query it.
    d = np.array([[0.01, NAN], [0.2, 0.3], [0.3, NAN]])
    assert sel.query_lists_cs(["b", "a", "c"], frac > 0, d)[0] == ["b", "a"]
    assert sel.query_lists_cs(["b", "a", "c"], elig, d) == {0: ["a"], 1: ["a"]}


def test_query_lists_rs_and_as():
    rs = sel.query_lists_rs(IDS, PRESENT, seed=3)
    assert rs == sel.query_lists_rs(IDS, PRESENT, seed=3)  # deterministic
    assert [len(rs[k]) for k in range(4)] == [2, 1, 0, 2]
    assert rs[1] == ["d"] and set(rs[3]) <= {"b", "c", "d"} and set(rs[0]) <= set(IDS)
    # AS: highest mIoU first, the a/d tie by id, NaN last.
    q = sel.query_lists_as(IDS, PRESENT, np.array([0.5, 0.9, NAN, 0.9]))
    assert q == {0: ["a", "d"], 1: ["d"], 2: [], 3: ["d", "b"]}


def test_per_image_miou_by_hand(tmp_path):
    rgb = flat(BLACK)
    rgb[:, :4] = RED  # predicted: left 1, right 0
    gt = np.ones((8, 8), np.uint8)
    gt[:4, 4:] = 0
    gt[4:, 4:] = 2  # IoU: class 0 16/32, class 1 1, class 2 0 -> 0.5
    samples = [sample(tmp_path, "x", rgb, gt), sample(tmp_path, "y", flat(GREEN), gt * 0 + 2)]
    assert sel.per_image_miou(Colour(), samples, **KW) == pytest.approx([0.5, 1.0])


# --------------------------------------------------------------------------- unlabeled halves


def test_split_cisc_sums_present_classes_ties_by_id():
    d = np.array([[0.1, 0.2, NAN], [0.3, NAN, 0.0], [0.05, 0.05, 0.05]])
    pres = np.array([[1, 1, 1], [1, 1, 0], [0, 1, 0]], bool)
    rel, unrel, scores = sel.split_unlabeled_cisc(["b", "a", "c"], d, pres)
    assert scores == pytest.approx({"b": 0.3, "a": 0.3, "c": 0.05})
    assert rel == ["c", "a"] and unrel == ["b"]  # ceil(3/2) reliable, a before b on the tie


def test_split_stpp_by_hand():
    final = {"p": np.array([[0, 0], [1, 1]]), "q": np.array([[2, 2], [2, 2]])}
    snap_same = {k: v.copy() for k, v in final.items()}
    snap_diff = {"p": np.array([[0, 0], [0, 1]]), "q": np.array([[2, 2], [2, 2]])}
    rel, unrel, scores = sel.split_unlabeled_stpp(["p", "q"], [snap_same], final, 3)
    assert scores == {"p": 1.0, "q": 1.0} and rel == ["p"] and unrel == ["q"]
    # p vs diff: class 0 2/3, class 1 1/2 -> 7/12; mean with the identical snapshot.
    rel, unrel, scores = sel.split_unlabeled_stpp(["p", "q"], [snap_same, snap_diff], final, 3)
    assert scores["p"] == pytest.approx((1 + 7 / 12) / 2) and rel == ["q"] and unrel == ["p"]
    with pytest.raises(ConfigError):
        sel.split_unlabeled_stpp(["p"], [], final, 3)


def test_stability_scores_streaming_models(tmp_path):
    rgb = flat(BLACK)
    rgb[:, :4] = RED
    s = sample(tmp_path, "x", rgb, None)
    swapped = Colour((BLACK, GREEN, RED))  # predicts 2 where the final model predicts 1
    scores = sel.stability_scores([Colour(), swapped], Colour(), [s], **KW)
    assert scores["x"] == pytest.approx((1 + 1 / 3) / 2)  # 0: 1, 1: 0, 2: 0 -> 1/3


def test_split_random_deterministic_halves():
    ids = [f"i{n}" for n in range(7)]
    rel, unrel, scores = sel.split_unlabeled_random(ids, seed=1)
    assert (rel, unrel) == sel.split_unlabeled_random(list(reversed(ids)), seed=1)[:2]
    assert len(rel) == 4 and sorted(rel + unrel) == ids
    assert max(scores[i] for i in rel) <= min(scores[i] for i in unrel)


# --------------------------------------------------------------------------- files


def test_write_read_selection_roundtrip_and_leak_guard(tmp_path):
    queries = {0: ["c", "a"], 1: ["d"], 2: []}
    qscores = sel.distance_table(["a", "c", "d"], np.array([[0.2, 1, 0], [0.1, 1, 0], [1, NAN, 0]]))
    out = tmp_path / "selection"
    sel.write_selection(
        out,
        queries,
        ["u1"],
        ["u2", "u3"],
        {"u1": 0.5, "u2": math.inf, "u3": 2.0},
        {"method": "cs"},
        class_names=["bg", "cat", "dog"],
        query_scores=qscores,
    )
    raw = json.loads((out / "queries.json").read_text())
    assert raw == {
        "bg": [{"id": "c", "D": 0.1}, {"id": "a", "D": 0.2}],
        "cat": [{"id": "d", "D": None}],
        "dog": [],
    }
    split = json.loads((out / "unlabeled_split.json").read_text())
    assert split["unreliable"] == [{"id": "u2", "score": None}, {"id": "u3", "score": 2.0}]

    got = sel.read_selection(out, labeled_ids=["a", "c", "d"], unlabeled_ids=["u1", "u2", "u3"])
    assert got.queries == queries and got.reliable == ["u1"] and got.unreliable == ["u2", "u3"]
    assert got.meta["method"] == "cs" and got.scores["u1"] == 0.5
    with pytest.raises(DataError, match="not in the labeled split"):
        sel.read_selection(out, labeled_ids=["a", "c"])  # "d" is not labeled here
    (out / "selection_meta.json").unlink()
    with pytest.raises(DataError, match="missing"):
        sel.read_selection(out)


def test_distances_are_batched_by_size_within_fixed_chunks(world, tmp_path, monkeypatch):
    labeled, unl, pdir = world
    # a fifth unlabeled image of another size splits its chunk's batch
    png(pdir / "u5.png", np.full((4, 8), 1, np.uint8))
    unl = [*unl, sample(tmp_path, "u5", flat(YELLOW, (4, 8)), None)]
    model = Colour()
    anchors = sel.class_anchors(*sel.compute_labeled_prototypes(model, labeled, **KW))
    shapes = []
    model.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    monkeypatch.setattr(sel, "FEATURE_BATCH", 3)
    batched = sel.image_distances(model, unl, pdir, anchors, **KW)
    assert shapes == [(3, 3, 8, 8), (1, 3, 8, 8), (1, 3, 4, 8)]  # chunks [u1-u3], [u4, u5]
    monkeypatch.setattr(sel, "FEATURE_BATCH", 1)
    shapes.clear()
    single = sel.image_distances(model, unl, pdir, anchors, **KW)
    assert len(shapes) == 5
    assert torch.allclose(batched, single, equal_nan=True)
    assert sel._equal_size_runs([torch.zeros(1, 3, 2, 2)] * 2 + [torch.zeros(1, 3, 3, 2)]) == [
        [0, 1], [2]]
