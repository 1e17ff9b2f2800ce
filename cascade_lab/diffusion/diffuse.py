"""Forward noising for training and img2img: the official `GDF.diffuse` with the ε target."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .loss_weights import P2LossWeight
from .schedule import logsnr as schedule_logsnr
from .schedule import noise_cond, train_t, vp_scalers


class Diffused(NamedTuple):
    """What GDF.diffuse returns, in its order: unpacks like the official 6-tuple."""

    noised: Tensor  # [B, C, H, W] a·x0 + b·ε
    epsilon: Tensor  # [B, C, H, W] the noise actually used (offset noise included)
    target: Tensor  # [B, C, H, W] the training target (EpsilonTarget: ε)
    logsnr: Tensor  # [B]
    noise_cond: Tensor  # [B] the r to feed the model
    loss_weight: Tensor  # [B]


def diffuse(x0: Tensor, t: Tensor | None = None, shift: float = 1.0, loss_shift: float = 1.0,
            epsilon: Tensor | None = None, offset_noise: float = 0.0, offset: Tensor | None = None,
            loss_weight: Callable[..., Tensor] | None = None,
            generator: torch.Generator | None = None) -> Diffused:
    """GDF.diffuse: noise x0 [B, C, H, W] at t [B] (drawn as in training when None) with ε = randn (+ offset).

    `offset_noise` > 0 adds offset_noise·offset, offset [B, C, 1, 1] (drawn when None), like
    GDF(offset_noise=...). `loss_weight` defaults to P2LossWeight(), evaluated at `loss_shift`.
    """
    if epsilon is None:
        epsilon = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if offset_noise > 0:
        if offset is None:  # drawn on the CPU like the official code, then moved
            offset = torch.randn([x0.size(0), x0.size(1)] + [1] * (x0.dim() - 2), generator=generator)
        epsilon = epsilon + offset.to(x0.device) * offset_noise
    if t is None:
        t = train_t(x0.size(0), generator=generator)
    logsnr = schedule_logsnr(t, shift=shift).to(x0.device)  # [B]
    a, b = vp_scalers(logsnr)
    a, b = a.view(-1, *[1] * (x0.dim() - 1)), b.view(-1, *[1] * (x0.dim() - 1))  # [B, 1, 1, 1]
    weight_fn = P2LossWeight() if loss_weight is None else loss_weight
    return Diffused(x0 * a + epsilon * b, epsilon, epsilon, logsnr, noise_cond(logsnr),
                    weight_fn(logsnr, shift=loss_shift))


__all__ = ["Diffused", "diffuse"]
