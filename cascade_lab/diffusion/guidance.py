"""Classifier-free guidance and the denoiser that wraps a stage model for the samplers (GDF.sample's body)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .schedule import eps_to_x0, noise_cond

Guidance = float | tuple[float, float]


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float, rho: float = 0.7) -> Tensor:
    """GDF.sample's CFG: lerp(uncond, cond, scale), then rescale by ρ·std(cond)/std(cfg) (global unbiased std)."""
    pred_cfg = torch.lerp(uncond, cond, scale)
    if rho > 0:
        std_pos, std_cfg = cond.std(), pred_cfg.std()  # over the whole batch, as the official code does
        return rho * (pred_cfg * std_pos / (std_cfg + 1e-9)) + pred_cfg * (1 - rho)
    return pred_cfg


def guidance_scale(cfg: Guidance, r: float) -> float:
    """A float as is; a pair (c0, c1) interpolated linearly in r: c0 at r = 1 (pure noise), c1 at r = 0."""
    if isinstance(cfg, (tuple, list)):
        assert len(cfg) == 2, f"cfg must be a float or a pair (c0, c1), got {cfg!r}"
        return float(cfg[0]) * r + float(cfg[1]) * (1 - r)
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
    active while cfg_t_stop <= r <= cfg_t_start, with r the model's noise condition (official GDF compares
    its linspace t instead, which equals r at shift 1 up to the clamped ends); outside the window the
    model runs on the cond inputs only. The model output is cast to x's dtype (keep x float32, as the
    official sampler does) before guidance; x0 = (x − b·ε̂)/a.
    """

    def __init__(self, model: Callable[..., Tensor], cond: Mapping[str, Any],
                 uncond: Mapping[str, Any] | None = None, *, cfg: Guidance | None = None,
                 cfg_rho: float = 0.7, cfg_t_stop: float | None = None,
                 cfg_t_start: float | None = None) -> None:
        self.model, self.cond = model, dict(cond)
        self.cfg, self.cfg_rho = cfg, cfg_rho
        self.cfg_t_stop, self.cfg_t_start = cfg_t_stop, cfg_t_start
        self.batched: dict[str, Any] | None = None
        if cfg is not None:
            if uncond is None:
                uncond = {k: torch.zeros_like(v) if isinstance(v, Tensor) else v for k, v in cond.items()}
            self.batched = batch_inputs(cond, uncond)

    def guided(self, r: float) -> bool:
        """Whether CFG runs at noise condition r (inside the [cfg_t_stop, cfg_t_start] window)."""
        return (self.cfg is not None and (self.cfg_t_stop is None or r >= self.cfg_t_stop)
                and (self.cfg_t_start is None or r <= self.cfg_t_start))

    def predict(self, x: Tensor, logsnr: Tensor) -> Tensor:
        """The guided ε̂ [B, C, H, W] at the 0-dim (or [B]) level logsnr: GDF.sample's `pred`."""
        logsnr = torch.as_tensor(logsnr, dtype=torch.float32, device=x.device)
        r = noise_cond(logsnr).expand(x.size(0))  # [B]
        r0 = float(r[0])
        if self.cfg is not None and self.batched is not None and self.guided(r0):
            out = self.model(torch.cat([x, x], dim=0), r.repeat(2), **self.batched)  # [2B, C, H, W]
            cond, uncond = out.to(x.dtype).chunk(2)
            return cfg_combine(cond, uncond, guidance_scale(self.cfg, r0), self.cfg_rho)
        return self.model(x, r, **self.cond).to(x.dtype)

    def __call__(self, x: Tensor, logsnr: Tensor) -> Tensor:
        """The clean-latent estimate x0 [B, C, H, W] (EpsilonTarget.x0 of the guided prediction)."""
        logsnr = torch.as_tensor(logsnr, dtype=torch.float32, device=x.device)
        return eps_to_x0(x, self.predict(x, logsnr), logsnr)


def eps_denoiser(eps_model: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """Turn `eps_model(x, logsnr) -> ε̂` into a sampler denoiser returning x0 = (x − b·ε̂)/a."""

    def denoiser(x: Tensor, logsnr: Tensor) -> Tensor:
        return eps_to_x0(x, eps_model(x, logsnr), logsnr)

    return denoiser


__all__ = ["GuidedDenoiser", "batch_inputs", "cfg_combine", "eps_denoiser", "guidance_scale"]
