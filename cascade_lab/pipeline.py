"""The three-stage job: text encode → Stage C sampling → Stage B sampling → Stage A decode.

Pure orchestration: samplers and schedulers come from the plugin registries, the maths from
`cascade_lab.diffusion`, the models from `cascade_lab.models`. Emits a `StepEvent` per step, polls a
cancel token between steps, and moves one stage at a time onto the device when offloading; a stage
given as `Lazy` is loaded only while it is used (stage swapping on the CPU).
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from .diffusion import Cancelled, GuidedDenoiser, StepEvent, diffuse, generator_noise
from .params import GenerationParams
from .plugins import get_sampler, get_scheduler

Tensor = torch.Tensor


def release_freed_memory() -> bool:
    """Give the memory the process has freed back to the OS (glibc's ``malloc_trim``); False where unsupported.

    glibc keeps freed heap pages mapped, so with stage swapping the activations of the stage just dropped
    (Stage B's, ~290 MiB at 512² for the mid-size benchmark model) stayed in the resident set while Stage A
    allocated its own: trimmed in between, the peak of `benchmarks/memory.py` drops by ~150 MiB.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library; musl has no malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(trim(0))


@dataclass(frozen=True)
class Lazy:
    """A stage that is loaded each time it is used and released right after: stage swapping on the CPU.

    ``load()`` returns the model, e.g. ``functools.partial(load_stage, "stage_b", path)``; ``config`` is its
    config (for Stage C, ``c_clip_img`` is read from it without loading the model).
    """

    load: Callable[[], Any]
    config: Any = None


@dataclass
class Stages:
    """The models of one variant (or `Lazy` loaders). Optional parts are needed only by the features that use them."""

    stage_c: Any
    stage_b: Any
    stage_a: Any
    text_encoder: Any
    previewer: Any = None
    effnet: Any = None
    image_encoder: Any = None
    variant: str = ""


@dataclass
class PipelineEvent:
    """One sampler step of one stage, for progress bars and previews."""

    stage: str  # "c" or "b"
    step: int  # 0-based
    steps: int
    logsnr: float
    x: Tensor  # the latent after this step
    x0: Tensor  # the predicted clean latent


class CancelToken:
    """Set from any thread (a Cancel button, an interrupt); the pipeline stops before its next step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def reset(self) -> None:
        self._event.clear()

    def __call__(self) -> bool:
        return self._event.is_set()


@dataclass
class PipelineOutput:
    images: Tensor  # [B, 3, H, W] float32 in [0, 1], on the CPU
    latent_c: Tensor  # [B, 16, h, w] Stage C result (last x0), CPU float32
    latent_b: Tensor  # [B, 4, H/4, W/4] Stage B result, CPU float32
    seed: int
    trajectory_c: list[Tensor] = field(default_factory=list)  # x0 per Stage C step (when asked)
    trajectory_b: list[Tensor] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Runs a `GenerationParams` on loaded `Stages` (official defaults reproduce the official images)."""

    def __init__(self, stages: Stages, *, device: torch.device | str = "cpu", dtype_c: torch.dtype = torch.float32,
                 dtype_b: torch.dtype = torch.float32, offload: bool = False, compile: bool = False) -> None:
        """``compile``: run the Stage C and Stage B networks through ``torch.compile`` (the first step of
        each new shape compiles; see benchmarks/RESULTS.md for when it pays off)."""
        if dtype_c == torch.float16:
            raise ValueError("dtype_c=torch.float16: Stage C gives black/NaN images in float16; "
                             "use torch.bfloat16 or torch.float32")
        self.stages, self.device, self.offload = stages, torch.device(device), offload
        self.dtype_c, self.dtype_b, self.compile = dtype_c, dtype_b, compile

    # -- placement -------------------------------------------------------------------------------------
    @contextmanager
    def on_device(self, module: Any, dtype: torch.dtype | None = None) -> Iterator[Any]:
        """Hold one stage on the device; with offloading it goes back to the CPU afterwards."""
        module.to(self.device, dtype) if dtype is not None else module.to(self.device)
        try:
            yield module
        finally:
            if self.offload and self.device.type != "cpu":
                module.to("cpu")
                torch.cuda.empty_cache() if self.device.type == "cuda" else None

    @contextmanager
    def use(self, part: Any, dtype: torch.dtype | None = None) -> Iterator[Any]:
        """Hold one stage on the device; a `Lazy` one is loaded first, and dropped by the pipeline afterwards."""
        if isinstance(part, Lazy):
            gc.collect()  # the previous lazy stage's memory, should a reference cycle still hold it
            release_freed_memory()  # and the pages of its activations, before this stage allocates its own
            part = part.load()
        with self.on_device(part, dtype):
            yield part

    def _clip_img_features(self) -> int:
        stage_c = self.stages.stage_c
        if isinstance(stage_c, Lazy):
            return int(stage_c.config.c_clip_img)
        return int(stage_c.clip_img_mapper.in_features)

    # -- pieces ----------------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str], negatives: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(cond, uncond) CLIP-G inputs, encoded in one call so both have the same number of tokens."""
        with self.use(self.stages.text_encoder) as text_encoder:
            clip_text, pooled = text_encoder.encode(prompts + negatives)  # [2B, T, C], [2B, 1, C]
        B = len(prompts)
        cond = {"clip_text": clip_text[:B], "clip_text_pooled": pooled[:B]}
        uncond = {"clip_text": clip_text[B:], "clip_text_pooled": pooled[B:]}
        return cond, uncond

    def encode_image_latent(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        """img2img input [B, 3, H, W] in [0, 1] → Stage C latent [B, 16, h, w] (EfficientNet at h·32 × w·32;
        an encoder with another ``downscale`` attribute, like the demo's 16, at that multiple)."""
        effnet = self.stages.effnet
        if effnet is None:
            raise ValueError(f"variant {self.stages.variant!r} has no EfficientNet encoder; img2img needs one")
        h, w = size
        down = int(getattr(effnet, "downscale", 32))
        images = torch.nn.functional.interpolate(images.float(), size=(h * down, w * down), mode="bicubic",
                                                 antialias=True, align_corners=False).clamp(0, 1)
        with self.use(effnet) as encoder, torch.inference_mode():
            return encoder.encode_image(images.to(self.device)).float()  # type: ignore[no-any-return]

    def preview_c(self, latent_c: Tensor) -> Tensor:
        """Stage C latent → RGB [B, 3, 8h, 8w] in [0, 1] through the Previewer (192 px for 1024²)."""
        previewer = self.stages.previewer
        if previewer is None:
            raise ValueError(f"variant {self.stages.variant!r} has no previewer")
        if isinstance(previewer, Lazy):  # loaded for this preview only, left where it loads (it is small)
            previewer = previewer.load()
        with torch.inference_mode():
            weight = next(previewer.parameters())
            return previewer(latent_c.to(weight.device, weight.dtype)).float().clamp(0, 1).cpu()  # type: ignore

    def decode_b(self, latent_b: Tensor) -> Tensor:
        """Stage B latent → RGB [B, 3, 4h, 4w] in [0, 1] through Stage A (clamped, as the official callers)."""
        with self.use(self.stages.stage_a) as stage_a, torch.inference_mode():
            weight = next(stage_a.parameters())
            return stage_a.decode(latent_b.to(weight.device, weight.dtype)).float().clamp(0, 1).cpu()  # type: ignore

    def sample_stage(self, name: str, model: Any, dtype: torch.dtype, x: Tensor, levels: Tensor,
                     cond: dict[str, Any], uncond: dict[str, Any], *, cfg: float, cfg_rho: float, sampler: str,
                     noise: Callable[[Tensor], Tensor], callback: Callable[[PipelineEvent], Any] | None,
                     cancel: Callable[[], bool] | None, trajectory: list[Tensor] | None) -> Tensor:
        """One stage's sampling; returns the last step's x0 (CPU float32)."""
        sample = get_sampler(sampler).fn
        steps = len(levels) - 1

        def on_step(event: StepEvent) -> None:
            if trajectory is not None:
                trajectory.append(event.x0.detach().float().cpu())
            if callback is not None:
                callback(PipelineEvent(name, event.step, steps, float(event.logsnr), event.x, event.x0))

        with self.use(model, dtype) as model, torch.inference_mode(), self._conditioning_cache(model):
            cast = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in cond.items()}
            cast_u = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in uncond.items()}
            # cfg == 1 is exactly the conditional prediction: skip the unconditional half of the batch
            denoiser = GuidedDenoiser(model, cast, cast_u, cfg=None if cfg == 1 else cfg, cfg_rho=cfg_rho)
            x0 = sample(denoiser, x.to(self.device), levels.to(self.device), noise=noise, callback=on_step,
                        cancel=cancel)
        return x0.float().cpu()  # type: ignore[no-any-return]

    def _conditioning_cache(self, model: Any) -> AbstractContextManager[Any]:
        """The model's `conditioning_cache()` (text tokens and attention K/V mapped once per run, not per step)."""
        if self.compile and hasattr(model, "compile_denoiser"):
            model.compile_denoiser()
        return model.conditioning_cache() if hasattr(model, "conditioning_cache") else nullcontext()

    # -- the job ---------------------------------------------------------------------------------------
    def run(self, params: GenerationParams, *, init_images: Tensor | None = None, clip_img: Tensor | None = None,
            callback: Callable[[PipelineEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
            keep_trajectory: bool = False) -> PipelineOutput:
        """Generate `params.batch_size` images. Raises `diffusion.Cancelled` when `cancel()` turns true."""
        params.validate()
        sampler_c, sampler_b = get_sampler(params.sampler_c), get_sampler(params.sampler_b)  # names checked early
        scheduler_c, scheduler_b = get_scheduler(params.scheduler_c).fn, get_scheduler(params.scheduler_b).fn
        del sampler_c, sampler_b
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        generator = torch.Generator().manual_seed(seed)  # CPU noise: the same image on every device
        noise = generator_noise(generator)
        B, timings = params.batch_size, {}
        out = PipelineOutput(torch.empty(0), torch.empty(0), torch.empty(0), seed)

        t0 = time.perf_counter()
        cond, uncond = self.encode_text([params.prompt] * B, [params.negative_prompt] * B)
        if clip_img is None:
            clip_img = torch.zeros(B, 1, self._clip_img_features())  # official: zeros
        cond["clip_img"], uncond["clip_img"] = clip_img, torch.zeros_like(clip_img)
        timings["text"] = time.perf_counter() - t0

        # Stage C: from noise, or img2img from the encoded image noised to `strength` at shift 1 (official)
        t0 = time.perf_counter()
        h, w = params.latent_size_c
        steps_c = params.steps_c
        if init_images is not None and params.strength < 1:
            latent = self.encode_image_latent(init_images, (h, w))
            latent = latent.expand(B, -1, -1, -1) if latent.size(0) == 1 else latent
            t = torch.full((B,), params.strength)
            eps = torch.randn(latent.shape, generator=generator)
            x = diffuse(latent, t=t, shift=1.0, epsilon=eps).noised
            steps_c = max(1, int(params.steps_c * params.strength))
            levels_c = scheduler_c(steps_c, shift=params.shift_c, t_start=params.strength)
        else:
            x = torch.randn((B, 16, h, w), generator=generator)
            levels_c = scheduler_c(steps_c, shift=params.shift_c)
        latent_c = self.sample_stage(
            "c", self.stages.stage_c, self.dtype_c, x, levels_c, cond, uncond, cfg=params.cfg_c,
            cfg_rho=params.cfg_rho, sampler=params.sampler_c, noise=noise, callback=callback, cancel=cancel,
            trajectory=out.trajectory_c if keep_trajectory else None)
        timings["stage_c"] = time.perf_counter() - t0

        # Stage B: conditioned on the Stage C result and the pooled text; uncond gets zeros and the negative
        t0 = time.perf_counter()
        hb, wb = params.latent_size_b
        cond_b = {"effnet": latent_c, "clip": cond["clip_text_pooled"]}
        uncond_b = {"effnet": torch.zeros_like(latent_c), "clip": uncond["clip_text_pooled"]}
        x = torch.randn((B, 4, hb, wb), generator=generator)
        levels_b = scheduler_b(params.steps_b, shift=params.shift_b)
        latent_b = self.sample_stage(
            "b", self.stages.stage_b, self.dtype_b, x, levels_b, cond_b, uncond_b, cfg=params.cfg_b,
            cfg_rho=params.cfg_rho, sampler=params.sampler_b, noise=noise, callback=callback, cancel=cancel,
            trajectory=out.trajectory_b if keep_trajectory else None)
        timings["stage_b"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        out.images = self.decode_b(latent_b)
        timings["stage_a"] = time.perf_counter() - t0
        out.latent_c, out.latent_b, out.timings = latent_c, latent_b, timings
        return out


__all__ = ["CancelToken", "Cancelled", "Lazy", "Pipeline", "PipelineEvent", "PipelineOutput", "Stages",
           "release_freed_memory"]
