"""The online family (FixMatch, UniMatch, UniMatch + CISC): losses against hand values,
threshold masking, CutMix alignment, the FP branch, the prototype memory, and real tiny runs."""

import copy
import math
from pathlib import Path

import pytest
import torch

from ciscr.config import ModelCfg
from ciscr.data.transforms import random_box
from ciscr.engine.online import (
    OnlineRecipe,
    OnlineStep,
    ProtoMemory,
    batch_prototypes,
    class_weights,
    confidence_and_label,
    cutmix,
    forward_labeled_and_weak,
    masked_ce,
    merge_bank,
    recipe_weights,
)
from ciscr.models import build_model


def test_cutmix_keeps_image_label_and_confidence_aligned():
    box = torch.zeros(1, 4, 4, dtype=torch.uint8)
    box[0, 1:3, 2:4] = 1
    x, x_mix = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    lab, lab_mix = torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 5)
    conf, conf_mix = torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.9)
    img = cutmix(x, x_mix, box)
    for mixed in (img[:, 0] == 1, cutmix(lab, lab_mix, box) == 5,
                  cutmix(conf, conf_mix, box) == 0.9):
        assert torch.equal(mixed, box.bool())  # every channel and map switches in the box only


def test_random_box_is_inside_and_sized_and_absent_with_p_zero():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        box = random_box(40, 30, g, p=1.0)
        area = int(box.sum())
        assert 0 < area <= 0.4 * 40 * 30 + 1
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        assert int(box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].min()) == 1
    assert int(random_box(40, 30, g, p=0.0).sum()) == 0


def test_masked_ce_by_hand_counts_masked_pixels_in_the_denominator():
    # Two pixels: logits (0, ln 3) -> p(class 1) = 3/4. Pixel 0 target 1, pixel 1 target 0.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]]).T.reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    ce0, ce1 = -math.log(0.75), -math.log(0.25)
    both = masked_ce(logits, target, torch.ones(1, 1, 2), valid)
    assert float(both) == pytest.approx((ce0 + ce1) / 2)
    only0 = masked_ce(logits, target, torch.tensor([[[1.0, 0.0]]]), valid)
    assert float(only0) == pytest.approx(ce0 / 2)  # masked pixel counts 0, still in the mean
    pad = masked_ce(logits, target, torch.ones(1, 1, 2), torch.tensor([[[True, False]]]))
    assert float(pad) == pytest.approx(ce0)  # padding is out of the denominator


def test_confidence_threshold_masks_exactly_the_unconfident_pixels():
    logits = torch.tensor([[5.0, 0.0], [0.1, 0.0]]).T.reshape(1, 2, 1, 2)
    conf, label = confidence_and_label(logits)
    assert label.tolist() == [[[0, 0]]]
    assert ((conf >= 0.95).tolist()) == [[[True, False]]]


def test_class_weights_are_cosines_with_own_class_prototype_and_one_when_unknown():
    feats = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).T.reshape(1, 2, 1, 2)  # pixel 0 e0, pixel 1
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    known = torch.tensor([True, True, False])
    w = class_weights(feats, protos, known, torch.tensor([[[1, 0]]]))
    assert w[0, 0].tolist() == pytest.approx([0.0, 1 / math.sqrt(2)])  # cos(e0,e1), cos(1,1;e0)
    w2 = class_weights(feats, protos, known, torch.tensor([[[2, 2]]]))
    assert w2.tolist() == [[[1.0, 1.0]]]  # class 2 has no prototype yet


