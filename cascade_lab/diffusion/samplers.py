"""Samplers: small pure functions with one signature (k-diffusion style) over VP latents and logSNR levels.

    fn(denoiser, x, levels, *, noise=None, callback=None, cancel=None, **extras) -> x0

`x` [B, C, H, W] is the latent at `levels[0]` (pure noise at t = 1, or a noised image for img2img),
`levels` the steps + 1 logSNR values of a scheduler, `denoiser(x, logsnr) -> x0`. Step i goes from
levels[i] to levels[i+1]. Each sampler returns the clean-latent prediction of its LAST step, which is
what the official notebooks keep (the last x is discarded). Extras a sampler does not know are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .noise import generator_noise, replay_noise
from .schedule import sigma, vp_scalers, x0_to_eps

Denoiser = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class StepEvent:
    """What `callback` receives after each step."""

    step: int  # 0-based index of the step just taken
    steps: int  # total number of steps
    logsnr: float  # level the step started from (where x0 was predicted)
    logsnr_next: float  # level the step went to (where x now is)
    x: Tensor  # [B, C, H, W] latent after the step
    x0: Tensor  # [B, C, H, W] clean-latent prediction of this step
    sigma: float | None = None  # the σ family's noise levels of the step (None for the logSNR family)
    sigma_next: float | None = None


class Cancelled(Exception):
    """Raised by a sampler when `cancel()` returned True; carries the step reached and the last x0 (or None)."""

    def __init__(self, step: int, x0: Tensor | None) -> None:
        super().__init__(f"sampling cancelled before step {step}")
        self.step, self.x0 = step, x0


def prepare_levels(levels: Tensor | Sequence[float], x: Tensor) -> Tensor:
    """The levels as a 1-D float32 tensor on x's device, with at least one step."""
    out = torch.as_tensor(levels, dtype=torch.float32).to(x.device)
    if out.dim() != 1 or out.numel() < 2:
        raise ValueError(f"levels must be a 1-D sequence of steps + 1 >= 2 logSNR values, got shape "
                         f"{tuple(out.shape)}")
    return out


def _check(cancel: Callable[[], bool] | None, step: int, x0: Tensor | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled(step, x0)


def _emit(callback: Callable[[StepEvent], Any] | None, i: int, levels: Tensor, x: Tensor, x0: Tensor) -> None:
    if callback is not None:
        callback(StepEvent(i, len(levels) - 1, float(levels[i]), float(levels[i + 1]), x, x0))


def ddim_step(x: Tensor, x0: Tensor, logsnr: Tensor, logsnr_next: Tensor, eta: float, z: Tensor) -> Tensor:
    """GDF DDIMSampler.step: x' = a'·x0 + √(b'² − σ²)·ε̂ + σ·z, σ = η·√(b'²/b²)·√(1 − a²/a'²)."""
    a, b = vp_scalers(logsnr)
    a_next, b_next = vp_scalers(logsnr_next)
    eps = x0_to_eps(x, x0, logsnr)
    sigma_tau = eta * (b_next**2 / b**2).sqrt() * (1 - a**2 / a_next**2).sqrt() if eta > 0 else 0
    return a_next * x0 + (b_next**2 - sigma_tau**2).sqrt() * eps + sigma_tau * z


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, levels: Tensor | Sequence[float], *, noise: Noise | None = None,
                callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                eta: float = 0.0, **extras: Any) -> Tensor:
    """DDIM (Song et al. 2020) as GDF's DDIMSampler; draws one noise per step even at eta 0, as the official."""
    noise = noise or torch.randn_like
    levels = prepare_levels(levels, x)
    x0 = None
    for i in range(len(levels) - 1):
        _check(cancel, i, x0)
        x0 = denoiser(x, levels[i])
        x = ddim_step(x, x0, levels[i], levels[i + 1], eta, noise(x))
        _emit(callback, i, levels, x, x0)
    assert x0 is not None
    return x0


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: Tensor, levels: Tensor | Sequence[float], *, noise: Noise | None = None,
                callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                eta: float = 1.0, **extras: Any) -> Tensor:
    """Ancestral DDPM (Ho et al. 2020) as GDF's DDPMSampler = DDIM with eta 1: the official default."""
    return sample_ddim(denoiser, x, levels, noise=noise, callback=callback, cancel=cancel, eta=eta)


