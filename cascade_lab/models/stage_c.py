"""Stage C: Stable Cascade's text-conditional diffusion prior (official ``modules/stage_c.py``).

It denoises the 16-channel EfficientNet latent (24x24 for a 1024 px image) and predicts epsilon.
Both levels run at one resolution (``switch_level=[False]``): a U-Net in channels and skips only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .common import Conv2d, LayerNorm2d, LevelUNet, Linear

Tensor = torch.Tensor

FP16_ERROR = (
    "Stage C does not work in float16: its activations overflow and the images come out black or NaN "
    "(StableCascade #128, diffusers #6970, ComfyUI #2824). Use torch.bfloat16 or torch.float32 instead."
)


@dataclass
class StageCConfig:
    """Constructor arguments of `StageC` (the official keyword names); the defaults are the 3.6B model."""

    c_in: int = 16
    c_out: int = 16
    c_r: int = 64
    patch_size: int = 1
    c_cond: int = 2048
    c_hidden: list[int] = field(default_factory=lambda: [2048, 2048])
    nhead: list[int] = field(default_factory=lambda: [32, 32])
    blocks: list[list[int]] = field(default_factory=lambda: [[8, 24], [24, 8]])
    block_repeat: list[list[int]] = field(default_factory=lambda: [[1, 1], [1, 1]])
    level_config: list[str] = field(default_factory=lambda: ["CTA", "CTA"])
    c_clip_text: int = 1280
    c_clip_text_pooled: int = 1280
    c_clip_img: int = 768
    c_clip_seq: int = 4
    kernel_size: int = 3
    dropout: list[float] = field(default_factory=lambda: [0.1, 0.1])
    self_attn: bool = True
    t_conds: list[str] = field(default_factory=lambda: ["sca", "crp"])
    switch_level: list[bool] | None = field(default_factory=lambda: [False])

    @classmethod
    def full(cls) -> StageCConfig:
        """The 3.6B prior (stage_c.safetensors, 1294 keys)."""
        return cls()

    @classmethod
    def lite(cls) -> StageCConfig:
        """The 1B prior (stage_c_lite.safetensors, 654 keys)."""
        return cls(c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]])

    @classmethod
    def tiny(cls) -> StageCConfig:
        """The reference fixture's tiny model: two widths, so the level scalers and the skip matter."""
        return cls(
            c_cond=40, c_hidden=[32, 48], nhead=[2, 3], blocks=[[1, 2], [2, 1]], c_clip_text=24,
            c_clip_text_pooled=24, c_clip_img=12, dropout=[0.0, 0.0],
        )  # fmt: skip

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)

    def build(self) -> StageC:
        return StageC(**self.kwargs())


def _refuse_fp16(dtype: torch.dtype) -> None:
    if dtype == torch.float16:
        raise TypeError(FP16_ERROR)


