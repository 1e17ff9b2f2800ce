"""Stage B: Stable Cascade's diffusion decoder (official ``modules/stage_b.py``).

It denoises the 4-channel Stage A latent (256x256 for a 1024 px image), conditioned on the Stage C
latent (``effnet``) and the pooled CLIP text embedding, and predicts epsilon. Four levels, each
half the resolution of the one above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .common import Conv2d, LayerNorm2d, LevelUNet, Linear, resize_to

Tensor = torch.Tensor


@dataclass
class StageBConfig:
    """Constructor arguments of `StageB` (the official keyword names); the defaults are the full model."""

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1280
    c_hidden: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    nhead: list[int] = field(default_factory=lambda: [-1, -1, 20, 20])
    blocks: list[list[int]] = field(default_factory=lambda: [[2, 6, 28, 6], [6, 28, 6, 2]])
    block_repeat: list[list[int]] = field(default_factory=lambda: [[1, 1, 1, 1], [3, 3, 2, 2]])
    level_config: list[str] = field(default_factory=lambda: ["CT", "CT", "CTA", "CTA"])
    c_clip: int = 1280
    c_clip_seq: int = 4
    c_effnet: int = 16
    c_pixels: int = 3
    kernel_size: int = 3
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.1, 0.1])
    self_attn: bool = True
    t_conds: list[str] = field(default_factory=lambda: ["sca"])

    @classmethod
    def full(cls) -> StageBConfig:
        """The 1.5B decoder (stage_b.safetensors, code name '3B', 1454 keys)."""
        return cls()

    @classmethod
    def lite(cls) -> StageBConfig:
        """The 700M decoder (stage_b_lite.safetensors, 826 keys)."""
        return cls(
            c_hidden=[320, 576, 1152, 1152],
            nhead=[-1, 9, 18, 18],
            blocks=[[2, 4, 14, 4], [4, 14, 4, 2]],
            block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]],
        )

    @classmethod
    def tiny(cls) -> StageBConfig:
        """The reference fixture's tiny model: repeat mappers on the two deepest up levels."""
        return cls(
            c_cond=32, c_hidden=[16, 24, 32, 32], nhead=[-1, -1, 2, 2], blocks=[[1, 1, 1, 1], [1, 1, 1, 1]],
            block_repeat=[[1, 1, 1, 1], [2, 2, 1, 1]], c_clip=24, dropout=[0.0, 0.0, 0.0, 0.0],
        )  # fmt: skip

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)

    def build(self) -> StageB:
        return StageB(**self.kwargs())


def _mapper(c_in: int, c: int) -> nn.Sequential:
    # keys .0 and .2: 1x1 conv c_in -> 4c, GELU, 1x1 conv 4c -> c, LN2d
    return nn.Sequential(
        Conv2d(c_in, c * 4, kernel_size=1),
        nn.GELU(),
        Conv2d(c * 4, c, kernel_size=1),
        LayerNorm2d(c, elementwise_affine=False, eps=1e-6),
    )


