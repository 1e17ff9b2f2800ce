"""The models a run needs: the trained stage (Stage C, or Stage B with ``stage="b"``) and the frozen helpers
(EfficientNet, text encoder, previewer, Stage A, and Stage B or C).

Only the trained stage is built up front; the others are built on first use, so a run whose latents and text
embeddings are all cached never builds the encoders. ``model="tiny"`` gives seeded tiny models; a variant
name or explicit files load the real ones; objects may also be handed in directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.tiny import TINY_EFFNET_SEED, calibrated_random_effnet
from .config import ConfigError, TrainConfig

# TrainConfig path field -> (component kind, kohya's flag)
PATH_FIELDS = {"stage_c_path": ("stage_c", "stage_c_checkpoint_path"),
               "effnet_path": ("effnet", "effnet_checkpoint_path"),
               "previewer_path": ("previewer", "previewer_checkpoint_path"),
               "text_encoder_path": ("text_encoder", "text_model_checkpoint_path"),
               "stage_b_path": ("stage_b", "stage_b_checkpoint_path"),
               "stage_a_path": ("stage_a", "stage_a_checkpoint_path")}  # fmt: skip


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


TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


def file_fingerprint(path: str | Path) -> str:
    """A content hash of a model file (or a transformers folder) read without building the model.

    Per weight file: its size and modification time, its safetensors header (names, dtypes, shapes) and 4096
    strided 64-byte samples of the data; small side files (config, tokenizer) whole. So a run whose caches are
    warm never loads the encoders just to name them (their caches are keyed by this instead of
    `module_fingerprint`). A copy of the file (new time) gets new cache entries; only a file rewritten in place
    with its old size and time restored would go unnoticed.
    """
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    weights = sorted(folder.rglob("*.safetensors")) if path.is_dir() else [path]
    digest = hashlib.sha256(b"file-fingerprint-v1")
    for file in weights:
        stat = file.stat()
        size = stat.st_size
        digest.update(f"{file.relative_to(folder)}:{size}:{stat.st_mtime_ns}:".encode())
        with file.open("rb") as f:
            head = f.read(8)
            digest.update(head)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest.update(f.read(min(header_len, 100_000_000)))
            stride = max(64, size // 4096)
            for offset in range(0, size, stride):
                f.seek(offset)
                digest.update(f.read(64))
    side = [folder / n for n in TOKENIZER_FILES] + ([folder / "tokenizer" / n for n in TOKENIZER_FILES]
                                                    if path.is_dir() else [])
    for file in side:
        if file.is_file() and file.stat().st_size < 64_000_000:
            digest.update(f"{file.relative_to(folder)}:".encode())
            digest.update(file.read_bytes())
    return "file-" + digest.hexdigest()[:24]


class TrainingModels:
    """The trained stage plus lazily built frozen helpers; `fingerprint(name)` keys the caches.

    ``model`` is the trained network: Stage C when ``stage == "c"``, Stage B when ``stage == "b"`` (then
    ``stage_c`` is the frozen Stage C the samples start from, built on first use).
    """

    def __init__(self, model: nn.Module, factories: dict[str, Callable[[], Any]],
                 fingerprints: dict[str, str] | None = None, source: str = "", downscale: int = 32,
                 compression: float = 1024 / 24, stage: str = "c") -> None:
        self.model, self.source, self.stage = model, source, stage
        # image pixels per latent pixel: EfficientNet's stride (32; the demo's encoder 16), and what Stage C
        # generates with (42.67: 1024 px <-> 24x24; the demo 16: 128 px <-> 8x8)
        self.downscale, self.compression = downscale, compression
        self._factories = factories
        self._built: dict[str, Any] = {}
        self._fingerprints = dict(fingerprints or {})

    @property
    def trained_name(self) -> str:
        return f"stage_{self.stage}"

    @property
    def stage_c(self) -> Any:
        """Stage C: the trained model, or (Stage B runs) the frozen one the samples use."""
        return self.get("stage_c")

    def has(self, name: str) -> bool:
        return name == self.trained_name or name in self._built or name in self._factories

    def get(self, name: str) -> Any:
        """The model `name` (effnet, text_encoder, previewer, stage_c, stage_b, stage_a), built on first use."""
        if name == self.trained_name:
            return self.model
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


def check_paths(config: TrainConfig) -> dict[str, Any]:
    """Every explicit model path must exist, be non-empty and hold its component; returns what each holds.

    Read from the safetensors header alone (`cascade_lab.weights.detect`), before any data or model is touched.
    """
    from ..weights.detect import LABELS, detect

    found: dict[str, Any] = {}
    for name, (kind, flag) in PATH_FIELDS.items():
        value = getattr(config, name)
        if not value:
            continue
        where = f"{name}={value!r} (kohya --{flag})"
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigError(f"{where}: no such file or folder; give the path of the {LABELS[kind]} file")
        if path.is_dir():
            if not any(path.iterdir()):
                raise ConfigError(f"{where}: the folder is empty; give the {LABELS[kind]} file or its folder")
            if kind == "text_encoder" and not (path / "config.json").is_file() and not (
                    path / "text_encoder" / "config.json").is_file():
                raise ConfigError(f"{where}: no config.json in the folder; give a transformers CLIP-G folder or "
                                  "a text-encoder .safetensors file")
            continue  # a diffusers/transformers folder: its loader checks the keys
        if path.stat().st_size == 0:
            raise ConfigError(f"{where}: the file is empty (0 bytes; an interrupted download?)")
        try:
            detection = detect(path)
        except Exception as exc:  # not safetensors, truncated header, a pickle...
            raise ConfigError(f"{where}: not a readable .safetensors file ({exc})") from None
        if kind not in detection.components:
            raise ConfigError(f"{where}: the file holds {detection.describe()}, not the {LABELS[kind]}; check "
                              "which file goes to which flag")
        found[name] = detection.components[kind]
    return found


def _variant_builder(name: str) -> Any:
    """The build function of a variant that makes its models instead of reading files (demo), else None."""
    if name == "tiny":
        return None
    try:
        from ..plugins import get_variant

        return getattr(get_variant(name), "build", None)
    except Exception:  # an unknown name is reported by the weight loader with the list of variants
        return None


def build_models(config: TrainConfig, *, stages: Any = None, stage_c: nn.Module | None = None,
                 text_encoder: Any = None, effnet: Any = None, device: torch.device | None = None,
                 stage_b: nn.Module | None = None) -> TrainingModels:
    """The models of `config`; objects passed here win over the config's `model` and paths.

    Explicit paths win over `model`: each is checked first (`check_paths`), and a file of a shipped size for
    the trained stage (Stage C, or Stage B with ``stage="b"``) makes that size's variant the source of the
    parts given no path (kohya's command names no variant).
    """
    factories: dict[str, Callable[[], Any]] = {}
    fingerprints: dict[str, str] = {}
    sizes: dict[str, Any] = {}
    paths = check_paths(config)
    trained_name = f"stage_{config.stage}"
    trained: nn.Module | None = stage_b if config.stage == "b" else stage_c
    model = config.model
    own_path = f"{trained_name}_path"
    if own_path in paths and model == "tiny" and paths[own_path].variant in ("full", "lite"):
        model = "full" if paths[own_path].variant == "full" else "lite"
    builder = _variant_builder(model) if stages is None else None
    if builder is not None:
        stages = builder()
    source = model
    if model == "tiny":
        if trained is None and stages is None and getattr(config, own_path):
            trained = _load_trained(config, device)
        elif trained is None and stages is None and config.mode == "lora":
            # a LoRA adapts the base it is used with: the tiny variant's model (every layer non-zero). On the
            # official init the output conv is zero, so every LoRA pair but clf's would get no gradient.
            trained = getattr(_tiny_stages(0), trained_name)
        elif trained is None and stages is None:
            trained = _official_init(config)
        cache: dict[str, Any] = {}

        def tiny(name: str) -> Callable[[], Any]:
            def build() -> Any:
                if "stages" not in cache:
                    cache["stages"] = _tiny_stages(0)
                return getattr(cache["stages"], name)
            return build

        for name in ("text_encoder", "previewer", "stage_c", "stage_b", "stage_a"):
            if name != trained_name:
                factories[name] = tiny(name)
        factories["effnet"] = calibrated_random_effnet
        fingerprints.update(effnet=f"tiny-effnet-{TINY_EFFNET_SEED}-v1", text_encoder="tiny-text-encoder-v1",
                            stage_a="tiny-stage-a-0-v1")
        explicit = {k: v for k, v in _file_factories(config, model).items() if _path_of(config, k)}
        factories.update(explicit)
        for name in explicit:
            fingerprints.pop(name, None)
    elif builder is None:
        factories.update(_file_factories(config, model))
    for name in ("effnet", "text_encoder"):  # explicit files: cache keys from the files, the models built on demand
        given = _path_of(config, name)
        if given and Path(given).expanduser().exists():
            fingerprints[name] = file_fingerprint(given)
    if stages is not None:
        from ..pipeline import Lazy

        for name in ("text_encoder", "previewer", "stage_c", "stage_b", "stage_a", "effnet"):
            value = getattr(stages, name, None)
            if value is not None and name != trained_name:
                factories[name] = value.load if isinstance(value, Lazy) else (lambda v: lambda: v)(value)
                fingerprints.pop(name, None)
        if trained is None:
            trained = getattr(stages, trained_name)
            if isinstance(trained, Lazy):
                raise ValueError(f"this variant's {trained_name} is loaded per use (a Lazy stage, CPU stage "
                                 "swapping), so it cannot be trained in place; pass the loaded model instead")
        source = getattr(stages, "variant", "") or "stages"
        native = getattr(stages, "native", None) or {}
        downscale = getattr(getattr(stages, "effnet", None), "downscale", None)
        if isinstance(downscale, int) and native.get("compression"):
            sizes = {"downscale": downscale, "compression": float(native["compression"])}
    if config.stage == "b" and stage_c is not None:
        factories["stage_c"] = (lambda v: lambda: v)(stage_c)  # the frozen Stage C of the samples
    for name, value in (("text_encoder", text_encoder), ("effnet", effnet)):
        if value is not None:
            factories[name] = (lambda v: lambda: v)(value)
            fingerprints.pop(name, None)
    if trained is None:
        trained = _load_trained(config, device)
    if config.stage == "b" and not hasattr(trained, "effnet_mapper"):
        raise ConfigError(f"stage='b' trains Stage B, but the model given as Stage B is a {type(trained).__name__}; "
                          "pass the Stage B model (stage_b=...) or a Stage B file (stage_b_path)")
    return TrainingModels(trained, factories, fingerprints, source, stage=config.stage, **sizes)


def _official_init(config: TrainConfig) -> nn.Module:
    """The tiny model of the trained stage with the official initialisation (zero output conv), seeded."""
    from ..models.stage_b import StageBConfig
    from ..models.stage_c import StageCConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return (StageBConfig.tiny() if config.stage == "b" else StageCConfig.tiny()).build()


def _path_of(config: TrainConfig, part: str) -> str | None:
    return {"effnet": config.effnet_path, "previewer": config.previewer_path, "stage_c": config.stage_c_path,
            "stage_b": config.stage_b_path, "stage_a": config.stage_a_path,
            "text_encoder": config.text_encoder_path}.get(part)


def _load_file(stage: str, path: str, **kwargs: Any) -> Any:
    """load_stage, taking a file of no shipped size (a saved tiny model) as the tiny preset."""
    from ..weights import load_stage
    from ..weights.safetensors_io import WeightsFileError

    try:
        return load_stage(stage, path, **kwargs)
    except WeightsFileError as exc:
        if "not a shipped variant" not in str(exc) and stage not in ("previewer", "stage_a"):
            raise
        try:
            return load_stage(stage, path, config="tiny", **kwargs)
        except Exception:
            raise exc from None


def _file_factories(config: TrainConfig, model: str) -> dict[str, Callable[[], Any]]:
    """Loaders for the frozen parts of a real variant (or the explicit files); nothing is read yet."""

    def stage(name: str, path: str | None) -> Callable[[], Any]:
        def build() -> Any:
            return _load_file(name, path or model, dtype=torch.float32).requires_grad_(False)
        return build

    def text() -> Any:
        from ..models.clip import TextEncoder
        from ..weights import locate

        if config.text_encoder_path and Path(config.text_encoder_path).is_file():
            return TextEncoder.from_file(config.text_encoder_path)
        folder = config.text_encoder_path or str(locate(model, components=["text_encoder"])["text_encoder"].folder)
        return TextEncoder.from_folder(folder)

    return {"effnet": stage("effnet", config.effnet_path), "previewer": stage("previewer", config.previewer_path),
            "stage_c": stage("stage_c", config.stage_c_path), "stage_b": stage("stage_b", config.stage_b_path),
            "stage_a": stage("stage_a", config.stage_a_path), "text_encoder": text}


def _load_trained(config: TrainConfig, device: torch.device | None) -> nn.Module:
    """The trained stage from its file or the variant. Full fine-tunes keep fp32 master weights (bf16 weights with
    full_bf16); a LoRA's frozen base is held in the compute dtype."""
    from ..weights import load_stage

    bf16 = config.mixed_precision == "bf16" and (config.mode == "lora" or config.full_bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    name = f"stage_{config.stage}"
    path = config.stage_b_path if config.stage == "b" else config.stage_c_path
    if path:
        return _load_file(name, path, dtype=dtype, device=device or "cpu", mmap=False)  # type: ignore[no-any-return]
    return load_stage(name, config.model, dtype=dtype, device=device or "cpu", mmap=False)  # type: ignore[no-any-return]


__all__ = ["PATH_FIELDS", "TrainingModels", "build_models", "calibrated_random_effnet", "check_paths",
           "file_fingerprint", "module_fingerprint"]
