"""kohya dataset TOML (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``) and plain image folders.

Options written at a higher level are inherited by the levels below unless overridden, as in kohya's
``config_util``. Unknown keys and kohya options cascade_lab does not implement are reported (warnings, and
kept in `DatasetConfig.notes` for the run's metadata); settings that cannot work raise `ConfigError`.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, check_caption_options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DATASET_KEYS = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                "bucket_reso_steps", "bucket_no_upscale")
SUBSET_KEYS = ("image_dir", "caption_extension", "class_tokens", "num_repeats", "shuffle_caption", "keep_tokens",
               "keep_tokens_separator", "caption_prefix", "caption_suffix", "caption_dropout_rate",
               "caption_dropout_every_n_epochs", "flip_aug", "random_crop", "color_aug", "is_reg",
               "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step")
IGNORED_KEYS = {  # kohya options with no effect here, and why
    "network_multiplier": "cascade_lab trains one network per run",
    "face_crop_aug_range": "face crops are not implemented",
    "secondary_separator": "wildcard captions are not implemented",
    "enable_wildcard": "wildcard captions are not implemented",
    "alpha_mask": "alpha-mask losses are not implemented",
    "max_token_length": "kohya's dataset schema has no such key (its --max_token_length is a training flag); the "
                        "caption length is the training settings long_captions / max_token_length",
}
FINETUNE_KEYS = ("metadata_file",)  # kohya's fine-tuning subsets: captions from a metadata JSON (finetune_data)
REFUSED_KEYS = {
    "conditioning_data_dir": "ControlNet datasets are not supported by the Stage C trainer",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


@dataclass
class SubsetSpec:
    """One folder of images: how its captions are read and varied."""

    image_dir: str
    caption_extension: str = ".txt"
    class_tokens: str | None = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","  # splits a caption into the tokens shuffle_caption / keep_tokens move (kohya flag)
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.05
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0  # each tag after the kept ones dropped with this probability (kohya)
    token_warmup_min: int = 1  # kohya's token warm-up: tags kept at step 0 ...
    token_warmup_step: int | float = 0  # ... all from this optimizer step on (< 1: a fraction of the run); 0: off
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    is_reg: bool = False
    metadata_file: str | None = None  # kohya's fine-tuning subset: image keys, captions and tags in a JSON


@dataclass
class DatasetSpec:
    """Images that share a resolution, batch size and bucket settings."""

    resolution: tuple[int, int]  # (width, height) of the bucket area, image pixels
    batch_size: int = 1
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 2048
    bucket_reso_steps: int = 32
    bucket_no_upscale: bool = False
    subsets: list[SubsetSpec] = field(default_factory=list)


@dataclass
class DatasetConfig:
    datasets: list[DatasetSpec]
    notes: list[str] = field(default_factory=list)  # what was reported while reading


def check_path(value: str, where: str) -> None:
    """Refuse Windows paths on other systems (kohya's examples ship them; they find no data on Linux)."""
    if os.name != "nt" and (_WINDOWS_PATH.match(value) or "\\" in value):
        raise ConfigError(
            f"{where}: '{value}' is a Windows path, which does not exist on this {sys.platform} machine "
            "(the kohya/bmaltais example TOMLs ship such paths). Write the folder's path on this machine, "
            "e.g. image_dir = \"/data/my_concept\""
        )


def _resolution(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ConfigError(f"{where}: resolution={value!r}: use a number (e.g. 1024) or [width, height]")


def _defaults(config: TrainConfig) -> dict[str, Any]:
    """TrainConfig values that act as the [general] level."""
    return {
        "resolution": config.resolution, "batch_size": config.train_batch_size,
        "enable_bucket": config.enable_bucket, "min_bucket_reso": config.min_bucket_reso,
        "max_bucket_reso": config.max_bucket_reso, "bucket_reso_steps": config.bucket_reso_steps,
        "bucket_no_upscale": config.bucket_no_upscale, "caption_extension": config.caption_extension,
        "class_tokens": config.class_tokens, "num_repeats": config.num_repeats,
        "shuffle_caption": config.shuffle_caption, "keep_tokens": config.keep_tokens,
        "keep_tokens_separator": config.keep_tokens_separator, "caption_separator": config.caption_separator,
        "caption_prefix": config.caption_prefix, "caption_suffix": config.caption_suffix,
        "caption_dropout_every_n_epochs": config.caption_dropout_every_n_epochs,
        "caption_dropout_rate": config.caption_dropout_rate, "flip_aug": config.flip_aug,
        "caption_tag_dropout_rate": config.caption_tag_dropout_rate, "token_warmup_min": config.token_warmup_min,
        "token_warmup_step": config.token_warmup_step,
        "random_crop": config.random_crop,
    }  # fmt: skip


def _sort_keys(table: dict[str, Any], level: str, notes: list[str], allowed: tuple[str, ...]) -> dict[str, Any]:
    """The keys of one table that cascade_lab uses; report the others."""
    kept = {}
    for key, value in table.items():
        if key in ("datasets", "subsets"):
            continue
        if key in REFUSED_KEYS:
            raise ConfigError(f"{level}: {key!r}: {REFUSED_KEYS[key]}")
        if key in IGNORED_KEYS:
            notes.append(f"{level}: {key!r} ignored ({IGNORED_KEYS[key]})")
        elif key in allowed:
            kept[key] = value
        else:
            notes.append(f"{level}: unknown key {key!r} ignored (known: {', '.join(allowed)})")
    return kept


def _build(values: dict[str, Any], where: str) -> tuple[DatasetSpec, dict[str, Any]]:
    spec = DatasetSpec(resolution=_resolution(values["resolution"], where))
    for f in fields(DatasetSpec):
        if f.name in values and f.name not in ("resolution", "subsets"):
            setattr(spec, f.name, values[f.name])
    if spec.bucket_reso_steps % 32:
        raise ConfigError(f"{where}: bucket_reso_steps={spec.bucket_reso_steps}: use a multiple of 32 "
                          "(EfficientNet reduces by 32)")
    _positive(spec.batch_size, "batch_size", where)
    for name in ("min_bucket_reso", "max_bucket_reso"):
        _positive(getattr(spec, name), name, where)
    if min(spec.resolution) < 32:
        raise ConfigError(f"{where}: resolution={values['resolution']!r}: use at least 32 px (one latent pixel)")
    return spec, values


def _positive(value: Any, name: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {name}={value!r}: use a whole number of 1 or more")


def _subset(values: dict[str, Any], base: Path | None, where: str) -> SubsetSpec:
    if values.get("metadata_file") is not None:
        return _finetune_subset(values, base, where)
    if "image_dir" not in values:
        raise ConfigError(f"{where}: a subset needs image_dir (the folder of images and caption files) or "
                          "metadata_file (kohya's metadata JSON)")
    image_dir = str(values["image_dir"])
    check_path(image_dir, where)
    path = Path(image_dir).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    subset = SubsetSpec(image_dir=str(path))
    for f in fields(SubsetSpec):
        if f.name in values and f.name != "image_dir":
            setattr(subset, f.name, values[f.name])
    if not path.is_dir():
        raise ConfigError(f"{where}: image_dir {str(path)!r} is not a folder")
    return _checked(subset, where)


def _finetune_subset(values: dict[str, Any], base: Path | None, where: str) -> SubsetSpec:
    """kohya's fine-tuning subset: `metadata_file` (required) and `image_dir` (where keys without a path are
    looked up; optional when the keys are full paths)."""
    def resolved(key: str) -> Path:
        check_path(str(values[key]), where)
        path = Path(str(values[key])).expanduser()
        return base / path if not path.is_absolute() and base is not None else path

    metadata = resolved("metadata_file")
    if not metadata.is_file():
        raise ConfigError(f"{where}: metadata_file {str(metadata)!r} does not exist; give the JSON that kohya's "
                          "finetune/merge_captions_to_metadata.py (or prepare_buckets_latents.py) wrote")
    image_dir = resolved("image_dir") if values.get("image_dir") else None
    if image_dir is not None and not image_dir.is_dir():
        raise ConfigError(f"{where}: image_dir {str(image_dir)!r} is not a folder")
    subset = SubsetSpec(image_dir=str(image_dir) if image_dir else "", metadata_file=str(metadata))
    for f in fields(SubsetSpec):
        if f.name in values and f.name not in ("image_dir", "metadata_file", "caption_extension", "class_tokens"):
            setattr(subset, f.name, values[f.name])
    return _checked(subset, where)


def _checked(subset: SubsetSpec, where: str) -> SubsetSpec:
    _positive(subset.num_repeats, "num_repeats", where)
    if not 0 <= subset.caption_dropout_rate <= 1:
        raise ConfigError(f"{where}: caption_dropout_rate={subset.caption_dropout_rate!r}: use a probability in "
                          "[0, 1]")
    if subset.keep_tokens < 0:
        raise ConfigError(f"{where}: keep_tokens={subset.keep_tokens!r}: use 0 or more")
    every = subset.caption_dropout_every_n_epochs
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"{where}: caption_dropout_every_n_epochs={every!r}: use 0 (never) or a number of epochs")
    check_caption_options(subset.caption_tag_dropout_rate, subset.token_warmup_min, subset.token_warmup_step, where)
    if not isinstance(subset.caption_separator, str) or not subset.caption_separator:
        raise ConfigError(f"{where}: caption_separator={subset.caption_separator!r}: use a non-empty text (kohya: ',')")
    return subset


def load_dataset_config(source: str | Path | dict[str, Any], config: TrainConfig) -> DatasetConfig:
    """Read a kohya dataset TOML (a path or already-parsed tables); TrainConfig supplies the defaults."""
    base: Path | None = None
    if isinstance(source, (str, Path)):
        check_path(str(source), "dataset_config")
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"dataset config {str(path)!r} does not exist")
        try:
            tables = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        base, name = path.parent, str(path)
    else:
        tables, name = source, "dataset"
    notes: list[str] = []
    for key in tables:
        if key not in ("general", "datasets"):
            notes.append(f"{name}: unknown top-level table {key!r} ignored (known: general, datasets)")
    allowed = DATASET_KEYS + SUBSET_KEYS
    general = _defaults(config) | _sort_keys(tables.get("general", {}), f"{name} [general]", notes, allowed)
    datasets = []
    raw_datasets = tables.get("datasets", [])
    if not raw_datasets:
        raise ConfigError(f"{name}: no [[datasets]] table; a dataset TOML needs at least one with a "
                          "[[datasets.subsets]] image_dir")
    for i, table in enumerate(raw_datasets):
        where = f"{name} [[datasets]] #{i + 1}"
        values = general | _sort_keys(table, where, notes, allowed)
        spec, values = _build(values, where)
        for j, sub in enumerate(table.get("subsets", [])):
            sub_where = f"{where} subset #{j + 1}"
            kept = _sort_keys(sub, sub_where, notes, SUBSET_KEYS + FINETUNE_KEYS)
            spec.subsets.append(_subset(values | kept, base, sub_where))
        if not spec.subsets:
            raise ConfigError(f"{where}: no [[datasets.subsets]] with an image_dir or a metadata_file")
        datasets.append(spec)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return DatasetConfig(datasets, notes)


def folder_dataset(folder: str | Path, config: TrainConfig) -> DatasetConfig:
    """A plain folder of images and captions; kohya's ``<repeats>_<class>`` subfolders become subsets."""
    check_path(str(folder), "train_data_dir")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"train_data_dir {str(root)!r} is not a folder")
    values = _defaults(config)
    spec, _ = _build(values, "train_data_dir")
    has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir())
    repeat_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _REPEAT_FOLDER.match(p.name))
    folders = [(root, config.num_repeats, config.class_tokens)] if has_images or not repeat_dirs else []
    for sub in repeat_dirs:
        match = _REPEAT_FOLDER.match(sub.name)
        assert match is not None
        folders.append((sub, int(match[1]), match[2] or config.class_tokens))
    for path, repeats, class_tokens in folders:
        spec.subsets.append(_subset(values | {"image_dir": str(path), "num_repeats": repeats,
                                              "class_tokens": class_tokens}, None, "train_data_dir"))
    return DatasetConfig([spec], [])


def in_json_dataset(config: TrainConfig) -> DatasetConfig:
    """kohya's ``--in_json`` with ``--train_data_dir``: one fine-tuning subset, as kohya's scripts build it."""
    values = _defaults(config)
    spec, _ = _build(values, "in_json")
    spec.subsets.append(_subset(values | {"metadata_file": config.in_json, "image_dir": config.train_data_dir},
                                None, f"in_json {config.in_json}"))
    return DatasetConfig([spec], [])


def dataset_config_for(config: TrainConfig) -> DatasetConfig:
    """The datasets a TrainConfig names: inline tables, a TOML file, a metadata JSON, or a folder."""
    if config.dataset:
        return load_dataset_config(config.dataset, config)
    if config.dataset_config:
        return load_dataset_config(config.dataset_config, config)
    if config.in_json:
        return in_json_dataset(config)
    assert config.train_data_dir is not None
    return folder_dataset(config.train_data_dir, config)


__all__ = ["DatasetConfig", "DatasetSpec", "SubsetSpec", "check_path", "dataset_config_for", "folder_dataset",
           "in_json_dataset", "load_dataset_config"]
