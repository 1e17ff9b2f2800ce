"""Issue 19: kohya's published Stage C command, pasted as is, with its paths pointed at tiny-model files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from cascade_lab.training.kohya_args import parse_kohya

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread


def kohya_example(ckpts: Path, out: Path, dataset_toml: Path, prompts: Path) -> list[str]:
    """The issue's command after `accelerate launch ... stable_cascade_train_stage_c.py`, 2 epochs, its paths ours."""
    return [
        "stable_cascade_train_stage_c.py",
        "--mixed_precision", "bf16", "--save_precision", "bf16", "--max_data_loader_n_workers", "2",
        "--persistent_data_loader_workers", "--gradient_checkpointing", "--learning_rate", "1e-4",
        "--optimizer_type", "adafactor", "--optimizer_args", "scale_parameter=False", "relative_step=False",
        "warmup_init=False", "--max_train_epochs", "2", "--save_every_n_epochs", "1", "--save_precision", "bf16",
        "--output_dir", str(out), "--output_name", "testv1",
        "--stage_c_checkpoint_path", str(ckpts / "stage_c_bf16.safetensors"),
        "--effnet_checkpoint_path", str(ckpts / "effnet_encoder.safetensors"),
        "--previewer_checkpoint_path", str(ckpts / "previewer.safetensors"),
        "--dataset_config", str(dataset_toml), "--sample_every_n_epochs", "1", "--sample_prompts", str(prompts),
        "--adaptive_loss_weight", "--seed", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny variant's Stage C, EfficientNet and previewer saved as the official single-model files."""
    import torch
    from safetensors.torch import save_file

    from cascade_lab.models.tiny import build_tiny, calibrated_random_effnet

    folder = tmp_path_factory.mktemp("ckpts")
    stages = build_tiny(0)
    parts = {"stage_c_bf16": stages.stage_c, "effnet_encoder": calibrated_random_effnet(),
             "previewer": stages.previewer}
    for name, module in parts.items():
        tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        if name == "stage_c_bf16":
            tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, str(folder / f"{name}.safetensors"))
    return folder


