"""Stage C LoRA: kohya / OneTrainer / ComfyUI / official files merged into a tiny Stage C, exact unmerge, errors."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from cascade_lab.models.lora import (
    LoraError,
    active_loras,
    apply_lora,
    load_lora_file,
    lora_from_state_dict,
    official_lora_targets,
    stage_c_lora_targets,
    unload_all,
)
from cascade_lab.models.stage_c import StageC, StageCConfig

# LoRA layer (module path) -> (Stage C parameter, rows) on the tiny model (c_hidden [32, 48]).
ATTN = "down_blocks.0.2.attention.attn"
TARGETS = {
    f"{ATTN}.to_q": (f"{ATTN}.in_proj_weight", slice(0, 32)),
    f"{ATTN}.to_k": (f"{ATTN}.in_proj_weight", slice(32, 64)),
    "down_blocks.1.5.attention.attn.to_v": ("down_blocks.1.5.attention.attn.in_proj_weight", slice(96, 144)),
    "up_blocks.0.2.attention.attn.out_proj": ("up_blocks.0.2.attention.attn.out_proj.weight", None),
    "up_blocks.1.2.kv_mapper.1": ("up_blocks.1.2.kv_mapper.1.weight", None),
    "down_blocks.0.0.channelwise.0": ("down_blocks.0.0.channelwise.0.weight", None),
    "up_blocks.1.0.channelwise.4": ("up_blocks.1.0.channelwise.4.weight", None),
    "down_blocks.1.1.mapper_sca": ("down_blocks.1.1.mapper_sca.weight", None),
    "up_blocks.0.4.mapper": ("up_blocks.0.4.mapper.weight", None),
    "clip_txt_mapper": ("clip_txt_mapper.weight", None),
    "clip_txt_pooled_mapper": ("clip_txt_pooled_mapper.weight", None),
    "embedding.1": ("embedding.1.weight", None),  # 1x1 convs: 4-D lora_down / lora_up
    "clf.1": ("clf.1.weight", None),
    "down_downscalers.1.1.blocks.0": ("down_downscalers.1.1.blocks.0.weight", None),
    "up_upscalers.0.1.blocks.1": ("up_upscalers.0.1.blocks.1.weight", None),
}


def tiny_model(**overrides) -> StageC:
    """Tiny Stage C with every weight random from seed 0 (the official init zeroes clf and the time mappers)."""
    torch.manual_seed(0)
    model = replace(StageCConfig.tiny(), **overrides).build()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def run(model: StageC) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 77, 24, generator=g)
    pooled, img = torch.randn(2, 1, 24, generator=g), torch.randn(2, 1, 12, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.3, 0.8]), text, pooled, img)


def low_rank(model, layers, rank=4, seed=0):
    """{layer: (down, up)} with the shapes each target needs (4-D for the 1x1 convs)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for layer in layers:
        param, rows = TARGETS[layer]
        w = model.get_parameter(param)
        n_out = w.shape[0] if rows is None else rows.stop - rows.start
        down, up = torch.randn(rank, *w.shape[1:], generator=g), torch.randn(n_out, rank, generator=g)
        pairs[layer] = (down, up if w.dim() == 2 else up[:, :, None, None])
    return pairs


def kohya_dict(pairs, prefix="lora_unet_", alpha=None, down=".lora_down.weight", up=".lora_up.weight"):
    out = {}
    for layer, (d, u) in pairs.items():
        name = prefix + (layer if prefix.endswith(".") else layer.replace(".", "_"))
        out[name + down], out[name + up] = d, u
        if alpha is not None:
            out[name + ".alpha"] = torch.tensor(float(alpha))
    return out


def expected_weights(base, pairs, strength, scale):
    """W + strength * scale * up @ down for each targeted parameter (rows), computed independently."""
    want = {k: v.clone() for k, v in base.state_dict().items()}
    for layer, (down, up) in pairs.items():
        param, rows = TARGETS[layer]
        view = want[param] if rows is None else want[param][rows]
        view += strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(view.shape)
    return want


def assert_state_equal(model, reference_state):
    state = model.state_dict()
    assert state.keys() == reference_state.keys()
    for k, v in state.items():
        assert torch.equal(v, reference_state[k]), f"{k} differs"


