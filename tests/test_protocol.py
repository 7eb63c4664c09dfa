"""The protocol of the stage-wise family: stage budgets derived from each stage's data, ST++'s
mixed batches and snapshot epochs, the authors' >= 3 % rule for pairs and queries, the options
of the unlabeled loss, Eq. 10's clamp, and the method registry."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ciscr import cisc
from ciscr.config import METHOD_PRESETS, load_config
from ciscr.data.datasets import MixedDataset
from ciscr.data.pairs import PairDataset, class_presence, crop_class_shares
from ciscr.engine.losses import ce_loss, class_balanced
from ciscr.engine.steps import UnlabeledLoss, mixed_step
from ciscr.errors import ConfigError
from ciscr.methods import RECIPES, get_recipe
from ciscr.runner import run_training
from ciscr.stage_plans import stpp_snapshot_iters, unlabeled_loss

SMALL = [
    "data.synthetic.num_train=20", "data.synthetic.num_val=2", "data.synthetic.size=32",
    "data.labeled=4", "train.epochs=2", "train.unlabeled_epochs=1", "train.batch_size=4",
    "train.iters_per_epoch=0",
    "train.crop_size=32", "train.progress=false", "method.tta_scales=[1.0]",
    "method.tta_flip=false", "model.channels=16", "method.score_final_pseudo=false",
    "model.backbone=mobilenet_v2", "report=false",
]


def total_iters(stage_dir):
    return torch.load(stage_dir / "checkpoint.pt", weights_only=True)["total_iters"]


@pytest.mark.parametrize("method, expected", [
    # 4 labeled (repeated twice: small set), 16 unlabeled, batch 4; stage 1: 2 epochs.
    ("st", {"stage1": 2 * math.ceil(8 / 4),
            # ST++'s mixed list: 4 labeled x ceil(16 / 4) + 16 pseudo-labelled = 32 items
            "stage2": 1 * math.ceil((4 * 4 + 16) / 4)}),
    # ST++: stage 2's list = the reliable half (8) + 4 labeled x ceil(8 / 4) = 16 items, 4
    # iterations a pass showing 8 labeled images; stage 1 showed 4 x 4 = 16: raised to 2
    # passes. Stage 3's list (16 pseudo + 16 labeled) shows 16 in one pass: not raised.
    ("stpp", {"stage1": 2 * math.ceil(8 / 4), "stage2": 2 * math.ceil(16 / 4),
              "stage3": math.ceil(32 / 4)}),
    ("ciscr_bank", {"stage1": 2 * math.ceil(8 / 4),  # pairs: 2 images per item, 2 per batch
                    # the reliable half, one pass = 2 iterations, raised to stage 1's 4
                    "stage2": 2 * math.ceil(8 / 4),
                    "stage3": math.ceil(16 / 4)}),  # every unlabeled image, one pass
    ("unimatch", {"online": math.ceil(16 / 4)}),  # one pass over the unlabeled images
    # 3 epochs of stage 1 = 6 iterations: one pass over the unlabeled images (4) is raised to
    # 2 passes, so the labeled images are seen at least as often as by SupOnly.
    ("fixmatch", {"online": 2 * math.ceil(16 / 4), "_epochs": 3}),
])
def test_every_stage_derives_its_iterations_from_its_own_data(tmp_path, method, expected):
    expected = dict(expected)
    epochs = [f"train.epochs={expected.pop('_epochs')}"] if "_epochs" in expected else []
    run_training(load_config("synthetic", SMALL + [f"method.name={method}", *epochs]),
                 tmp_path / "r")
    assert {s: total_iters(tmp_path / "r" / s) for s in expected} == expected


def test_iters_per_epoch_override_applies_to_every_stage(tmp_path):
    cfg = load_config("synthetic", SMALL + ["method.name=st", "train.iters_per_epoch=3"])
    run_training(cfg, tmp_path / "r")
    assert total_iters(tmp_path / "r" / "stage1") == 6
    assert total_iters(tmp_path / "r" / "stage2") == 3


def test_stpp_snapshots_sit_at_a_third_and_two_thirds_of_stage1():
    assert stpp_snapshot_iters(per_epoch=12, epochs=40, n=2) == [12 * 13, 12 * 26]
    assert stpp_snapshot_iters(per_epoch=12, epochs=80, n=2) == [12 * 26, 12 * 53]
    assert stpp_snapshot_iters(per_epoch=5, epochs=1, n=2) == [1, 3]  # tiny: iteration-spaced
    assert load_config("synthetic", ["method.name=stpp"]).method.stpp_snapshots == 2


class Items(torch.utils.data.Dataset):
    def __init__(self, n, key, value):
        self.n, self.key, self.value, self.epoch = n, key, value, 0

    def __len__(self):
        return self.n

    def set_epoch(self, e):
        self.epoch = e

    def __getitem__(self, i):
        return {"image": torch.full((3, 2, 2), float(i)), self.key: torch.full((2, 2), self.value),
                "conf": torch.full((2, 2), 0.5)}


def test_mixed_list_is_labeled_then_pseudo_and_its_step_is_one_ce_mean():
    ds = MixedDataset(Items(6, "mask", 1), [Items(3, "pseudo", 2), Items(2, "pseudo", 0)])
    assert len(ds) == 11
    assert [bool(ds[i]["is_pseudo"]) for i in (0, 5, 6, 10)] == [False, False, True, True]
    assert int(ds[6]["mask"][0, 0]) == 2 and float(ds[0]["conf"][0, 0]) == 1.0
    batch = torch.utils.data.default_collate([ds[i] for i in (0, 6, 7, 10)])
    model = lambda x: type("O", (), {"logits": x[:, :3] * 0.1})()  # noqa: E731
    loss, _ = mixed_step()(model, {"mixed": batch}, 0)
    assert float(loss) == pytest.approx(float(ce_loss(batch["image"][:, :3] * 0.1, batch["mask"])))
    half, _ = mixed_step(unl=UnlabeledLoss(weight=0.5))(model, {"mixed": batch}, 0)
    assert float(half) < float(loss)  # pseudo rows down-weighted, labeled rows unchanged


def test_unlabeled_loss_ramp_threshold_and_confidence_weight_by_hand():
    u = UnlabeledLoss(weight=2.0, rampup_iters=10)
    assert u.lam(0) == pytest.approx(2.0 * math.exp(-5.0))
    assert u.lam(5) == pytest.approx(2.0 * math.exp(-5.0 * 0.25))
    assert u.lam(10) == u.lam(99) == 2.0
    conf = torch.tensor([0.5, 0.95, 0.99])
    assert UnlabeledLoss().pixel_weights(conf) is None
    assert UnlabeledLoss(threshold=0.9).pixel_weights(conf).tolist() == [0.0, 1.0, 1.0]
    w = UnlabeledLoss(threshold=0.9, by_confidence=True).pixel_weights(conf)
    assert w.tolist() == pytest.approx([0.0, 0.95, 0.99])


def test_class_balanced_gives_each_class_its_pixel_share_by_hand():
    labels = torch.tensor([[[0, 0, 0], [1, 1, 1], [1, 2, 255]]])
    valid = labels != 255
    mask = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]])
    w = class_balanced(mask, labels, valid, num_classes=3)
    # class 0: 3 pixels, 2 kept -> 1.5 each; class 1: 4 pixels, 2 kept -> 2.0 each; class 2:
    # 1 pixel, none kept -> stays 0; the ignored pixel keeps its weight.
    assert w.tolist() == [[[1.5, 1.5, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 1.0]]]
    soft = class_balanced(mask * 0.5, labels, valid, 3)
    assert torch.equal(soft, w.masked_fill(~valid, 0.5))  # any weights: only the class sums count
    ones = torch.ones(1, 3, 3)
    assert torch.equal(class_balanced(ones, labels, valid, 3), ones)  # nothing cut: unchanged


def test_unlabeled_loss_class_balance_is_wired_and_needs_the_labels():
    conf = torch.tensor([[0.5, 0.99], [0.99, 0.99]])
    labels = torch.tensor([[0, 0], [1, 1]])
    u = UnlabeledLoss(threshold=0.9, class_balance=True, num_classes=2)
    assert u.pixel_weights(conf, labels, labels >= 0).tolist() == [[0.0, 2.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="class_balance"):
        u.pixel_weights(conf)
    ctx = SimpleNamespace(cfg=load_config("synthetic", ["method.class_balance=true",
                                                        "method.confidence_threshold=0.9"]),
                          info=SimpleNamespace(num_classes=5))
    built = unlabeled_loss(ctx, 100)
    assert built.class_balance and built.num_classes == 5 and built.threshold == 0.9


class Crops(torch.utils.data.Dataset):
    """Labeled 'crops': epoch-keyed random masks over 3 classes, class 2 a rare sliver."""

    def __init__(self, n=6):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def set_epoch(self, e):
        self.epoch = e

    def __getitem__(self, i):
        g = torch.Generator().manual_seed((self.epoch * 131 + i) % 2**62)
        m = torch.randint(0, 2, (10, 10), generator=g)
        m[0, : int(torch.randint(0, 6, (1,), generator=g))] = 2  # 0-5 % of class 2
        return {"image": torch.zeros(3, 10, 10), "mask": m}


def test_every_drawn_pair_shows_its_class_on_3_percent_of_both_crops():
    ds = Crops()
    present = class_presence([np.array([0, 1, 2])] * 6, 3)
    pairs = PairDataset(ds, present, background=None, seed=0, min_ratio=0.03)
    drawn = 0
    for epoch in range(4):
        pairs.set_epoch(epoch)
        for i in range(6):
            it = pairs[i]
            k = int(it["cls"])
            if k < 0:
                continue
            drawn += 1
            assert crop_class_shares(it["mask"], 3)[k] >= 0.03
            assert crop_class_shares(it["mask2"], 3)[k] >= 0.03
    assert drawn >= 20
    pairs.set_epoch(2)
    again = PairDataset(ds, present, None, seed=0, min_ratio=0.03)
    again.set_epoch(2)
    assert all(torch.equal(pairs[i]["mask2"], again[i]["mask2"]) for i in range(6))  # by seed


def test_query_crops_show_their_class_on_3_percent():
    from ciscr.engine.steps import Rectifier

    rect = Rectifier(features=lambda x: x, mode="query", classes="one", num_classes=3,
                     query_lists={2: [0, 1, 2]}, seed=0, labeled=Crops(), min_query_ratio=0.03)
    g = torch.Generator().manual_seed(0)
    views = [rect._query_view(2, 0, it, g) for it in range(30)]
    for v in views:
        assert v is None or crop_class_shares(v["mask"], 3)[2] >= 0.03
    assert sum(v is not None for v in views) >= 25  # re-cropping finds the class


def test_eq10_maps_are_clamped_so_one_orthogonal_pixel_costs_log_of_eps():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)  # pixel 1 orthogonal
    labels = torch.tensor([[[0, 0]]])
    anchors = torch.tensor([[1.0, 0.0]])
    d = cisc.anchor_distance(feats, labels, anchors)
    assert float(d[0, 0]) == pytest.approx(-math.log(cisc.DISTANCE_EPS) / 2, rel=1e-3)
    raw = cisc.anchor_distance(feats, labels, anchors, eps=0.0)
    assert float(raw[0, 0]) == pytest.approx(100.0 / 2, rel=1e-3)  # torch's log clamp


def test_all_class_image_score_sums_every_class():
    from ciscr.selection import split_unlabeled_cisc

    D = np.array([[1.0, 5.0], [2.0, 0.5]])
    pres = np.array([[True, False], [True, False]])
    _, _, present = split_unlabeled_cisc(["a", "b"], D, pres)
    _, _, every = split_unlabeled_cisc(["a", "b"], D, pres, all_classes=True)
    assert present == {"a": 1.0, "b": 2.0} and every == {"a": 6.0, "b": 2.5}


def test_registry_lists_valid_names_and_covers_every_preset():
    assert set(RECIPES) == set(METHOD_PRESETS)
    with pytest.raises(ConfigError, match="valid: suponly"):
        get_recipe("unimatchh")
    with pytest.raises(ConfigError, match="unknown method 'foo'"):
        load_config("synthetic", ["method.name=foo"])
    assert get_recipe("unimatch").stages(load_config("synthetic", []).method) == ["online"]


def test_stage3_parts_draw_their_own_augmentations(tmp_path):
    from ciscr.run_setup import setup_run
    from ciscr.stage_plans import unlabeled_dataset

    cfg = load_config("synthetic", SMALL + ["method.name=stpp"])
    ctx = setup_run(cfg, tmp_path, torch.device("cpu"))
    a = unlabeled_dataset(ctx, ctx.unlabeled[:2], tmp_path, part=0)
    b = unlabeled_dataset(ctx, ctx.unlabeled[:2], tmp_path, part=1)
    assert a.seed != b.seed


def test_a_run_made_before_a_setting_existed_still_resumes(tmp_path):
    cfg = load_config("synthetic", SMALL + ["method.name=suponly"])
    run_training(cfg, tmp_path / "r")
    saved = tmp_path / "r" / "config.yaml"
    import yaml

    old = yaml.safe_load(saved.read_text())
    del old["method"]["online_cisc"], old["method"]["prototype_momentum"]  # an older ciscr's
    saved.write_text(yaml.safe_dump(old))
    results = run_training(cfg, tmp_path / "r")  # the missing keys hold their defaults
    assert results["final_stage"] == "stage1"
    assert json.loads((tmp_path / "r" / "results.json").read_text())["method"] == "suponly"
    del old["train"]["unlabeled_epochs"]  # this run sets it to 1, not the default: refused
    saved.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="unlabeled_epochs"):
        run_training(cfg, tmp_path / "r")


def test_online_runs_read_train_epochs_as_the_floor_of_their_length(tmp_path):
    # train.epochs sets stage 1's budget, and every stage on unlabeled images (an online run
    # included) runs at least that long: a changed value is refused on resume, as for SupOnly.
    base = SMALL + ["train.iters_per_epoch=1", "method.score_final_pseudo=false"]
    for method in ("fixmatch", "suponly"):
        run_training(load_config("synthetic", base + [f"method.name={method}"]), tmp_path / method)
        with pytest.raises(ConfigError, match="train.epochs"):
            run_training(load_config("synthetic", base + [f"method.name={method}",
                                                          "train.epochs=7"]), tmp_path / method)


def test_mixed_batches_with_rectification_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match="retrain_batches=mixed"):
        load_config("synthetic", ["method.name=st", "method.rectify=bank"])
    assert load_config("synthetic", ["method.name=st", "method.rectify=bank",
                                     "method.retrain_batches=split"]).method.rectify == "bank"


def test_frozen_models_run_channels_last_and_the_training_model_is_left_alone(tmp_path):
    from ciscr.engine.checkpoint import save_checkpoint
    from ciscr.run_services import evaluate_model, fresh_model, load_model_file
    from ciscr.run_setup import setup_run

    ctx = setup_run(load_config("synthetic", SMALL), tmp_path, torch.device("cpu"))
    model = fresh_model(ctx).train()
    evaluate_model(ctx, model)  # as the epoch hook does, mid-stage
    first_conv = next(p for p in model.parameters() if p.dim() == 4)
    assert model.training and first_conv.is_contiguous()
    save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict()})
    frozen = load_model_file(ctx, tmp_path / "m.pt")  # teacher, pseudo-labeller, selection
    frozen_conv = next(p for p in frozen.parameters() if p.dim() == 4)
    assert frozen_conv.is_contiguous(memory_format=torch.channels_last)
    off = setup_run(load_config("synthetic", [*SMALL, "train.infer_channels_last=false"]),
                    tmp_path / "off", torch.device("cpu"))
    nchw = load_model_file(off, tmp_path / "m.pt")
    assert next(p for p in nchw.parameters() if p.dim() == 4).is_contiguous()