def test_batch_prototypes_apply_the_share_rule_and_memory_is_an_ema():
    feats = torch.ones(2, 2, 1, 10)
    feats[1] = 3.0
    labels = torch.zeros(2, 1, 10, dtype=torch.long)
    labels[0, 0, :1] = 1  # 10 % of image 0 is class 1
    labels[1, 0, :] = 1  # image 1 is all class 1
    sums, counts = batch_prototypes(feats, labels, 2, min_ratio=0.2)
    assert counts.tolist() == [1.0, 1.0]  # class 1 of image 0 covers 10 % < 20 %: skipped
    assert sums[1].tolist() == pytest.approx([3.0, 3.0], rel=1e-3)
    mem = ProtoMemory(2, momentum=0.5)
    mem.update(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([True, False]))
    mem.update(torch.tensor([[4.0, 0.0], [1.0, 1.0]]), torch.tensor([True, True]))
    assert mem.protos.tolist() == [[3.0, 0.0], [1.0, 1.0]]  # EMA; a new class taken as is
    assert mem.known.tolist() == [True, True]


def test_recipe_weights_match_fixmatch_and_unimatch():
    assert recipe_weights(1, False) == (0.5, (0.5,), 0.0)  # (CE_l + L_s) / 2
    assert recipe_weights(2, True) == (0.5, (0.125, 0.125), 0.25)  # UniMatch's


def _model():
    torch.manual_seed(0)
    cfg = ModelCfg(backbone="resnet18", output_stride=16, channels=16)
    return build_model(cfg, 3)


def test_fp_branch_perturbs_only_the_last_rows():
    model = _model().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        clean = model(x)
        out = model(x, fp_last=2, fp_p=0.5)
        same = model(x, fp_last=2, fp_p=0.0)
    assert out.fp_logits.shape == (2, 3, 32, 32)
    assert torch.allclose(out.logits, clean.logits, atol=1e-5)  # clean rows untouched
    assert torch.allclose(same.fp_logits, clean.logits[1:], atol=1e-5)  # p=0: no perturbation
    assert not torch.allclose(out.fp_logits, clean.logits[1:], atol=1e-3)


@pytest.mark.parametrize("method, dropout, aspp_dropout", [
    ("unimatch", 0.0, 0.0), ("unimatch_cisc", 0.0, 0.0), ("fixmatch", 0.0, 0.0),
    ("stpp", 0.1, 0.5), ("ciscr", 0.1, 0.5)])
def test_online_methods_train_unimatchs_decoder_without_dropout(method, dropout, aspp_dropout):
    from ciscr.config import load_config

    cfg = load_config("synthetic", [f"method.name={method}", "model.backbone=resnet18",
                                    "model.output_stride=16", "model.channels=16"])
    assert (cfg.model.dropout, cfg.model.aspp_dropout) == (dropout, aspp_dropout)
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x).logits
        torch.manual_seed(2)
        b = model(x).logits
    # Train mode: BN uses the batch's statistics (deterministic); only dropout can differ.
    assert torch.allclose(a, b, atol=1e-6) == (dropout == 0.0)
    assert set(model.state_dict()) == set(build_model(ModelCfg(
        backbone="resnet18", output_stride=16, channels=16), 3).state_dict())  # same keys
    explicit = load_config("synthetic", [f"method.name={method}", "model.aspp_dropout=0.3"])
    assert explicit.model.aspp_dropout == 0.3  # the user's key wins over the preset


def _batches(n=2, size=32, views=2):
    g = torch.Generator().manual_seed(0)

    def unl():
        d = {"image_w": torch.randn(n, 3, size, size, generator=g),
             "valid": torch.ones(n, size, size, dtype=torch.bool),
             "gt": torch.randint(0, 3, (n, size, size), generator=g)}
        for v in range(1, views + 1):
            d[f"image_s{v}"] = torch.randn(n, 3, size, size, generator=g)
            d[f"box{v}"] = torch.stack([random_box(size, size, g, 1.0) for _ in range(n)])
        return d

    lab = {"image": torch.randn(n, 3, size, size, generator=g),
           "mask": torch.randint(0, 3, (n, size, size), generator=g)}
    return {"labeled": lab, "unlabeled": unl(), "mix": unl()}


def test_threshold_one_leaves_only_the_labeled_loss():
    model, b = _model(), _batches()
    step = OnlineStep(OnlineRecipe(threshold=1.01), 3)
    torch.manual_seed(1)
    loss, scalars = step(model, b, 0)
    assert scalars["mask_ratio"] == 0.0
    # ciscr's default: the labeled CE at weight 1, as SupOnly (the control) trains it
    assert float(loss.detach()) == pytest.approx(scalars["ce_labeled"], rel=1e-5)


