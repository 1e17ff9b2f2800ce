"""kohya's command line, accepted as it is: the flags of ``stable_cascade_train_stage_c.py`` (full fine-tune) and
``stable_cascade_train_c_network.py`` (LoRA) from kohya sd-scripts' ``stable-cascade`` branch, read with kohya's
meanings and defaults into a `TrainConfig`.

Flags are grouped as kohya's ``add_*_arguments`` group them. A flag that cascade_lab honours differently, that has
no effect, or that is broken or contradictory in kohya's published example gets one notice saying what kohya would
do and what cascade_lab does (``docs/training.md`` lists them). An unknown flag is an error naming the closest real
one. No torch import here.
"""

from __future__ import annotations

import argparse
import difflib
import os
import random
import sys
from collections.abc import Sequence
from typing import Any

from .config import ConfigError

SCRIPTS = {"stable_cascade_train_stage_c.py": "full", "stable_cascade_train_c_network.py": "lora"}

# flags kohya accepts that change nothing here: flag -> what cascade_lab does instead
NO_EFFECT = {
    "max_data_loader_n_workers": "cascade_lab reads cached latents and text in the training process; there are no "
                                 "DataLoader workers to start",
    "persistent_data_loader_workers": "there are no DataLoader workers to keep alive (latents and text are cached)",
    "xformers": "attention runs through PyTorch's scaled_dot_product_attention, dropout only while training",
    "sdpa": "attention always runs through PyTorch's scaled_dot_product_attention (kohya's --sdpa also drops out "
            "10 %% of attention at sampling; cascade_lab only while training)",
    "mem_eff_attn": "attention always runs through PyTorch's scaled_dot_product_attention",
    "no_half_vae": "EfficientNet always runs in float32",
    "lowram": "models are loaded memory-lean (meta device, read straight into place) anyway",
    "highvram": "latents are cached on disk and in memory anyway",
    "cache_latents": "latents are always cached (to <output_dir>/cache) unless random_crop/color_aug need otherwise",
    "cache_latents_to_disk": "latents are always cached to disk (<output_dir>/cache)",
    "cache_text_encoder_outputs": "text embeddings are always cached unless shuffle_caption needs otherwise",
    "cache_text_encoder_outputs_to_disk": "text embeddings are always cached to disk (<output_dir>/cache)",
    "vae_batch_size": "EfficientNet encodes 8 images at a time while caching",
    "save_state": "every checkpoint under <output_dir>/checkpoints is resumable (optimizer, scheduler, RNG, adaptive "
                  "loss buckets)",
    "save_text_model": "kohya's training scripts ignore it too; no text model is written",
    "max_token_length": "long prompts are encoded in 77-token windows",
    "sample_sampler": "previews use Stable Cascade's own sampler (DDPM, shift 2, CFG rescale 0.7), as kohya's do",
    "logging_dir": "losses are written to <output_dir>/run.json and every checkpoint's info.json",
    "log_with": "losses are written to <output_dir>/run.json", "log_prefix": "no trackers are used",
    "log_tracker_name": "no trackers are used", "wandb_run_name": "no trackers are used",
    "wandb_api_key": "no trackers are used", "ddp_timeout": "torch.distributed's default timeout is used",
    "noise_offset": "no effect on Stable Cascade (kohya's README: SDXL noise options are ignored)",
    "multires_noise_iterations": "no effect on Stable Cascade",
    "multires_noise_discount": "no effect on Stable Cascade",
    "adaptive_noise_scale": "no effect on Stable Cascade", "ip_noise_gamma": "no effect on Stable Cascade",
    "zero_terminal_snr": "no effect on Stable Cascade", "min_snr_gamma": "no effect on Stable Cascade (kohya too)",
    "v_parameterization": "Stage C predicts noise (epsilon); kohya ignores it too",
    "clip_skip": "Stage C takes the text model's last hidden state; kohya ignores it too",
    "min_timestep": "no effect on Stable Cascade's continuous t", "max_timestep": "no effect on Stable Cascade's t",
    "save_n_epoch_ratio": "use --save_every_n_epochs", "save_last_n_epochs_state": "use --save_last_n_epochs",
    "vae": "Stable Cascade has no VAE; the EfficientNet file is --effnet_checkpoint_path",
    "training_comment": "not stored", "no_metadata": "metadata is always written (kohya ss_* and modelspec keys)",
    "network_dropout": "LoRA dropout is not implemented", "scale_weight_norms": "not implemented; no max-norm",
    "lr_scheduler_num_cycles": "cosine schedules run one cycle", "lr_scheduler_power": "linear decay is used",
    "full_bf16": "Stage C keeps float32 master weights under bf16 autocast (more memory than kohya's --full_bf16, "
                 "no bf16 rounding of the updates)",
    "fp8_base": "the frozen base stays in the --mixed_precision dtype",
    "dataset_class": "datasets are kohya dataset TOMLs or folders",
    "console_log_level": "Python's warnings are used", "console_log_file": "Python's warnings are used",
    "console_log_simple": "Python's warnings are used", "metadata_title": "modelspec.title is --output_name",
    "metadata_author": "not stored", "metadata_description": "not stored", "metadata_license": "not stored",
    "metadata_tags": "not stored", "tokenizer_cache_dir": "the tokenizer comes with the text encoder",
    "use_safetensors": "always safetensors", "caption_tag_dropout_rate": "tag dropout is not implemented",
    "token_warmup_min": "token warm-up is not implemented", "token_warmup_step": "token warm-up is not implemented",
    "face_crop_aug_range": "face crops are not implemented",
}  # fmt: skip
REFUSED = {
    "in_json": "fine-tune style metadata JSON datasets are not supported; use --dataset_config or --train_data_dir "
               "with caption files",
    "train_text_encoder": "text-encoder training is not supported (kohya's README calls it untested)",
    "learning_rate_te1": "text-encoder training is not supported",
    "network_train_text_encoder_only": "text-encoder LoRA is not supported; cascade_lab trains Stage C",
    "network_weights": "starting from a LoRA file is not supported; resume a cascade_lab checkpoint with --resume",
    "dim_from_weights": "starting from a LoRA file is not supported",
    "base_weights": "merging base LoRAs is not supported", "base_weights_multiplier": "merging is not supported",
    "full_fp16": "Stage C overflows in float16 (official readme); use --mixed_precision bf16",
    "reg_data_dir": "regularisation images are not supported",
    "config_file": "give the flags, or a cascade_lab training TOML as `cascade-lab train CONFIG.toml`",
    "output_config": "the settings of a run are stored in its checkpoints (state.pt) and run.json",
}  # fmt: skip


