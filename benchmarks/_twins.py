"""Benchmark models: cascade_lab stages and their diffusers twins built from the same original-format weights.

The twin is diffusers' ``StableCascadeUNet`` with the same architecture, loaded strictly from our
``state_dict()`` through diffusers' own single-file converter (as tests/models/test_diffusers_parity.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from cascade_lab.models import StageB, StageC

# Mid-size stages for CPU benchmarks (official keyword names).
STAGE_C_MID: dict[str, Any] = {"c_cond": 768, "c_hidden": [768, 768], "nhead": [12, 12], "blocks": [[2, 6], [6, 2]],
                               "dropout": [0.0, 0.0]}
STAGE_B_MID: dict[str, Any] = {"c_hidden": [160, 320, 640, 640], "nhead": [-1, -1, 10, 10],
                               "blocks": [[2, 2, 6, 2], [2, 6, 2, 2]], "block_repeat": [[1, 1, 1, 1], [2, 2, 2, 2]],
                               "dropout": [0.0, 0.0, 0.0, 0.0]}
RES, TIME, ATTN = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"


def randomize(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Every parameter ~ N(0, std²) (the official init zeroes the output conv and the time mappers)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def build(stage: str, kwargs: dict[str, Any], seed: int = 0) -> StageC | StageB:
    """A cascade_lab StageC / StageB with random weights, in eval mode."""
    model = StageC(**kwargs) if stage == "c" else StageB(**kwargs)
    randomize(model, seed)
    return model.eval()


def diffusers_twin(stage: str, kwargs: dict[str, Any], model: nn.Module, *, share: bool = False) -> nn.Module:
    """diffusers' StableCascadeUNet built like `model` (from `kwargs`), loaded from its original-format state dict.

    share: build it on the meta device and hand it `model`'s own tensors (converted, on their device),
    so no memory is spent on a second copy; otherwise it holds a converted copy.
    """
    from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet

    from cascade_lab.models.stage_b import StageBConfig
    from cascade_lab.models.stage_c import StageCConfig

    kw = {**(StageCConfig() if stage == "c" else StageBConfig()).kwargs(), **kwargs}
    letters = {"C": RES, "T": TIME, "A": ATTN}
    extra: dict[str, Any]
    if stage == "c":
        extra = {"clip_text_in_channels": kw["c_clip_text"], "clip_text_pooled_in_channels": kw["c_clip_text_pooled"],
                 "clip_image_in_channels": kw["c_clip_img"], "switch_level": kw["switch_level"]}
    else:
        extra = {"clip_text_pooled_in_channels": kw["c_clip"], "effnet_in_channels": kw["c_effnet"],
                 "pixel_mapper_in_channels": kw["c_pixels"], "switch_level": None}
    config = {
        "in_channels": kw["c_in"], "out_channels": kw["c_out"], "timestep_ratio_embedding_dim": kw["c_r"],
        "patch_size": kw["patch_size"], "conditioning_dim": kw["c_cond"], "block_out_channels": kw["c_hidden"],
        "num_attention_heads": kw["nhead"], "down_num_layers_per_block": kw["blocks"][0],
        "up_num_layers_per_block": kw["blocks"][1], "down_blocks_repeat_mappers": kw["block_repeat"][0],
        "up_blocks_repeat_mappers": kw["block_repeat"][1],
        "block_types_per_layer": [[letters[c] for c in level] for level in kw["level_config"]],
        "clip_seq": kw["c_clip_seq"], "kernel_size": kw["kernel_size"], "dropout": kw["dropout"],
        "self_attn": kw["self_attn"], "timestep_conditioning_type": kw["t_conds"], **extra,
    }
    with torch.device("meta") if share else contextlib.nullcontext():
        unet = StableCascadeUNet(**config)
    state = {k: v.detach() if share else v.detach().clone() for k, v in model.state_dict().items()}
    unet.load_state_dict(convert_stable_cascade_unet_single_file_to_diffusers(state), strict=True, assign=share)
    return unet.eval().to(next(model.parameters()).dtype)

