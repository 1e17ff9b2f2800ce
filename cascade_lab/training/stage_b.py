"""Stage B training as the official ``train/train_b.py`` does it, and the cache of its encoder outputs.

Per global batch (spec/training.md; official ``WurstCore.get_conditions`` / ``forward_pass``):

* target: the Stage A encoder latent of the image, ``stage_a.encode(images)[0]`` (the latent divided by
  Stage A's ``scale_factor`` 0.43), [4, H/4, W/4];
* condition ``effnet``: EfficientNet latents of the image resized (nearest) by one ``effnet_factor`` drawn
  uniformly in [0.5, 1) for the whole batch, to ``floor(side · factor / 32) · 32`` pixels, so the decoder learns
  from Stage C latents of 1/2 to 1/1 the image's own; each sample keeps it with probability 0.9 and gets zeros
  otherwise (the unconditional case CFG uses);
* condition ``clip``: the pooled CLIP-G text embedding, with the usual 5 % empty captions;
* ``pixels`` is never given (zeros [B, 3, 8, 8], as every official call);
* noise: ε made "pyramid" noise (``_pyramid_noise(ε, size_range=[1, 16])``: nearest-upsampled coarse noise of
  the levels 1-16 px high, weights 0.75^i, renormalised), GDF ``diffuse(shift=1, loss_shift=1)`` with the
  cosine schedule, cosine-t noise condition and P2 (or, with ``adaptive_loss_weight``, adaptive) weights.

Validation uses the official evaluation condition: EfficientNet on the whole image (factor 1), never dropped.

Caching: a training image has one Stage A latent and a few EfficientNet latents (one per size the factor can
give: 17 for a 1024 px square), all stored in one file per image keyed like the Stage C latent cache (the
file's bytes, bucket, crop and resize rule, and both encoders' fingerprints), so every batch draws the official
factor and still never runs an encoder.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .cache import CACHE_VERSION, ImageCache, _key, _write, on_loan
from .data import TrainingData, derive_seed

Tensor = torch.Tensor
EFFNET_FACTOR = (0.5, 1.0)  # official: np.random.uniform(0.5, 1) per batch
EFFNET_KEEP = 0.9  # official: rand <= 0.9 keeps the EfficientNet condition, else zeros
PYRAMID_RANGE = (1, 16)  # official: _pyramid_noise(epsilon, size_range=[1, 16])
Size = tuple[int, int]  # (height, width) in pixels


def effnet_size(bucket: tuple[int, int], factor: float) -> Size:
    """EfficientNet input (h, w) for a bucket (w, h) at `factor`: each side floored to a multiple of 32 (at least
    32, where the official code would make an empty image)."""
    w, h = bucket
    return max(32, int(h * factor // 32 * 32)), max(32, int(w * factor // 32 * 32))


def effnet_sizes(bucket: tuple[int, int]) -> list[Size]:
    """Every size `effnet_size` gives for a factor in [0.5, 1), and the whole image (validation)."""
    w, h = bucket
    lo = EFFNET_FACTOR[0]
    breaks = {lo} | {32 * k / side for side in (w, h) for k in range(1, side // 32 + 1) if lo <= 32 * k / side < 1}
    sizes = {effnet_size(bucket, f + 1e-9 if f > lo else f) for f in breaks} | {effnet_size(bucket, 1.0)}
    return sorted(sizes)


def batch_factor(seed: int, counter: int) -> float:
    """The effnet_factor of global batch `counter` (one per batch, as official)."""
    return random.Random(derive_seed(seed, "effnet_factor", counter)).uniform(*EFFNET_FACTOR)


def keeps_effnet(seed: int, counter: int, position: int) -> bool:
    """Whether sample `position` of global batch `counter` keeps its EfficientNet condition."""
    return random.Random(derive_seed(seed, "effnet_keep", counter, position)).random() <= EFFNET_KEEP


def pyramid_noise(epsilon: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The official ``_pyramid_noise(ε, size_range=[1, 16])`` of ε [C, H, W] (one sample, its own generator).

    Level i (1…9) adds nearest-upsampled N(0, 1) noise of (H / 2^i) x (H / 2^i) times 0.75^i when that height is
    in [1, 16]; the sum is divided by sqrt(Σ m²). As the official code, the coarse grid is square (both sides
    from the height) and the loop stops after the first level 1 px high."""
    out = epsilon.clone()
    multipliers = [1.0]
    for i in range(1, 10):
        m = 0.75**i
        side = epsilon.size(-2) // (2**i)
        if PYRAMID_RANGE[0] <= side <= PYRAMID_RANGE[1]:
            offset = torch.randn(1, epsilon.size(0), side, side, generator=generator)
            out = out + torch.nn.functional.interpolate(offset, size=tuple(epsilon.shape[-2:]), mode="nearest")[0] * m
            multipliers.append(m)
        if side <= 1:
            break
    return out / math.sqrt(sum(m**2 for m in multipliers))


