"""kohya's fine-tuning datasets: --in_json / metadata_file JSONs read with kohya's meanings, and trained on."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_kohya_command import ckpts  # noqa: F401  (the tiny models as kohya's files)
from training_helpers import draw_shape

from cascade_lab.training.config import ConfigError, TrainConfig
from cascade_lab.training.data import TrainingData
from cascade_lab.training.finetune_data import entry_caption, find_image
from cascade_lab.training.kohya_args import parse_kohya
from cascade_lab.training.toml_config import dataset_config_for, load_dataset_config

pytest_plugins = ["training_fixtures"]


def _image(path: Path, size: tuple[int, int] = (96, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_shape((200, 30, 30), "circle", 96).resize(size).save(path)
    return path


def _json(path: Path, entries: object) -> Path:
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def _data(tmp_path: Path, **config: object) -> TrainingData:
    cfg = TrainConfig(**({"resolution": 64, "training_scale": "kohya", "min_bucket_reso": 32} | config)).validate()
    return TrainingData(dataset_config_for(cfg), scale=cfg.scale_factor, seed=0)


@pytest.mark.parametrize(("entry", "caption"), [
    ({"caption": "a cat", "tags": "cat, sitting"}, "a cat, cat, sitting"),
    ({"caption": "a cat"}, "a cat"),
    ({"caption": "a cat", "tags": ""}, "a cat"),
    ({"tags": "cat, sitting"}, "cat, sitting"),
    ({"train_resolution": [64, 64]}, ""),
])  # fmt: skip
def test_caption_and_tags_combine_as_kohya_combines_them(entry: dict, caption: str) -> None:
    assert entry_caption(entry) == caption


def test_keys_find_their_images_as_in_kohya(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = tmp_path / "images"
    png, upper = _image(images / "a.png"), _image(images / "b.JPG")
    _image(images / "b.webp")  # b.JPG comes first in sorted order, as kohya's glob takes it
    elsewhere = _image(tmp_path / "other" / "c.png")
    _image(images / "sub" / "d.jpg")
    assert find_image("a", str(images)) == png and find_image("b", str(images)) == upper
    assert find_image(str(elsewhere), str(images)) == elsewhere  # --full_path keys
    assert find_image(str(elsewhere), "") == elsewhere  # no image_dir needed for them
    assert find_image("sub/d", str(images)) == images / "sub" / "d.jpg"
    assert find_image("a.png", str(images)) == png  # kohya finds nothing here
    assert find_image("c", str(images)) is None and find_image("a", "") is None
    monkeypatch.chdir(tmp_path)  # a relative key is a path from the working folder first (kohya: os.path.exists)
    assert find_image("other/c.png", str(images)) == Path("other/c.png")


def test_in_json_dataset_reads_captions_repeats_and_caption_options(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for name in ("a", "b", "c"):
        _image(images / f"{name}.png")
    (images / "a.txt").write_text("a caption file is not read for a metadata subset")
    _image(images / "unlisted.png")  # only the JSON's entries are trained (kohya)
    meta = _json(tmp_path / "meta_cap.json", {"a": {"caption": "first, red, big"}, "b": {"tags": "second, blue"},
                                              "c": {"caption": "third", "tags": "green, small"}})
    data = _data(tmp_path, train_data_dir=str(images), in_json=str(meta), num_repeats=3, caption_prefix="p, ")
    assert [r.path.name for r in data.records] == ["a.png", "b.png", "c.png"]
    assert [r.caption for r in data.records] == ["first, red, big", "second, blue", "third, green, small"]
    assert data.caption_text(0) == "p,  first, red, big"  # kohya joins the prefix with a space
    assert sum(len(b) for b in data.epoch_batches(0)) == 9  # 3 images x --dataset_repeats 3
    # shuffle_caption / keep_tokens / dropout apply to the JSON's caption as to a caption file's
    shuffled = _data(tmp_path, train_data_dir=str(images), in_json=str(meta), shuffle_caption=True, keep_tokens=1,
                     caption_dropout_rate=0.0, cache_text_encoder_outputs=False)
    seen = {shuffled.caption(2, 0, random.Random(i)) for i in range(20)}
    assert all(s.startswith("third, ") for s in seen) and len(seen) == 2
    dropped = _data(tmp_path, train_data_dir=str(images), in_json=str(meta), caption_dropout_rate=1.0)
    assert dropped.caption(0, 0, random.Random(0)) == ""


def test_train_resolution_gives_the_buckets_unless_an_entry_lacks_it(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _image(images / "wide.png", (150, 100))
    _image(images / "tall.png", (100, 150))
    entries = {"wide": {"caption": "w", "train_resolution": [192, 128]},
               "tall": {"caption": "t", "train_resolution": [128, 192]}}
    meta = _json(tmp_path / "meta.json", entries)
    with pytest.warns(UserWarning, match="enable_bucket=false has no effect"):
        data = _data(tmp_path, train_data_dir=str(images), in_json=str(meta), enable_bucket=False)
    assert [r.bucket for r in data.records] == [(192, 128), (128, 192)]  # not the 64 px area of --resolution
    assert data.rules[0].enabled and not data.config.datasets[0].enable_bucket  # the given spec is left as it was
    official = _data(tmp_path, train_data_dir=str(images), in_json=str(meta), training_scale="official")
    assert [r.bucket for r in official.records] == [(128, 96), (96, 128)]  # 0.75x, floored to 32
    # one entry without it: kohya buckets every image of the dataset from its size and --resolution
    del entries["tall"]["train_resolution"]
    data = _data(tmp_path, train_data_dir=str(images), in_json=str(_json(meta, entries)))
    assert [r.bucket for r in data.records] == [data.rules[0].bucket_for(r.size) for r in data.records] == [
        (64, 64), (64, 64)]


def test_metadata_subsets_mix_with_caption_file_subsets_in_a_toml(tmp_path: Path) -> None:
    ft, db = tmp_path / "ft", tmp_path / "db"
    _image(ft / "x.png")
    _image(db / "y.png")
    (db / "y.txt").write_text("from a caption file")
    _json(tmp_path / "ft.json", {"x": {"caption": "from the json", "train_resolution": [96, 64]}})
    toml = tmp_path / "dataset.toml"
    toml.write_text("""
