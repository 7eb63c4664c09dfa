"""DeepLabV3+ (METHOD.md section 1), laid out like the ST++ / CISC-R released code.

``backbone -> ASPP(high) -> upsample to the low-level map -> concat with reduce(low) -> fuse ->
dropout -> classifier -> bilinear upsample to the input size``.

``SegOutput.features`` is the output of ``fuse`` after its last ReLU and BEFORE ``Dropout(0.1)``:
256 channels, stride 4, non-negative. Taking it before the dropout means the CISC prototypes and
maps never see that dropout's noise and have the same scale in train and eval mode (dropout
rescales by 1/(1-p) in training). The released code applies the dropout inside ``fuse``; moving it
out changes no parameter name (dropout has none). The ASPP's own Dropout2d(0.5) stays upstream,
as in the released code, so train-mode features are still stochastic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SegOutput", "ASPP", "DeepLabV3Plus"]

ASPP_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48
FEATURE_CHANNELS = 256


class SegOutput(NamedTuple):
    """What a segmentation model returns.

    logits:   (B,K,H,W) at the input resolution.
    features: (B,256,ceil(H/4),ceil(W/4)), the non-negative ``fuse`` output (before dropout).
    """

    logits: Tensor
    features: Tensor
    fp_logits: Tensor | None = None  # UniMatch's feature-perturbation branch (forward(fp_last=n))


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = (kernel - 1) // 2 * dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _ImagePooling(nn.Module):
    """Global average pool -> 1x1 conv+BN+ReLU -> broadcast back to the input size."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = _conv_bn_relu(cin, cout)

    def forward(self, x: Tensor) -> Tensor:
        # Bilinear upsampling of a 1x1 map is a broadcast; expand() avoids the copy.
        return self.conv(self.pool(x)).expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 + three 3x3 atrous + image pooling, 256 ch each,
    concatenated and projected to 256 ch, then ``Dropout2d(dropout)`` (0.5 in the ST++ code;
    UniMatch's model has none).

    (B,Cin,h,w) -> (B,256,h,w).
    """

    def __init__(
        self,
        in_channels: int,
        dilations: tuple[int, int, int],
        channels: int = ASPP_CHANNELS,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        c = channels
        self.b0 = _conv_bn_relu(in_channels, c)
        self.b1 = _conv_bn_relu(in_channels, c, 3, dilations[0])
        self.b2 = _conv_bn_relu(in_channels, c, 3, dilations[1])
        self.b3 = _conv_bn_relu(in_channels, c, 3, dilations[2])
        self.b4 = _ImagePooling(in_channels, c)
        # p = 0 keeps the module (no parameters either way): the state-dict keys never change.
        self.project = nn.Sequential(*_conv_bn_relu(5 * c, c), nn.Dropout2d(dropout))

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project(torch.cat(branches, dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on any backbone that implements ``forward_features`` (see backbones.py).

    Args:
        backbone: module with ``forward_features(x) -> (low, high)`` and the attributes
            ``low_channels`` / ``high_channels``. Load its pretrained weights BEFORE passing it
            in: its ImageNet-only head is removed here (``drop_classifier()``), because
            parameters that never receive a gradient break DistributedDataParallel.
        num_classes: K, the number of output channels.
        aspp_dilations: atrous rates of the three 3x3 ASPP branches ((12, 24, 36) for output
            stride 8, (6, 12, 18) for 16).
        dropout: dropout probability after ``fuse`` (0.1 in the paper and ST++'s code).
        aspp_dropout: Dropout2d probability after the ASPP projection (0.5 in ST++'s code).
            UniMatch's model has neither (``model.*`` presets of the online methods: 0).
        channels: width of ASPP and ``fuse``, i.e. of the features F (256 in the paper; a
            smaller width makes CPU demos and tests fast, the method is unchanged).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        aspp_dilations: tuple[int, int, int] = (12, 24, 36),
        dropout: float = 0.1,
        channels: int = FEATURE_CHANNELS,
        aspp_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(tuple(aspp_dilations)) != 3:
            raise ValueError(f"aspp_dilations needs three rates, got {aspp_dilations}")
        drop = getattr(backbone, "drop_classifier", None)
        if callable(drop):
            drop()
        self.backbone = backbone
        self.num_classes = num_classes
        low_ch, high_ch = int(backbone.low_channels), int(backbone.high_channels)
        self.head = ASPP(high_ch, tuple(aspp_dilations), channels, aspp_dropout)
        self.reduce = _conv_bn_relu(low_ch, LOW_LEVEL_CHANNELS)
        self.fuse = nn.Sequential(
            *_conv_bn_relu(channels + LOW_LEVEL_CHANNELS, channels, 3),
            *_conv_bn_relu(channels, channels, 3),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=True)
        self._init_head()

    def _init_head(self) -> None:
        # torchvision's init for conv + BN decoders; ST++ and UniMatch keep PyTorch's default
        # (docs/METHOD-NOTES.md: decoder details, the same for every method).
        for m in self.head_modules():
            for sub in m.modules():
                if isinstance(sub, nn.Conv2d) and sub is not self.classifier:
                    nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(sub, nn.BatchNorm2d):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)

    def head_modules(self) -> list[nn.Module]:
        """Every module that is not the backbone (they train at ``head_lr_mult`` x lr)."""
        return [self.head, self.reduce, self.fuse, self.classifier]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the (pretrained) backbone: the base learning rate group."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of ASPP, reduce, fuse and classifier: the x10 learning rate group."""
        for m in self.head_modules():
            yield from m.parameters()

    def forward_backbone_features(self, x: Tensor) -> Tensor:
        """(B,3,H,W) -> the backbone's high-level map (B,high_channels,~H/os,~W/os)."""
        return self.backbone.forward_features(x)[1]

    def _decode(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder maps -> (features (B,C,h/4,w/4), logits at feature resolution)."""
        high = self.head(high)
        # align_corners=False everywhere: matches F.interpolate's default and the evaluation
        # code; the decoder is trained with it, so the choice only has to be consistent.
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        features = self.fuse(torch.cat([self.reduce(low), high], dim=1))
        return features, self.classifier(self.dropout(features))

    def forward(self, x: Tensor, fp_last: int = 0, fp_p: float = 0.5) -> SegOutput:
        """(B,3,H,W) -> SegOutput(logits (B,K,H,W), features (B,C,ceil(H/4),ceil(W/4))).

        ``fp_last = n > 0`` (UniMatch's feature perturbation): the encoder maps of the LAST n
        images are decoded a second time with ``Dropout2d(fp_p)`` on them, in the same decoder
        batch as the clean maps (as UniMatch does, so BatchNorm sees both); their logits are
        ``fp_logits`` (n,K,H,W). Only those images are perturbed (the unlabeled ones).
        """
        low, high = self.backbone.forward_features(x)
        b = x.shape[0]
        if fp_last > 0:
            low = torch.cat([low, F.dropout2d(low[b - fp_last :], fp_p, training=True)])
            high = torch.cat([high, F.dropout2d(high[b - fp_last :], fp_p, training=True)])
        features, logits = self._decode(low, high)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if fp_last > 0:
            return SegOutput(logits[:b], features[:b], logits[b:])
        return SegOutput(logits=logits, features=features)
