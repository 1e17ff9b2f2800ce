"""`TrainConfig`: every setting of a training run, one typed record read from kwargs or a TOML file.

Names follow kohya sd-scripts where kohya has the option (``learning_rate``, ``optimizer_args``,
``network_dim``, ``dataset_config``, ...), so a kohya command line translates key by key. Defaults are the
official Stable Cascade ones where kohya's differ (spec/training.md §8): 768 px ↔ 24×24 latents, 5 %
caption dropout, ``.txt`` captions, adaptive buckets saved with every checkpoint, safetensors output.
No torch import here: a config is checked before any model loads.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MODES = ("lora", "full")
STAGES = ("c", "b")
SCALES = ("official", "kohya")
LONG_CAPTIONS = ("windows", "truncate", "kohya")
KOHYA_TOKEN_LENGTHS = (150, 225)  # kohya's --max_token_length choices (75 content tokens per CLIP window)
OPTIMIZERS = ("adamw", "adafactor")  # built by optim.py; kohya's other names: optimizers.KINDS, or a class path
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_warmup", "linear", "cosine_with_restarts",
                 "polynomial", "piecewise_constant", "adafactor")  # "adafactor:LR" too (kohya)
NETWORK_TARGETS = ("attention", "all_linear")
PRECISIONS = ("no", "bf16")
SAVE_PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("auto", "ddp", "fsdp")
CHECKPOINTING_MODES = ("auto", "full", "selective")
BF16_ROUNDINGS = ("stochastic", "nearest")  # how full_bf16 writes updated weights (bf16_weights.Rounding)
LORA_FSDP = ("strategy='fsdp' with mode='lora' is not supported: a LoRA's low-rank branches sit beside frozen "
             "layers that cascade_lab does not shard, and its gradients and optimizer states are a few MB (the "
             "frozen base is held in the compute dtype), so DDP costs little more memory; use strategy='ddp' (or "
             "'auto') for a LoRA, 'fsdp' for mode='full'")
FULL_BF16_FSDP = ("full_bf16=true with strategy='fsdp': not supported; FSDP shards fp32 weights over the "
                  "processes and computes in bf16 with mixed_precision='bf16' (its own mixed precision), so each "
                  "process holds 1/N of them: use strategy='fsdp' without full_bf16, or full_bf16 with strategy='ddp'")
DATASET_TABLES = ("general", "datasets")  # a kohya dataset TOML may sit inside the training TOML

# Settings whose change makes an old checkpoint meaningless for resuming.
RESUME_KEYS = ("stage", "mode", "model", "network_dim", "network_alpha", "network_target", "optimizer_type",
               "gradient_accumulation_steps", "adaptive_loss_weight", "noise_shift", "seed",
               "lr_scheduler_type",  # another scheduler class cannot read the saved one's state
               "network_dropout", "rank_dropout", "module_dropout", "scale_weight_norms", "network_weights",
               "dim_from_weights", "full_bf16", "bf16_rounding",
               "long_captions", "max_token_length")


# kohya's file stems when --output_name is not given (train_util: DEFAULT_EPOCH_NAME, DEFAULT_STEP_NAME,
# DEFAULT_LAST_OUTPUT_NAME)
KOHYA_DEFAULT_STEMS = {"epoch": "epoch", "step": "at", "last": "last"}


# kohya's names for the same settings (a TOML may use either)
KOHYA_NAMES = {"stage_c_checkpoint_path": "stage_c_path", "effnet_checkpoint_path": "effnet_path",
               "previewer_checkpoint_path": "previewer_path", "text_model_checkpoint_path": "text_encoder_path",
               "stage_b_checkpoint_path": "stage_b_path", "stage_a_checkpoint_path": "stage_a_path",
               "dataset_repeats": "num_repeats"}  # fmt: skip


def kohya_names(data: dict[str, Any], source: str) -> dict[str, Any]:
    """`data` with kohya's names renamed to TrainConfig's and kohya's no-effect options dropped with a warning."""
    import warnings

    from .kohya_flags import NO_EFFECT

    out = {}
    for key, value in data.items():
        if key in KOHYA_NAMES:
            if KOHYA_NAMES[key] in data:
                raise ConfigError(f"{source}: {key!r} and {KOHYA_NAMES[key]!r} name the same setting; keep one")
            out[KOHYA_NAMES[key]] = value
        elif key in NO_EFFECT and key not in {f.name for f in fields(TrainConfig)}:
            warnings.warn(f"{source}: {key!r} ignored: {NO_EFFECT[key]}", stacklevel=3)
        else:
            out[key] = value
    return out


