"""The three-stage job: text encode → Stage C sampling → Stage B sampling → Stage A decode.

Pure orchestration: samplers and schedulers come from the plugin registries, the maths from
`cascade_lab.diffusion`, the models from `cascade_lab.models`. Emits a `StepEvent` per step, polls a
cancel token between steps, and moves one stage at a time onto the device when offloading; a stage
given as `Lazy` is loaded only while it is used (stage swapping on the CPU).

`Pipeline.run` is four parts, each public: `run_text` (checks, seed, text encoding) makes a `PipelineJob`, then
`run_c`, `run_b` and `run_a` fill its output. Rendering many generations stage by stage (all texts, then all
Stage C, …) inside `Pipeline.resident` moves each offloaded model to the device once instead of once per image.
"""

from __future__ import annotations

import ctypes
import gc
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from .diffusion import Cancelled, GuidedDenoiser, StepEvent, diffuse
from .diffusion.guidance import SigmaDenoiser, step_t_lookup
from .diffusion.noise import ComfyNoise, NoiseSource, OfficialNoise
from .diffusion.schedule import sigma as sigma_of_logsnr
from .diffusion.sigma_schedules import cascade_sigmas, discard_penultimate, partial_schedule
from .params import GenerationParams
from .plugins import get_sampler, get_scheduler
from .registry import Sampler, Scheduler

Tensor = torch.Tensor


def _glibc(name: str) -> Any:
    """The C library's function `name` on Linux (glibc's malloc_trim, mallopt), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)  # the process's own C library; musl has neither
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Give the memory the process has freed back to the OS (glibc's ``malloc_trim``); False where unsupported.

    glibc keeps freed heap pages mapped, so with stage swapping the activations of the stage just dropped
    (Stage B's, ~290 MiB at 512² for the mid-size benchmark model) stayed in the resident set while Stage A
    allocated its own: trimmed in between, the peak of `benchmarks/memory.py` drops by ~150 MiB.
    """
    trim = _glibc("malloc_trim")
    return False if trim is None else bool(trim(0))


# glibc's mallopt parameters. Its mmap threshold is capped at 32 MiB on 64-bit systems (and setting either one
# turns its dynamic thresholds off); the trim threshold -1 means never trim. Restored when the last `steady_heap`
# ends to where glibc's dynamic thresholds settle once a block of 32 MiB has been freed (a torch process soon has).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_MAX, _NO_TRIM, _SETTLED_TRIM = 32 * 2**20, -1, 64 * 2**20
_heap_lock = threading.Lock()
_heap_holders = [0]


def _mallopt(*settings: tuple[int, int]) -> bool:
    mallopt = _glibc("mallopt")
    return mallopt is not None and all(bool(mallopt(param, value)) for param, value in settings)


@contextmanager
def steady_heap() -> Iterator[bool]:
    """Keep freed memory mapped while a loop allocates and frees the same large blocks (a training step on the
    CPU); yields whether glibc took the settings.

    glibc hands freed blocks above its mmap threshold straight back to the OS and trims the top of its heap
    past its trim threshold (and the training step used to trim between forward and backward), so every step
    faulted its activations and gradients in again: 160 k page faults (640 MiB the kernel zeroes) in each 5 s
    step of the mid-size full fine-tune, 0.4 s of it. Inside, blocks up to 32 MiB (the most glibc allows) come
    from the heap and nothing is trimmed: those faults are gone, for about 75 MiB more peak. When the last of
    nested holders leaves, glibc gets its settled thresholds back and the freed memory goes back to the OS
    (`release_freed_memory`).
    """
    with _heap_lock:
        _heap_holders[0] += 1
        taken = _mallopt((_M_MMAP_THRESHOLD, _MMAP_MAX), (_M_TRIM_THRESHOLD, _NO_TRIM))
    try:
        yield taken
    finally:
        with _heap_lock:
            _heap_holders[0] -= 1
            if _heap_holders[0] == 0 and taken:
                _mallopt((_M_TRIM_THRESHOLD, _SETTLED_TRIM))  # the mmap threshold stays at the settled cap
                release_freed_memory()


