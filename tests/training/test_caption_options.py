"""kohya's caption options that change training: tag dropout and token warm-up."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import draw_shape, tiny_run

from cascade_lab.training import train
from cascade_lab.training.config import ConfigError, TrainConfig
from cascade_lab.training.data import TrainingData, make_caption, warmup_steps, warmup_tags
from cascade_lab.training.kohya_args import parse_kohya
from cascade_lab.training.toml_config import SubsetSpec, load_dataset_config

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread

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
    assert make_caption("x;y;z", warm, 1, ScriptedRng([0.9]), step=100) == "x, y, z"
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
    assert warmup_tags(2, 5, 3, 10) >= 2  # a minimum above the caption's tags keeps them all
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
