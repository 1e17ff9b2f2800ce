"""UniPC (Zhao et al. 2023, arXiv:2302.04867), a multistep predictor-corrector in half-logSNR time, as ComfyUI runs
its ``uni_pc`` (B(h) = h) and ``uni_pc_bh2`` (B(h) = eʰ − 1).

UniPC works on the VP latent x̄ = α·x, α = 1/√(1 + σ²), noise std s = σ·α, λ = −ln σ. A move from λ₀ to λ'
(h = λ' − λ₀) of order p, from the p newest x0 estimates m₀ (at λ₀) and m₁ … m_{p−1} (at older λ₁ …), is

    x̄' = (s'/s₀)·x̄ − α'·expm1(−h)·m₀ − α'·B(−h)·Σ_k ρ_k·D_k,   D_k = (m_k − m₀)/r_k,   r_k = (λ_k − λ₀)/h

The predictor (UniP) solves for ρ with the p − 1 older estimates; the corrector (UniC) calls the model at the
predicted x̄' and redoes the move with that fresh estimate as one more difference (r = 1). The fresh estimate is
the next move's m₀, so every move costs one model call; the last move, with no next, is predicted only.

Steps and events: a schedule of n + 1 σ gives n moves σ_j → σ_{j+1} and n model calls (σ_0 … σ_{n−1}). The orders
warm up 1, 2, 3 and fall back to 2, 1 for the last moves (at most min(3, n − 1)). A schedule ending at σ = 0 ends
at σ = 10⁻³ instead (UniPC needs a finite λ), so the result is x̄ / α(10⁻³) as ComfyUI returns it. Event j is the
move σ_j → σ_{j+1}: x the VE latent after it (x̄ / α at σ_{j+1}; the last event's x is the result) and x0 the
estimate at σ_j the move started from. ComfyUI's callback k instead reports the VP x̄ at σ_k (k = 0: the
starting latent; k = n − 1: the result, as its last call makes the final two moves) with the same x0 m_k, so
its (k, x̄) is our event k − 1's x / √(1 + σ_k²) for 1 ≤ k ≤ n − 2; our event n − 2's x it never shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .common import Denoiser, Noise, StepEvent, check_cancel, emit, prepare_sigmas, row_sigmas

FINAL_SIGMA = 1e-3  # where a schedule ending at σ = 0 ends instead (ComfyUI's rule)


def _vp_levels(sigmas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(α, s, λ) of each σ, by ComfyUI's float route through log α = −½·ln(1 + σ²) and s = √(1 − α²).

    At σ = 10⁻³, 1 − α² keeps only a few bits in float32, so s and λ there are ~1 % off σ·α and −ln σ; the last
    move's s'/s₀ and h follow them, and matching ComfyUI's result needs the same route (exact forms: 3e-5 off).
    """
    log_alpha = 0.5 * torch.log(1 / (sigmas * sigmas + 1))
    std = torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
    return log_alpha.exp(), std, log_alpha - std.log()