class StageC(LevelUNet):
    """forward(x, r, clip_text, clip_text_pooled, clip_img, cnet=None, **t_conds) -> epsilon, like x.

    Runs in the parameters' dtype (float32 or bfloat16, no autocast needed); inputs are cast to it and
    the output is returned in x's dtype. float16 is refused (black/NaN images).
    """

    def __init__(
        self,
        *,
        c_in: int = 16,
        c_out: int = 16,
        c_r: int = 64,
        patch_size: int = 1,
        c_cond: int = 2048,
        c_hidden: Sequence[int] = (2048, 2048),
        nhead: Sequence[int] = (32, 32),
        blocks: Sequence[Sequence[int]] = ((8, 24), (24, 8)),
        block_repeat: Sequence[Sequence[int]] | None = ((1, 1), (1, 1)),
        level_config: Sequence[str] = ("CTA", "CTA"),
        c_clip_text: int = 1280,
        c_clip_text_pooled: int = 1280,
        c_clip_img: int = 768,
        c_clip_seq: int = 4,
        kernel_size: int = 3,
        dropout: float | Sequence[float] = (0.1, 0.1),
        self_attn: bool | Sequence[bool] = True,
        t_conds: Sequence[str] = ("sca", "crp"),
        switch_level: Sequence[bool] | None = (False,),
    ):
        super().__init__()
        self.c_r, self.c_clip_seq, self.t_conds = c_r, c_clip_seq, list(t_conds)
        self._n_blocks = sum(blocks[0])

        self.clip_txt_mapper = Linear(c_clip_text, c_cond)
        self.clip_txt_pooled_mapper = Linear(c_clip_text_pooled, c_cond * c_clip_seq)
        self.clip_img_mapper = Linear(c_clip_img, c_cond * c_clip_seq)
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
            switch_level=switch_level,
        )
        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
            Conv2d(c_hidden[0], c_out * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )
        _refuse_fp16(self._param_dtype())
        self.init_weights()

    @classmethod
    def from_config(cls, config: StageCConfig) -> StageC:
        return cls(**config.kwargs())

    def init_weights(self) -> None:
        """The official initialisation (used when no checkpoint is loaded)."""
        self._init_level_weights(self._n_blocks)
        for mapper in (self.clip_txt_mapper, self.clip_txt_pooled_mapper, self.clip_img_mapper):
            nn.init.normal_(mapper.weight, std=0.02)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> StageC:  # type: ignore[override]
        # Refuse .half(), .to(torch.float16) and a parent's .half() before anything is converted:
        # probe what fn does to an empty tensor like our parameters.
        param = next(self.parameters(), None)
        if param is not None:
            try:
                probe = fn(torch.empty(0, dtype=param.dtype, device=param.device))
            except Exception:  # e.g. a move a probe cannot make; the real conversion will say why
                probe = None
            if isinstance(probe, Tensor):
                _refuse_fp16(probe.dtype)
        return super()._apply(fn, recurse)  # type: ignore[no-any-return]

    def gen_c_embeddings(self, clip_txt: Tensor, clip_txt_pooled: Tensor, clip_img: Tensor) -> Tensor:
        """cat[text 77, pooled c_clip_seq, image c_clip_seq] tokens, then LN: [B, 77 + 2 * c_clip_seq, c_cond].

        clip_txt_pooled and clip_img may be [B, C] or [B, 1, C] (the official 2-D pooled branch crashes).
        """
        dtype = self._param_dtype()
        if clip_txt_pooled.dim() == 2:
            clip_txt_pooled = clip_txt_pooled.unsqueeze(1)  # (B, C) -> (B, 1, C)
        if clip_img.dim() == 2:
            clip_img = clip_img.unsqueeze(1)  # (B, C) -> (B, 1, C)
        txt = self.clip_txt_mapper(clip_txt.to(dtype))  # (B, 77, c_cond)
        B, S = clip_txt_pooled.shape[:2]
        pooled = self.clip_txt_pooled_mapper(clip_txt_pooled.to(dtype))  # (B, S, c_clip_seq * c_cond)
        pooled = pooled.view(B, S * self.c_clip_seq, -1)  # (B, S * c_clip_seq, c_cond)
        B, S = clip_img.shape[:2]
        img = self.clip_img_mapper(clip_img.to(dtype)).view(B, S * self.c_clip_seq, -1)  # (B, S * c_clip_seq, c_cond)
        return self.clip_norm(torch.cat([txt, pooled, img], dim=1))  # type: ignore[no-any-return]

    def forward(
        self,
        x: Tensor,
        r: Tensor,
        clip_text: Tensor,
        clip_text_pooled: Tensor,
        clip_img: Tensor,
        cnet: Sequence[Tensor | None] | None = None,
        **t_conds: Tensor | None,
    ) -> Tensor:
        """Predict epsilon for the noised latent x [B, c_in, H, W] at noise condition r [B] in [0, 1].

        cnet: ControlNet outputs, one entry per ResBlock call (down path, then up path), None to skip;
        each is resized bilinearly (align_corners=True) and added to x before that ResBlock.
        t_conds: 'sca' / 'crp' values [B]; missing ones embed 0, as in every official caller.
        """
        dtype = self._param_dtype()
        _refuse_fp16(dtype)
        if torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.float16:
            raise TypeError(FP16_ERROR + " (float16 autocast is active)")
        r_embed = self._r_embed(r, t_conds).to(dtype)  # (B, c_r * (1 + n_conds))
        memo = self._cond_memo(clip_text, clip_text_pooled, clip_img)  # None outside conditioning_cache()
        clip = self._memoized(
            memo, "clip", lambda: self.gen_c_embeddings(clip_text, clip_text_pooled, clip_img)
        )  # (B, 85, c_cond)
        kvs = None if memo is None else self._memoized(memo, "kvs", lambda: self.cond_kvs(clip))
        return self._run_denoise(x.to(dtype), r_embed, clip, kvs, cnet).to(x.dtype)

    def _denoise(self, x: Tensor, r_embed: Tensor, clip: Tensor, kvs: list[tuple[Tensor, Tensor]] | None,
                 cnet: Sequence[Tensor | None] | None) -> Tensor:
        """Everything after the conditioning: embedding, down and up paths, output conv (`compile_denoiser`)."""
        h = self.embedding(x)  # (B, c_hidden[0], H, W)
        deliver = iter(cnet) if cnet is not None else None
        level_outputs = self._down_encode(h, r_embed, clip, deliver, kvs)
        h = self._up_decode(level_outputs, r_embed, clip, deliver, kvs)
        return self.clf(h)  # type: ignore[no-any-return]
