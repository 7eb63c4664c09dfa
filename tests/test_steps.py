"""Stage-1 pair step: the loss the paper writes per pair, and its per-image normalisation."""

import numpy as np
import pytest
import torch
from torch import nn

from ciscr.cisc import cisc_pair_loss
from ciscr.engine.losses import ce_loss
from ciscr.engine.steps import PAIR_BCE_EPS, pair_step
from ciscr.models.deeplabv3plus import SegOutput


class Pixelwise(nn.Module):
    """logits = a 1x1 conv of the image, features = its ReLU (non-negative, like the model's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> SegOutput:
        y = self.conv(x)
        return SegOutput(y, torch.relu(y) + 0.1)


def pairs_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.randint(0, 3, (2, 4, 4), generator=g)
    mask2 = torch.randint(0, 3, (2, 4, 4), generator=g)
    mask[:, 0, 0], mask2[:, 0, 0] = 1, 1  # class 1 is shared by both pairs
    return {"pairs": {"image": torch.randn(2, 3, 4, 4, generator=g), "mask": mask,
                      "image2": torch.randn(2, 3, 4, 4, generator=g), "mask2": mask2,
                      "cls": torch.tensor([1, 1])}}  # fmt: skip


def test_pair_loss_is_ce_i_plus_ce_j_plus_cisc_and_image_norm_halves_it():
    model, b = Pixelwise(), pairs_batch()
    p = b["pairs"]
    out = model(torch.cat([p["image"], p["image2"]]))
    want = (ce_loss(out.logits[:2], p["mask"]) + ce_loss(out.logits[2:], p["mask2"])
            + cisc_pair_loss(out.features[:2], p["mask"], out.features[2:], p["mask2"],
                             p["cls"], bce_eps=PAIR_BCE_EPS))  # fmt: skip
    with torch.no_grad():
        pair, scalars = pair_step(True, norm="pair")(model, b, 0)
        image, _ = pair_step(True, norm="image")(model, b, 0)
    want = want.detach()
    assert float(pair) == pytest.approx(float(want), rel=1e-6)
    assert float(image) == pytest.approx(float(want) / 2, rel=1e-6)
    assert scalars["ce"] == pytest.approx(float(want - scalars["cisc"]) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="norm"):
        pair_step(True, norm="batch")


class Views(torch.utils.data.Dataset):
    """A labeled set whose item says which (index, augmentation epoch) produced it."""

    def __init__(self) -> None:
        self.epoch = 0

    def __len__(self) -> int:
        return 4

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.tensor([i, self.epoch]), "mask": torch.zeros(1)}


def test_pair_partner_gets_its_own_augmentation_not_a_copy_of_its_anchor_view():
    from ciscr.data.pairs import PARTNER_EPOCHS, PairDataset

    present = np.ones((4, 2), bool)
    # anchor 1 in epoch 3 of a 4-image set: its partner's view is keyed on (epoch, anchor)
    # (min_ratio=0: one crop, no re-crop keys; the 3 % rule has its own tests)
    for views, epoch in (("independent", PARTNER_EPOCHS + 3 * 4 + 1), ("shared", 3)):
        ds = PairDataset(Views(), present, None, seed=0, views=views, min_ratio=0.0)
        ds.set_epoch(3)
        item = ds[1]
        assert item["image"].tolist() == [1, 3]
        j = int(item["index2"])
        assert j != 1 and item["image2"].tolist() == [j, epoch]
    with pytest.raises(ValueError, match="views"):
        PairDataset(Views(), present, None, seed=0, views="same")


def test_partner_views_differ_when_one_image_partners_several_anchors_in_an_epoch():
    from ciscr.data.pairs import PairDataset

    present = np.ones((4, 2), bool)
    ds = PairDataset(Views(), present, None, seed=0)
    ds.set_epoch(5)
    views = [tuple(ds[i]["image2"].tolist()) for i in range(4)]
    assert len(set(views)) == 4  # even where two anchors drew the same partner image


def test_random_partners_share_nothing_and_are_never_self():
    from ciscr.data.pairs import PairDataset

    present = np.zeros((5, 3), bool)
    present[:, 1] = True  # every image shares class 1: "class" partners would set cls = 1
    ds = PairDataset(Views(), present, None, seed=0, partners="random")
    seen = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        for i in range(5):
            item = ds[i]
            assert int(item["cls"]) == -1 and int(item["index2"]) != i
            seen.add(int(item["index2"]))
    assert seen == set(range(5))
    with pytest.raises(ValueError, match="partners"):
        PairDataset(Views(), present, None, seed=0, partners="same")


def test_bank_rectifier_every_class_maps_only_the_classes_present():
    from ciscr import cisc
    from ciscr.engine.steps import Rectifier

    g = torch.Generator().manual_seed(2)
    feats, bank = torch.rand(2, 5, 3, 3, generator=g), torch.rand(4, 3, 5, generator=g)
    # Class 1 has no query image: never rectified. Image 0 shows classes 0 and 2 (and void),
    # image 1 only class 2.
    rect = Rectifier(features=lambda x: feats, mode="bank", classes="all", num_classes=3,
                     query_lists={0: [0, 1], 1: [], 2: [3]}, seed=0, bank=bank,
                     bank_present=torch.ones(4, 3, dtype=torch.bool))
    y = torch.tensor([[[0, 0, 2], [2, 255, 1], [0, 0, 0]], [[2] * 3] * 3])
    cmaps = rect(torch.zeros(2, 3, 6, 6), y, it=5)["cmaps"]
    assert cmaps.shape == (2, 3, 3, 3)
    assert (cmaps[:, 1] == -1).all() and (cmaps[1, 0] == -1).all()  # absent / no query
    assert torch.allclose(cmaps[:, 2], cisc.cisc_map(feats, bank[[3, 3], 2], (3, 3)))
    maps0 = [cisc.cisc_map(feats[:1], bank[j : j + 1, 0], (3, 3))[0] for j in (0, 1)]
    assert any(torch.allclose(cmaps[0, 0], m) for m in maps0)  # a query of class 0's list


def _two_class_logits(p_true, target):
    """(1, 2, 1, N) logits whose softmax gives each pixel's true class the probability p_true."""
    p = torch.tensor(p_true)
    margin = torch.log(p / (1 - p))
    logits = torch.zeros(1, 2, 1, len(p_true))
    t = torch.tensor(target).clamp(0, 1)
    logits[0, 0, 0] = torch.where(t == 0, margin, torch.zeros_like(margin))
    logits[0, 1, 0] = torch.where(t == 1, margin, torch.zeros_like(margin))
    return logits, torch.tensor([[target]])


