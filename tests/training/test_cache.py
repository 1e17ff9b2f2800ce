"""Latent and text-embedding caches: keyed by content and settings, refusals for options they cannot honour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_helpers import make_shapes_dataset

from cascade_lab.training.cache import LatentCache, TextCache, check_cache_options, encode_text
from cascade_lab.training.config import ConfigError, TrainConfig
from cascade_lab.training.data import TrainingData
from cascade_lab.training.toml_config import folder_dataset


class PoolEncoder:
    """A stand-in EfficientNet: 32x average pooling, channels repeated to 16 (fast, deterministic)."""

    def __init__(self) -> None:
        self.calls = 0

    def to(self, device: object) -> PoolEncoder:
        return self

    def encode_image(self, img01: torch.Tensor) -> torch.Tensor:
        self.calls += img01.shape[0]
        pooled = torch.nn.functional.avg_pool2d(img01, 32)  # [B, 3, H/32, W/32]
        return torch.cat([pooled] * 5 + [pooled[:, :1]], dim=1)  # [B, 16, H/32, W/32]


def _data(folder: Path, **changes: object) -> tuple[TrainConfig, TrainingData]:
    settings: dict = {"resolution": 128, "training_scale": "kohya"} | changes
    config = TrainConfig(train_data_dir=str(folder), **settings)
    return config, TrainingData(folder_dataset(folder, config), scale=config.scale_factor, seed=0)


def _cache(data: TrainingData, folder: Path, fingerprint: str = "pool-v1") -> tuple[LatentCache, PoolEncoder]:
    encoder = PoolEncoder()
    return LatentCache(folder, data, lambda: encoder, lambda: fingerprint, torch.device("cpu")), encoder


def test_latents_are_cached_on_disk_and_reused(tmp_path: Path) -> None:
    images = make_shapes_dataset(tmp_path / "imgs")
    _, data = _data(images)
    first, enc = _cache(data, tmp_path / "cache")
    assert first.prepare(range(len(data.records))) == 12 and enc.calls == 12
    files = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(files) == 12
    second, enc2 = _cache(data, tmp_path / "cache")
    assert second.prepare(range(12)) == 0 and enc2.calls == 0
    assert torch.equal(second.get(3), first.get(3)) and second.get(3).shape == (16, 4, 4)
    image = data.image(3)[None]
    assert torch.allclose(second.get(3), PoolEncoder().encode_image(image)[0])


def test_changed_settings_or_content_invalidate(tmp_path: Path) -> None:
    images = make_shapes_dataset(tmp_path / "imgs")
    _, data = _data(images)
    _cache(data, tmp_path / "cache")[0].prepare(range(12))
    _, bigger = _data(images, resolution=192)  # another bucket size: every latent is new
    assert _cache(bigger, tmp_path / "cache")[0].prepare(range(12)) == 12
    assert _cache(data, tmp_path / "cache", fingerprint="pool-v2")[0].prepare(range(12)) == 12  # other encoder
    red = images / "red_circle.png"
    from PIL import Image

    Image.new("RGB", (128, 128), (10, 10, 10)).save(red)  # new content, same name
    _, data = _data(images)
    cache, _ = _cache(data, tmp_path / "cache")
    assert cache.prepare(range(12)) == 1
    assert float(cache.get(next(i for i, r in enumerate(data.records) if r.path == red)).max()) < 0.05


def test_flip_aug_caches_the_mirrored_latent(tmp_path: Path) -> None:
    images = make_shapes_dataset(tmp_path / "imgs")
    _, data = _data(images, flip_aug=True)
    cache, _ = _cache(data, tmp_path / "cache")
    triangle = next(i for i, r in enumerate(data.records) if "triangle" in r.path.name)
    flipped = PoolEncoder().encode_image(data.image(triangle, flip=True)[None])[0]
    assert torch.allclose(cache.get(triangle, flip=True), flipped)
    assert not torch.allclose(cache.get(triangle, flip=True), cache.get(triangle))


def test_text_cache_includes_the_empty_caption(tmp_path: Path) -> None:
    from cascade_lab.models.tiny import tiny_text_encoder

    encoder = tiny_text_encoder()
    cache = TextCache(tmp_path / "cache", lambda: encoder, lambda: "tiny", torch.device("cpu"))
    assert cache.prepare(["a red circle", "", "a red circle"]) == 2
    clip_text, pooled = cache.get(["", "a red circle"])
    live_text, live_pooled = encode_text(encoder, ["", "a red circle"], torch.device("cpu"))
    assert torch.allclose(clip_text, live_text, atol=1e-6) and torch.allclose(pooled, live_pooled, atol=1e-6)
    again = TextCache(tmp_path / "cache", lambda: encoder, lambda: "tiny", torch.device("cpu"))
    assert again.prepare(["", "a red circle"]) == 0


@pytest.mark.parametrize(("changes", "words"), [
    ({"random_crop": True}, "random_crop=true with cache_latents=true"),
    ({"shuffle_caption": True}, "shuffle_caption=true with cache_text_encoder_outputs=true"),
    ({"caption_tag_dropout_rate": 0.1}, "caption_tag_dropout_rate=0.1 with cache_text_encoder_outputs=true"),
    ({"token_warmup_step": 0.5}, "token_warmup_step=0.5 with cache_text_encoder_outputs=true"),
])  # fmt: skip
def test_options_a_cache_cannot_honour_are_refused(tmp_path: Path, changes: dict, words: str) -> None:
    config, data = _data(make_shapes_dataset(tmp_path / "imgs"), **changes)
    with pytest.raises(ConfigError, match=words):
        check_cache_options(config, data)
    off = TrainConfig(train_data_dir=config.train_data_dir, cache_latents=False, cache_text_encoder_outputs=False)
    check_cache_options(off, data)  # without caches both are fine
    check_cache_options(TrainConfig(train_data_dir="x", caption_dropout_rate=0.3), _data(
        make_shapes_dataset(tmp_path / "imgs"), caption_dropout_rate=0.3)[1])  # dropout: "" is cached too


def test_explicit_encoder_files_key_the_cache_without_loading_the_encoder(tmp_path: Path) -> None:
    """With an EfficientNet file, latents are keyed by the file: a warm cache never builds the encoder."""
    import shutil

    from safetensors.torch import save_file

    from cascade_lab.models.effnet import EfficientNetEncoder
    from cascade_lab.training.models import build_models, file_fingerprint

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in EfficientNetEncoder().state_dict().items()}
    effnet_file = tmp_path / "effnet.safetensors"
    save_file(state, str(effnet_file))
    images = make_shapes_dataset(tmp_path / "imgs", size=64)
    config, data = _data(images, resolution=64, effnet_path=str(effnet_file))
    counts = []
    for _ in range(2):
        models = build_models(config)
        assert models.fingerprint("effnet") == file_fingerprint(effnet_file) and "effnet" not in models._built
        cache = LatentCache(tmp_path / "cache", data, lambda m=models: m.get("effnet"),
                            lambda m=models: m.fingerprint("effnet"), torch.device("cpu"))
        counts.append(cache.prepare(range(len(data.records))))
        assert ("effnet" in models._built) == (counts[-1] > 0)
    assert counts == [12, 0]
    copy = tmp_path / "copy" / "effnet.safetensors"
    copy.parent.mkdir()
    shutil.copy2(effnet_file, copy)  # same bytes and time: same key
    assert file_fingerprint(copy) == file_fingerprint(effnet_file)
    first = next(iter(state))
    save_file({**state, first: state[first] + 1}, str(copy))  # other weights: another key
    assert file_fingerprint(copy) != file_fingerprint(effnet_file)


def test_an_encode_outside_prepare_returns_the_text_encoder_home() -> None:
    """Captions of different window counts in one batch are encoded on the fly: the text encoder is lent for
    that call and goes back where it was, as after `prepare`."""
    import warnings

    from training_helpers import Moves

    from cascade_lab.training.models import _tiny_stages

    text = Moves(_tiny_stages(0).text_encoder)
    cache = TextCache(None, lambda: text, lambda: "tiny", torch.device("cpu"))
    long = " ".join(["red circle"] * 60)  # > 75 tokens: two windows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the split warning
        cache.prepare(["a cat", long])
        cpu, home, after = torch.device("cpu"), torch.device("meta"), len(text.moves)
        assert set(text.moves[:-1]) == {cpu} and text.moves[-1] == home
        clip_text, pooled = cache.get(["a cat", long])
    assert clip_text.shape[1] % 77 == 0 < clip_text.shape[1] - 77 and pooled.shape[:2] == (2, 1)  # together
    assert set(text.moves[after:-1]) == {cpu} and text.moves[-1] == home
