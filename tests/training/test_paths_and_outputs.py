"""Issue 19 points 2-4: every given path is used or refused; one output folder holds one run; epochs."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import tiny_run

from cascade_lab.training import ConfigError, TrainConfig, train
from cascade_lab.training.models import check_paths

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def previewer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    from cascade_lab.models.tiny import build_tiny

    path = tmp_path_factory.mktemp("files") / "previewer.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny(0).previewer.state_dict().items()}, str(path))
    return path


def test_missing_empty_and_wrong_component_paths_are_refused_before_training(tmp_path, previewer_file) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match=r"stage_c_path=.*nope.safetensors.*kohya --stage_c_checkpoint_path.*no such"):
        check_paths(TrainConfig(train_data_dir="d", stage_c_path=str(missing)))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"effnet_path=.*the file is empty"):
        check_paths(TrainConfig(train_data_dir="d", effnet_path=str(empty)))
    with pytest.raises(ConfigError, match=r"effnet_path=.*holds latent previewer.*not the EfficientNet encoder"):
        check_paths(TrainConfig(train_data_dir="d", effnet_path=str(previewer_file)))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match=r"text_encoder_path=.*the folder is empty"):
        check_paths(TrainConfig(train_data_dir="d", text_encoder_path=str(tmp_path / "folder")))
    assert check_paths(TrainConfig(train_data_dir="d", previewer_path=str(previewer_file)))["previewer_path"].kind \
        == "previewer"


def test_a_missing_path_fails_the_run_whatever_model_says(shapes_dir, shared_cache, tmp_path) -> None:
    """The trial run: model left at "tiny", a checkpoint path that does not exist, rc 0 and an all-zero LoRA."""
    with pytest.raises(ConfigError, match="no such file"):
        train(**tiny_run(shapes_dir, shared_cache, tmp_path / "out", max_train_steps=1,
                         stage_c_path=str(tmp_path / "stage_c_bf16.safetensors")))
    assert not (tmp_path / "out").exists()


def test_an_output_folder_with_a_previous_run_is_refused_unless_resume_or_overwrite(shapes_dir, shared_cache,
                                                                                    tmp_path) -> None:
    out = tmp_path / "out"
    first = train(**tiny_run(shapes_dir, shared_cache, out, mode="full", max_train_steps=2, save_every_n_steps=1,
                             keep_checkpoints=5))
    assert [p.name for p in (out / "checkpoints").glob("step-*")] != []
    with pytest.raises(ConfigError, match=r"holds a previous run .*resume.*overwrite"):
        train(**tiny_run(shapes_dir, shared_cache, out, mode="full", max_train_steps=2))
    resumed = train(**tiny_run(shapes_dir, shared_cache, out, mode="full", max_train_steps=3, resume="auto"))
    assert resumed.losses[:2] == first.losses and resumed.step == 3
    fresh = train(**tiny_run(shapes_dir, shared_cache, out, mode="full", max_train_steps=1, overwrite=True))
    assert fresh.status == "finished"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001"]  # none of the old run


def test_epochs_kohya_names_and_save_last_n_epochs_prune_only_this_run(shapes_dir, shared_cache, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stranger = out / "testv1-000001.safetensors.bak"
    stranger.write_text("another run's file")
    other = out / "other-000001.safetensors"
    other.write_text("another run's file")
    # 12 shapes, batch 4: 3 steps per epoch; 4 epochs, saved every epoch, the last 2 per-epoch files kept
    run = train(**tiny_run(shapes_dir, shared_cache, out, mode="lora", train_batch_size=4, max_train_epochs=4,
                           save_every_n_epochs=1, save_last_n_epochs=2, output_name="testv1"))
    assert run.steps_per_epoch == 3 and run.total_steps == 12 and run.epoch == 4
    assert sorted(p.name for p in out.glob("testv1*.safetensors")) == [
        "testv1-000002.safetensors", "testv1-000003.safetensors", "testv1.safetensors"]
    assert stranger.exists() and other.exists()
    from safetensors import safe_open

    with safe_open(str(out / "testv1-000003.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_epoch"] == "3" and meta["ss_num_batches_per_epoch"] == "3" and meta["ss_num_epochs"] == "4"
    assert meta["ss_resolution"] == "(128, 128)" and meta["ss_network_module"] == "networks.lora"
    import json  # kohya's dataset keys (A1111 / Forge show ss_tag_frequency as the LoRA's training tags)

    (folder, tags), = json.loads(meta["ss_tag_frequency"]).items()
    assert folder == shapes_dir.name and len(tags) == 12 and tags["a red circle"] == 1
    assert json.loads(meta["ss_dataset_dirs"]) == {shapes_dir.name: {"n_repeats": 1, "img_count": 12}}
    assert sum(b["count"] for b in json.loads(meta["ss_bucket_info"])["buckets"].values()) == 12
    assert meta["ss_num_train_images"] == "12" and meta["ss_shuffle_caption"] == "False"


def test_step_saves_take_kohyas_step_names_and_save_last_n_steps_prunes_them(shapes_dir, shared_cache,
                                                                            tmp_path) -> None:
    """kohya's `<name>-step00000002.safetensors` at each step save, `<name>.safetensors` at the end; with
    --save_last_n_steps 3 a save at step s deletes this run's step files of step s - 4 (rounded to a save) or older:
    at step 6 the step-2 file goes (kohya's get_remove_step_no), another run's step file stays."""
    out = tmp_path / "out"
    out.mkdir()
    other = out / "other-step00000002.safetensors"
    other.write_text("another run's file")
    run = train(**tiny_run(shapes_dir, shared_cache, out, mode="lora", max_train_steps=7, save_every_n_steps=2,
                           save_last_n_steps=3, output_name="testv1", keep_checkpoints=5))
    assert sorted(p.name for p in out.glob("testv1*.safetensors")) == [
        "testv1-step00000004.safetensors", "testv1-step00000006.safetensors", "testv1.safetensors"]
    assert other.exists() and run.output_file == out / "testv1.safetensors"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-00000002", "step-00000004", "step-00000006", "step-00000007"]  # resumable ones: keep_checkpoints
    from safetensors import safe_open

    with safe_open(str(out / "testv1-step00000006.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"


def test_without_output_name_the_api_keeps_cascade_lab_names(shapes_dir, shared_cache, tmp_path) -> None:
    """kohya's epoch- / at-step / last names belong to a kohya command line (kohya_file_names); a TOML or API run
    without output_name keeps cascade_lora, and a kohya-named resume of it is told to give --output_name."""
    out = tmp_path / "out"
    run = train(**tiny_run(shapes_dir, shared_cache, out, mode="lora", max_train_steps=3, save_every_n_steps=2))
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "cascade_lora-step00000002.safetensors", "cascade_lora.safetensors"]
    from safetensors import safe_open

    with safe_open(str(run.output_file), "pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "cascade_lora" and meta["modelspec.title"] == "cascade_lora"
    with pytest.raises(ConfigError, match=r"names its files cascade_lora-000001.*--output_name cascade_lora"):
        train(**tiny_run(shapes_dir, shared_cache, out, mode="lora", max_train_steps=4, resume="auto",
                         kohya_file_names=True))
    resumed = train(**tiny_run(shapes_dir, shared_cache, out, mode="lora", max_train_steps=4, resume="auto",
                               kohya_file_names=True, output_name="cascade_lora"))
    assert resumed.step == 4 and resumed.output_file == out / "cascade_lora.safetensors"


def test_a_previous_runs_model_files_are_found_by_this_runs_names(tmp_path) -> None:
    """Files a run would overwrite mark the folder as taken: its final, per-epoch and step files, by its names."""
    from cascade_lab.training.outputs import claim_output_dir, previous_run

    own = TrainConfig(train_data_dir="d", output_dir=str(tmp_path))
    kohya = TrainConfig(train_data_dir="d", output_dir=str(tmp_path), kohya_file_names=True)
    named = TrainConfig(train_data_dir="d", output_dir=str(tmp_path), kohya_file_names=True, output_name="x")
    assert own.file_stem("epoch") == "cascade_lora" and named.file_stem("step") == "x"
    assert [kohya.file_stem(k) for k in ("epoch", "step", "last")] == ["epoch", "at", "last"]
    for name in ("epoch-1.safetensors", "at-step00000002.safetensors.bak", "cascade_lora-step2.safetensors",
                 "x-00001.safetensors", "last.ckpt"):
        (tmp_path / name).write_text("not this run's")
    assert previous_run(own) == previous_run(kohya) == previous_run(named) == []
    (tmp_path / "epoch-000003.safetensors").write_text("kohya's")
    (tmp_path / "cascade_lora-step00000010.safetensors").write_text("cascade_lab's")
    assert previous_run(kohya) == [str(tmp_path / "epoch-000003.safetensors")]
    assert previous_run(own) == [str(tmp_path / "cascade_lora-step00000010.safetensors")]
    assert previous_run(named) == []
    (tmp_path / "x.safetensors").write_text("the final file")
    with pytest.raises(ConfigError, match=r"holds a previous run \(.*x\.safetensors\)"):
        claim_output_dir(named)


def test_an_explicit_stage_c_file_wins_over_model(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from cascade_lab.models.stage_c import StageCConfig
    from cascade_lab.training.models import build_models

    torch.manual_seed(5)
    mine = StageCConfig.tiny().build()
    with torch.no_grad():
        mine.clf[1].weight.normal_()
    path = tmp_path / "stage_c.safetensors"
    save_file({k: v.contiguous() for k, v in mine.state_dict().items()}, str(path))
    for mode in ("lora", "full"):
        models = build_models(TrainConfig(train_data_dir="d", model="tiny", mode=mode, stage_c_path=str(path)))
        loaded = models.stage_c.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in mine.state_dict().items())


def test_kohya_names_work_as_toml_keys(tmp_path) -> None:
    """The trial run: seven of the command's options were unknown TOML keys (effnet_checkpoint_path hinted
    "keep_checkpoints")."""
    toml = tmp_path / "train.toml"
    toml.write_text('stage_c_checkpoint_path = "ckpts/stage_c_bf16.safetensors"\n'
                    'effnet_checkpoint_path = "ckpts/effnet_encoder.safetensors"\n'
                    'previewer_checkpoint_path = "ckpts/previewer.safetensors"\nsave_every_n_epochs = 1\n'
                    'sample_every_n_epochs = 1\nmax_data_loader_n_workers = 2\npersistent_data_loader_workers = true\n'
                    'train_data_dir = "data"\n')
    with pytest.warns(UserWarning) as caught:
        config = TrainConfig.from_toml(toml)
    said = [str(w.message) for w in caught]
    assert any("'persistent_data_loader_workers' ignored: there are no DataLoader" in m for m in said)
    assert any("'max_data_loader_n_workers' ignored" in m for m in said)
    assert config.effnet_path == str(tmp_path / "ckpts" / "effnet_encoder.safetensors")
    assert config.stage_c_path and config.previewer_path and config.save_every_n_epochs == 1
