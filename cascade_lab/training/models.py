"""The models a run needs: Stage C (trained), and EfficientNet, text encoder, previewer, Stage B/A (frozen).

Only Stage C is built up front; the others are built on first use, so a run whose latents and text
embeddings are all cached never builds the encoders. ``model="tiny"`` gives seeded tiny models; a variant
name or explicit files load the real ones; objects may also be handed in directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..models.tiny import TINY_EFFNET_SEED, calibrated_random_effnet
from .config import TrainConfig


def module_fingerprint(module: Any) -> str:
    """A cheap content hash of a module's tensors: names, shapes, dtypes and a strided sample of values."""
    model = getattr(module, "model", module)  # TextEncoder wraps a transformers model
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        sample = flat[::stride].float().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
        digest.update(sample.numpy().tobytes())
        digest.update(str(float(flat.float().sum())).encode())
    return digest.hexdigest()[:24]


class TrainingModels:
    """Stage C plus lazily built frozen helpers; `fingerprint(name)` keys the caches."""

    def __init__(self, stage_c: nn.Module, factories: dict[str, Callable[[], Any]],
                 fingerprints: dict[str, str] | None = None, source: str = "") -> None:
        self.stage_c, self.source = stage_c, source
        self._factories = factories
        self._built: dict[str, Any] = {}
        self._fingerprints = dict(fingerprints or {})

    def has(self, name: str) -> bool:
        return name in self._built or name in self._factories

    def get(self, name: str) -> Any:
        """The helper model `name` (effnet, text_encoder, previewer, stage_b, stage_a), built on first use."""
        if name not in self._built:
            if name not in self._factories:
                raise ValueError(f"this run has no {name} model; pass one or use a variant that has it")
            self._built[name] = self._factories[name]()
        return self._built[name]

    def fingerprint(self, name: str) -> str:
        if name not in self._fingerprints:
            self._fingerprints[name] = module_fingerprint(self.get(name))
        return self._fingerprints[name]


def _tiny_stages(seed: int) -> Any:
    from ..models.tiny import build_tiny

    with torch.random.fork_rng(devices=[]):  # build_tiny seeds the global RNG; keep the run's stream
        return build_tiny(seed)


def build_models(config: TrainConfig, *, stages: Any = None, stage_c: nn.Module | None = None,
                 text_encoder: Any = None, effnet: Any = None, device: torch.device | None = None) -> TrainingModels:
    """The models of `config`; objects passed here win over the config's `model` and paths."""
    factories: dict[str, Callable[[], Any]] = {}
    fingerprints: dict[str, str] = {}
    source = config.model
    if config.model == "tiny":
        from ..models.stage_c import StageCConfig

        if stage_c is None and stages is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                stage_c = StageCConfig.tiny().build()  # the official init: zero output conv
        cache: dict[str, Any] = {}

        def tiny(name: str) -> Callable[[], Any]:
            def build() -> Any:
                if "stages" not in cache:
                    cache["stages"] = _tiny_stages(0)
                return getattr(cache["stages"], name)
            return build

        for name in ("text_encoder", "previewer", "stage_b", "stage_a"):
            factories[name] = tiny(name)
        factories["effnet"] = calibrated_random_effnet
        fingerprints.update(effnet=f"tiny-effnet-{TINY_EFFNET_SEED}-v1", text_encoder="tiny-text-encoder-v1")
    else:
        factories.update(_file_factories(config))
    if stages is not None:
        from ..pipeline import Lazy

        for name in ("text_encoder", "previewer", "stage_b", "stage_a", "effnet"):
            value = getattr(stages, name, None)
            if value is not None:
                factories[name] = value.load if isinstance(value, Lazy) else (lambda v: lambda: v)(value)
                fingerprints.pop(name, None)
        stage_c = stage_c if stage_c is not None else stages.stage_c
        source = getattr(stages, "variant", "") or "stages"
    for name, value in (("text_encoder", text_encoder), ("effnet", effnet)):
        if value is not None:
            factories[name] = (lambda v: lambda: v)(value)
            fingerprints.pop(name, None)
    if stage_c is None:
        stage_c = _load_stage_c(config, device)
    return TrainingModels(stage_c, factories, fingerprints, source)


def _file_factories(config: TrainConfig) -> dict[str, Callable[[], Any]]:
    """Loaders for the frozen parts of a real variant (or the explicit files); nothing is read yet."""
    from ..weights import load_stage

    def stage(name: str, path: str | None) -> Callable[[], Any]:
        def build() -> Any:
            return load_stage(name, path or config.model, dtype=torch.float32).requires_grad_(False)
        return build

    def text() -> Any:
        from ..models.clip import TextEncoder
        from ..weights import locate

        folder = config.text_encoder_path or str(locate(config.model, components=["text_encoder"])
                                                 ["text_encoder"].folder)
        return TextEncoder.from_folder(folder)

    return {"effnet": stage("effnet", config.effnet_path), "previewer": stage("previewer", config.previewer_path),
            "stage_b": stage("stage_b", None), "stage_a": stage("stage_a", None), "text_encoder": text}


def _load_stage_c(config: TrainConfig, device: torch.device | None) -> nn.Module:
    """Full fine-tunes keep fp32 master weights; a LoRA's frozen base is held in the compute dtype."""
    from ..weights import load_stage

    dtype = torch.bfloat16 if config.mode == "lora" and config.mixed_precision == "bf16" else torch.float32
    return load_stage("stage_c", config.stage_c_path or config.model, dtype=dtype, device=device or "cpu",
                      mmap=False)


__all__ = ["TrainingModels", "build_models", "calibrated_random_effnet", "module_fingerprint"]