def test_unimatch_loss_is_the_weighted_sum_of_its_parts():
    model, b = _model(), _batches()
    step = OnlineStep(OnlineRecipe(threshold=0.0, weight_labeled=0.5), 3)  # UniMatch's code
    loss, s = step(model, b, 0)
    want = 0.5 * s["ce_labeled"] + 0.125 * (s["loss_s1"] + s["loss_s2"]) + 0.25 * s["loss_fp"]
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert s["mask_ratio"] == 1.0 and 0.0 <= s["pseudo_acc"] <= 1.0


def test_class_balance_changes_nothing_when_every_pixel_is_kept_and_rescales_a_cut():
    model, b = _model(), _batches()
    twin = copy.deepcopy(model)  # a step updates BN's running statistics: each gets its own
    torch.manual_seed(1)
    plain, _ = OnlineStep(OnlineRecipe(threshold=0.0), 3)(model, b, 0)
    torch.manual_seed(1)
    balanced, _ = OnlineStep(OnlineRecipe(threshold=0.0, class_balance=True), 3)(twin, b, 0)
    assert float(balanced) == pytest.approx(float(plain), rel=1e-6)
    step = OnlineStep(OnlineRecipe(threshold=0.5, class_balance=True), 3)
    torch.manual_seed(1)
    _, s = step(model, b, 0)
    # the kept pixels of each class carry its whole count: the mean weight exceeds the kept share
    assert 0.0 < s["mask_ratio"] < 1.0 and s["weight_mean"] > s["mask_ratio"]


def test_cisc_step_keeps_its_memory_in_the_state_dict():
    model, b = _model(), _batches()
    step = OnlineStep(OnlineRecipe(threshold=0.0, cisc="mask", prototype_source="memory"), 3)
    _, s = step(model, b, 0)
    state = step.state_dict()["memory"]
    assert state["known"].any() and 0.0 < s["weight_mean"] <= 1.0
    fresh = OnlineStep(OnlineRecipe(threshold=0.0, cisc="mask", prototype_source="memory"), 3)
    fresh.load_state_dict(step.state_dict())
    assert torch.equal(fresh.memory.protos, step.memory.protos)


class _Bank:
    """A bank_fn that counts its calls and returns fixed prototypes (K=3, C=16)."""

    def __init__(self, known: bool) -> None:
        self.calls, self.known = 0, known

    def __call__(self, model, it):
        self.calls += 1
        return torch.ones(3, 16), torch.full((3,), self.known)


def test_cisc_bank_is_recomputed_every_refresh_steps_and_resumes_from_the_checkpoint():
    model, b = _model(), _batches()
    bank = _Bank(known=True)
    recipe = OnlineRecipe(threshold=0.0, cisc="mask", refresh=3)
    step = OnlineStep(recipe, 3, bank_fn=bank)
    for it in range(5):
        step(model, b, it)
    assert bank.calls == 2  # iterations 0 and 3
    resumed = OnlineStep(recipe, 3, bank_fn=bank)
    resumed.load_state_dict(step.state_dict())
    resumed(model, b, 5)  # not a refresh step: the checkpoint's bank, no recomputation
    assert bank.calls == 2 and torch.equal(resumed.bank[0], step.bank[0])
    assert resumed.memory.known.any()  # the memory is kept in bank mode too


def test_cisc_weights_come_from_the_bank():
    model, b = _model(), _batches()
    # No class known to the bank: nothing can be checked, every weight is 1 (mask ratio 1).
    step = OnlineStep(OnlineRecipe(threshold=0.0, cisc="mask"), 3,
                      bank_fn=_Bank(known=False))
    _, s = step(model, b, 0)
    assert s["weight_mean"] == 1.0
    memory = OnlineStep(OnlineRecipe(threshold=0.0, cisc="mask", prototype_source="memory"), 3)
    _, s = memory(model, b, 0)
    assert s["weight_mean"] < 1.0
    with pytest.raises(ValueError, match="bank_fn"):
        OnlineStep(OnlineRecipe(cisc="mask"), 3)