@dataclass(frozen=True)
class Lazy:
    """A stage that is loaded each time it is used and released right after: stage swapping on the CPU.

    ``load()`` returns the model, e.g. ``functools.partial(load_stage, "stage_b", path)``; ``config`` is its
    config (for Stage C, ``c_clip_img`` is read from it without loading the model).
    """

    load: Callable[[], Any]
    config: Any = None


class NonFiniteLatent(RuntimeError):
    """Sampling produced NaN or inf: stopped at that step (the previews so far stay), naming stage, step, sampler."""

    def __init__(self, stage: str, step: int, steps: int, sampler: str, *, result: bool = False) -> None:
        what = "returned a result with" if result else f"reached NaN/inf values at step {step + 1}/{steps}, in"
        super().__init__(f"{stage}: sampler {sampler!r} {what} NaN/inf values; sampling stopped there (the last "
                         "good preview is kept). Usual causes: a very high CFG, a LoRA at an extreme strength, "
                         "float16 on Stage C; try a lower cfg, another sampler, or dtype='float32'"
                         if not result else f"{stage}: sampler {sampler!r} returned a result with NaN/inf values; "
                         "check the sampler, or try another one")
        self.stage, self.step, self.sampler = stage, step, sampler


class SamplerFailed(RuntimeError):
    """A third-party sampler raised; the message names it, the chained exception is its own traceback."""


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


@dataclass(frozen=True)
class ControlInput:
    """A ControlNet ready to run: the network (or a `Lazy` loader), its filtered input [1 or B, c_in, H, W],
    the strength its features are scaled by, and the fraction of the Stage C steps [start, end] it applies in."""

    net: Any
    image: Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    kind: str = ""

    def active(self, t: float) -> bool:
        """Whether it applies at step position t (1 the first step, → 0 the last), as ComfyUI's percent range."""
        from .controls import in_step_range

        return in_step_range(t, self.start, self.end)


@dataclass(frozen=True)
class SigmaRangeControl(ControlInput):
    """A ControlNet whose [start, end] range is ComfyUI's (``compat="comfyui"``, the ComfyUI runner): `active` is
    given the step's σ and compares it with the model's σ at 1 − start and 1 − end (Stage C's ``shift``)."""

    shift: float = 2.0

    def active(self, t: float) -> bool:
        from .diffusion.sigma_schedules import in_sigma_range

        return in_sigma_range(t, self.start, self.end, self.shift)


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


@dataclass
class PipelineJob:
    """One generation between the parts of `Pipeline.run`: `Pipeline.run_text` makes it (the parameters checked,
    the seed and noise source chosen, the prompts encoded), `run_c`, `run_b` and `run_a` fill ``output`` in turn."""

    params: GenerationParams
    noise: NoiseSource
    cond: dict[str, Tensor]  # the CLIP-G inputs, and clip_img
    uncond: dict[str, Tensor]
    samplers: tuple[Sampler, Sampler]  # Stage C's and Stage B's, looked up (so checked) before any model runs
    schedulers: tuple[Scheduler, Scheduler]
    output: PipelineOutput  # latent_c after run_c, latent_b after run_b, images after run_a; timings per part


_RESIDENT_PARTS = ("text_encoder", "stage_c", "stage_b", "stage_a", "effnet")


