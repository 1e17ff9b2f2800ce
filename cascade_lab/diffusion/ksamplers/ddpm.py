"""ComfyUI's one-evaluation-per-step samplers named after their papers: DDPM, LCM and ComfyUI's ``ddim``.

ComfyUI writes DDPM and LCM on the VP latent x/√(1 + σ²) with ᾱ = 1/(1 + σ²) and scales back; in VE terms
both are "move to x0, keep part of the current noise, add fresh noise":

    DDPM  x' = x0 + (σ'/σ)²·(x − x0) + σ'·√(σ² − σ'²)/σ · z    (the posterior q(x_{t'} | x_t, x0))
    LCM   x' = x0 + σ'·z
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .common import Denoiser, Noise, StepEvent, check_cancel, emit, prepare_sigmas, row_sigmas, step_noise
from .euler import sample_euler


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                **extras: Any) -> Tensor:
    """Ancestral DDPM steps (Ho et al. 2020, eq. 7) between the σ levels, as ComfyUI's ``ddpm``."""
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, row_sigmas(sigma, x))
        # the posterior mean keeps the fraction (σ'/σ)² of the noise x − x0 = σ·ε̂
        keep = (sigma_next * sigma_next) / (sigma * sigma)
        x = x - (1 - keep) * (x - x0)
        if sigma_next > 0:  # posterior std: the σ_up of an η = 1 ancestral step
            x = x + (sigma_next * (sigma * sigma - sigma_next * sigma_next).sqrt() / sigma) * draw(sigma, sigma_next)
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_lcm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
               callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
               **extras: Any) -> Tensor:
    """Latent-consistency sampling (Luo et al. 2023, algorithm 1): jump to x0, renoise fresh to σ'."""
    sigmas = prepare_sigmas(sigmas, x)
    draw = step_noise(noise, x, sigmas)
    x0 = None
    for i in range(len(sigmas) - 1):
        check_cancel(cancel, i, x0)
        x0 = denoiser(x, row_sigmas(sigmas[i], x))
        x = x0
        if sigmas[i + 1] > 0:
            x = draw(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] + x0
        emit(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: Noise | None = None,
                callback: Callable[[StepEvent], Any] | None = None, cancel: Callable[[], bool] | None = None,
                **extras: Any) -> Tensor:
    """ComfyUI's ``ddim``: `sample_euler` (deterministic DDIM, Song et al. 2020, is Euler in σ); ComfyUI's only
    difference, a fresh random noise for inpainting masks, does not arise here."""
    return sample_euler(denoiser, x, sigmas, noise=noise, callback=callback, cancel=cancel, **extras)
