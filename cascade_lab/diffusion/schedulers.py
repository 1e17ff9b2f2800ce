"""Schedulers: `(steps, shift=1.0, t_start=1.0, t_end=0.0) -> levels`, steps + 1 float32 logSNR values.

All of them start and end at the official schedule's (shifted, clamped) logSNR of t_start and t_end, so
any sampler works with any of them; they differ in how the levels in between are spaced.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedule import logsnr


def _check(steps: int, t_start: float, t_end: float) -> None:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(f"need 0 <= t_end < t_start <= 1 (t = 1 is pure noise), got t_start={t_start}, "
                         f"t_end={t_end}")


def _ends(shift: float, t_start: float, t_end: float) -> tuple[Tensor, Tensor]:
    first, last = logsnr(torch.tensor([t_start, t_end], dtype=torch.float32), shift=shift)
    return first, last


def cosine(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """GDF.sample's grid: t = linspace(t_start, t_end, steps + 1) through the shifted cosine schedule."""
    _check(steps, t_start, t_end)
    t = torch.linspace(t_start, t_end, int(steps) + 1, dtype=torch.float32)  # [steps+1]
    return logsnr(t, shift=shift)


def karras(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (eq. 5): σ^(1/ρ) evenly spaced, ρ = 7, σ = √(e^−logSNR), between the schedule's ends."""
    _check(steps, t_start, t_end)
    first, last = _ends(shift, t_start, t_end)
    s_max, s_min = (-first.double() / 2).exp(), (-last.double() / 2).exp()
    ramp = torch.linspace(0, 1, int(steps) + 1, dtype=torch.float64)  # [steps+1]
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    levels = (-2 * sigmas.log()).float()
    levels[0], levels[-1] = first, last  # exact float32 ends
    return levels


def exponential(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """Evenly spaced in log σ (k-diffusion's exponential schedule), i.e. evenly spaced in logSNR."""
    _check(steps, t_start, t_end)
    first, last = _ends(shift, t_start, t_end)
    levels = torch.linspace(float(first), float(last), int(steps) + 1, dtype=torch.float64).float()
    levels[0], levels[-1] = first, last
    return levels


__all__ = ["cosine", "exponential", "karras"]