def test_merge_bank_keeps_the_previous_prototype_of_a_class_the_refresh_missed():
    old = (torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), torch.tensor([True, True, False]))
    new = (torch.tensor([[2.0, 2.0], [0.0, 0.0], [3.0, 0.0]]), torch.tensor([True, False, True]))
    protos, known = merge_bank(old, new)
    assert torch.equal(protos, torch.tensor([[2.0, 2.0], [0.0, 1.0], [3.0, 0.0]]))
    assert known.tolist() == [True, True, True]
    assert merge_bank(None, new)[1].tolist() == [True, False, True]


def test_labeled_bank_forwards_a_bounded_sample_drawn_from_seed_and_step(tmp_path):
    """max_images bounds a refresh; the sample is a function of (seed, it): a resumed run and
    every rank draw the same images; 0 = every image."""
    from ciscr.config import DataCfg, SyntheticCfg
    from ciscr.data.formats import load_dataset
    from ciscr.data.synthetic import make_synthetic
    from ciscr.online import labeled_bank

    root = make_synthetic(tmp_path, SyntheticCfg(num_train=12, num_val=1, size=32), seed=0)
    info, labeled, _, _ = load_dataset(DataCfg(format="folder", root=str(root), labeled=10), 0)
    k = info.num_classes
    seen: list[int] = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            seen.append(int(x.sum() * 1000))  # which image (by its pixels)
            return self.net(x)

    model = Counting()
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, ignore_index=255, min_ratio=0.0, amp="none",
              device="cpu", max_images=4, seed=0)
    bank = labeled_bank(labeled, k, **kw)
    protos, known = bank(model, 50)
    first = list(seen)
    assert len(first) == 4 and protos.shape == (k, 16) and known.any() and model.training
    seen.clear()
    bank(model, 50)
    assert seen == first  # same (seed, it): the same images
    seen.clear()
    bank(model, 100)
    assert len(seen) == 4 and seen != first  # another refresh, another sample
    seen.clear()
    labeled_bank(labeled, k, **{**kw, "max_images": 0})(model, 50)
    assert len(seen) == 10


def test_cisc_alone_replaces_the_mask_by_the_weight():
    model, b = _model(), _batches()
    step = OnlineStep(OnlineRecipe(threshold=1.01, cisc="alone", prototype_source="memory"), 3)
    _, s = step(model, b, 0)
    assert s["mask_ratio"] > 0  # threshold ignored: the CISC weight decides


@pytest.mark.parametrize("w_l", [0.5, 1.0])
def test_fixmatch_loss_is_the_labeled_ce_plus_half_the_strong_view(w_l):
    # FixMatch: one strong view, no FP: loss = w_l CE_l + L_s1 / 2 (its code: w_l = 0.5)
    model, b = _model(), _batches(views=1)
    step = OnlineStep(OnlineRecipe(strong_views=1, fp=False, threshold=0.0, weight_labeled=w_l,
                                   weight_views=(0.5,), weight_fp=0.0), 3)
    loss, s = step(model, b, 0)
    assert "loss_fp" not in s and "loss_s2" not in s
    assert float(loss.detach()) == pytest.approx(w_l * s["ce_labeled"] + 0.5 * s["loss_s1"],
                                                 rel=1e-5)


@pytest.mark.parametrize("name", ["fixmatch", "unimatch", "unimatch_cisc"])
def test_online_methods_train_the_labeled_loss_at_the_controls_weight(name):
    from types import SimpleNamespace

    from ciscr.config import load_config
    from ciscr.online import online_recipe

    cfg = load_config("synthetic", [f"method.name={name}"])
    assert online_recipe(SimpleNamespace(cfg=cfg)).weight_labeled == 1.0
    published = load_config("synthetic", [f"method.name={name}", "method.labeled_weight=0.5"])
    assert online_recipe(SimpleNamespace(cfg=published)).weight_labeled == 0.5


