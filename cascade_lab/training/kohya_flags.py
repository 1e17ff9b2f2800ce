"""kohya's Stage C flags in kohya's groups (``add_*_arguments`` of its ``stable-cascade`` branch), with kohya's
defaults, and what cascade_lab does with those it does not honour. No torch import here.
"""

from __future__ import annotations

import argparse
from typing import Any

from .config import BF16_ROUNDINGS, KOHYA_TOKEN_LENGTHS

SCRIPTS = {"stable_cascade_train_stage_c.py": "full", "stable_cascade_train_c_network.py": "lora"}

# flags kohya accepts that change nothing here: flag -> what cascade_lab does instead
NO_EFFECT = {
    "max_data_loader_n_workers": "cascade_lab reads cached latents and text in the training process; there are no "
                                 "DataLoader workers to start",
    "persistent_data_loader_workers": "there are no DataLoader workers to keep alive (latents and text are cached)",
    "xformers": "attention runs through PyTorch's scaled_dot_product_attention, dropout only while training",
    "sdpa": "attention always runs through PyTorch's scaled_dot_product_attention (kohya's --sdpa also drops out "
            "10 % of attention at sampling; cascade_lab only while training)",
    "mem_eff_attn": "attention always runs through PyTorch's scaled_dot_product_attention",
    "no_half_vae": "EfficientNet always runs in float32",
    "lowram": "models are loaded memory-lean (meta device, read straight into place) anyway",
    "highvram": "latents are cached on disk and in memory anyway",
    "cache_latents": "latents are always cached (to <output_dir>/cache) unless random_crop/color_aug need otherwise",
    "cache_latents_to_disk": "latents are always cached to disk (<output_dir>/cache)",
    "cache_text_encoder_outputs": "text embeddings are always cached unless shuffle_caption, caption_tag_dropout_rate "
                                  "or token_warmup_step need otherwise",
    "cache_text_encoder_outputs_to_disk": "text embeddings are always cached to disk (<output_dir>/cache)",
    "vae_batch_size": "EfficientNet encodes 8 images at a time while caching",
    "save_state": "every checkpoint under <output_dir>/checkpoints is resumable (optimizer, scheduler, RNG, adaptive "
                  "loss buckets)",
    "save_text_model": "kohya's training scripts ignore it too; no text model is written",
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
    "fp8_base": "the frozen base stays in the --mixed_precision dtype",
    "dataset_class": "datasets are kohya dataset TOMLs or folders",
    "console_log_level": "Python's warnings are used", "console_log_file": "Python's warnings are used",
    "console_log_simple": "Python's warnings are used",
    "metadata_title": "modelspec.title is --output_name (without it kohya's LoRA@<time> / Checkpoint@<time>)",
    "metadata_author": "not stored", "metadata_description": "not stored", "metadata_license": "not stored",
    "metadata_tags": "not stored", "tokenizer_cache_dir": "the tokenizer comes with the text encoder",
    "use_safetensors": "always safetensors",
    "face_crop_aug_range": "face crops are not implemented",
    "huggingface_repo_id": "nothing is uploaded to the Hugging Face Hub; the files are in --output_dir",
    "huggingface_repo_type": "nothing is uploaded to the Hugging Face Hub",
    "huggingface_path_in_repo": "nothing is uploaded to the Hugging Face Hub",
    "huggingface_token": "nothing is uploaded to the Hugging Face Hub",
    "huggingface_repo_visibility": "nothing is uploaded to the Hugging Face Hub",
    "save_state_to_huggingface": "nothing is uploaded to the Hugging Face Hub; checkpoints stay in --output_dir",
    "async_upload": "nothing is uploaded to the Hugging Face Hub",
    "save_last_n_steps_state": "resumable checkpoints are pruned to the last keep_checkpoints (default 2) anyway",
    "torch_compile": "training runs eagerly (kohya hands the model to accelerate's dynamo); generation compiles "
                     "with compile=True",
    "dynamo_backend": "only used with --torch_compile, which trains eagerly here",
    "ddp_gradient_as_bucket_view": "DistributedDataParallel runs with PyTorch's defaults",
    "ddp_static_graph": "DistributedDataParallel runs with PyTorch's defaults",
    "log_tracker_config": "no trackers are used; losses go to <output_dir>/run.json",
    "prior_loss_weight": "regularisation images are refused, so there is no prior loss to weight",
    "scale_v_pred_loss_like_noise_pred": "Stage C predicts noise; kohya's Stable Cascade scripts ignore it too",
    "v_pred_like_loss": "Stage C predicts noise; kohya's Stable Cascade scripts ignore it too",
    "debiased_estimation_loss": "kohya's Stable Cascade scripts ignore it too (the loss is weighted by P2 or "
                                "--adaptive_loss_weight)",
    "weighted_captions": "kohya's Stable Cascade scripts ignore it too: captions are encoded as written",
}  # fmt: skip
REFUSED = {
    "train_text_encoder": "text-encoder training is not supported (kohya's README calls it untested)",
    "learning_rate_te1": "text-encoder training is not supported",
    "network_train_text_encoder_only": "text-encoder LoRA is not supported; cascade_lab trains Stage C",
    "base_weights": "merging base LoRAs is not supported", "base_weights_multiplier": "merging is not supported",
    "full_fp16": "Stage C overflows in float16 (official readme); use --mixed_precision bf16",
    "reg_data_dir": "regularisation images are not supported",
    "output_config": "the settings of a run are stored in its checkpoints (state.pt) and run.json",
    "resume_from_huggingface": "resuming from the Hugging Face Hub is not supported; download the state and give "
                               "--resume DIR",
    "debug_dataset": "kohya shows the dataset's images and stops without training; cascade_lab has no such mode "
                     "(leave the flag out to train)",
}  # fmt: skip


