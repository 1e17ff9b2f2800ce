"""Generation parameters: one typed record, validated before any model loads, stored in every PNG."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PNG_KEY = "cascade_lab"  # the PNG text chunk holding the parameters as JSON
MIN_SIZE = 128
COMPATS = ("official", "comfyui")
# What ``compat="comfyui"`` changes where the caller leaves a value unset: every published Stable Cascade
# workflow samples both stages with euler_ancestral + simple, at ComfyUI's default compression 42, and
# ComfyUI's CFG has no rescale.
COMFYUI_DEFAULTS: dict[str, Any] = {"sampler_c": "euler_ancestral", "sampler_b": "euler_ancestral",
                                    "scheduler_c": "simple", "scheduler_b": "simple", "compression": 42.0,
                                    "cfg_rho": 0.0}


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides an image (official defaults: C 20 steps / CFG 4 / shift 2, B 10 / 1.1 / 1)."""

    prompt: str | tuple[str, ...]  # one prompt for the whole batch, or one per image
    negative_prompt: str | tuple[str, ...] = ""
    width: int = 1024
    height: int = 1024
    batch_size: int = 1
    seed: int | None = None
    steps_c: int = 20
    steps_b: int = 10
    cfg_c: float | tuple[float, float] = 4.0  # a pair (a, b): a·t + b·(1 − t) over the steps' t, as GDF.sample
    cfg_b: float | tuple[float, float] = 1.1
    shift_c: float = 2.0
    shift_b: float = 1.0
    sampler_c: str = "ddpm"
    sampler_b: str = "ddpm"
    scheduler_c: str = "cosine"
    scheduler_b: str = "cosine"
    cfg_rho: float = 0.7
    compression: float = 42.67  # image pixels per Stage C latent pixel
    variant: str = "auto"
    strength: float = 1.0  # img2img: 1.0 = from pure noise
    init_image: str | None = None  # a description (path or content hash) of the img2img input
    variations: tuple[tuple[str, float], ...] = ()  # (image description, weight)
    loras: tuple[tuple[str, float], ...] = ()  # (file, strength)
    extras: dict[str, Any] = field(default_factory=dict)
    # ControlNets: (kind, image description, strength, start, end, mask description or "", model file or "")
    controls: tuple[tuple[str, str, float, float, float, str, str, int, int], ...] = ()
    compat: str = "official"  # "comfyui": ComfyUI's seeding, latent sizes and model call (see COMFYUI_DEFAULTS)
    denoise: float = 1.0  # ComfyUI's partial schedule: the last `steps` of a schedule for steps/denoise steps
    seed_b: int | None = None  # Stage B's own seed under compat="comfyui" (ComfyUI's second KSampler); None: seed

    def __post_init__(self) -> None:
        if any(len(c) == 7 for c in self.controls):  # records made before grow/feather: no grow, no feather
            object.__setattr__(self, "controls", tuple((*c, 0, 0) if len(c) == 7 else tuple(c)
                                                       for c in self.controls))
        for name in ("prompt", "negative_prompt", "cfg_c", "cfg_b"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    # -- prompts ---------------------------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        """One prompt per image of the batch."""
        return _per_image(self.prompt, self.batch_size)

    @property
    def negative_prompts(self) -> list[str]:
        return _per_image(self.negative_prompt, self.batch_size)

    # -- sizes -----------------------------------------------------------------------------------------
    @property
    def latent_size_c(self) -> tuple[int, int]:
        """Stage C latent (h, w): ceil(size / 42.67) as the official calculate_latent_sizes; under
        ``compat="comfyui"`` floor(size / compression) as StableCascade_EmptyLatentImage."""
        if self.compat == "comfyui":
            return int(self.height // self.compression), int(self.width // self.compression)
        return math.ceil(self.height / self.compression), math.ceil(self.width / self.compression)

    @property
    def latent_size_b(self) -> tuple[int, int]:
        """Stage B latent (h, w) = ceil(size / 4) (ComfyUI's empty latent: size // 4, the same for multiples of
        8; ComfyUI's img2img: (size // 8)·2, so a 150-pixel side gives 36 → a 144-pixel image); even, which
        Stage B's PixelUnshuffle(2) needs."""
        if self.compat == "comfyui" and self.init_image is not None:
            return (self.height // 8) * 2, (self.width // 8) * 2
        return math.ceil(self.height / 4), math.ceil(self.width / 4)

    # -- checks ----------------------------------------------------------------------------------------
    def validate(self) -> GenerationParams:
        """Raise ValueError naming the value and what to use instead; return self when all is well."""
        any_size = self.compat == "comfyui" and self.init_image is not None  # ComfyUI crops to its latent sizes
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < MIN_SIZE or (value % 8 and not any_size):
                raise ValueError(f"{name}={value!r}: use a whole number of pixels ≥ {MIN_SIZE} and a multiple "
                                 f"of 8 (Stage B's latent is size/4 and must be even); multiples of 128 are safest")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: use 1 or more")
        for name in ("steps_c", "steps_b"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: use at least 1 step")
        for name in ("cfg_c", "cfg_b"):
            value = getattr(self, name)
            values = value if isinstance(value, (tuple, list)) and len(value) == 2 else (value,)
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
                raise ValueError(f"{name}={value!r}: classifier-free guidance must be a finite number ≥ 0 (1 = no "
                                 "guidance), or a pair (start, end) interpolated over the steps")
        for name in ("shift_c", "shift_b"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: shift must be > 0 (official: C 2, B 1)")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength={self.strength}: use a value in (0, 1]; 1 starts from pure noise")
        if self.strength < 1 and self.init_image is None:
            raise ValueError(f"strength={self.strength} needs an input image (img2img); pass image=...")
        if not 0 <= self.cfg_rho <= 1:
            raise ValueError(f"cfg_rho={self.cfg_rho}: the CFG rescale mix must be in [0, 1] (official 0.7)")
        if not (isinstance(self.compression, (int, float)) and math.isfinite(self.compression)
                and self.compression > 0):
            raise ValueError(f"compression={self.compression!r}: must be a number > 0 (official 42.67, ComfyUI 42)")
        h, w = self.latent_size_c
        if min(h, w) < 1:
            raise ValueError(f"compression={self.compression} makes the Stage C latent of a {self.width}x{self.height} "
                             f"image {w}x{h}; use a compression of at most {min(self.width, self.height)} "
                             "(official 42.67, ComfyUI 42) or a larger image")
        from .controls import Control

        for kind, image, strength, start, end, mask, _, grow, feather in self.controls:
            Control(kind, image, strength, start, end, mask or None, grow=grow, feather=feather).validate()
        if self.compat not in COMPATS:
            raise ValueError(f"compat={self.compat!r}: use one of {', '.join(COMPATS)}")
        if not (isinstance(self.denoise, (int, float)) and 0 < self.denoise <= 1):
            raise ValueError(f"denoise={self.denoise!r}: use a value in (0, 1]; 1 runs the whole schedule "
                             "(ComfyUI's img2img example: 0.6)")
        if self.seed_b is not None and not (isinstance(self.seed_b, int) and 0 <= self.seed_b < 2**64):
            raise ValueError(f"seed_b={self.seed_b!r}: use a whole number in [0, 2**64) or None (= seed)")
        if self.seed_b is not None and self.compat != "comfyui":
            raise ValueError(f"seed_b={self.seed_b}: Stage B's own seed exists under compat='comfyui' only (ComfyUI's "
                             "second KSampler); the official code draws Stage B's noise from the one seed — drop "
                             "seed_b or add compat='comfyui'")
        for name, value in (("prompt", self.prompt), ("negative_prompt", self.negative_prompt)):
            if isinstance(value, tuple):
                if not all(isinstance(p, str) for p in value):
                    raise ValueError(f"{name}={value!r}: every prompt of the list must be a string")
                if len(value) != self.batch_size:
                    raise ValueError(f"{name} is a list of {len(value)} prompts but batch_size={self.batch_size}; "
                                     "give one prompt per image (or one string for the whole batch)")
            elif not isinstance(value, str):
                raise ValueError(f"{name}={value!r}: give a string, or a list of strings (one per image)")
        seed_limit = 2**64 if self.compat == "comfyui" else 2**63  # ComfyUI's seeds are full 64-bit values
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < seed_limit):
            raise ValueError(f"seed={self.seed!r}: use a whole number in [0, 2**{seed_limit.bit_length() - 1})")
        return self

    # -- (de)serialisation -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GenerationParams:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"version"})
        if unknown:
            raise ValueError(f"unknown generation parameters {unknown}; known: {sorted(known)}")
        for key in ("variations", "loras"):
            if key in data:
                data[key] = tuple((str(a), float(b)) for a, b in data[key])
        if "controls" in data:
            # (kind, image, strength, start, end, mask, model[, grow, feather]): PNGs before grow/feather have 7
            data["controls"] = tuple((str(k), str(i), float(s), float(a), float(b), str(m), str(f), int(g), int(e))
                                     for k, i, s, a, b, m, f, g, e in (list(c) + [0, 0][len(c) - 7:]
                                                                       for c in data["controls"]))
        for key in ("cfg_c", "cfg_b"):
            if isinstance(data.get(key), list):
                data[key] = tuple(float(v) for v in data[key])
        for key in ("prompt", "negative_prompt"):
            if isinstance(data.get(key), list):
                data[key] = tuple(str(p) for p in data[key])
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> GenerationParams:
        return replace(self, **changes)


def _per_image(value: str | tuple[str, ...], batch_size: int) -> list[str]:
    return list(value) if isinstance(value, tuple) else [value] * batch_size


def read_png_params(path: str | Path) -> GenerationParams:
    """The parameters a PNG carries, ready to regenerate it: cascade_lab's own chunk, else those of a ComfyUI PNG's
    graph (its ``prompt`` chunk, else its ``workflow`` chunk), read statically under ``compat="comfyui"``."""
    from .images import open_image

    image = open_image(path, "PNG")
    texts = getattr(image, "text", {}) or {}
    text = texts.get(PNG_KEY)
    if text is None:
        if "prompt" in texts or "workflow" in texts:
            from .comfyui.export import params_from_graph
            from .comfyui.workflow import WorkflowError, read_workflow

            try:
                graph, _ = read_workflow(path)
                return params_from_graph(graph, size=image.size)
            except WorkflowError as e:
                raise ValueError(f"{path}: a ComfyUI PNG whose graph gives no parameters: {e}") from None
        raise ValueError(f"{path}: no {PNG_KEY!r} text chunk and no ComfyUI 'prompt' / 'workflow' chunk; only PNGs "
                         "saved by cascade_lab or ComfyUI carry parameters")
    data = json.loads(text)
    data.pop("version", None)
    data.pop("batch_index", None)  # a batch regenerates whole; the index says which image this one was
    return GenerationParams.from_json(json.dumps(data))
