"""Exponential-integrator SDE solvers in data prediction and half-logSNR time, as ComfyUI runs them: SEEDS-2/3
(Gonzalez et al. 2023, arXiv:2305.14267), the exponential Heun x0 solvers (SEEDS-2 with r = 1) and
ER-SDE-Solver-3 (Cui et al. 2023, arXiv:2309.06169). All draw plain per-step noise (no Brownian tree).

With λ = −ln σ and h = λ' − λ, a step of strength η keeps (σ'/σ)·e^{−hη} of x and weights the x0 estimates with
h·φ_k(−h(1 + η)); the noise of a step split at intermediate levels is carried across them so that the parts
add up to one step's worth, σ'·√(1 − e^{−2hη}).
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
    check_cancel,
    emit,
    half_logsnr,
    prepare_sigmas,
    row_sigmas,
    sigma_of_half_logsnr,
    step_noise,
)


def _h_phi_1(h: Tensor) -> Tensor:
    """h·φ₁(h) = e^h − 1."""
    return torch.expm1(h)


def _h_phi_2(h: Tensor) -> Tensor:
    """h·φ₂(h) = (e^h − 1 − h)/h."""
    return (torch.expm1(h) - h) / h


@torch.no_grad()
def sample_seeds_2(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                   callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                   eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, solver_type: str = "phi_1",
                   **extras: Any) -> Tensor:
    """SEEDS-2: two-stage stochastic exponential solver, data prediction (Gonzalez et al. 2023)."""
    if solver_type not in {"phi_1", "phi_2"}:
        raise ValueError(f"solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    noisy = eta > 0 and s_noise > 0
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = x0
            emit(callback, i, sigmas, x, x0)
            continue
        lam_s, lam_t = half_logsnr(sigmas[i]), half_logsnr(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1 = torch.lerp(lam_s, lam_t, r)  # the intermediate level at fraction r of the step
        sigma_1 = sigma_of_half_logsnr(lam_1)
        alpha_1 = sigma_1 * lam_1.exp()  # α = σ·e^λ: 1 up to rounding in the EPS (VE) parametrisation
        alpha_t = sigmas[i + 1] * lam_t.exp()

        x_1 = sigma_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_1 * _h_phi_1(-r * h_eta) * x0
        if noisy:
            z = (-2 * r * h * eta).expm1().neg().sqrt() * draw(sigmas[i], sigma_1)
            x_1 = x_1 + z * sigma_1 * s_noise
        x0_1 = denoiser(x_1, row_sigmas(sigma_1, x))

        if solver_type == "phi_1":
            x0_d = torch.lerp(x0, x0_1, 1 / (2 * r))
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * _h_phi_1(-h_eta) * x0_d
        else:
            b2 = _h_phi_2(-h_eta) / r
            b1 = _h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * x0 + b2 * x0_1)
        if noisy:  # carry the first part's noise to σ' and add the rest of the step's
            decay = (r - 1) * h * eta
            z = z * decay.exp() + decay.mul(2).expm1().neg().sqrt() * draw(sigma_1, sigmas[i + 1])
            x = x + z * sigmas[i + 1] * s_noise
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_exp_heun_2_x0(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                         callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                         solver_type: str = "phi_2", **extras: Any) -> Tensor:
    """Deterministic exponential Heun, x0 prediction in λ time: SEEDS-2 with r = 1, η = 0 (Gonzalez et al. 2023)."""
    return sample_seeds_2(denoiser, x, sigmas, noise=noise, callback=callback, cancel=cancel, eta=0.0, s_noise=0.0,
                          r=1.0, solver_type=solver_type)


@torch.no_grad()
def sample_exp_heun_2_x0_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                             callback: Callable[[StepEvent], Any] | None = None,
                             cancel: Callable[[], bool] | None = None, eta: float = 1.0, s_noise: float = 1.0,
                             solver_type: str = "phi_2", **extras: Any) -> Tensor:
    """Stochastic exponential Heun, x0 prediction in λ time: SEEDS-2 with r = 1 (Gonzalez et al. 2023)."""
    return sample_seeds_2(denoiser, x, sigmas, noise=noise, callback=callback, cancel=cancel, eta=eta,
                          s_noise=s_noise, r=1.0, solver_type=solver_type)


@torch.no_grad()
def sample_seeds_3(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                   callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                   eta: float = 1.0, s_noise: float = 1.0, r_1: float = 1.0 / 3, r_2: float = 2.0 / 3,
                   **extras: Any) -> Tensor:
    """SEEDS-3: three-stage stochastic exponential solver, data prediction (Gonzalez et al. 2023)."""
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    noisy = eta > 0 and s_noise > 0
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = x0
            emit(callback, i, sigmas, x, x0)
            continue
        lam_s, lam_t = half_logsnr(sigmas[i]), half_logsnr(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1, lam_2 = torch.lerp(lam_s, lam_t, r_1), torch.lerp(lam_s, lam_t, r_2)  # two intermediate levels
        sigma_1, sigma_2 = sigma_of_half_logsnr(lam_1), sigma_of_half_logsnr(lam_2)
        alpha_1, alpha_2 = sigma_1 * lam_1.exp(), sigma_2 * lam_2.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()

        x_1 = sigma_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_1 * _h_phi_1(-r_1 * h_eta) * x0
        if noisy:
            z = (-2 * r_1 * h * eta).expm1().neg().sqrt() * draw(sigmas[i], sigma_1)
            x_1 = x_1 + z * sigma_1 * s_noise
        x0_1 = denoiser(x_1, row_sigmas(sigma_1, x))

        a2 = r_2 / r_1 * _h_phi_2(-r_2 * h_eta)
        a1 = _h_phi_1(-r_2 * h_eta) - a2
        x_2 = sigma_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_2 * (a1 * x0 + a2 * x0_1)
        if noisy:
            decay = (r_1 - r_2) * h * eta
            z = z * decay.exp() + decay.mul(2).expm1().neg().sqrt() * draw(sigma_1, sigma_2)
            x_2 = x_2 + z * sigma_2 * s_noise
        x0_2 = denoiser(x_2, row_sigmas(sigma_2, x))

        b3 = _h_phi_2(-h_eta) / r_2
        b1 = _h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * x0 + b3 * x0_2)
        if noisy:
            decay = (r_2 - 1) * h * eta
            z = z * decay.exp() + decay.mul(2).expm1().neg().sqrt() * draw(sigma_2, sigmas[i + 1])
            x = x + z * sigmas[i + 1] * s_noise
        emit(callback, i, sigmas, x, x0)
    return x


def _er_sde_noise_scaler(lam: Tensor) -> Tensor:
    """ER-SDE's default noise-scale function of λ = σ/α: λ·(e^{λ^0.3} + 10) (Cui et al. 2023)."""
    return lam * ((lam**0.3).exp() + 10.0)


