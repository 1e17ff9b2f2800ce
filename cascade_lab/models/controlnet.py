"""Stage C ControlNets (official ``modules/controlnet.py``): a control image -> features added to Stage C.

``ControlNet(x)`` returns a list with one entry per Stage C ResBlock call (down path, then up path),
a [B, c_proj, h, w] tensor at each index of ``proj_blocks`` and None elsewhere. Stage C resizes each
entry bilinearly (align_corners=True) and adds it to x right before that ResBlock (``StageC(..., cnet=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .common import LayerNorm2d

Tensor = torch.Tensor

BOTTLENECK_MODES = ("effnet", "simple", "large")
_SHIPPED_BLOCKS = [0, 4, 8, 12, 51, 55, 59, 63]  # canny, inpainting, super-resolution (3.6B Stage C)


@dataclass
class ControlNetConfig:
    """Constructor arguments of `ControlNet` (the official keyword names), with the shipped presets."""

    c_in: int = 3
    c_proj: int = 2048
    proj_blocks: list[int] = field(default_factory=lambda: list(_SHIPPED_BLOCKS))
    bottleneck_mode: str = "effnet"

    @classmethod
    def canny(cls) -> ControlNetConfig:
        """controlnet/canny.safetensors: 1-channel edge map in [0, 1], EfficientNetV2-S backbone."""
        return cls(c_in=1)

    @classmethod
    def inpainting(cls) -> ControlNetConfig:
        """controlnet/inpainting.safetensors: RGB with masked pixels set to 1, plus the mask (4 channels)."""
        return cls(c_in=4)

    @classmethod
    def super_resolution(cls) -> ControlNetConfig:
        """controlnet/super_resolution.safetensors: effnet latent of the low-res image, upsampled x2."""
        return cls(c_in=16, bottleneck_mode="large")

    @classmethod
    def identity(cls) -> ControlNetConfig:
        """face.safetensors (withdrawn): a 512-channel ArcFace ID map feeding every one of the 64 ResBlocks."""
        return cls(c_in=512, proj_blocks=list(range(64)), bottleneck_mode="simple")

    @classmethod
    def tiny(cls) -> ControlNetConfig:
        """The reference fixture: feeds the two width-32 ResBlock calls of the tiny Stage C."""
        return cls(c_in=8, c_proj=32, proj_blocks=[0, 5], bottleneck_mode="simple")

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)

    def build(self) -> ControlNet:
        return ControlNet(**self.kwargs())


class CNetResBlock(nn.Module):
    """x + [LN2d, GELU, conv3x3, LN2d, GELU, conv3x3](x), with affine LayerNorms (eps 1e-5)."""

    def __init__(self, c: int):
        super().__init__()
        self.blocks = nn.Sequential(
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.blocks(x)  # type: ignore[no-any-return]


def _effnet_backbone(c_in: int) -> nn.Sequential:
    """EfficientNetV2-S features (1280 channels, stride 32); for c_in != 3 the official stem replacement."""
    from .effnet import efficientnet_v2_s_features

    backbone = efficientnet_v2_s_features()
    if c_in != 3:
        stem = backbone[0]
        assert isinstance(stem, nn.Sequential)
        rgb_weight = stem[0].weight  # (24, 3, 3, 3)
        assert isinstance(rgb_weight, Tensor)
        # Official quirk: the replacement has padding 0 and no bias (the original has padding 1).
        conv = nn.Conv2d(c_in, 24, kernel_size=3, stride=2, bias=False)
        with torch.no_grad():
            if c_in > 3:
                conv.weight.zero_()
                conv.weight[:, :3] = rgb_weight
            else:
                conv.weight.copy_(rgb_weight[:, :c_in])
        stem[0] = conv
    return backbone


class ControlNet(nn.Module):
    """Backbone + one 1x1 projection pair per entry of proj_blocks: forward(x) -> list with None gaps.

    bottleneck_mode: 'effnet' (EfficientNetV2-S features, 1280 ch, stride 32), 'simple' (two 3x3 convs,
    c_in ch, stride 1) or 'large' (1x1 convs + 8 CNetResBlocks, 1280 ch, stride 1).
    """

    def __init__(
        self,
        *,
        c_in: int = 3,
        c_proj: int = 2048,
        proj_blocks: Sequence[int] | None = None,
        bottleneck_mode: str | None = None,
    ):
        super().__init__()
        if proj_blocks is None or len(proj_blocks) == 0:
            raise ValueError(
                "ControlNet needs proj_blocks, the Stage C ResBlock calls it feeds "
                f"(the shipped ControlNets use {_SHIPPED_BLOCKS}); see ControlNetConfig presets"
            )
        mode = "effnet" if bottleneck_mode is None else bottleneck_mode
        self.bottleneck_mode = mode
        self.c_in, self.c_proj = c_in, c_proj  # not in the state dict; `controls.check_controlnet` reads them
        self.proj_blocks = list(proj_blocks)
        self.backbone: nn.Sequential
        if mode == "effnet":
            self.backbone = _effnet_backbone(c_in)
            c_embed = 1280
        elif mode == "simple":
            self.backbone = nn.Sequential(
                nn.Conv2d(c_in, c_in * 4, kernel_size=3, padding=1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(c_in * 4, c_in, kernel_size=3, padding=1),
            )
            c_embed = c_in
        elif mode == "large":
            self.backbone = nn.Sequential(
                nn.Conv2d(c_in, 4096 * 4, kernel_size=1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(4096 * 4, 1024, kernel_size=1),
                *[CNetResBlock(1024) for _ in range(8)],
                nn.Conv2d(1024, 1280, kernel_size=1),
            )
            c_embed = 1280
        else:
            raise ValueError(f"unknown ControlNet bottleneck_mode {mode!r}; use one of {BOTTLENECK_MODES}")
        self.projections = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c_embed, c_embed, kernel_size=1, bias=False),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(c_embed, c_proj, kernel_size=1, bias=False),
            )
            for _ in self.proj_blocks
        )
        for proj in self.projections:
            assert isinstance(proj, nn.Sequential)
            nn.init.zeros_(proj[-1].weight)  # type: ignore[arg-type]  # a fresh ControlNet adds nothing

    @classmethod
    def from_config(cls, config: ControlNetConfig) -> ControlNet:
        return cls(**config.kwargs())

    def forward(self, x: Tensor) -> list[Tensor | None]:
        """Control input [B, c_in, H, W] -> list of length max(proj_blocks) + 1, tensors [B, c_proj, h, w]."""
        x = self.backbone(x.to(next(self.parameters()).dtype))  # (B, c_embed, h, w)
        outputs: list[Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for proj, idx in zip(self.projections, self.proj_blocks, strict=True):
            outputs[idx] = proj(x)
        return outputs


def scale_control(outputs: Sequence[Tensor | None], strength: float) -> list[Tensor | None]:
    """Multiply every entry by ``strength`` (the official notebooks' ControlNet multiplier, 1.0 by default)."""
    return [None if t is None else t * strength for t in outputs]
