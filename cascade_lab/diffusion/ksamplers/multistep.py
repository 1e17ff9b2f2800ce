"""Multistep samplers that reuse earlier steps' estimates, as ComfyUI runs them: iPNDM (fixed and variable step
Adams–Bashforth on dx/dσ), RES multistep (exponential second order in λ = −ln σ, plain, ancestral and CFG++) and
gradient estimation (an Euler step corrected by the change of the derivative)."""

from __future__ import annotations

from collections import deque
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
    step_noise,
    to_d,
    uncond_x0,
)

Callback = Callable[[StepEvent], Any] | None
Cancel = Callable[[], bool] | None


def _ipndm_fixed(d: Tensor, past: list[Tensor], dt: Tensor) -> Tensor:
    """The x increment of an Adams–Bashforth step of order len(past) + 1 (equal-step weights); past newest last."""
    if not past:
        return dt * d
    if len(past) == 1:
        return dt * (3 * d - past[-1]) / 2
    if len(past) == 2:
        return dt * (23 * d - 16 * past[-1] + 5 * past[-2]) / 12
    return dt * (55 * d - 59 * past[-1] + 37 * past[-2] - 9 * past[-3]) / 24


def _ipndm_variable(d: Tensor, past: list[Tensor], sigmas: Tensor, i: int) -> Tensor:
    """The x increment of iPNDM-v from σ_i to σ_{i+1}: zju-pi's variable-step weights, the exact variable-step
    Adams–Bashforth ones at order 2 and at equal steps; at orders 3–4 with unequal steps they are not (as ComfyUI)."""
    h0 = sigmas[i + 1] - sigmas[i]
    if not past:
        return h0 * d
    h1 = sigmas[i] - sigmas[i - 1]
    r1 = h0 / h1
    c1, c2 = (2 + r1) / 2, -r1 / 2  # order 2: linear extrapolation of d over the unequal steps
    if len(past) == 1:
        return h0 * (c1 * d + c2 * past[-1])
    h2 = sigmas[i - 1] - sigmas[i - 2]
    # order 3 adds w3 times the second divided difference; order 4 w4 times the third
    w3 = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    if len(past) == 2:
        c1 = c1 + w3
        c2 = c2 - (1 + h1 / h2) * w3
        return h0 * (c1 * d + c2 * past[-1] + (w3 * h1 / h2) * past[-2])
    h3 = sigmas[i - 2] - sigmas[i - 3]
    w4 = ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2))) \
        * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    c1 = c1 + w3 + w4
    c2 = c2 - (1 + h1 / h2) * w3 - (1 + h1 / h2 + q) * w4
    c3 = w3 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * w4
    c4 = -w4 * q * h1 / h2
    return h0 * (c1 * d + c2 * past[-1] + c3 * past[-2] + c4 * past[-3])


def _ipndm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, callback: Callback, cancel: Cancel, max_order: int,
           variable: bool) -> Tensor:
    if not 1 <= max_order <= 4:
        raise ValueError(f"max_order={max_order!r}: iPNDM has orders 1 to 4 (ComfyUI's default 4)")
    sigmas = prepare_sigmas(sigmas, x)
    past: deque[Tensor] = deque(maxlen=max_order - 1)  # the previous steps' dx/dσ, newest last
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        d = to_d(x, sigmas[i], x0)
        if sigmas[i + 1] == 0:  # the last step lands on the clean estimate
            x = x0
        else:
            history = list(past)
            if variable:
                x = x + _ipndm_variable(d, history, sigmas, i)
            else:
                x = x + _ipndm_fixed(d, history, sigmas[i + 1] - sigmas[i])
        past.append(d)
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_ipndm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                 callback: Callback = None, cancel: Cancel = None, max_order: int = 4, **extras: Any) -> Tensor:
    """Improved PNDM: Adams–Bashforth up to 4th order on dx/dσ (Zhang & Chen 2023, DEIS paper, iPNDM)."""
    return _ipndm(denoiser, x, sigmas, callback, cancel, max_order, variable=False)


@torch.no_grad()
def sample_ipndm_v(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                   callback: Callback = None, cancel: Cancel = None, max_order: int = 4, **extras: Any) -> Tensor:
    """iPNDM with step-size-aware weights (Zhang & Chen 2023, as zju-pi's diff-solvers and ComfyUI)."""
    return _ipndm(denoiser, x, sigmas, callback, cancel, max_order, variable=True)


