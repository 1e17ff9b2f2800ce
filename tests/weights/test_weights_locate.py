"""Where variant files come from: explicit paths, folders, ComfyUI, the Hub cache, a download — in that order.

Nothing here may download: the Hub functions are replaced by ones that fail the test (or record calls).
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from weights_helpers import REV, cache_file, manifest_shapes, offline_hub, write_sparse

from cascade_lab.builtins.variants import VARIANTS
from cascade_lab.weights.locate import WeightsNotFoundError, locate

LITE_BF16 = next(v for v in VARIANTS if v.name == "lite_bf16")


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return offline_hub(tmp_path, monkeypatch)


def test_offline_with_nothing_cached_is_one_error_listing_everything(hf_home: Path, tmp_path: Path) -> None:
    comfy = tmp_path / "ComfyUI"
    (comfy / "models" / "unet").mkdir(parents=True)
    with pytest.raises(WeightsNotFoundError) as e:
        locate(LITE_BF16, comfyui=comfy, folders=[tmp_path / "mine"])
    msg = str(e.value)
    assert "'lite_bf16': 7 file(s) not found" in msg and "HF_HUB_OFFLINE is set" in msg
    for comp, f in LITE_BF16.files.items():
        hub = f"{f.subfolder}/{f.filename}" if f.subfolder else f.filename
        assert f"  {comp}: {hub} from {f.repo_id}" in msg
        assert f"download {f.repo_id} {hub}" in msg  # the command that fetches it
    assert f"looked in {tmp_path / 'mine' / 'stage_c_lite_bf16.safetensors'}" in msg
    assert f"looked in {comfy / 'models' / 'unet' / 'stage_c_lite_bf16.safetensors'}" in msg
    assert f"looked in {comfy / 'models' / 'diffusion_models' / 'stage_b_lite_bf16.safetensors'}" in msg
    assert f"looked in {comfy / 'models' / 'clip_vision' / 'model.safetensors'}" in msg
    assert f"looked in Hugging Face cache {hf_home / 'hub' / 'models--stabilityai--stable-cascade'}" in msg
    assert str(hf_home / "hub" / "models--stabilityai--stable-cascade-prior") in msg
    assert "hf download stabilityai/stable-cascade stage_c_lite_bf16.safetensors" in msg
    assert "unset HF_HUB_OFFLINE" in msg


def test_hf_cache_snapshot_is_used_without_downloading(hf_home: Path) -> None:
    path = cache_file(hf_home, "stabilityai/stable-cascade", "stage_c_lite_bf16.safetensors")
    found = locate("lite_bf16", components=["stage_c"])
    assert found["stage_c"].path == path and found["stage_c"].origin == "hf_cache"
    with pytest.raises(WeightsNotFoundError) as e:
        locate("lite_bf16", components=["stage_c", "stage_b"])
    assert "1 file(s) not found" in str(e.value) and "stage_b_lite_bf16" in str(e.value)
    assert "  stage_c:" not in str(e.value)


def test_text_encoder_needs_its_config_and_tokenizer(hf_home: Path) -> None:
    repo = "stabilityai/stable-cascade"
    weights = cache_file(hf_home, repo, "text_encoder/model.safetensors")
    cache_file(hf_home, repo, "text_encoder/config.json", b"{}")
    with pytest.raises(WeightsNotFoundError) as e:
        locate(LITE_BF16, components=["text_encoder"])
    msg = str(e.value)
    assert "text_encoder (tokenizer/*)" in msg and "--include 'tokenizer/*'" in msg
    cache_file(hf_home, repo, "tokenizer/vocab.json", b"{}")
    found = locate(LITE_BF16, components=["text_encoder"])
    assert found["text_encoder"].path == weights and found["text_encoder"].folder == weights.parent


def _comfyui_tree(root: Path) -> Path:
    models = root / "models"
    for sub in ("unet", "vae", "clip", "text_encoders", "clip_vision"):
        (models / sub).mkdir(parents=True)
    write_sparse(models / "unet" / "stage_c_lite_bf16.safetensors", manifest_shapes("stage_c_lite"))
    write_sparse(models / "unet" / "stage_b_lite_bf16.safetensors", manifest_shapes("stage_b_lite"))
    write_sparse(models / "vae" / "stage_a.safetensors", manifest_shapes("stage_a"), "float32")
    write_sparse(models / "vae" / "effnet_encoder.safetensors", manifest_shapes("effnet_encoder"), "float32")
    write_sparse(models / "vae" / "previewer.safetensors", manifest_shapes("previewer"), "float32")
    # a decoy: a "model.safetensors" in clip/ that is some other model, then the real one under text_encoders/
    write_sparse(models / "clip" / "model.safetensors", {"conv_in.weight": (4, 4, 3, 3)})
    write_sparse(models / "text_encoders" / "model.safetensors", {"text_model.final_layer_norm.weight": (1280,)})
    write_sparse(models / "clip_vision" / "clip_vision_l.safetensors",
                 {"vision_model.post_layernorm.weight": (1024,)})
    return models


def test_comfyui_models_folders_from_the_environment(hf_home: Path, tmp_path: Path, monkeypatch) -> None:
    models = _comfyui_tree(tmp_path / "ComfyUI")
    monkeypatch.setenv("CASCADE_LAB_COMFYUI", str(tmp_path / "ComfyUI"))
    found = locate("lite_bf16")
    assert {c: h.origin for c, h in found.items()} == dict.fromkeys(LITE_BF16.files, "comfyui")
    assert found["stage_c"].path == models / "unet" / "stage_c_lite_bf16.safetensors"
    assert found["text_encoder"].path == models / "text_encoders" / "model.safetensors"
    assert found["image_encoder"].path == models / "clip_vision" / "clip_vision_l.safetensors"


def test_comfyui_file_of_the_wrong_kind_is_skipped_and_reported(hf_home: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "unet").mkdir(parents=True)
    write_sparse(models / "unet" / "stage_c_lite_bf16.safetensors", manifest_shapes("stage_b_lite"))
    with pytest.raises(WeightsNotFoundError) as e:
        locate(LITE_BF16, components=["stage_c"], comfyui=models)  # the models/ folder itself works too
    assert "stage_c_lite_bf16.safetensors (skipped: it holds Stage B (diffusion decoder), lite" in str(e.value)


def test_resolution_order_explicit_then_folders_then_comfyui_then_cache(hf_home: Path, tmp_path: Path) -> None:
    name = "stage_c_lite_bf16.safetensors"
    cache_file(hf_home, "stabilityai/stable-cascade", name)
    models = _comfyui_tree(tmp_path / "ComfyUI")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / name).write_bytes(b"x")
    explicit = tmp_path / "elsewhere.safetensors"
    explicit.write_bytes(b"x")

    def where(**kw) -> tuple[str, Path]:
        hit = locate(LITE_BF16, components=["stage_c"], **kw)["stage_c"]
        return hit.origin, hit.path

    assert where() == ("hf_cache", hf_home / "hub" / "models--stabilityai--stable-cascade" / "snapshots" / REV / name)
    assert where(comfyui=models) == ("comfyui", models / "unet" / name)
    assert where(comfyui=models, folders=[mine]) == ("folder", mine / name)
    assert where(comfyui=models, folders=[mine], files={"stage_c": explicit}) == ("explicit", explicit)


def test_folder_with_hub_layout_finds_subfolder_files(hf_home: Path, tmp_path: Path) -> None:
    clone = tmp_path / "stable-cascade-prior"
    (clone / "image_encoder").mkdir(parents=True)
    (clone / "image_encoder" / "model.safetensors").write_bytes(b"x")
    (clone / "image_encoder" / "config.json").write_text("{}")
    hit = locate(LITE_BF16, components=["image_encoder"], folders=[clone])["image_encoder"]
    assert hit.origin == "folder" and hit.folder == clone / "image_encoder"


def test_explicit_file_that_does_not_exist(hf_home: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match=r"stage_c: the file given for it does not exist: .*nope"):
        locate(LITE_BF16, components=["stage_c"], files={"stage_c": tmp_path / "nope.safetensors"})


def test_unknown_component(hf_home: Path) -> None:
    with pytest.raises(KeyError, match="no component 'controlnet'"):
        locate(LITE_BF16, components=["controlnet"])


def test_online_downloads_only_the_missing_files_of_the_variant(hf_home: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cache_file(hf_home, "stabilityai/stable-cascade", "stage_a.safetensors")
    calls = []

    def fake_download(repo_id, filename, *, subfolder=None, cache_dir=None, **kw):
        calls.append((repo_id, subfolder, filename))
        assert Path(cache_dir) == hf_home / "hub"
        return str(cache_file(hf_home, repo_id, f"{subfolder}/{filename}" if subfolder else filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    found = locate("lite_bf16", components=["stage_c", "stage_b", "stage_a"])
    assert calls == [("stabilityai/stable-cascade", None, "stage_c_lite_bf16.safetensors"),
                     ("stabilityai/stable-cascade", None, "stage_b_lite_bf16.safetensors")]
    assert [found[c].origin for c in ("stage_c", "stage_b", "stage_a")] == ["download", "download", "hf_cache"]


def test_download_companions_with_snapshot_download(hf_home: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    repo = "stabilityai/stable-cascade"
    cache_file(hf_home, repo, "text_encoder/model.safetensors")
    patterns = []

    def fake_snapshot(repo_id, *, allow_patterns=None, cache_dir=None, **kw):
        patterns.append((repo_id, allow_patterns))
        cache_file(hf_home, repo_id, "text_encoder/config.json", b"{}")
        cache_file(hf_home, repo_id, "tokenizer/vocab.json", b"{}")
        return str(hf_home)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    locate(LITE_BF16, components=["text_encoder"])
    assert patterns == [(repo, ["text_encoder/config.json", "tokenizer/*"])]


def test_failed_download_and_download_off_are_reported(hf_home: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def broken(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
    with pytest.raises(WeightsNotFoundError) as e:
        locate(LITE_BF16, components=["stage_b"])
    assert "download failed: OSError: network is unreachable" in str(e.value)
    with pytest.raises(WeightsNotFoundError, match="downloading was turned off"):
        locate(LITE_BF16, components=["stage_b"], download=False)


def test_tiny_variant_has_no_files(hf_home: Path) -> None:
    assert locate("tiny") == {}

