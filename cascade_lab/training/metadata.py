"""The header metadata of exported files: kohya's ``ss_*`` and modelspec keys, and cascade_lab's own."""

from __future__ import annotations

import json
import math
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainConfig

if TYPE_CHECKING:
    from . import distributed as dist
    from .data import TrainingData
    from .loop import Trainer


def scale_statement(config: TrainConfig) -> str:
    """How bucket pixels become latents in this run, in words (stored in every output's metadata)."""
    res = config.resolution if isinstance(config.resolution, int) else max(config.resolution)
    if config.training_scale == "official":
        px = int(res * 0.75) // 32 * 32
        return (f"official: a {res} px bucket is encoded at {px} px -> {px // 32}x{px // 32} latents, the latent "
                f"size Stage C generates for {res} px images (official trainer: 768 px crops -> 24x24)")
    return (f"kohya: EfficientNet sees the bucket as is, {res} px -> {res // 32}x{res // 32} latents, the latent "
            f"size of ~{round(res * 4 / 3)} px generations")


def scale_factor(config: TrainConfig, models: Any) -> float:
    """EfficientNet input pixels per bucket pixel: kohya 1; official the encoder's stride over Stage C's compression
    (32 / 42.67 = 0.75 for the real models; 16 / 16 = 1 for the demo, which generates 128 px from 8x8).
    Stage B trains on the image itself (its Stage A latent), so its buckets are image pixels: 1."""
    if config.stage == "b":
        return 1.0
    if config.training_scale != "official" or models.downscale == 32:
        return config.scale_factor
    return float(models.downscale / models.compression)


