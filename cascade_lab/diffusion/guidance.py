"""Classifier-free guidance and the denoiser that wraps a stage model for the samplers (GDF.sample's body)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .schedule import eps_to_x0, noise_cond
from .sigma_schedules import comfy_timestep

Guidance = float | tuple[float, float]
ExtraInputs = Callable[[float], Mapping[str, Any]]  # step position t -> model inputs for that step (e.g. cnet)


def with_extra_inputs(inputs: Mapping[str, Any], extra: ExtraInputs | None, t: float, rows: int) -> Mapping[str, Any]:
    """The model inputs plus the step's extra ones, the same for every CFG row (``rows`` copies along the batch):
    tensors repeated, lists element-wise (None stays None). Used for ControlNet features, which the official
    code gives the cond and the uncond rows alike."""
    if extra is None:
        return inputs
    more = extra(t)
    if not more:
        return inputs
    out = dict(inputs)
    for key, value in more.items():
        if isinstance(value, Tensor):
            out[key] = value.repeat(rows, *[1] * (value.dim() - 1)) if rows > 1 else value
        elif isinstance(value, (list, tuple)):
            out[key] = [None if v is None else (v.repeat(rows, *[1] * (v.dim() - 1)) if rows > 1 else v)
                        for v in value]
        else:
            out[key] = value
    return out


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float, rho: float = 0.7) -> Tensor:
    """GDF.sample's CFG: lerp(uncond, cond, scale), then rescale by ρ·std(cond)/std(cfg) (global unbiased std)."""
    pred_cfg = torch.lerp(uncond, cond, scale)
    if rho > 0:
        std_pos, std_cfg = cond.std(), pred_cfg.std()  # over the whole batch, as the official code does
        return rho * (pred_cfg * std_pos / (std_cfg + 1e-9)) + pred_cfg * (1 - rho)
    return pred_cfg


def guidance_scale(cfg: Guidance, t: float) -> float:
    """A float as is; a pair (c0, c1) interpolated linearly in the step's t: c0·t + c1·(1 − t), as GDF.sample
    (t = 1 pure noise, t = 0 clean; t is the linspace of the steps, not the model's r)."""
    if isinstance(cfg, (tuple, list)):
        assert len(cfg) == 2, f"cfg must be a float or a pair (c0, c1), got {cfg!r}"
        return float(cfg[0]) * t + float(cfg[1]) * (1 - t)
    return float(cfg)


def _cat_value(key: str, v: Any, v_u: Any) -> Any:
    """Stack one cond and uncond input along the batch: tensors cat, lists element-wise, dicts per key."""
    if isinstance(v, Tensor):
        if not isinstance(v_u, Tensor):
            raise TypeError(f"unconditional input {key!r} must be a tensor like the conditional one, "
                            f"got {type(v_u).__name__}")
        return torch.cat([v, v_u], dim=0)
    if isinstance(v, (list, tuple)):
        if not isinstance(v_u, (list, tuple)) or len(v_u) != len(v):
            raise ValueError(f"unconditional input {key!r} must be a list of length {len(v)} "
                             f"like the conditional one")
        # None where either side is None: the official rule for ControlNet lists
        return [torch.cat([a, b], dim=0) if isinstance(a, Tensor) and isinstance(b, Tensor) else None
                for a, b in zip(v, v_u, strict=True)]
    if isinstance(v, Mapping):
        u = v_u if isinstance(v_u, Mapping) else {}
        return {k: torch.cat([v[k], u[k] if k in u else torch.zeros_like(v[k])], dim=0) for k in v}
    return v  # non-tensor extras (flags, multipliers) are passed once, unchanged


