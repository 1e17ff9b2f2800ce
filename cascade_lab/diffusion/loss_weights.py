"""Training loss weights of the official GDF (`gdf/loss_weights.py`): P2 and the adaptive bucket weight."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _shifted(logsnr: Tensor, shift: float) -> Tensor:
    """BaseLossWeight's loss_shift: logSNR + 2·ln(shift)."""
    return logsnr.clone() + 2 * math.log(shift) if shift != 1 else logsnr


class P2LossWeight:
    """P2 weighting (Choi et al. 2022) as in GDF: w = (k + e^{s·logSNR})^−γ, clamped to ±1e9."""

    def __init__(self, *, k: float = 1.0, gamma: float = 1.0, s: float = 1.0) -> None:
        self.k, self.gamma, self.s = k, gamma, s

    @torch.no_grad()
    def __call__(self, logsnr: Tensor, *, shift: float = 1.0) -> Tensor:
        logsnr = _shifted(logsnr, shift)
        return ((self.k + (logsnr * self.s).exp()) ** -self.gamma).clamp(-1e9, 1e9)


class AdaptiveLossWeight:
    """GDF's AdaptiveLossWeight: w = 1 / running loss of the logSNR bucket, buckets by searchsorted (left).

    `buckets` losses (init 1) over `buckets − 1` edges linspace(lo, hi) in float32; `update_buckets` keeps an
    EMA with beta 0.99 and, like the official in-place indexing on CPU, the LAST sample of a batch wins
    when several fall in one bucket (all of them read the old value).
    """

    def __init__(self, *, logsnr_range: tuple[float, float] = (-10.0, 10.0), buckets: int = 300,
                 weight_range: tuple[float, float] = (1e-7, 1e7)) -> None:
        assert buckets >= 2, f"AdaptiveLossWeight needs at least 2 buckets, got {buckets}"
        self.bucket_ranges = torch.linspace(logsnr_range[0], logsnr_range[1], buckets - 1,
                                            dtype=torch.float32)  # [buckets-1] edges
        self.bucket_losses = torch.ones(buckets, dtype=torch.float32)  # [buckets]
        self.weight_range = tuple(weight_range)

    def bucket_indices(self, logsnr: Tensor) -> Tensor:
        """searchsorted(edges, logSNR), side left: below the first edge → 0, above the last → buckets − 1."""
        return torch.searchsorted(self.bucket_ranges.to(logsnr.device), logsnr)

    @torch.no_grad()
    def __call__(self, logsnr: Tensor, *, shift: float = 1.0) -> Tensor:
        logsnr = _shifted(logsnr, shift)
        losses = self.bucket_losses.to(logsnr.device)[self.bucket_indices(logsnr)]
        return (1 / losses).clamp(*self.weight_range)

    @torch.no_grad()
    def update_buckets(self, logsnr: Tensor, loss: Tensor, beta: float = 0.99) -> None:
        """EMA update bucket ← beta·old + (1 − beta)·loss with the raw per-sample loss [B]."""
        idx = self.bucket_indices(logsnr).cpu()  # [B]
        new = self.bucket_losses[idx] * beta + loss.detach().float().cpu() * (1 - beta)  # [B]
        # the official race resolved deterministically: keep the last batch position of each bucket
        pos = torch.arange(idx.numel())
        last = torch.full_like(self.bucket_losses, -1, dtype=torch.long).scatter_reduce(
            0, idx, pos, reduce="amax")
        keep = last[idx] == pos
        self.bucket_losses[idx[keep]] = new[keep]

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors of the state: `bucket_ranges` [buckets−1], `bucket_losses` [buckets]."""
        return {"bucket_ranges": self.bucket_ranges.clone(), "bucket_losses": self.bucket_losses.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` or `to_dict()` output (lists are accepted as well as tensors)."""
        ranges = torch.as_tensor(state["bucket_ranges"], dtype=torch.float32)
        losses = torch.as_tensor(state["bucket_losses"], dtype=torch.float32)
        if losses.numel() != ranges.numel() + 1:
            raise ValueError(f"adaptive loss state: {losses.numel()} bucket_losses need "
                             f"{losses.numel() - 1} bucket_ranges, got {ranges.numel()}")
        self.bucket_ranges, self.bucket_losses = ranges.clone(), losses.clone()

    def to_dict(self) -> dict[str, list[float]]:
        """Plain JSON-able state, the `adaptive_loss` entry of the official `info.json`."""
        return {"bucket_ranges": self.bucket_ranges.tolist(), "bucket_losses": self.bucket_losses.tolist()}

    @classmethod
    def from_dict(cls, state: dict[str, Any], **kwargs: Any) -> AdaptiveLossWeight:
        """Build from `to_dict()` output (e.g. the official info.json `adaptive_loss`)."""
        weight = cls(buckets=len(state["bucket_losses"]), **kwargs)
        weight.load_state_dict(state)
        return weight


__all__ = ["AdaptiveLossWeight", "P2LossWeight"]