@dataclass
class _Resident:
    part: Any  # what `Stages` holds (a model or a `Lazy`)
    model: Any  # the model on the device
    dtype: torch.dtype | None


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
        self._resident: dict[int, _Resident] = {}  # id of the part and of its model -> the model held on the device

    # -- placement -------------------------------------------------------------------------------------
    @property
    def offloading(self) -> bool:
        """Whether a model goes back to the CPU after its use: ``offload`` on a device other than the CPU."""
        return self.offload and self.device.type != "cpu"

    @contextmanager
    def on_device(self, module: Any, dtype: torch.dtype | None = None) -> Iterator[Any]:
        """Hold one stage on the device; with offloading it goes back to the CPU afterwards (a `resident` one
        stays on the device until its `resident` context ends)."""
        held = self._resident.get(id(module))
        if held is not None and held.model is module:
            if dtype is not None and dtype != held.dtype:
                module.to(self.device, dtype)
                held.dtype = dtype
            yield module
            return
        module.to(self.device, dtype) if dtype is not None else module.to(self.device)
        try:
            yield module
        finally:
            if self.offloading:
                module.to("cpu")
                torch.cuda.empty_cache() if self.device.type == "cuda" else None

    @contextmanager
    def use(self, part: Any, dtype: torch.dtype | None = None) -> Iterator[Any]:
        """Hold one stage on the device; a `Lazy` one is loaded first, and dropped by the pipeline afterwards
        (inside `resident` for it: the model loaded then, neither reloaded nor moved)."""
        held = self._resident.get(id(part))
        if held is not None and held.part is part:
            with self.on_device(held.model, dtype) as model:
                yield model
            return
        if isinstance(part, Lazy):
            gc.collect()  # the previous lazy stage's memory, should a reference cycle still hold it
            release_freed_memory()  # and the pages of its activations, before this stage allocates its own
            part = part.load()
        with self.on_device(part, dtype):
            yield part

    @contextmanager
    def resident(self, name: str) -> Iterator[Any]:
        """Keep one of the stages (``"text_encoder"``, ``"stage_c"``, ``"stage_b"``, ``"stage_a"``, ``"effnet"``)
        on the device, in its pipeline dtype, across every use inside the context: moved there once (a `Lazy`
        one loaded once) and, with offloading, back to the CPU once when the context ends, exception or not.
        Yields the model (None where the variant has no such stage). Nested for the same stage it does nothing;
        for several stages at once, nest contexts of different names (each holds its device memory)."""
        if name not in _RESIDENT_PARTS:
            raise ValueError(f"resident({name!r}): the stages a pipeline moves are {list(_RESIDENT_PARTS)}")
        part = getattr(self.stages, name)
        held = self._resident.get(id(part))
        if part is None or (held is not None and held.part is part):
            yield None if part is None else held.model  # type: ignore[union-attr]
            return
        dtype = {"stage_c": self.dtype_c, "stage_b": self.dtype_b}.get(name)
        with self.use(part, dtype) as model:
            entry = _Resident(part, model, dtype)
            self._resident[id(part)] = self._resident[id(model)] = entry
            try:
                yield model
            finally:  # forgotten first, so that leaving `use` moves it back (offloading) and drops a Lazy's model
                del self._resident[id(part)]
                self._resident.pop(id(model), None)

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

    def encode_image_latent(self, images: Tensor, size: tuple[int, int], compat: str = "official") -> Tensor:
        """img2img input [B, 3, H, W] in [0, 1] → Stage C latent [B, 16, h, w] (EfficientNet at h·32 × w·32;
        an encoder with another ``downscale`` attribute, like the demo's 16, at that multiple).

        Official: resized with antialias and clamped. ``compat="comfyui"``: StableCascade_StageC_VAEEncode's
        way, center-cropped to the latent's aspect, bicubic without antialias and without clamping."""
        effnet = self.stages.effnet
        if effnet is None:
            raise ValueError(f"variant {self.stages.variant!r} has no EfficientNet encoder; img2img needs one")
        h, w = size
        down = int(getattr(effnet, "downscale", 32))
        if compat == "comfyui":
            images = comfy_resize(images.float(), w * down, h * down)
        else:
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

    def decode_b(self, latent_b: Tensor, clamp: bool = True) -> Tensor:
        """Stage B latent → RGB [B, 3, 4h, 4w] through Stage A: clamped to [0, 1] as the official callers, or
        not (``clamp=False``, as ComfyUI's VAEDecode, whose image writers clip later)."""
        with self.use(self.stages.stage_a) as stage_a, torch.inference_mode():
            weight = next(stage_a.parameters())
            image = stage_a.decode(latent_b.to(weight.device, weight.dtype)).float()
            return (image.clamp(0, 1) if clamp else image).cpu()  # type: ignore[no-any-return]

    def sample_stage(self, name: str, model: Any, dtype: torch.dtype, plan: StagePlan, cond: dict[str, Any],
                     uncond: dict[str, Any], *, cfg: float | tuple[float, float], cfg_rho: float,
                     callback: Callable[[PipelineEvent], Any] | None, cancel: Callable[[], bool] | None,
                     trajectory: list[Tensor] | None, extra_inputs: Callable[[float], Any] | None = None,
                     step_t: Callable[[Tensor], float] | None = None) -> Tensor:
        """One stage's sampling; returns the stage's result (CPU float32): the last step's x0 for the logSNR
        family (official), the final x for the σ family (ComfyUI's KSampler output). ``extra_inputs(t)`` adds
        model inputs per step (the ControlNet features), to the cond and uncond rows alike; t is the step position
        (1 → 0), or what ``step_t(level)`` makes of the noise level (σ or logSNR) evaluated."""
        sampler = plan.sampler
        steps = plan.steps
        where = f"Stage {name.upper()}"

        def on_step(event: StepEvent) -> None:
            if not (torch.isfinite(event.x).all() and torch.isfinite(event.x0).all()):
                raise NonFiniteLatent(where, event.step, steps, sampler.name)
            if trajectory is not None:
                trajectory.append(event.x0.detach().float().cpu())
            if callback is not None:
                callback(PipelineEvent(name, event.step, steps, float(event.logsnr), event.x, event.x0))

        with self.use(model, dtype) as model, torch.inference_mode(), self._conditioning_cache(model):
            cast = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in cond.items()}
            cast_u = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in uncond.items()}
            # cfg == 1 is exactly the conditional prediction: skip the unconditional half of the batch
            guidance = None if not isinstance(cfg, tuple) and math.isclose(cfg, 1.0) else cfg
            if sampler.space == "sigma":
                denoiser: Any = SigmaDenoiser(model, cast, cast_u, cfg=guidance, cfg_rho=cfg_rho,
                                              step_t=step_t or step_t_lookup(plan.sigmas, plan.ts),
                                              extra_inputs=extra_inputs)
                x, levels = plan.start_ve(), plan.sigmas
            else:
                denoiser = GuidedDenoiser(model, cast, cast_u, cfg=guidance, cfg_rho=cfg_rho,
                                          step_t=step_t or step_t_lookup(plan.levels, plan.ts),
                                          extra_inputs=extra_inputs)
                x, levels = plan.start_vp(), plan.levels
            # shift: the model's schedule, which SA-Solver's default SDE window is defined on (ComfyUI's model_sampling)
            try:
                out = sampler.fn(denoiser, x.to(self.device), levels.to(self.device), noise=plan.noise,
                                 callback=on_step, cancel=cancel, shift=plan.shift)
            except (Cancelled, NonFiniteLatent, KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:
                origin = getattr(sampler.fn, "__module__", "") or ""
                if origin.startswith("cascade_lab."):
                    raise
                # a plugin's own code: say whose it is and keep its traceback (chained below)
                raise SamplerFailed(f"sampler {sampler.name!r} (from {origin or 'a plugin'}) raised "
                                    f"{type(exc).__name__} in {where}: {exc}; its traceback is above") from exc
        if not isinstance(out, Tensor):
            raise TypeError(f"sampler {sampler.name!r} returned {type(out).__name__}, not a latent tensor; a sampler "
                            "must return the stage's result [B, C, H, W]")
        if not torch.isfinite(out).all():
            raise NonFiniteLatent(where, steps, steps, sampler.name, result=True)
        return out.float().cpu()

    def control_features(self, controls: Sequence[ControlInput], batch: int) -> list[list[Tensor | None]]:
        """Run each ControlNet once on its input: its feature list scaled by its strength, rows = ``batch``
        (the official notebooks run the ControlNet once and hand the list to every step)."""
        from .models.controlnet import scale_control

        features = []
        for control in controls:
            with self.use(control.net, self.dtype_c) as net, torch.inference_mode():
                image = control.image.to(self.device)
                outputs = scale_control(net(image), control.strength)
            rows = [None if f is None else (f.expand(batch, -1, -1, -1) if f.size(0) == 1 else f).to(self.dtype_c)
                    for f in outputs]
            features.append(rows)
        return features

    @staticmethod
    def control_inputs(controls: Sequence[ControlInput], features: list[list[Tensor | None]]
                       ) -> Callable[[float], dict[str, Any]] | None:
        """``t -> {"cnet": list}``: the sum of the controls active at step position t (none: no cnet input)."""
        if not controls:
            return None

        def at(t: float) -> dict[str, Any]:
            active = [f for c, f in zip(controls, features, strict=True) if c.active(t)]
            if not active:
                return {}
            length = max(len(f) for f in active)
            summed: list[Tensor | None] = [None] * length
            for feature in active:  # several controls add, entry by entry (None: no feature at that block)
                for i, value in enumerate(feature):
                    previous = summed[i]
                    if value is not None:
                        summed[i] = value if previous is None else previous + value
            return {"cnet": summed}

        return at

    def _conditioning_cache(self, model: Any) -> AbstractContextManager[Any]:
        """The model's `conditioning_cache()` (text tokens and attention K/V mapped once per run, not per step)."""
        if self.compile and hasattr(model, "compile_denoiser"):
            model.compile_denoiser()
        return model.conditioning_cache() if hasattr(model, "conditioning_cache") else nullcontext()

    # -- the job ---------------------------------------------------------------------------------------
    def noise_source(self, params: GenerationParams, seed: int) -> NoiseSource:
        """The random numbers a seed stands for: the official stream, or ComfyUI's under compat="comfyui"."""
        if params.compat == "comfyui":
            return ComfyNoise(seed, params.seed_b)
        return OfficialNoise(seed)

    def run(self, params: GenerationParams, *, init_images: Tensor | None = None, clip_img: Tensor | None = None,
            callback: Callable[[PipelineEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
            keep_trajectory: bool = False, noise: NoiseSource | None = None,
            init_latent: Tensor | None = None, controls: Sequence[ControlInput] = ()) -> PipelineOutput:
        """Generate `params.batch_size` images. Raises `diffusion.Cancelled` when `cancel()` turns true.

        ``noise`` overrides where the random numbers come from (default: the seed's official stream, or
        ComfyUI's under ``compat="comfyui"``). ``init_latent`` [B or 1, 16, h, w] starts Stage C from a given
        Stage C latent instead of encoding ``init_images`` (ComfyUI's LATENT input), with strength / denoise.
        ``controls``: ControlNets for Stage C, each run once, scaled, summed while active (`ControlInput`).

        The same as `run_text`, `run_c`, `run_b`, `run_a` in turn (``output.timings``: text, stage_c, stage_b,
        stage_a).
        """
        job = self.run_text(params, clip_img=clip_img, noise=noise)
        self.run_c(job, init_images=init_images, init_latent=init_latent, controls=controls, callback=callback,
                   cancel=cancel, keep_trajectory=keep_trajectory)
        self.run_b(job, callback=callback, cancel=cancel, keep_trajectory=keep_trajectory)
        return self.run_a(job)

    def run_text(self, params: GenerationParams, *, clip_img: Tensor | None = None,
                 noise: NoiseSource | None = None) -> PipelineJob:
        """The first part of `run`: check `params` (sampler and scheduler names too), choose the seed (a random
        one when None) and the noise source, encode the prompts; ``clip_img`` [B, 1, C] (default zeros, as the
        official code) conditions Stage C with an image embedding, the unconditional half gets zeros."""
        params.validate()
        compat = params.compat
        samplers = get_sampler(params.sampler_c, compat), get_sampler(params.sampler_b, compat)  # names checked
        schedulers = get_scheduler(params.scheduler_c, compat), get_scheduler(params.scheduler_b, compat)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        if noise is None:
            noise = self.noise_source(params, seed)
        out = PipelineOutput(torch.empty(0), torch.empty(0), torch.empty(0), seed)

        t0 = time.perf_counter()
        cond, uncond = self.encode_text(params.prompts, params.negative_prompts)
        if clip_img is None:
            clip_img = torch.zeros(params.batch_size, 1, self._clip_img_features())  # official: zeros
        cond["clip_img"], uncond["clip_img"] = clip_img, torch.zeros_like(clip_img)
        out.timings["text"] = time.perf_counter() - t0
        return PipelineJob(params, noise, cond, uncond, samplers, schedulers, out)

    def run_c(self, job: PipelineJob, *, init_images: Tensor | None = None, init_latent: Tensor | None = None,
              controls: Sequence[ControlInput] = (), callback: Callable[[PipelineEvent], Any] | None = None,
              cancel: Callable[[], bool] | None = None, keep_trajectory: bool = False) -> Tensor:
        """The Stage C part of `run`: sample Stage C from noise, or from ``init_images`` / ``init_latent`` (img2img,
        see `run`), with ``controls``; sets and returns ``job.output.latent_c`` [B, 16, h, w] (CPU float32)."""
        params, out = job.params, job.output
        compat, B = params.compat, params.batch_size
        # Stage C: from noise, or img2img from the encoded image (official: noised to `strength` at shift 1)
        t0 = time.perf_counter()
        h, w = params.latent_size_c
        latent = None
        if init_latent is not None:
            if tuple(init_latent.shape[1:]) != (16, h, w):
                raise ValueError(f"init_latent has shape {tuple(init_latent.shape)}; a {params.width}x{params.height} "
                                 f"image at compression {params.compression} needs [B, 16, {h}, {w}]")
            latent = init_latent.float().cpu()
        elif init_images is not None and (params.strength < 1 or params.denoise < 1):
            latent = self.encode_image_latent(init_images, (h, w), compat=compat)
        if latent is not None:
            latent = latent.expand(B, -1, -1, -1) if latent.size(0) == 1 else latent
        plan_c = plan_stage(job.samplers[0], job.schedulers[0], params.steps_c, params.shift_c, params.denoise,
                            params.strength if latent is not None else 1.0, job.noise, "c", (B, 16, h, w), latent,
                            compat)
        step_t = None
        if compat == "comfyui" and controls:  # ComfyUI's step ranges: σ thresholds, not the fraction of the steps
            from dataclasses import fields

            from .diffusion.sigma_schedules import level_to_sigma

            controls = [SigmaRangeControl(**{f.name: getattr(c, f.name) for f in fields(ControlInput)},
                                          shift=params.shift_c) for c in controls]
            step_t = level_to_sigma(plan_c.sampler.space)
        features = self.control_features(controls, B) if controls else []
        out.latent_c = self.sample_stage(
            "c", self.stages.stage_c, self.dtype_c, plan_c, job.cond, job.uncond, cfg=params.cfg_c,
            cfg_rho=params.cfg_rho, callback=callback, cancel=cancel,
            trajectory=out.trajectory_c if keep_trajectory else None,
            extra_inputs=self.control_inputs(controls, features), step_t=step_t)
        del features
        out.timings["stage_c"] = time.perf_counter() - t0
        return out.latent_c

    def run_b(self, job: PipelineJob, *, callback: Callable[[PipelineEvent], Any] | None = None,
              cancel: Callable[[], bool] | None = None, keep_trajectory: bool = False) -> Tensor:
        """The Stage B part of `run` (after `run_c`): sets and returns ``job.output.latent_b`` [B, 4, H/4, W/4]."""
        params, out = job.params, job.output
        if out.latent_c.numel() == 0:
            raise ValueError("run_b(job) needs the job's Stage C latent: call run_c(job) first")
        # Stage B: conditioned on the Stage C result and the pooled text; uncond gets zeros and the negative
        t0 = time.perf_counter()
        latent_c, B = out.latent_c, params.batch_size
        hb, wb = params.latent_size_b
        cond_b = {"effnet": latent_c, "clip": job.cond["clip_text_pooled"]}
        uncond_b = {"effnet": torch.zeros_like(latent_c), "clip": job.uncond["clip_text_pooled"]}
        plan_b = plan_stage(job.samplers[1], job.schedulers[1], params.steps_b, params.shift_b, 1.0, 1.0, job.noise,
                            "b", (B, 4, hb, wb), None, params.compat)
        out.latent_b = self.sample_stage(
            "b", self.stages.stage_b, self.dtype_b, plan_b, cond_b, uncond_b, cfg=params.cfg_b,
            cfg_rho=params.cfg_rho, callback=callback, cancel=cancel,
            trajectory=out.trajectory_b if keep_trajectory else None)
        out.timings["stage_b"] = time.perf_counter() - t0
        return out.latent_b

    def run_a(self, job: PipelineJob) -> PipelineOutput:
        """The last part of `run` (after `run_b`): Stage A decodes the Stage B latent; returns ``job.output``."""
        out = job.output
        if out.latent_b.numel() == 0:
            raise ValueError("run_a(job) needs the job's Stage B latent: call run_b(job) first")
        t0 = time.perf_counter()
        out.images = self.decode_b(out.latent_b, clamp=job.params.compat != "comfyui")
        out.timings["stage_a"] = time.perf_counter() - t0
        return out


def comfy_center_crop(images: Tensor, width: int, height: int) -> Tensor:
    """ComfyUI's common_upscale crop="center": [..., H, W] with the too-long side cut to the aspect of
    width x height (offset round((old − old·ratio)/2) on each side)."""
    old_h, old_w = images.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return images.narrow(-2, y, old_h - 2 * y).narrow(-1, x, old_w - 2 * x)


def comfy_resize(images: Tensor, width: int, height: int) -> Tensor:
    """ComfyUI's common_upscale(…, "bicubic", crop="center"): `comfy_center_crop`, then bicubic interpolation
    without antialias or clamping."""
    return torch.nn.functional.interpolate(comfy_center_crop(images, width, height), size=(height, width),
                                           mode="bicubic")


@dataclass
class StagePlan:
    """One stage's sampling, decided before any model runs: sampler, noise levels in both spaces, the step
    positions t (for CFG pairs), and how the starting latent is made."""

    sampler: Sampler
    levels: Tensor  # logSNR, increasing (+inf for σ = 0)
    sigmas: Tensor  # σ = e^(−logSNR/2), decreasing
    ts: Tensor  # the step position t of each level: linspace(t_start, t_end, steps + 1)
    noise: Callable[[Tensor], Tensor]  # per-step noise
    z: Tensor  # the initial standard-normal noise [B, C, H, W]
    latent: Tensor | None  # the clean latent the stage starts from (img2img), VE/clean scale
    official_start: str  # "noise": x_vp = z; "diffuse": official img2img at shift 1; "": ComfyUI's noise_scaling
    t_start: float = 1.0
    shift: float = 1.0  # the stage's schedule shift

    @property
    def steps(self) -> int:
        return len(self.levels) - 1

    def max_denoise(self) -> bool:
        """ComfyUI's rule: the schedule starts at the table's σ_max (isclose, rel 1e-5) or above."""
        top = float(cascade_sigmas(1.0).sigma_max)
        first = float(self.sigmas[0])
        return math.isclose(top, first, rel_tol=1e-5) or first > top

    def start_ve(self) -> Tensor:
        """x at σ0 in VE scale: ComfyUI's noise_scaling (noise·√(1 + σ0²) at full denoise, else noise·σ0) + latent."""
        if self.official_start:
            return self.start_vp() * (1 + self.sigmas[0].double() ** 2).sqrt().float()
        s0 = self.sigmas[0]
        x = self.z * torch.sqrt(1.0 + s0**2.0) if self.max_denoise() else self.z * s0
        return x + self.latent if self.latent is not None else x

    def start_vp(self) -> Tensor:
        """x at the first level in VP scale (x_vp = x_ve/√(1 + σ0²)); exactly the official start where it applies."""
        if self.official_start == "noise":
            return self.z
        if self.official_start == "diffuse":
            assert self.latent is not None
            t = torch.full((self.z.size(0),), self.t_start)
            return diffuse(self.latent, t=t, shift=1.0, epsilon=self.z).noised
        return self.start_ve() / torch.sqrt(1.0 + self.sigmas[0] ** 2.0)


def plan_stage(sampler: Sampler, scheduler: Scheduler, steps: int, shift: float, denoise: float, strength: float,
               source: NoiseSource, stage: str, shape: tuple[int, ...], latent: Tensor | None,
               compat: str) -> StagePlan:
    """Noise levels and the start of one stage (the random draws happen here, in the source's order)."""
    t_start = 1.0
    if strength < 1:  # official img2img: the last part of the schedule from t = strength, int(steps·strength) steps
        if scheduler.space == "sigma":
            raise ValueError(f"strength={strength} (the official partial schedule) needs a logSNR scheduler; the "
                             f"ComfyUI scheduler {scheduler.name!r} takes denoise instead (e.g. denoise={strength})")
        steps, t_start = max(1, int(steps * strength)), strength

    def build(n: int) -> Tensor:
        if sampler.drop_penultimate:
            return discard_penultimate(scheduler.fn, n, shift=shift)
        if t_start < 1:
            return torch.as_tensor(scheduler.fn(n, shift=shift, t_start=t_start))
        return torch.as_tensor(scheduler.fn(n, shift=shift))

    values = partial_schedule(build, steps, denoise).float()
    if values.dim() != 1 or len(values) < 2:
        raise ValueError(f"scheduler {scheduler.name!r} gave {tuple(values.shape)} noise levels for {steps} steps; "
                         "a scheduler must return steps + 1 values")
    if scheduler.space == "sigma":
        sigmas = values
        levels = torch.where(sigmas > 0, -2 * sigmas.log(), torch.full_like(sigmas, math.inf))
    else:
        levels = values
        sigmas = sigma_of_logsnr(levels)
    n = len(values) - 1
    total = int(steps / denoise) if denoise <= 0.9999 else n  # positions in the whole (longer) schedule
    ts = torch.linspace(t_start, 0.0, total + 1, dtype=torch.float64)[-(n + 1):]
    z = source.initial(stage, shape)
    if tuple(z.shape) != tuple(shape):
        raise ValueError(f"the noise source gave initial noise of shape {tuple(z.shape)} for stage {stage.upper()}, "
                         f"whose latent is {tuple(shape)}")
    official = compat != "comfyui" and denoise > 0.9999
    start = ("diffuse" if latent is not None else "noise") if official else ""
    return StagePlan(sampler, levels, sigmas, ts, source.steps(stage), z.float(), latent, start, t_start, shift)


__all__ = ["CancelToken", "Cancelled", "ControlInput", "Lazy", "Pipeline", "PipelineEvent", "PipelineJob",
           "PipelineOutput", "SigmaRangeControl", "StagePlan", "Stages", "plan_stage", "release_freed_memory",
           "steady_heap"]