class StageB(LevelUNet):
    """forward(x, r, effnet, clip, pixels=None, **t_conds) -> epsilon, like x.

    Runs in the parameters' dtype (float32, bfloat16 or float16, no autocast needed); inputs are cast
    to it and the output is returned in x's dtype.
    """

    def __init__(
        self,
        *,
        c_in: int = 4,
        c_out: int = 4,
        c_r: int = 64,
        patch_size: int = 2,
        c_cond: int = 1280,
        c_hidden: Sequence[int] = (320, 640, 1280, 1280),
        nhead: Sequence[int] = (-1, -1, 20, 20),
        blocks: Sequence[Sequence[int]] = ((2, 6, 28, 6), (6, 28, 6, 2)),
        block_repeat: Sequence[Sequence[int]] | None = ((1, 1, 1, 1), (3, 3, 2, 2)),
        level_config: Sequence[str] = ("CT", "CT", "CTA", "CTA"),
        c_clip: int = 1280,
        c_clip_seq: int = 4,
        c_effnet: int = 16,
        c_pixels: int = 3,
        kernel_size: int = 3,
        dropout: float | Sequence[float] = (0.0, 0.0, 0.1, 0.1),
        self_attn: bool | Sequence[bool] = True,
        t_conds: Sequence[str] = ("sca",),
    ):
        super().__init__()
        self.c_r, self.c_clip_seq, self.c_pixels, self.t_conds = c_r, c_clip_seq, c_pixels, list(t_conds)
        self.patch_size = patch_size
        self._n_blocks = sum(blocks[0])

        self.effnet_mapper = _mapper(c_effnet, c_hidden[0])
        self.pixels_mapper = _mapper(c_pixels, c_hidden[0])
        self.clip_mapper = Linear(c_clip, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            Conv2d(c_in * patch_size**2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
        )
        self._build_levels(
            c_hidden=c_hidden,
            nhead=nhead,
            blocks=blocks,
            block_repeat=block_repeat,
            level_config=level_config,
            c_cond=c_cond,
            kernel_size=kernel_size,
            dropout=dropout,
            self_attn=self_attn,
            switch_level=None,
        )
        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
            Conv2d(c_hidden[0], c_out * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )
        self.init_weights()

    @classmethod
    def from_config(cls, config: StageBConfig) -> StageB:
        return cls(**config.kwargs())

    def init_weights(self) -> None:
        """The official initialisation (used when no checkpoint is loaded)."""
        self._init_level_weights(self._n_blocks)
        nn.init.normal_(self.clip_mapper.weight, std=0.02)
        for mapper in (self.effnet_mapper, self.pixels_mapper):
            for i in (0, 2):
                conv = mapper[i]
                assert isinstance(conv, nn.Conv2d)
                nn.init.normal_(conv.weight, std=0.02)

    def gen_c_embeddings(self, clip: Tensor) -> Tensor:
        """Pooled CLIP text [B, C] or [B, 1, C] -> c_clip_seq normed tokens [B, c_clip_seq, c_cond]."""
        if clip.dim() == 2:
            clip = clip.unsqueeze(1)  # (B, C) -> (B, 1, C)
        B, S = clip.shape[:2]
        tokens = self.clip_mapper(clip.to(self._param_dtype()))  # (B, S, c_clip_seq * c_cond)
        return self.clip_norm(tokens.view(B, S * self.c_clip_seq, -1))  # type: ignore[no-any-return]

    def _pixels_map(self, pixels: Tensor | None, batch: int, size: Sequence[int], dtype: torch.dtype) -> Tensor:
        """pixels_mapper(pixels) resized to size (pixels None: zeros [B, 3, 8, 8], as every official call)."""
        if pixels is None:
            pixels = self.clip_mapper.weight.new_zeros(batch, self.c_pixels, 8, 8)
        return resize_to(self.pixels_mapper(pixels.to(dtype)), size, dtype)  # mapped, then resized

    def forward(
        self,
        x: Tensor,
        r: Tensor,
        effnet: Tensor,
        clip: Tensor,
        pixels: Tensor | None = None,
        **t_conds: Tensor | None,
    ) -> Tensor:
        """Predict epsilon for the noised latent x [B, 4, H, W] (H, W even) at noise condition r [B].

        effnet: the Stage C latent [B, 16, h, w], resized to the embedding size before its mapper.
        pixels: [B, 3, h', w'] mapped then resized; None means zeros [B, 3, 8, 8], as in every official call.
        """
        dtype = self._param_dtype()
        r_embed = self._r_embed(r, t_conds).to(dtype)  # (B, c_r * (1 + n_conds))
        size = (x.size(-2) // self.patch_size, x.size(-1) // self.patch_size)  # after PixelUnshuffle
        # None outside conditioning_cache(); what follows depends on the conditioning and sizes only
        memo = self._cond_memo(effnet, clip, pixels, x.size(0), size)
        clip_tokens = self._memoized(memo, "clip", lambda: self.gen_c_embeddings(clip))  # (B, c_clip_seq, c_cond)
        effnet_map = self._memoized(memo, "effnet", lambda: self.effnet_mapper(resize_to(effnet, size, dtype)))
        pixels_map = self._memoized(memo, "pixels", lambda: self._pixels_map(pixels, x.size(0), size, dtype))
        kvs = None if memo is None else self._memoized(memo, "kvs", lambda: self.cond_kvs(clip_tokens))
        return self._run_denoise(x.to(dtype), r_embed, clip_tokens, kvs, effnet_map, pixels_map).to(x.dtype)

    def _denoise(self, x: Tensor, r_embed: Tensor, clip: Tensor, kvs: list[tuple[Tensor, Tensor]] | None,
                 effnet_map: Tensor, pixels_map: Tensor) -> Tensor:
        """Everything after the conditioning: embedding, down and up paths, output conv (`compile_denoiser`)."""
        h = self.embedding(x)  # (B, c_hidden[0], H / 2, W / 2)
        h = h + effnet_map
        h = h + pixels_map
        level_outputs = self._down_encode(h, r_embed, clip, kvs=kvs)
        h = self._up_decode(level_outputs, r_embed, clip, kvs=kvs)
        return self.clf(h)  # type: ignore[no-any-return]
