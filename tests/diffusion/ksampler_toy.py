"""A small analytic guided denoiser in the σ convention, for the σ-family tests and tools/comfyui_sampler_oracle.py.

Both ComfyUI (in the oracle tool) and cascade_lab (in the tests) sample with exactly this function, so the
recorded trajectories compare the samplers' arithmetic and noise, with no model in between.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

COND_GAIN, UNCOND_GAIN, CFG = 1.0, 0.6, 2.0
SHAPE, SEED, STEPS, SHIFT = (2, 4, 6, 5), 1234, 10, 2.0


def toy_x0(x: Tensor, sigma: Tensor, gain: float) -> Tensor:
    """A bounded, smooth, non-linear clean estimate of the VE latent x at noise levels sigma [B]."""
    s = sigma.view(-1, 1, 1, 1)
    x_in = x / (s * s + 1) ** 0.5  # the VP input a model would see
    return gain * torch.tanh(x_in) + 0.3 * x_in.roll(1, dims=-1)


def guided(x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(CFG-combined x0, unconditional x0), combined as ComfyUI's cfg_function: uncond + (cond − uncond)·cfg."""
    cond, uncond = toy_x0(x, sigma, COND_GAIN), toy_x0(x, sigma, UNCOND_GAIN)
    return uncond + (cond - uncond) * CFG, uncond


class ToyDenoiser:
    """cascade_lab's side: ``denoiser(x, sigma) -> x0`` with ``uncond_x0`` kept for the CFG++ samplers."""

    def __init__(self) -> None:
        self.uncond_x0: Tensor | None = None
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        x0, self.uncond_x0 = guided(x, sigma)
        return x0


def load_oracle(path: Path) -> dict[str, Tensor]:
    """A recorded oracle file (tools/comfyui_sampler_oracle.py), tensors cloned (aligned)."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path)).items()}


def close(actual: Tensor, expected: Tensor, what: str) -> None:
    """Equal to ComfyUI's to float rounding: atol 1e-5 of the expected tensor's absmax, rtol 1e-5."""
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5,
                               msg=lambda m: f"{what}: {m}")


def assert_plain_noise_works(fn: Callable[..., Tensor], x: Tensor, sigmas: Tensor) -> None:
    """A plain (non-Brownian) noise source: reproducible under a seed, and its draws change the result."""
    torch.manual_seed(0)
    a = fn(ToyDenoiser(), x.clone(), sigmas, noise=torch.randn_like)
    torch.manual_seed(0)
    b = fn(ToyDenoiser(), x.clone(), sigmas, noise=torch.randn_like)
    c = fn(ToyDenoiser(), x.clone(), sigmas, noise=torch.zeros_like)
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, c)
