"""Built-in samplers: the official GDF samplers plus common k-diffusion ones (see cascade_lab/diffusion/samplers.py)."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from ..registry import LazyCallable, Sampler


def _official(name: str, description: str) -> Sampler:
    return Sampler(name, description, LazyCallable(f"cascade_lab.diffusion.samplers:sample_{name}"), family="official")


SAMPLERS: list[Sampler] = [
    _official("ddpm", "ancestral DDPM = DDIM with eta 1, the official Stable Cascade default"),
    _official("ddim", "deterministic DDIM (eta 0), as the official DDIMSampler"),
    _official("lcm", "consistency sampling: renoise the x0 estimate with fresh noise each step"),
    _official("euler", "Euler on the probability-flow ODE in sigma (deterministic)"),
    _official("euler_ancestral", "Euler ancestral (k-diffusion): Euler step plus fresh noise"),
    _official("dpmpp_2m", "DPM-Solver++(2M): deterministic second-order multistep"),
]


@hookimpl
def register_samplers(register: Callable[[Sampler], None]) -> None:
    for sampler in SAMPLERS:
        register(sampler)
