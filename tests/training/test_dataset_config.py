"""TrainConfig, kohya dataset TOML, buckets, captions and the batch plan (no model runs here)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from training_helpers import draw_shape

from cascade_lab.training.config import ConfigError, TrainConfig
from cascade_lab.training.data import BucketRule, TrainingData, make_buckets, make_caption
from cascade_lab.training.toml_config import DatasetSpec, SubsetSpec, folder_dataset, load_dataset_config


def test_defaults_are_the_official_ones() -> None:
    config = TrainConfig(train_data_dir="x").validate()
    assert config.caption_dropout_rate == 0.05 and config.caption_extension == ".txt"
    assert config.training_scale == "official" and config.scale_factor == 0.75
    assert config.learning_rate == 1e-4 and config.bucket_reso_steps == 32


@pytest.mark.parametrize(("changes", "words"), [
    ({"mixed_precision": "fp16"}, "float16"),
    ({"bucket_reso_steps": 48}, "multiple of 32"),
    ({"mode": "dreambooth"}, "lora, full"),
    ({"train_data_dir": None}, "no data"),
    ({"caption_dropout_rate": 1.5}, "[0, 1]"),
])  # fmt: skip
def test_bad_settings_are_refused_with_the_fix(changes: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        TrainConfig(**({"train_data_dir": "x"} | changes)).validate()
    assert words in str(info.value)


def test_unknown_keys_name_the_closest_field() -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"learning_rat": 1e-4, "train_data_dir": "x"})
    assert "'learning_rat'" in str(info.value) and "learning_rate" in str(info.value)


def test_toml_config_resolves_relative_paths_and_inline_dataset(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "train.toml").write_text(
        'mode = "full"\noutput_dir = "out"\noptimizer_args = "scale_parameter=False relative_step=False"\n'
        '[general]\nflip_aug = true\n[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    config = TrainConfig.from_toml(tmp_path / "train.toml")
    assert config.mode == "full" and Path(config.output_dir) == tmp_path / "out"
    assert config.optimizer_args == ["scale_parameter=False", "relative_step=False"]
    assert config.dataset == {"general": {"flip_aug": True},
                              "datasets": [{"resolution": 512, "subsets": [{"image_dir": "imgs"}]}]}


def _images(folder: Path, n: int = 2, size: tuple[int, int] = (96, 96), captions: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw_shape((200, 20, 20), "circle", 96).resize(size).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a red circle {i}")
    return folder


def test_kohya_toml_inherits_downward_and_reports_unknown_keys(tmp_path: Path) -> None:
    _images(tmp_path / "a")
    _images(tmp_path / "b")
    toml = tmp_path / "dataset.toml"
    toml.write_text("""
[general]
caption_extension = ".caption"
shuffle_caption = true
keep_tokens = 1
color_balance = 3

[[datasets]]
resolution = [768, 512]
batch_size = 2
bucket_no_upscale = true
token_warmup_step = 5

  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 8
  class_tokens = "toy"

  [[datasets.subsets]]
  image_dir = "b"
  keep_tokens = 0
  flip_aug = true