[general]
shuffle_caption = false
caption_extension = ".txt"
[[datasets]]
resolution = 64
min_bucket_reso = 32
  [[datasets.subsets]]
  metadata_file = "ft.json"
  image_dir = "ft"
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "db"
  [[datasets.subsets]]
  metadata_file = "ft.json"
  image_dir = "ft"
  num_repeats = 5
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  metadata_file = "ft.json"
  image_dir = "ft"
""")
    cfg = TrainConfig(dataset_config=str(toml), training_scale="kohya").validate()
    with pytest.warns(UserWarning, match="ft.json is in two subsets; the first one is used"):
        data = TrainingData(load_dataset_config(toml, cfg), scale=1.0, seed=0)
    assert [(r.path.name, r.caption, r.dataset) for r in data.records] == [
        ("x.png", "from the json", 0), ("y.png", "from a caption file", 0), ("x.png", "from the json", 1)]
    assert data.subsets[0].num_repeats == 2 and data.subsets[0].metadata_file == str(tmp_path / "ft.json")
    # the second dataset has only metadata entries, all with train_resolution: those are its buckets
    assert data.records[2].bucket == (96, 64)
    # the first mixes in a caption-file subset, so its images are bucketed from their sizes (kohya refuses to mix
    # both kinds in one dataset; cascade_lab trains it)
    assert [r.bucket for r in data.records[:2]] == [data.rules[0].bucket_for(r.size) for r in data.records[:2]]
    assert data.records[0].bucket == (64, 64)


def test_bad_metadata_is_refused_before_training_naming_the_value(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _image(images / "a.png")

    def refused(entries: object | str, **config: object) -> str:
        meta = tmp_path / "m.json"
        meta.write_text(entries if isinstance(entries, str) else json.dumps(entries), encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            _data(tmp_path, **({"train_data_dir": str(images), "in_json": str(meta)} | config))
        return str(info.value)

    assert "not valid JSON" in refused('{"a": {"caption": "x"')
    assert "a JSON list" in refused([{"a": "x"}])
    assert "entry 'a' is 'a cat'" in refused({"a": "a cat"})
    assert "train_resolution=[64]" in refused({"a": {"train_resolution": [64]}})
    assert "caption=3" in refused({"a": {"caption": 3}})
    message = refused({"a": {"caption": "ok"}, **{f"gone{i}": {"caption": "x"} for i in range(7)}})
    assert "7 of 8 entries name no image: 'gone0', 'gone1'" in message and ", ..." in message
    assert "kohya stops at the first" in message
    (images / "gone0_sc_latents.npz").write_bytes(b"")
    assert "1 of them have only a kohya latent cache" in refused({"gone0": {"caption": "x"}})
    assert "does not exist" in refused({}, in_json=str(tmp_path / "nope.json"))
    with pytest.warns(UserWarning, match="no entries; the subset is skipped"):
        assert "no training images" in refused({})
    with pytest.raises(ConfigError, match="in_json='m.json' without train_data_dir"):
        TrainConfig(in_json="m.json").validate()


def test_kohya_latent_caches_are_not_read_and_one_notice_says_why(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for name in ("a", "b"):
        _image(images / f"{name}.png")
        (images / f"{name}_sc_latents.npz").write_bytes(b"not read")
    meta = _json(tmp_path / "meta.json", {"a": {"caption": "x"}, "b": {"caption": "y"}})
    with pytest.warns(UserWarning) as seen:
        data = _data(tmp_path, train_data_dir=str(images), in_json=str(meta))
    notices = [str(w.message) for w in seen if "kohya latent cache" in str(w.message)]
    assert len(notices) == 1 and notices[0].startswith("2 kohya latent cache(s)") and "INTER_AREA" in notices[0]
    assert [r.path.suffix for r in data.records] == [".png", ".png"]  # trained from the images


def test_kohya_flags_take_in_json_with_kohyas_meanings(tmp_path: Path) -> None:
    base = ["--stage_c_checkpoint_path", "c", "--effnet_checkpoint_path", "e", "--output_dir", "o", "--seed", "0"]
    fields, notices, _ = parse_kohya([*base, "--in_json", "m.json", "--train_data_dir", "d", "--dataset_repeats",
                                      "4"], environ={})
    assert fields["in_json"] == "m.json" and fields["train_data_dir"] == "d" and fields["num_repeats"] == 4
    assert not any("in_json" in n for n in notices)
    fields, notices, _ = parse_kohya([*base, "--in_json", "m.json", "--dataset_config", "x.toml"], environ={})
    assert fields["in_json"] is None and any("--in_json with --dataset_config: kohya ignores" in n for n in notices)
    with pytest.raises(ConfigError, match="--in_json m.json without --train_data_dir"):
        parse_kohya([*base, "--in_json", "m.json"], environ={})


def test_an_in_json_kohya_command_trains(ckpts, tmp_path, one_thread) -> None:  # noqa: F811
    """stable_cascade_train_stage_c.py on a fine-tuning dataset: images, a metadata JSON with buckets, repeats."""
    from safetensors import safe_open

    from cascade_lab.training import train

    images = tmp_path / "train"
    images.mkdir()
    entries = {}
    for i, (colour, shape) in enumerate([((220, 30, 30), "circle"), ((30, 180, 60), "square")]):
        draw_shape(colour, shape, 128).resize((192, 128)).save(images / f"img{i}.png")
        entries[f"img{i}"] = {"caption": f"a {shape}", "tags": "shape", "train_resolution": [192, 128]}
    meta = _json(tmp_path / "meta_lat.json", entries)
    out = tmp_path / "out"
    argv = ["stable_cascade_train_stage_c.py", "--in_json", str(meta), "--train_data_dir", str(images),
            "--dataset_repeats", "2", "--resolution", "128", "--train_batch_size", "2", "--max_train_epochs", "1",
            "--learning_rate", "1e-4", "--output_dir", str(out), "--output_name", "ft", "--seed", "0",
            "--stage_c_checkpoint_path", str(ckpts / "stage_c_bf16.safetensors"),
            "--effnet_checkpoint_path", str(ckpts / "effnet_encoder.safetensors"), "--quiet"]
    fields, _, _ = parse_kohya(argv, environ={})
    with pytest.warns(UserWarning, match="every image a train_resolution: those are the buckets"):  # kohya: info
        run = train(TrainConfig.from_dict(fields | {"val_every_n_steps": 0}))
    assert run.status == "finished" and run.step == 2  # 2 images x 2 repeats, batch 2
    with safe_open(str(out / "ft.safetensors"), "pt") as f:
        meta_out = f.metadata()
    assert json.loads(meta_out["ss_dataset_dirs"]) == {"meta_lat.json": {"n_repeats": 2, "img_count": 2}}
    assert json.loads(meta_out["ss_bucket_info"])["buckets"]["0"]["resolution"] == [192, 128]
    assert json.loads(meta_out["ss_tag_frequency"])["meta_lat.json"]["shape"] == 2  # the JSON's caption + tags
