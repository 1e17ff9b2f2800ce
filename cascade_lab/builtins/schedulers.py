"""Built-in schedulers (filled in by the diffusion core; see cascade_lab/diffusion/schedulers.py)."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..registry import Scheduler

SCHEDULERS: list[Scheduler] = []


@hookimpl
def register_schedulers(register: Callable[[Scheduler], None]) -> None:
    for scheduler in SCHEDULERS:
        register(scheduler)