@torch.no_grad()
def sample_er_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                  callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                  s_noise: float = 1.0, noise_scaler: Callable[[Tensor], Tensor] | None = None, max_stage: int = 3,
                  **extras: Any) -> Tensor:
    """ER-SDE-Solver-3, VP form: extended reverse-time SDE, up to third order (Cui et al. 2023)."""
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    scaler = _er_sde_noise_scaler if noise_scaler is None else noise_scaler
    n_points = 200.0  # the rectangle rule's points for the stage-2/3 integrals
    points = torch.arange(0, n_points, dtype=torch.float32, device=x.device)
    er_lambdas = sigma_of_half_logsnr(half_logsnr(sigmas))  # ER-SDE's λ = σ/α of the VP latent (σ, to rounding)
    x0 = old_x0 = old_x0_d = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        if sigmas[i + 1] == 0:
            x = x0
        else:
            lam_s, lam_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
            r = scaler(lam_t) / scaler(lam_s)
            x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * x0  # stage 1: Euler
            stage = min(max_stage, i + 1)
            if stage >= 2 and old_x0 is not None:
                dt = lam_t - lam_s
                dlam = -dt / n_points
                lam_pos = lam_t + points * dlam
                scaled = scaler(lam_pos)
                s = torch.sum(1 / scaled) * dlam
                x0_d = (x0 - old_x0) / (lam_s - er_lambdas[i - 1])  # first divided difference of x0 in λ
                x = x + alpha_t * (dt + s * scaler(lam_t)) * x0_d
                if stage >= 3 and old_x0_d is not None:
                    s_u = torch.sum((lam_pos - lam_s) / scaled) * dlam
                    x0_u = (x0_d - old_x0_d) / ((lam_s - er_lambdas[i - 2]) / 2)  # second divided difference
                    x = x + alpha_t * ((dt**2) / 2 + s_u * scaler(lam_t)) * x0_u
                old_x0_d = x0_d
            if s_noise > 0:
                scale = (lam_t**2 - lam_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * draw(sigmas[i], sigmas[i + 1]) * s_noise * scale
        old_x0 = x0
        emit(callback, i, sigmas, x, x0)
    return x