def kohya_dataset_metadata(config: TrainConfig, data: TrainingData) -> dict[str, str]:
    """kohya's dataset keys, as its training scripts write them (values as strings, nested ones as JSON).

    ``ss_tag_frequency`` (per image folder: each comma-separated tag of the captions, lower-cased, counted once
    per image; what A1111 / Forge show as a LoRA's training tags), ``ss_dataset_dirs`` (folder: repeats and image
    count) and ``ss_bucket_info`` (per bucket: its size and images with repeats; the mean |aspect-ratio error|);
    with a dataset TOML ``ss_datasets`` (one entry per dataset with its subsets), else kohya's flat keys."""
    tags: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    counts = [0] * len(data.subsets)
    for rec in data.records:
        counts[rec.subset] += 1
    names = []
    for i, subset in enumerate(data.subsets):
        name = base = Path(subset.metadata_file or subset.image_dir).name  # kohya: a metadata JSON's file name
        n = 2
        while name in dirs:  # one folder in several subsets (kohya: "name (2)")
            name, n = f"{base} ({n})", n + 1
        names.append(name)
        dirs[name] = {"n_repeats": subset.num_repeats, "img_count": counts[i]}
    for rec in data.records:
        freq = tags.setdefault(names[rec.subset], {})
        for tag in (t.strip().lower() for t in rec.caption.split(",")):
            if tag:
                freq[tag] = freq.get(tag, 0) + 1

    def bucket_info(dataset: int) -> dict[str, Any] | None:
        if not data.rules[dataset].enabled:
            return None  # kohya: null without buckets
        sizes: dict[tuple[int, int], int] = {}
        errors = []
        for rec in data.records:
            if rec.dataset == dataset:
                key = (rec.bucket[0], rec.bucket[1])
                sizes[key] = sizes.get(key, 0) + data.subsets[rec.subset].num_repeats
                errors.append(abs(rec.bucket[0] / rec.bucket[1] - rec.size[0] / rec.size[1]))
        buckets = {str(i): {"resolution": list(size), "count": count}
                   for i, (size, count) in enumerate(sorted(sizes.items()))}
        return {"buckets": buckets, "mean_img_ar_error": sum(errors) / max(1, len(errors))}

    def with_repeats(subsets: list[int]) -> int:  # kohya counts each image num_repeats times
        return sum(counts[i] * data.subsets[i].num_repeats for i in subsets)

    def subset_entry(i: int) -> dict[str, Any]:
        s = data.subsets[i]
        return {"img_count": counts[i], "num_repeats": s.num_repeats, "color_aug": bool(s.color_aug),
                "flip_aug": bool(s.flip_aug), "random_crop": bool(s.random_crop),
                "shuffle_caption": bool(s.shuffle_caption), "keep_tokens": s.keep_tokens,
                "image_dir": Path(s.image_dir).name, "class_tokens": s.class_tokens, "is_reg": False} | (
                    {"metadata_file": Path(s.metadata_file).name} if s.metadata_file else {})

    meta = {"ss_tag_frequency": json.dumps(tags), "ss_dataset_dirs": json.dumps(dirs), "ss_num_reg_images": "0",
            "ss_num_train_images": str(with_repeats(list(range(len(data.subsets))))),
            "ss_caption_dropout_every_n_epochs": str(config.caption_dropout_every_n_epochs),
            "ss_caption_tag_dropout_rate": str(config.caption_tag_dropout_rate),
            "ss_max_token_length": str(config.max_token_length)}
    if config.dataset_config or config.dataset:  # kohya: a user config is described per dataset
        owner = {rec.subset: rec.dataset for rec in data.records}  # every subset has images
        datasets = []
        for d, spec in enumerate(data.config.datasets):
            mine = [i for i in range(len(data.subsets)) if owner[i] == d]
            dreambooth = not any(data.subsets[i].metadata_file for i in mine)
            datasets.append({"is_dreambooth": dreambooth, "batch_size_per_device": spec.batch_size,
                             "num_train_images": with_repeats(mine),
                             "num_reg_images": 0, "resolution": list(spec.resolution),
                             "enable_bucket": data.rules[d].enabled, "min_bucket_reso": spec.min_bucket_reso,
                             "max_bucket_reso": spec.max_bucket_reso,
                             "tag_frequency": {names[i]: tags.get(names[i], {}) for i in mine},
                             "bucket_info": bucket_info(d), "subsets": [subset_entry(i) for i in mine]})
        meta["ss_datasets"] = json.dumps(datasets)
        return meta
    spec, first = data.config.datasets[0], data.subsets[0]
    return meta | {
        "ss_color_aug": str(bool(first.color_aug)), "ss_flip_aug": str(bool(first.flip_aug)),
        "ss_random_crop": str(bool(first.random_crop)), "ss_shuffle_caption": str(bool(first.shuffle_caption)),
        "ss_keep_tokens": str(first.keep_tokens), "ss_bucket_no_upscale": str(bool(spec.bucket_no_upscale)),
        "ss_min_bucket_reso": str(spec.min_bucket_reso), "ss_max_bucket_reso": str(spec.max_bucket_reso),
        "ss_reg_dataset_dirs": "{}", "ss_bucket_info": json.dumps(bucket_info(0)),
    }  # fmt: skip