def test_unlabeled_every_k_runs_the_unlabeled_branch_on_every_kth_step_only():
    from ciscr.config import load_config
    from ciscr.engine.losses import labeled_loss

    model, b = _model(), _batches()
    step = OnlineStep(OnlineRecipe(threshold=0.0, unlabeled_every=3), 3)
    calls = []
    forward = model.forward
    model.forward = lambda x, *a, **k: calls.append(x.shape[0]) or forward(x, *a, **k)
    for it in range(6):
        calls.clear()
        torch.manual_seed(1)
        skip = (it + 1) % 3 != 0  # steps 1, 2, 4, 5: the labeled batch alone, one forward
        assert step.streams_at(it) == (("labeled",) if skip else None)  # what the loop loads
        loss, scalars = step(model, {"labeled": b["labeled"]} if skip else b, it)
        if skip:
            assert calls == [2] and set(scalars) == {"ce_labeled"}
            torch.manual_seed(1)  # the same dropout draws: the same forward as the step's
            want = labeled_loss(model(b["labeled"]["image"]).logits, b["labeled"]["mask"], 255)
            assert float(loss) == pytest.approx(float(want), rel=1e-5)
        else:  # steps 3 and 6: the whole UniMatch step (mixing, labeled + weak, strong views)
            assert calls == [2, 4, 4] and "mask_ratio" in scalars
    from types import SimpleNamespace

    from ciscr.online import online_recipe

    cfg = load_config("synthetic", ["method.name=unimatch", "method.unlabeled_every=2"])
    assert online_recipe(SimpleNamespace(cfg=cfg)).unlabeled_every == 2
    assert load_config("synthetic", ["method.name=unimatch"]).method.unlabeled_every == 1


@pytest.mark.parametrize("cisc", ["none", "mask"])
def test_mix_from_the_batch_takes_the_previous_image_and_its_weak_label(monkeypatch, cisc):
    import ciscr.engine.online as online

    model, b = _model(), _batches(n=3)
    recipe = OnlineRecipe(threshold=0.3, cisc=cisc, prototype_source="memory", mix_source="batch")
    step = OnlineStep(recipe, 3)
    assert step.streams_at(0) == ("labeled", "unlabeled")  # the mixing stream is not loaded
    seen, ce, forward = [], [], model.forward
    model.forward = lambda x, *a, **k: seen.append(x) or forward(x, *a, **k)
    monkeypatch.setattr(online, "masked_ce",
                        lambda logits, target, w, valid: ce.append((target, w, valid)) or
                        (w * valid).sum() * 0.0 + logits.sum() * 0.0)
    torch.manual_seed(1)
    step(model, {"labeled": b["labeled"], "unlabeled": b["unlabeled"]}, 0)
    ub = b["unlabeled"]
    assert len(seen) == 2  # labeled + weak, then the strong views: no mixing forward
    label_w, w_w, _ = ce[-1]  # the FP branch's loss: the weak view's labels and weights
    for v in (1, 2):
        box = ub[f"box{v}"]
        want = cutmix(ub[f"image_s{v}"], ub[f"image_s{v}"].roll(1, 0), box)
        assert torch.equal(seen[1][(v - 1) * 3:v * 3], want)  # image i mixed with image i-1
        target, w, valid = ce[v - 1]
        assert torch.equal(target, cutmix(label_w, label_w.roll(1, 0), box))
        assert torch.equal(w, cutmix(w_w, w_w.roll(1, 0), box))
        assert torch.equal(valid, cutmix(ub["valid"], ub["valid"].roll(1, 0), box))
    assert any(bool(bx.any()) for bx in (ub["box1"], ub["box2"]))  # the check saw a mix
    # The published recipes keep the stream; a stage-wise method refuses the setting.
    assert OnlineStep(OnlineRecipe(), 3).streams_at(0) is None
    from types import SimpleNamespace

    from ciscr.config import load_config
    from ciscr.errors import ConfigError
    from ciscr.methods import get_recipe
    from ciscr.online import online_recipe, online_stage

    assert load_config("synthetic", ["method.name=unimatch"]).method.mix_source == "stream"
    cfg = load_config("synthetic", ["method.name=unimatch", "method.mix_source=batch",
                                    "train.unlabeled_batch_size=1"])
    assert online_recipe(SimpleNamespace(cfg=cfg)).mix_source == "batch"
    ctx = SimpleNamespace(cfg=cfg, run_dir=Path("/nonexistent"), unlabeled=[object()])
    with pytest.raises(ConfigError, match="method.mix_source=batch needs at least 2 unlabeled"):
        online_stage(ctx)
    cfg = load_config("synthetic", ["method.name=ciscr", "method.mix_source=batch"])
    with pytest.raises(ConfigError, match="method.mix_source.*stage-wise"):
        get_recipe("ciscr").run(SimpleNamespace(cfg=cfg))