def write(tmp_path, tensors, name="lora.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "prefix, fmt, spelling",
    [
        ("lora_unet_", "kohya", (".lora_down.weight", ".lora_up.weight")),
        ("lora_prior_unet_", "onetrainer", (".lora_down.weight", ".lora_up.weight")),
        ("diffusion_model.", "comfyui", (".lora_A.weight", ".lora_B.weight")),
    ],
)
def test_named_formats_merge_w_plus_strength_scale_up_down(tmp_path, prefix, fmt, spelling):
    model = tiny_model()
    base = copy.deepcopy(model)
    pairs = low_rank(model, TARGETS)
    lora = load_lora_file(write(tmp_path, kohya_dict(pairs, prefix, alpha=2.0, down=spelling[0], up=spelling[1])))
    assert lora.format == fmt and len(lora.modules) == len(TARGETS)
    assert {m.scale for m in lora.modules} == {0.5}  # alpha / rank = 2 / 4
    handle = apply_lora(model, lora, strength=0.7)
    want = expected_weights(base, pairs, 0.7, 0.5)
    for k, v in model.state_dict().items():
        if any(k == param for param, _ in TARGETS.values()):
            torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-5, msg=k)
        else:
            assert torch.equal(v, want[k]), f"{k} is not a target but changed"
    rows_v = model.get_parameter("down_blocks.1.5.attention.attn.in_proj_weight")[:96]  # q, k rows untouched
    assert torch.equal(rows_v, base.get_parameter("down_blocks.1.5.attention.attn.in_proj_weight")[:96])
    assert sorted(handle.params) == sorted({param for param, _ in TARGETS.values()})


def test_missing_alpha_means_alpha_equals_rank(tmp_path):
    model = tiny_model()
    base = copy.deepcopy(model)
    pairs = low_rank(model, ["clip_txt_mapper", "embedding.1"], rank=3)
    apply_lora(model, lora_from_state_dict(kohya_dict(pairs)), strength=1.5)
    assert_state_close(model, expected_weights(base, pairs, 1.5, 1.0))


def assert_state_close(model, want):
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-5, msg=k)


def test_fused_old_and_diffusers_attention_names_reach_the_packed_weights():
    model = tiny_model()
    base = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    fused = (torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g))  # whole in_proj [3c, c]
    old_out = (torch.randn(2, 48, generator=g), torch.randn(48, 2, generator=g))
    diff_k = (torch.randn(2, 48, generator=g), torch.randn(48, 2, generator=g))
    tensors = {}
    for name, (d, u) in {
        "lora_unet_down_blocks_0_2_attention_attn": fused,
        "lora_unet_up_blocks_0_5_attention_attn_to_out": old_out,  # kohya before 25 Feb 2024
        "lora_prior_unet_up_blocks_0_2_attention_to_k": diff_k,  # diffusers attention names
    }.items():
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = d, u
    apply_lora(model, lora_from_state_dict(tensors))
    w = {k: v.clone() for k, v in base.state_dict().items()}
    w[f"{ATTN}.in_proj_weight"] += fused[1] @ fused[0]
    w["up_blocks.0.5.attention.attn.out_proj.weight"] += old_out[1] @ old_out[0]
    w["up_blocks.0.2.attention.attn.in_proj_weight"][48:96] += diff_k[1] @ diff_k[0]
    assert_state_close(model, w)


ATTN_BLOCKS = "down_blocks.0.2 down_blocks.1.2 down_blocks.1.5 up_blocks.0.2 up_blocks.0.5 up_blocks.1.2".split()
OFFICIAL_ORDER = [  # blocks [[1, 2], [2, 1]] of "CTA": network order, out_proj first in each AttnBlock
    f"{block}.attention.attn.{p}" for block in ATTN_BLOCKS for p in ["out_proj.weight", "in_proj_weight"]
]


def test_official_order_is_out_proj_then_in_proj_per_attention_in_network_order():
    assert official_lora_targets(tiny_model()) == OFFICIAL_ORDER


