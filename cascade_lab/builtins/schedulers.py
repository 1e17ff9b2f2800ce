"""Built-in schedulers: logSNR levels for N steps (see cascade_lab/diffusion/schedulers.py)."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..registry import LazyCallable, Scheduler

SCHEDULERS: list[Scheduler] = [
    Scheduler("cosine", "the official GDF grid: t evenly spaced through the shifted cosine schedule",
              LazyCallable("cascade_lab.diffusion.schedulers:cosine"), family="official"),
    Scheduler("karras", "Karras et al. rho = 7 spacing in sigma between the schedule's ends",
              LazyCallable("cascade_lab.diffusion.schedulers:karras"), family="official"),
    Scheduler("exponential", "evenly spaced in log sigma (logSNR) between the schedule's ends",
              LazyCallable("cascade_lab.diffusion.schedulers:exponential"), family="official"),
]


@hookimpl
def register_schedulers(register: Callable[[Scheduler], None]) -> None:
    for scheduler in SCHEDULERS:
        register(scheduler)
