"""Segmentation models: torchvision-compatible backbones and DeepLabV3+."""

from ciscr.models.backbones import load_pretrained
from ciscr.models.deeplabv3plus import DeepLabV3Plus, SegOutput
from ciscr.models.factory import BACKBONES, build_backbone, build_model

__all__ = [
    "BACKBONES",
    "DeepLabV3Plus",
    "SegOutput",
    "build_backbone",
    "build_model",
    "load_pretrained",
]
