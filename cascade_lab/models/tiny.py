"""The ``tiny`` variant: random-weight tiny models of every stage from a fixed seed, no files needed.

Tests, CI notebooks and plugin authors run the whole pipeline with it offline in seconds. The images are
noise (the weights are random); the shapes, dtypes, plumbing and maths are the real ones.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

TINY_SEED = 0
TINY_EFFNET_SEED = 7


class CharTokenizer:
    """A tokenizer that needs no files: one id per UTF-8 byte, plus CLIP's start and end tokens.

    It answers the subset of the ``transformers`` tokenizer call that `TextEncoder` uses.
    """

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 257

    def __len__(self) -> int:
        return 258

    def __call__(self, prompts: str | Sequence[str], **_: Any) -> dict[str, list[list[int]]]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return {"input_ids": [list(p.lower().encode("utf-8")) for p in prompts]}


def tiny_text_encoder(hidden: int = 24, projection: int = 24, seed: int = TINY_SEED) -> Any:
    """A 2-layer random CLIP text tower (`TextEncoder`) with the byte tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .clip import TextEncoder

    tokenizer = CharTokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(seed)
    return TextEncoder(CLIPTextModelWithProjection(config).eval(), tokenizer)


def tiny_image_encoder(projection: int = 12, seed: int = TINY_SEED) -> Any:
    """A 2-layer random CLIP vision tower (`ImageEncoder`) taking the usual 224 px input."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from .clip import ImageEncoder

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=224, patch_size=32, projection_dim=projection)
    torch.manual_seed(seed)
    return ImageEncoder(CLIPVisionModelWithProjection(config).eval())


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every float parameter with small seeded noise, so no layer is zero (zero-init outputs hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() <= 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
    return module.eval()


@torch.no_grad()
def calibrated_random_effnet(seed: int = TINY_EFFNET_SEED) -> nn.Module:
    """The real EfficientNetV2-S encoder with random weights and BatchNorm statistics set on seeded noise images.

    Untrained, every BatchNorm is the identity and the latents come out ~1e-6; one pass in training mode over
    smooth random images sets the running statistics, so the latents have roughly unit variance like the
    real encoder's (its final non-affine BatchNorm whitens them).
    """
    from .effnet import EfficientNetEncoder, imagenet_normalize

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        effnet = EfficientNetEncoder()
        generator = torch.Generator().manual_seed(seed)
        # smooth, blocky (sharp edges, flat areas) and pixel-noise images, so photos and drawings both fall inside
        smooth = nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=generator), size=(128, 128),
                                           mode="bilinear", align_corners=False)
        blocky = nn.functional.interpolate(torch.rand(8, 3, 4, 4, generator=generator).round(), size=(128, 128),
                                           mode="nearest")
        images = torch.cat([smooth, blocky, torch.rand(4, 3, 128, 128, generator=generator)])
        for m in effnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration pass
        effnet.eval()
        for m in effnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()  # batch statistics only; stochastic depth stays off
        effnet(imagenet_normalize(images))
    return effnet.eval().requires_grad_(False)


def build_tiny(seed: int = TINY_SEED, **_: Any) -> Any:
    """Every stage as a tiny random model (`pipeline.Stages`), identical for the same seed."""
    from ..pipeline import Lazy, Stages
    from .previewer import PreviewerConfig
    from .stage_a import StageAConfig
    from .stage_b import StageBConfig
    from .stage_c import StageCConfig

    return Stages(
        stage_c=_randomize(StageCConfig.tiny().build(), seed),
        stage_b=_randomize(StageBConfig.tiny().build(), seed + 1),
        stage_a=_randomize(StageAConfig.tiny().build(), seed + 2),
        previewer=_randomize(PreviewerConfig.tiny().build(), seed + 3),
        # built on first use (img2img, training), then kept: it is ~4 s of the ~5 s this function takes
        effnet=Lazy(functools.cache(functools.partial(calibrated_random_effnet))),
        text_encoder=tiny_text_encoder(seed=seed + 4),
        image_encoder=tiny_image_encoder(seed=seed + 5),
        variant="tiny",
    )
