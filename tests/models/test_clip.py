"""CLIP wrappers (spec §5.3, gotchas 1-2) on tiny random CLIP models and a tiny local BPE tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from cascade_lab.models.clip import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    ImageEncoder,
    PromptSplitWarning,
    TextEncoder,
    empty_clip_img,
    image_conditioning,
    preprocess_images,
)

MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]
HIDDEN, PROJ = 32, 24


def _tokenizer_files(folder):
    """vocab.json/merges.txt of a tiny CLIP BPE: letters, a few merged words, then the two special tokens."""
    vocab: dict[str, int] = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id, like 49407 in CLIP
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in MERGES]) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _tokenizer_files(tmp_path_factory.mktemp("clip_tok"))


def make_tokenizer(files, **kw):
    vocab, merges = files
    return transformers.CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=77, **kw)


def make_text_model(tok, **kw):
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=PROJ,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    cfg.update(kw)
    return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def tok(files):
    return make_tokenizer(files)


@pytest.fixture(scope="module")
def text(tok):
    return TextEncoder(make_text_model(tok), tok)


def reference(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True)


# --------------------------------------------------------------------------------------------- text


def test_encode_shapes(text):
    clip_text, pooled = text.encode(["a cat", "a red dog"])
    assert clip_text.shape == (2, 77, HIDDEN)
    assert pooled.shape == (2, 1, PROJ)
    assert text.encode("a cat")[0].shape == (1, 77, HIDDEN)


def test_tokenize_pads_with_end_token_and_masks_pads(files, tok):
    # the tokenizer's own pad token is 'a</w>' here (the laion repo once padded with '!'): ignored, eos pads
    enc = TextEncoder(make_text_model(tok), make_tokenizer(files, pad_token="a</w>"))
    ids, mask = enc.tokenize(["a cat"])
    bos, eos = tok.bos_token_id, tok.eos_token_id
    a, cat = tok.convert_tokens_to_ids(["a</w>", "cat</w>"])
    assert ids.shape == mask.shape == (1, 1, 77)
    assert ids[0, 0, :4].tolist() == [bos, a, cat, eos]
    assert (ids[0, 0, 4:] == eos).all()
    assert mask[0, 0].tolist() == [1] * 4 + [0] * 73


def test_clip_text_is_last_hidden_state_before_final_layer_norm(text):
    clip_text, _ = text.encode(["a cat", "red"])
    ids, mask = text.tokenize(["a cat", "red"])
    out = reference(text.model, ids[:, 0], mask[:, 0])
    torch.testing.assert_close(clip_text, out.hidden_states[-1])
    assert not torch.allclose(clip_text, out.last_hidden_state, atol=1e-2)  # that one is final-LN'd


def test_attention_mask_reaches_the_model(text):
    clip_text, _ = text.encode(["a cat"])
    ids, mask = text.tokenize(["a cat"])
    unmasked = reference(text.model, ids[:, 0], None).hidden_states[-1]
    # causal attention: real tokens (0..3) never see pads; pad rows change when pads are masked as keys
    torch.testing.assert_close(clip_text[:, :4], unmasked[:, :4])
    assert (clip_text[:, 4:] - unmasked[:, 4:]).abs().max() > 1e-3


def test_pooled_is_projected_final_ln_first_eos(text):
    _, pooled = text.encode(["a cat", "a red dog"])
    ids, mask = text.tokenize(["a cat", "a red dog"])
    out = reference(text.model, ids[:, 0], mask[:, 0])
    torch.testing.assert_close(pooled, out.text_embeds.unsqueeze(1))
    eos_rows = out.last_hidden_state[[0, 1], [3, 4]]  # bos a cat EOS / bos a red dog EOS
    torch.testing.assert_close(pooled[:, 0], text.model.text_projection(eos_rows))


def test_pooled_uses_first_eos_even_where_transformers_uses_argmax(files):
    # a LoRA/textual-inversion token gets an id above eos; a legacy config (eos_token_id 2) makes
    # transformers pool at argmax(input_ids), i.e. at that token, not at the end token
    tok = make_tokenizer(files)
    tok.add_tokens(["<lora>"])
    model = make_text_model(tok, eos_token_id=2)
    enc = TextEncoder(model, tok)
    _, pooled = enc.encode(["a <lora> cat"])
    ids, mask = enc.tokenize(["a <lora> cat"])
    assert ids[0, 0, 2] == tok.convert_tokens_to_ids("<lora>") > tok.eos_token_id
    out = reference(model, ids[:, 0], mask[:, 0])
    expected = model.text_projection(out.last_hidden_state[:, 4])  # bos a <lora> cat EOS
    torch.testing.assert_close(pooled[:, 0], expected)
    assert not torch.allclose(pooled[:, 0], out.text_embeds, atol=1e-3)


def test_long_prompt_is_split_into_windows_not_truncated(text):
    long, short = "a " * 100, "cat"  # 100 tokens: windows of 75 + 25
    with pytest.warns(PromptSplitWarning, match=r"prompt 0: 100 tokens -> 2 windows.*T=154.*first window"):
        clip_text, pooled = text.encode([long, short])
    assert clip_text.shape == (2, 154, HIDDEN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 75 tokens still fit one window: no notice
        first, first_pooled = text.encode(["a " * 75])
    torch.testing.assert_close(clip_text[:1, :77], first)
    torch.testing.assert_close(clip_text[:1, 77:], text.encode(["a " * 25])[0])
    torch.testing.assert_close(pooled[:1], first_pooled)  # pooled comes from the first window
    # the shorter entry is padded with a window of the empty prompt
    torch.testing.assert_close(clip_text[1:, :77], text.encode([short])[0])
    torch.testing.assert_close(clip_text[1:, 77:], text.encode([""])[0])
    torch.testing.assert_close(pooled[1:], text.encode([short])[1])


def test_from_folder_hf_layout(tmp_path, text):
    # stabilityai/stable-cascade layout: text_encoder/ (config + weights), tokenizer/ (vocab, merges, config)
    text.model.save_pretrained(tmp_path / "text_encoder")
    (tmp_path / "tokenizer").mkdir()
    _tokenizer_files(tmp_path / "tokenizer")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = TextEncoder.from_folder(tmp_path, dtype=torch.float32)
    for a, b in zip(loaded.encode(["a red cat"]), text.encode(["a red cat"]), strict=True):
        torch.testing.assert_close(a, b)
    assert TextEncoder.from_folder(tmp_path / "text_encoder").dtype == torch.float32  # stored dtype kept
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder.from_folder(tmp_path / "tokenizer")


def test_to_and_release(tok):
    enc = TextEncoder(make_text_model(tok), tok).to("cpu", torch.float64)
    clip_text, pooled = enc.encode(["a dog"])
    assert clip_text.dtype == pooled.dtype == torch.float64
    enc.release()
    with pytest.raises(RuntimeError, match="released"):
        enc.encode(["a dog"])


# -------------------------------------------------------------------------------------------- image


def norm(value, channel):
    return (value - CLIP_MEAN[channel]) / CLIP_STD[channel]


def test_preprocess_accepts_pil_numpy_and_tensors():
    from PIL import Image

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8)  # HWC, landscape
    pil = preprocess_images(Image.fromarray(u8))
    assert pil.shape == (1, 3, 224, 224)
    torch.testing.assert_close(preprocess_images(u8), pil)
    torch.testing.assert_close(preprocess_images(u8.astype(np.float32) / 255), pil)
    tensor = torch.from_numpy(u8).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(preprocess_images(tensor[None].expand(2, -1, -1, -1)), pil.expand(2, -1, -1, -1))
    mixed = preprocess_images([Image.fromarray(u8).convert("RGBA"), np.zeros((300, 224), np.uint8), tensor])
    assert mixed.shape == (3, 3, 224, 224)
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_images("photo.png")


def test_preprocess_normalises_with_clip_mean_std():
    x = preprocess_images(torch.full((1, 3, 300, 260), 0.5))  # resized (bicubic keeps constants) and cropped
    for c in range(3):
        torch.testing.assert_close(x[0, c], torch.full((224, 224), norm(0.5, c)), atol=1e-5, rtol=0)


def test_preprocess_short_side_then_center_crop():
    ramp = torch.arange(448.0).div(447).expand(1, 3, 224, 448)  # short side already 224: crop only
    x = preprocess_images(ramp)
    torch.testing.assert_close(x[0, 0, 0], norm(torch.arange(112.0, 336.0).div(447), 0))
    # torchvision's CenterCrop offset int(round(d / 2)) rounds half to even: 1 extra column -> left 0
    odd = preprocess_images(torch.arange(225.0).div(224).expand(1, 3, 224, 225))
    torch.testing.assert_close(odd[0, 0, 0], norm(torch.arange(224.0).div(224), 0))
    # 100 x 50 (portrait): width -> 224, height int(224 * 2) = 448, then the middle 224 rows
    tall = preprocess_images(torch.rand(1, 3, 100, 50))
    assert tall.shape == (1, 3, 224, 224)


@pytest.fixture(scope="module")
def vision():
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=PROJ,
    )
    return ImageEncoder(transformers.CLIPVisionModelWithProjection(cfg))


def test_image_encode_gives_image_embeds(vision):
    images = torch.rand(2, 3, 240, 320)
    clip_img = vision.encode(images)
    assert clip_img.shape == (2, 1, PROJ)
    with torch.no_grad():
        expected = vision.model(pixel_values=preprocess_images(images)).image_embeds
    torch.testing.assert_close(clip_img[:, 0], expected)


def test_weighted_variations_stack_one_embedding_per_image(vision):
    embeds = vision.encode([torch.rand(3, 224, 224), torch.rand(3, 256, 224)])  # (2, 1, D)
    clip_img = image_conditioning(embeds, [1.0, 0.5], batch_size=3)
    assert clip_img.shape == (3, 2, PROJ)
    torch.testing.assert_close(clip_img[:, 0], embeds[0].expand(3, -1))
    torch.testing.assert_close(clip_img[:, 1], 0.5 * embeds[1].expand(3, -1))
    torch.testing.assert_close(image_conditioning(embeds[:, 0]), embeds.view(1, 2, PROJ))  # weights default 1
    with pytest.raises(ValueError, match="one weight per image"):
        image_conditioning(embeds, [1.0])
    assert vision.encode_variations(torch.rand(1, 3, 224, 224), [2.0], batch_size=2).shape == (2, 1, PROJ)


def test_empty_clip_img_is_zeros():
    z = empty_clip_img(2)
    assert z.shape == (2, 1, 768) and not z.any()


def test_import_cascade_lab_does_not_import_transformers():
    code = "import sys, cascade_lab; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
