"""Parity with diffusers' StableCascadeUNet: same official-format weights (converted by diffusers' own
single-file converter), same inputs, same outputs in fp32, for Stage C and Stage B."""

from __future__ import annotations

import pytest
import torch
from conftest import load_fixture

from cascade_lab.models.stage_b import StageB
from cascade_lab.models.stage_c import StageC

diffusers_unet = pytest.importorskip("diffusers.models.unets.unet_stable_cascade")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

RES, TIME, ATTN = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
FP32 = {"atol": 1e-5, "rtol": 1e-5}


def diffusers_twin(kwargs: dict, weights: dict, **extra) -> torch.nn.Module:
    """A StableCascadeUNet with the same architecture, loaded (strictly) from the converted weights."""
    letters = {"C": RES, "T": TIME, "A": ATTN}
    unet = diffusers_unet.StableCascadeUNet(
        in_channels=kwargs["c_in"],
        out_channels=kwargs["c_out"],
        timestep_ratio_embedding_dim=kwargs["c_r"],
        patch_size=kwargs["patch_size"],
        conditioning_dim=kwargs["c_cond"],
        block_out_channels=kwargs["c_hidden"],
        num_attention_heads=kwargs["nhead"],
        down_num_layers_per_block=kwargs["blocks"][0],
        up_num_layers_per_block=kwargs["blocks"][1],
        down_blocks_repeat_mappers=kwargs["block_repeat"][0],
        up_blocks_repeat_mappers=kwargs["block_repeat"][1],
        block_types_per_layer=[[letters[c] for c in level] for level in kwargs["level_config"]],
        clip_seq=kwargs["c_clip_seq"],
        kernel_size=kwargs["kernel_size"],
        dropout=kwargs["dropout"],
        self_attn=kwargs["self_attn"],
        timestep_conditioning_type=kwargs["t_conds"],
        **extra,
    )
    converted = single_file_utils.convert_stable_cascade_unet_single_file_to_diffusers(weights)
    unet.load_state_dict(converted, strict=True)
    return unet.eval()


@pytest.mark.reference
def test_stage_c_matches_diffusers():
    cfg, weights, io = load_fixture("stage_c_tiny")
    kwargs = cfg["kwargs"]
    ours = StageC(**kwargs)
    ours.load_state_dict(weights, strict=True)
    ours.eval()
    theirs = diffusers_twin(
        kwargs,
        weights,
        clip_text_in_channels=kwargs["c_clip_text"],
        clip_text_pooled_in_channels=kwargs["c_clip_text_pooled"],
        clip_image_in_channels=kwargs["c_clip_img"],
        switch_level=kwargs["switch_level"],
    )
    torch.manual_seed(0)
    cases = [  # the fixture inputs, and another batch size and latent size
        {k: io[k] for k in ("x", "r", "clip_text", "clip_text_pooled", "clip_img")},
        {
            "x": torch.randn(3, 16, 9, 7),
            "r": torch.rand(3),
            "clip_text": torch.randn(3, 77, 24),
            "clip_text_pooled": torch.randn(3, 1, 24),
            "clip_img": torch.randn(3, 1, 12),
        },
    ]
    for inputs in cases:
        with torch.no_grad():
            expected = theirs(
                inputs["x"],
                inputs["r"],
                clip_text_pooled=inputs["clip_text_pooled"],
                clip_text=inputs["clip_text"],
                clip_img=inputs["clip_img"],
                return_dict=False,
            )[0]
            actual = ours(**inputs)
        assert expected.abs().max() > 0.5  # random weights everywhere: a non-trivial output
        torch.testing.assert_close(actual, expected, **FP32)


@pytest.mark.reference
@pytest.mark.parametrize("with_pixels", [False, True])
def test_stage_b_matches_diffusers(with_pixels):
    cfg, weights, io = load_fixture("stage_b_tiny")
    kwargs = cfg["kwargs"]
    ours = StageB(**kwargs)
    ours.load_state_dict(weights, strict=True)
    ours.eval()
    theirs = diffusers_twin(
        kwargs,
        weights,
        clip_text_pooled_in_channels=kwargs["c_clip"],
        effnet_in_channels=kwargs["c_effnet"],
        pixel_mapper_in_channels=kwargs["c_pixels"],
        switch_level=None,
    )
    pixels = io["pixels"] if with_pixels else None
    with torch.no_grad():
        expected = theirs(
            io["x"], io["r"], clip_text_pooled=io["clip"], effnet=io["effnet"], pixels=pixels, return_dict=False
        )[0]
        actual = ours(io["x"], io["r"], io["effnet"], io["clip"], pixels=pixels)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(actual, expected, **FP32)