def _flag(group: Any, name: str, **kwargs: Any) -> None:
    group.add_argument(f"--{name}", dest=name, default=kwargs.pop("default", None), **kwargs)


def build_parser(prog: str = "cascade-lab train") -> argparse.ArgumentParser:
    """kohya's flags in kohya's groups, with kohya's defaults; cascade_lab's own last."""
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog} CONFIG.toml [--set KEY=VALUE ...] | {prog} [SCRIPT.py] --kohya_flag ...",
        description="Fine-tune Stage C from a cascade_lab TOML (`cascade_lab.training.TrainConfig` fields) or from "
                    "kohya sd-scripts' command line,\npasted as is: `stable_cascade_train_stage_c.py` flags "
                    "(a full fine-tune) or `stable_cascade_train_c_network.py` flags (LoRA,\nwhen --network_module "
                    "is given). Flags that change nothing here print one notice each (docs/training.md).")
    flag = _flag
    g = parser.add_argument_group("Stable Cascade models (kohya stable_cascade_utils)")
    flag(g, "stage_c_checkpoint_path", metavar="FILE", help="Stage C .safetensors (kohya: required)")
    flag(g, "effnet_checkpoint_path", metavar="FILE", help="EfficientNet encoder .safetensors (kohya: required)")
    flag(g, "text_model_checkpoint_path", metavar="PATH", help="CLIP-G text model file or transformers folder")
    flag(g, "save_text_model", action="store_true", help="no effect (kohya's training scripts ignore it too)")
    flag(g, "previewer_checkpoint_path", metavar="FILE", help="previewer .safetensors (for sample images)")
    flag(g, "adaptive_loss_weight", action="store_true", help="adaptive loss weights (default: P2)")

    g = parser.add_argument_group("dataset (kohya train_util.add_dataset_arguments)")
    flag(g, "train_data_dir", metavar="DIR", help="folder of images with caption files (or <repeats>_<name> folders)")
    flag(g, "dataset_config", metavar="TOML", help="kohya dataset TOML ([general], [[datasets]], subsets)")
    flag(g, "in_json", metavar="JSON", help="refused: metadata JSON datasets")
    flag(g, "reg_data_dir", metavar="DIR", help="refused: regularisation images")
    flag(g, "resolution", metavar="W[,H]", help="bucket area side in pixels (kohya: required without a TOML)")
    flag(g, "caption_extension", default=".caption", help="caption file extension (kohya default .caption)")
    flag(g, "dataset_repeats", type=int, default=1, help="repeats of every image per epoch")
    flag(g, "shuffle_caption", action="store_true")
    flag(g, "keep_tokens", type=int, default=0)
    flag(g, "caption_dropout_rate", type=float, default=0.0, help="kohya default 0 (official trainer: 0.05)")
    flag(g, "flip_aug", action="store_true")
    flag(g, "color_aug", action="store_true", help="refused: not implemented")
    flag(g, "random_crop", action="store_true")
    flag(g, "enable_bucket", action="store_true")
    flag(g, "min_bucket_reso", type=int, default=256)
    flag(g, "max_bucket_reso", type=int, default=1024)
    flag(g, "bucket_reso_steps", type=int, default=64, help="a multiple of 32")
    flag(g, "bucket_no_upscale", action="store_true")
    flag(g, "cache_latents", action="store_true", help="always on (to <output_dir>/cache)")
    flag(g, "cache_latents_to_disk", action="store_true", help="always on")
    flag(g, "vae_batch_size", type=int, default=1)
    flag(g, "max_token_length", type=int, help="no effect: 77-token windows")
    for name in ("caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step", "face_crop_aug_range",
                 "dataset_class"):
        flag(g, name, help=argparse.SUPPRESS)

    g = parser.add_argument_group("training (kohya train_util.add_training_arguments)")
    flag(g, "output_dir", metavar="DIR", help="where models, checkpoints and samples go")
    flag(g, "output_name", metavar="NAME", help="model file name: NAME-000001.safetensors per epoch, NAME.safetensors")
    flag(g, "save_precision", choices=["float", "fp16", "bf16"], help="dtype of the saved model (default: float)")
    flag(g, "save_every_n_epochs", type=int, metavar="N")
    flag(g, "save_every_n_steps", type=int, metavar="N")
    flag(g, "save_last_n_epochs", type=int, metavar="N", help="keep only the last N per-epoch files of this run")
    flag(g, "save_state", action="store_true", help="always on: every checkpoint is resumable")
    flag(g, "resume", metavar="DIR", help="a cascade_lab checkpoint folder or output folder, or 'auto'")
    flag(g, "train_batch_size", type=int, default=1)
    flag(g, "max_train_steps", type=int, default=1600)
    flag(g, "max_train_epochs", type=int, metavar="N", help="wins over --max_train_steps")
    flag(g, "max_data_loader_n_workers", type=int, default=8, help="no effect (no DataLoader workers)")
    flag(g, "persistent_data_loader_workers", action="store_true", help="no effect")
    flag(g, "seed", type=int, help="default: a random seed, printed")
    flag(g, "gradient_checkpointing", action="store_true")
    flag(g, "gradient_accumulation_steps", type=int, default=1)
    flag(g, "mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="fp16 is refused for Stage C")
    flag(g, "full_bf16", action="store_true", help="fp32 master weights under bf16 autocast instead")
    flag(g, "full_fp16", action="store_true", help="refused")
    flag(g, "fp8_base", action="store_true", help="no effect")
    for name in ("xformers", "sdpa", "mem_eff_attn", "lowram", "highvram", "v_parameterization", "zero_terminal_snr"):
        flag(g, name, action="store_true", help="no effect")
    for name in ("logging_dir", "log_with", "log_prefix", "log_tracker_name", "wandb_run_name", "wandb_api_key",
                 "vae", "console_log_level", "console_log_file", "metadata_title", "metadata_author",
                 "metadata_description", "metadata_license", "metadata_tags", "tokenizer_cache_dir", "config_file"):
        flag(g, name, help=argparse.SUPPRESS)
    for name in ("ddp_timeout", "clip_skip", "min_timestep", "max_timestep", "multires_noise_iterations",
                 "save_n_epoch_ratio", "save_last_n_epochs_state"):
        flag(g, name, type=int, help=argparse.SUPPRESS)
    for name in ("noise_offset", "multires_noise_discount", "adaptive_noise_scale", "ip_noise_gamma",
                 "min_snr_gamma"):
        flag(g, name, type=float, help=argparse.SUPPRESS)
    for name in ("console_log_simple", "output_config", "use_safetensors", "train_text_encoder"):
        flag(g, name, action="store_true", help=argparse.SUPPRESS)
    flag(g, "learning_rate_te1", type=float, help=argparse.SUPPRESS)

    g = parser.add_argument_group("sample images (kohya train_util.add_training_arguments)")
    flag(g, "sample_prompts", metavar="FILE", help=".txt/.toml/.json prompt file (kohya grammar)")
    flag(g, "sample_every_n_steps", type=int, metavar="N")
    flag(g, "sample_every_n_epochs", type=int, metavar="N", help="wins over --sample_every_n_steps")
    flag(g, "sample_at_first", action="store_true")
    flag(g, "sample_sampler", help="no effect: Stable Cascade's DDPM sampler")

    g = parser.add_argument_group("optimizer (kohya train_util.add_optimizer_arguments)")
    flag(g, "optimizer_type", default="", help="AdamW (default) or Adafactor")
    flag(g, "optimizer_args", nargs="*", default=[], metavar="KEY=VALUE")
    flag(g, "learning_rate", type=float, default=2e-6, help="kohya default 2e-6 (its README uses 1e-4)")
    flag(g, "max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    flag(g, "lr_scheduler", default="constant")
    flag(g, "lr_warmup_steps", type=int, default=0)
    flag(g, "lr_scheduler_num_cycles", type=int, help=argparse.SUPPRESS)
    flag(g, "lr_scheduler_power", type=float, help=argparse.SUPPRESS)

    g = parser.add_argument_group("LoRA (kohya stable_cascade_train_c_network.py)")
    flag(g, "network_module", help="networks.lora: train a LoRA (else a full fine-tune)")
    flag(g, "network_dim", type=int, help="rank (default 4)")
    flag(g, "network_alpha", type=float, default=1.0, help="alpha (default 1; 0 means alpha = rank)")
    flag(g, "network_args", nargs="*", default=[], metavar="KEY=VALUE", help="target=attention|all_linear")
    flag(g, "network_train_unet_only", action="store_true", help="always: only Stage C gets a LoRA")
    flag(g, "network_train_text_encoder_only", action="store_true", help="refused")
    flag(g, "network_weights", help="refused")
    flag(g, "network_dropout", type=float, help="no effect")
    flag(g, "unet_lr", type=float, help="LoRA learning rate (wins over --learning_rate)")
    flag(g, "text_encoder_lr", type=float, help="no effect: no text-encoder LoRA")
    flag(g, "save_model_as", choices=["safetensors", "ckpt", "pt"], help="always safetensors")
    flag(g, "training_comment", help=argparse.SUPPRESS)
    flag(g, "no_metadata", action="store_true", help=argparse.SUPPRESS)
    flag(g, "scale_weight_norms", type=float, help=argparse.SUPPRESS)
    flag(g, "dim_from_weights", action="store_true", help=argparse.SUPPRESS)
    flag(g, "base_weights", nargs="*", help=argparse.SUPPRESS)
    flag(g, "base_weights_multiplier", nargs="*", help=argparse.SUPPRESS)

    g = parser.add_argument_group("cascade_lab")
    flag(g, "overwrite", action="store_true", help="start afresh in an output folder holding a previous run")
    flag(g, "model", help="a variant (lite_bf16, tiny, demo, ...) for the parts given no path")
    flag(g, "training_scale", choices=["kohya", "official"], default="kohya",
         help="kohya: EfficientNet sees the bucket as is (1024 px -> 32x32); official: 0.75x (-> 24x24)")
    flag(g, "device", help="default: cuda of this process's local rank, else cpu")
    flag(g, "quiet", action="store_true", help="no progress lines")
    return parser


def _given(argv: Sequence[str]) -> list[str]:
    """The long flags written on the command line, in order (``--a=b`` counted as ``--a``)."""
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]


def _values(argv: Sequence[str], name: str) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith(f"--{name}="):
            out.append(a.split("=", 1)[1])
    return out


def _unknown_error(parser: argparse.ArgumentParser, unknown: list[str]) -> ConfigError:
    known = [s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")]
    hints = []
    flags = [u for u in unknown if u.startswith("-")]
    for item in flags or unknown:  # the values of an unknown flag are not named again
        name = item[2:].split("=", 1)[0] if item.startswith("--") else item
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hints.append(f"{item!r}" + (f" (did you mean --{close[0]}?)" if close else ""))
    return ConfigError(f"unknown argument(s) {', '.join(hints)}; `cascade-lab train --help` lists the flags")


def _peek_dataset(path: str | None) -> set[str]:
    """Keys set to true anywhere in a dataset TOML (to know whether caching can hold)."""
    if not path or not os.path.isfile(path):
        return set()
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        tables = tomllib.loads(open(path, encoding="utf-8").read())
    except Exception:  # reported with the file's name when the dataset is read
        return set()
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if v is True:
                    found.add(k)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(tables)
    return found


def parse_kohya(argv: Sequence[str], environ: dict[str, str] | None = None) -> tuple[dict[str, Any], list[str],
                                                                                      bool]:
    """(TrainConfig fields, notices, quiet) from kohya's command line (an optional script name first)."""
    environ = dict(os.environ if environ is None else environ)
    argv = list(argv)
    notices: list[str] = []
    mode = None
    if argv and not argv[0].startswith("-") and os.path.basename(argv[0]) in SCRIPTS:
        mode = SCRIPTS[os.path.basename(argv.pop(0))]
    if "-" in argv:
        argv = [a for a in argv if a != "-"]
        notices.append("a lone '-' (kohya's README command has one): kohya stops with \"unrecognized arguments: -\"; "
                       "cascade_lab ignores it")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if any(u.endswith(".toml") and not u.startswith("-") for u in unknown):
        raise ConfigError("a training TOML goes alone: `cascade-lab train CONFIG.toml --set key=value` (e.g. --set "
                          "overwrite=true); kohya's flags go without a TOML (the dataset TOML is --dataset_config)")
    if unknown:
        raise _unknown_error(parser, unknown)
    given = _given(argv)
    for name in dict.fromkeys(given):
        count = given.count(name)
        if count > 1:
            values = _values(argv, name)
            shown = ", ".join(values) if values else f"{count} times"
            notices.append(f"--{name} given {count} times ({shown}): kohya's argparse keeps the last; so does "
                           "cascade_lab")
    for name in dict.fromkeys(given):
        if name in REFUSED:
            raise ConfigError(f"--{name}: {REFUSED[name]}")
    for name in dict.fromkeys(given):
        if name in NO_EFFECT and name not in ("save_text_model",):
            notices.append(f"--{name}: {NO_EFFECT[name].replace('%%', '%')}")
    if "save_text_model" in given:
        notices.append(f"--save_text_model: {NO_EFFECT['save_text_model']}")
    if args.persistent_data_loader_workers and args.max_data_loader_n_workers == 0:
        notices.append("--persistent_data_loader_workers with --max_data_loader_n_workers 0: kohya's DataLoader stops "
                       "with \"persistent_workers option needs num_workers > 0\"; cascade_lab has no workers and runs")
    accel = environ.get("ACCELERATE_MIXED_PRECISION")
    if accel:
        script = args.mixed_precision if "mixed_precision" in given else "no (the script's default)"
        notices.append(f"--mixed_precision {accel} given to accelerate and {script} to the script: kohya hands the "
                       "script's value to Accelerator, which wins over accelerate's; cascade_lab trains with the "
                       f"script's ({args.mixed_precision})")

    network = args.network_module is not None
    if mode == "full" and network:
        raise ConfigError("--network_module with stable_cascade_train_stage_c.py: kohya's full fine-tune script has "
                          "no LoRA; use stable_cascade_train_c_network.py (or leave the script name out)")
    if mode == "lora" and not network:
        raise ConfigError("stable_cascade_train_c_network.py needs --network_module networks.lora (kohya: required)")
    if network and args.network_module != "networks.lora":
        raise ConfigError(f"--network_module {args.network_module}: cascade_lab trains networks.lora (kohya's LoRA) "
                          "only")
    if not args.stage_c_checkpoint_path and not args.model:
        raise ConfigError("--stage_c_checkpoint_path is required (kohya), or name a cascade_lab variant with --model")
    if not args.effnet_checkpoint_path and not args.model:
        raise ConfigError("--effnet_checkpoint_path is required (kohya), or name a cascade_lab variant with --model")
    if not args.output_dir:
        raise ConfigError("--output_dir is required: where the model, checkpoints and samples go")
    if not args.dataset_config and not args.train_data_dir:
        raise ConfigError("no data: give --dataset_config (a kohya dataset TOML) or --train_data_dir")
    if args.dataset_config and args.train_data_dir:
        notices.append("--train_data_dir with --dataset_config: kohya ignores --train_data_dir; so does cascade_lab")
    seed = args.seed
    if seed is None:
        seed = random.randrange(2**31)
        notices.append(f"no --seed: kohya leaves the run unseeded; cascade_lab drew seed {seed} (give --seed {seed} "
                       "to repeat this run)")
    save_precision = {"float": "fp32", "bf16": "bf16", "fp16": "bf16", None: "fp32"}[args.save_precision]
    if args.save_precision == "fp16":
        notices.append("--save_precision fp16: Stage C overflows in float16; cascade_lab saves bf16")
    if network and args.save_model_as is None:
        notices.append("no --save_model_as: kohya's LoRA script stops at its first save (TypeError, the option "
                       "defaults to None); cascade_lab writes .safetensors")
    elif args.save_model_as not in (None, "safetensors"):
        notices.append(f"--save_model_as {args.save_model_as}: cascade_lab writes .safetensors only")
    if network and not args.network_train_unet_only:
        notices.append("no --network_train_unet_only: kohya also trains a text-encoder LoRA (it stays zero with "
                       "cached text outputs); cascade_lab trains the Stage C LoRA only")
    if args.text_encoder_lr is not None:
        notices.append("--text_encoder_lr: no effect, there is no text-encoder LoRA")
    if args.mixed_precision == "fp16":
        raise ConfigError("--mixed_precision fp16: Stage C overflows in float16 (official readme; kohya's README "
                          "warns it may be unstable); use --mixed_precision bf16")
    if not args.text_model_checkpoint_path:
        notices.append("no --text_model_checkpoint_path: kohya downloads the laion CLIP-G on every run; "
                       "cascade_lab uses the text encoder of the model's variant (found locally, no download)")
    optimizer = (args.optimizer_type or "AdamW").lower()
    if optimizer not in ("adamw", "adafactor"):
        raise ConfigError(f"--optimizer_type {args.optimizer_type}: cascade_lab has AdamW and Adafactor")
    target = "all_linear"
    for item in args.network_args:
        key, sep, value = item.partition("=")
        if key.strip() == "target" and value.strip() in ("attention", "all_linear"):
            target = value.strip()
        else:
            notices.append(f"--network_args {item}: not implemented (keys: target=attention|all_linear)")
    resolution: Any = None
    if args.resolution:
        parts = [int(p) for p in str(args.resolution).split(",")]
        resolution = parts[0] if len(parts) == 1 else parts[:2]
    dataset_flags = _peek_dataset(args.dataset_config)
    random_crop = args.random_crop or "random_crop" in dataset_flags or "color_aug" in dataset_flags
    shuffle = args.shuffle_caption or "shuffle_caption" in dataset_flags
    fields: dict[str, Any] = {
        "mode": "lora" if network else "full", "stage_c_path": args.stage_c_checkpoint_path,
        "effnet_path": args.effnet_checkpoint_path, "previewer_path": args.previewer_checkpoint_path,
        "text_encoder_path": args.text_model_checkpoint_path, "seed": seed, "device": args.device,
        "train_data_dir": None if args.dataset_config else args.train_data_dir, "dataset_config": args.dataset_config,
        "caption_extension": args.caption_extension, "num_repeats": args.dataset_repeats,
        "shuffle_caption": args.shuffle_caption, "keep_tokens": args.keep_tokens,
        "caption_dropout_rate": args.caption_dropout_rate, "flip_aug": args.flip_aug, "random_crop": args.random_crop,
        "enable_bucket": args.enable_bucket, "min_bucket_reso": args.min_bucket_reso,
        "max_bucket_reso": args.max_bucket_reso, "bucket_reso_steps": args.bucket_reso_steps,
        "bucket_no_upscale": args.bucket_no_upscale, "training_scale": args.training_scale,
        "cache_latents": not random_crop, "cache_text_encoder_outputs": not shuffle,
        "train_batch_size": args.train_batch_size, "max_train_steps": args.max_train_steps,
        "max_train_epochs": args.max_train_epochs, "learning_rate": args.unet_lr or args.learning_rate,
        "optimizer_type": optimizer, "optimizer_args": list(args.optimizer_args), "lr_scheduler": args.lr_scheduler,
        "lr_warmup_steps": args.lr_warmup_steps, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_grad_norm": args.max_grad_norm, "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing, "adaptive_loss_weight": args.adaptive_loss_weight,
        "network_dim": args.network_dim or 4, "network_alpha": args.network_alpha, "network_target": target,
        "output_dir": args.output_dir, "output_name": args.output_name, "save_every_n_steps": args.save_every_n_steps,
        "save_every_n_epochs": args.save_every_n_epochs, "save_last_n_epochs": args.save_last_n_epochs,
        "save_precision": save_precision, "resume": args.resume, "overwrite": args.overwrite,
        "sample_prompts": args.sample_prompts, "sample_every_n_steps": args.sample_every_n_steps,
        "sample_every_n_epochs": args.sample_every_n_epochs, "sample_at_first": args.sample_at_first,
    }  # fmt: skip
    if resolution is not None:
        fields["resolution"] = resolution
    if args.model:
        fields["model"] = args.model
    elif args.stage_c_checkpoint_path:
        fields["model"] = "tiny"  # a placeholder: the Stage C file decides the size (models.build_models)
    if (args.sample_every_n_epochs or args.sample_every_n_steps or args.sample_at_first) and not args.sample_prompts:
        notices.append("a --sample_every_* flag without --sample_prompts: no samples (as in kohya)")
    return fields, notices, bool(args.quiet)


def is_kohya_command(argv: Sequence[str]) -> bool:
    """True unless the arguments are cascade_lab's TOML form (``CONFIG.toml [--set K=V] [--quiet]``)."""
    if not argv:
        return False
    own = {"--set", "--quiet"}
    first = argv[0]
    if first.startswith("-"):
        return first not in own  # --help too: the kohya parser's help shows both forms
    if os.path.basename(first) in SCRIPTS or first.endswith(".py"):
        return True
    return any(a.startswith("--") and a.split("=", 1)[0] not in own for a in argv[1:])


__all__ = ["NO_EFFECT", "REFUSED", "SCRIPTS", "build_parser", "is_kohya_command", "parse_kohya"]