def _res_multistep(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise | None, callback: Callback,
                   cancel: Cancel, s_noise: float, eta: float, cfg_pp: bool) -> Tensor:
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    x0 = old_x0 = old_sigma_down = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        guide = uncond_x0(denoiser, x0) if cfg_pp else x0  # the estimate the ODE step follows
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if old_x0 is None or old_sigma_down is None or sigma_down == 0:  # first order
            if cfg_pp:  # CFG++: land on the guided x0, renoise with the unconditional direction
                x = x0 + to_d(x, sigmas[i], guide) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], x0) * (sigma_down - sigmas[i])
        else:
            # RES 2nd order (Zhang et al. 2024, arXiv:2308.02157): x0 interpolated through the previous estimate,
            # which belongs to λ(σ_{i−1}) but was aimed at λ(previous σ_down); c2 is that node's offset over h
            lam, lam_next = half_logsnr(sigmas[i]), half_logsnr(sigma_down)
            h = lam_next - lam
            c2 = (half_logsnr(sigmas[i - 1]) - half_logsnr(old_sigma_down)) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (x0 - guide)
            x = torch.exp(-h) * x + h * (b1 * guide + b2 * old_x0)
        if sigmas[i + 1] > 0 and eta:
            x = x + draw(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_x0, old_sigma_down = guide, sigma_down
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_res_multistep(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                         callback: Callback = None, cancel: Cancel = None, s_noise: float = 1.0,
                         **extras: Any) -> Tensor:
    """RES multistep, second-order exponential integrator in λ (Zhang et al. 2024, arXiv:2308.02157)."""
    return _res_multistep(denoiser, x, sigmas, noise, callback, cancel, s_noise, eta=0.0, cfg_pp=False)


@torch.no_grad()
def sample_res_multistep_cfg_pp(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                                callback: Callback = None, cancel: Cancel = None, s_noise: float = 1.0,
                                **extras: Any) -> Tensor:
    """RES multistep with CFG++ renoising along the unconditional x0 (Chung et al. 2024)."""
    return _res_multistep(denoiser, x, sigmas, noise, callback, cancel, s_noise, eta=0.0, cfg_pp=True)


@torch.no_grad()
def sample_res_multistep_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                                   callback: Callback = None, cancel: Cancel = None, eta: float = 1.0,
                                   s_noise: float = 1.0, **extras: Any) -> Tensor:
    """RES multistep to σ_down, then ancestral noise of σ_up (Zhang et al. 2024, k-diffusion's ancestral split)."""
    return _res_multistep(denoiser, x, sigmas, noise, callback, cancel, s_noise, eta=eta, cfg_pp=False)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *,
                                          noise: Noise | None = None, callback: Callback = None,
                                          cancel: Cancel = None, eta: float = 1.0, s_noise: float = 1.0,
                                          **extras: Any) -> Tensor:
    """RES multistep ancestral with CFG++ (Zhang et al. 2024; Chung et al. 2024)."""
    return _res_multistep(denoiser, x, sigmas, noise, callback, cancel, s_noise, eta=eta, cfg_pp=True)


def _gradient_estimation(denoiser: Denoiser, x: Tensor, sigmas: Tensor, callback: Callback, cancel: Cancel,
                         ge_gamma: float, cfg_pp: bool) -> Tensor:
    sigmas = prepare_sigmas(sigmas, x)
    x0 = old_d = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        d = to_d(x, sigmas[i], uncond_x0(denoiser, x0) if cfg_pp else x0)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x0
        else:
            x = x0 + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if old_d is not None:  # extrapolate the derivative: d + (γ − 1)·(d − d_prev)
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_gradient_estimation(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                               callback: Callback = None, cancel: Cancel = None, ge_gamma: float = 2.0,
                               **extras: Any) -> Tensor:
    """Gradient estimation: Euler with the derivative extrapolated by γ (Permenter & Yuan 2024)."""
    return _gradient_estimation(denoiser, x, sigmas, callback, cancel, ge_gamma, cfg_pp=False)


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                                      callback: Callback = None, cancel: Cancel = None, ge_gamma: float = 2.0,
                                      **extras: Any) -> Tensor:
    """Gradient estimation with CFG++ renoising along the unconditional x0 (Permenter & Yuan 2024; Chung et al.)."""
    return _gradient_estimation(denoiser, x, sigmas, callback, cancel, ge_gamma, cfg_pp=True)
