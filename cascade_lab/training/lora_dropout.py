"""kohya's LoRA dropouts while training (networks/lora.py ``LoRAModule.forward``): `LoraDropout` and the branch
with them, which `lora_train`'s branches run in place of their fused paths while a network with dropouts trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .lora_train import LoraPair

Tensor = torch.Tensor


@dataclass(frozen=True)
class LoraDropout:
    """kohya's three LoRA dropouts (networks/lora.py ``LoRAModule.forward``), applied while training only.

    ``neuron`` (``--network_dropout``): dropout of down's output h [..., rank], element by element, the kept ones
    × 1 / (1 - p). ``rank`` (``network_args rank_dropout``): a mask over the rank per sample, the branch's scale
    × 1 / (1 - p). ``module`` (``network_args module_dropout``): the whole branch skipped with probability p at
    each call. Neuron and rank dropout keep the branch's expected value (inverted dropout); module dropout, as
    kohya's, does not rescale: the branch's expected value is (1 - p) times the trained one.
    """

    neuron: float = 0.0
    rank: float = 0.0
    module: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.neuron or self.rank or self.module)


Draws = tuple[bool, Tensor | None]  # one call's module dropout (run the branch?) and rank mask [B, rank]


def dropped_low_rank(x: Tensor, pair: LoraPair, scale: float, conv: bool, drop: LoraDropout,
                      draws: Draws | None = None) -> tuple[Tensor | None, Draws]:
    """(scale · up(dropout(down(x))) with kohya's dropouts, or None where module dropout skips the branch; the
    module and rank draws it used). Draws come from the global RNG (the run's seeded, checkpointed stream, which
    gradient checkpointing restores for the recomputation) in kohya's order: module dropout on the CPU generator
    (kohya's ``torch.rand(1)``), neuron dropout, then the rank mask on x's device; `draws` given: those module and
    rank draws instead (a second call of the same module in one forward)."""
    keep = draws[0] if draws is not None else not (drop.module and float(torch.rand(1)) < drop.module)
    if not keep:
        return None, (False, None)
    down: Tensor = pair.lora_down
    up: Tensor = pair.lora_up
    if not torch.is_autocast_enabled(x.device.type) and down.dtype != x.dtype:
        down, up = down.to(x.dtype), up.to(x.dtype)
    h = F.conv2d(x, down[:, :, None, None]) if conv else F.linear(x, down)  # [B, r, H, W] or [B, ..., r]
    if drop.neuron:
        h = F.dropout(h, drop.neuron)
    mask = draws[1] if draws is not None else None
    if drop.rank and mask is None:
        mask = torch.rand(h.shape[0], down.shape[0], device=h.device) > drop.rank
    if mask is not None:
        # per sample over the rank: kohya's [B, r] mask unsqueezed for 3-D and conv inputs. A Linear on NHWC
        # [B, H, W, c] (Stage C's channelwise layers) gets [B, 1, 1, r], where kohya's [B, r, 1, 1] fails to
        # broadcast (or, when H = r, masks rows of the image instead of the rank)
        shape = (h.shape[0], -1, 1, 1) if conv else (h.shape[0], *[1] * (h.dim() - 2), -1)
        h = h * mask.view(shape).to(h.dtype)
        scale = scale / (1 - drop.rank)
    out = F.conv2d(h, up[:, :, None, None] * scale) if conv else F.linear(h, up * scale)
    return out, (True, mask)


__all__ = ["Draws", "LoraDropout", "dropped_low_rank"]
