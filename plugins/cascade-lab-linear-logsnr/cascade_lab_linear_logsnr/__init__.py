"""Example cascade_lab plugin: the ``linear_logsnr`` scheduler.

It takes the first and last noise levels of the official ``cosine`` scheduler (so shift, t_start and t_end
mean the same) and spaces the steps evenly in logSNR between them. No torch import until it is called.
"""

from __future__ import annotations

from typing import Any

import cascade_lab


def linear_logsnr(steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0) -> Any:
    """logSNR levels (steps + 1 values) evenly spaced between the cosine schedule's ends."""
    import torch

    from cascade_lab.plugins import get_scheduler

    ends = get_scheduler("cosine").fn(1, shift=shift, t_start=t_start, t_end=t_end)
    return torch.linspace(float(ends[0]), float(ends[-1]), steps + 1, dtype=torch.float32)


@cascade_lab.hookimpl
def register_schedulers(register: Any) -> None:
    register(cascade_lab.Scheduler("linear_logsnr", "evenly spaced in logSNR between the cosine ends",
                                   linear_logsnr))
