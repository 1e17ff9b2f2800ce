"""Stable Cascade's modules with the official attribute names: ``state_dict()`` is the checkpoint format.

The CLIP wrappers (`clip.TextEncoder`, `clip.ImageEncoder`) import ``transformers`` only when built.
"""

from __future__ import annotations

from .clip import ImageEncoder, TextEncoder
from .controlnet import ControlNet, ControlNetConfig
from .effnet import EfficientNetEncoder, EfficientNetEncoderConfig, efficientnet_v2_s_features, imagenet_normalize
from .lora import LoraHandle, LoraWeights, apply_lora, load_lora_file, unload_all
from .previewer import Previewer, PreviewerConfig
from .stage_a import StageA, StageAConfig
from .stage_b import StageB, StageBConfig
from .stage_c import StageC, StageCConfig

__all__ = [
    "ControlNet",
    "ControlNetConfig",
    "EfficientNetEncoder",
    "EfficientNetEncoderConfig",
    "ImageEncoder",
    "LoraHandle",
    "LoraWeights",
    "Previewer",
    "PreviewerConfig",
    "StageA",
    "StageAConfig",
    "StageB",
    "StageBConfig",
    "StageC",
    "StageCConfig",
    "TextEncoder",
    "apply_lora",
    "efficientnet_v2_s_features",
    "imagenet_normalize",
    "load_lora_file",
    "unload_all",
]