def test_smaller_unlabeled_views_get_their_own_forward_and_the_step_trains():
    from types import SimpleNamespace

    from ciscr.config import load_config
    from ciscr.online import _views

    model, x_l, x_w = _model().train(), torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    torch.manual_seed(1)
    joint = forward_labeled_and_weak(model, x_l, x_w, True, 0.0)  # equal sizes: one forward
    torch.manual_seed(1)
    cat = model(torch.cat([x_l, x_w]), fp_last=3, fp_p=0.0)
    assert torch.equal(joint.logits_w, cat.logits[2:]) and torch.equal(joint.fp_logits, cat.fp_logits)
    small = forward_labeled_and_weak(model, x_l, x_w[..., :16, :16], True, 0.5)
    assert small.logits_l.shape == (2, 3, 32, 32) and small.logits_w.shape == (3, 3, 16, 16)
    assert small.fp_logits.shape == (3, 3, 16, 16) and small.features_w.shape[-1] == 4
    # A whole UniMatch + CISC step on half-size unlabeled batches: 4 forwards, a finite loss.
    lb, ub = _batches(size=32), _batches(size=16)
    b = {"labeled": lb["labeled"], "unlabeled": ub["unlabeled"], "mix": ub["mix"]}
    step = OnlineStep(OnlineRecipe(threshold=0.0, cisc="mask", prototype_source="memory"), 3)
    calls, forward = [], model.forward
    model.forward = lambda x, *a, **k: calls.append(tuple(x.shape)) or forward(x, *a, **k)
    loss, scalars = step(model, b, 0)
    loss.backward()
    assert calls == [(2, 3, 16, 16), (2, 3, 32, 32), (2, 3, 16, 16), (4, 3, 16, 16)]
    assert math.isfinite(float(loss)) and scalars["mask_ratio"] == 1.0
    # The setting: the unlabeled views' crop and scale range times it; 1 by default.
    cfg = load_config("synthetic", ["method.name=unimatch", "train.unlabeled_resolution=0.5"])
    ctx = SimpleNamespace(cfg=cfg, unlabeled=[], info=SimpleNamespace(num_classes=3))
    t = cfg.train
    assert (_views(ctx, 0).weak.crop_size, _views(ctx, 0).weak.scale_range) == (
        round(t.crop_size / 2), (t.scale_range[0] / 2, t.scale_range[1] / 2))
    assert load_config("synthetic", ["method.name=unimatch"]).train.unlabeled_resolution == 1.0


@pytest.mark.parametrize("setting", ["train.unlabeled_resolution=0.5", "method.unlabeled_every=2"])
def test_stagewise_methods_refuse_the_online_cost_levers(setting):
    from types import SimpleNamespace

    from ciscr.config import load_config
    from ciscr.errors import ConfigError
    from ciscr.methods import get_recipe

    cfg = load_config("synthetic", ["method.name=ciscr", setting])
    with pytest.raises(ConfigError, match=setting.split("=")[0] + ".*stage-wise"):
        get_recipe("ciscr").run(SimpleNamespace(cfg=cfg))
