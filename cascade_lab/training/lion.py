"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), the update of the ``lion-pytorch``
package that kohya's ``--optimizer_type Lion`` builds, written with torch ops so it runs without that package.

Per parameter, with momentum m (state ``exp_avg``, the package's name, so checkpoints of either load in the other):
p ← p·(1 − lr·wd);  p ← p − lr·sign(β1·m + (1 − β1)·g);  m ← β2·m + (1 − β2)·g.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class Lion(torch.optim.Optimizer):
    """Lion with ``lion-pytorch``'s arguments and defaults (lr 1e-4, betas (0.9, 0.99), no weight decay);
    ``decoupled_weight_decay`` divides the decay by the starting learning rate, as the package does."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False) -> None:
        if not lr > 0:
            raise ValueError(f"Lion: lr={lr}: use a positive learning rate")
        if not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"Lion: betas={betas}: each must be in [0, 1]")
        self.init_lr = lr
        self.decoupled_weight_decay = decoupled_weight_decay
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            if self.decoupled_weight_decay:
                wd = wd / self.init_lr
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m, grad = state["exp_avg"], p.grad
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(m.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_(), alpha=-lr)
                m.mul_(beta2).add_(grad, alpha=1.0 - beta2)
        return loss


__all__ = ["Lion"]
