"""What every sampler of the σ family shares: the contract, the step loop's bookkeeping and the noise sources.

The σ family (ComfyUI's / k-diffusion's samplers) works on variance-exploding latents:

    fn(denoiser, x, sigmas, *, noise=None, callback=None, cancel=None, **extras) -> x

* ``x`` [B, C, H, W] float32 is the latent at ``sigmas[0]`` in VE scale, x = x0 + σ·ε (what ComfyUI's
  sampler functions receive after its ``noise_scaling``).
* ``sigmas`` is a 1-D float32 tensor, decreasing, usually ending with 0 (steps + 1 values).
* ``denoiser(x, sigma)`` with ``sigma`` a [B] tensor (σ repeated per row, as ComfyUI passes it) returns the
  clean-latent estimate x0. After each call ``denoiser.uncond_x0`` may hold the unconditional x0 of that
  call (CFG++ samplers need it); a denoiser without it counts as unguided (uncond_x0 = x0).
* ``noise(like) -> Tensor`` draws one standard-normal tensor (default ``torch.randn_like``). A source that
  also has ``brownian(x, sigma_min, sigma_max) -> f(sigma, sigma_next)`` serves the SDE samplers' Brownian
  tree (`step_noise`); replayed or plain sources give independent draws in call order.
* ``callback(StepEvent)`` after each step, with x after the step and the step's (first) x0;
  ``cancel()`` is polled before each step and raises `Cancelled`.
* The result is the final x, as ComfyUI's KSampler returns it (for a schedule ending at σ = 0 that is the
  clean latent).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..samplers import Cancelled, StepEvent

Denoiser = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[Tensor], Tensor]
StepNoise = Callable[[Tensor, Tensor], Tensor]  # (sigma, sigma_next) -> standard-normal tensor like x


def prepare_sigmas(sigmas: Tensor | Any, x: Tensor) -> Tensor:
    """The σ schedule as a 1-D float32 tensor on x's device (at least two values)."""
    out = torch.as_tensor(sigmas, dtype=torch.float32).to(x.device)
    if out.dim() != 1 or out.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of steps + 1 >= 2 noise levels, got shape {tuple(out.shape)}")
    return out


def row_sigmas(sigma: Tensor, x: Tensor) -> Tensor:
    """σ repeated once per batch row ([B]), the form the denoiser takes."""
    return sigma * x.new_ones([x.shape[0]])


def uncond_x0(denoiser: Any, x0: Tensor) -> Tensor:
    """The unconditional x0 of the denoiser's last call (CFG++), or x0 itself for an unguided denoiser."""
    value = getattr(denoiser, "uncond_x0", None)
    return x0 if value is None else value  # type: ignore[no-any-return]


def check_cancel(cancel: Callable[[], bool] | None, step: int, x0: Tensor | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled(step, x0)


def _logsnr(sigma: float) -> float:
    return -2.0 * math.log(sigma) if sigma > 0 else math.inf


def emit(callback: Callable[[StepEvent], Any] | None, i: int, sigmas: Tensor, x: Tensor, x0: Tensor) -> None:
    """Report step i (x after the step, x0 of the step) as a `StepEvent` with its σ pair and logSNR pair."""
    if callback is not None:
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        callback(StepEvent(i, len(sigmas) - 1, _logsnr(s), _logsnr(s_next), x, x0, sigma=s, sigma_next=s_next))


def to_d(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dσ = (x − x0)/σ (Karras et al. 2022, eq. 3)."""
    return (x - x0) / sigma


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(σ_down, σ_up) of an ancestral step: σ_up = min(σ', η·√(σ'²(σ² − σ'²)/σ²)), σ_down = √(σ'² − σ_up²)."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def default_noise(noise: Noise | None) -> Noise:
    return noise if noise is not None else torch.randn_like


def step_noise(noise: Noise | None, x: Tensor, sigmas: Tensor, *, brownian: bool = False) -> StepNoise:
    """The per-step noise a sampler draws: ``f(sigma, sigma_next)``.

    With ``brownian=True`` (the SDE samplers) and a source offering ``brownian``, a Brownian tree over
    [smallest σ > 0, largest σ] as ComfyUI's BrownianTreeNoiseSampler; otherwise one draw per call.
    """
    source = default_noise(noise)
    if brownian and hasattr(source, "brownian"):
        positive = sigmas[sigmas > 0]
        return source.brownian(x, positive.min(), sigmas.max())  # type: ignore[no-any-return, attr-defined]
    return lambda sigma, sigma_next: source(x)


def half_logsnr(sigma: Tensor) -> Tensor:
    """λ = −ln σ, the half-logSNR of a VE level (log α/σ of the VP latent)."""
    return sigma.log().neg()


def sigma_of_half_logsnr(lam: Tensor) -> Tensor:
    return lam.neg().exp()


__all__ = [
    "Cancelled",
    "Denoiser",
    "Noise",
    "StepEvent",
    "StepNoise",
    "ancestral_step",
    "check_cancel",
    "default_noise",
    "emit",
    "half_logsnr",
    "prepare_sigmas",
    "row_sigmas",
    "sigma_of_half_logsnr",
    "step_noise",
    "to_d",
    "uncond_x0",
]