def batch_inputs(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    """Model inputs for one [cond; uncond] call, paired by key name (the official code pairs by position)."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond inputs must have the same keys; cond has {sorted(cond)}, "
                         f"uncond has {sorted(uncond)}")
    return {k: _cat_value(k, v, uncond[k]) for k, v in cond.items()}


class GuidedDenoiser:
    """`denoiser(x, logsnr) -> x0`: the stage model + conditioning + CFG, as in one step of GDF.sample.

    `model(x, r, **inputs)` predicts ε. With `cfg` set, cond and uncond run in ONE call on [x; x] with r
    repeated (uncond defaults to zeros like cond, as the official code), then `cfg_combine`. Guidance is
    active while cfg_t_stop <= t <= cfg_t_start and a pair (c0, c1) is interpolated in t, where t is the
    step's position in GDF.sample's linspace(t_start, t_end, steps + 1): ``step_t(logsnr) -> t`` gives it
    (`step_t_lookup`); without it t is the model's r, which equals t at shift 1 up to the clamped ends.
    Outside the window the model runs on the cond inputs only. The model output is cast to x's dtype (keep x
    float32, as the official sampler does) before guidance; x0 = (x − b·ε̂)/a.
    """

    def __init__(self, model: Callable[..., Tensor], cond: Mapping[str, Any],
                 uncond: Mapping[str, Any] | None = None, *, cfg: Guidance | None = None,
                 cfg_rho: float = 0.7, cfg_t_stop: float | None = None,
                 cfg_t_start: float | None = None, step_t: Callable[[Tensor], float] | None = None,
                 extra_inputs: ExtraInputs | None = None) -> None:
        self.model, self.cond = model, dict(cond)
        self.cfg, self.cfg_rho = cfg, cfg_rho
        self.cfg_t_stop, self.cfg_t_start, self.step_t = cfg_t_stop, cfg_t_start, step_t
        self.extra_inputs = extra_inputs
        self.batched: dict[str, Any] | None = None
        if cfg is not None:
            if uncond is None:
                uncond = {k: torch.zeros_like(v) if isinstance(v, Tensor) else v for k, v in cond.items()}
            self.batched = batch_inputs(cond, uncond)

    def guided(self, t: float) -> bool:
        """Whether CFG runs at step position t (inside the [cfg_t_stop, cfg_t_start] window)."""
        return (self.cfg is not None and (self.cfg_t_stop is None or t >= self.cfg_t_stop)
                and (self.cfg_t_start is None or t <= self.cfg_t_start))

    def predict(self, x: Tensor, logsnr: Tensor) -> Tensor:
        """The guided ε̂ [B, C, H, W] at the 0-dim (or [B]) level logsnr: GDF.sample's `pred`."""
        logsnr = torch.as_tensor(logsnr, dtype=torch.float32, device=x.device)
        r = noise_cond(logsnr).expand(x.size(0))  # [B]
        t = self.step_t(logsnr) if self.step_t is not None else float(r[0])
        if self.cfg is not None and self.batched is not None and self.guided(t):
            inputs = with_extra_inputs(self.batched, self.extra_inputs, t, rows=2)
            out = self.model(torch.cat([x, x], dim=0), r.repeat(2), **inputs)  # [2B, C, H, W]
            cond, uncond = out.to(x.dtype).chunk(2)
            return cfg_combine(cond, uncond, guidance_scale(self.cfg, t), self.cfg_rho)
        return self.model(x, r, **with_extra_inputs(self.cond, self.extra_inputs, t, rows=1)).to(x.dtype)

    def __call__(self, x: Tensor, logsnr: Tensor) -> Tensor:
        """The clean-latent estimate x0 [B, C, H, W] (EpsilonTarget.x0 of the guided prediction)."""
        logsnr = torch.as_tensor(logsnr, dtype=torch.float32, device=x.device)
        return eps_to_x0(x, self.predict(x, logsnr), logsnr)


