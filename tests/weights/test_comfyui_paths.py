"""Models in a ComfyUI tree: checkpoints/ under ComfyUI's names, extra_model_paths.yaml, workflow model names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import reference_dir
from weights_helpers import manifest_shapes, offline_hub, write_sparse

from cascade_lab.builtins.variants import VARIANTS
from cascade_lab.weights.comfyui_paths import comfyui_folders, comfyui_model_path, read_extra_model_paths
from cascade_lab.weights.loader import load_stage
from cascade_lab.weights.locate import WeightsNotFoundError, locate

BF16 = next(v for v in VARIANTS if v.name == "bf16")
COMFY_MODELS = reference_dir("comfyui", "models")


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return offline_hub(tmp_path, monkeypatch)


def _prefixed(prefix: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {prefix + k: v for k, v in shapes.items()}


def _stage_c_checkpoint(path: Path, size: str = "full") -> Path:
    """ComfyUI's all-in-one Stage C: the stage, CLIP-G, EfficientNet (+ mean/std), previewer, CLIP vision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_sparse(path, {
        **_prefixed("model.diffusion_model.", manifest_shapes(f"stage_c_{size}")),
        "text_encoder.clip_g.transformer.text_model.final_layer_norm.weight": (1280,),
        "text_encoder.clip_g.logit_scale": (),
        **_prefixed("vae.encoder.", manifest_shapes("effnet_encoder")),
        "vae.encoder.mean": (3,), "vae.encoder.std": (3,),
        **_prefixed("vae.previewer.", manifest_shapes("previewer")),
        "clip_l_vision.vision_model.post_layernorm.weight": (1024,),
    })


def _stage_b_checkpoint(path: Path, size: str = "full") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_sparse(path, {**_prefixed("model.diffusion_model.", manifest_shapes(f"stage_b_{size}")),
                               **_prefixed("vae.", manifest_shapes("stage_a"))})


def test_every_component_is_found_in_comfyuis_two_checkpoints(hf_home: Path, tmp_path: Path) -> None:
    ckpts = tmp_path / "ComfyUI" / "models" / "checkpoints"
    c = _stage_c_checkpoint(ckpts / "stable_cascade_stage_c.safetensors")
    b = _stage_b_checkpoint(ckpts / "stable_cascade_stage_b.safetensors")
    found = locate(BF16, comfyui=tmp_path / "ComfyUI")
    assert {comp: hit.path for comp, hit in found.items()} == {
        "stage_c": c, "text_encoder": c, "effnet": c, "previewer": c, "image_encoder": c, "stage_b": b, "stage_a": b}
    assert {hit.origin for hit in found.values()} == {"comfyui"}