def test_ohem_counts_the_hard_pixels_and_at_least_min_kept_as_unimatch():
    from ciscr.engine.losses import labeled_loss, ohem_ce

    # True-class probabilities 0.9, 0.6, 0.3, 0.8 and an ignored pixel.
    logits, target = _two_class_logits([0.9, 0.6, 0.3, 0.8, 0.1], [0, 1, 0, 1, 255])
    nll = lambda *ps: float(np.mean([-np.log(p) for p in ps]))  # noqa: E731
    # thresh 0.7: 0.6 and 0.3 are hard (the ignored pixel never counts)
    assert ohem_ce(logits, target, 0.7, 1) == pytest.approx(nll(0.6, 0.3), abs=1e-5)
    # at least 3 kept: the threshold rises to the 3rd smallest probability, 0.8
    assert ohem_ce(logits, target, 0.7, 3) == pytest.approx(nll(0.6, 0.3, 0.8), abs=1e-5)
    # fewer valid pixels (4) than min_kept: plain CE over all of them
    assert ohem_ce(logits, target, 0.7, 5) == pytest.approx(nll(0.9, 0.6, 0.3, 0.8), abs=1e-5)
    # labeled_loss: min_kept is per image (one image here), None = plain CE
    assert labeled_loss(logits, target, 255, (0.7, 3)) == ohem_ce(logits, target, 0.7, 3)
    assert labeled_loss(logits, target, 255, None) == ce_loss(logits, target, 255)


def test_ohem_is_refused_where_the_paper_trains_with_ce_and_set_by_cityscapes_unimatch():
    from ciscr.config import load_config
    from ciscr.errors import ConfigError

    for name in ("ciscr", "stpp"):
        with pytest.raises(ConfigError, match="labeled_loss"):
            load_config("synthetic", [f"method.name={name}", "method.labeled_loss=ohem"])
    for name in ("suponly", "unimatch"):
        m = load_config("synthetic", [f"method.name={name}", "method.labeled_loss=ohem"]).method
        assert m.ohem() == (0.7, 100_000)
    cfg = load_config("cityscapes_unimatch").method
    assert (cfg.labeled_loss, cfg.ohem(), cfg.confidence_threshold) == ("ohem", (0.7, 100_000), 0.0)


def test_supervised_step_and_online_recipe_take_the_configured_labeled_loss(tmp_path):
    from ciscr.config import load_config
    from ciscr.engine.losses import ohem_ce
    from ciscr.engine.steps import supervised_step
    from ciscr.online import online_recipe
    from ciscr.run_setup import setup_run

    logits, target = _two_class_logits([0.9, 0.6, 0.3, 0.8], [0, 1, 0, 1])
    model = lambda x: SegOutput(logits, logits)  # noqa: E731
    batch = {"labeled": {"image": torch.zeros(1), "mask": target}}
    loss, _ = supervised_step(255, (0.7, 1))(model, batch, 0)
    assert loss == ohem_ce(logits, target, 0.7, 1) != ce_loss(logits, target)
    cfg = load_config("synthetic", ["method.name=unimatch", "method.labeled_loss=ohem",
                                    "method.ohem_min_kept=7"])
    assert online_recipe(setup_run(cfg, tmp_path, torch.device("cpu"))).ohem == (0.7, 7)
