"""The hooks a cascade_lab plugin may implement (pluggy project name ``cascade_lab``)."""

from __future__ import annotations

from collections.abc import Callable

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("cascade_lab")
hookimpl = HookimplMarker("cascade_lab")


@hookspec
def register_samplers(register: Callable[..., None]) -> None:
    """Register samplers by calling ``register(Sampler(name, description, fn))`` once per sampler."""


@hookspec
def register_schedulers(register: Callable[..., None]) -> None:
    """Register schedulers by calling ``register(Scheduler(name, description, fn))`` once per scheduler."""


@hookspec
def register_variants(register: Callable[..., None]) -> None:
    """Register weight variants by calling ``register(Variant(...))`` once per variant."""
