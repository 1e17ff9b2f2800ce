"""The stochastic DPM-Solver++ forms (Lu et al. 2022, arXiv:2211.01095) as ComfyUI runs them: the single-step
SDE solver and the multistep 2M / 3M SDE solvers, all drawing from a Brownian tree over the schedule.

In half-logSNR time λ = −ln σ with h = λ' − λ, an SDE step of strength η keeps e^{−hη} of x and adds
σ'·√(1 − e^{−2hη}) of fresh noise; η = 0 is the ODE solver. The ``_gpu`` forms differ from the plain ones only in
where ComfyUI keeps the tree; on this CPU path they are the same functions.
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
)


@torch.no_grad()
def sample_dpmpp_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                     callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, **extras: Any) -> Tensor:
    """DPM-Solver++ (stochastic): two ancestral half-steps in λ per step (Lu et al. 2022, k-diffusion's SDE form)."""
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas, brownian=True)
    noisy = eta > 0 and s_noise > 0
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = x0
        else:
            lam_s, lam_t = half_logsnr(sigmas[i]), half_logsnr(sigmas[i + 1])
            h = lam_t - lam_s
            lam_mid = lam_s + r * h  # the intermediate level at fraction r of the step
            sigma_mid = sigma_of_half_logsnr(lam_mid)
            alpha_s = sigmas[i] * lam_s.exp()  # α = σ·e^λ: 1 up to rounding in the EPS (VE) parametrisation
            alpha_mid = sigma_mid * lam_mid.exp()
            alpha_t = sigmas[i + 1] * lam_t.exp()

            # to the intermediate level: deterministic part to its σ_down, then noise of its σ_up
            sd, su = ancestral_step(sigma_of_half_logsnr(lam_s), sigma_of_half_logsnr(lam_mid), eta)
            h_ = half_logsnr(sd) - lam_s
            x_mid = (alpha_mid / alpha_s) * (-h_).exp() * x - alpha_mid * (-h_).expm1() * x0
            if noisy:
                x_mid = x_mid + alpha_mid * draw(sigmas[i], sigma_mid) * s_noise * su
            x0_mid = denoiser(x_mid, row_sigmas(sigma_mid, x))

            # the full step with x0 blended from both estimates (weight 1/(2r) on the intermediate one)
            sd, su = ancestral_step(sigma_of_half_logsnr(lam_s), sigma_of_half_logsnr(lam_t), eta)
            h_ = half_logsnr(sd) - lam_s
            fac = 1 / (2 * r)
            x0_d = (1 - fac) * x0 + fac * x0_mid
            x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * x0_d
            if noisy:
                x = x + alpha_t * draw(sigmas[i], sigmas[i + 1]) * s_noise * su
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_sde_gpu(denoiser: Denoiser, x: Tensor, sigmas: Tensor, **options: Any) -> Tensor:
    """ComfyUI's GPU-tree `dpmpp_sde`: on this CPU path the same sampler as `sample_dpmpp_sde`."""
    return sample_dpmpp_sde(denoiser, x, sigmas, **options)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                        callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                        eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
                        **extras: Any) -> Tensor:
    """DPM-Solver++(2M) SDE, with the midpoint or Heun second-order correction (Lu et al. 2022)."""
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas, brownian=True)
    x0 = old_x0 = None
    h: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = x0
        else:
            lam_s, lam_t = half_logsnr(sigmas[i]), half_logsnr(sigmas[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * x0
            if old_x0 is not None and h_last is not None:  # second-order correction from the previous x0
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (x0 - old_x0)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (x0 - old_x0)
            if eta > 0 and s_noise > 0:
                x = x + draw(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_x0, h_last = x0, h
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_gpu(denoiser: Denoiser, x: Tensor, sigmas: Tensor, **options: Any) -> Tensor:
    """ComfyUI's GPU-tree `dpmpp_2m_sde`: on this CPU path the same sampler as `sample_dpmpp_2m_sde`."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, **options)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, solver_type: str = "heun",
                             **options: Any) -> Tensor:
    """DPM-Solver++(2M) SDE with the Heun correction by default: `sample_dpmpp_2m_sde` (Lu et al. 2022)."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, solver_type=solver_type, **options)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun_gpu(denoiser: Denoiser, x: Tensor, sigmas: Tensor, **options: Any) -> Tensor:
    """ComfyUI's GPU-tree `dpmpp_2m_sde_heun`: on this CPU path the same sampler as `sample_dpmpp_2m_sde_heun`."""
    return sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, **options)


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                        callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                        eta: float = 1.0, s_noise: float = 1.0, **extras: Any) -> Tensor:
    """DPM-Solver++(3M) SDE: third order from the two previous x0 (Lu et al. 2022; 2M on the second step)."""
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas, brownian=True)
    x0 = x0_1 = x0_2 = None  # this step's x0 and the two before it
    h: Tensor | None = None
    h_1: Tensor | None = None
    h_2: Tensor | None = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = x0
        else:
            lam_s, lam_t = half_logsnr(sigmas[i]), half_logsnr(sigmas[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * x0
            if h_2 is not None and h_1 is not None and x0_1 is not None and x0_2 is not None:
                # divided differences of x0 over the last three λ steps (ratios r0, r1 of the earlier steps to h)
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (x0 - x0_1) / r0
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None and x0_1 is not None:
                d = (x0 - x0_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            if eta > 0 and s_noise > 0:
                x = x + draw(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        x0_1, x0_2 = x0, x0_1
        h_1, h_2 = h, h_1
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde_gpu(denoiser: Denoiser, x: Tensor, sigmas: Tensor, **options: Any) -> Tensor:
    """ComfyUI's GPU-tree `dpmpp_3m_sde`: on this CPU path the same sampler as `sample_dpmpp_3m_sde`."""
    return sample_dpmpp_3m_sde(denoiser, x, sigmas, **options)
