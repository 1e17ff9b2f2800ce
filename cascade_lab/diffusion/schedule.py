"""The official GDF noise schedule and VP parametrisation, in float32 exactly as `gdf/` computes them.

t ∈ [0, 1] (t = 1 is pure noise) → logSNR (CosineSchedule, shifted, clamped) → (a, b) (VPScaler)
→ r (CosineTNoiseCond, the model's noise input). See spec §6.1–6.2 and reference/gdf/grids.json.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

S = 0.008  # the cosine offset s of CosineSchedule and CosineTNoiseCond
CLAMP_RANGE = (1e-4, 0.9999)  # clamp of alpha-bar, as train_c.py / the notebooks configure it


def _s_and_min_var(device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """s and min_var = cos(s/(1+s)·π/2)² as float32 0-dim tensors (the official `self.s`, `self.min_var`)."""
    s = torch.tensor(S, dtype=torch.float32, device=device)
    return s, torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2


def _as_t(t: Tensor | float, device: torch.device | str | None = None) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float32, device=device)


def cosine_logsnr_unshifted(t: Tensor) -> Tensor:
    """CosineSchedule.schedule: ᾱ = clamp(cos((s+t)/(1+s)·π/2)² / min_var, 1e-4, 0.9999), logSNR = ln(ᾱ/(1−ᾱ))."""
    s, min_var = _s_and_min_var(t.device)
    var = torch.cos((s + t) / (1 + s) * torch.pi * 0.5).clamp(0, 1) ** 2 / min_var
    var = var.clamp(*CLAMP_RANGE)
    return (var / (1 - var)).log()


@lru_cache(maxsize=1)
def logsnr_limits() -> tuple[float, float]:
    """[logSNR(t=1), logSNR(t=0)] at shift 1 in float32: (−9.210240, 9.210074), the official `reset_limits`."""
    lo, hi = cosine_logsnr_unshifted(torch.tensor([1.0, 0.0])).tolist()
    return lo, hi


def logsnr(t: Tensor | float, shift: float = 1.0) -> Tensor:
    """CosineSchedule(t, shift): logSNR − 2·ln(shift), then clamped to the shift-1 limits (official order)."""
    t = _as_t(t).clamp(0, 1)
    out = cosine_logsnr_unshifted(t)
    if shift != 1:
        out = out + 2 * math.log(1 / shift)
    return out.clamp(*logsnr_limits())


def train_t(batch_size: int, *, generator: torch.Generator | None = None) -> Tensor:
    """The training draw of CosineSchedule: t = (1 − U[0,1)) + 0.001, clamped to [0.001, 1], on the CPU."""
    u = torch.rand(batch_size, generator=generator)  # [B]
    return (1 - u).add(0.001).clamp(0.001, 1.0)


def vp_scalers(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """VPScaler: a = √σ(logSNR), b = √(1 − σ(logSNR)), with x_t = a·x0 + b·ε."""
    a_squared = logsnr.sigmoid()
    return a_squared.sqrt(), (1 - a_squared).sqrt()


def sigma(logsnr: Tensor) -> Tensor:
    """The noise-to-signal ratio b/a = √(e^−logSNR), the k-diffusion σ of the VP latent x/a."""
    return (-logsnr).exp().sqrt()


def noise_cond(logsnr: Tensor) -> Tensor:
    """CosineTNoiseCond: r = arccos(√(σ(logSNR)·min_var)) / (π/2) · (1+s) − s, the `r` the stage models see."""
    var = logsnr.sigmoid().clamp(0, 1)
    s, min_var = _s_and_min_var(var.device)
    return (((var * min_var) ** 0.5).acos() / (torch.pi * 0.5)) * (1 + s) - s


def noise_cond_to_logsnr(r: Tensor) -> Tensor:
    """The inverse of `noise_cond`: the logSNR a model's input ``r`` stands for (clamped like the schedule)."""
    s, min_var = _s_and_min_var(r.device)
    var = (torch.cos((r.float() + s) / (1 + s) * torch.pi * 0.5) ** 2 / min_var).clamp(*CLAMP_RANGE)
    return (var / (1 - var)).log()


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """[B] → [B, 1, 1, 1] to broadcast against `like`; 0-dim stays 0-dim."""
    return v.view(-1, *[1] * (like.dim() - 1)) if v.dim() == 1 else v


def eps_to_x0(x: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """EpsilonTarget.x0: x0 = (x − b·ε̂) / a, no clipping."""
    a, b = vp_scalers(logsnr)
    a, b = _per_sample(a, x), _per_sample(b, x)
    return (x - eps * b) / a


def x0_to_eps(x: Tensor, x0: Tensor, logsnr: Tensor) -> Tensor:
    """The ε̂ consistent with a clean estimate: ε̂ = (x − a·x0) / b (inverse of `eps_to_x0`)."""
    a, b = vp_scalers(logsnr)
    a, b = _per_sample(a, x), _per_sample(b, x)
    return (x - a * x0) / b


__all__ = [
    "CLAMP_RANGE",
    "S",
    "cosine_logsnr_unshifted",
    "eps_to_x0",
    "logsnr",
    "logsnr_limits",
    "noise_cond",
    "noise_cond_to_logsnr",
    "sigma",
    "train_t",
    "vp_scalers",
    "x0_to_eps",
]
