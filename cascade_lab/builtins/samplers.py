"""Built-in samplers: the official GDF samplers plus common k-diffusion ones (see cascade_lab/diffusion/samplers.py)."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..registry import LazyCallable, Sampler


def _lazy(name: str) -> LazyCallable:
    return LazyCallable(f"cascade_lab.diffusion.samplers:sample_{name}")


SAMPLERS: list[Sampler] = [
    Sampler("ddpm", "ancestral DDPM = DDIM with eta 1, the official Stable Cascade default", _lazy("ddpm")),
    Sampler("ddim", "deterministic DDIM (eta 0), as the official DDIMSampler", _lazy("ddim")),
    Sampler("lcm", "consistency sampling: renoise the x0 estimate with fresh noise each step", _lazy("lcm")),
    Sampler("euler", "Euler on the probability-flow ODE in sigma (deterministic)", _lazy("euler")),
    Sampler("euler_ancestral", "Euler ancestral (k-diffusion): Euler step plus fresh noise", _lazy("euler_ancestral")),
    Sampler("dpmpp_2m", "DPM-Solver++(2M): deterministic second-order multistep", _lazy("dpmpp_2m")),
]


@hookimpl
def register_samplers(register: Callable[[Sampler], None]) -> None:
    for sampler in SAMPLERS:
        register(sampler)
