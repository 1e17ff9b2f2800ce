"""kohya's caption options that change training: tag dropout, token warm-up, and captions over 75 CLIP tokens."""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import draw_shape, tiny_run

from cascade_lab.models.clip import PromptTruncatedWarning
from cascade_lab.training import train
from cascade_lab.training.cache import TextCache, TextLayout, encode_text
from cascade_lab.training.config import ConfigError, TrainConfig
from cascade_lab.training.data import TrainingData, make_caption, warmup_steps, warmup_tags
from cascade_lab.training.kohya_args import parse_kohya
from cascade_lab.training.toml_config import SubsetSpec, load_dataset_config

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread

CPU = torch.device("cpu")
KOHYA_BASE = ["--stage_c_checkpoint_path", "c", "--effnet_checkpoint_path", "e", "--output_dir", "o", "--seed", "0"]


class ScriptedRng:
    """A `random.Random` stand-in: `random()` returns the scripted draws in turn, `shuffle()` reverses."""

    def __init__(self, draws: list[float]) -> None:
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)

    def shuffle(self, items: list) -> None:
        items.reverse()


def _subset(**changes: object) -> SubsetSpec:
    return SubsetSpec(**({"image_dir": ".", "caption_dropout_rate": 0.0} | changes))


# ------------------------------------------------------------------------------------ kohya's order of operations


def test_warm_up_cuts_before_shuffling_and_tags_drop_after_it() -> None:
    """kohya's process_caption: keep_tokens stay, warm-up keeps the first tags, shuffle, then one dropout draw per
    tag in the shuffled order (a draw >= the rate keeps the tag)."""
    subset = _subset(keep_tokens=1, shuffle_caption=True, caption_tag_dropout_rate=0.5, token_warmup_min=2,
                     token_warmup_step=10)
    rng = ScriptedRng([0.9, 0.7, 0.2, 0.5])  # caption dropout's draw, then small / round / red
    # step 4 of 10: floor(4 * (5 - 2) / 10) + 2 = 3 of the 5 tags after "toy": red, round, small → reversed
    caption = make_caption("toy, red, round, small, shiny, blue", subset, 1, rng, step=4, total_steps=100)
    assert caption == "toy, small, red" and rng.draws == []


def test_keep_tokens_separator_protects_its_tags_from_dropout() -> None:
    subset = _subset(keep_tokens_separator="|||", caption_tag_dropout_rate=0.3)
    rng = ScriptedRng([0.9, 0.1, 0.8, 0.29])  # no shuffle: the draws go to c, d, e in the caption's order
    assert make_caption("a, b ||| c, d, e", subset, 1, rng) == "a, b, d" and rng.draws == []


def test_tag_options_rejoin_with_kohyas_separator_and_leave_other_captions_alone() -> None:
    """With only warm-up or tag dropout on, kohya still splits at caption_separator and joins with ", "; with
    none of the tag options the caption is the file's text."""
    warm = _subset(caption_separator=";", token_warmup_step=100)
    assert make_caption("x;y;z", warm, 1, ScriptedRng([0.9]), step=100, total_steps=1000) == "x, y, z"
    with pytest.raises(ValueError, match="pass step and total_steps"):  # never silently frozen at step 0
        make_caption("x;y;z", warm, 1, ScriptedRng([0.9]))
    assert make_caption("x;y;z", _subset(caption_separator=";"), 1, ScriptedRng([0.9])) == "x;y;z"
    dropped = _subset(caption_dropout_rate=0.5, caption_tag_dropout_rate=0.5)  # a dropped caption draws no more
    assert make_caption("x, y", dropped, 1, ScriptedRng([0.4])) == ""


@pytest.mark.parametrize(("step", "tags"), [(0, 1), (1, 1), (2, 2), (5, 4), (9, 6), (10, 7), (39, 7)])
def test_token_warm_up_schedule(step: int, tags: int) -> None:
    """token_warmup_step 0.25 of a 40-step run: all 7 tags from step 10; before it floor(step · 6 / 10) + 1."""
    subset = _subset(token_warmup_min=1, token_warmup_step=0.25, keep_tokens=1)
    text = "keep, t1, t2, t3, t4, t5, t6, t7"
    caption = make_caption(text, subset, 1, random.Random(0), step=step, total_steps=40)
    assert caption == ", ".join(text.split(", ")[:1 + tags])


