"""load_stage: every stage loads lean from official, ComfyUI and diffusers files and behaves like a normal load."""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import call_kwargs, load_fixture, reference_dir
from safetensors.torch import save_file

from cascade_lab.weights.loader import (
    StateDictMismatchError,
    WrongStageError,
    load_stage,
    weight_files,
)
from cascade_lab.weights.safetensors_io import WeightsFileError

# fixture -> (stage, config preset, dtype to load in)
FIXTURES = {
    "stage_c_tiny": ("stage_c", "tiny", None),
    "stage_b_tiny": ("stage_b", "tiny", None),
    "stage_a_tiny": ("stage_a", "tiny", None),
    "previewer": ("previewer", None, None),
    "effnet_encoder": ("effnet", None, torch.float32),  # fp16 file, fp32 expectation
    "controlnet_tiny": ("controlnet", "tiny", None),
}


def _normal_load(stage: str, preset: str | None, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    from cascade_lab.weights.loader import CONFIGS

    module, name = CONFIGS[stage]
    cls = getattr(__import__(module, fromlist=[name]), name)
    model = getattr(cls, preset or "full")().build()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    return model.eval()


def _first_forward(model: torch.nn.Module, cfg: dict, io: dict) -> tuple[torch.Tensor, torch.Tensor]:
    call = next(c for c in cfg["calls"] if c["method"] == "forward")
    with torch.no_grad():
        out = getattr(model, call["method"])(**call_kwargs(call, io))
    if isinstance(out, (list, tuple)):
        index = next(i for i, name in enumerate(call["outputs"]) if name)
        return out[index], io[call["outputs"][index]]
    return out, io[call["outputs"][0]]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_lean_load_matches_a_normal_load_and_the_reference(fixture: str) -> None:
    stage, preset, dtype = FIXTURES[fixture]
    cfg, weights, io = load_fixture(fixture)
    lean = load_stage(stage, reference_dir("fixtures", fixture) / "weights.safetensors", config=preset, dtype=dtype)
    assert not lean.training
    normal = _normal_load(stage, preset, weights)
    for (k, a), (k2, b) in zip(lean.state_dict().items(), normal.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    got, expected = _first_forward(lean, cfg, io)
    torch.testing.assert_close(got, _first_forward(normal, cfg, io)[0], atol=0, rtol=0)
    torch.testing.assert_close(got, expected, atol=cfg["tolerance"]["atol"], rtol=cfg["tolerance"]["rtol"])


def test_without_mmap_every_tensor_owns_exactly_its_storage() -> None:
    """Read with readinto: no tensor is a view into a bigger buffer (no full-size copy kept alive)."""
    model = load_stage("stage_c", reference_dir("fixtures", "stage_c_tiny") / "weights.safetensors",
                       config="tiny", mmap=False)
    for name, t in model.state_dict().items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


def test_mmap_weights_are_copy_on_write_views_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "stage_b.safetensors"
    path.write_bytes((reference_dir("fixtures", "stage_b_tiny") / "weights.safetensors").read_bytes())
    before = path.read_bytes()
    model = load_stage("stage_b", path, config="tiny")
    weight = model.get_parameter("clf.1.weight")
    assert weight.untyped_storage().nbytes() == path.stat().st_size  # a view of the mapped file, no copy
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)  # writes go to private pages, never to the file
    assert path.read_bytes() == before
    again = load_stage("stage_b", path, config="tiny")
    assert torch.equal(again.get_parameter("clf.1.weight"), original)


def test_dtype_cast_while_reading() -> None:
    path = reference_dir("fixtures", "stage_b_tiny") / "weights.safetensors"
    model = load_stage("stage_b", path, config="tiny", dtype=torch.bfloat16)
    _, weights, _ = load_fixture("stage_b_tiny")
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, weights[k].to(torch.bfloat16)), k


def test_stage_c_refuses_float16(tmp_path: Path) -> None:
    path = reference_dir("fixtures", "stage_c_tiny") / "weights.safetensors"
    with pytest.raises(TypeError, match="Stage C does not work in float16"):
        load_stage("stage_c", path, config="tiny", dtype=torch.float16)
    _, weights, _ = load_fixture("stage_c_tiny")
    save_file({k: v.half() for k, v in weights.items()}, str(tmp_path / "c16.safetensors"))
    with pytest.raises(TypeError, match="this file stores float16: pass dtype=torch.bfloat16"):
        load_stage("stage_c", tmp_path / "c16.safetensors", config="tiny")
    assert load_stage("stage_c", tmp_path / "c16.safetensors", config="tiny", dtype=torch.bfloat16)


