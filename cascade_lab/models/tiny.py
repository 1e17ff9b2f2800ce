"""The ``tiny`` variant: random-weight tiny models of every stage from a fixed seed, no files needed.

Tests, CI notebooks and plugin authors run the whole pipeline with it offline in seconds. The images are
noise (the weights are random); the shapes, dtypes, plumbing and maths are the real ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

TINY_SEED = 0


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


def build_tiny(seed: int = TINY_SEED, **_: Any) -> Any:
    """Every stage as a tiny random model (`pipeline.Stages`), identical for the same seed."""
    from ..pipeline import Stages
    from .effnet import EfficientNetEncoder
    from .previewer import PreviewerConfig
    from .stage_a import StageAConfig
    from .stage_b import StageBConfig
    from .stage_c import StageCConfig

    return Stages(
        stage_c=_randomize(StageCConfig.tiny().build(), seed),
        stage_b=_randomize(StageBConfig.tiny().build(), seed + 1),
        stage_a=_randomize(StageAConfig.tiny().build(), seed + 2),
        previewer=_randomize(PreviewerConfig.tiny().build(), seed + 3),
        effnet=EfficientNetEncoder().eval(),
        text_encoder=tiny_text_encoder(seed=seed + 4),
        image_encoder=tiny_image_encoder(seed=seed + 5),
        variant="tiny",
    )