def test_warm_up_helpers() -> None:
    assert warmup_steps(0.25, 40) == 10 and warmup_steps(5, 40) == 5 and warmup_steps(0.01, 40) == 0
    assert warmup_tags(7, 1, 3, 0) == 7  # no warm-up
    few = _subset(token_warmup_min=5, token_warmup_step=10)  # a minimum above the caption's tags keeps them all
    assert make_caption("a, b", few, 1, random.Random(0), step=3, total_steps=100) == "a, b"
    assert warmup_tags(7, 0, 0, 10) == 0  # token_warmup_min 0: the first steps train on the kept tags only


@pytest.mark.parametrize(("key", "value", "words"), [
    ("caption_tag_dropout_rate", 1.5, "probability in [0, 1]"),
    ("token_warmup_min", -1, "0 or more"),
    ("token_warmup_step", -3, "fraction of the run"),
    ("token_warmup_step", "10", "fraction of the run"),
])  # fmt: skip
def test_bad_values_are_refused_in_the_toml_and_the_config(tmp_path: Path, key: str, value: object,
                                                           words: str) -> None:
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ConfigError, match=rf"subset #1: {key}=.*{re.escape(words)}"):
        load_dataset_config({"datasets": [{"resolution": 128, "subsets": [{"image_dir": str(tmp_path / "imgs"),
                                                                          key: value}]}]}, TrainConfig())
    with pytest.raises(ConfigError, match=rf"{key}=.*{re.escape(words)}"):
        TrainConfig(train_data_dir="x", **{key: value}).validate()


# -------------------------------------------------------------------------------------------- kohya flags


def test_kohya_flags_set_the_options_and_turn_text_caching_off(tmp_path: Path) -> None:
    fields, notices, _ = parse_kohya([*KOHYA_BASE, "--train_data_dir", "d", "--caption_tag_dropout_rate", "0.1",
                                      "--token_warmup_min", "3", "--token_warmup_step", "0.5"], environ={})
    assert (fields["caption_tag_dropout_rate"], fields["token_warmup_min"], fields["token_warmup_step"]) == \
        (0.1, 3, 0.5)
    assert fields["cache_text_encoder_outputs"] is False
    assert not any(n.startswith(("--caption_tag_dropout_rate", "--token_warmup")) for n in notices)  # no notice
    toml = tmp_path / "dataset.toml"
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\ntoken_warmup_step = 20\n')
    fields, _, _ = parse_kohya([*KOHYA_BASE, "--dataset_config", str(toml)], environ={})
    assert fields["cache_text_encoder_outputs"] is False  # the dataset's warm-up varies the captions too
    fields, _, _ = parse_kohya([*KOHYA_BASE, "--train_data_dir", "d"], environ={})
    assert fields["cache_text_encoder_outputs"] is True
    assert (fields["long_captions"], fields["max_token_length"]) == ("kohya", None)


# ---------------------------------------------------------------------------------- per-step captions, resume