""")
    with pytest.warns(UserWarning, match="color_balance"):
        cfg = load_dataset_config(toml, TrainConfig(dataset_config=str(toml)))
    (ds,) = cfg.datasets
    assert ds.resolution == (768, 512) and ds.batch_size == 2 and ds.bucket_no_upscale
    a, b = ds.subsets
    assert a.image_dir == str(tmp_path / "a") and a.num_repeats == 8 and a.class_tokens == "toy"
    assert a.caption_extension == ".caption" and a.shuffle_caption and a.keep_tokens == 1
    assert b.keep_tokens == 0 and b.flip_aug and b.num_repeats == 1
    assert a.token_warmup_step == 5 == b.token_warmup_step  # a kohya subset option, set at the dataset level
    assert any("color_balance" in n for n in cfg.notes) and not any("'token_warmup_step'" in n for n in cfg.notes)


def test_windows_paths_fail_with_a_clear_message(tmp_path: Path) -> None:
    toml = tmp_path / "test_dataset.toml"
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = \'d:\\kohya_ss\\examples\\test_dataset\'\n')
    with pytest.raises(ConfigError) as info:
        load_dataset_config(toml, TrainConfig(dataset_config=str(toml)))
    assert "Windows path" in str(info.value) and "d:\\kohya_ss" in str(info.value)


def test_a_fine_tune_subsets_missing_metadata_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metadata_file 'meta.json' does not exist; give the JSON"):
        load_dataset_config({"datasets": [{"subsets": [{"metadata_file": "meta.json"}]}]}, TrainConfig())


def test_kohya_repeat_folders_become_subsets(tmp_path: Path) -> None:
    _images(tmp_path / "10_toy")
    _images(tmp_path / "2_cartoon")
    (ds,) = folder_dataset(tmp_path, TrainConfig(train_data_dir=str(tmp_path))).datasets
    assert [(Path(s.image_dir).name, s.num_repeats, s.class_tokens) for s in ds.subsets] == [
        ("10_toy", 10, "toy"), ("2_cartoon", 2, "cartoon")]


def test_buckets_are_multiples_of_32_within_the_area() -> None:
    buckets = make_buckets(768 * 768, 192, 1536, 32)
    assert (768, 768) in buckets and all(w % 32 == 0 and h % 32 == 0 for w, h in buckets)
    assert all(w * h <= 768 * 768 for w, h in buckets)
    assert all((h, w) in buckets for w, h in buckets)


@pytest.mark.parametrize(("scale", "latent"), [(0.75, 24), (1.0, 32)])
def test_training_scale_official_vs_kohya(scale: float, latent: int) -> None:
    """A square 1024 px bucket: 768 px → 24x24 latents (official), 1024 px → 32x32 (kohya)."""
    rule = BucketRule.of(DatasetSpec(resolution=(1024, 1024)), scale)
    assert rule.bucket_for((2000, 2000)) == (latent * 32, latent * 32)
    w, h = rule.bucket_for((1600, 900))  # landscape: wider than tall, about the same area
    assert w > h and w * h <= (1024 * scale) ** 2 and abs(w / h - 16 / 9) < 0.25


def test_no_upscale_keeps_small_images_small() -> None:
    rule = BucketRule.of(DatasetSpec(resolution=(1024, 1024), bucket_no_upscale=True), 1.0)
    assert rule.bucket_for((521, 315)) == (512, 288)
    assert rule.bucket_for((4000, 4000)) == (1024, 1024)


def test_captions_keep_tokens_shuffle_dropout_prefix() -> None:
    subset = SubsetSpec(image_dir=".", shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.0,
                        caption_prefix="zxc, ")
    text = "toy, red, round, small, shiny"
    shuffled = {make_caption(text, subset, 0, random.Random(i)) for i in range(20)}
    assert all(c.startswith("zxc, ") for c in shuffled) and len(shuffled) > 5
    assert all(sorted(c.split(", ")) == sorted(("zxc, " + text).split(", ")) for c in shuffled)
    dropped = SubsetSpec(image_dir=".", caption_dropout_rate=0.5)
    outcomes = [make_caption(text, dropped, 0, random.Random(i)) for i in range(200)]
    assert 60 < outcomes.count("") < 140 and set(outcomes) == {"", text}
    every = SubsetSpec(image_dir=".", caption_dropout_rate=0.0, caption_dropout_every_n_epochs=2)
    assert make_caption(text, every, 4, random.Random(0)) == "" and make_caption(text, every, 3, random.Random(0))


def test_prefix_and_suffix_are_joined_with_a_space_as_kohya_joins_them() -> None:
    """kohya's process_caption: prefix + " " + caption, caption + " " + suffix, before dropout and shuffling."""
    plain = SubsetSpec(image_dir=".", caption_prefix="sks", caption_suffix="photo", caption_dropout_rate=0.0)
    assert make_caption("a dog", plain, 0, random.Random(0)) == "sks a dog photo"
    assert make_caption("a dog", SubsetSpec(image_dir=".", caption_dropout_rate=0.0), 0, random.Random(0)) == "a dog"
    shuffled = SubsetSpec(image_dir=".", caption_prefix="sks", caption_suffix="photo", shuffle_caption=True,
                          keep_tokens=1, caption_dropout_rate=0.0)
    seen = {make_caption("a dog, grass", shuffled, 0, random.Random(i)) for i in range(20)}
    # the prefix rides on the first tag and the suffix on the last, as in kohya
    assert seen == {"sks a dog, grass photo"}