@pytest.fixture
def kohya_files(shapes_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """bmaltais' test_dataset.toml with a Linux path and 128 px, and a prompt file in kohya's grammar."""
    toml = tmp_path / "test_dataset.toml"
    toml.write_text(f"""[general]
enable_bucket = true
[[datasets]]
resolution = 128
batch_size = 4
keep_tokens = 1
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 32
bucket_no_upscale = true
  [[datasets.subsets]]
  image_dir = '{shapes_dir}'
  num_repeats = 1
  class_tokens = 'toy'
  caption_extension = '.txt'
""")
    prompts = tmp_path / "prompt.txt"
    prompts.write_text("a red circle --W 128 --H 128 --s 2 --d 3\n")
    return toml, prompts


def check_outputs(out: Path) -> None:
    assert (out / "testv1-000001.safetensors").is_file() and (out / "testv1.safetensors").is_file()
    assert not (out / "testv1-000002.safetensors").exists()  # the last epoch is the final file (kohya)
    with safe_open(str(out / "testv1-000001.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        dtype = f.get_tensor(keys[0]).dtype
    assert meta["modelspec.architecture"] == "stable-cascade" and meta["ss_epoch"] == "1"
    for key in ("modelspec.date", "ss_session_id", "ss_training_started_at", "ss_num_batches_per_epoch",
                "ss_num_epochs", "ss_max_train_steps", "ss_total_batch_size", "ss_sd_model_name"):
        assert key in meta, key
    assert meta["ss_sd_model_name"] == "stage_c_bf16.safetensors" and meta["ss_num_epochs"] == "2"
    assert str(dtype) == "torch.bfloat16" and any(k.endswith("in_proj_weight") for k in keys)  # official layout
    samples = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert len([s for s in samples if "e000001" in s]) >= 1 and len([s for s in samples if "e000002" in s]) >= 1


def test_the_issue_command_runs_through_cascade_lab_train(ckpts, kohya_files, tmp_path, capsys, one_thread) -> None:
    from cascade_lab.cli import main

    out = tmp_path / "output"
    assert main(["train", *kohya_example(ckpts, out, *kohya_files)]) == 0
    printed = capsys.readouterr()
    assert "3 batches per epoch: 3 steps per epoch, 2 epoch(s), 6 steps" in printed.out
    assert "finished: step 6/6" in printed.out
    err = printed.err
    assert "--save_precision given 2 times (bf16, bf16)" in err
    assert "--persistent_data_loader_workers: there are no DataLoader workers" in err
    assert "--max_data_loader_n_workers: " in err
    check_outputs(out)
    # the same folder again is refused (it holds this run), --overwrite starts afresh
    with pytest.raises(SystemExit):
        main(["train", *kohya_example(ckpts, out, *kohya_files)])
    assert "holds a previous run" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="accelerate is not installed (pip install -e .[test])")
def test_the_issue_command_runs_under_accelerate_launch(ckpts, kohya_files, tmp_path) -> None:
    """`accelerate launch --mixed_precision bf16 --num_cpu_threads_per_process 8 -m cascade_lab.training <flags>`."""
    out = tmp_path / "output"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
           "--mixed_precision", "bf16", "--num_cpu_threads_per_process", "1", "-m", "cascade_lab.training",
           *kohya_example(ckpts, out, *kohya_files)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "given to accelerate and bf16 to the script" in done.stderr
    check_outputs(out)


def test_kohya_defaults_and_meanings() -> None:
    fields, notices, _ = parse_kohya(["stable_cascade_train_c_network.py", "--network_module", "networks.lora",
                                      "--stage_c_checkpoint_path", "c.safetensors", "--effnet_checkpoint_path",
                                      "e.safetensors", "--output_dir", "o", "--train_data_dir", "d", "-",
                                      "--network_dim", "8"], environ={})
    assert fields["mode"] == "lora" and fields["network_dim"] == 8 and fields["network_alpha"] == 1.0
    assert fields["network_target"] == "all_linear" and fields["learning_rate"] == 2e-6
    assert fields["caption_extension"] == ".caption" and fields["max_train_steps"] == 1600
    assert fields["training_scale"] == "kohya" and fields["caption_dropout_rate"] == 0.0
    text = "\n".join(notices)
    assert "lone '-'" in text and "no --save_model_as" in text and "drew seed" in text
    assert "no --network_train_unet_only" in text
    full, _, _ = parse_kohya(["--stage_c_checkpoint_path", "c", "--effnet_checkpoint_path", "e", "--output_dir", "o",
                              "--train_data_dir", "d", "--seed", "3"], environ={})
    assert full["mode"] == "full" and full["seed"] == 3


def test_the_caching_flags_of_kohyas_sdxl_group_are_accepted() -> None:
    """kohya's Stable Cascade scripts take --cache_text_encoder_outputs(_to_disk) from add_sdxl_training_arguments."""
    argv = ["--stage_c_checkpoint_path", "c", "--effnet_checkpoint_path", "e", "--output_dir", "o",
            "--train_data_dir", "d", "--seed", "0", "--cache_latents", "--cache_latents_to_disk",
            "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk"]
    fields, notices, _ = parse_kohya(argv, environ={})
    assert fields["cache_latents"] and fields["cache_text_encoder_outputs"]
    assert any(n.startswith("--cache_text_encoder_outputs_to_disk: text embeddings are always cached") for n in notices)
    shuffled, _, _ = parse_kohya([*argv, "--shuffle_caption"], environ={})
    assert not shuffled["cache_text_encoder_outputs"]


def test_unknown_and_refused_flags_name_the_fix() -> None:
    from cascade_lab.training.config import ConfigError

    base = ["--stage_c_checkpoint_path", "c", "--effnet_checkpoint_path", "e", "--output_dir", "o",
            "--train_data_dir", "d"]
    with pytest.raises(ConfigError, match=r"'--save_every_n_epoch' \(did you mean --save_every_n_epochs\?\)"):
        parse_kohya([*base, "--save_every_n_epoch", "1"], environ={})
    with pytest.raises(ConfigError, match="--mixed_precision fp16: Stage C overflows"):
        parse_kohya([*base, "--mixed_precision", "fp16"], environ={})
    with pytest.raises(ConfigError, match="--train_text_encoder: text-encoder training is not supported"):
        parse_kohya([*base, "--train_text_encoder"], environ={})


def test_the_lora_script_flags_train_a_kohya_lora(ckpts, kohya_files, tmp_path, capsys, one_thread) -> None:
    from cascade_lab.cli import main

    out = tmp_path / "lora"
    argv = ["stable_cascade_train_c_network.py", "--network_module", "networks.lora", "--network_dim", "2",
            "--network_alpha", "2", "--network_args", "target=attention", "--learning_rate", "1e-3",
            "--max_train_steps", "2", "--output_dir", str(out), "--output_name", "mylora", "--seed", "0",
            "--stage_c_checkpoint_path", str(ckpts / "stage_c_bf16.safetensors"),
            "--effnet_checkpoint_path", str(ckpts / "effnet_encoder.safetensors"),
            "--dataset_config", str(kohya_files[0]), "--quiet"]
    assert main(["train", *argv]) == 0
    assert "no --save_model_as: kohya's LoRA script stops at its first save" in capsys.readouterr().err
    with safe_open(str(out / "mylora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2" and meta["ss_steps"] == "2"
    assert keys and all(k.startswith("lora_unet_") for k in keys) and any("_attn_to_q." in k for k in keys)


def test_python_m_entry_shows_kohyas_groups() -> None:
    done = subprocess.run([sys.executable, "-m", "cascade_lab.training", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    for group in ("Stable Cascade models", "dataset (kohya", "training (kohya", "optimizer (kohya", "LoRA (kohya"):
        assert group in done.stdout
