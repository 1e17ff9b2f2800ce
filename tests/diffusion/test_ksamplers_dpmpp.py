"""The DPM-Solver++, SEEDS and ER-SDE samplers against ComfyUI's own functions, step by step, on the analytic toy
denoiser (data: tools/comfyui_sampler_oracle.py). The noise is ComfyUI's for the seed, Brownian trees included."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cascade_lab.diffusion import ksamplers
from cascade_lab.diffusion.noise import ComfyNoise
from cascade_lab.diffusion.samplers import StepEvent

sys.path.insert(0, str(Path(__file__).parent))
from ksampler_toy import SEED, ToyDenoiser, assert_plain_noise_works, close, load_oracle  # noqa: E402

DATA = Path(__file__).parent / "data" / "ksamplers_dpmpp.safetensors"
NAMES = ["dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m",
         "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
         "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "seeds_2", "seeds_3", "exp_heun_2_x0", "exp_heun_2_x0_sde", "er_sde"]
SDE = ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "seeds_2", "seeds_3", "exp_heun_2_x0_sde",
       "er_sde", "dpmpp_2s_ancestral"]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_oracle(DATA)



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


@pytest.mark.parametrize("name", SDE)
def test_plain_noise_sources_work(name: str, reference: dict[str, torch.Tensor]) -> None:
    assert_plain_noise_works(getattr(ksamplers, f"sample_{name}"), reference[f"{name}.x_init"],
                             reference[f"{name}.sigmas"])