def int_or_float(text: str) -> int | float:
    """kohya's ``int_or_float``: "100" is steps, "0.05" a fraction of the run."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of steps (e.g. 100) or a fraction "
                                             "(e.g. 0.05)") from None


def _flag(group: Any, name: str, **kwargs: Any) -> None:
    group.add_argument(f"--{name}", dest=name, default=kwargs.pop("default", None), **kwargs)


def build_parser(prog: str = "cascade-lab train") -> argparse.ArgumentParser:
    """kohya's flags in kohya's groups, with kohya's defaults; cascade_lab's own last."""
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog} CONFIG.toml [--set KEY=VALUE ...] [--strategy ddp|fsdp] | {prog} [SCRIPT.py] --kohya_flag ..."
              f"\n       {prog} export CHECKPOINT -o FILE | {prog} plan [--variant full lite] [--gpus 1 2 4 8] ...",
        description="Fine-tune Stage C (or Stage B: --stage b) from a cascade_lab TOML (`cascade_lab.training."
                    "TrainConfig` fields) or from "
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
    flag(g, "in_json", metavar="JSON", help="kohya's metadata JSON (captions, tags, train_resolution) of the images "
         "in --train_data_dir")
    flag(g, "reg_data_dir", metavar="DIR", help="refused: regularisation images")
    flag(g, "resolution", metavar="W[,H]", help="bucket area side in pixels (kohya: required without a TOML)")
    flag(g, "caption_extension", default=".caption", help="caption file extension (kohya default .caption)")
    flag(g, "caption_extention", help="kohya's old misspelling of --caption_extension (wins when given, as in kohya)")
    flag(g, "caption_separator", default=",", help="separator of caption tokens for shuffle_caption / keep_tokens")
    flag(g, "keep_tokens_separator", default="", help="tokens before it are never shuffled")
    flag(g, "caption_prefix", help="text put before every caption")
    flag(g, "caption_suffix", help="text put after every caption")
    flag(g, "caption_dropout_every_n_epochs", type=int, default=0, help="every Nth epoch trains with empty captions")
    flag(g, "debug_dataset", action="store_true", help="refused: kohya shows the dataset instead of training")
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
    # kohya's Stable Cascade scripts add these through sdxl_train_util.add_sdxl_training_arguments
    flag(g, "cache_text_encoder_outputs", action="store_true",
         help="always on (unless shuffle_caption, tag dropout or token warm-up)")
    flag(g, "cache_text_encoder_outputs_to_disk", action="store_true", help="always on")
    flag(g, "vae_batch_size", type=int, default=1)
    flag(g, "max_token_length", type=int, choices=KOHYA_TOKEN_LENGTHS,
         help="captions up to 150 or 225 CLIP tokens in 2 or 3 windows, joined as kohya joins them (default: the "
              "first 75)")
    flag(g, "caption_tag_dropout_rate", type=float, default=0.0,
         help="drop each tag after the kept ones with this probability")
    flag(g, "token_warmup_min", type=int, default=1, help="tags kept at step 0 (with --token_warmup_step)")
    flag(g, "token_warmup_step", type=int_or_float, default=0,
         help="all tags from this optimizer step on (below 1: a fraction of the run); 0: no warm-up")
    for name in ("face_crop_aug_range", "dataset_class"):
        flag(g, name, help=argparse.SUPPRESS)

    g = parser.add_argument_group("training (kohya train_util.add_training_arguments)")
    flag(g, "output_dir", metavar="DIR", help="where models, checkpoints and samples go")
    flag(g, "config_file", metavar="TOML", help="kohya's TOML of these flags (sections ignored); the command line "
         "wins over it")
    flag(g, "output_name", metavar="NAME", help="model file name: NAME-000001.safetensors per epoch, NAME.safetensors "
         "(none: kohya's epoch-000001, at-step00000500, last.safetensors)")
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
    flag(g, "full_bf16", action="store_true", help="trained weights and gradients in bf16 (needs --mixed_precision "
         "bf16); updates rounded stochastically (--bf16_rounding)")
    flag(g, "full_fp16", action="store_true", help="refused")
    flag(g, "fp8_base", action="store_true", help="no effect")
    flag(g, "no_half_vae", action="store_true", help="no effect: EfficientNet runs in float32")
    flag(g, "save_last_n_steps", type=int, metavar="N",
         help="with --save_every_n_steps: keep only this run's step files of the last N steps")
    flag(g, "torch_compile", action="store_true", help="no effect: training runs eagerly")
    flag(g, "dynamo_backend", default="inductor", help="no effect (only with --torch_compile)")
    flag(g, "prior_loss_weight", type=float, default=1.0, help="no effect: no regularisation images")
    for name in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                 "huggingface_repo_visibility", "log_tracker_config"):
        flag(g, name, help=argparse.SUPPRESS)
    for name in ("save_state_to_huggingface", "resume_from_huggingface", "async_upload", "ddp_gradient_as_bucket_view",
                 "ddp_static_graph"):
        flag(g, name, action="store_true", help=argparse.SUPPRESS)
    flag(g, "save_last_n_steps_state", type=int, help=argparse.SUPPRESS)
    for name in ("xformers", "sdpa", "mem_eff_attn", "lowram", "highvram", "v_parameterization", "zero_terminal_snr"):
        flag(g, name, action="store_true", help="no effect")
    for name in ("logging_dir", "log_with", "log_prefix", "log_tracker_name", "wandb_run_name", "wandb_api_key",
                 "vae", "console_log_level", "console_log_file", "metadata_title", "metadata_author",
                 "metadata_description", "metadata_license", "metadata_tags", "tokenizer_cache_dir"):
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
    flag(g, "optimizer_type", default="", help="AdamW (default), Adafactor, Lion, SGDNesterov, Prodigy, DAdaptation, "
         "DAdaptAdaGrad, DAdaptAdam, DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, AdamW8bit, PagedAdamW, "
         "PagedAdamW8bit, PagedAdamW32bit, Lion8bit, PagedLion8bit, SGDNesterov8bit (bitsandbytes), a torch.optim "
         "class (RAdam) or package.module.Class")
    flag(g, "optimizer_args", nargs="*", default=[], metavar="KEY=VALUE")
    flag(g, "learning_rate", type=float, default=2e-6, help="kohya default 2e-6 (its README uses 1e-4)")
    flag(g, "max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    flag(g, "lr_scheduler", default="constant", help="constant, constant_with_warmup, linear, cosine, "
         "cosine_with_restarts, polynomial, piecewise_constant (step_rules in --lr_scheduler_args), adafactor")
    flag(g, "lr_warmup_steps", type=int_or_float, default=0,
         help="optimizer steps, or a fraction of the run below 1 (e.g. 0.05)")
    flag(g, "lr_scheduler_type", default="", help="a torch.optim.lr_scheduler class (CosineAnnealingLR) or "
         "package.module.Class, built with --lr_scheduler_args; wins over --lr_scheduler")
    flag(g, "lr_scheduler_args", nargs="*", default=[], metavar="KEY=VALUE", help="for --lr_scheduler_type (e.g. "
         "T_max=100), or piecewise_constant's step_rules")
    flag(g, "use_8bit_adam", action="store_true", help="kohya's old spelling of --optimizer_type AdamW8bit")
    flag(g, "use_lion_optimizer", action="store_true", help="kohya's old spelling of --optimizer_type Lion")
    flag(g, "lr_scheduler_num_cycles", type=int, default=1, help="cosine_with_restarts' cycles")
    flag(g, "lr_scheduler_power", type=float, default=1.0, help="polynomial's exponent")

    g = parser.add_argument_group("LoRA (kohya stable_cascade_train_c_network.py)")
    flag(g, "network_module", help="networks.lora: train a LoRA (else a full fine-tune)")
    flag(g, "network_dim", type=int, help="rank (default 4)")
    flag(g, "network_alpha", type=float, default=1.0, help="alpha (default 1; 0 means alpha = rank)")
    flag(g, "network_args", nargs="*", default=[], metavar="KEY=VALUE",
         help="target=attention|all_linear, rank_dropout=P, module_dropout=P")
    flag(g, "network_train_unet_only", action="store_true", help="always: only Stage C gets a LoRA")
    flag(g, "network_train_text_encoder_only", action="store_true", help="refused")
    flag(g, "network_weights", metavar="FILE", help="start the LoRA from this file (kohya, cascade_lab, OneTrainer, "
         "ComfyUI or official)")
    flag(g, "dim_from_weights", action="store_true", help="rank, alpha and layers from --network_weights")
    flag(g, "network_dropout", type=float, metavar="P", help="dropout of each LoRA's down output while training")
    flag(g, "scale_weight_norms", type=float, metavar="NORM",
         help="after every step, scale each LoRA module whose alpha/rank * up @ down norm exceeds NORM down to it")
    flag(g, "unet_lr", type=float, help="LoRA learning rate (wins over --learning_rate)")
    flag(g, "text_encoder_lr", type=float, help="no effect: no text-encoder LoRA")
    flag(g, "save_model_as", choices=["safetensors", "ckpt", "pt"], help="always safetensors")
    for name in ("scale_v_pred_loss_like_noise_pred", "debiased_estimation_loss", "weighted_captions"):
        flag(g, name, action="store_true", help="no effect (kohya's Stable Cascade scripts ignore it too)")
    flag(g, "v_pred_like_loss", type=float, help="no effect (kohya's Stable Cascade scripts ignore it too)")
    flag(g, "training_comment", help=argparse.SUPPRESS)
    flag(g, "no_metadata", action="store_true", help=argparse.SUPPRESS)
    flag(g, "base_weights", nargs="*", help=argparse.SUPPRESS)
    flag(g, "base_weights_multiplier", nargs="*", help=argparse.SUPPRESS)

    g = parser.add_argument_group("cascade_lab")
    flag(g, "overwrite", action="store_true", help="start afresh in an output folder holding a previous run")
    flag(g, "stage", choices=["c", "b", "C", "B"], default="c",
         help="c: Stage C (kohya's scripts); b: Stage B with the official train_b recipe (kohya has none)")
    flag(g, "stage_b_checkpoint_path", metavar="FILE",
         help="Stage B .safetensors (the trained model with --stage b; else for sample images)")
    flag(g, "stage_a_checkpoint_path", metavar="FILE",
         help="Stage A .safetensors (the target encoder with --stage b; the decoder of sample images)")
    flag(g, "model", help="a variant (lite_bf16, tiny, demo, ...) for the parts given no path")
    flag(g, "training_scale", choices=["kohya", "official"], default="kohya",
         help="kohya: EfficientNet sees the bucket as is (1024 px -> 32x32); official: 0.75x (-> 24x24)")
    flag(g, "device", help="default: cuda of this process's local rank, else cpu")
    flag(g, "strategy", choices=["auto", "ddp", "fsdp"], default="auto",
         help="several processes: ddp, or fsdp (sharded, full fine-tunes); auto: fsdp under accelerate --use_fsdp")
    flag(g, "gradient_checkpointing_mode", choices=["auto", "full", "selective"], default="auto",
         help="with --gradient_checkpointing: full recomputes whole blocks (kohya); selective keeps their matrix "
              "products' and attention's outputs (faster, more memory); auto: selective on a CPU, full on a GPU")
    flag(g, "bf16_rounding", choices=BF16_ROUNDINGS, default="stochastic",
         help="with --full_bf16: how updated weights are rounded to bf16; stochastic (unbiased, default) or nearest "
              "(kohya: updates below half a bf16 step are lost)")
    flag(g, "quiet", action="store_true", help="no progress lines")
    return parser


__all__ = ["NO_EFFECT", "REFUSED", "SCRIPTS", "build_parser"]
