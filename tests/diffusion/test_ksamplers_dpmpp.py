"""The DPM-Solver++, SEEDS and ER-SDE samplers against ComfyUI's own functions, step by step, on the analytic toy
denoiser (data: tools/comfyui_sampler_oracle.py). The noise is ComfyUI's for the seed, Brownian trees included."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade_lab.diffusion import ksamplers
from cascade_lab.diffusion.noise import ComfyNoise
from cascade_lab.diffusion.samplers import Cancelled, StepEvent

sys.path.insert(0, str(Path(__file__).parent))
from ksampler_toy import SEED, ToyDenoiser  # noqa: E402

DATA = Path(__file__).parent / "data" / "ksamplers_dpmpp.safetensors"
NAMES = ["dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m",
         "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
         "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "seeds_2", "seeds_3", "exp_heun_2_x0", "exp_heun_2_x0_sde", "er_sde"]
SDE = ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "seeds_2", "seeds_3", "exp_heun_2_x0_sde",
       "er_sde", "dpmpp_2s_ancestral"]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(str(DATA)).items()}


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_matches_comfyui_step_by_step(name: str, reference: dict[str, torch.Tensor]) -> None:
    sigmas = reference[f"{name}.sigmas"]
    events: list[StepEvent] = []
    final = getattr(ksamplers, f"sample_{name}")(ToyDenoiser(), reference[f"{name}.x_init"].clone(), sigmas,
                                                 noise=ComfyNoise(SEED).steps("c"), callback=events.append)
    assert [e.step for e in events] == list(range(len(sigmas) - 1))
    for e in events:
        close(e.x0, reference[f"{name}.step{e.step:02d}.denoised"], f"{name} step {e.step} denoised")
        if e.step + 1 < len(events):
            close(e.x, reference[f"{name}.step{e.step + 1:02d}.x"], f"{name} x after step {e.step}")
    close(final, reference[f"{name}.final"], f"{name} final")


@pytest.mark.parametrize("name", NAMES)
def test_cancel_before_the_first_step(name: str, reference: dict[str, torch.Tensor]) -> None:
    denoiser = ToyDenoiser()
    with pytest.raises(Cancelled):
        getattr(ksamplers, f"sample_{name}")(denoiser, reference[f"{name}.x_init"].clone(),
                                             reference[f"{name}.sigmas"], cancel=lambda: True)
    assert denoiser.calls == 0


@pytest.mark.parametrize("name", SDE)
def test_plain_noise_sources_work(name: str, reference: dict[str, torch.Tensor]) -> None:
    x, sigmas = reference[f"{name}.x_init"], reference[f"{name}.sigmas"]
    fn = getattr(ksamplers, f"sample_{name}")
    torch.manual_seed(0)
    a = fn(ToyDenoiser(), x.clone(), sigmas, noise=torch.randn_like)
    torch.manual_seed(0)
    b = fn(ToyDenoiser(), x.clone(), sigmas, noise=torch.randn_like)
    c = fn(ToyDenoiser(), x.clone(), sigmas, noise=torch.zeros_like)
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, c)
