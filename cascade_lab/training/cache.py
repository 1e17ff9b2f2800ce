"""On-disk caches of EfficientNet latents and text embeddings.

A cache file's name is a hash of everything that decides its content: the image file's bytes (or the
caption text), the bucket size, crop and resize rule, the encoder's fingerprint and dtype, and a format
version. Changing any of them gives other names, so stale entries are never read. Files are written to a
temporary name and renamed, so a crash or a second process never leaves a half-written entry.
Options that would make a cache wrong are refused before anything is encoded.

A cache borrows its encoders: they come to the training device for the misses of one `prepare` (or one
on-the-fly encode) and go back where they were (the CPU, where the run loads them) right after, so a run whose
caches were cold does not keep EfficientNet, Stage A or the text encoder on the GPU during its steps (kohya moves
its VAE and text encoder off the GPU after caching the same way).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, TrainConfig
from .data import TrainingData

CACHE_VERSION = 1
Tensor = torch.Tensor


def check_cache_options(config: TrainConfig, data: TrainingData) -> None:
    """Refuse settings that cached values cannot honour (kohya refuses the same ones)."""
    for subset in data.subsets:
        where = f"subset {subset.metadata_file or subset.image_dir}"
        if config.cache_latents and (subset.random_crop or subset.color_aug):
            option = "random_crop" if subset.random_crop else "color_aug"
            raise ConfigError(f"{where}: {option}=true with cache_latents=true: a cached latent freezes one crop "
                              f"and colour; set cache_latents=false (encode every step) or {option}=false")
        if subset.color_aug:
            raise ConfigError(f"{where}: color_aug is not implemented; remove it")
        if config.cache_text_encoder_outputs and subset.shuffle_caption:
            raise ConfigError(f"{where}: shuffle_caption=true with cache_text_encoder_outputs=true: every shuffled "
                              "caption is a different text; set cache_text_encoder_outputs=false or "
                              "shuffle_caption=false. (Caption dropout is fine: the empty caption is cached too.)")
        for option in ("caption_tag_dropout_rate", "token_warmup_step"):
            value = getattr(subset, option)
            if config.cache_text_encoder_outputs and value > 0:
                raise ConfigError(f"{where}: {option}={value!r} with cache_text_encoder_outputs=true: the captions "
                                  "change from step to step, so their text embeddings cannot be cached; set "
                                  f"cache_text_encoder_outputs=false (encoded every step) or {option}=0")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def _write(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Tensor] | None:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception:  # missing or damaged: the caller encodes again
        return None


def placement(part: Any) -> torch.device | None:
    """The device a model is on: its ``device`` (a TextEncoder's), else its first parameter's; None if unknown."""
    device = getattr(part, "device", None)
    if isinstance(device, torch.device):
        return device
    parameters = getattr(part, "parameters", None)
    if callable(parameters):
        for p in parameters():
            return p.device  # type: ignore[no-any-return]
    return None


@contextmanager
def on_loan(parts: Iterable[Any], device: torch.device) -> Iterator[None]:
    """Hold frozen encoders on `device` for one use, then put each back on the device it was on before."""
    with ExitStack() as stack:
        for part in parts:
            home = placement(part)
            part.to(device)
            if home is not None:
                stack.callback(part.to, home)
        yield


class ImageCache:
    """Encoder outputs per training image, one file each under `folder` (keyed by the image file's bytes, its
    bucket and the encoders' fingerprints) and in memory; subclasses say what an entry holds."""

    def __init__(self, folder: Path | None, data: TrainingData, device: torch.device) -> None:
        self.folder, self.data, self.device = folder, data, device
        self._digests: dict[int, str] = {}
        self._memory: dict[str, dict[str, Tensor]] = {}
        self.encoded = 0  # images run through the encoders by this object (tests count cache misses)

    def digest(self, index: int) -> str:
        if index not in self._digests:
            self._digests[index] = file_digest(self.data.records[index].path)
        return self._digests[index]

    def key(self, index: int) -> str:
        raise NotImplementedError

    def _path(self, key: str) -> Path:
        raise NotImplementedError

    def _complete(self, index: int, entry: dict[str, Tensor]) -> bool:
        raise NotImplementedError

    def _encode_group(self, indices: list[int]) -> None:
        raise NotImplementedError

    def _encoders(self) -> list[Any]:
        """The encoders a miss runs (built on first use), lent to the device while misses are encoded."""
        raise NotImplementedError

    def _needs_flip(self, index: int) -> bool:
        return self.data.subsets[self.data.records[index].subset].flip_aug

    def prepare(self, indices: Iterable[int]) -> int:
        """Encode and store every listed image not cached yet; returns how many were encoded."""
        todo = []
        for index in sorted(set(indices)):
            key = self.key(index)
            if key in self._memory:
                continue
            stored = _read(self._path(key)) if self.folder is not None else None
            if stored is not None and self._complete(index, stored):
                self._memory[key] = stored
            else:
                todo.append(index)
        if not todo:
            return 0
        with on_loan(self._encoders(), self.device):
            for start in range(0, len(todo), 8):
                by_bucket: dict[tuple[int, int], list[int]] = {}
                for index in todo[start:start + 8]:
                    by_bucket.setdefault(self.data.records[index].bucket, []).append(index)
                for group in by_bucket.values():
                    self._encode_group(group)
        return len(todo)


class LatentCache(ImageCache):
    """EfficientNet latents [16, h, w] per training image (and its mirror image when flip_aug is on)."""

    def __init__(self, folder: Path | None, data: TrainingData, effnet: Callable[[], Any],
                 fingerprint: Callable[[], str], device: torch.device) -> None:
        super().__init__(folder, data, device)
        self._effnet, self._fingerprint = effnet, fingerprint

    def key(self, index: int) -> str:
        rec = self.data.records[index]
        return _key({"v": CACHE_VERSION, "kind": "latent", "file": self.digest(index), "bucket": rec.bucket,
                     "crop": "center", "resize": "lanczos-cover", "encoder": self._fingerprint(), "dtype": "float32"})

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / "latents" / key[:2] / f"{key}.safetensors"

    def _complete(self, index: int, entry: dict[str, Tensor]) -> bool:
        return not self._needs_flip(index) or "latents_flipped" in entry

    def _encoders(self) -> list[Any]:
        return [self._effnet()]

    def _encode_group(self, indices: list[int]) -> None:
        images = torch.stack([self.data.image(i) for i in indices])  # [n, 3, h, w]
        latents = encode_images(self._effnet(), images, self.device)
        flipped = encode_images(self._effnet(), images.flip(-1), self.device) if any(
            self._needs_flip(i) for i in indices) else None
        for j, index in enumerate(indices):
            entry = {"latents": latents[j]}
            if flipped is not None and self._needs_flip(index):
                entry["latents_flipped"] = flipped[j]
            key = self.key(index)
            if self.folder is not None:
                _write(self._path(key), entry)
            self._memory[key] = entry
        self.encoded += len(indices)

    def get(self, index: int, flip: bool = False) -> Tensor:
        key = self.key(index)
        if key not in self._memory:
            self.prepare([index])
        return self._memory[key]["latents_flipped" if flip else "latents"]


@dataclass(frozen=True)
class TextLayout:
    """How a caption becomes Stage C's ``clip_text`` rows (TrainConfig.long_captions / max_token_length)."""

    windows: int | None = None  # CLIP windows of 75 tokens per caption; None: as many as the caption needs
    kohya_rows: bool = False  # kohya's --max_token_length join: 75·windows + 2 rows instead of 77·windows

    @classmethod
    def of(cls, config: TrainConfig) -> TextLayout:
        if config.long_captions == "windows":
            return cls()
        if config.long_captions == "kohya" and config.max_token_length:
            return cls(config.max_token_length // 75, True)
        return cls(1)  # the official trainer and kohya without --max_token_length: the first 75 tokens


def kohya_rows(clip_text: Tensor, windows: int) -> Tensor:
    """kohya's ``get_hidden_states_stable_cascade`` join of `windows` CLIP windows [B, 77·n, C] → [B, 75·n + 2, C]:
    the first window's start-token row, the 75 rows after the start token of every window, the last window's
    last row (so a window's end-token row is kept only where it falls inside those 75)."""
    B, T, C = clip_text.shape
    per = clip_text.view(B, windows, T // windows, C)  # [B, n, 77, C]
    inner = per[:, :, 1:-1].reshape(B, windows * (T // windows - 2), C)  # [B, 75·n, C]
    return torch.cat([per[:, 0, :1], inner, per[:, -1, -1:]], dim=1)


class TextCache:
    """CLIP-G ``clip_text`` [T, C] and ``clip_text_pooled`` [1, C] per caption text (the empty caption included)."""

    def __init__(self, folder: Path | None, text_encoder: Callable[[], Any], fingerprint: Callable[[], str],
                 device: torch.device, layout: TextLayout = TextLayout()) -> None:
        self.folder, self._encoder, self._fingerprint, self.device = folder, text_encoder, fingerprint, device
        self.layout = layout
        self._memory: dict[str, dict[str, Tensor]] = {}
        self.encoded = 0

    def key(self, caption: str) -> str:
        parts: dict[str, Any] = {"v": CACHE_VERSION, "kind": "text", "caption": caption,
                                 "encoder": self._fingerprint()}
        if self.layout != TextLayout():  # the default's keys stay those of earlier caches
            parts["layout"] = [self.layout.windows, self.layout.kohya_rows]
        return _key(parts)

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / "text" / key[:2] / f"{key}.safetensors"

    def prepare(self, captions: Iterable[str]) -> int:
        todo = []
        for caption in sorted(set(captions)):
            key = self.key(caption)
            if key in self._memory:
                continue
            stored = _read(self._path(key)) if self.folder is not None else None
            if stored is not None:
                self._memory[key] = stored
            else:
                todo.append(caption)
        if not todo:
            return 0
        with on_loan([self._encoder()], self.device):
            for caption in todo:  # one at a time: each keeps its own number of 77-token windows
                clip_text, pooled = encode_text(self._encoder(), [caption], self.device, self.layout)
                entry = {"clip_text": clip_text[0], "clip_text_pooled": pooled[0]}
                if self.folder is not None:
                    _write(self._path(self.key(caption)), entry)
                self._memory[self.key(caption)] = entry
        self.encoded += len(todo)
        return len(todo)

    def get(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Batched ([B, T, C], [B, 1, C]); captions of different window counts are encoded together instead."""
        self.prepare(captions)
        entries = [self._memory[self.key(c)] for c in captions]
        if len({e["clip_text"].shape[0] for e in entries}) > 1:
            with on_loan([self._encoder()], self.device):
                return encode_text(self._encoder(), list(captions), self.device, self.layout)
        return (torch.stack([e["clip_text"] for e in entries]), torch.stack([e["clip_text_pooled"] for e in entries]))


@torch.no_grad()
def encode_images(effnet: Any, images: Tensor, device: torch.device) -> Tensor:
    """RGB [B, 3, H, W] in [0, 1] → latents [B, 16, H/32, W/32] (float32, CPU); NaNs become 0 (kohya)."""
    effnet.to(device)
    latents = effnet.encode_image(images.to(device)).float().cpu()
    return torch.nan_to_num(latents, nan=0.0)


@torch.no_grad()
def encode_text(text_encoder: Any, captions: list[str], device: torch.device,
                layout: TextLayout = TextLayout()) -> tuple[Tensor, Tensor]:
    """Captions → (clip_text [B, T, C], clip_text_pooled [B, 1, C]) in float32 on the CPU, T as `layout` says."""
    text_encoder.to(device)
    if layout.windows is None:
        clip_text, pooled = text_encoder.encode(captions)
    else:
        clip_text, pooled = text_encoder.encode(captions, windows=layout.windows)
    if layout.kohya_rows:
        clip_text = kohya_rows(clip_text, layout.windows or 1)
    return clip_text.float().cpu(), pooled.float().cpu()


__all__ = ["CACHE_VERSION", "LatentCache", "TextCache", "TextLayout", "check_cache_options", "encode_images",
           "encode_text", "file_digest", "kohya_rows", "on_loan", "placement"]
