"""SA-Solver (Xue et al. 2023, arXiv:2309.05019), the stochastic Adams predictor-corrector, as ComfyUI runs it.

In λ = −ln σ, a move from λ_s to λ_t (h = λ_t − λ_s) with stochasticity τ solves the data-prediction SDE as

    x_t = (σ_t/σ_s)·e^{−τ²h}·x_s + Σ_j b_j·x0_j + σ_t·√(1 − e^{−2τ²h})·z
    b_j = ∫ (1 + τ²)·e^{−(1+τ²)(λ_t − λ)}·ℓ_j(λ) dλ over [λ_s, λ_t]

ℓ_j the Lagrange basis through the λ of the estimates x0_j used (τ = 0 is the deterministic Adams form). Each
step evaluates x0 at the predicted state, corrects the move that led there with that estimate as one more
node (reusing the predictor's noise z), then predicts the next move. PECE re-evaluates the corrected state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..sigma_schedules import cascade_sigma
from .common import Denoiser, Noise, StepEvent, check_cancel, emit, half_logsnr, prepare_sigmas, row_sigmas, step_noise

TauFunc = Callable[[Tensor], float]


def _percent_to_sigma(percent: float, shift: float) -> float:
    """StableCascadeSampling's σ at `percent` of the way through sampling (ComfyUI's percent_to_sigma)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return float(cascade_sigma(torch.tensor(1.0 - percent), shift))


def tau_interval(eta: float = 1.0, start_percent: float = 0.2, end_percent: float = 0.8,
                 shift: float = 2.0) -> TauFunc:
    """τ(σ) = η inside the σ range between `start_percent` and `end_percent` of sampling (both ends), else 0
    (ComfyUI's SamplerSASolver; SA-Solver's own code bounds the interval in time rather than σ)."""
    high, low = _percent_to_sigma(start_percent, shift), _percent_to_sigma(end_percent, shift)

    def tau(sigma: Tensor) -> float:
        return eta if eta > 0 and high >= float(sigma) >= low else 0.0

    return tau


def _exponential_moments(lam_s: Tensor, lam_t: Tensor, count: int, tau: float) -> Tensor:
    """E_p = ∫ a·e^{−a(λ_t − λ)}·λ^p dλ over [λ_s, λ_t], p < count, a = 1 + τ², by parts:
    E_p = (λ_t^p − λ_s^p·e^{−ah}) − (p/a)·E_{p−1}."""
    a = 1 + tau**2
    decay = torch.exp(-a * (lam_t - lam_s))
    moments = [1 - decay]
    for p in range(1, count):
        moments.append(lam_t**p - lam_s**p * decay - (p / a) * moments[-1])
    return torch.stack(moments)


def _adams_weights(nodes: Tensor, lam_s: Tensor, lam_t: Tensor, tau: float, simple_order_2: bool,
                   corrector: bool) -> Tensor:
    """b_j for the estimates at λ = `nodes` (oldest first): Σ_j λ_j^p·b_j = E_p for every p, i.e. ∫ of each
    Lagrange basis polynomial; or the paper's appendix-D shortcut for two nodes with ``simple_order_2``."""
    if simple_order_2 and len(nodes) == 2:
        a, h = 1 + tau**2, lam_t - lam_s
        total = -torch.expm1(-a * h)  # Σ b_j: the weight of a constant x0
        if corrector:  # trapezoid-like: half of a·h on the new estimate
            newer = 0.5 * a * h
            return torch.stack([total - newer, newer])
        older = 0.5 * a * h**2 / (nodes[-2] - lam_s)
        return torch.stack([older, total - older])
    powers = nodes.unsqueeze(0) ** torch.arange(len(nodes), dtype=nodes.dtype).unsqueeze(1)  # [p, j] = λ_j^p
    return torch.linalg.solve(powers, _exponential_moments(lam_s, lam_t, len(nodes), tau))


def _weighted(weights: Tensor, estimates: list[Tensor]) -> Tensor:
    out = weights[0] * estimates[0]
    for b, x0 in zip(weights[1:], estimates[1:], strict=True):
        out = out + b * x0
    return out