def official_dict(model, rank=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, param in enumerate(official_lora_targets(model)):
        n_out, n_in = model.get_parameter(param).shape
        out[f"weights.{i}.lora_down"] = torch.randn(rank, n_in, generator=g)
        out[f"weights.{i}.lora_up"] = torch.randn(n_out, rank, generator=g)  # even i: c rows, odd i: 3c rows
    return out


def test_official_file_merges_like_its_exact_kohya_conversion(tmp_path):
    model = tiny_model()
    base = copy.deepcopy(model)
    tensors = official_dict(model)
    assert [tensors[f"weights.{i}.lora_up"].shape[0] for i in range(2)] == [32, 96]
    lora = load_lora_file(write(tmp_path, tensors))
    assert lora.format == "official" and {m.scale for m in lora.modules} == {0.25}
    apply_lora(model, lora, strength=0.8)
    want = {k: v.clone() for k, v in base.state_dict().items()}
    for i, param in enumerate(OFFICIAL_ORDER):
        want[param] += 0.8 / 4 * tensors[f"weights.{i}.lora_up"] @ tensors[f"weights.{i}.lora_down"]
    assert_state_close(model, want)
    # the spec's conversion: split lora_up rows into to_q/to_k/to_v sharing lora_down, alpha = 1
    kohya = {}
    for i, param in enumerate(OFFICIAL_ORDER):
        down, up = tensors[f"weights.{i}.lora_down"], tensors[f"weights.{i}.lora_up"]
        name = "lora_unet_" + param.removesuffix(".weight").removesuffix("_weight").replace(".", "_")
        split = [name.removesuffix("_in_proj") + s for s in ("_to_q", "_to_k", "_to_v")]
        parts = {name: up} if i % 2 == 0 else dict(zip(split, up.chunk(3), strict=True))
        for n, u in parts.items():
            kohya |= {f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": u, f"{n}.alpha": torch.tensor(1.0)}
    converted = copy.deepcopy(base)
    apply_lora(converted, lora_from_state_dict(kohya), strength=0.8)
    assert_state_close(converted, model.state_dict())


def test_official_token_embeddings_are_returned_not_applied(tmp_path):
    model = tiny_model()
    tensors = official_dict(model) | {
        "embeddings.embeddings": torch.randn(1, 1280),
        "embeddings.indices": torch.tensor([49408]),
    }
    lora = load_lora_file(write(tmp_path, tensors))
    assert lora.embeddings["embeddings.indices"].tolist() == [49408]
    with pytest.warns(UserWarning, match="token-embedding tensors .* not applied"):
        apply_lora(model, lora)


def test_output_changes_and_remove_restores_the_state_dict_bit_exactly(tmp_path):
    model = tiny_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = run(model)
    handle = apply_lora(model, write(tmp_path, kohya_dict(low_rank(model, TARGETS), alpha=1.0)), strength=1.0)
    assert active_loras(model) == [handle]
    assert not torch.allclose(run(model), before, atol=1e-4)
    handle.remove()
    assert active_loras(model) == [] and not handle.active
    assert_state_equal(model, base_state)
    assert torch.equal(run(model), before)
    handle.remove()  # a second remove does nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacking_two_and_removing_either_leaves_exactly_the_other(dtype):
    model = tiny_model().to(dtype)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = list(TARGETS)
    a = lora_from_state_dict(kohya_dict(low_rank(model, layers[:10], seed=1), alpha=2.0))
    b = lora_from_state_dict(kohya_dict(low_rank(model, layers[5:], seed=2), alpha=8.0))  # overlaps a
    only_b = copy.deepcopy(model)
    apply_lora(only_b, b, strength=-1.3)
    ha = apply_lora(model, a, strength=0.7)
    only_a = {k: v.clone() for k, v in model.state_dict().items()}
    hb = apply_lora(model, b, strength=-1.3)
    hb.remove()
    assert_state_equal(model, only_a)
    hb = apply_lora(model, b, strength=-1.3)
    ha.remove()
    assert_state_equal(model, only_b.state_dict())
    assert active_loras(model) == [hb]
    apply_lora(model, a, strength=0.4)
    unload_all(model)
    assert_state_equal(model, base_state)
    assert active_loras(model) == []


def test_strength_zero_is_a_noop_and_set_strength_re_merges():
    model = tiny_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora = lora_from_state_dict(kohya_dict(low_rank(model, TARGETS)))
    handle = apply_lora(model, lora, strength=0.0)
    assert_state_equal(model, base_state)
    handle.set_strength(0.5)
    at_half = copy.deepcopy(tiny_model())
    apply_lora(at_half, lora, strength=0.5)
    assert_state_equal(model, at_half.state_dict())
    handle.set_strength(0.0)
    assert_state_equal(model, base_state)
    handle.remove()
    with pytest.raises(LoraError, match="no longer applied"):
        handle.set_strength(1.0)


def test_sdxl_lora_is_refused_naming_keys_and_model(tmp_path):
    tensors = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
    }
    with pytest.raises(LoraError, match=r"3 of 3 tensors.*lora_te1_text.*input_blocks_4_1.*SDXL.*lora_unet_down"):
        load_lora_file(write(tmp_path, tensors))


def test_a_stage_b_lora_on_stage_c_and_a_checkpoint_are_refused_with_a_hint():
    """Stage B LoRAs load (on Stage B: tests/training/test_stage_b_training.py); on Stage C the refusal names both."""
    tensors = {"lora_unet_effnet_mapper_0.lora_down.weight": torch.zeros(4, 16),
               "lora_unet_effnet_mapper_0.lora_up.weight": torch.zeros(32, 4)}
    lora = lora_from_state_dict(tensors)
    assert lora.stage == "b"
    model = tiny_model()
    with pytest.raises(LoraError, match="Stage B.*Stage C|Stage C.*Stage B"):
        apply_lora(model, lora)
    assert active_loras(model) == []
    with pytest.raises(LoraError, match="plain model weights"):
        lora_from_state_dict(tiny_model().state_dict())


def test_shape_mismatch_names_the_key_and_both_shapes():
    narrow = tiny_model(c_hidden=[16, 48], nhead=[2, 3])  # like a lite LoRA on the full model
    pairs = {"down_blocks.0.0.channelwise.0": (torch.zeros(4, 16), torch.zeros(64, 4))}
    lora = lora_from_state_dict(kohya_dict(pairs))
    del narrow
    model = tiny_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraError, match=r"lora_unet_down_blocks_0_0_channelwise_0 has lora_down \[4, 16\] and "
                                        r"lora_up \[64, 4\].*channelwise\.0\.weight is \[128, 32\]"):  # fmt: skip
        apply_lora(model, lora)
    assert_state_equal(model, base_state)
    assert active_loras(model) == []


