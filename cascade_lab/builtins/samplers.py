"""Built-in samplers (filled in by the diffusion core; see cascade_lab/diffusion/samplers.py)."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..registry import Sampler

SAMPLERS: list[Sampler] = []


@hookimpl
def register_samplers(register: Callable[[Sampler], None]) -> None:
    for sampler in SAMPLERS:
        register(sampler)
