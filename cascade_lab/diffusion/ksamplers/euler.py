"""Euler-type samplers of the σ family (Karras et al. 2022): Euler, Euler ancestral and their CFG++ forms, and the
second-order steps built on them (Heun, Heun++, DPM-Solver-2 and its ancestral form)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .common import (
    Denoiser,
    Noise,
    StepEvent,
    StepNoise,
    ancestral_step,
    check_cancel,
    emit,
    half_logsnr,
    prepare_sigmas,
    row_sigmas,
    step_noise,
    to_d,
    uncond_x0,
)


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                 callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 **extras: Any) -> Tensor:
    """Euler steps on the probability-flow ODE (Karras et al. 2022, algorithm 2; churn off by default)."""
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x, sigma_hat = _churn(x, sigmas, i, draw, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoiser(x, row_sigmas(sigma_hat, x))
        x = x + to_d(x, sigma_hat, x0) * (sigmas[i + 1] - sigma_hat)
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                           callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                           eta: float = 1.0, s_noise: float = 1.0, **extras: Any) -> Tensor:
    """Euler to σ_down, then fresh noise of σ_up (ancestral sampling, Ho et al. 2020 in k-diffusion's σ form)."""
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:  # the last step to σ = 0: the clean estimate itself, no noise drawn
            x = x0
        else:
            x = (x + to_d(x, sigmas[i], x0) * (sigma_down - sigmas[i])
                 + draw(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up)
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                                  callback: Callable[[StepEvent], Any] | None = None,
                                  cancel: Callable[[], bool] | None = None, eta: float = 1.0, s_noise: float = 1.0,
                                  **extras: Any) -> Tensor:
    """Euler ancestral with CFG++: the step's noise direction comes from the unconditional x0 (Chung et al. 2024)."""
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        uncond = uncond_x0(denoiser, x0)
        if sigmas[i + 1] == 0:  # the last step to σ = 0: the clean estimate itself
            x = x0
        else:
            # α = σ·e^λ is 1 for VE latents up to float rounding; computed anyway so the rounding follows ComfyUI's
            alpha, alpha_next = (s * half_logsnr(s).exp() for s in (sigmas[i], sigmas[i + 1]))
            eps_uncond = to_d(x, sigmas[i], alpha * uncond)
            sigma_down, sigma_up = ancestral_step(sigmas[i] / alpha, sigmas[i + 1] / alpha_next, eta)
            x = alpha_next * x0 + alpha_next * sigma_down * eps_uncond  # DDIM-style: x0 plus σ_down of that noise
            if eta > 0 and s_noise > 0:
                x = x + alpha_next * draw(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_euler_cfg_pp(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                        callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                        **extras: Any) -> Tensor:
    """Euler with CFG++ (Chung et al. 2024): the deterministic (η = 0) form of `sample_euler_ancestral_cfg_pp`."""
    return sample_euler_ancestral_cfg_pp(denoiser, x, sigmas, noise=noise, callback=callback, cancel=cancel,
                                         eta=0.0, s_noise=0.0)


def _churn(x: Tensor, sigmas: Tensor, i: int, draw: StepNoise, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float, *, draw_every_step: bool = False) -> tuple[Tensor, Tensor]:
    """(x, σ̂) after Karras et al.'s churn: with γ > 0 the level rises to σ̂ = σ(1 + γ) with fresh noise.

    ``draw_every_step``: with churn on, draw noise even where γ = 0 (ComfyUI's heunpp2 does; keeps its noise order)."""
    in_range = s_tmin <= sigmas[i] <= s_tmax
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_churn > 0 and in_range else 0.0
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0 or (draw_every_step and s_churn > 0):
        z = draw(sigmas[i], sigmas[i + 1]) * s_noise
        if gamma > 0:
            x = x + z * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                **extras: Any) -> Tensor:
    """Heun steps on the probability-flow ODE (Karras et al. 2022, algorithm 2); the step to σ = 0 is Euler."""
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x, sigma_hat = _churn(x, sigmas, i, draw, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoiser(x, row_sigmas(sigma_hat, x))
        d = to_d(x, sigma_hat, x0)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:  # trapezoid: average the slopes at both ends of the Euler step
            x_end = x + d * dt
            d_end = to_d(x_end, sigmas[i + 1], denoiser(x_end, row_sigmas(sigmas[i + 1], x)))
            x = x + (d + d_end) / 2 * dt
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_heunpp2(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                   callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                   s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                   **extras: Any) -> Tensor:
    """Heun++ (Carzit, sd-webui-samplers-scheduler): slopes at σ, σ', σ'' weighted by level; Heun, Euler at the end."""
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    sigma_end = sigmas[-1]
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x, sigma_hat = _churn(x, sigmas, i, draw, s_churn, s_tmin, s_tmax, s_noise, draw_every_step=True)
        x0 = denoiser(x, row_sigmas(sigma_hat, x))
        d = to_d(x, sigma_hat, x0)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == sigma_end:
            x = x + d * dt
            emit(callback, i, sigmas, x, x0)
            continue
        x_1 = x + d * dt  # Euler to σ', then its slope there
        d_1 = to_d(x_1, sigmas[i + 1], denoiser(x_1, row_sigmas(sigmas[i + 1], x)))
        if sigmas[i + 2] == sigma_end:  # two slopes, weight σ'/(2σ₀) on the second
            w_1 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w_1) + d_1 * w_1) * dt
        else:  # one more Euler step, to σ'', for a third slope; weights σ'/(3σ₀) and σ''/(3σ₀)
            x_2 = x_1 + d_1 * (sigmas[i + 2] - sigmas[i + 1])
            d_2 = to_d(x_2, sigmas[i + 2], denoiser(x_2, row_sigmas(sigmas[i + 2], x)))
            w_1, w_2 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w_1 - w_2) * d + w_1 * d_1 + w_2 * d_2) * dt
        emit(callback, i, sigmas, x, x0)
    return x


def _dpm_2_step(denoiser: Denoiser, x: Tensor, sigma: Tensor, sigma_to: Tensor, d: Tensor) -> Tensor:
    """x at sigma_to by the midpoint rule with the midpoint taken in log σ (DPM-Solver-2 in k-diffusion's form)."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = to_d(x_mid, sigma_mid, denoiser(x_mid, row_sigmas(sigma_mid, x)))
    return x + d_mid * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                 callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 **extras: Any) -> Tensor:
    """DPM-Solver-2 steps (Lu et al. 2022) in Karras et al.'s algorithm 2 frame; the step to σ = 0 is Euler."""
    # ComfyUI's KSampler schedules dpm_2 for steps + 1 and drops the penultimate σ: that is the caller's schedule
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x, sigma_hat = _churn(x, sigmas, i, draw, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoiser(x, row_sigmas(sigma_hat, x))
        d = to_d(x, sigma_hat, x0)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            x = _dpm_2_step(denoiser, x, sigma_hat, sigmas[i + 1], d)
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                           callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                           eta: float = 1.0, s_noise: float = 1.0, **extras: Any) -> Tensor:
    """DPM-Solver-2 to σ_down, then fresh noise of σ_up (k-diffusion's ancestral DPM-Solver-2)."""
    # ComfyUI's KSampler schedules dpm_2_ancestral as dpm_2 (steps + 1, penultimate σ dropped): the caller's schedule
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], x0)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm_2_step(denoiser, x, sigmas[i], sigma_down, d)
            x = x + draw(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        emit(callback, i, sigmas, x, x0)
    return x
