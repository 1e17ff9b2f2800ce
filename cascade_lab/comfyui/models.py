"""What a ComfyUI loader node hands on (MODEL, CLIP, VAE, CLIP_VISION, CONTROL_NET), loaded on cascade_lab's
classes only when a node first uses it: a workflow whose VAE encode is given never loads the encoder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ComfyUI's model config for Stable Cascade: Stage C samples at shift 2, Stage B at shift 1
DEFAULT_SHIFT = {"c": 2.0, "b": 1.0}


class ModelFiles:
    """Loads the parts of model files once per run (``configs``: sizes a header cannot name, per part;
    ``tokenizer``: a CLIP tokenizer folder, else it is looked for next to the file and in ComfyUI)."""

    def __init__(self, configs: Mapping[str, Any] | None = None, tokenizer: Any = None, comfyui: Any = None) -> None:
        self.configs = dict(configs or {})
        self.tokenizer, self.comfyui = tokenizer, comfyui
        self._cache: dict[tuple[str, str, tuple[tuple[str, float], ...]], Any] = {}

    def parts(self, path: Path) -> dict[str, Any]:
        from ..weights import detect

        return dict(detect(path).components)

    def load(self, path: Path, part: str, loras: tuple[tuple[str, float], ...] = ()) -> Any:
        key = (str(path), part, loras)
        if key not in self._cache:
            self._cache[key] = self._load(path, part, loras)
        return self._cache[key]

    def _load(self, path: Path, part: str, loras: tuple[tuple[str, float], ...]) -> Any:
        import torch

        if part == "text_encoder":
            from ..models.clip import TextEncoder

            encoder = TextEncoder.from_file(path, config=self._clip_config("text_encoder"), dtype=torch.float32,
                                            tokenizer_path=self.tokenizer, comfyui=self.comfyui)
            if loras:  # LoraLoader's strength_clip: the files' text-encoder parts, apart from the model's
                from ..models.lora import apply_text_encoder_lora

                for lora, strength in loras:
                    apply_text_encoder_lora(encoder, lora, strength)
            return encoder
        if part == "image_encoder":
            from ..models.clip import ImageEncoder

            return ImageEncoder.from_file(path, config=self._clip_config("image_encoder"), dtype=torch.float32)
        from ..weights import load_stage

        config = self.configs.get(f"{part}:{path.name}", self.configs.get(part))  # per file, else per part
        module = load_stage(part, path, dtype=torch.float32, config=config).requires_grad_(False)
        if loras:
            from ..models.lora import apply_lora, load_lora_file

            for lora, strength in loras:
                # the text-encoder part goes to the CLIP output (Clip.loras), at LoraLoader's strength_clip
                apply_lora(module, load_lora_file(lora), strength, text_encoder=False)
        return module

    def _clip_config(self, part: str) -> Any:
        """A given config; a mapping changes the fields of CLIP-G text / CLIP-L vision (e.g. the sizes only)."""
        given = self.configs.get(part)
        if given is None or not isinstance(given, Mapping):
            return given
        from ..models.clip import clip_g_text_config, clip_l_vision_config

        base = clip_g_text_config() if part == "text_encoder" else clip_l_vision_config()
        return type(base)(**{**base.to_dict(), **given})


@dataclass(frozen=True)
class Model:
    """MODEL: Stage C or Stage B of a file, with the LoRAs merged into it and its sampling shift."""

    files: ModelFiles
    path: Path
    stage: str  # "c" or "b"
    shift: float
    loras: tuple[tuple[str, float], ...] = ()

    def module(self) -> Any:
        return self.files.load(self.path, "stage_c" if self.stage == "c" else "stage_b", self.loras)


@dataclass(frozen=True)
class Clip:
    """CLIP: the CLIP-G text encoder of a file, with the text-encoder parts of LoRAs merged into it."""

    files: ModelFiles
    path: Path
    loras: tuple[tuple[str, float], ...] = ()  # (file, LoraLoader's strength_clip)

    def encoder(self) -> Any:
        return self.files.load(self.path, "text_encoder", self.loras)


@dataclass(frozen=True)
class Vae:
    """VAE: a Stage C checkpoint's (EfficientNet encoder + Previewer, kind "c") or a Stage B one's (Stage A, "b")."""

    files: ModelFiles
    path: Path
    kind: str

    def part(self, name: str) -> Any:
        return self.files.load(self.path, name)

    def encode(self, images: Any) -> Any:
        """ComfyUI's encode of a Stage C checkpoint's VAE: RGB [B, 3, H, W] in [0, 1] (H, W multiples of 32) →
        EfficientNet latent [B, 16, H/32, W/32], normalised with the mean / std the file stores (ComfyUI saves
        them in float16, so they are ImageNet's rounded; a file without them: ImageNet's)."""
        import torch

        from ..models.effnet import IMAGENET_MEAN, IMAGENET_STD
        from ..weights import effnet_normalization, read_header

        effnet = self.part("effnet")
        prefix = self.files.parts(self.path)["effnet"].prefix
        stored = effnet_normalization(read_header(self.path), prefix)
        mean = torch.tensor(stored.get("mean", IMAGENET_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(stored.get("std", IMAGENET_STD), dtype=torch.float32).view(1, 3, 1, 1)
        x = (images.float().contiguous() * 2 - 1) * 0.5 + 0.5  # ComfyUI's VAE: to [-1, 1] and back
        with torch.inference_mode():
            return effnet((x - mean) / std).float()


@dataclass(frozen=True)
class ClipVision:
    files: ModelFiles
    path: Path

    def encoder(self) -> Any:
        return self.files.load(self.path, "image_encoder")


@dataclass(frozen=True)
class ControlNet:
    files: ModelFiles
    path: Path

    def module(self) -> Any:
        return self.files.load(self.path, "controlnet")


@dataclass(frozen=True)
class Cond:
    """One CONDITIONING entry: CLIP-G tokens [1, T, C] and pooled [1, C], with what nodes added to it."""

    cond: Any
    pooled: Any
    prompt: str = ""
    prior: Any = None  # stable_cascade_prior: the Stage C latent Stage B is conditioned on
    image_embeds: tuple[Any, ...] = ()  # unCLIP: CLIP vision embeddings [768] · strength
    controls: tuple[Any, ...] = ()  # (ControlNet, hint IMAGE [B, H, W, 3], strength, start, end)
    source: str = ""  # the node id the text came from (for the result's parameters)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> tuple[float, float]:
        """The fraction of the steps it applies in (ConditioningSetTimestepRange; all by default)."""
        start, end = self.extra.get("timestep_range", (0.0, 1.0))
        return float(start), float(end)

    def with_(self, **changes: Any) -> Cond:
        from dataclasses import replace

        return replace(self, **changes)


@dataclass(frozen=True)
class Latent:
    """LATENT: ``samples`` in ComfyUI's scale (Stage B: the model's latent · 0.43), which stage it is for, and
    what made it (for the result's parameters)."""

    samples: Any
    stage: str  # "c" or "b"
    raw: Any = None  # Stage B's model-scale latent when a KSampler made it (no 0.43 round trip before Stage A)
    info: Mapping[str, Any] = field(default_factory=dict)
