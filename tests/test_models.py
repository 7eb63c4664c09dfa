"""Backbones (torchvision key layout, dilation), DeepLabV3+ shapes, strict weight loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ciscr.config import ModelCfg
from ciscr.errors import ConfigError, WeightsError
from ciscr.models import BACKBONES, DeepLabV3Plus, SegOutput, build_model
from ciscr.models.backbones import load_pretrained, mobilenet_v2, resnet18
from ciscr.models.factory import build_backbone

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CISCR_SHARED", REPO.parent / "shared"))
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pth"

# 65x79 input: stride 2 convs/pools with padding give ceil(n/2) each time.
H, W = 65, 79
LOW_HW = (17, 20)  # ceil(65/4), ceil(79/4)
HIGH_HW = {8: (9, 10), 16: (5, 5)}  # ceil(65/8), ceil(79/8); ceil(65/16), ceil(79/16)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- key layout

# (state_dict entries, parameter count) of torchvision's resnet18/50/101 and mobilenet_v2.
TORCHVISION_SIZES = {
    "resnet18": (122, 11_689_512),
    "resnet50": (320, 25_557_032),
    "resnet101": (626, 44_549_160),
    "mobilenet_v2": (314, 3_504_872),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_SIZES))
def test_state_dict_size_matches_torchvision(name: str) -> None:
    model = BACKBONES[name](output_stride=16)
    n_keys, n_params = TORCHVISION_SIZES[name]
    assert len(model.state_dict()) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_torchvision_key_names_and_shapes() -> None:
    r50 = BACKBONES["resnet50"](output_stride=8).state_dict()
    assert r50["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert r50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert r50["layer4.2.bn3.running_var"].shape == (2048,)
    assert r50["fc.weight"].shape == (1000, 2048)
    r18 = resnet18(8).state_dict()
    assert r18["layer2.0.downsample.1.num_batches_tracked"].shape == ()
    assert r18["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    mnv2 = mobilenet_v2(8).state_dict()
    assert mnv2["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert mnv2["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # depthwise, t=1
    assert mnv2["features.1.conv.1.weight"].shape == (16, 32, 1, 1)
    assert mnv2["features.2.conv.1.0.weight"].shape == (96, 1, 3, 3)  # depthwise, t=6
    assert mnv2["features.17.conv.3.weight"].shape == (320,)
    assert mnv2["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert mnv2["classifier.1.weight"].shape == (1000, 1280)


def test_dilation_placement() -> None:
    r18 = resnet18(8)
    # The first block of a dilated layer keeps the previous dilation, stride 1.
    assert r18.layer3[0].conv1.stride == (1, 1) and r18.layer3[0].conv1.dilation == (1, 1)
    assert r18.layer3[1].conv1.dilation == (2, 2)
    assert r18.layer4[0].conv1.dilation == (2, 2) and r18.layer4[1].conv2.dilation == (4, 4)
    assert r18.layer4[0].downsample[0].stride == (1, 1)
    m8, m16 = mobilenet_v2(8).features, mobilenet_v2(16).features
    dw = lambda f, i: f[i].conv[1][0]  # noqa: E731  depthwise conv of block i (t=6)
    assert dw(m8, 4).stride == (2, 2)  # stride 4 -> 8 still happens at OS 8
    assert dw(m8, 7).stride == (1, 1) and dw(m8, 7).dilation == (1, 1)
    assert dw(m8, 8).dilation == (2, 2) and dw(m8, 14).dilation == (2, 2)
    assert dw(m8, 15).dilation == (4, 4) and dw(m8, 17).dilation == (4, 4)
    assert dw(m16, 7).stride == (2, 2) and dw(m16, 13).dilation == (1, 1)
    assert dw(m16, 14).stride == (1, 1) and dw(m16, 16).dilation == (2, 2)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_backbone_feature_shapes(name: str, output_stride: int) -> None:
    backbone = BACKBONES[name](output_stride=output_stride)
    low, high = backbone.forward_features(torch.randn(2, 3, H, W))
    assert low.shape == (2, backbone.low_channels, *LOW_HW)
    assert high.shape == (2, backbone.high_channels, *HIGH_HW[output_stride])
    assert (backbone.low_channels, backbone.high_channels) == (
        (64, 512) if name == "resnet18" else (24, 320)
    )


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_deeplab_odd_size_train_mode(name: str, output_stride: int) -> None:
    model = build_model(ModelCfg(backbone=name, output_stride=output_stride), num_classes=5)
    model.train()
    out = model(torch.randn(2, 3, H, W))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 5, H, W)
    assert out.features.shape == (2, 256, *LOW_HW)
    assert out.features.min() >= 0 and out.features.max() > 0


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_deep_resnets_tiny_forward(name: str) -> None:
    model = build_model(ModelCfg(backbone=name, output_stride=16), num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 35))
        high = model.forward_backbone_features(torch.randn(1, 3, 33, 35))
    assert out.logits.shape == (1, 3, 33, 35) and out.features.shape == (1, 256, 9, 9)
    assert high.shape == (1, 2048, 3, 3)
    assert model.backbone.low_channels == 256


def test_mobilenet_321_eval_logits_come_from_features() -> None:
    model = build_model(ModelCfg(backbone="mobilenet_v2", output_stride=16), 4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 321, 321))
        # In eval mode dropout is the identity, so logits are exactly the classifier applied
        # to the returned features, upsampled.
        again = F.interpolate(model.classifier(out.features), size=(321, 321), mode="bilinear")
    assert out.features.shape == (1, 256, 81, 81)
    torch.testing.assert_close(out.logits, again)


def test_parameter_groups_and_every_parameter_gets_a_gradient() -> None:
    model = build_model(ModelCfg(backbone="mobilenet_v2", output_stride=16), 3).train()
    keys = model.state_dict().keys()
    # The ImageNet-only modules are gone, so DDP sees no parameter without a gradient.
    assert not any(k.startswith(("backbone.classifier", "backbone.features.18")) for k in keys)
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    head_ids = {id(p) for p in model.head_parameters()}
    assert not backbone_ids & head_ids
    assert backbone_ids | head_ids == {id(p) for p in model.parameters()}
    out = model(torch.randn(2, 3, 40, 44))
    (out.logits.mean() + out.features.mean()).backward()
    assert all(p.grad is not None for p in model.parameters())
    r18 = DeepLabV3Plus(resnet18(16), 2, (6, 12, 18))
    assert "backbone.fc.weight" not in r18.state_dict()


def test_aspp_dilations_follow_output_stride() -> None:
    m8 = build_model(ModelCfg(backbone="mobilenet_v2", output_stride=8), 2)
    m16 = build_model(ModelCfg(backbone="mobilenet_v2", output_stride=16), 2)
    custom = build_model(
        ModelCfg(backbone="mobilenet_v2", output_stride=16, aspp_dilations=(1, 2, 3)), 2
    )
    rates = lambda m: [b[0].dilation[0] for b in (m.head.b1, m.head.b2, m.head.b3)]  # noqa: E731
    assert rates(m8) == [12, 24, 36] and rates(m16) == [6, 12, 18] and rates(custom) == [1, 2, 3]
    assert m8.dropout.p == pytest.approx(0.1)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="resnet18, resnet50, resnet101") as info:
        build_backbone("xception65", 8)
    assert "xception65" in str(info.value) and "mobilenet_v2" in str(info.value)
    with pytest.raises(ConfigError, match="output_stride"):
        build_backbone("resnet18", 32)


# --------------------------------------------------------------------------- weights


def test_load_pretrained_roundtrip_and_empty_path(tmp_path: Path) -> None:
    source = mobilenet_v2(16)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    target = mobilenet_v2(8)  # dilation does not change any shape
    load_pretrained(target, "")  # no-op
    assert not torch.equal(target.features[0][0].weight, source.features[0][0].weight)
    load_pretrained(target, str(path))
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_missing_and_corrupt_files_raise(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="not found") as info:
        build_backbone("resnet18", 16, str(missing))
    assert str(missing) in str(info.value)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 this is not a torch file")
    with pytest.raises(WeightsError, match="cannot read") as info:
        load_pretrained(resnet18(16), corrupt)
    assert str(corrupt) in str(info.value) and "\n" not in str(info.value)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(WeightsError, match="not a state_dict"):
        load_pretrained(resnet18(16), not_a_dict)


def test_wrong_keys_and_shapes_raise(tmp_path: Path) -> None:
    state = resnet18(16).state_dict()
    state["module.fc.weight"] = state.pop("fc.weight")
    bad_keys = tmp_path / "keys.pth"
    torch.save(state, bad_keys)
    with pytest.raises(WeightsError) as info:
        load_pretrained(resnet18(16), bad_keys)
    msg = str(info.value)
    assert str(bad_keys) in msg and "1 missing: fc.weight" in msg
    assert "1 unexpected: module.fc.weight" in msg

    state = resnet18(16).state_dict()
    state["fc.weight"] = torch.zeros(10, 512)
    bad_shape = tmp_path / "shape.pth"
    torch.save(state, bad_shape)
    with pytest.raises(WeightsError, match=r"1 shape: fc.weight \(10, 512\) vs \(1000, 512\)"):
        load_pretrained(resnet18(16), bad_shape)
    # A ResNet-18 file into MobileNetV2: many problems, listed briefly on one line.
    with pytest.raises(WeightsError, match=r"missing: features\.0\.0\.weight.*more") as info:
        load_pretrained(mobilenet_v2(16), bad_shape)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not MOBILENET_WEIGHTS.is_file(), reason="shared ImageNet weights absent")
def test_real_mobilenet_weights_load_strictly() -> None:
    expected = torch.load(MOBILENET_WEIGHTS, map_location="cpu", weights_only=True)
    model = build_model(
        ModelCfg(backbone="mobilenet_v2", output_stride=16, pretrained=str(MOBILENET_WEIGHTS)), 2
    )
    got = model.backbone.state_dict()
    assert (
        len(expected) == 314 and len(got) == 314 - 8
    )  # minus features.18.* (6) and classifier.1.* (2)
    for k, v in got.items():
        assert torch.equal(v, expected[k]), k


def test_inference_layout_keeps_the_outputs() -> None:
    """Frozen models run channels_last (faster on CPU bf16) and predict what NCHW predicts."""
    from ciscr.models import inference_layout

    model = build_model(ModelCfg(backbone="resnet18", output_stride=16, channels=16), 3).eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        ref = model(x)
        got = inference_layout(model)(x)  # NCHW input, channels_last weights
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.features, ref.features, rtol=1e-4, atol=1e-4)
    plain = build_model(ModelCfg(backbone="resnet18", output_stride=16, channels=16), 3)
    assert inference_layout(plain, channels_last=False).backbone.conv1.weight.is_contiguous()
