"""ResNet-18/50/101 and MobileNetV2 backbones, written here so that torchvision is not needed.

Module names and parameter shapes mirror torchvision exactly, so the standard ImageNet ``.pth``
state_dicts (``resnet50-*.pth``, ``mobilenet_v2-*.pth``) load with ``strict=True``; the
classification head (``fc`` / ``classifier`` and MobileNetV2's last 1x1 conv) exists only for
that reason and is removed by :class:`~ciscr.models.deeplabv3plus.DeepLabV3Plus`.

Every backbone implements the small protocol the segmentation head relies on:

- ``forward_features(x: (B,3,H,W)) -> (low (B,low_channels,ceil(H/4),ceil(W/4)),
  high (B,high_channels,~H/os,~W/os))``
- attributes ``low_channels``, ``high_channels``, ``output_stride``
- ``drop_classifier()``: delete the ImageNet-only modules (their parameters would never get a
  gradient, which DistributedDataParallel rejects).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ciscr.errors import WeightsError

__all__ = [
    "ResNet",
    "MobileNetV2",
    "resnet18",
    "resnet50",
    "resnet101",
    "mobilenet_v2",
    "load_pretrained",
]


def _check_output_stride(output_stride: int) -> None:
    # Only 8 and 16 are meaningful for DeepLabV3+; 32 is accepted for classification use.
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")


# --------------------------------------------------------------------------- ResNet


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding == dilation keeps the spatial size at stride 1 for any dilation.
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block (torchvision layout). Unlike torchvision it supports dilation > 1."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50/101 block, torchvision "v1.5" (the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-compatible ResNet with ``replace_stride_with_dilation`` set from the stride.

    Output stride 8 dilates layer3 (x2) and layer4 (x4); 16 dilates layer4 (x2); 32 none.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        output_stride: int = 8,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        _check_output_stride(output_stride)
        self.output_stride = output_stride
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}
        d2, d3, d4 = dilate[output_stride]
        self.inplanes = 64
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=d2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=d3)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=d4)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc: nn.Module | None = nn.Linear(512 * block.expansion, num_classes)
        self.low_channels = 64 * block.expansion
        self.high_channels = 512 * block.expansion
        self._init_weights()

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        # Same bookkeeping as torchvision: the first block of a dilated layer keeps the previous
        # dilation (it replaces the stride-2 conv), the following blocks use the new one.
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, dilation=self.dilation))
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B,3,H,W) -> (layer1 output (B,low_channels,H/4,W/4), layer4 output (B,high,H/os,W/os))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet classification: (B,3,H,W) -> logits (B,1000). Unavailable after drop."""
        if self.fc is None:
            raise RuntimeError("the classifier of this backbone was dropped")
        _, high = self.forward_features(x)
        return self.fc(torch.flatten(self.avgpool(high), 1))

    def drop_classifier(self) -> None:
        """Remove ``fc`` (never used for segmentation)."""
        self.fc = None


def resnet18(output_stride: int = 8) -> ResNet:
    """ResNet-18 (low 64 ch, high 512 ch)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), output_stride)


def resnet50(output_stride: int = 8) -> ResNet:
    """ResNet-50 (low 256 ch, high 2048 ch)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), output_stride)


def resnet101(output_stride: int = 8) -> ResNet:
    """ResNet-101 (low 256 ch, high 2048 ch)."""
    return ResNet(Bottleneck, (3, 4, 23, 3), output_stride)


# --------------------------------------------------------------------------- MobileNetV2


class ConvBNReLU6(nn.Sequential):
    """torchvision's ``Conv2dNormActivation`` with ReLU6: keys ``0.weight``, ``1.*``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(
                cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=False
            ),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block; ``conv`` = [expand 1x1] + depthwise 3x3 + project 1x1 + BN."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, dilation: int = 1):
        super().__init__()
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, dilation=dilation, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expansion t, channels c, repeats n, first stride s) -- torchvision / the paper, width 1.0.
_MOBILENET_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """torchvision-compatible MobileNetV2 (width 1.0) with DeepLab-style dilation.

    Once the running stride reaches ``output_stride``, every later stride-2 stage runs at stride
    1 and multiplies the dilation instead (the DeepLabV3 MobileNet recipe): at output stride 8
    the 64-ch stage and everything after it is dilated, at 16 the 160-ch stage and after.
    ``features[18]`` (1x1 conv to 1280) and ``classifier`` exist only for ImageNet weights.
    """

    def __init__(self, output_stride: int = 8, num_classes: int = 1000) -> None:
        super().__init__()
        _check_output_stride(output_stride)
        self.output_stride = output_stride
        layers: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
        cin, current_stride, dilation = 32, 2, 1
        for t, c, n, s in _MOBILENET_V2_SETTING:
            previous_dilation = dilation
            if s > 1 and current_stride >= output_stride:
                stride, dilation = 1, dilation * s
            else:
                stride, current_stride = s, current_stride * s
            for i in range(n):
                # The first block of a dilated stage keeps the previous dilation (it replaces
                # the stride-2 conv), as in torchvision's ResNet.
                d = previous_dilation if i == 0 else dilation
                layers.append(InvertedResidual(cin, c, stride if i == 0 else 1, t, d))
                cin = c
        layers.append(ConvBNReLU6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier: nn.Module | None = nn.Sequential(
            nn.Dropout(p=0.2), nn.Linear(1280, num_classes)
        )
        self.low_channels = 24
        self.high_channels = 320
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B,3,H,W) -> (features[:4] (B,24,H/4,W/4), features[4:18] (B,320,H/os,W/os))."""
        # Explicit indices (not features[:-1]) so this stays right after drop_classifier().
        low = self.features[:4](x)
        high = self.features[4:18](low)
        return low, high

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet classification: (B,3,H,W) -> logits (B,1000). Unavailable after drop."""
        if self.classifier is None:
            raise RuntimeError("the classifier of this backbone was dropped")
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)

    def drop_classifier(self) -> None:
        """Remove ``features[18]`` and ``classifier`` (never used for segmentation)."""
        if len(self.features) == 19:
            del self.features[18]
        self.classifier = None


def mobilenet_v2(output_stride: int = 8) -> MobileNetV2:
    """MobileNetV2 width 1.0 (low 24 ch, high 320 ch)."""
    return MobileNetV2(output_stride)


# --------------------------------------------------------------------------- weights


def _read_state_dict(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        from ciscr.config import path_hint

        hint = path_hint("model.pretrained", path) or " (model.pretrained)"
        raise WeightsError(f"{path}: pretrained weight file not found{hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt zip, pickle with code, truncated file, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise WeightsError(f"{path}: cannot read pretrained weights ({reason})") from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(
            f"{path}: not a state_dict (expected a mapping of parameter names to tensors)"
        )
    return obj


def _mismatch_message(
    expected: Mapping[str, Tensor], got: Mapping[str, Tensor], limit: int = 5
) -> str | None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and got[k].shape != v.shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts) or None


def load_pretrained(module: nn.Module, path: str | os.PathLike) -> None:
    """Load an ImageNet state_dict into *module* strictly; ``''`` means random init (no-op).

    Raises :class:`WeightsError` (one line naming *path*) for a missing or unreadable file and
    for any missing/unexpected key or shape mismatch -- never silently trains from scratch.
    """
    if str(path) == "":
        return
    path = Path(path)
    state = _read_state_dict(path)
    problem = _mismatch_message(module.state_dict(), state)
    if problem is not None:
        name = type(module).__name__
        raise WeightsError(f"{path}: does not match {name} ({problem})")
    module.load_state_dict(state, strict=True)
