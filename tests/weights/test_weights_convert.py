"""ComfyUI and diffusers key layouts map back to the official names, checked against diffusers itself."""

from __future__ import annotations

import pytest
import torch
from conftest import load_fixture

from cascade_lab.weights.convert import ConversionError, layout_of, plan_official, to_official

diffusers = pytest.importorskip("diffusers")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def comfyui_split(official: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """What ComfyUI's Stable_Cascade process_unet_state_dict does: in_proj -> attn.to_q/to_k/to_v."""
    out = {}
    for k, v in official.items():
        for what in ("weight", "bias"):
            if k.endswith(f"attn.in_proj_{what}"):
                stem = k.removesuffix(f".in_proj_{what}")
                for part, chunk in zip("qkv", v.chunk(3, 0), strict=True):
                    out[f"{prefix}{stem}.to_{part}.{what}"] = chunk
                break
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("fixture,stage", [("stage_c_tiny", "stage_c"), ("stage_b_tiny", "stage_b")])
def test_diffusers_converter_then_inverse_gives_the_original(fixture: str, stage: str) -> None:
    from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers

    _, official, _ = load_fixture(fixture)
    converted = convert_stable_cascade_unet_single_file_to_diffusers(dict(official))
    assert any(".attention.to_q.weight" in k for k in converted)  # the converter really renamed things
    assert layout_of(converted) == "diffusers"
    _equal(to_official(converted, stage), official)


def _tiny_diffusers_unets() -> dict[str, torch.nn.Module]:
    from diffusers import StableCascadeUNet  # type: ignore[attr-defined]

    res_t_a = ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")
    # the reference fixtures' configs, in diffusers' argument names
    stage_c = StableCascadeUNet(
        conditioning_dim=40, block_out_channels=(32, 48), num_attention_heads=(2, 3),
        down_num_layers_per_block=(1, 2), up_num_layers_per_block=(2, 1), clip_text_in_channels=24,
        clip_text_pooled_in_channels=24, clip_image_in_channels=12, dropout=(0, 0),
        timestep_conditioning_type=("sca", "crp"), switch_level=(False,))
    stage_b = StableCascadeUNet(
        in_channels=4, out_channels=4, patch_size=2, conditioning_dim=32, block_out_channels=(16, 24, 32, 32),
        num_attention_heads=(0, 0, 2, 2), down_num_layers_per_block=(1, 1, 1, 1),
        up_num_layers_per_block=(1, 1, 1, 1), down_blocks_repeat_mappers=(1, 1, 1, 1),
        up_blocks_repeat_mappers=(2, 2, 1, 1), block_types_per_layer=(res_t_a[:2], res_t_a[:2], res_t_a, res_t_a),
        clip_text_pooled_in_channels=24, effnet_in_channels=16, pixel_mapper_in_channels=3, dropout=(0, 0, 0, 0),
        timestep_conditioning_type=("sca",))
    return {"stage_c": stage_c, "stage_b": stage_b}


@pytest.mark.parametrize("fixture,stage", [("stage_c_tiny", "stage_c"), ("stage_b_tiny", "stage_b")])
def test_diffusers_unet_module_names_map_onto_the_official_keys(fixture: str, stage: str) -> None:
    """Not just the converter's output: diffusers' own StableCascadeUNet state dict maps key for key."""
    _, official, _ = load_fixture(fixture)
    unet = _tiny_diffusers_unets()[stage]
    mapped = to_official(unet.state_dict(), stage)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in official.items()}


def test_diffusers_vqgan_names_map_onto_stage_a() -> None:
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    _, official, _ = load_fixture("stage_a_tiny")
    vq = PaellaVQModel(levels=2, bottleneck_blocks=2, embed_dim=32, latent_channels=4, num_vq_embeddings=64)
    keys = vq.state_dict()
    assert "vquantizer.embedding.weight" in keys and layout_of(keys) == "diffusers"
    mapped = to_official(keys, "stage_a")
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in official.items()}


def test_comfyui_split_projections_and_prefix_pack_back() -> None:
    _, official, _ = load_fixture("stage_c_tiny")
    comfy = comfyui_split(official, "model.diffusion_model.")
    comfy["text_encoder.x"] = torch.ones(1)  # other components of an all-in-one file are left alone
    assert layout_of(k.removeprefix("model.diffusion_model.") for k in comfy) == "comfyui"
    _equal(to_official(comfy, "stage_c", "model.diffusion_model."), official)


def test_official_keys_get_the_identity_plan() -> None:
    _, official, _ = load_fixture("stage_b_tiny")
    plan = plan_official(official, "stage_b")
    assert all(r.sources == (k,) and not r.transpose for k, r in plan.items())
    assert layout_of(official) == "official"


def test_incomplete_split_projection_is_an_error() -> None:
    _, official, _ = load_fixture("stage_c_tiny")
    comfy = comfyui_split(official)
    victim = next(k for k in comfy if k.endswith("attn.to_k.weight"))
    del comfy[victim]
    with pytest.raises(ConversionError, match=r"found .*to_q.weight, .*to_v.weight but not to_k"):
        plan_official(comfy, "stage_c")


def test_comfyui_text_encoder_names_become_transformers_names() -> None:
    proj = torch.arange(6.0).reshape(2, 3)  # open_clip stores [in, out]
    sd = {
        "text_encoder.clip_g.transformer.text_model.final_layer_norm.weight": torch.ones(2),
        "text_encoder.clip_g.text_projection": proj,
        "text_encoder.clip_g.logit_scale": torch.ones(()),
        "text_encoder.clip_g.transformer.text_model.embeddings.position_ids": torch.arange(3),
    }
    out = to_official(sd, "text_encoder", "text_encoder.")
    assert sorted(out) == ["text_model.final_layer_norm.weight", "text_projection.weight"]
    assert torch.equal(out["text_projection.weight"], proj.t())  # nn.Linear stores [out, in]
