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
OPTIMIZERS = ("adamw", "adafactor")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_warmup", "linear")
NETWORK_TARGETS = ("attention", "all_linear")
PRECISIONS = ("no", "bf16")
SAVE_PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("auto", "ddp", "fsdp")
CHECKPOINTING_MODES = ("auto", "full", "selective")
LORA_FSDP = ("strategy='fsdp' with mode='lora' is not supported: a LoRA's low-rank branches sit beside frozen "
             "layers that cascade_lab does not shard, and its gradients and optimizer states are a few MB (the "
             "frozen base is held in the compute dtype), so DDP costs little more memory; use strategy='ddp' (or "
             "'auto') for a LoRA, 'fsdp' for mode='full'")
DATASET_TABLES = ("general", "datasets")  # a kohya dataset TOML may sit inside the training TOML

# Settings whose change makes an old checkpoint meaningless for resuming.
RESUME_KEYS = ("stage", "mode", "model", "network_dim", "network_alpha", "network_target", "optimizer_type",
               "gradient_accumulation_steps", "adaptive_loss_weight", "noise_shift", "seed")


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
    flip_aug: bool = False
    random_crop: bool = False

    # -- caching ---------------------------------------------------------------------------------------
    cache_latents: bool = True
    cache_text_encoder_outputs: bool = True
    cache_dir: str | None = None  # default <output_dir>/cache

    # -- the loop --------------------------------------------------------------------------------------
    max_train_steps: int = 1000  # optimizer steps
    max_train_epochs: int | None = None  # when set, overrides max_train_steps
    learning_rate: float = 1e-4  # official and kohya README
    optimizer_type: str = "adamw"  # "adamw" (official: wd 0.01) or "adafactor" (kohya README)
    optimizer_args: list[str] = field(default_factory=list)  # kohya "key=value", e.g. "relative_step=False"
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0  # steps, or a fraction in [0, 1) of the run's steps (newer kohya)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # "no" (fp32) or "bf16" autocast; fp16 is refused for Stage C
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
        choice("lr_scheduler", LR_SCHEDULERS)
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
        if self.optimizer_type.lower() not in OPTIMIZERS:
            raise ConfigError(f"optimizer_type={self.optimizer_type!r}: use 'AdamW' or 'Adafactor'")
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
        if isinstance(data.get("optimizer_args"), str):
            data["optimizer_args"] = data["optimizer_args"].split()
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
                    "in_json", "previewer_path", "text_encoder_path", "stage_b_path", "stage_a_path", "sample_prompts"):
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


__all__ = ["ConfigError", "TrainConfig", "parse_value"]
