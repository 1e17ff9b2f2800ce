"""DPM-Solver (Lu et al. 2022) with a fixed evaluation budget (`dpm_fast`) and with adaptive step size
(`dpm_adaptive`), as k-diffusion runs them: noise prediction ε = (x − x0)/σ, steps in t = λ = −ln σ.

These two do not walk the σ list. As ComfyUI's `ksampler()` wrapper, they take σ_max = sigmas[0] and σ_min = the
last σ (the one before it when the list ends at 0) and, for `dpm_fast`, a budget of len(sigmas) − 1 denoiser
evaluations; they end at σ_min (a schedule ending at 0 leaves σ_min's noise in the result, as in ComfyUI).
"""

from __future__ import annotations

import math
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


def _span(sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """(t_start, t_end) = (λ(σ_max), λ(σ_min)) from the σ list, as ComfyUI's wrapper picks the two levels."""
    sigma_max, sigma_min = sigmas[0], sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(f"DPM-Solver needs σ_max and σ_min > 0, got σ_max = {float(sigma_max)} and "
                         f"σ_min = {float(sigma_min)} from sigmas {sigmas.tolist()}; end the schedule with at most "
                         f"one 0")
    return half_logsnr(sigma_max), half_logsnr(sigma_min)


def _eps(denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
    """ε = (x − x0)/σ of the denoiser at x and λ = t."""
    sigma = sigma_of_half_logsnr(t)
    return (x - denoiser(x, row_sigmas(sigma, x))) / sigma


def _x0(x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """The step's x0 for the events, x − σ·ε as ComfyUI reports it (equal to the denoiser's up to σ·ulp)."""
    return x - sigma_of_half_logsnr(t) * eps


def _eps_between(denoiser: Denoiser, x: Tensor, t: Tensor, h: Tensor, r: float, eps: Tensor) -> Tensor:
    """ε at the first-order intermediate point λ = t + r·h (the 2- and 3-step solvers' first stage)."""
    s = t + r * h
    return _eps(denoiser, x - sigma_of_half_logsnr(s) * (r * h).expm1() * eps, s)


def _order_1(x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor) -> Tensor:
    """DPM-Solver-1 (= DDIM): x − σ(t')·(e^h − 1)·ε."""
    return x - sigma_of_half_logsnr(t_next) * (t_next - t).expm1() * eps


def _order_2(denoiser: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor,
             r1: float = 0.5) -> tuple[Tensor, Tensor]:
    """DPM-Solver-2 (Lu et al. 2022, algorithm 4): (x at t', ε at the intermediate point t + r1·h)."""
    h = t_next - t
    eps_1 = _eps_between(denoiser, x, t, h, r1, eps)
    sigma_next = sigma_of_half_logsnr(t_next)
    return x - sigma_next * h.expm1() * eps - sigma_next / (2 * r1) * h.expm1() * (eps_1 - eps), eps_1


def _order_3(denoiser: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor, r1: float = 1 / 3,
             r2: float = 2 / 3, eps_1: Tensor | None = None) -> Tensor:
    """DPM-Solver-3 (Lu et al. 2022, algorithm 5); eps_1 is ε at t + r1·h when a 2-step already has it."""
    h = t_next - t
    if eps_1 is None:
        eps_1 = _eps_between(denoiser, x, t, h, r1, eps)
    s2 = t + r2 * h
    sigma_2 = sigma_of_half_logsnr(s2)
    u2 = (x - sigma_2 * (r2 * h).expm1() * eps
          - sigma_2 * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_1 - eps))
    eps_2 = _eps(denoiser, u2, s2)
    sigma_next = sigma_of_half_logsnr(t_next)
    return x - sigma_next * h.expm1() * eps - sigma_next / r2 * (h.expm1() / h - 1) * (eps_2 - eps)


def _ancestral_target(t: Tensor, t_next: Tensor, t_end: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """(λ the deterministic part steps to, σ_up of the fresh noise) of an ancestral step from t to t_next."""
    sigma_down, _ = ancestral_step(sigma_of_half_logsnr(t), sigma_of_half_logsnr(t_next), eta)
    t_to = torch.minimum(t_end, half_logsnr(sigma_down))
    return t_to, (sigma_of_half_logsnr(t_next) ** 2 - sigma_of_half_logsnr(t_to) ** 2) ** 0.5


@torch.no_grad()
def sample_dpm_fast(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                    callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                    eta: float = 0.0, s_noise: float = 1.0, **extras: Any) -> Tensor:
    """DPM-Solver-fast (Lu et al. 2022, §3.4): len(sigmas) − 1 evaluations as third-order steps uniform in λ,
    the remainder as one second- or first-order step. Events: one per solver step, with the solver's σ pair."""
    sigmas = prepare_sigmas(sigmas, x)
    t_start, t_end = _span(sigmas)
    if eta and not t_end > t_start:
        raise ValueError("dpm_fast with eta > 0 needs decreasing sigmas (it cannot add noise going backwards)")
    draw = step_noise(noise, x, sigmas)
    nfe = len(sigmas) - 1
    n_steps = nfe // 3 + 1
    orders = [3] * (n_steps - 2) + [2, 1] if nfe % 3 == 0 else [3] * (n_steps - 1) + [nfe % 3]
    ts = torch.linspace(t_start, t_end, n_steps + 1, device=x.device)
    levels = sigma_of_half_logsnr(ts)  # the σ grid the events report
    x0 = None
    for i, order in enumerate(orders):
        check_cancel(cancel, i, x0)
        t, t_next = ts[i], ts[i + 1]
        t_to, sigma_up = _ancestral_target(t, t_next, t_end, eta) if eta else (t_next, None)
        eps = _eps(denoiser, x, t)
        x0 = _x0(x, t, eps)
        if order == 1:
            x = _order_1(x, t, t_to, eps)
        elif order == 2:
            x = _order_2(denoiser, x, t, t_to, eps)[0]
        else:
            x = _order_3(denoiser, x, t, t_to, eps)
        if sigma_up is not None:  # ComfyUI also draws (and adds 0 ×) noise when eta = 0; that changes nothing
            x = x + sigma_up * s_noise * draw(levels[i], levels[i + 1])
        emit(callback, i, levels, x, x0)
    return x


class _StepSizeController:
    """PID control of the λ step size from the scaled local error (Söderlind 2003), with an arctan limiter."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float,
                 eps: float = 1e-8) -> None:
        self.h = h
        self.b1, self.b2, self.b3 = (pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.inv_errors: list[float] = []  # 1/error of this try, of the last accepted step, of the one before

    def accept(self, error: float) -> bool:
        """Whether a step with this error is taken; the next step size is set either way."""
        e0 = 1 / (error + self.eps)
        _, e1, e2 = self.inv_errors or [e0, e0, e0]
        factor = 1 + math.atan(e0**self.b1 * e1**self.b2 * e2**self.b3 - 1)
        accepted = factor >= self.accept_safety
        self.inv_errors = [e0, e0, e1] if accepted else [e0, e1, e2]
        self.h *= factor
        return accepted


@torch.no_grad()
def sample_dpm_adaptive(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                        callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                        order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                        pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                        eta: float = 0.0, s_noise: float = 1.0, **extras: Any) -> Tensor:
    """DPM-Solver-12 / -23 with adaptive step size (Lu et al. 2022, §4.2): the order-(k−1) / order-k pair estimates
    the error, a PID controller sets the next λ step. Events: one per accepted step; the number of steps is not
    known ahead, so an event's ``steps`` counts the accepted steps so far (``step + 1``)."""
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order}")
    sigmas = prepare_sigmas(sigmas, x)
    t_start, t_end = _span(sigmas)
    forward = bool(t_end > t_start)
    if eta and not forward:
        raise ValueError("dpm_adaptive with eta > 0 needs decreasing sigmas (it cannot add noise going backwards)")
    draw = step_noise(noise, x, sigmas)
    atol_t, rtol_t = torch.tensor(atol, device=x.device), torch.tensor(rtol, device=x.device)
    controller = _StepSizeController(abs(h_init) * (1 if forward else -1), pcoeff, icoeff, dcoeff,
                                     1.5 if eta else order, accept_safety)
    s, x_prev = t_start, x
    x0: Tensor | None = None
    levels = [sigma_of_half_logsnr(s)]  # σ of the accepted steps' ends, for the events
    start: tuple[Tensor, Tensor] | None = None  # (ε, x0) at (x, s), kept while tries from there are rejected
    while (s < t_end - 1e-5) if forward else (s > t_end + 1e-5):
        check_cancel(cancel, len(levels) - 1, x0)
        t = torch.minimum(t_end, s + controller.h) if forward else torch.maximum(t_end, s + controller.h)
        t_to, sigma_up = _ancestral_target(s, t, t_end, eta) if eta else (t, None)
        if start is None:  # ComfyUI evaluates it again after a rejection; the denoiser gives the same x0
            eps = _eps(denoiser, x, s)
            start = eps, _x0(x, s, eps)
        eps, x0 = start
        if order == 2:
            x_low = _order_1(x, s, t_to, eps)
            x_high = _order_2(denoiser, x, s, t_to, eps)[0]
        else:
            x_low, eps_1 = _order_2(denoiser, x, s, t_to, eps, r1=1 / 3)
            x_high = _order_3(denoiser, x, s, t_to, eps, eps_1=eps_1)
        scale = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5
        if controller.accept(float(error)):
            x_prev, x = x_low, x_high
            if sigma_up is not None:
                x = x + sigma_up * s_noise * draw(sigma_of_half_logsnr(s), sigma_of_half_logsnr(t))
            s, start = t, None
            levels.append(sigma_of_half_logsnr(s))
            emit(callback, len(levels) - 2, torch.stack(levels), x, x0)
    return x
