"""Issue 19 point 7: the defects of the trial run, each as it was met."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from training_helpers import make_shapes_dataset, tiny_run

from cascade_lab.training import ConfigError, TrainConfig, load_prompts, train

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_lora_on_the_tiny_variant_learns(shapes_dir, shared_cache, tmp_path) -> None:
    """It adapts the tiny variant's Stage C (no zero layer), so every attention pair gets gradient."""
    import torch

    run = train(**tiny_run(shapes_dir, shared_cache, tmp_path, mode="lora", max_train_steps=3, learning_rate=1e-2))
    with safe_open(str(run.output_file), "pt") as f:
        ups = {k: f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")}
    assert ups and all(bool(torch.any(v != 0)) for v in ups.values()), [k for k, v in ups.items() if not v.any()]


def test_model_demo_in_a_toml_trains_at_the_demo_scale_and_says_so(tmp_path) -> None:
    data = make_shapes_dataset(tmp_path / "shapes")
    toml = tmp_path / "train.toml"
    toml.write_text(f'model = "demo"\ntrain_data_dir = "{data}"\nresolution = 128\ntrain_batch_size = 4\n'
                    'max_train_steps = 2\nval_every_n_steps = 0\noutput_dir = "out"\n')
    run = train(TrainConfig.from_toml(toml))
    assert run.status == "finished"
    with safe_open(str(run.output_file), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["cascade_lab.latent_buckets"]) == {"8x8": 12}  # 128 px at the demo's 16 px per latent
    assert meta["ss_resolution"] == "(128, 128)" and meta["modelspec.resolution"] == "128x128"


def test_a_corrupt_image_is_named(tmp_path, shared_cache) -> None:
    data = make_shapes_dataset(tmp_path / "shapes")
    (data / "red_circle.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    with pytest.raises(ConfigError, match=r"red_circle.png: not a readable image"):
        train(**tiny_run(data, shared_cache, tmp_path / "out", max_train_steps=1))


@pytest.mark.parametrize(("line", "message"), [("batch_size = 0", r"batch_size=0: use a whole number of 1 or more"),
                                               ("num_repeats = -1", r"num_repeats=-1: use a whole number")])
def test_impossible_dataset_numbers_fail_before_anything_loads(shapes_dir, tmp_path, line, message) -> None:
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"[[datasets]]\nresolution = 128\n{line}\n  [[datasets.subsets]]\n  image_dir = '{shapes_dir}'\n")
    with pytest.raises(ConfigError, match=message):
        train(dataset_config=str(toml), output_dir=str(tmp_path / "out"), max_train_steps=1)


def test_a_too_small_prompt_size_says_so() -> None:
    with pytest.raises(ConfigError, match=r"a sample size of 64 px is too small"):
        load_prompts(["a cat --w 64"])


def test_stop_during_set_up_writes_no_empty_checkpoint(shapes_dir, shared_cache, tmp_path) -> None:
    run = train(**tiny_run(shapes_dir, shared_cache, tmp_path / "out", max_train_steps=5), stop=lambda: True)
    assert run.status == "stopped" and run.step == 0 and run.last_checkpoint is None
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "run.json").exists()
    again = train(**tiny_run(shapes_dir, shared_cache, tmp_path / "out", max_train_steps=1))  # the folder is free
    assert again.status == "finished"
