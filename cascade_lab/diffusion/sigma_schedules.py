"""ComfyUI's noise levels for Stable Cascade: its σ table (StableCascadeSampling) and its nine schedulers.

σ is the VE noise level of the latent, σ² = (1 − ᾱ)/ᾱ; a schedule is steps + 1 decreasing σ ending at 0.
Everything is float32 in ComfyUI's operation order, so the tables equal ComfyUI's (see
../shared/reference/comfyui/README.md, "Sigma schedules"). Schedulers share the logSNR family's signature
``fn(steps, shift=1.0, t_start=1.0, t_end=0.0)``; the partial schedules of ComfyUI are `denoise`, applied by
`partial_schedule`, so t_start / t_end must stay at 1 / 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

TABLE_SIZE = 10000  # ComfyUI's num_timesteps for Stable Cascade
COSINE_S = 8e-3


class CascadeSigmas:
    """StableCascadeSampling at one shift: σ(t), the model's timestep r(σ), and the 10000-entry σ table.

    Entries are computed one at a time, as ComfyUI fills its table (a vectorised cos rounds differently in
    the last bit), and only those a scheduler asks for.
    """

    def __init__(self, shift: float) -> None:
        self.shift = float(shift)
        self._entries: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return TABLE_SIZE

    def entry(self, k: int) -> Tensor:
        """Table entry k = σ((k + 1)/10000), a float32 0-dim tensor; negative k counts from the end."""
        k = k % TABLE_SIZE
        if k not in self._entries:
            self._entries[k] = cascade_sigma((k + 1) / TABLE_SIZE, self.shift)
        return self._entries[k]

    @property
    def table(self) -> Tensor:
        """The whole table [10000] (about 0.5 s the first time)."""
        return torch.stack([self.entry(k) for k in range(TABLE_SIZE)])

    @property
    def sigma_min(self) -> Tensor:
        return self.entry(0)

    @property
    def sigma_max(self) -> Tensor:
        return self.entry(TABLE_SIZE - 1)

    def sigma(self, t: Tensor | float) -> Tensor:
        return cascade_sigma(t, self.shift)

    def timestep(self, sigma: Tensor) -> Tensor:
        return comfy_timestep(sigma)


def _s_and_min_var() -> tuple[Tensor, Tensor]:
    s = torch.tensor(COSINE_S)  # float32, as ComfyUI holds cosine_s
    return s, torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2


def cascade_sigma(t: Tensor | float, shift: float = 1.0) -> Tensor:
    """σ(t) = √((1 − ᾱ)/ᾱ), ᾱ the cosine schedule shifted in logSNR by −2·ln(shift), clamped to [1e-4, 0.9999]."""
    s, min_var = _s_and_min_var()
    alpha_cumprod = torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / min_var
    if shift != 1.0:
        logsnr = (alpha_cumprod / (1 - alpha_cumprod)).log()
        logsnr = logsnr + 2 * torch.log(1.0 / torch.tensor(shift))
        alpha_cumprod = logsnr.sigmoid()
    alpha_cumprod = alpha_cumprod.clamp(0.0001, 0.9999)
    return ((1 - alpha_cumprod) / alpha_cumprod) ** 0.5


def comfy_timestep(sigma: Tensor) -> Tensor:
    """The r the model sees at σ, ComfyUI's way: r = acos(√(ᾱ·m))/(π/2)·(1 + s) − s with ᾱ = 1/(σ² + 1).

    It inverts the UNSHIFTED cosine, which equals the official noise_cond of the shifted logSNR; computed from σ
    directly it can differ from the logSNR route by an ulp, which the r embedding magnifies.
    """
    var = (1 / ((sigma * sigma) + 1)).clamp(0, 1.0)
    s, min_var = _s_and_min_var()
    s, min_var = s.to(var.device), min_var.to(var.device)
    return (((var * min_var) ** 0.5).acos() / (torch.pi * 0.5)) * (1 + s) - s


def percent_sigma(percent: float, shift: float) -> float:
    """ComfyUI's percent_to_sigma on Stable Cascade's schedule: the model's σ at timestep 1 − percent (float32),
    above every σ for 0 and below every σ for 1."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return float(cascade_sigma(torch.tensor(1.0 - percent), shift))


