"""A file-based variant runs end to end offline: files located in a folder, lean-loaded, text encoder and
tokenizer from the Hugging Face folder layout — the path real weights take, at tiny size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cascade_lab
from cascade_lab.api import Cascade
from cascade_lab.registry import Variant, VariantFile


def write_text_encoder(root) -> None:  # type: ignore[no-untyped-def]
    """A tiny CLIP text tower + BPE tokenizer in stable-cascade's text_encoder/ + tokenizer/ layout."""
    import transformers

    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    vocab = {}
    for c in "abcdefghijklmnopqrstuvwxyz ":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}))
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(special))
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                         projection_dim=24, bos_token_id=len(vocab) - 2,
                                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    torch.manual_seed(0)
    transformers.CLIPTextModelWithProjection(config).save_pretrained(root / "text_encoder")


class FilesVariant:
    """A plugin registering a tiny variant whose every stage is a safetensors file."""

    @staticmethod
    @cascade_lab.hookimpl
    def register_variants(register):  # type: ignore[no-untyped-def]
        files = {name: VariantFile(f"{name}_tiny.safetensors", repo_id="test/tiny-cascade")
                 for name in ("stage_c", "stage_b", "stage_a", "previewer")}
        files["text_encoder"] = VariantFile("model.safetensors", repo_id="test/tiny-cascade", subfolder="text_encoder")
        register(Variant("tiny_files", "tiny stages as files", files, stage_c="tiny", stage_b="tiny",
                         presets={"stage_a": "tiny", "previewer": "tiny"}))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):  # type: ignore[no-untyped-def]
    from cascade_lab.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny_cascade")
    stages = build_tiny()
    for name in ("stage_c", "stage_b", "stage_a", "previewer"):
        save_file({k: v.contiguous() for k, v in getattr(stages, name).state_dict().items()},
                  str(root / f"{name}_tiny.safetensors"))
    write_text_encoder(root)
    cascade_lab.register_plugin(FilesVariant, name="files_variant")
    yield root
    cascade_lab.unregister_plugin("files_variant")


def test_file_variant_generates_offline_and_reproducibly(folder, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cascade = Cascade("tiny_files", folders=[folder])
    a = cascade.generate("a red circle", seed=2, width=128, height=128, steps_c=2, steps_b=2)
    b = cascade.generate("a red circle", seed=2, width=128, height=128, steps_c=2, steps_b=2)
    assert a.image.size == (128, 128) and a.params.variant == "tiny_files"
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    stages = cascade.pipeline.stages
    assert stages.effnet is None and stages.image_encoder is None  # not in the variant: features that need them fail
    assert type(stages.text_encoder.tokenizer).__name__.startswith("CLIPTokenizer")
    with pytest.raises(ValueError, match="has no EfficientNet encoder"):
        cascade.img2img(a.image, "x", strength=0.5, width=128, height=128, steps_c=2, steps_b=2)


def test_missing_files_name_every_file_and_place(folder, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from cascade_lab.weights import WeightsNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as info:
        Cascade("tiny_files", folders=[tmp_path]).generate("x", width=128, height=128, steps_c=1, steps_b=1)
    message = str(info.value)
    for name in ("stage_c_tiny.safetensors", "stage_b_tiny.safetensors", "stage_a_tiny.safetensors"):
        assert name in message
    assert str(tmp_path) in message