def describe(config: TrainConfig, data: TrainingData, info: dist.DistInfo, trainer: Trainer,
             downscale: int = 32) -> dict[str, str]:
    from .. import __version__

    buckets: dict[str, int] = {}
    for rec in data.records:
        key = f"{rec.bucket[0] // downscale}x{rec.bucket[1] // downscale}"  # latent (w, h)
        buckets[key] = buckets.get(key, 0) + 1
    res = data.config.datasets[0].resolution  # the resolution trained (a dataset TOML's own wins)
    meta = {
        "cascade_lab.version": __version__, "cascade_lab.stage": config.stage, "cascade_lab.mode": config.mode,
        "cascade_lab.training_scale": scale_statement(config), "cascade_lab.latent_buckets": json.dumps(buckets),
        "cascade_lab.loss_weight": "adaptive" if config.adaptive_loss_weight else "p2",
        "cascade_lab.noise_shift": str(config.noise_shift),
        "cascade_lab.full_bf16": f"True ({config.bf16_rounding} rounding)" if config.full_bf16 else "False",
        "cascade_lab.long_captions": config.long_captions,
        "cascade_lab.world_size": str(info.world_size), "cascade_lab.strategy": info.strategy,
        "cascade_lab.model": config.model,
        "cascade_lab.dataset_notes": json.dumps(data.config.notes),
        "ss_resolution": f"({res[0]}, {res[1]})", "modelspec.resolution": f"{res[0]}x{res[1]}",
        "ss_num_batches_per_epoch": str(data.batches_per_epoch()), "ss_max_train_steps": str(trainer.total_steps),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_num_epochs": str(math.ceil(trainer.total_steps * config.gradient_accumulation_steps
                                       / data.batches_per_epoch())),
        "ss_session_id": str(secrets.randbits(31)), "ss_training_started_at": str(time.time()),
        "ss_batch_size_per_device": str(data.config.datasets[0].batch_size),
        "ss_total_batch_size": str(data.global_batch_size(0) * config.gradient_accumulation_steps),
        "ss_lr_warmup_steps": str(config.lr_warmup_steps), "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_cache_latents": str(config.cache_latents), "ss_enable_bucket": str(data.rules[0].enabled),
        "ss_sd_model_name": Path(config.stage_c_path).name if config.stage_c_path else config.model,
        "ss_full_fp16": "False", "ss_v2": "False",
    }  # fmt: skip
    meta.update(kohya_dataset_metadata(config, data))
    if config.stage == "b":
        from .stage_b import EFFNET_FACTOR, EFFNET_KEEP

        targets: dict[str, int] = {}
        for rec in data.records:
            key = f"{rec.bucket[0] // 4}x{rec.bucket[1] // 4}"  # Stage A latent (w, h)
            targets[key] = targets.get(key, 0) + 1
        meta["cascade_lab.training_scale"] = (
            f"stage B (official train_b): buckets of {res[0]}x{res[1]} image px, target the Stage A latent "
            f"(1/4), condition EfficientNet latents of the image resized by a factor in [{EFFNET_FACTOR[0]}, "
            f"{EFFNET_FACTOR[1]}) per batch (kept with p={EFFNET_KEEP}), pyramid noise")
        meta["cascade_lab.latent_buckets"] = json.dumps(targets)
        meta["ss_sd_model_name"] = Path(config.stage_b_path).name if config.stage_b_path else config.model
    elif downscale != 32:
        meta["cascade_lab.training_scale"] = (f"{config.training_scale}: buckets of {res[0]}x{res[1]} px, an encoder "
                                              f"of stride {downscale}: latents {json.dumps(buckets)}")
    if trainer.network is not None:
        meta["cascade_lab.network_target"] = config.network_target
    return meta


def export_metadata(metadata: dict[str, str], trainer: Trainer) -> dict[str, str]:
    """The header of an exported file: the run's metadata with the step, kohya LoRA or modelspec keys."""
    from .lora_train import lora_metadata

    extra = dict(metadata, **{"ss_steps": str(trainer.step), "cascade_lab.step": str(trainer.step),
                                  "ss_training_finished_at": str(time.time())})
    if trainer.network is not None:
        from .optim import parse_optimizer_args
        from .optimizers import label

        config = trainer.config  # kohya's ss_optimizer names the class built, e.g. torch.optim.adamw.AdamW
        extra["ss_optimizer"] = label(trainer.optimizer, config.optimizer_type, parse_optimizer_args(
            config.optimizer_args))
        # kohya writes the --lr_scheduler name even when a --lr_scheduler_type class ran; here the class
        extra["ss_lr_scheduler"] = (f"{config.lr_scheduler_type}({','.join(config.lr_scheduler_args)})"
                                    if config.lr_scheduler_type else config.lr_scheduler)
        return lora_metadata(trainer.config, trainer.network, extra)
    res = trainer.config.resolution if isinstance(trainer.config.resolution, int) else trainer.config.resolution[0]
    # kohya without --output_name: sai_model_spec's Checkpoint@<time>
    title = f"Checkpoint@{time.time()}" if trainer.config.kohya_default_names else trainer.config.name
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-cascade",
            "modelspec.implementation": "https://github.com/Stability-AI/StableCascade",
            "modelspec.title": title, "modelspec.resolution": f"{res}x{res}",
            "modelspec.prediction_type": "epsilon",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), **extra}


__all__ = ["describe", "export_metadata", "kohya_dataset_metadata", "scale_factor", "scale_statement"]