def in_sigma_range(sigma: float, start: float, end: float, shift: float) -> bool:
    """Whether a step at ``sigma`` lies in the [start, end] percent range as ComfyUI decides it (ControlNet step
    ranges, ConditioningSetTimestepRange): σ(1 − start) ≥ σ ≥ σ(1 − end) on the model's schedule at ``shift``,
    which on a schedule other than 'simple' is not the fraction of the steps."""
    return not (sigma > percent_sigma(start, shift) or sigma < percent_sigma(end, shift))


def level_to_sigma(space: str) -> Callable[[Any], float]:
    """``level -> σ`` for a sampler's space ("sigma": σ itself; else logSNR), the step's "t" for σ ranges."""
    if space == "sigma":
        return lambda level: float(level)
    return lambda level: float(torch.exp(-torch.as_tensor(level, dtype=torch.float32) / 2))


@lru_cache(maxsize=8)
def cascade_sigmas(shift: float = 1.0) -> CascadeSigmas:
    """The σ table of ComfyUI's StableCascadeSampling at `shift` (cached)."""
    if not shift > 0 or not math.isfinite(shift):
        raise ValueError(f"shift={shift!r}: must be a finite number > 0 (ComfyUI: Stage C 2, Stage B 1)")
    return CascadeSigmas(float(shift))


def _check(name: str, steps: int, t_start: float, t_end: float) -> int:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if (t_start, t_end) != (1.0, 0.0):
        raise ValueError(f"the ComfyUI scheduler {name!r} spans the whole schedule (t_start=1, t_end=0); for a "
                         f"partial schedule use denoise (ComfyUI's) instead of t_start={t_start}, t_end={t_end}")
    return int(steps)


def _append_zero(values: list[float] | Tensor) -> Tensor:
    out = torch.as_tensor(values, dtype=torch.float32)
    return torch.cat([out, out.new_zeros(1)])


