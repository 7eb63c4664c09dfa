"""Build backbones and DeepLabV3+ from the ``model`` section of the config."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ciscr.config import ModelCfg
from ciscr.errors import ConfigError
from ciscr.models.backbones import load_pretrained, mobilenet_v2, resnet18, resnet50, resnet101
from ciscr.models.deeplabv3plus import DeepLabV3Plus
from ciscr.models.weights import resolve_pretrained

__all__ = ["BACKBONES", "build_backbone", "build_model", "default_aspp_dilations"]

# name -> constructor(output_stride) of a backbone with torchvision state_dict keys.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "mobilenet_v2": mobilenet_v2,
}


def default_aspp_dilations(output_stride: int) -> tuple[int, int, int]:
    """The DeepLab atrous rates: (12, 24, 36) at output stride 8, (6, 12, 18) at 16."""
    if output_stride not in (8, 16):
        raise ConfigError(f"model.output_stride must be 8 or 16, got {output_stride}")
    return (12, 24, 36) if output_stride == 8 else (6, 12, 18)


def build_backbone(name: str, output_stride: int, pretrained: str = "") -> nn.Module:
    """Construct backbone *name* and load *pretrained* strictly.

    *pretrained* is '' (random init), a local state_dict path, or a name such as ``imagenet``
    (see :mod:`ciscr.models.weights`: found in torch's hub cache or downloaded there).

    Raises ConfigError for an unknown name or stride, WeightsError for a bad weight file or a
    failed download.
    """
    if name not in BACKBONES:
        raise ConfigError(
            f"model.backbone: unknown backbone '{name}' (valid: {', '.join(BACKBONES)})"
        )
    if output_stride not in (8, 16):
        raise ConfigError(f"model.output_stride must be 8 or 16, got {output_stride}")
    backbone = BACKBONES[name](output_stride=output_stride)
    load_pretrained(backbone, resolve_pretrained(name, pretrained))
    return backbone


def build_model(cfg: ModelCfg, num_classes: int) -> DeepLabV3Plus:
    """DeepLabV3+ for *num_classes* classes from ``cfg.model`` (weights loaded if given)."""
    backbone = build_backbone(cfg.backbone, cfg.output_stride, cfg.pretrained)
    dilations = cfg.aspp_dilations or default_aspp_dilations(cfg.output_stride)
    return DeepLabV3Plus(backbone, num_classes, tuple(dilations), dropout=cfg.dropout,
                         channels=cfg.channels, aspp_dropout=cfg.aspp_dropout)


def inference_layout(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """``model`` (frozen, in place) in the memory layout its inference runs fastest in.

    channels_last: the same outputs as contiguous NCHW (inputs may stay NCHW: a convolution
    with channels_last weights works in that layout) and, on a CPU in bf16, faster forwards
    (``ciscr bench``: docs/results/infer_layout/speed_cpu.md, and the teacher table of
    docs/results/speed_cpu.md). The training step is not faster in it
    on this CPU, which is why ``train.channels_last`` stays off and this applies only to frozen
    models: the teacher, pseudo-labelling, selection and evaluation. MPS is left as it is.
    """
    dev = next(model.parameters(), None)
    if channels_last and dev is not None and dev.device.type != "mps":
        import torch

        model.to(memory_format=torch.channels_last)
    return model