class ConfigError(ValueError):
    """A setting that cannot work, named with its value and what to use instead."""


def checkpointing_mode(config: TrainConfig, device_type: str) -> str:
    """"full" or "selective": what `config.gradient_checkpointing_mode` means on a device of this type ("auto":
    selective on a CPU, where a run is bound by compute and memory is ample, full elsewhere, where checkpointing
    is there to make the run fit)."""
    mode = config.gradient_checkpointing_mode
    if mode == "auto":
        return "selective" if device_type == "cpu" else "full"
    return mode


def check_caption_options(tag_dropout: Any, warmup_min: Any, warmup_step: Any, where: str) -> None:
    """Raise ConfigError for a tag dropout rate, token_warmup_min or token_warmup_step kohya could not use."""
    if isinstance(tag_dropout, bool) or not isinstance(tag_dropout, int | float) or not 0 <= tag_dropout <= 1:
        raise ConfigError(f"{where}: caption_tag_dropout_rate={tag_dropout!r}: use a probability in [0, 1]")
    if isinstance(warmup_min, bool) or not isinstance(warmup_min, int) or warmup_min < 0:
        raise ConfigError(f"{where}: token_warmup_min={warmup_min!r}: use a whole number of tags, 0 or more "
                          "(kohya's default 1)")
    if isinstance(warmup_step, bool) or not isinstance(warmup_step, int | float) or not math.isfinite(warmup_step) \
            or warmup_step < 0:
        raise ConfigError(f"{where}: token_warmup_step={warmup_step!r}: use 0 (off), a number of optimizer steps "
                          "(e.g. 500) or a fraction of the run below 1 (e.g. 0.1)")