def test_missing_captions_use_class_tokens(tmp_path: Path) -> None:
    folder = _images(tmp_path / "imgs", n=2, captions=False)
    (folder / "img0.txt").write_text("a red circle\n")
    config = TrainConfig(train_data_dir=str(folder), class_tokens="toy", resolution=96, training_scale="kohya")
    with pytest.warns(UserWarning, match="no caption file"):
        data = TrainingData(folder_dataset(folder, config), scale=1.0, seed=0)
    assert [r.caption for r in data.records] == ["a red circle", "toy"]


def test_batch_plan_is_full_per_bucket_deterministic_and_split_evenly(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    _images(folder, n=5, size=(96, 96))
    for i in range(3):
        draw_shape((0, 0, 200), "square", 96).resize((192, 96)).save(folder / f"wide{i}.png")
        (folder / f"wide{i}.txt").write_text("a blue square")
    config = TrainConfig(train_data_dir=str(folder), resolution=96, training_scale="kohya", train_batch_size=2,
                         num_repeats=2, min_bucket_reso=32)
    spec = folder_dataset(folder, config)
    one = TrainingData(spec, scale=1.0, seed=3, world_size=2)
    again = TrainingData(spec, scale=1.0, seed=3, world_size=2)
    assert one.epoch_batches(1) == again.epoch_batches(1) and one.epoch_batches(0) != one.epoch_batches(1)
    for batch in one.epoch_batches(0):
        assert len(batch) == 4  # 2 per process x 2 processes, padded from the same bucket
        assert len({one.records[i].bucket for i in batch}) == 1
    seen = [i for b in one.epoch_batches(0) for i in b]
    assert all(seen.count(i) >= 2 for i in range(len(one.records)))  # num_repeats


def test_importing_the_training_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, cascade_lab.training as t; t.TrainConfig(train_data_dir='x').validate(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_kohya_dataset_metadata_counts_tags_folders_and_buckets(tmp_path: Path) -> None:
    """kohya's keys from a dataset TOML (ss_datasets) and from a folder (flat keys): tags split at commas, lower-cased,
    counted once per image; images counted with repeats; one folder in two subsets named "name (2)"."""
    import json

    from PIL import Image

    from cascade_lab.training.metadata import kohya_dataset_metadata

    imgs = tmp_path / "5_things"
    imgs.mkdir()
    for name, size, caption in (("a", (128, 128), "Red, circle"), ("b", (192, 128), "red, square"),
                                ("c", (128, 128), "blue,  circle ,")):
        Image.new("RGB", size).save(imgs / f"{name}.png")
        (imgs / f"{name}.txt").write_text(caption)
    config = TrainConfig(train_data_dir=str(tmp_path), resolution=128, min_bucket_reso=64, max_bucket_reso=256)
    data = TrainingData(folder_dataset(tmp_path, config), scale=1.0, seed=0)
    meta = kohya_dataset_metadata(config, data)
    assert json.loads(meta["ss_tag_frequency"]) == {"5_things": {"red": 2, "circle": 2, "square": 1, "blue": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_things": {"n_repeats": 5, "img_count": 3}}
    info = json.loads(meta["ss_bucket_info"])
    assert sorted(b["count"] for b in info["buckets"].values()) == [5, 10]  # with repeats: one wide, two square
    assert info["mean_img_ar_error"] >= 0 and "ss_datasets" not in meta and meta["ss_keep_tokens"] == "0"

    toml = tmp_path / "data.toml"
    toml.write_text('[[datasets]]\nresolution = 64\nenable_bucket = false\n[[datasets.subsets]]\n'
                    'image_dir = "5_things"\nnum_repeats = 2\n[[datasets.subsets]]\nimage_dir = "5_things"\n'
                    'shuffle_caption = true\n')
    config = TrainConfig(dataset_config=str(toml))
    data = TrainingData(load_dataset_config(toml, config), scale=1.0, seed=0)
    meta = kohya_dataset_metadata(config, data)
    (dataset,) = json.loads(meta["ss_datasets"])
    assert dataset["num_train_images"] == 9 and dataset["bucket_info"] is None and dataset["resolution"] == [64, 64]
    assert [(s["image_dir"], s["num_repeats"], s["shuffle_caption"]) for s in dataset["subsets"]] == [
        ("5_things", 2, False), ("5_things", 1, True)]
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_things": {"n_repeats": 2, "img_count": 3},
                                                   "5_things (2)": {"n_repeats": 1, "img_count": 3}}
