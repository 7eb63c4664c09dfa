"""Segmentation models: torchvision-compatible backbones and DeepLabV3+."""

from ciscr.models.backbones import load_pretrained
from ciscr.models.deeplabv3plus import DeepLabV3Plus, SegOutput
from ciscr.models.factory import BACKBONES, build_backbone, build_model, inference_layout
from ciscr.models.weights import IMAGENET_WEIGHTS, resolve_pretrained

__all__ = [
    "BACKBONES",
    "IMAGENET_WEIGHTS",
    "DeepLabV3Plus",
    "SegOutput",
    "build_backbone",
    "build_model",
    "inference_layout",
    "load_pretrained",
    "resolve_pretrained",
]
