"""Training images: discovery, captions, aspect-ratio buckets and the order batches come in.

Every random choice (order, caption dropout and shuffling, flips, crops) is drawn from a seed derived from
(run seed, batch counter, position in the global batch). So a batch depends only on where it sits in the
run: a resumed run sees the same data, and N processes sharing a global batch see what one process would.
Bucket sizes are EfficientNet input pixels (multiples of 32); latents are 1/32 of them.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import ConfigError
from .finetune_data import read_subset
from .toml_config import IMAGE_EXTENSIONS, DatasetConfig, DatasetSpec, SubsetSpec

Size = tuple[int, int]  # (width, height)


def derive_seed(seed: int, kind: str, *parts: int) -> int:
    """A 63-bit seed for one random draw, from the run seed and where the draw happens."""
    text = ":".join([str(seed), kind, *map(str, parts)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


# ------------------------------------------------------------------------------------------------ buckets


def make_buckets(area: float, min_side: int, max_side: int, step: int) -> list[Size]:
    """Every (w, h) on a `step` grid inside [min_side, max_side] whose area is at most `area`, widest h per w."""
    lo, hi = math.ceil(min_side / step) * step, max(step, max_side // step * step)
    lo = min(lo, hi)
    side = max(step, int(math.sqrt(area) // step * step))
    buckets = {(side, side)}
    for w in range(lo, hi + 1, step):
        h = min(hi, int(area // w) // step * step)
        if h >= lo:
            buckets.update({(w, h), (h, w)})
    return sorted(buckets)


@dataclass(frozen=True)
class BucketRule:
    """How one dataset maps image sizes to EfficientNet input sizes."""

    area: float  # target area in EfficientNet pixels (resolution² · scale²)
    step: int
    buckets: tuple[Size, ...]
    no_upscale: bool
    scale: float  # EfficientNet pixels per image pixel
    enabled: bool
    fixed: Size  # the single size when buckets are off

    @classmethod
    def of(cls, spec: DatasetSpec, scale: float) -> BucketRule:
        w, h = spec.resolution
        step = spec.bucket_reso_steps
        area = (w * scale) * (h * scale)
        buckets = make_buckets(area, int(spec.min_bucket_reso * scale), int(spec.max_bucket_reso * scale), step)
        fixed = (max(32, int(w * scale) // 32 * 32), max(32, int(h * scale) // 32 * 32))
        return cls(area, step, tuple(buckets), spec.bucket_no_upscale, scale, spec.enable_bucket, fixed)

    def preset(self, reso: Size) -> Size:
        """kohya's ``train_resolution`` (a bucket in image pixels) in EfficientNet pixels, multiples of 32."""
        return max(32, int(reso[0] * self.scale) // 32 * 32), max(32, int(reso[1] * self.scale) // 32 * 32)

    def bucket_for(self, size: Size) -> Size:
        """The bucket of an image of `size` (image pixels): nearest aspect ratio, or its own size (no upscale)."""
        if not self.enabled:
            return self.fixed
        w, h = size[0] * self.scale, size[1] * self.scale
        if self.no_upscale and w * h <= self.area:
            return max(self.step, int(w) // self.step * self.step), max(self.step, int(h) // self.step * self.step)
        if self.no_upscale:
            shrink = math.sqrt(self.area / (w * h))
            return (max(self.step, int(w * shrink) // self.step * self.step),
                    max(self.step, int(h * shrink) // self.step * self.step))
        ratio = math.log(w / h)
        return min(self.buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class ImageRecord:
    """One training image as found on disk."""

    path: Path
    caption: str  # the caption file's text, or the subset's class tokens
    size: Size  # original (w, h)
    bucket: Size  # EfficientNet input (w, h), multiples of 32
    dataset: int
    subset: int


def _use_preset_buckets(spec: DatasetSpec, dataset: int) -> None:
    """What kohya says when a metadata JSON's train_resolution gives the buckets (TrainingData turns them on)."""
    if not spec.enable_bucket:
        warnings.warn(f"dataset #{dataset + 1}: its metadata gives every image a train_resolution: those are the "
                      "buckets, enable_bucket=false has no effect (as in kohya)", stacklevel=3)
    if spec.bucket_no_upscale:
        warnings.warn(f"dataset #{dataset + 1}: bucket_no_upscale has no effect: the metadata's train_resolution "
                      "gives the buckets (kohya stops here; prepare_buckets_latents.py has its own "
                      "--bucket_no_upscale)", stacklevel=3)


def _read_caption(image: Path, subset: SubsetSpec) -> str | None:
    path = image.with_suffix(subset.caption_extension)
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        return text.splitlines()[0].strip() if text else ""  # kohya reads the first line
    return None


def _image_size(path: Path) -> Size:
    """The image's (w, h) after EXIF rotation; a file PIL cannot decode is a ConfigError naming it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated or corrupt file fails here, before any training
            img = ImageOps.exif_transpose(img) or img
            return img.size
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise ConfigError(f"{path}: not a readable image ({exc}); remove or replace the file") from None


def find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class TrainingData:
    """The records of all datasets and the deterministic global-batch plan over them."""

    def __init__(self, config: DatasetConfig, *, scale: float, seed: int, world_size: int = 1) -> None:
        self.config, self.seed, self.world_size = config, seed, world_size
        self.rules = [BucketRule.of(spec, scale) for spec in config.datasets]
        self.subsets: list[SubsetSpec] = []
        self.records: list[ImageRecord] = []
        missing: list[str] = []
        kohya_caches: list[Path] = []
        for d, spec in enumerate(config.datasets):
            found: list[tuple[Path, str, int, Size | None]] = []  # path, caption, subset, train_resolution
            seen_files: set[str] = set()
            for subset in spec.subsets:
                if subset.metadata_file:
                    if subset.metadata_file in seen_files:  # kohya keeps the first subset of one metadata file
                        warnings.warn(f"dataset #{d + 1}: metadata file {subset.metadata_file} is in two subsets; "
                                      "the first one is used (as in kohya)", stacklevel=2)
                        continue
                    seen_files.add(subset.metadata_file)
                    entries, caches = read_subset(subset)
                    kohya_caches += caches
                    if not entries:  # kohya skips such a subset too
                        warnings.warn(f"metadata file {subset.metadata_file}: no entries; the subset is skipped",
                                      stacklevel=2)
                        continue
                    self.subsets.append(subset)
                    found += [(e.path, e.caption, len(self.subsets) - 1, e.train_resolution) for e in entries]
                    continue
                self.subsets.append(subset)
                images = find_images(Path(subset.image_dir))
                if not images:
                    raise ConfigError(f"{subset.image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
                for path in images:
                    caption = _read_caption(path, subset)
                    if caption is None:
                        missing.append(path.name)
                        caption = subset.class_tokens or ""
                    found.append((path, caption, len(self.subsets) - 1, None))
            # kohya: when every image of a dataset has a train_resolution, those are its buckets
            preset = bool(found) and all(reso is not None for *_, reso in found)
            if preset:
                _use_preset_buckets(spec, d)
                self.rules[d] = replace(self.rules[d], enabled=True)  # the dataset's spec stays as given
            for path, caption, s, reso in found:
                size = _image_size(path)
                bucket = self.rules[d].preset(reso) if preset and reso else self.rules[d].bucket_for(size)
                self.records.append(ImageRecord(path, caption, size, bucket, d, s))
        if not self.records:
            raise ConfigError("no training images: every metadata file of the dataset config is empty")
        if missing:
            warnings.warn(f"{len(missing)} image(s) have no caption file (e.g. {missing[:3]}); they train with the "
                          "subset's class_tokens (or an empty caption)", stacklevel=2)
        if kohya_caches:
            warnings.warn(f"{len(kohya_caches)} kohya latent cache(s) beside the metadata's images (e.g. "
                          f"{kohya_caches[0]}) are not read: kohya's prepare_buckets_latents.py resizes with OpenCV's "
                          "INTER_AREA, cascade_lab with Lanczos, so the same image and bucket give other latents "
                          "(about 4 % apart; equal only for an image already at its bucket's size); cascade_lab "
                          "encodes the images itself", stacklevel=2)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    # -- plan ------------------------------------------------------------------------------------------
    def global_batch_size(self, dataset: int) -> int:
        return self.config.datasets[dataset].batch_size * self.world_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Global batches of record indices for one epoch: one bucket each, always full (padded from the bucket)."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = random.Random(derive_seed(self.seed, "epoch", epoch))
        groups: dict[tuple[int, Size], list[int]] = {}
        for i, rec in enumerate(self.records):
            groups.setdefault((rec.dataset, rec.bucket), []).extend([i] * self.subsets[rec.subset].num_repeats)
        batches = []
        for (dataset, _), items in sorted(groups.items()):
            rng.shuffle(items)
            size = self.global_batch_size(dataset)
            for start in range(0, len(items), size):
                chunk = items[start:start + size]
                chunk += [rng.choice(items) for _ in range(size - len(chunk))]
                batches.append(chunk)
        rng.shuffle(batches)
        self._epoch_cache = (epoch, batches)
        return batches

    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def batch(self, counter: int) -> tuple[int, list[int]]:
        """(epoch, record indices) of the `counter`-th global batch of the run."""
        per_epoch = self.batches_per_epoch()
        epoch, index = divmod(counter, per_epoch)
        return epoch, self.epoch_batches(epoch)[index]

    # -- one sample ------------------------------------------------------------------------------------
    def sample_rng(self, counter: int, position: int) -> random.Random:
        return random.Random(derive_seed(self.seed, "sample", counter, position))

    def caption_text(self, index: int) -> str:
        """The caption of record `index` with its subset's prefix and suffix, no dropout or shuffling."""
        rec, subset = self.records[index], self.subsets[self.records[index].subset]
        return with_prefix_suffix(rec.caption, subset)

    def caption(self, index: int, epoch: int, rng: random.Random, step: int | None = None,
                total_steps: int | None = None) -> str:
        """The caption of record `index` as trained this time (in optimizer step `step` of `total_steps`):
        prefix/suffix, dropout, token warm-up, shuffling, tag dropout."""
        rec, subset = self.records[index], self.subsets[self.records[index].subset]
        return make_caption(rec.caption, subset, epoch, rng, step=step, total_steps=total_steps)

    def flip(self, index: int, rng: random.Random) -> bool:
        return self.subsets[self.records[index].subset].flip_aug and rng.random() < 0.5

    def image(self, index: int, *, flip: bool = False, rng: random.Random | None = None) -> Any:
        """Record `index` resized to cover its bucket, cropped (centre, or random with `rng`): [3, h, w] in [0, 1]."""
        rec = self.records[index]
        crop_rng = rng if self.subsets[rec.subset].random_crop else None
        return load_image(rec.path, rec.bucket, flip=flip, rng=crop_rng)


def with_prefix_suffix(caption: str, subset: SubsetSpec) -> str:
    """The caption with its subset's `caption_prefix` and `caption_suffix`, each joined by a space as kohya joins
    them ("sks" + "a dog" is "sks a dog", not "sksa dog")."""
    if subset.caption_prefix:
        caption = f"{subset.caption_prefix} {caption}"
    if subset.caption_suffix:
        caption = f"{caption} {subset.caption_suffix}"
    return caption


def warmup_steps(token_warmup_step: float, total_steps: int) -> float:
    """The optimizer step from which a caption keeps all its tags: `token_warmup_step`, or below 1 that fraction
    of the run's `total_steps` rounded down (kohya); 0: no warm-up."""
    return math.floor(token_warmup_step * total_steps) if token_warmup_step < 1 else token_warmup_step


def warmup_tags(tags: int, minimum: int, step: int, until: float) -> int:
    """How many of a caption's `tags` (those after the kept ones) token warm-up keeps at optimizer `step`: kohya's
    line from `minimum` at step 0 to all of them at step `until`, rounded down (its float expression, kept)."""
    if not until or step >= until:
        return tags
    return math.floor(step * ((tags - minimum) / until)) + minimum


def make_caption(caption: str, subset: SubsetSpec, epoch: int, rng: random.Random, *, step: int | None = None,
                 total_steps: int | None = None) -> str:
    """kohya's caption handling, in its order: prefix + caption + suffix, dropout to "", then the tags (split at
    `caption_separator`; those before keep_tokens / keep_tokens_separator are kept in place) cut to the token
    warm-up's count at optimizer `step` of `total_steps`, shuffled, and each dropped with caption_tag_dropout_rate;
    joined with ", " as kohya joins them."""
    text = with_prefix_suffix(caption, subset)
    draw = rng.random()  # always drawn, so the stream does not depend on the settings below
    every = subset.caption_dropout_every_n_epochs
    if (every and epoch % every == 0) or draw < subset.caption_dropout_rate:
        return ""
    tag_dropout = subset.caption_tag_dropout_rate
    if not (subset.shuffle_caption or subset.token_warmup_step > 0 or tag_dropout > 0):
        return text

    def split(part: str) -> list[str]:
        return [t.strip() for t in part.split(subset.caption_separator) if t.strip()]

    if subset.keep_tokens_separator and subset.keep_tokens_separator in text:
        fixed_text, rest_text = text.split(subset.keep_tokens_separator, 1)
        fixed, rest = split(fixed_text), split(rest_text)
    else:
        tokens = split(text)
        fixed, rest = tokens[:subset.keep_tokens], tokens[subset.keep_tokens:]
    if subset.token_warmup_step > 0:  # the first tags, before shuffling
        if step is None or total_steps is None:
            raise ValueError("token warm-up cuts a caption by the optimizer step: pass step and total_steps")
        rest = rest[:warmup_tags(len(rest), subset.token_warmup_min, step,
                                 warmup_steps(subset.token_warmup_step, total_steps))]
    if subset.shuffle_caption:
        rng.shuffle(rest)
    if tag_dropout > 0:
        rest = [t for t in rest if rng.random() >= tag_dropout]  # one draw per tag, in the shuffled order
    return ", ".join(fixed + rest)


def load_image(path: Path, bucket: Size, *, flip: bool = False, rng: random.Random | None = None) -> Any:
    """An image file → float32 [3, h, w] in [0, 1] at `bucket` (w, h): cover-resize (Lanczos), crop, flip."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    bw, bh = bucket
    with Image.open(path) as img:
        img = (ImageOps.exif_transpose(img) or img).convert("RGB")
        w, h = img.size
        scale = max(bw / w, bh / h)
        size = (max(bw, round(w * scale)), max(bh, round(h * scale)))
        if size != (w, h):
            img = img.resize(size, Image.Resampling.LANCZOS)
        dx, dy = size[0] - bw, size[1] - bh
        left, top = (rng.randint(0, dx), rng.randint(0, dy)) if rng is not None else (dx // 2, dy // 2)
        img = img.crop((left, top, left + bw, top + bh))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(img, dtype=np.float32) / 255.0  # [h, w, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # [3, h, w]


__all__ = ["BucketRule", "ImageRecord", "TrainingData", "derive_seed", "load_image", "make_buckets",
           "make_caption", "warmup_steps", "warmup_tags"]