@torch.no_grad()
def encode_effnet(effnet: Any, images: Tensor, size: Size, device: torch.device) -> Tensor:
    """RGB [B, 3, H, W] in [0, 1] resized (nearest, as official) to `size` → EfficientNet latents, float32 CPU."""
    effnet.to(device)
    images = images.to(device)
    if tuple(images.shape[-2:]) != tuple(size):
        images = torch.nn.functional.interpolate(images, size=size, mode="nearest")
    return torch.nan_to_num(effnet.encode_image(images).float().cpu(), nan=0.0)


@torch.no_grad()
def encode_stage_a(stage_a: Any, images: Tensor, device: torch.device) -> Tensor:
    """RGB [B, 3, H, W] in [0, 1] → Stage A latents [B, 4, H/4, W/4] (``encode(x)[0]``: divided by scale_factor)."""
    stage_a.to(device)
    weight = next(stage_a.parameters())
    return stage_a.encode(images.to(device, weight.dtype))[0].float().cpu()


def _effnet_key(size: Size, flip: bool) -> str:
    return f"effnet_{size[0]}x{size[1]}" + ("_flipped" if flip else "")


class StageBCache(ImageCache):
    """Per training image: its Stage A latent and its EfficientNet latents at every size the factor can give
    (and the same of its mirror image when flip_aug is on). Misses are encoded on first use."""

    def __init__(self, folder: Path | None, data: TrainingData, effnet: Callable[[], Any],
                 stage_a: Callable[[], Any], fingerprints: Callable[[], tuple[str, str]], device: torch.device) -> None:
        super().__init__(folder, data, device)
        self._effnet, self._stage_a, self._fingerprints = effnet, stage_a, fingerprints

    def key(self, index: int) -> str:
        rec = self.data.records[index]
        effnet_fp, stage_a_fp = self._fingerprints()
        return _key({"v": CACHE_VERSION, "kind": "stage_b", "file": self.digest(index), "bucket": rec.bucket,
                     "crop": "center", "resize": "lanczos-cover", "effnet": effnet_fp, "stage_a": stage_a_fp,
                     "effnet_resize": "nearest", "factor": list(EFFNET_FACTOR), "dtype": "float32"})

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / "stage_b" / key[:2] / f"{key}.safetensors"

    def _complete(self, index: int, entry: dict[str, Tensor]) -> bool:
        flips = (False, True) if self._needs_flip(index) else (False,)
        sizes = effnet_sizes(self.data.records[index].bucket)
        return all(("stage_a_flipped" if f else "stage_a") in entry and all(_effnet_key(s, f) in entry
                                                                             for s in sizes) for f in flips)

    def _encoders(self) -> list[Any]:
        return [self._effnet(), self._stage_a()]

    def _encode_group(self, indices: list[int]) -> None:
        images = torch.stack([self.data.image(i) for i in indices])  # [n, 3, h, w], one bucket
        sizes = effnet_sizes(self.data.records[indices[0]].bucket)
        entries: list[dict[str, Tensor]] = [{} for _ in indices]
        flips = (False, True) if any(self._needs_flip(i) for i in indices) else (False,)
        for flip in flips:
            batch = images.flip(-1) if flip else images
            target = encode_stage_a(self._stage_a(), batch, self.device)
            for j in range(len(indices)):
                entries[j]["stage_a_flipped" if flip else "stage_a"] = target[j]
            for size in sizes:
                latents = encode_effnet(self._effnet(), batch, size, self.device)
                for j in range(len(indices)):
                    entries[j][_effnet_key(size, flip)] = latents[j]
        for index, entry in zip(indices, entries, strict=True):
            if not self._needs_flip(index):
                entry = {k: v for k, v in entry.items() if not k.endswith("_flipped")}
            key = self.key(index)
            if self.folder is not None:
                _write(self._path(key), entry)
            self._memory[key] = entry
        self.encoded += len(indices)

    def _entry(self, index: int) -> dict[str, Tensor]:
        key = self.key(index)
        if key not in self._memory:
            self.prepare([index])
        return self._memory[key]

    def target(self, index: int, flip: bool = False) -> Tensor:
        """The Stage A latent [4, H/4, W/4] of the image (mirrored with `flip`)."""
        return self._entry(index)["stage_a_flipped" if flip else "stage_a"]

    def effnet(self, index: int, size: Size, flip: bool = False) -> Tensor:
        """The EfficientNet latent [16, h/32, w/32] of the image resized to `size` (h, w)."""
        entry = self._entry(index)
        name = _effnet_key(size, flip)
        if name not in entry:  # a size no factor in [0.5, 1) gives (a rounding edge): encoded once, kept in memory
            image = self.data.image(index, flip=flip)[None]
            with on_loan([self._effnet()], self.device):
                entry[name] = encode_effnet(self._effnet(), image, size, self.device)[0]
        return entry[name]


__all__ = ["EFFNET_FACTOR", "EFFNET_KEEP", "StageBCache", "batch_factor", "effnet_size", "effnet_sizes",
           "encode_effnet", "encode_stage_a", "keeps_effnet", "pyramid_noise"]
