"""kohya's command line, accepted as it is: the flags of ``stable_cascade_train_stage_c.py`` (full fine-tune) and
``stable_cascade_train_c_network.py`` (LoRA) from kohya sd-scripts' ``stable-cascade`` branch, read with kohya's
meanings and defaults into `TrainConfig` fields (the flags themselves: `kohya_flags`).

A flag that cascade_lab honours differently, that has no effect, or that is broken or contradictory in kohya's
published example gets one notice saying what kohya would do and what cascade_lab does (``docs/training.md`` lists
them). An unknown flag is an error naming the closest real one. No torch import here.
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
from .kohya_flags import NO_EFFECT, REFUSED, SCRIPTS, build_parser

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


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


def _config_file(argv: Sequence[str], parser: argparse.ArgumentParser, notices: list[str]) -> dict[str, Any]:
    """kohya's ``--config_file``: a TOML of flag values (``.toml`` added when missing), its sections flattened, as
    kohya reads it; its values stand where the defaults would (the command line wins). Keys that are no flag are
    named in a notice (kohya keeps them silently)."""
    values = _values(argv, "config_file")
    if not values:
        return {}
    path = values[-1] if values[-1].endswith(".toml") else values[-1] + ".toml"
    if not os.path.isfile(path):
        raise ConfigError(f"--config_file {values[-1]}: {path} is not a file (kohya adds .toml to a name without it)")
    try:
        with open(path, "rb") as f:
            tables = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config_file {path}: not a readable TOML ({exc})") from None
    flat: dict[str, Any] = {}
    for key, value in tables.items():  # kohya: every section's keys at one level, section names dropped
        flat.update(value if isinstance(value, dict) else {key: value})
    known = {a.dest for a in parser._actions}
    unknown = [k for k in flat if k not in known]
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        notices.append(f"--config_file {path}: {key!r} is no kohya flag" + (f" (did you mean {close[0]}?)" if close
                                                                          else "") + "; kohya keeps it unused, so "
                       "does cascade_lab")
    flat.pop("config_file", None)
    return {k: v for k, v in flat.items() if k in known}


def _peek_dataset(path: str | None) -> set[str]:
    """Keys set to true or to a positive number anywhere in a dataset TOML (to know whether caching can hold)."""
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
                if v is True or (type(v) in (int, float) and v > 0):
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
    from_file = _config_file(argv, parser, notices)
    args, unknown = parser.parse_known_args(argv, namespace=argparse.Namespace(**from_file))
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
    given += [name for name in from_file if name not in given]  # a value from --config_file is given too
    for name in dict.fromkeys(given):
        if name in REFUSED:
            raise ConfigError(f"--{name}: {REFUSED[name]}")
    for name in dict.fromkeys(given):
        if name in NO_EFFECT:
            notices.append(f"--{name}: {NO_EFFECT[name]}")
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
    stage = str(args.stage).lower()
    if stage == "b":
        for name, what in (("stage_b_checkpoint_path", "the Stage B to train"),
                           ("stage_a_checkpoint_path", "Stage A, the target encoder")):
            if not getattr(args, name) and not args.model:
                raise ConfigError(f"--stage b needs --{name} ({what}), or name a cascade_lab variant with --model")
    elif not args.stage_c_checkpoint_path and not args.model:
        raise ConfigError("--stage_c_checkpoint_path is required (kohya), or name a cascade_lab variant with --model")
    if not args.effnet_checkpoint_path and not args.model:
        raise ConfigError("--effnet_checkpoint_path is required (kohya), or name a cascade_lab variant with --model")
    if not args.output_dir:
        raise ConfigError("--output_dir is required: where the model, checkpoints and samples go")
    if args.in_json and not args.dataset_config and not args.train_data_dir:
        raise ConfigError(f"--in_json {args.in_json} without --train_data_dir: give --train_data_dir, the folder of "
                          "the images its keys name (kohya stops with \"expected str ... image_dir\")")
    if not args.dataset_config and not args.train_data_dir:
        raise ConfigError("no data: give --dataset_config (a kohya dataset TOML) or --train_data_dir")
    if args.dataset_config and args.train_data_dir:
        notices.append("--train_data_dir with --dataset_config: kohya ignores --train_data_dir; so does cascade_lab")
    if args.dataset_config and args.in_json:
        notices.append("--in_json with --dataset_config: kohya ignores --in_json; so does cascade_lab (a subset's "
                       "metadata_file names the JSON there)")
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
                       f"cached text outputs); cascade_lab trains the Stage {stage.upper()} LoRA only")
    if args.text_encoder_lr is not None:
        notices.append("--text_encoder_lr: no effect, there is no text-encoder LoRA")
    if args.mixed_precision == "fp16":
        raise ConfigError("--mixed_precision fp16: Stage C overflows in float16 (official readme; kohya's README "
                          "warns it may be unstable); use --mixed_precision bf16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise ConfigError(f"--full_bf16 with --mixed_precision {args.mixed_precision}: bf16 weights need bf16 compute "
                          "(kohya asserts \"full_bf16 requires mixed precision='bf16'\"); add --mixed_precision bf16")
    if args.full_bf16 and args.bf16_rounding == "stochastic":
        notices.append("--full_bf16: weights and gradients in bf16 as in kohya, but the updated weights are rounded "
                       "stochastically (kohya rounds to the nearest, so updates below half a bf16 step are lost); "
                       "--bf16_rounding nearest for kohya's")
    if not args.text_model_checkpoint_path:
        notices.append("no --text_model_checkpoint_path: kohya downloads the laion CLIP-G on every run; "
                       "cascade_lab uses the text encoder of the model's variant (found locally, no download)")
    caption_extension = args.caption_extension
    if args.caption_extention is not None:  # kohya: the misspelt flag wins when given
        caption_extension = args.caption_extention
        if "caption_extension" in given and args.caption_extension != args.caption_extention:
            notices.append(f"--caption_extention {args.caption_extention} and --caption_extension "
                           f"{args.caption_extension}: kohya uses the misspelt one; so does cascade_lab")
    if not args.output_name:
        notices.append("no --output_name: files are named as kohya names them (epoch-000001, at-step00000500, "
                       "last.safetensors)")
    if args.save_last_n_steps is not None and not args.save_every_n_steps:
        notices.append("--save_last_n_steps without --save_every_n_steps: no effect (there are no step saves to "
                       "prune, as in kohya)")
    optimizer = _optimizer_type(args)
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and (args.lr_warmup_steps or args.lr_scheduler_type or args.lr_scheduler == "piecewise_constant"):
        notices.append(f"{world} processes: kohya's schedule is stepped {world} times per optimizer step (accelerate) "
                       f"over max_train_steps x {world}, so its warm-up and any step counts of --lr_scheduler_args "
                       f"take 1/{world} of the optimizer steps they name; cascade_lab steps it once per optimizer "
                       "step, as the numbers say")
    target = "all_linear"
    network_args: dict[str, float] = {}
    for item in args.network_args:
        key, sep, value = item.partition("=")
        if key.strip() == "target" and value.strip() in ("attention", "all_linear"):
            target = value.strip()
        elif key.strip() in ("rank_dropout", "module_dropout"):
            try:
                network_args[key.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"--network_args {item}: {key.strip()} takes a probability, e.g. "
                                  f"{key.strip()}=0.1") from None
        else:
            notices.append(f"--network_args {item}: not implemented (keys: target=attention|all_linear, "
                           "rank_dropout, module_dropout)")
    dropouts = [f"--network_dropout {args.network_dropout}"] if args.network_dropout else []
    dropouts += [f"{k}={v:g}" for k, v in network_args.items() if v]
    if args.dim_from_weights and dropouts:
        notices.append(f"--dim_from_weights with {', '.join(dropouts)}: kohya builds the network from the file "
                       "without its dropouts (they are silently off); cascade_lab applies them")
    resolution: Any = None
    if args.resolution:
        try:
            parts = [int(p) for p in str(args.resolution).split(",")]
        except ValueError:
            raise ConfigError(f"--resolution {args.resolution}: use a size in pixels, e.g. 1024 or 1024,768 "
                              "(width,height)") from None
        resolution = parts[0] if len(parts) == 1 else parts[:2]
    dataset_flags = _peek_dataset(args.dataset_config)
    random_crop = args.random_crop or "random_crop" in dataset_flags or "color_aug" in dataset_flags
    shuffle = args.shuffle_caption or "shuffle_caption" in dataset_flags  # captions that vary: no text cache
    varies = (shuffle or args.caption_tag_dropout_rate > 0 or args.token_warmup_step > 0
              or bool({"caption_tag_dropout_rate", "token_warmup_step"} & dataset_flags))
    fields: dict[str, Any] = {
        "stage": stage, "stage_b_path": args.stage_b_checkpoint_path, "stage_a_path": args.stage_a_checkpoint_path,
        "mode": "lora" if network else "full", "stage_c_path": args.stage_c_checkpoint_path,
        "effnet_path": args.effnet_checkpoint_path, "previewer_path": args.previewer_checkpoint_path,
        "text_encoder_path": args.text_model_checkpoint_path, "seed": seed, "device": args.device,
        "strategy": args.strategy,
        "train_data_dir": None if args.dataset_config else args.train_data_dir, "dataset_config": args.dataset_config,
        "in_json": None if args.dataset_config else args.in_json,
        "caption_extension": caption_extension, "num_repeats": args.dataset_repeats,
        "shuffle_caption": args.shuffle_caption, "keep_tokens": args.keep_tokens,
        "keep_tokens_separator": args.keep_tokens_separator, "caption_separator": args.caption_separator,
        "caption_prefix": args.caption_prefix or "", "caption_suffix": args.caption_suffix or "",
        "caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "caption_dropout_rate": args.caption_dropout_rate, "flip_aug": args.flip_aug, "random_crop": args.random_crop,
        "caption_tag_dropout_rate": args.caption_tag_dropout_rate, "token_warmup_min": args.token_warmup_min,
        "token_warmup_step": args.token_warmup_step, "long_captions": "kohya",
        "max_token_length": args.max_token_length,
        "enable_bucket": args.enable_bucket, "min_bucket_reso": args.min_bucket_reso,
        "max_bucket_reso": args.max_bucket_reso, "bucket_reso_steps": args.bucket_reso_steps,
        "bucket_no_upscale": args.bucket_no_upscale, "training_scale": args.training_scale,
        "cache_latents": not random_crop, "cache_text_encoder_outputs": not varies,
        "train_batch_size": args.train_batch_size, "max_train_steps": args.max_train_steps,
        "max_train_epochs": args.max_train_epochs, "learning_rate": args.unet_lr or args.learning_rate,
        "optimizer_type": optimizer, "optimizer_args": list(args.optimizer_args), "lr_scheduler": args.lr_scheduler,
        "lr_scheduler_num_cycles": args.lr_scheduler_num_cycles, "lr_scheduler_power": args.lr_scheduler_power,
        "lr_scheduler_type": args.lr_scheduler_type, "lr_scheduler_args": list(args.lr_scheduler_args or []),
        "lr_warmup_steps": args.lr_warmup_steps, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_grad_norm": args.max_grad_norm, "mixed_precision": args.mixed_precision,
        "full_bf16": bool(args.full_bf16), "bf16_rounding": args.bf16_rounding,
        "gradient_checkpointing": args.gradient_checkpointing,
        "gradient_checkpointing_mode": args.gradient_checkpointing_mode,
        "adaptive_loss_weight": args.adaptive_loss_weight,
        "network_dim": args.network_dim or 4, "network_alpha": args.network_alpha, "network_target": target,
        "network_dropout": args.network_dropout, **network_args, "scale_weight_norms": args.scale_weight_norms,
        "network_weights": args.network_weights, "dim_from_weights": args.dim_from_weights,
        "output_dir": args.output_dir, "output_name": args.output_name, "kohya_file_names": True,
        "save_every_n_steps": args.save_every_n_steps,
        "save_every_n_epochs": args.save_every_n_epochs, "save_last_n_epochs": args.save_last_n_epochs,
        "save_last_n_steps": args.save_last_n_steps,
        "save_precision": save_precision, "resume": args.resume, "overwrite": args.overwrite,
        "sample_prompts": args.sample_prompts, "sample_every_n_steps": args.sample_every_n_steps,
        "sample_every_n_epochs": args.sample_every_n_epochs, "sample_at_first": args.sample_at_first,
    }  # fmt: skip
    if resolution is not None:
        fields["resolution"] = resolution
    if args.model:
        fields["model"] = args.model
    elif args.stage_c_checkpoint_path or args.stage_b_checkpoint_path:
        fields["model"] = "tiny"  # a placeholder: the trained stage's file decides the size (models.build_models)
    if (args.sample_every_n_epochs or args.sample_every_n_steps or args.sample_at_first) and not args.sample_prompts:
        notices.append("a --sample_every_* flag without --sample_prompts: no samples (as in kohya)")
    return fields, notices, bool(args.quiet)


def _optimizer_type(args: argparse.Namespace) -> str:
    """--optimizer_type with kohya's old aliases --use_8bit_adam (AdamW8bit) and --use_lion_optimizer (Lion)."""
    given = args.optimizer_type or ""
    if args.use_8bit_adam and args.use_lion_optimizer:
        raise ConfigError("--use_8bit_adam and --use_lion_optimizer both given (kohya stops too): keep one, or write "
                          "--optimizer_type AdamW8bit / Lion")
    for flag, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if getattr(args, flag):
            if given:
                raise ConfigError(f"--{flag} and --optimizer_type {given} both given (kohya stops too): --{flag} is "
                                  f"kohya's old spelling of --optimizer_type {name}; keep one")
            return name.lower()
    if not given:
        return "adamw"
    from .optimizers import KINDS, OWN

    return given.lower() if given.lower() in OWN or given.lower() in KINDS else given  # a class path keeps its case


def is_kohya_command(argv: Sequence[str]) -> bool:
    """True unless the arguments are cascade_lab's TOML form (``CONFIG.toml [--set K=V] [--strategy S] [--quiet]``)."""
    if not argv:
        return False
    own = {"--set", "--quiet", "--strategy"}
    first = argv[0]
    if first.startswith("-"):
        return first not in own  # --help too: the kohya parser's help shows both forms
    if os.path.basename(first) in SCRIPTS or first.endswith(".py"):
        return True
    return any(a.startswith("--") and a.split("=", 1)[0] not in own for a in argv[1:])


__all__ = ["NO_EFFECT", "REFUSED", "SCRIPTS", "build_parser", "is_kohya_command", "parse_kohya"]