def test_missing_num_batches_tracked_is_zero_filled(tmp_path: Path) -> None:
    _, weights, _ = load_fixture("previewer")
    kept = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    assert len(kept) < len(weights)
    save_file(kept, str(tmp_path / "previewer.safetensors"))
    model = load_stage("previewer", tmp_path / "previewer.safetensors")
    counters = [v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")]
    assert counters and all(int(c) == 0 and c.dtype == torch.long for c in counters)


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    _, weights, _ = load_fixture("stage_a_tiny")
    broken = dict(weights)
    del broken["out_block.0.weight"]
    broken["up_blocks.99.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "a.safetensors"))
    with pytest.raises(StateDictMismatchError) as e:
        load_stage("stage_a", tmp_path / "a.safetensors", config="tiny")
    msg = str(e.value)
    assert "a.safetensors" in msg and "refusing to load a partly random model" in msg
    assert "1 key(s) missing from the file: out_block.0.weight" in msg
    assert "1 key(s) unexpected in the file: up_blocks.99.weight" in msg


def test_wrong_size_lists_shape_mismatches_and_suggests_config() -> None:
    with pytest.raises(StateDictMismatchError) as e:  # the tiny Stage A file into the full-size model
        load_stage("stage_a", reference_dir("fixtures", "stage_a_tiny") / "weights.safetensors")
    msg = str(e.value)
    assert "does not fit StageA from StageAConfig(levels=2, bottleneck_blocks=12, c_hidden=384" in msg
    assert re.search(r"\d+ shape mismatch\(es\): \S+ file \[\d+.*\] vs model \[\d+.*\]", msg)
    assert "key(s) unexpected in the file: up_blocks.3." in msg  # 2 bottleneck blocks, not 12
    assert "config=" in msg


def test_custom_width_without_config_says_so() -> None:
    with pytest.raises(WeightsFileError, match=r"not a shipped variant \(width 40\); pass config="):
        load_stage("stage_c", reference_dir("fixtures", "stage_c_tiny") / "weights.safetensors")


@pytest.mark.parametrize("asked,fixture,holds", [
    ("stage_c", "stage_b_tiny", "Stage B"),
    ("stage_b", "stage_c_tiny", "Stage C"),
    ("stage_a", "previewer", "latent previewer"),
    ("effnet", "controlnet_tiny", "ControlNet"),
])
def test_wrong_stage_says_what_the_file_is(asked: str, fixture: str, holds: str) -> None:
    path = reference_dir("fixtures", fixture) / "weights.safetensors"
    with pytest.raises(WrongStageError) as e:
        load_stage(asked, path)
    msg = str(e.value)
    assert str(path) in msg and "not a" in msg and f"it holds {holds}" in msg
    assert f"load it as '{FIXTURES[fixture][0]}'" in msg


def test_pickles_are_refused(tmp_path: Path) -> None:
    torch.save({"x": torch.ones(1)}, tmp_path / "stage_b.ckpt")
    with pytest.raises(WeightsFileError, match="Convert it once"):
        load_stage("stage_b", tmp_path / "stage_b.ckpt")
    folder = tmp_path / "decoder"
    folder.mkdir()
    torch.save({"x": torch.ones(1)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsFileError, match="pickle"):
        load_stage("stage_b", folder)


def _split(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in weights.items():
        if ".in_proj_" in k:
            stem, what = k.rsplit(".in_proj_", 1)
            out |= {f"{prefix}{stem}.to_{p}.{what}": c.clone() for p, c in zip("qkv", v.chunk(3), strict=True)}
        else:
            out[prefix + k] = v
    return out


def test_comfyui_all_in_one_checkpoint_loads_each_component(tmp_path: Path) -> None:
    parts = {name: load_fixture(name)[1] for name in ("stage_c_tiny", "effnet_encoder", "previewer")}
    sd = _split(parts["stage_c_tiny"], "model.diffusion_model.")
    sd |= {"vae.encoder." + k: v for k, v in parts["effnet_encoder"].items()}
    sd |= {"vae.previewer." + k: v for k, v in parts["previewer"].items()}
    sd["text_encoder.clip_g.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    path = tmp_path / "stable_cascade_stage_c.safetensors"
    save_file(sd, str(path))
    for stage, name, preset in (("stage_c", "stage_c_tiny", "tiny"), ("effnet", "effnet_encoder", None),
                                ("previewer", "previewer", None)):
        model = load_stage(stage, path, config=preset)
        got = model.state_dict()
        assert sorted(got) == sorted(parts[name]), stage
        assert all(torch.equal(got[k], v) for k, v in parts[name].items()), stage
    with pytest.raises(WrongStageError, match="load it as 'stage_c'"):
        load_stage("stage_b", path)


def _diffusers_prior(root: Path, shards: int = 1, suffix: str = "") -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers

    _, weights, _ = load_fixture("stage_c_tiny")
    converted = {k: v.contiguous() for k, v in
                 convert_stable_cascade_unet_single_file_to_diffusers(dict(weights)).items()}
    folder = root / "prior"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    stem = f"diffusion_pytorch_model{suffix}"
    if shards == 1:
        save_file(converted, str(folder / f"{stem}.safetensors"))
        return weights
    keys = sorted(converted)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {k: converted[k] for k in keys[i::shards]}
        save_file(chunk, str(folder / name))
        weight_map |= dict.fromkeys(chunk, name)
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weights


@pytest.mark.parametrize("shards", [1, 3])
def test_diffusers_folder_loads(tmp_path: Path, shards: int) -> None:
    pytest.importorskip("diffusers")
    weights = _diffusers_prior(tmp_path / "repo", shards)
    for source in (tmp_path / "repo", tmp_path / "repo" / "prior"):
        got = load_stage("stage_c", source, config="tiny").state_dict()
        assert sorted(got) == sorted(weights)
        assert all(torch.equal(got[k], v) for k, v in weights.items())


def test_diffusers_folder_picks_the_dtype_variant_and_refuses_ambiguity(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    _diffusers_prior(tmp_path / "repo")
    _diffusers_prior(tmp_path / "repo", suffix=".bf16")
    prior = tmp_path / "repo" / "prior"
    assert weight_files(prior, "stage_c", torch.bfloat16) == [prior / "diffusion_pytorch_model.bf16.safetensors"]
    assert weight_files(prior, "stage_c", torch.float32) == [prior / "diffusion_pytorch_model.safetensors"]
    (tmp_path / "repo" / "prior_lite").mkdir()
    with pytest.raises(WeightsFileError, match="several Stage C .* folders .*prior, prior_lite"):
        load_stage("stage_c", tmp_path / "repo", config="tiny")


def test_variant_name_resolves_through_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    rev = "f" * 40
    repo = tmp_path / "hf" / "hub" / "models--stabilityai--stable-cascade"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    src = reference_dir("fixtures", "stage_a_tiny") / "weights.safetensors"
    (repo / "snapshots" / rev / "stage_a.safetensors").write_bytes(src.read_bytes())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("downloaded"))
    model = load_stage("stage_a", "lite_bf16", config="tiny")
    assert type(model).__name__ == "StageA"
    with pytest.raises(ValueError, match="has no component 'controlnet'"):
        load_stage("controlnet", "lite_bf16")
    with pytest.raises(FileNotFoundError, match="neither a file or folder nor a variant name"):
        load_stage("stage_a", "no_such_variant")


def test_non_persistent_buffers_left_on_meta_are_an_error(tmp_path: Path) -> None:
    class WithFreqs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))
            self.register_buffer("freqs", torch.arange(3.0), persistent=False)

    class Config:
        def build(self) -> torch.nn.Module:
            return WithFreqs()

    save_file({"blocks.0.weight": torch.ones(1, 1, 1, 1), "blocks.0.bias": torch.ones(1)},
              str(tmp_path / "p.safetensors"))
    with pytest.raises(RuntimeError, match="kept tensors on the meta device .*freqs"):
        load_stage("previewer", tmp_path / "p.safetensors", config=Config())


def test_unknown_stage_and_missing_path() -> None:
    with pytest.raises(ValueError, match="unknown stage 'stage_d'"):
        load_stage("stage_d", "x.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_stage("stage_a", "/nonexistent/stage_a.safetensors")


def test_init_functions_are_skipped_during_the_build_and_restored_after() -> None:
    from cascade_lab.weights.loader import skip_init

    original = torch.nn.init.normal_
    with skip_init():
        t = torch.zeros(3)
        assert torch.nn.init.normal_(t) is t and torch.equal(t, torch.zeros(3))
    assert torch.nn.init.normal_ is original
    with pytest.raises(KeyError), skip_init():
        raise KeyError("boom")
    assert torch.nn.init.normal_ is original
    load_stage("stage_b", reference_dir("fixtures", "stage_b_tiny") / "weights.safetensors", config="tiny")
    assert torch.nn.init.normal_ is original
