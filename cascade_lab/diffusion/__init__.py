"""The diffusion core: the official GDF maths (float32), samplers, schedulers, guidance and loss weights.

No model class is imported here. Conventions, as in Stable Cascade's `gdf/`:

* t ∈ [0, 1], t = 1 is pure noise. A **level** is a logSNR value (float32); `schedule.logsnr(t, shift)`
  is the shifted cosine schedule clamped to [−9.210240, 9.210074]. Latents are VP: x = a·x0 + b·ε with
  a = √σ(logSNR), b = √(1 − σ(logSNR)). The stage models predict ε and take r = `noise_cond(logsnr)`.

* **Scheduler**: `fn(steps, shift=1.0, t_start=1.0, t_end=0.0) -> Tensor` of steps + 1 levels, increasing
  (noisy → clean). Step i of a sampler goes from levels[i] to levels[i + 1].

* **Denoiser contract**: `denoiser(x, logsnr) -> x0`. `x` is the current latent [B, C, H, W] at level
  `logsnr` (a 0-dim float32 tensor on x's device); the result is the clean-latent estimate [B, C, H, W]
  (with the ε target, x0 = (x − b·ε̂)/a). A denoiser wraps everything model-specific: the stage model,
  its conditioning, CFG (`guidance.GuidedDenoiser`, one batched [cond; uncond] model call). Samplers
  recover ε̂ = (x − a·x0)/b where they need it, and never see the model.

* **Sampler**: `fn(denoiser, x, levels, *, noise=None, callback=None, cancel=None, **extras) -> x0`.
  `x` is the starting latent at levels[0] (for text-to-image plain N(0, I) noise, as the official
  `init_x`). `noise(like) -> Tensor` draws fresh noise (default `torch.randn_like`; the DDIM/DDPM/LCM
  samplers draw one per step, as the official code, so recorded noise replays exactly).
  `callback(StepEvent)` runs after each step; `StepEvent(step, steps, logsnr, logsnr_next, x, x0)`.
  `cancel()` is polled before each step; when it returns True the sampler raises `Cancelled` (with
  `.step` and the last `.x0`, None before the first step). The result is the LAST step's x0, which is
  what the official notebooks keep; the final x is discarded. Unknown extras are ignored.
"""

from __future__ import annotations

from .diffuse import Diffused, diffuse
from .guidance import GuidedDenoiser, batch_inputs, cfg_combine, eps_denoiser, guidance_scale
from .loss_weights import AdaptiveLossWeight, P2LossWeight
from .samplers import (
    Cancelled,
    StepEvent,
    generator_noise,
    replay_noise,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_lcm,
)
from .schedule import (
    eps_to_x0,
    logsnr,
    logsnr_limits,
    noise_cond,
    noise_cond_to_logsnr,
    sigma,
    train_t,
    vp_scalers,
    x0_to_eps,
)
from .schedulers import cosine, exponential, karras

__all__ = [
    "AdaptiveLossWeight",
    "Cancelled",
    "Diffused",
    "GuidedDenoiser",
    "P2LossWeight",
    "StepEvent",
    "batch_inputs",
    "cfg_combine",
    "cosine",
    "diffuse",
    "eps_denoiser",
    "eps_to_x0",
    "exponential",
    "generator_noise",
    "guidance_scale",
    "karras",
    "logsnr",
    "logsnr_limits",
    "noise_cond",
    "noise_cond_to_logsnr",
    "replay_noise",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_lcm",
    "sigma",
    "train_t",
    "vp_scalers",
    "x0_to_eps",
]
