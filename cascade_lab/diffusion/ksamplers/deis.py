"""DEIS (Zhang & Chen 2023, arXiv:2204.13902) as ComfyUI runs it: a multistep method on dx/dσ whose weights
integrate the Lagrange polynomials through the last few steps' derivatives.

Step i, from σ_i to σ_{i+1} with order p = min(i + 1, max_order) (order 1, an Euler step, at the start and
for the last step to σ = 0):

    x_{i+1} = x_i + Σ_{j<p} C_ij · d_{i−j},   d = (x − x0)/σ,   C_ij = ∫ ℓ_j dσ over [σ_i, σ_{i+1}]

ℓ_j being the Lagrange basis through the p newest nodes. ``deis_mode="tab"`` places the polynomial in the
time t of EDM's VP schedule (σ_min 0.002, σ_max 80, ε 10⁻³ whatever the model) and integrates
dσ/dt·ℓ_j(t) numerically over N points; ``"rhoab"`` places it in σ itself and integrates exactly.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .common import Denoiser, Noise, StepEvent, check_cancel, emit, prepare_sigmas, row_sigmas, to_d

TAB_POINTS = 10_000  # quadrature points per step in "tab" mode (ComfyUI's N)
EDM_VP = (1e-3, 0.002, 80.0)  # (ε_s, σ_min, σ_max) of the VP schedule "tab" measures time in


class _EdmVpTime:
    """EDM's VP schedule, log α(t) = −½·t²·(β₁ − β₀) − t·β₀, fitted so that σ(ε_s) = σ_min and σ(1) = σ_max."""

    def __init__(self, eps_s: float, sigma_min: float, sigma_max: float) -> None:
        # float32 scalars, as ComfyUI derives them from torch.tensor(σ) (the table's t then agrees to rounding)
        log_min = torch.log(torch.tensor(sigma_min) ** 2 + 1)
        log_max = torch.log(torch.tensor(sigma_max) ** 2 + 1)
        self.beta_d = 2 * (log_min / eps_s - log_max) / (eps_s - 1)
        self.beta_0 = log_max - 0.5 * self.beta_d
        self.beta_1 = self.beta_d + self.beta_0

    def t(self, sigma: Tensor) -> Tensor:
        """The VP time of σ: the root of ½·β_d·t² + β₀·t = ln(1 + σ²)."""
        return ((self.beta_0**2 + 2 * self.beta_d * (sigma**2 + 1).log()).sqrt() - self.beta_0) / self.beta_d

    def dsigma_dt(self, t: Tensor) -> Tensor:
        """dσ/dt = −½·(d log α/dt)/√(α(1 − α)), σ = √(1/α − 1)."""
        alpha = torch.exp(-0.5 * t**2 * (self.beta_1 - self.beta_0) - t * self.beta_0)
        dlog_alpha = -(t * (self.beta_1 - self.beta_0) + self.beta_0)
        return -0.5 * dlog_alpha / torch.sqrt(alpha * (1 - alpha))


def _lagrange(nodes: list[Tensor], j: int, t: Tensor) -> Tensor:
    """ℓ_j(t) = Π_{k≠j} (t − t_k)/(t_j − t_k)."""
    out = torch.ones_like(t)
    for k, node in enumerate(nodes):
        if k != j:
            out = out * ((t - node) / (nodes[j] - node))
    return out


def _tab_weights(time: _EdmVpTime, ts: Tensor, i: int, order: int) -> list[Tensor]:
    """C_ij of "tab": Σ over N evenly spaced t in [t_i, t_{i+1}] (both ends) of dσ/dt·ℓ_j(t)·(t_{i+1} − t_i)/N."""
    grid = torch.linspace(float(ts[i]), float(ts[i + 1]), TAB_POINTS, dtype=ts.dtype)
    dt = (ts[i + 1] - ts[i]) / TAB_POINTS
    rate = time.dsigma_dt(grid)
    nodes = [ts[i - k] for k in range(order)]  # t_i, t_{i−1}, … newest first
    return [torch.sum(rate * _lagrange(nodes, j, grid)) * dt for j in range(order)]


def _rhoab_weights(sigmas: Tensor, i: int, order: int) -> list[Tensor]:
    """C_ij of "rhoab": ∫ ℓ_j(σ) dσ over [σ_i, σ_{i+1}] in closed form, ∫ Π_k (σ − a_k) expanded in the
    elementary symmetric polynomials e_m of the other nodes a_k."""
    start, end = sigmas[i], sigmas[i + 1]
    nodes = [sigmas[i - k] for k in range(order)]
    weights = []
    for j in range(order):
        others = [a for k, a in enumerate(nodes) if k != j]
        e = [torch.ones_like(start)]  # e_0 … e_n of the other nodes
        for a in others:
            e = [e[0]] + [e[m] + a * e[m - 1] for m in range(1, len(e))] + [a * e[-1]]
        n = len(others)
        integral = sum((-1) ** m * e[m] * (end ** (n + 1 - m) - start ** (n + 1 - m)) / (n + 1 - m)
                       for m in range(n + 1))
        denominator = math.prod(nodes[j] - a for a in others) if others else torch.ones_like(start)
        weights.append(integral / denominator)
    return weights


@torch.no_grad()
def sample_deis(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                max_order: int = 3, deis_mode: str = "tab", **extras: Any) -> Tensor:
    """DEIS multistep with polynomial extrapolation of dx/dσ (Zhang & Chen 2023, "tab" / "ρAB" variants)."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"max_order={max_order!r}: DEIS has orders 1 to 4 (ComfyUI's default 3)")
    if deis_mode not in ("tab", "rhoab"):
        raise ValueError(f"deis_mode={deis_mode!r}: use 'tab' (ComfyUI's default) or 'rhoab'")
    sigmas = prepare_sigmas(sigmas, x)
    time = _EdmVpTime(*EDM_VP)
    ts = time.t(sigmas.cpu()) if deis_mode == "tab" else None
    past: deque[Tensor] = deque(maxlen=max_order - 1)  # earlier d, newest last
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        d = to_d(x, sigmas[i], x0)
        order = min(max_order, i + 1) if sigmas[i + 1] > 0 else 1
        if order == 1:
            x = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            if ts is not None:
                weights = _tab_weights(time, ts, i, order)
            else:
                weights = _rhoab_weights(sigmas.cpu(), i, order)
            x = x + weights[0].to(x.device) * d
            for weight, d_old in zip(weights[1:], reversed(past), strict=True):
                x = x + weight.to(x.device) * d_old
        past.append(d)
        emit(callback, i, sigmas, x, x0)
    return x