def test_layers_the_model_lacks_and_official_count_mismatch_are_refused():
    model = tiny_model()
    deep = {"lora_unet_down_blocks_0_9_channelwise_0.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_9_channelwise_0.lora_up.weight": torch.zeros(128, 4)}  # fmt: skip
    with pytest.raises(LoraError, match=r"does not have, e.g. \['lora_unet_down_blocks_0_9_channelwise_0'\]"):
        apply_lora(model, lora_from_state_dict(deep))
    short = {k: v for k, v in official_dict(model).items() if not k.startswith(("weights.10.", "weights.11."))}
    with pytest.raises(LoraError, match="10 entries .* 6 attention blocks \\(12 entries\\)"):
        apply_lora(model, lora_from_state_dict(short))
    with pytest.raises(LoraError, match="needs both lora_down and lora_up"):
        lora_from_state_dict({"lora_unet_clf_1.lora_up.weight": torch.zeros(16, 4, 1, 1)})


def test_pickle_files_are_refused(tmp_path):
    tensors = kohya_dict(low_rank(tiny_model(), ["clf.1"]))
    for name in ("lora.pt", "renamed.safetensors"):
        torch.save(tensors, tmp_path / name)
        with pytest.raises(LoraError, match="pickle .* only as .safetensors"):
            load_lora_file(tmp_path / name)


@pytest.mark.parametrize("preset, n_kohya, n_official", [("full", 647, 128), ("lite", 327, 64)])
def test_every_kohya_layer_of_the_real_models_resolves(preset, n_kohya, n_official):
    """spec/training.md §3.1: kohya targets every Linear and non-grouped Conv2d, attention split in q/k/v/out."""
    with torch.device("meta"):
        model = getattr(StageCConfig, preset)().build()
    names = []
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and module.groups == 1):
            names.append(path.replace(".", "_"))
        if hasattr(module, "in_proj_weight"):
            names += [f"{path.replace('.', '_')}_to_{x}" for x in "qkv"]
    table = stage_c_lora_targets(model)
    assert len(names) == n_kohya and all(name in table for name in names)
    assert len(official_lora_targets(model)) == n_official


def test_lite_lora_on_the_full_model_is_refused_with_both_widths():
    with torch.device("meta"):
        full = StageCConfig.full().build()
    lite_q = {"down_blocks.0.2.attention.attn.to_q": (torch.zeros(4, 1536), torch.zeros(1536, 4))}
    with pytest.raises(LoraError, match=r"lora_down \[4, 1536\].*in_proj_weight\[0:2048\] is \[2048, 2048\]"):
        apply_lora(full, lora_from_state_dict(kohya_dict(lite_q)))
    lite_official = {f"weights.{i}.lora_{p}": torch.zeros(4, 4) for i in range(64) for p in ("down", "up")}
    with pytest.raises(LoraError, match="64 entries .* 64 attention blocks \\(128 entries\\).*lite 1B model 64"):
        apply_lora(full, lora_from_state_dict(lite_official))