def _tag_images(folder: Path) -> Path:
    """8 images whose captions have 6 tags each."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
    for i, (name, colour) in enumerate(colours.items()):
        for shape in ("circle", "square"):
            draw_shape(colour, shape, 128).save(folder / f"{name}_{shape}.png")
            (folder / f"{name}_{shape}.txt").write_text(f"toy, {name}, {shape}, small, shiny, plain {i}")
    return folder


def _settings(images: Path, cache: Path, out: Path, **changes: object) -> dict:
    return tiny_run(images, cache, out, max_train_steps=6, train_batch_size=4, keep_tokens=1,
                    caption_tag_dropout_rate=0.3, token_warmup_min=1, token_warmup_step=4,
                    cache_text_encoder_outputs=False, caption_dropout_rate=0.0, gradient_accumulation_steps=2) | changes


@pytest.mark.usefixtures("one_thread")
def test_captions_vary_per_step_and_a_resumed_run_is_bit_identical(tmp_path: Path, monkeypatch) -> None:
    images = _tag_images(tmp_path / "imgs")
    seen: list[tuple[int, str]] = []
    real = TrainingData.caption

    def spy(self, index, epoch, rng, step=0, total_steps=0):
        caption = real(self, index, epoch, rng, step, total_steps)
        seen.append((step, caption))
        return caption

    monkeypatch.setattr(TrainingData, "caption", spy)
    with pytest.raises(ConfigError, match="caption_tag_dropout_rate=0.3 with cache_text_encoder_outputs=true"):
        train(**_settings(images, tmp_path / "cache", tmp_path / "cached", cache_text_encoder_outputs=True))
    whole = train(**_settings(images, tmp_path / "cache", tmp_path / "whole"))
    assert [s for s, _ in seen] == [s for s in range(6) for _ in range(8)]  # 2 batches of 4 per optimizer step
    early = [c for s, c in seen if s == 0]
    assert all(c.split(", ")[0] == "toy" and len(c.split(", ")) <= 2 for c in early)  # toy + at most 1 tag
    late = [c for s, c in seen if s >= 4]
    assert max(len(c.split(", ")) for c in late) > 3 and any(len(c.split(", ")) < 6 for c in late)  # some dropped
    first_run = list(seen)

    def stop_at_3(event):
        if event.kind == "step" and event.step == 3:
            event.run.stop()

    seen.clear()
    train(**_settings(images, tmp_path / "cache", tmp_path / "split"), callback=stop_at_3)
    second = train(**_settings(images, tmp_path / "cache", tmp_path / "split", resume="auto"))
    assert seen == first_run  # the same captions at the same steps, across the stop
    expected, got = load_file(str(whole.output_file)), load_file(str(second.output_file))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r["loss"] for r in second.losses] == [r["loss"] for r in whole.losses]


# ------------------------------------------------------------------------------------------- long captions


def _long_caption(tokens: int) -> str:
    """A caption of exactly `tokens` tokens for the tiny text model's byte tokenizer (one per character)."""
    words = "a red fox in tall grass at golden hour, "
    return (words * (tokens // len(words) + 1))[:tokens]


@pytest.fixture(scope="module")
def text_encoder():
    from cascade_lab.models.tiny import tiny_text_encoder

    return tiny_text_encoder()


def _encode(encoder, captions: list[str], **config) -> tuple[torch.Tensor, torch.Tensor]:
    layout = TextLayout.of(TrainConfig(train_data_dir="x", **config).validate())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encode_text(encoder, captions, CPU, layout)


def test_long_captions_windows_truncate_and_kohyas_layout(text_encoder) -> None:
    caption = _long_caption(100)  # 100 tokens: two windows
    windows, pooled = _encode(text_encoder, [caption])
    assert windows.shape[1] == 154  # cascade_lab's generation and ComfyUI: 2 × 77 rows
    truncate = TextLayout.of(TrainConfig(train_data_dir="x", long_captions="truncate"))
    with pytest.warns(PromptTruncatedWarning, match="longer than 75 tokens truncated to 1 window"):
        cut, cut_pooled = encode_text(text_encoder, [caption], CPU, truncate)
    with warnings.catch_warnings(record=True) as seen:  # Python's default: a text once, whatever the lengths
        warnings.simplefilter("default")
        for n in (90, 100, 110):
            encode_text(text_encoder, [_long_caption(n)], CPU, truncate)
    assert len([w for w in seen if w.category is PromptTruncatedWarning]) == 1
    first75, _ = _encode(text_encoder, [caption[:75]])
    assert cut.shape[1] == 77 and torch.equal(cut, first75)  # the official trainer: the first 75 tokens only
    kohya_default, _ = _encode(text_encoder, [caption], long_captions="kohya")
    assert torch.equal(kohya_default, cut)  # kohya without --max_token_length truncates too
    kohya150, kohya_pooled = _encode(text_encoder, [caption], long_captions="kohya", max_token_length=150)
    # kohya's join: window 1's start row, rows 1-75 of both windows, window 2's last row → 152 rows
    rows = [0, *range(1, 76), *range(78, 153), 153]
    assert kohya150.shape[1] == 152 and torch.equal(kohya150, windows[:, rows])
    assert torch.equal(kohya_pooled, pooled) and torch.equal(cut_pooled, pooled)  # pooled: the first window's


def test_kohyas_225_pads_short_captions_and_truncates_past_225(text_encoder) -> None:
    short, _ = _encode(text_encoder, ["a red fox"], long_captions="kohya", max_token_length=225)
    alone, _ = _encode(text_encoder, ["a red fox"])
    assert short.shape[1] == 227 and torch.equal(short[:, :76], alone[:, :76])  # the same caption rows, padded
    longest, _ = _encode(text_encoder, [_long_caption(260)], long_captions="kohya", max_token_length=225)
    exactly, _ = _encode(text_encoder, [_long_caption(225)], long_captions="kohya", max_token_length=225)
    assert longest.shape[1] == 227 and torch.equal(longest, exactly)  # tokens past 225 are dropped


def test_text_cache_keys_the_layout(text_encoder, tmp_path: Path) -> None:
    caption = _long_caption(100)
    shapes = []
    for config in ({}, {"long_captions": "truncate"}, {"long_captions": "kohya", "max_token_length": 150}):
        layout = TextLayout.of(TrainConfig(train_data_dir="x", **config))
        cache = TextCache(tmp_path, lambda: text_encoder, lambda: "tiny", CPU, layout)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert cache.prepare([caption]) == 1  # another layout is another entry, never a stale one
            shapes.append(cache.get([caption])[0].shape[1])
    assert shapes == [154, 77, 152]


def test_long_caption_settings_are_checked_and_kohya_commands_use_kohyas() -> None:
    with pytest.raises(ConfigError, match="long_captions='bogus'"):
        TrainConfig(train_data_dir="x", long_captions="bogus").validate()
    with pytest.raises(ConfigError, match="max_token_length=225 with long_captions='windows'.*long_captions='kohya'"):
        TrainConfig(train_data_dir="x", max_token_length=225).validate()
    with pytest.raises(ConfigError, match="max_token_length=100"):
        TrainConfig(train_data_dir="x", long_captions="kohya", max_token_length=100).validate()
    fields, notices, _ = parse_kohya([*KOHYA_BASE, "--train_data_dir", "d", "--max_token_length", "225"],
                                     environ={})
    assert (fields["long_captions"], fields["max_token_length"]) == ("kohya", 225)
    assert not any("max_token_length" in n for n in notices)
    with pytest.raises(SystemExit):  # argparse: kohya's choices are 150 and 225
        parse_kohya([*KOHYA_BASE, "--train_data_dir", "d", "--max_token_length", "300"], environ={})


def test_a_training_batch_carries_kohyas_rows(tmp_path: Path, shapes_dir: Path) -> None:
    """The loop feeds Stage C the layout's rows, cached or encoded per step: 227 with kohya's --max_token_length 225,
    77 per window else."""
    from cascade_lab.training import distributed as dist
    from cascade_lab.training.loop import Trainer
    from cascade_lab.training.models import build_models
    from cascade_lab.training.toml_config import dataset_config_for

    kohya = {"long_captions": "kohya", "max_token_length": 225}
    for changes, rows in ((kohya, 227), (kohya | {"cache_text_encoder_outputs": False}, 227), ({}, 77)):
        config = TrainConfig(**tiny_run(shapes_dir, tmp_path / "cache", tmp_path / "out", **changes)).validate()
        data = TrainingData(dataset_config_for(config), scale=config.scale_factor, seed=0)
        trainer = Trainer(config, build_models(config), data, dist.setup("cpu"))
        assert trainer.inputs(0)["clip_text"].shape[1] == rows
