"""Training with the weights themselves in bf16 (kohya's ``--full_bf16``): how an fp32 update is written back.

kohya casts the trained model to bf16 and lets the optimizer update it in place, so every new weight is rounded
to the nearest bf16: an update below half a bf16 step of its weight (2^-9 of it) is lost every time, and a run
with a small learning rate stops learning. Stochastic rounding rounds up with probability equal to the
remainder's share of the step, so the expected new weight is the fp32 one (Gupta et al. 2015, "Deep Learning
with Limited Numerical Precision"; OneTrainer does the same for Adafactor, spec/training.md §6). The random bits
come from a generator seeded from the run's seed and saved with the optimizer's state, so a resumed run rounds
exactly as an uninterrupted one, and every DDP process rounds alike (the replicas stay equal).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .config import BF16_ROUNDINGS as ROUNDINGS


def stochastic_round(value: Tensor, generator: torch.Generator) -> Tensor:
    """`value` (fp32) in bf16, rounded up or down at random with the remainder's share of the bf16 step.

    A bf16 is the upper 16 bits of an fp32: adding 16 random low bits and cutting them off carries into the
    kept bits with exactly that probability (for either sign, as the bits are the magnitude's)."""
    bits = value.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = noise.add_(bits).bitwise_and_(-65536)  # 0xFFFF0000: the bf16 part
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


class Rounding:
    """How an optimizer writes fp32 results into low-precision parameters: "stochastic" or "nearest" (kohya)."""

    def __init__(self, mode: str = "stochastic", seed: int = 0, device: torch.device | str = "cpu") -> None:
        if mode not in ROUNDINGS:
            raise ValueError(f"bf16_rounding={mode!r}: use 'stochastic' (unbiased) or 'nearest' (kohya)")
        self.mode = mode
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def write(self, p: Tensor, value: Tensor) -> None:
        """p ← value (fp32), rounded to p's dtype."""
        if p.dtype != torch.bfloat16 or self.mode == "nearest":
            p.copy_(value)
        else:
            p.copy_(stochastic_round(value, self.generator))

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"the checkpoint rounded with bf16_rounding={state['mode']!r}, this run with "
                             f"{self.mode!r}: resume with {state['mode']!r}")
        self.generator.set_state(state["generator"])


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, torch's arithmetic) on bf16 parameters with fp32 moments: each parameter's
    update is computed in fp32 and the new weight written through `rounding` (kohya's torch AdamW keeps its
    moments in bf16 and rounds every operation to the nearest)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, rounding: Rounding) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.rounding = rounding

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)  # as torch's AdamW: a CPU float
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step, exp_avg, exp_avg_sq = float(state["step"]), state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**step)).add_(eps)
                value = p.float().mul_(1 - lr * wd)
                value.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
                del grad, denom  # before the rounding's random bits are drawn
                self.rounding.write(p, value)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rounding": self.rounding.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_state_in_saved_dtypes(self, state_dict)


def load_state_in_saved_dtypes(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """optimizer.load_state_dict, keeping the saved dtypes of its state and restoring its `rounding`'s generator.

    torch casts every floating-point state tensor to its parameter's dtype on load: fp32 moments of a bf16
    parameter would come back rounded to bf16, and a resumed run would differ from an uninterrupted one."""
    state = dict(state_dict)
    rounding = state.pop("rounding", None)
    torch.optim.Optimizer.load_state_dict(optimizer, state)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in state["param_groups"] for i in group["params"]]
    for p, i in zip(params, saved_ids, strict=True):
        for key, value in state["state"].get(i, {}).items():
            if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != p.dtype and key != "step":
                optimizer.state[p][key] = value.to(p.device)
    if rounding is not None and getattr(optimizer, "rounding", None) is not None:
        optimizer.rounding.load_state_dict(rounding)


__all__ = ["BF16AdamW", "ROUNDINGS", "Rounding", "load_state_in_saved_dtypes", "stochastic_round"]