@dataclass
class TrainConfig:
    """One training run. Every field has a working default except the data source.

    Data: ``train_data_dir`` (a folder of images with caption files) or ``dataset_config`` (a kohya dataset
    TOML, or the same tables written inline as ``dataset``). Resolution/bucket fields apply to a folder and
    are the defaults for TOML datasets.
    """

    # -- what is trained -------------------------------------------------------------------------------
    # "c": Stage C (the prior, kohya's scripts); "b": Stage B (the decoder) with the official train_b recipe:
    # EfficientNet latents of the image as condition, Stage A latents of the image as target
    stage: str = "c"
    mode: str = "lora"  # "lora" (a kohya LoRA file) or "full" (the trained stage in the official key layout)
    model: str = "tiny"  # "tiny" (random tiny models, seeded) or a variant name: lite, lite_bf16, full, bf16
    stage_c_path: str | None = None  # explicit files override the variant's (kohya --stage_c_checkpoint_path)
    stage_b_path: str | None = None  # Stage B file: the model trained with stage="b", else the one samples use
    stage_a_path: str | None = None  # Stage A file: Stage B's target encoder, and the decoder of samples
    effnet_path: str | None = None
    previewer_path: str | None = None
    text_encoder_path: str | None = None  # a transformers folder of CLIP-G (config.json + weights)
    device: str | None = None  # default: cuda (this process's local rank) when available, else cpu
    seed: int = 0

    # -- data ------------------------------------------------------------------------------------------
    train_data_dir: str | None = None
    dataset_config: str | None = None
    dataset: dict[str, Any] | None = None  # inline [general] / [[datasets]] tables
    # kohya's fine-tuning dataset: a metadata JSON (image key -> caption, tags, train_resolution) whose images are
    # in train_data_dir (finetune/merge_captions_to_metadata.py, prepare_buckets_latents.py write it)
    in_json: str | None = None
    caption_extension: str = ".txt"  # kohya's own default is ".caption"
    class_tokens: str | None = None  # caption for images without a caption file
    num_repeats: int = 1
    resolution: int | list[int] = 1024  # bucket area side (or [w, h]) in image pixels
    # "official": a bucket of R px is encoded at 0.75·R px, i.e. the latent Stage C generates for R px images
    # (1024 → 768 px → 24×24, the official trainer's scale); "kohya": EffNet sees the bucket as is (1024 → 32×32)
    training_scale: str = "official"
    train_batch_size: int = 1  # per process (kohya --train_batch_size / TOML batch_size)
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 2048
    bucket_reso_steps: int = 32  # must be a multiple of 32 (EfficientNet's stride)
    bucket_no_upscale: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""  # tokens before it are never shuffled (kohya)
    caption_separator: str = ","  # what splits a caption into tokens for shuffle_caption / keep_tokens
    caption_prefix: str = ""  # put before / after every caption
    caption_suffix: str = ""
    caption_dropout_every_n_epochs: int = 0  # every Nth epoch trains with empty captions (0: never)
    caption_dropout_rate: float = 0.05  # the official 5 % empty captions (kohya: 0)
    caption_tag_dropout_rate: float = 0.0  # kohya: each tag after the kept ones is dropped with this probability
    # kohya's token warm-up: a caption keeps token_warmup_min tags (after the kept ones) at step 0, one more every
    # token_warmup_step / (tags - min) optimizer steps, all of them from step token_warmup_step on (below 1: that
    # fraction of the run's steps, rounded down); 0: off
    token_warmup_min: int = 1
    token_warmup_step: int | float = 0
    flip_aug: bool = False
    random_crop: bool = False

    # -- text ------------------------------------------------------------------------------------------
    # captions over 75 CLIP tokens: "windows" (as cascade_lab and ComfyUI generate: one 77-token window per 75
    # tokens, side by side, nothing dropped), "truncate" (the official trainer: the first 75 tokens), "kohya"
    # (kohya's scripts: the first 75 tokens, or with max_token_length 150/225 that many tokens in 2/3 windows whose
    # states are joined into max_token_length + 2 rows, short captions padded to the same length)
    long_captions: str = "windows"
    max_token_length: int | None = None  # kohya's --max_token_length (150 or 225), with long_captions = "kohya"

    # -- caching ---------------------------------------------------------------------------------------
    cache_latents: bool = True
    cache_text_encoder_outputs: bool = True
    cache_dir: str | None = None  # default <output_dir>/cache

    # -- the loop --------------------------------------------------------------------------------------
    max_train_steps: int = 1000  # optimizer steps
    max_train_epochs: int | None = None  # when set, overrides max_train_steps
    learning_rate: float = 1e-4  # official and kohya README
    # "adamw" (official: wd 0.01), "adafactor" (kohya README), or kohya's others: Lion, SGDNesterov, Prodigy,
    # DAdapt*, AdamW8bit..., a torch.optim class ("RAdam") or "package.module.Class"
    optimizer_type: str = "adamw"
    optimizer_args: list[str] = field(default_factory=list)  # kohya "key=value", e.g. "relative_step=False"
    lr_scheduler: str = "constant"
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts' cycles (kohya)
    lr_scheduler_power: float = 1.0  # polynomial's exponent (kohya)
    lr_scheduler_type: str = ""  # a torch.optim.lr_scheduler class or "package.module.Class"; wins over lr_scheduler
    lr_scheduler_args: list[str] = field(default_factory=list)  # "key=value" for lr_scheduler_type (or step_rules)
    lr_warmup_steps: int | float = 0  # steps, or a fraction in [0, 1) of the run's steps (newer kohya)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # "no" (fp32) or "bf16" autocast; fp16 is refused for Stage C
    # the trained weights and their gradients held in bf16 (kohya --full_bf16; needs mixed_precision="bf16"): half
    # the memory of fp32 masters (full Stage C: 7.2 + 7.2 GB instead of 14.4 + 14.4); with LoRA, the LoRA in bf16
    full_bf16: bool = False
    # how full_bf16 writes updated weights: "stochastic" (unbiased: updates below half a bf16 step still count on
    # average) or "nearest" (kohya: such updates are lost; AdamW then keeps its moments in bf16, as kohya's does)
    bf16_rounding: str = "stochastic"
    gradient_checkpointing: bool = False
    # with gradient_checkpointing: "full" recomputes each block's whole forward in the backward (kohya, the official
    # trainer); "selective" keeps the outputs of its matrix products and attention and recomputes the rest (less
    # time, more memory than full: those outputs); "auto": selective on a CPU, full on a GPU
    gradient_checkpointing_mode: str = "auto"
    adaptive_loss_weight: bool = False  # else P2
    # GDF's diffuse(shift=): training noise levels at logSNR − 2·ln(noise_shift). 1 is the official trainer;
    # 2–4 spend more steps at high noise, where a larger latent (more pixels per image) still shows the layout
    # through the noise, so the layout must be learnt from the prompt there (sampling's `shift` is separate)
    noise_shift: float = 1.0
    dropout: bool | None = None  # Stage C's own dropout while training; None: on for full, off for LoRA
    max_nan_steps: int = 5  # consecutive non-finite steps that stop the run
    # several processes (torchrun / accelerate launch): "ddp" (every process holds the whole model and optimizer),
    # "fsdp" (FSDP2: parameters, gradients and optimizer states sharded over the processes; full fine-tunes),
    # "auto": fsdp under `accelerate launch --use_fsdp`, else ddp. One process trains alone in every case.
    strategy: str = "auto"

    # -- validation ------------------------------------------------------------------------------------
    val_every_n_steps: int = 50  # 0: only at the start and the end
    val_timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    val_items: int = 8  # the first N training images (fixed noise, real captions)
    val_seed: int = 1234

    # -- LoRA ------------------------------------------------------------------------------------------
    network_dim: int = 4
    network_alpha: float = 1.0  # 0 means alpha = rank (kohya)
    network_target: str = "attention"  # "attention" (to_q/k/v, out_proj) or "all_linear" (kohya's Stage C set)
    # kohya's LoRA dropouts, while training only (None: off): --network_dropout on down's outputs, network_args
    # rank_dropout (a mask over the rank per sample) and module_dropout (the whole branch skipped per call)
    network_dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    scale_weight_norms: float | None = None  # kohya's max-norm of each module's scale · up @ down after every step
    network_weights: str | None = None  # start the LoRA from this file (kohya, cascade_lab, OneTrainer, official)
    dim_from_weights: bool = False  # rank, alpha and the layers trained from network_weights (kohya)

    # -- outputs ---------------------------------------------------------------------------------------
    output_dir: str = "output"
    output_name: str | None = None  # default "cascade_lora" / "stage_c_finetune"
    # no output_name: name the files as kohya's scripts do (epoch-000001, at-step00000500, last.safetensors) instead
    # of <name>-000001, <name>-step00000500, <name>.safetensors; a kohya command line sets it
    kohya_file_names: bool = False
    save_every_n_steps: int | None = None
    save_every_n_epochs: int | None = None  # also writes <name>-000001.safetensors per epoch (kohya naming)
    save_last_n_epochs: int | None = None  # keep only this run's last N per-epoch files
    save_last_n_steps: int | None = None  # keep only this run's step files of the last N steps (kohya)
    save_precision: str = "fp32"  # of the exported model file: "fp32" or "bf16"
    keep_checkpoints: int = 2  # resumable checkpoints kept under <output_dir>/checkpoints
    resume: str | None = None  # "auto" (latest checkpoint in output_dir) or a checkpoint folder
    overwrite: bool = False  # start afresh in an output_dir holding a previous run (its checkpoints are deleted)
    log_every_n_steps: int = 10

    # -- sample prompts --------------------------------------------------------------------------------
    sample_prompts: str | list[str] | None = None  # a .txt/.toml/.json file or prompt lines (kohya grammar)
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None  # wins over sample_every_n_steps when both are set (kohya)
    sample_at_first: bool = False
    sample_full_images: bool = True  # also decode through Stage B/A when those stages are available

    # ---------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if isinstance(self.stage, str):
            self.stage = self.stage.strip().lower()  # "B" and "b" name the same stage

    @property
    def name(self) -> str:
        if self.output_name:
            return self.output_name
        if self.stage == "b":
            return "stage_b_lora" if self.mode == "lora" else "stage_b_finetune"
        return "cascade_lora" if self.mode == "lora" else "stage_c_finetune"

    @property
    def kohya_default_names(self) -> bool:
        """True when the files take kohya's names for a run without --output_name (epoch-, at-step, last)."""
        return self.kohya_file_names and not self.output_name

    def file_stem(self, kind: str) -> str:
        """The stem of the model files of `kind`: "epoch" (``<stem>-000001``), "step" (``<stem>-step00000500``) or
        "last" (the final ``<stem>.safetensors``); `name`, or kohya's epoch / at / last (`kohya_default_names`)."""
        if kind not in KOHYA_DEFAULT_STEMS:
            raise ValueError(f"kind={kind!r}: use one of {', '.join(KOHYA_DEFAULT_STEMS)}")
        return KOHYA_DEFAULT_STEMS[kind] if self.kohya_default_names else self.name

    @property
    def scale_factor(self) -> float:
        """EfficientNet input pixels per bucket pixel: 0.75 (a 1024 px bucket → 768 px → 24×24), or 1 (kohya)."""
        return 0.75 if self.training_scale == "official" else 1.0

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the field, its value and what to use instead; return self."""
        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ConfigError(f"{name}={getattr(self, name)!r}: use one of {', '.join(options)}")

        choice("stage", STAGES)
        choice("mode", MODES)
        choice("training_scale", SCALES)
        if self.lr_scheduler.split(":")[0] != "adafactor" or self.lr_scheduler.count(":") > 1:
            choice("lr_scheduler", LR_SCHEDULERS)
        elif ":" in self.lr_scheduler:
            try:
                float(self.lr_scheduler.split(":")[1])
            except ValueError:
                raise ConfigError(f"lr_scheduler={self.lr_scheduler!r}: write 'adafactor' or 'adafactor:<initial "
                                  "learning rate>' (kohya), e.g. 'adafactor:1e-3'") from None
        if self.lr_scheduler_type and not all(part.isidentifier() for part in self.lr_scheduler_type.split(".")):
            raise ConfigError(f"lr_scheduler_type={self.lr_scheduler_type!r}: give a torch.optim.lr_scheduler class "
                              "(e.g. 'CosineAnnealingLR') or 'package.module.Class'")
        if isinstance(self.lr_scheduler_num_cycles, bool) or int(self.lr_scheduler_num_cycles) < 1:
            raise ConfigError(f"lr_scheduler_num_cycles={self.lr_scheduler_num_cycles}: use 1 or more cosine cycles")
        if not (self.lr_scheduler_power > 0 and math.isfinite(self.lr_scheduler_power)):
            raise ConfigError(f"lr_scheduler_power={self.lr_scheduler_power}: use a positive exponent (1: linear)")
        choice("network_target", NETWORK_TARGETS)
        choice("save_precision", SAVE_PRECISIONS)
        choice("strategy", STRATEGIES)
        choice("gradient_checkpointing_mode", CHECKPOINTING_MODES)
        if self.strategy == "fsdp" and self.mode == "lora":
            raise ConfigError(LORA_FSDP)
        if self.mixed_precision in ("fp16", "float16"):
            raise ConfigError(f"mixed_precision='fp16': Stage {self.stage.upper()} is not trained in float16 (Stage C "
                              "overflows: black/NaN images, official readme; the official Stage B trainer uses "
                              "bf16); use 'bf16' or 'no' (fp32)")
        choice("mixed_precision", PRECISIONS)
        choice("bf16_rounding", BF16_ROUNDINGS)
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise ConfigError(f"full_bf16=true with mixed_precision={self.mixed_precision!r}: bf16 weights need bf16 "
                              "compute (kohya asserts the same); set mixed_precision='bf16', or full_bf16=false for "
                              "fp32 weights")
        if self.full_bf16 and self.strategy == "fsdp":
            raise ConfigError(FULL_BF16_FSDP)
        from .optimizers import check_name

        check_name(self.optimizer_type)
        if self.lr_scheduler.split(":")[0] == "adafactor" and self.optimizer_type.lower() != "adafactor":
            raise ConfigError(f"lr_scheduler={self.lr_scheduler!r} goes with optimizer_type='Adafactor' (kohya "
                              f"asserts it), not {self.optimizer_type!r}: choose another lr_scheduler")
        if self.bucket_reso_steps <= 0 or self.bucket_reso_steps % 32:
            raise ConfigError(f"bucket_reso_steps={self.bucket_reso_steps}: use a multiple of 32 (EfficientNet "
                              "reduces by 32, so other steps cannot give whole latents)")
        for name in ("train_batch_size", "gradient_accumulation_steps", "network_dim", "num_repeats",
                     "keep_checkpoints", "max_nan_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: use 1 or more")
        for name in ("max_train_epochs", "save_every_n_steps", "save_every_n_epochs", "save_last_n_epochs",
                     "save_last_n_steps", "sample_every_n_steps", "sample_every_n_epochs"):
            value = getattr(self, name)
            if value is not None and int(value) < 0:
                raise ConfigError(f"{name}={value}: use 1 or more (or leave it out)")
        if self.resume and self.overwrite:
            raise ConfigError(f"resume={self.resume!r} and overwrite=true: choose one (resume continues the "
                              "previous run in output_dir, overwrite starts afresh and deletes its checkpoints)")
        if self.max_train_steps < 1 and not self.max_train_epochs:
            raise ConfigError(f"max_train_steps={self.max_train_steps}: use 1 or more")
        warmup = self.lr_warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, int | float) or not math.isfinite(warmup) or warmup < 0 \
                or (isinstance(warmup, float) and warmup >= 1 and not warmup.is_integer()):
            raise ConfigError(f"lr_warmup_steps={warmup!r}: use a whole number of optimizer steps (e.g. 100) or a "
                              "fraction of the run in [0, 1) (e.g. 0.05 for the first 5 %)")
        if not 0 <= self.caption_dropout_rate <= 1:
            raise ConfigError(f"caption_dropout_rate={self.caption_dropout_rate}: use a probability in [0, 1]")
        self._validate_lora_options()
        check_caption_options(self.caption_tag_dropout_rate, self.token_warmup_min, self.token_warmup_step, "config")
        choice("long_captions", LONG_CAPTIONS)
        if self.max_token_length is not None and (self.long_captions != "kohya"
                                                  or self.max_token_length not in KOHYA_TOKEN_LENGTHS):
            raise ConfigError(f"max_token_length={self.max_token_length!r} with long_captions={self.long_captions!r}: "
                              "max_token_length is kohya's layout of 150 or 225 tokens; set long_captions='kohya' "
                              "and max_token_length to 150 or 225, or leave max_token_length out")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"learning_rate={self.learning_rate}: use a positive number (official 1e-4)")
        if not (self.noise_shift > 0 and math.isfinite(self.noise_shift)):
            raise ConfigError(f"noise_shift={self.noise_shift}: use a positive number (1 is the official "
                              "trainer; 2-4 to train more at high noise)")
        if self.in_json and not (self.train_data_dir or self.dataset_config or self.dataset):
            raise ConfigError(f"in_json={self.in_json!r} without train_data_dir: set train_data_dir to the folder "
                              "of the images its keys name (kohya stops there too)")
        if not (self.train_data_dir or self.dataset_config or self.dataset):
            raise ConfigError("no data: set train_data_dir (a folder of images with caption files) or "
                              "dataset_config (a kohya dataset TOML)")
        if any(not 0 <= t <= 1 for t in self.val_timesteps):
            raise ConfigError(f"val_timesteps={self.val_timesteps}: every t must be in [0, 1]")
        return self

    def _validate_lora_options(self) -> None:
        for name in ("network_dropout", "rank_dropout", "module_dropout"):
            p = getattr(self, name)
            if p is not None and not (isinstance(p, int | float) and 0 <= p < 1):
                raise ConfigError(f"{name}={p!r}: use a probability in [0, 1) (kohya uses 0.1-0.3), or leave it out")
        norm = self.scale_weight_norms
        if norm is not None and not (isinstance(norm, int | float) and 0 <= norm < math.inf):
            raise ConfigError(f"scale_weight_norms={norm!r}: use a positive norm (kohya suggests 1), or leave it out")
        if self.network_weights and not Path(self.network_weights).is_file():
            raise ConfigError(f"network_weights={self.network_weights!r}: no such file; give the .safetensors LoRA "
                              "to start from (kohya --network_weights FILE), or leave it out to start afresh")
        if self.dim_from_weights and not self.network_weights:
            raise ConfigError("dim_from_weights=true needs network_weights, the LoRA file to take the rank, alpha "
                              "and layers from (kohya --network_weights FILE)")
        if self.mode != "lora":
            given = [n for n in ("network_dropout", "rank_dropout", "module_dropout", "scale_weight_norms",
                                 "network_weights") if getattr(self, n)]
            if given or self.dim_from_weights:
                raise ConfigError(f"{', '.join(given or ['dim_from_weights'])}: LoRA options, but mode="
                                  f"{self.mode!r}; use mode='lora' (kohya: --network_module networks.lora)")

    # -- (de)serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping; unknown keys raise with the closest known names."""
        data = kohya_names(dict(data), source)
        inline = {k: data.pop(k) for k in DATASET_TABLES if k in data}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{source}: unknown training settings {', '.join(hints)}; see "
                              "cascade_lab.training.TrainConfig for the list")
        if inline:
            if data.get("dataset"):
                raise ConfigError(f"{source}: give the dataset either as [general]/[[datasets]] tables or as "
                                  "'dataset', not both")
            data["dataset"] = inline
        for key in ("optimizer_args", "lr_scheduler_args"):
            if isinstance(data.get(key), str):
                data[key] = data[key].split()
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a TOML file whose top-level keys are TrainConfig fields (plus optional dataset tables).

        Relative paths in it are taken relative to the file's folder.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        data = kohya_names(data, str(path))
        for key in ("train_data_dir", "dataset_config", "output_dir", "cache_dir", "stage_c_path", "effnet_path",
                    "in_json", "previewer_path", "text_encoder_path", "stage_b_path", "stage_a_path", "sample_prompts",
                    "network_weights"):
            value = data.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute() and value != "auto":
                data[key] = str((path.parent / value).resolve())
        if isinstance(data.get("resume"), str) and data["resume"] not in ("auto", ""):
            data["resume"] = str((path.parent / data["resume"]).resolve())
        return cls.from_dict(data, source=str(path))

    @classmethod
    def coerce(cls, config: TrainConfig | dict[str, Any] | str | Path | None = None, **kwargs: Any) -> TrainConfig:
        """A TrainConfig from a TrainConfig, a dict, a TOML path or keyword arguments (kwargs override)."""
        if isinstance(config, TrainConfig):
            base = config.to_dict()
        elif isinstance(config, (str, Path)):
            base = TrainConfig.from_toml(config).to_dict()
        else:
            base = dict(config or {})
        base.update(kwargs)
        return cls.from_dict(base)


def parse_value(text: str) -> Any:
    """A command-line ``key=value`` value: TOML syntax when it parses (numbers, booleans, lists), else text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


__all__ = ["ConfigError", "TrainConfig", "check_caption_options", "parse_value"]
