"""LoRA training: it learns on a perturbed base, saves kohya/ComfyUI names, and reloads through models/lora.py."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors import safe_open
from training_helpers import comfyui_lora_names, stage_c_inputs, tiny_run

from cascade_lab.models.lora import apply_lora, load_lora_file, stage_c_lora_targets
from cascade_lab.models.stage_c import StageC, StageCConfig
from cascade_lab.training import train
from cascade_lab.training.lora_train import LoraNetwork, lora_targets

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed_base() -> StageC:
    """The tiny Stage C with a non-zero output conv: with the official zero init only clf would get gradient."""
    torch.manual_seed(3)
    base = StageCConfig.tiny().build()
    with torch.no_grad():
        base.clf[1].weight.normal_(0, 0.05)
    return base


def test_lora_learns_saves_kohya_names_and_reloads(shapes_dir, shared_cache, tmp_path) -> None:
    base = perturbed_base()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    start = time.perf_counter()
    run = train(**tiny_run(shapes_dir, shared_cache, tmp_path, mode="lora", network_target="all_linear",
                           network_dim=4, network_alpha=4, learning_rate=1e-2, max_train_steps=200,
                           val_every_n_steps=100), stage_c=base)
    elapsed = time.perf_counter() - start
    before, after = run.val_losses[0]["val_loss"], run.val_losses[-1]["val_loss"]
    print(f"LoRA (all_linear, rank 4): val loss {before:.3f} -> {after:.3f} in 200 steps, {elapsed:.1f} s")
    assert after < 0.6 * before

    # the run gave the caller's model its own weights back, in the same key order
    assert list(base.state_dict()) == list(original)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in original.items())

    # every saved name is a Stage C weight under ComfyUI's rules, with matching shapes and alpha stored
    names = comfyui_lora_names(base)
    with safe_open(str(run.output_file), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    modules = {k.split(".")[0] for k in keys}
    assert len(modules) == len(lora_targets(base, "all_linear")) == 67
    for name in modules:
        assert name in names, f"ComfyUI would log 'lora key not loaded: {name}'"
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert (up.flatten(1) @ down.flatten(1)).numel() == torch.Size(names[name]).numel()
        assert float(tensors[f"{name}.alpha"]) == 4.0
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    assert metadata["modelspec.architecture"] == "stable-cascade/lora"
    assert metadata["cascade_lab.network_target"] == "all_linear"
    assert all(name[len("lora_unet_"):] in stage_c_lora_targets(base) for name in modules)
    trained_up = [n for n in modules if tensors[f"{n}.lora_up.weight"].abs().max() > 0]
    assert set(modules) - set(trained_up) <= {"lora_unet_clip_img_mapper"}  # zero image embeddings: no gradient

    # the trained outputs: the network re-attached, and the file merged by the loader, agree
    inputs = stage_c_inputs()
    with torch.no_grad():
        untouched = base(**inputs)
        run.network.attach(base)
        trained = base(**inputs)
        run.network.detach()
        handle = apply_lora(base, load_lora_file(run.output_file))
        reloaded = base(**inputs)
        handle.remove()
    assert (trained - untouched).abs().max() > 0.1
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)


def test_attention_only_targets_and_full_size_names() -> None:
    """attention: to_q/k/v + out_proj per AttnBlock; all_linear on the 3.6B model is kohya's 647 modules."""
    tiny = StageCConfig.tiny().build()
    attention = lora_targets(tiny, "attention")
    assert len(attention) == 4 * 6 and {t.name.rsplit("_", 1)[-1] for t in attention} == {"q", "k", "v", "proj"}
    with torch.device("meta"):
        full = StageC()
    names = comfyui_lora_names(full)
    targets = lora_targets(full, "all_linear")
    assert len(targets) == 647 and len(lora_targets(full, "attention")) == 256
    assert all(t.name in names and names[t.name][0] == t.n_out for t in targets)
    assert "lora_unet_down_blocks_0_2_attention_attn_to_q" in names
    assert "lora_unet_down_blocks_0_1_mapper_sca" in {t.name for t in targets}


def test_network_starts_as_the_identity_and_detaches_exactly() -> None:
    base = perturbed_base()
    inputs = stage_c_inputs()
    network = LoraNetwork.for_model(base, rank=2, alpha=1, target="all_linear")
    with torch.no_grad():
        plain = base(**inputs)
        network.attach(base)
        assert {id(p) for p in network.parameters()} <= {id(p) for p in base.parameters()}  # DDP syncs them
        assert torch.equal(base(**inputs), plain)  # lora_up starts at zero
        for pair in network.pairs.values():
            pair.lora_up.normal_()
        assert not torch.allclose(base(**inputs), plain)
        network.detach()
        assert torch.equal(base(**inputs), plain) and not set(network.parameters()) & set(base.parameters())
    state = network.kohya_state_dict(torch.bfloat16)
    assert state["lora_unet_clf_1.lora_down.weight"].shape == (2, 32, 1, 1)
    assert state["lora_unet_clf_1.alpha"].dtype == torch.bfloat16