@torch.no_grad()
def sample_lcm(denoiser: Denoiser, x: Tensor, levels: Tensor | Sequence[float], *, noise: Noise | None = None,
               callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
               **extras: Any) -> Tensor:
    """Consistency-model sampling (Luo et al. 2023) as GDF's LCMSampler: x' = a'·x0 + b'·z, fresh noise."""
    noise = noise or torch.randn_like
    levels = prepare_levels(levels, x)
    x0 = None
    for i in range(len(levels) - 1):
        _check(cancel, i, x0)
        x0 = denoiser(x, levels[i])
        a_next, b_next = vp_scalers(levels[i + 1])
        x = x0 * a_next + noise(x) * b_next
        _emit(callback, i, levels, x, x0)
    assert x0 is not None
    return x0


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: Tensor, levels: Tensor | Sequence[float], *, noise: Noise | None = None,
                 callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                 **extras: Any) -> Tensor:
    """Euler on the probability-flow ODE in σ = b/a (Karras et al. 2022, alg. 1, no churn); DDIM in exact maths."""
    levels = prepare_levels(levels, x)
    x0 = None
    for i in range(len(levels) - 1):
        _check(cancel, i, x0)
        x0 = denoiser(x, levels[i])
        a, _ = vp_scalers(levels[i])
        a_next, _ = vp_scalers(levels[i + 1])
        s, s_next = sigma(levels[i]), sigma(levels[i + 1])
        x_ve = x / a  # the variance-exploding latent x0 + σ·ε
        d = (x_ve - x0) / s  # dx/dσ
        x = (x_ve + d * (s_next - s)) * a_next
        _emit(callback, i, levels, x, x0)
    assert x0 is not None
    return x0


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, levels: Tensor | Sequence[float], *,
                           noise: Noise | None = None, callback: Callable[[StepEvent], Any] | None = None,
                           cancel: Callable[[], bool] | None = None, eta: float = 1.0, s_noise: float = 1.0,
                           **extras: Any) -> Tensor:
    """k-diffusion's Euler ancestral in σ = b/a: Euler to σ_down, then noise σ_up (eta 1 equals DDPM in exact maths)."""
    noise = noise or torch.randn_like
    levels = prepare_levels(levels, x)
    x0 = None
    for i in range(len(levels) - 1):
        _check(cancel, i, x0)
        x0 = denoiser(x, levels[i])
        a, _ = vp_scalers(levels[i])
        a_next, _ = vp_scalers(levels[i + 1])
        s, s_next = sigma(levels[i]), sigma(levels[i + 1])
        s_up = torch.minimum(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2).clamp(min=0).sqrt())
        s_down = (s_next**2 - s_up**2).sqrt()
        x_ve = x / a
        d = (x_ve - x0) / s
        x = (x_ve + d * (s_down - s) + noise(x) * (s_noise * s_up)) * a_next
        _emit(callback, i, levels, x, x0)
    assert x0 is not None
    return x0


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, levels: Tensor | Sequence[float], *,
                    noise: Noise | None = None, callback: Callable[[StepEvent], Any] | None = None,
                    cancel: Callable[[], bool] | None = None, **extras: Any) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in VP form: x' = (b'/b)·x − a'·expm1(−h)·D, h = (logSNR' − logSNR)/2."""
    levels = prepare_levels(levels, x)
    x0 = old_x0 = None
    h_last = None
    for i in range(len(levels) - 1):
        _check(cancel, i, x0)
        x0 = denoiser(x, levels[i])
        _, b = vp_scalers(levels[i])
        a_next, b_next = vp_scalers(levels[i + 1])
        h = (levels[i + 1] - levels[i]) / 2  # step in λ = logSNR/2 = −ln σ
        if old_x0 is None or h_last is None or not (h_last > 0 and h > 0 and torch.isfinite(h)):
            d = x0  # first step, steps after/of zero length (clamped levels), a step to σ = 0: DDIM
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        x = (b_next / b) * x - a_next * torch.expm1(-h) * d
        old_x0, h_last = x0, h
        _emit(callback, i, levels, x, x0)
    assert x0 is not None
    return x0


__all__ = [
    "Cancelled",
    "StepEvent",
    "ddim_step",
    "generator_noise",
    "prepare_levels",
    "replay_noise",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_lcm",
]
