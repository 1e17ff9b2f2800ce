"""LoRA files as OneTrainer and ComfyUI write them today: in_proj.N attention, prior./unet. prefixes, grouped convs,
and the text-encoder part merged into CLIP-G."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from test_lora import (
    TARGETS,
    assert_state_close,
    assert_state_equal,
    expected_weights,
    low_rank,
    run,
    tiny_model,
    write,
)
from torch import nn

from cascade_lab.models.lora import (
    active_loras,
    apply_lora,
    apply_text_encoder_lora,
    load_lora_file,
    lora_from_state_dict,
)

transformers = pytest.importorskip("transformers")


def original_path(layer: str) -> str:
    """OneTrainer's "original" body: MultiheadAttention's packed projection split as in_proj.0/1/2."""
    for i, x in enumerate("qkv"):
        layer = layer.replace(f"attention.attn.to_{x}", f"attention.attn.in_proj.{i}")
    return layer


def diffusers_path(layer: str) -> str:
    """diffusers' StableCascadeUNet names (OneTrainer's in-memory and DIFFUSERS_LORA names)."""
    return layer.replace("attention.attn.out_proj", "attention.to_out.0").replace("attention.attn.to_", "attention.to_")


# format -> (key of a layer, down suffix, up suffix, alpha stored, alpha folded into lora_B)
LAYOUTS = {
    "kohya_in_proj": (lambda p: "lora_unet_" + original_path(p).replace(".", "_"), "lora_down", "lora_up", True, False),
    "original": (original_path, "lora_A", "lora_B", True, False),
    "comfy": (lambda p: "diffusion_model." + original_path(p), "lora_A", "lora_B", True, False),
    "diffusers": (lambda p: "prior." + diffusers_path(p), "lora_A", "lora_B", False, True),
    "internal": (lambda p: "prior." + diffusers_path(p), "lora_down", "lora_up", True, False),
    "omi": (lambda p: "unet." + original_path(p), "lora_down", "lora_up", True, False),
}


def onetrainer_dict(pairs, layout: str, alpha: float) -> dict[str, torch.Tensor]:
    key, down, up, stores_alpha, folds_alpha = LAYOUTS[layout]
    out = {}
    for layer, (d, u) in pairs.items():
        name = key(layer)
        out[f"{name}.{down}.weight"] = d
        out[f"{name}.{up}.weight"] = u * (alpha / d.shape[0]) if folds_alpha else u
        if stores_alpha:
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_onetrainer_layouts_merge_w_plus_strength_scale_up_down(tmp_path, layout):
    model = tiny_model()
    base = copy.deepcopy(model)
    pairs = low_rank(model, TARGETS)
    lora = load_lora_file(write(tmp_path, onetrainer_dict(pairs, layout, alpha=2.0)))
    assert len(lora.modules) == len(TARGETS)
    assert lora.format == {"kohya_in_proj": "kohya", "comfy": "comfyui"}.get(layout, "onetrainer")
    handle = apply_lora(model, lora, strength=0.7)
    assert_state_close(model, expected_weights(base, pairs, 0.7, 0.5))  # alpha / rank = 2 / 4, folded or stored
    assert sorted(handle.params) == sorted({param for param, _ in TARGETS.values()})


def test_in_proj_rows_are_q_k_v_in_order():
    model = tiny_model()
    base = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    parts = {i: (torch.randn(2, 48, generator=g), torch.randn(48, 2, generator=g)) for i in range(3)}
    tensors = {}
    for i, (d, u) in parts.items():
        name = f"lora_unet_down_blocks_1_2_attention_attn_in_proj_{i}"
        tensors |= {f"{name}.lora_down.weight": d, f"{name}.lora_up.weight": u, f"{name}.alpha": torch.tensor(2.0)}
    apply_lora(model, lora_from_state_dict(tensors))
    want = {k: v.clone() for k, v in base.state_dict().items()}
    for i, (d, u) in parts.items():
        want["down_blocks.1.2.attention.attn.in_proj_weight"][48 * i: 48 * (i + 1)] += u @ d
    assert_state_close(model, want)


# ------------------------------------------------------------------------- OneTrainer's all-layers preset


class OneTrainerConvLoRA(nn.Module):
    """What OneTrainer's LoRAModule does around a Conv2d (modules/module/LoRAModule.py, create_layer + forward):
    lora_down = Conv2d(c_in, rank, kernel, stride, padding, dilation) without groups, lora_up = 1x1
    Conv2d(rank, c_out // groups), output = orig(x) + lora_up(lora_down(x)) * alpha / rank."""

    def __init__(self, orig: nn.Conv2d, down: torch.Tensor, up: torch.Tensor, alpha: float, strength: float):
        super().__init__()
        self.orig = orig
        self.lora_down = nn.Conv2d(orig.in_channels, down.shape[0], orig.kernel_size, orig.stride, orig.padding,
                                   dilation=orig.dilation, bias=False)
        self.lora_up = nn.Conv2d(down.shape[0], orig.out_channels // orig.groups, 1, bias=False)
        self.lora_down.weight.data.copy_(down)
        self.lora_up.weight.data.copy_(up)
        self.scale = strength * alpha / down.shape[0]

    def forward(self, x):
        return self.orig(x) + self.lora_up(self.lora_down(x)) * self.scale


DEPTHWISE = ["down_blocks.0.0.depthwise", "down_blocks.1.0.depthwise", "down_blocks.1.3.depthwise",
             "up_blocks.0.3.depthwise", "up_blocks.1.0.depthwise"]


def all_layers_file(model, rank=4, alpha=2.0, seed=3):
    """A legacy-named OneTrainer file of the "full" preset: the usual layers plus every kind of depthwise conv."""
    pairs = low_rank(model, TARGETS, rank=rank, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    convs = {}
    for path in DEPTHWISE:
        c = model.get_submodule(path).in_channels
        convs[path] = (torch.randn(rank, c, 3, 3, generator=g) * 0.3, torch.randn(1, rank, 1, 1, generator=g))
    tensors = {}
    for layer, (d, u) in {**pairs, **convs}.items():
        name = "lora_prior_unet_" + layer.replace(".", "_")
        tensors |= {f"{name}.lora_down.weight": d, f"{name}.lora_up.weight": u, f"{name}.alpha": torch.tensor(alpha)}
    return pairs, convs, tensors


def test_grouped_depthwise_convs_run_as_onetrainer_computes_them():
    model = tiny_model()
    base = copy.deepcopy(model)
    before = run(model)
    pairs, convs, tensors = all_layers_file(model)
    lora = lora_from_state_dict(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is set aside
        handle = apply_lora(model, lora, strength=0.6)
    # plain layers are merged, the depthwise weights stay as they were
    assert_state_close(model, expected_weights(base, pairs, 0.6, 0.5))
    assert not any(p.endswith("depthwise.weight") for p in handle.params)
    # each depthwise conv now gives OneTrainer's output
    reference = copy.deepcopy(base)
    for k, v in expected_weights(base, pairs, 0.6, 0.5).items():
        reference.state_dict()[k].copy_(v)
    for path, (d, u) in convs.items():
        parent, name = path.rsplit(".", 1)
        setattr(reference.get_submodule(parent), name,
                OneTrainerConvLoRA(reference.get_submodule(path), d, u, alpha=2.0, strength=0.6))
    for path in convs:
        conv = model.get_submodule(path)
        x = torch.randn(2, conv.in_channels, 5, 5)
        with torch.no_grad():
            got, plain, want = conv(x), conv._conv_forward(x, conv.weight, conv.bias), reference.get_submodule(path)(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, plain, atol=1e-2)  # the branch is there
    torch.testing.assert_close(run(model), run(reference), rtol=1e-4, atol=1e-4)
    # the branch adds one value per pixel to every channel, which the ResBlock's channel LayerNorm removes again:
    # in Stage C such a LoRA cannot change the output (and trains no further than its zero-initialised lora_up)
    merged_only = copy.deepcopy(base)
    apply_lora(merged_only, lora_from_state_dict({k: v for k, v in tensors.items() if "depthwise" not in k}), 0.6)
    torch.testing.assert_close(run(model), run(merged_only), rtol=1e-5, atol=1e-5)
    handle.set_strength(0.0)
    assert torch.equal(run(model), before)
    handle.set_strength(0.6)
    torch.testing.assert_close(run(model), run(reference), rtol=1e-4, atol=1e-4)
    handle.remove()
    assert_state_equal(model, base.state_dict())
    assert torch.equal(run(model), before) and active_loras(model) == []


def test_unload_all_removes_the_depthwise_branches_too():
    from cascade_lab.models.lora import unload_all

    model = tiny_model()
    before = run(model)
    apply_lora(model, lora_from_state_dict(all_layers_file(model)[2]))
    unload_all(model)
    assert torch.equal(run(model), before)
    assert not model.down_blocks[0][0].depthwise._forward_hooks


def test_a_grouped_conv_lora_of_no_known_shape_is_refused_by_name():
    model = tiny_model()
    tensors = {"lora_prior_unet_down_blocks_0_0_depthwise.lora_down.weight": torch.zeros(4, 32, 3, 3),
               "lora_prior_unet_down_blocks_0_0_depthwise.lora_up.weight": torch.zeros(32, 4, 1, 1)}
    with pytest.raises(Exception, match=r"depthwise has lora_down \[4, 32, 3, 3\] and lora_up \[32, 4, 1, 1\]"):
        apply_lora(model, lora_from_state_dict(tensors))


def test_bundled_embeddings_are_set_aside_in_one_warning():
    model = tiny_model()
    tensors = all_layers_file(model)[2] | {"bundle_emb.<sks>.clip_g": torch.randn(2, 24),
                                           "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                               torch.zeros(2, 32),
                                           "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
                                               torch.zeros(64, 2)}
    with pytest.warns(UserWarning) as record:
        apply_lora(model, lora_from_state_dict(tensors))
    assert len(record) == 1
    msg = str(record[0].message)
    assert "1 text-encoder LoRA modules (pass text_encoder=" in msg and "1 token-embedding tensors (<sks>" in msg


# ---------------------------------------------------------------------------------- text encoder (CLIP-G)


def tiny_text_encoder(tmp_path):
    """A CLIP text model with projection (2 layers, width 32) and a small local BPE tokenizer."""
    from cascade_lab.models.clip import TextEncoder

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c + end: 2 * i + j for i, c in enumerate(letters) for j, end in enumerate(("", "</w>"))}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"),
                                     model_max_length=77)
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=24, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id)
    return TextEncoder(transformers.CLIPTextModelWithProjection(config).eval(), tok)


TE_LAYERS = {  # kohya / OneTrainer layer name -> transformers parameter
    **{f"text_model_encoder_layers_{i}_self_attn_{x}_proj": f"text_model.encoder.layers.{i}.self_attn.{x}_proj.weight"
       for i in range(2) for x in ("q", "k", "v", "out")},
    **{f"text_model_encoder_layers_{i}_mlp_{x}": f"text_model.encoder.layers.{i}.mlp.{x}.weight"
       for i in range(2) for x in ("fc1", "fc2")},
    "text_projection": "text_projection.weight",
}
TE_PREFIXES = {  # how each tool spells a layer's key
    "kohya": lambda n: "lora_te_" + n,
    "onetrainer_legacy": lambda n: "lora_prior_te_" + n,
    "onetrainer_diffusers": lambda n: "text_encoder." + TE_LAYERS[n].removesuffix(".weight"),
    "comfyui": lambda n: "text_encoders.clip_g.transformer." + TE_LAYERS[n].removesuffix(".weight"),
}


@pytest.mark.parametrize("spelling", TE_PREFIXES)
def test_text_encoder_lora_is_merged_into_clip_g_and_changes_the_embeddings(tmp_path, spelling):
    text = tiny_text_encoder(tmp_path)
    te_base = copy.deepcopy(text.model)
    model = tiny_model()
    stage_c = low_rank(model, ["clip_txt_mapper"])
    g = torch.Generator().manual_seed(11)
    te_pairs = {}
    for name, param in TE_LAYERS.items():
        n_out, n_in = text.model.get_parameter(param).shape
        te_pairs[name] = (torch.randn(3, n_in, generator=g) * 0.2, torch.randn(n_out, 3, generator=g) * 0.2)
    tensors = onetrainer_dict(stage_c, "kohya_in_proj", alpha=4.0)
    for name, (d, u) in te_pairs.items():
        key = TE_PREFIXES[spelling](name)
        tensors |= {f"{key}.lora_down.weight": d, f"{key}.lora_up.weight": u, f"{key}.alpha": torch.tensor(1.5)}
    before_c, before_pooled = text.encode(["a cat", "dog"])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = apply_lora(model, lora_from_state_dict(tensors), strength=0.8, text_encoder=text)
    want = {k: v.clone() for k, v in te_base.state_dict().items()}
    for name, (d, u) in te_pairs.items():
        want[TE_LAYERS[name]] += 0.8 * 0.5 * (u @ d)  # alpha / rank = 1.5 / 3
    assert_state_close(text.model, want)
    reference = copy.deepcopy(te_base)
    reference.load_state_dict(want)
    from cascade_lab.models.clip import TextEncoder

    clip_text, pooled = text.encode(["a cat", "dog"])
    ref_text, ref_pooled = TextEncoder(reference, text.tokenizer).encode(["a cat", "dog"])
    torch.testing.assert_close(clip_text, ref_text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(clip_text, before_c, atol=1e-3) and not torch.allclose(pooled, before_pooled, atol=1e-3)

    handle.set_strength(0.0)  # follows the Stage C handle
    assert torch.equal(text.encode(["a cat", "dog"])[0], before_c)
    handle.remove()
    assert_state_equal(text.model, te_base.state_dict())
    # its own strength (ComfyUI's strength_clip): Stage C at 1, the text encoder at 0.8; set_strength leaves it
    handle = apply_lora(model, lora_from_state_dict(tensors), text_encoder=text, text_encoder_strength=0.8)
    assert_state_close(text.model, want)
    handle.set_strength(0.3)
    assert_state_close(text.model, want)
    assert handle.text_encoder is not None
    handle.text_encoder.set_strength(0.0)
    assert_state_equal(text.model, te_base.state_dict())
    handle.remove()
    assert_state_equal(text.model, te_base.state_dict())
    assert active_loras(text.model) == [] and active_loras(model) == []


def test_text_encoder_lora_for_another_clip_is_refused_before_anything_changes(tmp_path):
    text = tiny_text_encoder(tmp_path)
    te_state = {k: v.clone() for k, v in text.model.state_dict().items()}
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = onetrainer_dict(low_rank(model, ["clf.1"]), "kohya_in_proj", alpha=1.0) | {
        "lora_te_text_model_encoder_layers_30_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
        "lora_te_text_model_encoder_layers_30_mlp_fc1.lora_up.weight": torch.zeros(64, 2),
    }
    with pytest.raises(Exception, match=r"1 of 1 text-encoder LoRA modules name layers .*layers_30_mlp_fc1"):
        apply_lora(model, lora_from_state_dict(tensors), text_encoder=text)
    assert_state_equal(model, base)
    assert_state_equal(text.model, te_state)


def test_comfyui_style_clip_side_alone(tmp_path):
    """LoraLoader patches MODEL and CLIP apart: apply_lora(text_encoder=False) + apply_text_encoder_lora."""
    text = tiny_text_encoder(tmp_path)
    te_base = copy.deepcopy(text.model)
    model = tiny_model()
    stage_c_base = copy.deepcopy(model)
    d, u = torch.randn(2, 32) * 0.1, torch.randn(64, 2) * 0.1
    tensors = {"lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": d,
               "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": u}
    lora = lora_from_state_dict(tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(model, lora, 0.5, text_encoder=False)  # nothing to merge in Stage C, no warning
    assert_state_equal(model, stage_c_base.state_dict())
    handle = apply_text_encoder_lora(text, lora, strength=1.2)
    want = {k: v.clone() for k, v in te_base.state_dict().items()}
    want["text_model.encoder.layers.1.mlp.fc1.weight"] += 1.2 * (u @ d)
    assert_state_close(text.model, want)
    handle.remove()
    assert_state_equal(text.model, te_base.state_dict())


def test_cascade_load_lora_merges_the_text_encoder_part(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`Cascade.load_lora` gives a kohya file's ``lora_te_*`` part to CLIP-G: the prompt's embedding changes by
    the merged delta, and unloading brings the text encoder back bit for bit."""
    from safetensors.torch import save_file

    from cascade_lab import Cascade

    cascade = Cascade("tiny")
    text = cascade.pipeline.stages.text_encoder
    fc1 = text.model.text_model.encoder.layers[0].mlp.fc1
    before = fc1.weight.detach().clone()
    base = text.encode(["a red circle"])[0].clone()
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, fc1.in_features, generator=g), torch.randn(fc1.out_features, 2, generator=g)
    path = tmp_path / "te.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up,
               "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(2.0)}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is set aside
        cascade.load_lora(path, 0.5)
    torch.testing.assert_close(fc1.weight, before + 0.5 * up @ down)
    assert not torch.equal(text.encode(["a red circle"])[0], base)
    cascade.unload_lora(path)
    assert torch.equal(fc1.weight, before)