def _order_conditions(lams: list[Tensor], lam: Tensor, variant: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(r, R, b, B(−h)) of a move to λ from the levels λ₀, λ₁ … (newest first): r_k = (λ_k − λ₀)/h with r = 1
    last, and UniPC's order conditions R·ρ = b with rows R_i = rⁱ⁻¹ and b_i = i!·φ_{i+1}(−h)/B(−h)."""
    hh = lams[0] - lam  # −h: the data-prediction form integrates e^{hh}
    rks = torch.stack([(lam_k - lams[0]) / -hh for lam_k in lams[1:]] + [torch.ones_like(hh)])
    b_of_h = hh if variant == "bh1" else torch.expm1(hh)
    g = torch.expm1(hh) / hh - 1  # g_1; then g_{i+1} = g_i/hh − 1/(i+1)!
    rows, rhs = [], []
    for i in range(1, len(rks) + 1):
        rows.append(rks ** (i - 1))
        rhs.append(g * math.factorial(i) / b_of_h)
        g = g / hh - 1 / math.factorial(i + 1)
    return rks, torch.stack(rows), torch.stack(rhs), b_of_h


def _weighted(diffs: list[Tensor], rhos: Tensor) -> Tensor:
    """Σ_k ρ_k·D_k: the K differences stacked [B, K, C, H, W] contracted with ρ [K]."""
    return torch.tensordot(torch.stack(diffs, dim=1), rhos, dims=([1], [0]))


def _uni_pc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, callback: Callable[[StepEvent], Any] | None,
            cancel: Callable[[], bool] | None, variant: str) -> Tensor:
    sigmas = prepare_sigmas(sigmas, x)
    levels = sigmas.clone()  # the caller's schedule stays as given (ComfyUI writes 10⁻³ into it through a view)
    if levels[-1] == 0:
        levels[-1] = FINAL_SIGMA
    alpha, std, lams = _vp_levels(levels)
    n = len(sigmas) - 1
    # ComfyUI's order min(3, n − 1) is 0 for a one-step schedule, where it takes no step and returns the start
    # rescaled; here that step is a first-order one
    max_order = max(1, min(3, n - 1))

    def model(x_vp: Tensor, j: int) -> Tensor:
        return denoiser(x_vp * (levels[j] ** 2 + 1.0) ** 0.5, row_sigmas(levels[j], x_vp))

    check_cancel(cancel, 0, None)
    x = x / torch.sqrt(1.0 + levels[0] ** 2.0)  # [B, C, H, W] VP from here on
    estimates, at = [model(x, 0)], [0]  # x0 estimates and their level indices, newest first
    for j in range(n):  # the move σ_j → σ_{j+1}
        if j > 0:
            check_cancel(cancel, j, estimates[0])
        order = min(max_order, j + 1, n - j)  # warm up at the start, lower the order for the last moves
        m0, start = estimates[0], at[0]
        rks, R, b, b_of_h = _order_conditions([lams[k] for k in at[:order]], lams[j + 1], variant)
        diffs = [(m_k - m0) / r_k for m_k, r_k in zip(estimates[1:order], rks[:-1], strict=True)]
        first_order = (std[j + 1] / std[start]) * x - (alpha[j + 1] * torch.expm1(lams[start] - lams[j + 1])) * m0
        scale = alpha[j + 1] * b_of_h

        if order == 1:  # UniP-1 is the DPM-Solver++(1) / DDIM move itself
            predicted = first_order
        else:  # UniP-2 takes ρ = ½ outright (the paper's simplified second order)
            rhos_p = torch.full_like(b[:1], 0.5) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            predicted = first_order - scale * _weighted(diffs, rhos_p)

        if j == n - 1:  # no next move to reuse an evaluation: keep the prediction
            x = predicted
        else:  # UniC: the model at the prediction, then the move again with its difference (r = 1) added
            fresh = model(predicted, j + 1)
            rhos_c = torch.full_like(b, 0.5) if order == 1 else torch.linalg.solve(R, b)
            correction = rhos_c[-1] * (fresh - m0)
            if diffs:
                correction = _weighted(diffs, rhos_c[:-1]) + correction
            x = first_order - scale * correction
            estimates, at = [fresh, *estimates][:max_order], [j + 1, *at][:max_order]
        emit(callback, j, sigmas, x / alpha[j + 1], m0)
    return x / alpha[-1]


@torch.no_grad()
def sample_uni_pc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                  callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                  **extras: Any) -> Tensor:
    """UniPC-bh1 (Zhao et al. 2023), ComfyUI's ``uni_pc``; event x in VE scale: ComfyUI's UniPC x · √(1 + σ²)."""
    return _uni_pc(denoiser, x, sigmas, callback, cancel, "bh1")


@torch.no_grad()
def sample_uni_pc_bh2(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                      callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                      **extras: Any) -> Tensor:
    """UniPC-bh2 (Zhao et al. 2023), ComfyUI's ``uni_pc_bh2``; event x in VE scale: ComfyUI's UniPC x · √(1 + σ²)."""
    return _uni_pc(denoiser, x, sigmas, callback, cancel, "bh2")