def test_single_files_come_before_the_checkpoint_and_bf16_names_count(hf_home: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    _stage_c_checkpoint(models / "checkpoints" / "stable_cascade_stage_c_bf16.safetensors")
    (models / "diffusion_models").mkdir()
    single = write_sparse(models / "diffusion_models" / "stable_cascade_stage_c.safetensors",
                          manifest_shapes("stage_c_full"))
    found = locate(BF16, components=["stage_c", "effnet"], comfyui=models)
    assert found["stage_c"].path == single
    assert found["effnet"].path == models / "checkpoints" / "stable_cascade_stage_c_bf16.safetensors"


def test_a_stage_of_the_other_size_is_skipped_and_every_place_is_listed(hf_home: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "unet").mkdir(parents=True)
    write_sparse(models / "unet" / "stage_c_lite.safetensors", manifest_shapes("stage_c_full"))
    with pytest.raises(WeightsNotFoundError) as e:
        locate("lite_bf16", components=["stage_c"], comfyui=models)
    msg = str(e.value)
    assert "stage_c_lite.safetensors (skipped: it holds Stage C (text-conditional prior), full" in msg
    for place in ("unet/stage_c_lite_bf16.safetensors", "diffusion_models/stable_cascade_stage_c_lite.safetensors",
                  "checkpoints/stable_cascade_stage_c_lite_bf16.safetensors"):
        assert f"looked in {models / place}" in msg


EXTRA = """
# ComfyUI's extra_model_paths.yaml format (see its extra_model_paths.yaml.example)
comfyui:
    base_path: ../shared/
    is_default: true
    checkpoints: models/checkpoints/
    clip: models/clip/
a111:
    base_path: $SDWEBUI
    checkpoints: models/Stable-diffusion
    loras: |
         models/Lora
         models/LyCORIS
other:
    unet: {abs_unet}
    controlnet:
      - cn_a
      - cn_b
empty:
"""


def _extra_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "ComfyUI"
    (root / "models").mkdir(parents=True)
    monkeypatch.setenv("SDWEBUI", str(tmp_path / "webui"))
    (root / "extra_model_paths.yaml").write_text(EXTRA.format(abs_unet=tmp_path / "abs_unet"))
    return root


def test_extra_model_paths_yaml_as_comfyui_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _extra_tree(tmp_path, monkeypatch)
    entries = read_extra_model_paths(root / "extra_model_paths.yaml")
    assert (("text_encoders", tmp_path / "shared" / "models" / "clip", True) in entries
            and ("diffusion_models", tmp_path / "abs_unet", False) in entries
            and ("controlnet", root / "cn_b", False) in entries)
    folders = comfyui_folders(root, extra_model_paths=[])
    models, webui = root / "models", tmp_path / "webui"
    assert folders.folders("checkpoints") == [tmp_path / "shared" / "models" / "checkpoints",
                                              models / "checkpoints", webui / "models" / "Stable-diffusion"]
    assert folders.folders("loras") == [models / "loras", webui / "models" / "Lora", webui / "models" / "LyCORIS"]
    assert folders.folders("clip") == [tmp_path / "shared" / "models" / "clip", models / "text_encoders",
                                       models / "clip"]
    assert folders.folders("unet") == [models / "unet", models / "diffusion_models", tmp_path / "abs_unet"]
    assert folders.folders("controlnet")[-2:] == [root / "cn_a", root / "cn_b"]
    # the models/ folder itself names the same install, yaml included
    assert comfyui_folders(models, extra_model_paths=[]).folders("loras") == folders.folders("loras")


def test_locate_searches_the_extra_folders(hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _extra_tree(tmp_path, monkeypatch)
    c = _stage_c_checkpoint(tmp_path / "webui" / "models" / "Stable-diffusion" / "stable_cascade_stage_c.safetensors")
    assert locate(BF16, components=["stage_c", "previewer"], comfyui=root)["previewer"].path == c


def test_workflow_model_names_resolve_like_comfyui(hf_home: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = _extra_tree(tmp_path, monkeypatch)
    monkeypatch.setenv("CASCADE_LAB_COMFYUI", str(root))
    sub = root / "models" / "checkpoints" / "cascade"
    sub.mkdir(parents=True)
    (sub / "stable_cascade_stage_c.safetensors").write_bytes(b"x")
    lycoris = tmp_path / "webui" / "models" / "LyCORIS"
    lycoris.mkdir(parents=True)
    (lycoris / "style.safetensors").write_bytes(b"x")
    (root / "models" / "diffusion_models").mkdir()
    (root / "models" / "diffusion_models" / "stage_b_bf16.safetensors").write_bytes(b"x")
    # a name saved on Windows (backslash subfolder), node class names and legacy kinds all work
    assert comfyui_model_path("CheckpointLoaderSimple", "cascade\\stable_cascade_stage_c.safetensors") == \
        sub / "stable_cascade_stage_c.safetensors"
    assert comfyui_model_path("LoraLoader", "style.safetensors") == lycoris / "style.safetensors"
    assert comfyui_model_path("unet", "stage_b_bf16.safetensors") == \
        root / "models" / "diffusion_models" / "stage_b_bf16.safetensors"
    with pytest.raises(WeightsNotFoundError) as e:
        comfyui_model_path("UNETLoader", "../../stage_c_bf16.safetensors")  # cannot climb out of the folders
    msg = str(e.value)
    assert msg.startswith("ComfyUI model '../../stage_c_bf16.safetensors' (diffusion_models) not found.")
    for folder in (root / "models" / "unet", root / "models" / "diffusion_models", tmp_path / "abs_unet"):
        assert f"looked in {folder / 'stage_c_bf16.safetensors'}" in msg
    assert "diffusion_models files there: stage_b_bf16.safetensors" in msg


def test_no_comfyui_folders_says_what_to_set(hf_home: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match=r"No ComfyUI folders to look in: point \$CASCADE_LAB_COMFYUI"):
        comfyui_model_path("checkpoints", "stable_cascade_stage_c.safetensors")


def test_reference_checkpoint_by_name_through_extra_paths_then_loads(hf_home: Path, tmp_path: Path) -> None:
    """The ComfyUI-written tiny checkpoint, found by its workflow name, loads its Stage C and CLIP-G."""
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text(f"reference:\n    checkpoints: {COMFY_MODELS}\n")
    prompt = json.loads(reference_dir("comfyui", "workflows").joinpath("text_to_image.api.json").read_text())
    ckpt = next(n["inputs"]["ckpt_name"] for n in prompt.values() if "stage_c" in str(n["inputs"].get("ckpt_name")))
    path = comfyui_model_path("CheckpointLoaderSimple", ckpt, extra_model_paths=yaml)
    assert path == COMFY_MODELS / "stable_cascade_stage_c_tiny.safetensors"
    tiny = json.loads(reference_dir("comfyui", "config.json").read_text())["tiny"]["stage_c"]
    stage_c = load_stage("stage_c", path, config=tiny, dtype=torch.float32)
    assert stage_c.clip_img_mapper.weight.shape == (160, 768)


def test_extra_paths_from_the_environment_without_an_install(hf_home: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "nas" / "clip"
    shared.mkdir(parents=True)
    (shared / "stable_cascade_clip_g.safetensors").write_bytes(b"x")
    yaml = tmp_path / "paths.yaml"
    yaml.write_text(f"comfyui:\n    base_path: {tmp_path / 'nas'}\n    clip: clip\n")
    monkeypatch.setenv("CASCADE_LAB_COMFYUI_EXTRA_PATHS", str(yaml))
    assert comfyui_model_path("CLIPLoader", "stable_cascade_clip_g.safetensors") == \
        shared / "stable_cascade_clip_g.safetensors"
    monkeypatch.setenv("CASCADE_LAB_COMFYUI_EXTRA_PATHS", str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match="extra_model_paths file not found: .*missing.yaml"):
        comfyui_model_path("clip", "x.safetensors")