def simple(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """ComfyUI `simple`: every (10000/steps)-th σ of the table from the top (the official cosine grid), then 0."""
    steps = _check("simple", steps, t_start, t_end)
    table = cascade_sigmas(shift)
    stride = len(table) / steps
    return _append_zero([float(table.entry(-(1 + int(i * stride)))) for i in range(steps)])


def _normal(steps: int, shift: float, sgm: bool) -> Tensor:
    ms = cascade_sigmas(shift)
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    if sgm:
        timesteps = torch.linspace(float(start), float(end), steps + 1)[:-1]
        return _append_zero([float(ms.sigma(ts)) for ts in timesteps])
    return _append_zero([float(ms.sigma(ts)) for ts in torch.linspace(float(start), float(end), steps)])


def normal(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """ComfyUI `normal`: σ of timesteps evenly spaced from r(σ_max) to r(σ_min), then 0."""
    return _normal(_check("normal", steps, t_start, t_end), shift, sgm=False)


def sgm_uniform(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """ComfyUI `sgm_uniform` (SGM/SDXL's uniform timesteps): steps + 1 even timesteps, the last replaced by 0."""
    return _normal(_check("sgm_uniform", steps, t_start, t_end), shift, sgm=True)


def karras(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (eq. 5) between ComfyUI's σ_min and σ_max, then 0 (independent of the shift)."""
    steps = _check("karras", steps, t_start, t_end)
    ms = cascade_sigmas(shift)
    lo, hi = float(ms.sigma_min) ** (1 / rho), float(ms.sigma_max) ** (1 / rho)
    ramp = torch.linspace(0, 1, steps)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """Evenly spaced in log σ between ComfyUI's σ_max and σ_min, then 0 (k-diffusion's exponential schedule)."""
    steps = _check("exponential", steps, t_start, t_end)
    ms = cascade_sigmas(shift)
    return _append_zero(torch.linspace(math.log(float(ms.sigma_max)), math.log(float(ms.sigma_min)), steps).exp())


def ddim_uniform(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """ComfyUI `ddim_uniform`: table entries 1, 1 + k, 1 + 2k, … (k = 10000 // steps), reversed, then 0."""
    steps = _check("ddim_uniform", steps, t_start, t_end)
    table = cascade_sigmas(shift)
    stride = max(len(table) // steps, 1)
    picked = [float(table.entry(i)) for i in range(1, len(table), stride)]
    return torch.tensor([*picked[::-1], 0.0], dtype=torch.float32)


def beta(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0, alpha: float = 0.6,
         beta: float = 0.6) -> Tensor:
    """Beta-distributed timesteps (Lee et al. 2024, "Beta sampling is all you need"), α = β = 0.6, as ComfyUI."""
    steps = _check("beta", steps, t_start, t_end)
    import numpy as np

    try:
        from scipy.stats import beta as beta_distribution
    except ImportError as exc:
        raise ImportError("the 'beta' scheduler needs scipy, as ComfyUI's does: pip install 'cascade-lab[comfyui]'") \
            from exc
    table = cascade_sigmas(shift)
    last = len(table) - 1
    ts = np.rint(beta_distribution.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * last)
    picked, previous = [], None
    for t in ts:
        if t != previous:  # consecutive duplicates are dropped, so the schedule may have fewer steps
            picked.append(float(table.entry(int(t))))
        previous = t
    return _append_zero(picked)


def linear_quadratic(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0,
                     threshold_noise: float = 0.025, linear_steps: int | None = None) -> Tensor:
    """Linear then quadratic in σ/σ_max (Mochi's schedule, Genmo 2024), scaled by ComfyUI's σ_max."""
    steps = _check("linear_quadratic", steps, t_start, t_end)
    if steps == 1:
        fractions = [1.0, 0.0]
    else:
        n_linear = steps // 2 if linear_steps is None else linear_steps
        n_quadratic = steps - n_linear
        step_diff = n_linear - threshold_noise * steps
        quad = step_diff / (n_linear * n_quadratic**2)
        lin = threshold_noise / n_linear - 2 * step_diff / n_quadratic**2
        const = quad * n_linear**2
        rising = [i * threshold_noise / n_linear for i in range(n_linear)]
        rising += [quad * i**2 + lin * i + const for i in range(n_linear, steps)]
        fractions = [1.0 - v for v in [*rising, 1.0]]
    return torch.tensor(fractions, dtype=torch.float32) * cascade_sigmas(shift).sigma_max


def kl_optimal(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0) -> Tensor:
    """KL-optimal spacing σ = tan(lerp(atan σ_max, atan σ_min)) (Sabour et al. 2024, "Align your steps"), then 0."""
    steps = _check("kl_optimal", steps, t_start, t_end)
    ms = cascade_sigmas(shift)
    frac = torch.arange(steps, dtype=torch.float32).div_(steps - 1) if steps > 1 else torch.zeros(1)
    out = torch.zeros(steps + 1)
    out[:-1] = (frac * math.atan(float(ms.sigma_min)) + (1 - frac) * math.atan(float(ms.sigma_max))).tan_()
    return out


def partial_schedule(build: Callable[..., Tensor], steps: int, denoise: float, **kwargs: float) -> Tensor:
    """ComfyUI's `denoise` < 1: the schedule for int(steps / denoise) steps, keeping its last steps + 1 values.

    Works for any scheduler (σ or logSNR family): only the tail of the longer schedule is kept.
    """
    if not 0 < denoise <= 1:
        raise ValueError(f"denoise={denoise!r}: use a value in (0, 1]; 1 runs the whole schedule")
    if denoise > 0.9999:
        return build(steps, **kwargs)
    return build(int(steps / denoise), **kwargs)[-(steps + 1):]


def discard_penultimate(build: Callable[..., Tensor], steps: int, **kwargs: float) -> Tensor:
    """ComfyUI's rule for dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2: build steps + 1, drop the penultimate σ."""
    full = build(steps + 1, **kwargs)
    return torch.cat([full[:-2], full[-1:]])


__all__ = [
    "CascadeSigmas",
    "beta",
    "cascade_sigma",
    "cascade_sigmas",
    "comfy_timestep",
    "ddim_uniform",
    "discard_penultimate",
    "exponential",
    "karras",
    "kl_optimal",
    "linear_quadratic",
    "normal",
    "partial_schedule",
    "sgm_uniform",
    "simple",
]
