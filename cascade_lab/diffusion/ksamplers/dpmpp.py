"""DPM-Solver++ in half-logSNR time (Lu et al. 2022, arXiv:2211.01095): the single-step 2S with ancestral noise,
the multistep 2M, and their CFG++ forms (Chung et al. 2024, arXiv:2406.08070), as ComfyUI runs them.

With λ = −ln σ and h = λ' − λ, a first-order data-prediction step from σ to σ' is
x' = (σ'/σ)·x − expm1(−h)·x0; the second-order forms replace x0 by a blend of two estimates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .common import (
    Denoiser,
    Noise,
    StepEvent,
    ancestral_step,
    check_cancel,
    emit,
    half_logsnr,
    prepare_sigmas,
    row_sigmas,
    sigma_of_half_logsnr,
    step_noise,
    to_d,
    uncond_x0,
)


def _dpmpp_2s_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise | None,
                        callback: Callable[[StepEvent], Any] | None, cancel: Callable[[], bool] | None,
                        eta: float, s_noise: float, cfg_pp: bool) -> Tensor:
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        uncond = uncond_x0(denoiser, x0) if cfg_pp else x0
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:  # straight to σ = 0: an Euler step (CFG++: along the unconditional direction)
            if cfg_pp:
                x = x0 + to_d(x, sigmas[i], uncond) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], x0) * (sigma_down - sigmas[i])
        else:  # 2S: a half step in λ to the midpoint s, then the full step to σ_down with the midpoint's x0
            lam, lam_down = half_logsnr(sigmas[i]), half_logsnr(sigma_down)
            h = lam_down - lam
            lam_mid = lam + 0.5 * h
            sigma_mid = sigma_of_half_logsnr(lam_mid)
            # CFG++ moves x by (x0 − uncond) so that the renoising part follows the unconditional estimate
            start = x + (x0 - uncond) if cfg_pp else x
            x_mid = (sigma_mid / sigma_of_half_logsnr(lam)) * start - (-h * 0.5).expm1() * x0
            x0_mid = denoiser(x_mid, row_sigmas(sigma_mid, x))
            start = x + (x0 - uncond_x0(denoiser, x0_mid)) if cfg_pp else x  # ComfyUI: the midpoint call's uncond
            x = (sigma_of_half_logsnr(lam_down) / sigma_of_half_logsnr(lam)) * start - (-h).expm1() * x0_mid
        if sigmas[i + 1] > 0:
            x = x + draw(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                              callback: Callable[[StepEvent], Any] | None = None,
                              cancel: Callable[[], bool] | None = None, eta: float = 1.0, s_noise: float = 1.0,
                              **extras: Any) -> Tensor:
    """DPM-Solver++(2S) steps to σ_down, then ancestral noise of σ_up (Lu et al. 2022, k-diffusion's form)."""
    return _dpmpp_2s_ancestral(denoiser, x, sigmas, noise, callback, cancel, eta, s_noise, cfg_pp=False)


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                                     callback: Callable[[StepEvent], Any] | None = None,
                                     cancel: Callable[[], bool] | None = None, eta: float = 1.0, s_noise: float = 1.0,
                                     **extras: Any) -> Tensor:
    """DPM-Solver++(2S) ancestral with CFG++ renoising along the unconditional x0 (Chung et al. 2024)."""
    return _dpmpp_2s_ancestral(denoiser, x, sigmas, noise, callback, cancel, eta, s_noise, cfg_pp=True)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                    callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                    **extras: Any) -> Tensor:
    """DPM-Solver++(2M): second order from the previous step's x0 (Lu et al. 2022, algorithm 2)."""
    sigmas = prepare_sigmas(sigmas, x)
    x0 = old_x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        lam, lam_next = half_logsnr(sigmas[i]), half_logsnr(sigmas[i + 1])
        h = lam_next - lam
        if old_x0 is None or sigmas[i + 1] == 0:  # first and last steps are first order
            x0_d = x0
        else:  # extrapolate x0 linearly in λ, r = h_last / h
            r = (lam - half_logsnr(sigmas[i - 1])) / h
            x0_d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        x = (sigma_of_half_logsnr(lam_next) / sigma_of_half_logsnr(lam)) * x - (-h).expm1() * x0_d
        old_x0 = x0
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                           callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                           **extras: Any) -> Tensor:
    """DPM-Solver++(2M) with CFG++: the renoising term uses the unconditional x0 (Chung et al. 2024)."""
    sigmas = prepare_sigmas(sigmas, x)
    x0 = old_uncond = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        uncond = uncond_x0(denoiser, x0)
        lam, lam_next = half_logsnr(sigmas[i]), half_logsnr(sigmas[i + 1])
        h = lam_next - lam
        # x' = x0 + e^{−h}·(x − uncond) [− expm1(−h)·(x0 − uncond_prev)/(2r) in the second-order steps]
        mix = -torch.exp(-h) * uncond
        if old_uncond is not None and sigmas[i + 1] != 0:
            r = (lam - half_logsnr(sigmas[i - 1])) / h
            mix = mix - torch.expm1(-h) * (1 / (2 * r)) * (x0 - old_uncond)
        x = x0 + mix + torch.exp(-h) * x
        old_uncond = uncond
        emit(callback, i, sigmas, x, x0)
    return x
