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
    assert "no --output_name: files are named as kohya names them (epoch-000001, at-step00000500, last" in text
    assert fields["output_name"] is None and fields["kohya_file_names"]
    full, _, _ = parse_kohya(["--stage_c_checkpoint_path", "c", "--effnet_checkpoint_path", "e", "--output_dir", "o",
                              "--train_data_dir", "d", "--seed", "3"], environ={})
    assert full["mode"] == "full" and full["seed"] == 3
    assert full["gradient_checkpointing_mode"] == "auto"  # selective on a CPU, kohya's full recomputation on a GPU
    chosen, _, _ = parse_kohya(["--stage_c_checkpoint_path", "c", "--effnet_checkpoint_path", "e", "--output_dir",
                                "o", "--train_data_dir", "d", "--gradient_checkpointing",
                                "--gradient_checkpointing_mode", "full"], environ={})
    assert chosen["gradient_checkpointing"] and chosen["gradient_checkpointing_mode"] == "full"


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


def test_kohyas_lion_and_restarts_train_from_the_command_line(ckpts, kohya_files, tmp_path, one_thread) -> None:
    """--use_lion_optimizer (kohya's old spelling of Lion) with cosine restarts and a warm-up: the learning rates
    of diffusers' schedule, step by step from 0, and the class in the LoRA's ss_optimizer."""
    import json
    import math

    from cascade_lab.cli import main

    out = tmp_path / "lion"
    argv = ["stable_cascade_train_c_network.py", "--network_module", "networks.lora", "--network_dim", "2",
            "--use_lion_optimizer", "--optimizer_args", "weight_decay=0.01", "--learning_rate", "1e-4",
            "--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2", "--lr_warmup_steps", "2",
            "--max_train_steps", "6", "--output_dir", str(out), "--output_name", "lion", "--seed", "0",
            "--save_model_as", "safetensors", "--stage_c_checkpoint_path", str(ckpts / "stage_c_bf16.safetensors"),
            "--effnet_checkpoint_path", str(ckpts / "effnet_encoder.safetensors"),
            "--dataset_config", str(kohya_files[0]), "--quiet"]
    assert main(["train", *argv]) == 0
    lrs = [r["lr"] for r in json.loads((out / "run.json").read_text())["losses"]]
    restarts = [0.5 * (1 + math.cos(math.pi * ((2 * (s - 2) / 4) % 1))) for s in range(2, 6)]
    assert lrs == pytest.approx([0.0, 0.5e-4, *(1e-4 * f for f in restarts)], abs=1e-12)
    with safe_open(str(out / "lion.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_optimizer"].endswith(".Lion(weight_decay=0.01)") and meta["ss_lr_scheduler"] == \
        "cosine_with_restarts"


def test_python_m_entry_shows_kohyas_groups() -> None:
    done = subprocess.run([sys.executable, "-m", "cascade_lab.training", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    for group in ("Stable Cascade models", "dataset (kohya", "training (kohya", "optimizer (kohya", "LoRA (kohya"):
        assert group in done.stdout


# every option of kohya's two Stable Cascade scripts (their setup_parser(), `stable-cascade` branch, 235a1ea)
KOHYA_FLAGS = (
    "adaptive_loss_weight", "adaptive_noise_scale", "async_upload", "base_weights", "base_weights_multiplier",
    "bucket_no_upscale", "bucket_reso_steps", "cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs",
    "cache_text_encoder_outputs_to_disk", "caption_dropout_every_n_epochs", "caption_dropout_rate",
    "caption_extension", "caption_extention", "caption_prefix", "caption_separator", "caption_suffix",
    "caption_tag_dropout_rate", "clip_skip", "color_aug", "config_file", "console_log_file", "console_log_level",
    "console_log_simple", "dataset_class", "dataset_config", "dataset_repeats", "ddp_gradient_as_bucket_view",
    "ddp_static_graph", "ddp_timeout", "debiased_estimation_loss", "debug_dataset", "dim_from_weights",
    "dynamo_backend", "effnet_checkpoint_path", "enable_bucket", "face_crop_aug_range", "flip_aug", "fp8_base",
    "full_bf16", "full_fp16", "gradient_accumulation_steps", "gradient_checkpointing", "highvram",
    "huggingface_path_in_repo", "huggingface_repo_id", "huggingface_repo_type", "huggingface_repo_visibility",
    "huggingface_token", "in_json", "ip_noise_gamma", "keep_tokens", "keep_tokens_separator", "learning_rate",
    "learning_rate_te1", "log_prefix", "log_tracker_config", "log_tracker_name", "log_with", "logging_dir", "lowram",
    "lr_scheduler", "lr_scheduler_args", "lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_type",
    "lr_warmup_steps", "max_bucket_reso", "max_data_loader_n_workers", "max_grad_norm", "max_timestep",
    "max_token_length", "max_train_epochs", "max_train_steps", "mem_eff_attn", "metadata_author",
    "metadata_description", "metadata_license", "metadata_tags", "metadata_title", "min_bucket_reso",
    "min_snr_gamma", "min_timestep", "mixed_precision", "multires_noise_discount", "multires_noise_iterations",
    "network_alpha", "network_args", "network_dim", "network_dropout", "network_module",
    "network_train_text_encoder_only", "network_train_unet_only", "network_weights", "no_half_vae", "no_metadata",
    "noise_offset", "optimizer_args", "optimizer_type", "output_config", "output_dir", "output_name",
    "persistent_data_loader_workers", "previewer_checkpoint_path", "prior_loss_weight", "random_crop",
    "reg_data_dir", "resolution", "resume", "resume_from_huggingface", "sample_at_first", "sample_every_n_epochs",
    "sample_every_n_steps", "sample_prompts", "sample_sampler", "save_every_n_epochs", "save_every_n_steps",
    "save_last_n_epochs", "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state",
    "save_model_as", "save_n_epoch_ratio", "save_precision", "save_state", "save_state_to_huggingface",
    "save_text_model", "scale_v_pred_loss_like_noise_pred", "scale_weight_norms", "sdpa", "seed", "shuffle_caption",
    "stage_c_checkpoint_path", "text_encoder_lr", "text_model_checkpoint_path", "token_warmup_min",
    "token_warmup_step", "tokenizer_cache_dir", "torch_compile", "train_batch_size", "train_data_dir",
    "train_text_encoder", "training_comment", "unet_lr", "use_8bit_adam", "use_lion_optimizer", "use_safetensors",
    "v_pred_like_loss", "vae", "vae_batch_size", "wandb_api_key", "wandb_run_name", "weighted_captions", "xformers",
    "zero_terminal_snr",
)


def _value_for(action: object) -> list[str]:
    """A value argparse accepts for one of our parser's actions (none for a switch)."""
    import argparse

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return []
    choices = getattr(action, "choices", None)
    if choices:
        return [str(next(iter(choices)))]
    return ["1"] if getattr(action, "type", None) in (int, float) or getattr(action, "nargs", None) != "*" else ["k=1"]


@pytest.mark.parametrize("name", [n for n in KOHYA_FLAGS if n != "help"])
def test_every_flag_of_kohyas_scripts_is_known(name: str) -> None:
    """Each of kohya's flags is honoured, gets a notice or is refused naming itself, never "unknown"."""
    from cascade_lab.training.config import ConfigError
    from cascade_lab.training.kohya_flags import build_parser

    actions = {a.dest: a for a in build_parser()._actions}
    assert name in actions, f"--{name} is missing from cascade_lab's kohya parser"
    base = ["--stage_c_checkpoint_path", "c", "--effnet_checkpoint_path", "e", "--output_dir", "o",
            "--train_data_dir", "d", "--seed", "0"]
    try:
        parse_kohya([*base, f"--{name}", *_value_for(actions[name])], environ={})
    except ConfigError as err:
        assert "unknown argument" not in str(err) and f"--{name}" in str(err), str(err)


def test_newer_kohya_flags_are_honoured_or_explained(tmp_path: Path) -> None:
    import random

    from cascade_lab.training.config import ConfigError, TrainConfig
    from cascade_lab.training.data import make_caption
    from cascade_lab.training.toml_config import folder_dataset

    base = ["--stage_c_checkpoint_path", "c", "--effnet_checkpoint_path", "e", "--output_dir", "o",
            "--train_data_dir", str(tmp_path), "--seed", "0"]
    fields, notices, _ = parse_kohya([
        *base, "--caption_extention", ".cap", "--caption_prefix", "pre; ", "--caption_suffix", "; suf",
        "--caption_separator", ";", "--keep_tokens", "1", "--shuffle_caption", "--caption_dropout_every_n_epochs", "3",
        "--save_every_n_steps", "100", "--save_last_n_steps", "250", "--torch_compile", "--no_half_vae",
        "--weighted_captions"], environ={})
    assert fields["caption_extension"] == ".cap" and fields["save_last_n_steps"] == 250
    text = "\n".join(notices)
    assert "--torch_compile: training runs eagerly" in text and "--no_half_vae: EfficientNet" in text
    assert "--weighted_captions: kohya's Stable Cascade scripts ignore it too" in text
    (tmp_path / "a.png").write_bytes(b"")  # folder_dataset lists files; it does not open them
    subset = folder_dataset(tmp_path, TrainConfig.from_dict(fields)).datasets[0].subsets[0]
    assert (subset.caption_extension, subset.caption_separator, subset.caption_dropout_every_n_epochs) == \
        (".cap", ";", 3)
    rng = random.Random(0)
    shuffled = {make_caption("a; b; c; d", subset, 1, rng) for _ in range(40)}
    assert all(c.startswith("pre, ") and c.count(", ") == 5 for c in shuffled) and len(shuffled) > 1
    assert make_caption("a; b", subset, 3, rng) == ""  # every 3rd epoch: empty captions
    for argv, message in (([*base, "--debug_dataset"], "--debug_dataset: kohya shows the dataset"),
                          ([*base, "--resolution", "1024,wide"], "--resolution 1024,wide: use a size in pixels"),
                          ([*base, "--caption_separator", ""], None)):
        if message is None:
            fields, _, _ = parse_kohya(argv, environ={})
            with pytest.raises(ConfigError, match="caption_separator=''"):
                folder_dataset(tmp_path, TrainConfig.from_dict(fields))
        else:
            with pytest.raises(ConfigError, match=message):
                parse_kohya(argv, environ={})


def test_kohyas_config_file_is_read_as_kohya_reads_it(tmp_path: Path) -> None:
    """--config_file: a TOML of flag values, sections flattened, ".toml" added when missing; its values stand for
    the defaults (the command line wins), its no-effect and refused keys act as given flags, unknown keys get a
    notice naming the closest flag."""
    from cascade_lab.training.config import ConfigError

    cfg = tmp_path / "lora_config.toml"
    cfg.write_text(
        '[model_arguments]\nstage_c_checkpoint_path = "c.safetensors"\neffnet_checkpoint_path = "e.safetensors"\n'
        '[dataset_arguments]\ntrain_data_dir = "d"\ncaption_extension = ".txt"\nmax_data_loader_n_workers = 0\n'
        '[training_arguments]\noutput_dir = "o"\nlearning_rate = 1e-4\nmax_train_epochs = 3\nseed = 7\n'
        'mixed_precision = "bf16"\noptimizer_args = ["scale_parameter=False", "relative_step=False"]\n'
        'optimizer_type = "adafactor"\nlearning_rat = 5e-5\n')
    fields, notices, _ = parse_kohya(["--config_file", str(tmp_path / "lora_config"), "--learning_rate", "2e-4"],
                                     environ={})
    assert fields["stage_c_path"] == "c.safetensors" and fields["caption_extension"] == ".txt"
    assert fields["learning_rate"] == 2e-4 and fields["max_train_epochs"] == 3 and fields["seed"] == 7  # cli wins
    assert fields["mixed_precision"] == "bf16" and fields["optimizer_type"] == "adafactor"
    assert fields["optimizer_args"] == ["scale_parameter=False", "relative_step=False"]
    text = "\n".join(notices)
    assert "--max_data_loader_n_workers: cascade_lab reads cached latents" in text
    assert "'learning_rat' is no kohya flag (did you mean learning_rate?)" in text
    cfg.write_text('[training_arguments]\ntrain_text_encoder = true\n')
    with pytest.raises(ConfigError, match="--train_text_encoder: text-encoder training is not supported"):
        parse_kohya(["--config_file", str(cfg), "--stage_c_checkpoint_path", "c", "--effnet_checkpoint_path", "e",
                     "--output_dir", "o", "--train_data_dir", "d"], environ={})
    with pytest.raises(ConfigError, match="missing.toml is not a file"):
        parse_kohya(["--config_file", str(tmp_path / "missing")], environ={})
    cfg.write_text("not = [toml")
    with pytest.raises(ConfigError, match="not a readable TOML"):
        parse_kohya(["--config_file", str(cfg)], environ={})


def test_without_output_name_files_take_kohyas_default_names(ckpts, kohya_files, tmp_path, one_thread) -> None:
    """kohya without --output_name: epoch-000001 / at-step00000002 / last.safetensors (train_util's default names),
    pruned under those names, ss_output_name "None"; the folder is then refused to a new run, resume keeps them."""
    from cascade_lab.training import ConfigError, TrainConfig, train

    out = tmp_path / "out"
    argv = ["stable_cascade_train_c_network.py", "--network_module", "networks.lora", "--network_dim", "2",
            "--max_train_epochs", "3", "--save_every_n_epochs", "1", "--save_last_n_epochs", "1",
            "--save_every_n_steps", "2", "--save_last_n_steps", "2", "--output_dir", str(out), "--seed", "0",
            "--stage_c_checkpoint_path", str(ckpts / "stage_c_bf16.safetensors"),
            "--effnet_checkpoint_path", str(ckpts / "effnet_encoder.safetensors"),
            "--dataset_config", str(kohya_files[0]), "--sample_prompts", str(kohya_files[1]), "--sample_at_first"]

    def config(*extra: str) -> TrainConfig:
        return TrainConfig.from_dict(parse_kohya([*argv, *extra], environ={})[0])

    # 12 images, batch 4: 3 steps per epoch, 9 steps; stopped after step 5, then resumed to the end
    steps = [0]
    first = train(config(), stop=lambda: steps[0] >= 5, callback=lambda e: steps.__setitem__(0, e.step))
    assert first.status == "stopped" and first.step == 5 and first.epoch_files == ["epoch-000001.safetensors"]
    assert first.step_files == ["at-step00000002.safetensors", "at-step00000004.safetensors"]
    with pytest.raises(ConfigError, match=r"holds a previous run .*last\.safetensors"):
        train(config())
    run = train(config("--resume", "auto"))
    assert run.status == "finished" and run.step == 9 and run.output_file == out / "last.safetensors"
    # epoch 3 is the last (no epoch file); --save_last_n_epochs 1 left epoch 2, --save_last_n_steps 2 steps 6, 8
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "at-step00000006.safetensors", "at-step00000008.safetensors", "epoch-000002.safetensors", "last.safetensors"]
    samples = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert samples == ["000000_00_3.png", "000000_00_3_preview.png"]  # kohya: no "<name>_" without an output name
    with safe_open(str(out / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "None" and meta["modelspec.title"].startswith("LoRA@")  # kohya: str(None)
    with pytest.raises(ConfigError, match=r"names its files as kohya does without --output_name .*kohya_file_names"):
        train(config("--resume", "auto", "--max_train_steps", "10"), kohya_file_names=False)  # would be cascade_lora
    # kohya's own files (no checkpoints, no run.json) are recognised by their names too
    shutil.rmtree(out / "checkpoints")
    (out / "run.json").unlink()
    with pytest.raises(ConfigError, match=r"holds a previous run \(.*last\.safetensors, .*at-step00000006\."
                                          r"safetensors, .*at-step00000008\.safetensors, 1 more model files\)"):
        train(config())


def test_the_issue_command_with_full_bf16_trains_bf16_weights(ckpts, kohya_files, tmp_path, capsys,
                                                               one_thread) -> None:
    """kohya's command plus --full_bf16: bf16 weights and gradients, stochastically rounded updates (a notice says
    how this differs from kohya's rounding), the files as without it."""
    from cascade_lab.cli import main

    out = tmp_path / "output"
    assert main(["train", *kohya_example(ckpts, out, *kohya_files), "--full_bf16"]) == 0
    assert "--full_bf16: weights and gradients in bf16 as in kohya, but the updated weights are rounded " \
           "stochastically" in capsys.readouterr().err
    check_outputs(out)
    with safe_open(str(out / "testv1.safetensors"), "pt") as f:
        assert f.metadata()["cascade_lab.full_bf16"] == "True (stochastic rounding)"
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert not (last / "trainable.safetensors").exists()  # the bf16 file holds the bf16 weights exactly