class SigmaDenoiser:
    """`denoiser(x, sigma) -> x0` for the σ family: the stage model called as ComfyUI calls it (EPS model
    sampling of StableCascadeSampling).

    x is the VE latent (x0 + σ·ε) and sigma [B]; the network sees x/√(σ² + 1) and r = `comfy_timestep(σ)`
    (from σ directly, not via logSNR), and x0 = x − ε̂·σ per row. CFG with ``cfg_rho == 0`` combines the
    clean estimates as ComfyUI does, uncond + (cond − uncond)·cfg; with ``cfg_rho > 0`` the official
    rescaled CFG acts on ε̂. ``uncond_x0`` keeps the unconditional x0 of the last call (CFG++ samplers).
    ``step_t`` maps σ to the step's t for a cfg pair, as `GuidedDenoiser`.
    """

    def __init__(self, model: Callable[..., Tensor], cond: Mapping[str, Any],
                 uncond: Mapping[str, Any] | None = None, *, cfg: Guidance | None = None, cfg_rho: float = 0.0,
                 step_t: Callable[[Tensor], float] | None = None, extra_inputs: ExtraInputs | None = None) -> None:
        self.model, self.cond = model, dict(cond)
        self.cfg, self.cfg_rho, self.step_t = cfg, cfg_rho, step_t
        self.extra_inputs = extra_inputs
        self.batched: dict[str, Any] | None = None
        self.uncond_x0: Tensor | None = None
        if cfg is not None:
            if uncond is None:
                uncond = {k: torch.zeros_like(v) if isinstance(v, Tensor) else v for k, v in cond.items()}
            self.batched = batch_inputs(cond, uncond)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.size(0))  # [B]
        s = sigma.view(-1, *[1] * (x.dim() - 1))  # [B, 1, 1, 1]
        x_in = x / (s**2 + 1.0) ** 0.5
        r = comfy_timestep(sigma)  # [B]
        t = self.step_t(sigma[0]) if self.step_t is not None else float(r[0])
        if self.cfg is None or self.batched is None:
            x0 = x - self.model(x_in, r, **with_extra_inputs(self.cond, self.extra_inputs, t, rows=1)).to(x.dtype) * s
            self.uncond_x0 = x0
            return x0
        scale = guidance_scale(self.cfg, t)
        inputs = with_extra_inputs(self.batched, self.extra_inputs, t, rows=2)
        out = self.model(torch.cat([x_in, x_in], dim=0), r.repeat(2), **inputs).to(x.dtype)
        eps_cond, eps_uncond = out.chunk(2)  # [B, C, H, W] each
        if self.cfg_rho > 0:  # the official rescaled CFG, on ε̂
            eps = cfg_combine(eps_cond, eps_uncond, scale, self.cfg_rho)
            self.uncond_x0 = x - eps_uncond * s
            return x - eps * s
        cond_x0, uncond_x0 = x - eps_cond * s, x - eps_uncond * s
        self.uncond_x0 = uncond_x0
        return uncond_x0 + (cond_x0 - uncond_x0) * scale


def step_t_lookup(levels: Tensor, ts: Tensor) -> Callable[[Tensor], float]:
    """``level -> t``: the step position t of each of a schedule's levels (logSNR or σ), linear in between
    (for samplers that evaluate between two levels)."""
    keys = levels.detach().double().cpu()
    values = ts.detach().double().cpu()
    order = torch.argsort(keys)
    keys, values = keys[order], values[order]
    finite = torch.isfinite(keys)
    keys, values = keys[finite], values[finite]

    def lookup(level: Tensor) -> float:
        v = float(level)
        if v <= float(keys[0]):
            return float(values[0])
        if v >= float(keys[-1]):
            return float(values[-1])
        j = int(torch.searchsorted(keys, torch.tensor(v, dtype=torch.float64)))
        k0, k1 = float(keys[j - 1]), float(keys[j])
        w = (v - k0) / (k1 - k0) if k1 > k0 else 0.0
        return float(values[j - 1]) * (1 - w) + float(values[j]) * w

    return lookup


def eps_denoiser(eps_model: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """Turn `eps_model(x, logsnr) -> ε̂` into a sampler denoiser returning x0 = (x − b·ε̂)/a."""

    def denoiser(x: Tensor, logsnr: Tensor) -> Tensor:
        return eps_to_x0(x, eps_model(x, logsnr), logsnr)

    return denoiser


__all__ = ["ExtraInputs", "GuidedDenoiser", "SigmaDenoiser", "batch_inputs", "cfg_combine", "eps_denoiser",
           "guidance_scale", "step_t_lookup", "with_extra_inputs"]