@torch.no_grad()
def sample_sa_solver(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                     callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                     tau_func: TauFunc | None = None, s_noise: float = 1.0, predictor_order: int = 3,
                     corrector_order: int = 4, use_pece: bool = False, simple_order_2: bool = False,
                     eta: float = 1.0, sde_start_percent: float = 0.2, sde_end_percent: float = 0.8,
                     shift: float = 2.0, **extras: Any) -> Tensor:
    """SA-Solver predictor-corrector (Xue et al. 2023); without `tau_func`, τ = `tau_interval` of the model's
    `shift` (Stage C 2, Stage B 1), as ComfyUI's default and SamplerSASolver node."""
    if predictor_order < 1 or corrector_order < 0:
        raise ValueError(f"predictor_order={predictor_order}, corrector_order={corrector_order}: SA-Solver needs a "
                         "predictor order >= 1 and a corrector order >= 0 (ComfyUI's defaults 3 and 4)")
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    tau_of = tau_func if tau_func is not None else tau_interval(eta, sde_start_percent, sde_end_percent, shift)
    lams = half_logsnr(sigmas)
    n = len(sigmas) - 1
    taper = bool(sigmas[-1] == 0)  # lower the orders over the last steps when the schedule ends at σ = 0
    estimates: list[Tensor] = []  # the newest x0s, oldest first
    x_pred, x0 = x, None  # x: the corrected state at σ_i; x_pred: the predicted one, where the model is called
    tau, h, z = 0.0, torch.zeros_like(lams[0]), torch.zeros_like(x)  # the last predictor's τ, h and noise
    for i in range(n):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x_pred, row_sigmas(sigmas[i], x))
        estimates = (estimates + [x0])[-max(predictor_order, corrector_order):]
        p_order = min(predictor_order, len(estimates))
        c_order = 0 if i == 0 or (sigmas[i + 1] == 0 and not use_pece) else min(corrector_order, len(estimates))
        if taper:  # at most as many nodes as steps remain
            p_order, c_order = min(p_order, n - 1 - i), min(c_order, n - i)

        if c_order == 0:
            x = x_pred
        else:  # redo the move σ_{i−1} → σ_i with the fresh estimate at σ_i as the newest node
            b = _adams_weights(lams[i - c_order + 1:i + 1], lams[i - 1], lams[i], tau, simple_order_2, corrector=True)
            x = sigmas[i] / sigmas[i - 1] * torch.exp(-(tau**2) * h) * x + _weighted(b, estimates[-c_order:])
            if tau > 0 and s_noise > 0:
                x = x + z
            if use_pece:
                estimates[-1] = denoiser(x, row_sigmas(sigmas[i], x))

        if sigmas[i + 1] == 0:
            x_pred = estimates[-1]
        else:
            tau = tau_of(sigmas[i + 1])
            b = _adams_weights(lams[i - p_order + 1:i + 1], lams[i], lams[i + 1], tau, simple_order_2,
                               corrector=False)
            h = lams[i + 1] - lams[i]
            x_pred = sigmas[i + 1] / sigmas[i] * torch.exp(-(tau**2) * h) * x + _weighted(b, estimates[-p_order:])
            if tau > 0 and s_noise > 0:
                z = draw(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * torch.sqrt(-torch.expm1(-2 * tau**2 * h)) * s_noise
                x_pred = x_pred + z
        emit(callback, i, sigmas, x_pred, x0)
    return x_pred


@torch.no_grad()
def sample_sa_solver_pece(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                          callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                          tau_func: TauFunc | None = None, s_noise: float = 1.0, predictor_order: int = 3,
                          corrector_order: int = 4, simple_order_2: bool = False, **extras: Any) -> Tensor:
    """SA-Solver in PECE mode: predict, evaluate, correct, evaluate again (Xue et al. 2023)."""
    extras.pop("use_pece", None)
    return sample_sa_solver(denoiser, x, sigmas, noise=noise, callback=callback, cancel=cancel, tau_func=tau_func,
                            s_noise=s_noise, predictor_order=predictor_order, corrector_order=corrector_order,
                            use_pece=True, simple_order_2=simple_order_2, **extras)


__all__ = ["sample_sa_solver", "sample_sa_solver_pece", "tau_interval"]
