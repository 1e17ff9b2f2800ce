"""CLIP text/image encoders from single safetensors files (ComfyUI files and all-in-one sections), with the
built-in configs and the local tokenizer search. Tiny random CLIPs stand in for the real towers (the built-in
config functions are patched); the full-size configs are only built on the meta device. Nothing downloads."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from weights_helpers import write_sparse

transformers = pytest.importorskip("transformers")

from models.test_clip import _tokenizer_files, make_tokenizer  # noqa: E402  (tests/models/test_clip.py)

from cascade_lab.api import load_stages  # noqa: E402
from cascade_lab.models import clip  # noqa: E402
from cascade_lab.models.clip import ImageEncoder, TextEncoder  # noqa: E402
from cascade_lab.registry import Variant, VariantFile  # noqa: E402
from cascade_lab.weights import StateDictMismatchError, WeightsFileError, WrongStageError  # noqa: E402
from cascade_lab.weights.detect import detect  # noqa: E402
from cascade_lab.weights.encoders import TokenizerNotFoundError, find_tokenizer  # noqa: E402

REV = "0123456789abcdef0123456789abcdef01234567"
PROMPTS = ["a red cat", "dog"]


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, no ComfyUI, offline; any download fails the test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "CASCADE_LAB_COMFYUI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):  # type: ignore[no-untyped-def]
        pytest.fail(f"tried to download {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    return tmp_path / "hf"


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _tokenizer_files(tmp_path_factory.mktemp("sd1_tokenizer"))


@pytest.fixture(scope="module")
def tok(tok_files):  # type: ignore[no-untyped-def]
    return make_tokenizer(tok_files)


def tiny_text_config(tok):  # type: ignore[no-untyped-def]
    return transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=24, hidden_act="gelu", bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)


def tiny_vision_config():  # type: ignore[no-untyped-def]
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=28, patch_size=14, projection_dim=24)


@pytest.fixture
def tiny(tok, monkeypatch):  # type: ignore[no-untyped-def]
    """The built-in configs replaced by tiny ones; the source models the files are written from."""
    monkeypatch.setattr(clip, "clip_g_text_config", lambda: tiny_text_config(tok))
    monkeypatch.setattr(clip, "clip_l_vision_config", tiny_vision_config)
    torch.manual_seed(0)
    text = transformers.CLIPTextModelWithProjection(tiny_text_config(tok)).eval()
    vision = transformers.CLIPVisionModelWithProjection(tiny_vision_config()).eval()
    return text, vision


def comfyui_text_keys(text) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """ComfyUI's CLIP-G naming: clip_g.transformer.text_model.*, open_clip's [in, out] clip_g.text_projection."""
    sd = {f"clip_g.transformer.{k}": v for k, v in text.state_dict().items() if k.startswith("text_model.")}
    sd["clip_g.text_projection"] = text.text_projection.weight.t().contiguous()
    sd["clip_g.logit_scale"] = torch.tensor(4.6)
    sd["clip_g.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old exports carry it
    return sd


def vision_keys(vision) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    sd = dict(vision.state_dict())
    sd["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    return sd


def write_all_in_one(path: Path, text, vision) -> Path:  # type: ignore[no-untyped-def]
    """A ComfyUI stable_cascade_stage_c.safetensors: Stage C, previewer, CLIP-G text, CLIP-L vision."""
    from test_weights_loader import _split  # ComfyUI's split to_q/to_k/to_v attention projections

    from cascade_lab.models.tiny import build_tiny

    stages = build_tiny()
    sd = _split(stages.stage_c.state_dict(), "model.diffusion_model.")
    sd |= {"vae.previewer." + k: v for k, v in stages.previewer.state_dict().items()}
    sd |= {"text_encoder." + k: v for k, v in comfyui_text_keys(text).items()}
    sd |= {"clip_l_vision." + k: v for k, v in vision_keys(vision).items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def assert_same_weights(loaded, source) -> None:  # type: ignore[no-untyped-def]
    got, want = loaded.state_dict(), source.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def assert_same_encoders(loaded_text, loaded_image, text, vision, tok) -> None:  # type: ignore[no-untyped-def]
    """Bit-identical weights, same outputs (to float rounding: file-mapped weights are not 64-byte aligned, so
    the CPU kernels may sum in another order)."""
    assert_same_weights(loaded_text.model, text)
    assert_same_weights(loaded_image.model, vision)
    for got, want in zip(loaded_text.encode(PROMPTS), TextEncoder(text, tok).encode(PROMPTS), strict=True):
        torch.testing.assert_close(got, want)
    image = torch.rand(2, 3, 40, 50, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded_image.encode(image), ImageEncoder(vision).encode(image))


# ------------------------------------------------------------------------------------------ loading


def test_comfyui_all_in_one_sections_load_into_both_encoders(tmp_path: Path, tiny, tok, tok_files) -> None:
    text, vision = tiny
    path = write_all_in_one(tmp_path / "stable_cascade_stage_c.safetensors", text, vision)
    found = detect(path).components
    assert (found["text_encoder"].prefix, found["image_encoder"].prefix) == ("text_encoder.", "clip_l_vision.")
    tok_dir = tok_files[0].parent
    loaded_text = TextEncoder.from_file(path, tokenizer_path=tok_dir)  # the sections are detected
    loaded_image = ImageEncoder.from_file(path)
    assert_same_encoders(loaded_text, loaded_image, text, vision, tok)
    assert not loaded_text.model.training and loaded_text.dtype == torch.float32
    assert all(not t.is_meta for t in [*loaded_text.model.state_dict(keep_vars=True).values(),
                                       *loaded_image.model.buffers()])
    explicit = TextEncoder.from_file(path, prefix="text_encoder.", tokenizer_path=tok_dir, dtype=torch.bfloat16)
    assert explicit.dtype == torch.bfloat16 and explicit.model.text_model.embeddings.position_ids.tolist() == [
        list(range(77))]
    with pytest.raises(WrongStageError, match=r"keys under 'model\.diffusion_model\.' are not a CLIP-G text"):
        TextEncoder.from_file(path, prefix="model.diffusion_model.", tokenizer_path=tok_dir)


def test_bare_transformers_text_file_finds_the_tokenizer_folder_next_to_it(tmp_path: Path, tiny, tok,
                                                                           tok_files) -> None:
    text, vision = tiny
    folder = tmp_path / "text_encoders"
    (folder / "tokenizer").mkdir(parents=True)
    _tokenizer_files(folder / "tokenizer")
    save_file({k: v.to(torch.bfloat16) for k, v in text.state_dict().items()}, str(folder / "clip_g.safetensors"))
    loaded = TextEncoder.from_file(folder / "clip_g.safetensors")
    assert loaded.dtype == torch.bfloat16  # the stored dtype is kept
    reference = TextEncoder(text.to(torch.bfloat16), tok)
    assert_same_weights(loaded.model, reference.model)
    for got, want in zip(loaded.encode(PROMPTS), reference.encode(PROMPTS), strict=True):
        torch.testing.assert_close(got, want)
    # a full CLIPModel-style file: the image encoder takes the vision tower, ignoring the text one
    both = {**text.float().state_dict(), **vision_keys(vision), "logit_scale": torch.tensor(4.6)}
    save_file({k: v.contiguous() for k, v in both.items()}, str(tmp_path / "clip_l.safetensors"))
    assert_same_weights(ImageEncoder.from_file(tmp_path / "clip_l.safetensors").model, vision)


def test_from_path_uses_the_transformers_folder_when_config_json_is_there(tmp_path: Path, tiny, monkeypatch) -> None:
    _, vision = tiny
    vision.save_pretrained(tmp_path / "image_encoder")
    with monkeypatch.context() as m:
        m.setattr(ImageEncoder, "from_file", lambda *a, **k: pytest.fail("config.json is there: use from_folder"))
        loaded = ImageEncoder.from_path(tmp_path / "image_encoder" / "model.safetensors")
    assert_same_weights(loaded.model, vision)
    save_file(dict(vision.state_dict()), str(tmp_path / "clip_vision_l.safetensors"))  # no config.json: from_file
    single = ImageEncoder.from_path(tmp_path / "clip_vision_l.safetensors")
    assert type(single.model).__name__ == "CLIPVisionModelWithProjection"
    assert_same_weights(single.model, vision)


# ------------------------------------------------------------------------------------------- errors


def test_missing_keys_are_listed_and_nothing_random_is_returned(tmp_path: Path, tiny, tok_files) -> None:
    text, _ = tiny
    sd = dict(text.state_dict())
    del sd["text_model.encoder.layers.1.mlp.fc2.bias"], sd["text_projection.weight"]
    sd["text_model.extra.weight"] = torch.ones(2)
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(StateDictMismatchError) as info:
        TextEncoder.from_file(tmp_path / "broken.safetensors", tokenizer_path=tok_files[0].parent)
    message = str(info.value)
    assert "refusing to load a partly random model" in message
    assert "2 key(s) missing from the file: text_model.encoder.layers.1.mlp.fc2.bias, text_projection.weight" in message
    assert "1 key(s) unexpected in the file: text_model.extra.weight" in message


def _clip_l_text_layout() -> dict[str, tuple[int, ...]]:
    """Every key and shape of openai/clip-vit-large-patch14's text tower (width 768, 12 layers), from meta."""
    config = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, projection_dim=768)
    with torch.device("meta"):
        model = transformers.CLIPTextModelWithProjection(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_a_clip_l_text_file_given_as_clip_g_says_what_it_is(tmp_path: Path, tok_files) -> None:
    # the real built-in CLIP-G config; the CLIP-L file is header-only (sparse): refused before any read
    path = write_sparse(tmp_path / "clip_l.safetensors", _clip_l_text_layout())
    with pytest.raises(WrongStageError) as info:
        TextEncoder.from_file(path, tokenizer_path=tok_files[0].parent)
    message = str(info.value)
    assert "holds a CLIP ViT-L/14 (CLIP-L" in message and "(width 768, 12 layers)" in message
    assert "not a CLIP ViT-bigG/14 (CLIP-G) text encoder (width 1280, 32 layers)" in message


def test_a_file_of_the_other_kind_is_refused_naming_it(tmp_path: Path, tiny, tok_files) -> None:
    text, vision = tiny
    save_file(dict(text.state_dict()), str(tmp_path / "text.safetensors"))
    with pytest.raises(WrongStageError, match=r"holds no CLIP ViT-L/14 image encoder: it holds CLIP-G text "
                                              r"encoder; load it with TextEncoder\.from_file"):
        ImageEncoder.from_file(tmp_path / "text.safetensors")
    save_file(dict(vision.state_dict()), str(tmp_path / "vision.safetensors"))
    with pytest.raises(WrongStageError, match=r"holds no CLIP-G text encoder: it holds CLIP ViT-L/14 image "
                                              r"encoder; load it with ImageEncoder\.from_file"):
        TextEncoder.from_file(tmp_path / "vision.safetensors", tokenizer_path=tok_files[0].parent)


def test_no_tokenizer_anywhere_names_every_place_and_the_command(tmp_path: Path, offline: Path) -> None:
    folder = tmp_path / "models" / "text_encoders"
    folder.mkdir(parents=True)
    path = folder / "stable_cascade_text_encoder.safetensors"
    write_sparse(path, {"text_model.final_layer_norm.weight": (1280,)})  # header only: no tensor is read
    with pytest.raises(TokenizerNotFoundError) as info:
        TextEncoder.from_file(path)
    message = str(info.value)
    for place in (folder / "tokenizer", offline / "hub" / "models--stabilityai--stable-cascade",
                  offline / "hub" / "models--stabilityai--stable-cascade-prior",
                  tmp_path / "comfy" / "sd1_tokenizer"):
        assert str(place) in message, place
    assert "hf download stabilityai/stable-cascade --include 'tokenizer/*'" in message
    assert "tokenizer_path=" in message and "$CASCADE_LAB_COMFYUI" in message
    with pytest.raises(TokenizerNotFoundError, match="needs vocab.json and merges.txt"):
        find_tokenizer(path, tmp_path)
    with pytest.raises(WeightsFileError, match="nope.safetensors: cannot read the file"):
        TextEncoder.from_file(folder / "nope.safetensors")  # a missing file is named before any tokenizer search


# ---------------------------------------------------------------------------------------- tokenizer


def test_comfyui_sd1_tokenizer_is_found_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    (comfy / "comfy" / "sd1_tokenizer").mkdir(parents=True)
    _tokenizer_files(comfy / "comfy" / "sd1_tokenizer")
    elsewhere = tmp_path / "elsewhere" / "clip_g.safetensors"
    with pytest.raises(TokenizerNotFoundError):
        find_tokenizer(elsewhere)
    monkeypatch.setenv("CASCADE_LAB_COMFYUI", str(comfy))
    assert find_tokenizer(elsewhere) == comfy / "comfy" / "sd1_tokenizer"
    monkeypatch.setenv("CASCADE_LAB_COMFYUI", str(comfy / "models"))  # the models/ folder itself works too
    assert find_tokenizer(elsewhere) == comfy / "comfy" / "sd1_tokenizer"
    monkeypatch.delenv("CASCADE_LAB_COMFYUI")  # a file inside the install's models/ finds it without the variable
    assert find_tokenizer(comfy / "models" / "text_encoders" / "x.safetensors") == comfy / "comfy" / "sd1_tokenizer"


def test_hub_cache_tokenizer_snapshot_comes_before_comfyui(tmp_path: Path, offline: Path, monkeypatch) -> None:
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy" / "sd1_tokenizer").mkdir(parents=True)
    _tokenizer_files(comfy / "comfy" / "sd1_tokenizer")
    monkeypatch.setenv("CASCADE_LAB_COMFYUI", str(comfy))
    repo = offline / "hub" / "models--stabilityai--stable-cascade-prior"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    snapshot = repo / "snapshots" / REV / "tokenizer"
    snapshot.mkdir(parents=True)
    _tokenizer_files(snapshot)
    assert find_tokenizer(tmp_path / "clip_g.safetensors") == snapshot


# --------------------------------------------------------------------------------------- built-ins


def test_builtin_configs_build_the_full_size_towers_on_meta() -> None:
    from cascade_lab.builtins.variants import TEXT_ENCODER

    text_config, vision_config = clip.clip_g_text_config(), clip.clip_l_vision_config()
    assert (text_config.hidden_act, text_config.eos_token_id, text_config.vocab_size) == ("gelu", 49407, 49408)
    assert vision_config.hidden_act == "quick_gelu"
    with torch.device("meta"):
        text = transformers.CLIPTextModelWithProjection(text_config)
        vision = transformers.CLIPVisionModelWithProjection(vision_config)
    assert text.text_projection.weight.shape == (1280, 1280)
    assert len(text.text_model.encoder.layers) == 32 and text.text_model.encoder.layers[0].mlp.fc1.weight.shape == (
        5120, 1280)
    assert text.text_model.embeddings.position_embedding.weight.shape == (77, 1280)
    assert sum(p.numel() for p in text.parameters()) == TEXT_ENCODER
    assert vision.visual_projection.weight.shape == (768, 1024)
    assert len(vision.vision_model.encoder.layers) == 24
    assert vision.vision_model.embeddings.patch_embedding.weight.shape == (1024, 3, 14, 14)
    assert vision.vision_model.embeddings.position_embedding.weight.shape == (257, 1024)  # 16² patches + class


# --------------------------------------------------------------------------------------- load_stages


def test_load_stages_reads_single_file_encoders_from_comfyui_and_all_in_one(tmp_path: Path, tiny, tok) -> None:
    text, vision = tiny
    comfy = tmp_path / "ComfyUI"
    for sub in ("text_encoders", "clip_vision"):
        (comfy / "models" / sub).mkdir(parents=True)
    (comfy / "comfy" / "sd1_tokenizer").mkdir(parents=True)
    _tokenizer_files(comfy / "comfy" / "sd1_tokenizer")
    save_file(comfyui_text_keys(text), str(comfy / "models" / "text_encoders" / "stable_cascade_clip_g.safetensors"))
    save_file(vision_keys(vision), str(comfy / "models" / "clip_vision" / "clip_vision_l.safetensors"))
    files = {"text_encoder": VariantFile("model.safetensors", repo_id="test/none", subfolder="text_encoder"),
             "image_encoder": VariantFile("model.safetensors", repo_id="test/none", subfolder="image_encoder")}
    variant = Variant("encoders_only", "CLIP towers as single files", files)

    stages = load_stages(variant, comfyui=comfy, download=False)
    assert stages.stage_c is None and stages.variant == "encoders_only"
    assert_same_encoders(stages.text_encoder, stages.image_encoder, text, vision, tok)

    all_in_one = write_all_in_one(tmp_path / "stable_cascade_stage_c.safetensors", text, vision)
    stages = load_stages(variant, comfyui=comfy, download=False,
                         files={"text_encoder": all_in_one, "image_encoder": all_in_one})
    assert_same_encoders(stages.text_encoder, stages.image_encoder, text, vision, tok)
    assert np.isfinite(stages.text_encoder.encode("a cat")[0].numpy()).all()

