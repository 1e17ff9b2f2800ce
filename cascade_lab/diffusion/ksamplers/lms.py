"""Linear multistep (LMS) sampling of the σ family, k-diffusion's `sample_lms`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .common import Denoiser, Noise, StepEvent, check_cancel, emit, prepare_sigmas, row_sigmas, to_d


def _lms_weight(nodes: np.ndarray, i: int, j: int, order: int) -> float:
    """∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial through σ_i … σ_{i−order+1} that is 1 at σ_{i−j}.

    Integrated exactly (float64 polynomial antiderivative); ComfyUI's scipy quadrature of the same polynomial
    is exact to float64 rounding too, and costs ~30 ms a step.
    """
    node = float(nodes[i - j])
    poly = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            other = float(nodes[i - k])
            poly = poly * np.poly1d([1.0, -other]) / (node - other)
    antiderivative = np.polyint(poly)
    return float(antiderivative(float(nodes[i + 1])) - antiderivative(float(nodes[i])))


@torch.no_grad()
def sample_lms(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
               callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
               order: int = 4, **extras: Any) -> Tensor:
    """Linear multistep in σ: the step integrates the polynomial through the last `order` slopes dx/dσ
    (Adams–Bashforth on the probability-flow ODE, Karras et al. 2022 eq. 3); the step to σ = 0 returns x0."""
    if order < 1:
        raise ValueError(f"lms order must be at least 1, got {order}")
    sigmas = prepare_sigmas(sigmas, x)
    nodes = sigmas.detach().cpu().numpy()  # float32 nodes, as ComfyUI's
    slopes: list[Tensor] = []  # the newest last, at most `order`
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        slopes = [*slopes, to_d(x, sigmas[i], x0)][-order:]
        if sigmas[i + 1] == 0:
            x = x0
        else:
            n = len(slopes)
            # weight j belongs to the slope j steps back; summed newest first
            delta = _lms_weight(nodes, i, 0, n) * slopes[-1]
            for j in range(1, n):
                delta = delta + _lms_weight(nodes, i, j, n) * slopes[-1 - j]
            x = x + delta
        emit(callback, i, sigmas, x, x0)
    return x
