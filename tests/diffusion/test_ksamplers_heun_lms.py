"""Euler CFG++, Heun, Heun++, DPM-Solver-2, LMS and DPM-Solver fast / adaptive against ComfyUI's own functions, step
by step, on the analytic toy denoiser (data: tools/comfyui_sampler_oracle.py, ComfyUI's noise for the seed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cascade_lab.diffusion import ksamplers
from cascade_lab.diffusion.noise import ComfyNoise
from cascade_lab.diffusion.samplers import Cancelled, StepEvent

sys.path.insert(0, str(Path(__file__).parent))
from ksampler_toy import SEED, ToyDenoiser, close, load_oracle  # noqa: E402

DATA = Path(__file__).parent / "data" / "ksamplers_heun_lms.safetensors"
NAMES = ["euler_cfg_pp", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
         "dpm_adaptive"]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_oracle(DATA)



def recorded_steps(reference: dict[str, torch.Tensor], name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ComfyUI's callbacks as (x, denoised): x at the start of each step (dpm_adaptive: x after each try)."""
    n = len({k.split(".")[1] for k in reference if k.startswith(f"{name}.step")})
    return [(reference[f"{name}.step{i:02d}.x"], reference[f"{name}.step{i:02d}.denoised"]) for i in range(n)]


def run(name: str, reference: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[StepEvent]]:
    events: list[StepEvent] = []
    final = getattr(ksamplers, f"sample_{name}")(ToyDenoiser(), reference[f"{name}.x_init"].clone(),
                                                 reference[f"{name}.sigmas"], noise=ComfyNoise(SEED).steps("c"),
                                                 callback=events.append)
    return final, events


@pytest.mark.parametrize("name", [n for n in NAMES if n != "dpm_adaptive"])
def test_matches_comfyui_step_by_step(name: str, reference: dict[str, torch.Tensor]) -> None:
    final, events = run(name, reference)
    steps = recorded_steps(reference, name)
    assert [e.step for e in events] == list(range(len(steps)))
    assert all(e.steps == len(steps) for e in events)
    for e in events:
        close(e.x0, steps[e.step][1], f"{name} step {e.step} denoised")
        if e.step + 1 < len(steps):
            close(e.x, steps[e.step + 1][0], f"{name} x after step {e.step}")
    close(events[-1].x, final, f"{name} last event's x")
    close(final, reference[f"{name}.final"], f"{name} final")


def test_dpm_adaptive_matches_comfyui_on_accepted_steps(reference: dict[str, torch.Tensor]) -> None:
    # ComfyUI reports every try with x after it; a rejected try leaves x as it was, so the accepted ones are where x
    # moved. Ours reports the accepted steps only.
    final, events = run("dpm_adaptive", reference)
    previous, accepted = reference["dpm_adaptive.x_init"], []
    for x, denoised in recorded_steps(reference, "dpm_adaptive"):
        if not torch.equal(x, previous):
            accepted.append((x, denoised))
        previous = x
    assert 0 < len(accepted) < len(recorded_steps(reference, "dpm_adaptive")), "the data should hold a rejection"
    assert [e.step for e in events] == list(range(len(accepted)))
    for e, (x, denoised) in zip(events, accepted, strict=True):
        close(e.x0, denoised, f"dpm_adaptive accepted step {e.step} denoised")
        close(e.x, x, f"dpm_adaptive x after accepted step {e.step}")
    close(final, reference["dpm_adaptive.final"], "dpm_adaptive final")
    sigmas = reference["dpm_adaptive.sigmas"]
    assert events[0].sigma == pytest.approx(float(sigmas[0]), rel=1e-5)
    assert events[-1].sigma_next == pytest.approx(float(sigmas[-2]), rel=1e-5)  # σ_min: the last σ before 0


@pytest.mark.parametrize("name", NAMES)
def test_cancel_midway_carries_the_last_x0(name: str, reference: dict[str, torch.Tensor]) -> None:
    polls = iter([False, False, True])
    with pytest.raises(Cancelled) as caught:
        getattr(ksamplers, f"sample_{name}")(ToyDenoiser(), reference[f"{name}.x_init"].clone(),
                                             reference[f"{name}.sigmas"], cancel=lambda: next(polls))
    assert caught.value.step == 2 and caught.value.x0 is not None


def test_dpm_solver_rejects_a_schedule_without_a_positive_sigma_min() -> None:
    x = torch.zeros(1, 1, 2, 2)
    for name in ("dpm_fast", "dpm_adaptive"):
        with pytest.raises(ValueError, match="σ_min"):
            getattr(ksamplers, f"sample_{name}")(ToyDenoiser(), x, torch.tensor([1.0, 0.0, 0.0]))
