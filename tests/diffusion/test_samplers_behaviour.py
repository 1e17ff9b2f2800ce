"""Every registered logSNR-family sampler × scheduler on an analytic denoiser; convergence, cancel, callback, noise
use (the σ family: test_ksamplers_behaviour.py)."""

from __future__ import annotations

import pytest
import torch

from cascade_lab.diffusion import (
    Cancelled,
    StepEvent,
    cosine,
    replay_noise,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    vp_scalers,
)
from cascade_lab.plugins import registries

MU, STD = 0.5, 0.8  # the data: every element i.i.d. N(MU, STD²)
SAMPLERS = [s.name for s in registries()["sampler"] if s.space == "logsnr"]
SCHEDULERS = [s.name for s in registries()["scheduler"] if s.space == "logsnr"]
DETERMINISTIC = ["ddim", "euler", "dpmpp_2m"]


def gaussian_denoiser(x, logsnr):
    """The exact E[x0 | x] for Gaussian data and x = a·x0 + b·ε."""
    a, b = vp_scalers(logsnr)
    return MU + a * STD**2 / (a**2 * STD**2 + b**2) * (x - a * MU)


def sampler(name):
    return registries()["sampler"].get(name).fn


def scheduler(name):
    return registries()["scheduler"].get(name).fn


def test_the_builtins_are_registered():
    assert set(SAMPLERS) >= {"ddpm", "ddim", "lcm", "euler", "euler_ancestral", "dpmpp_2m"}
    assert set(SCHEDULERS) >= {"cosine", "karras", "exponential"}
    assert all(s.description for s in registries()["sampler"])


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_every_sampler_with_every_scheduler(sampler_name, scheduler_name):
    torch.manual_seed(0)
    x = torch.randn(32, 4, 8, 8)
    events: list[StepEvent] = []
    out = sampler(sampler_name)(gaussian_denoiser, x, scheduler(scheduler_name)(8, shift=2.0),
                                callback=events.append)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert [e.step for e in events] == list(range(8)) and events[-1].steps == 8
    assert all(e.logsnr < e.logsnr_next for e in events[1:])
    assert torch.equal(out, events[-1].x0)  # the result is the last step's x0, not the last x
    assert abs(out.mean().item() - MU) < 0.05
    assert 0.3 < out.std().item() < 0.9  # few steps with a posterior-mean denoiser shrink the spread


@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral"])
def test_ancestral_samplers_reach_the_data_distribution(name):
    torch.manual_seed(1)
    out = sampler(name)(gaussian_denoiser, torch.randn(16, 4, 8, 8), cosine(200))
    assert out.mean().item() == pytest.approx(MU, abs=0.03)
    assert out.std().item() == pytest.approx(STD, abs=0.03)


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge(name, scheduler_name):
    torch.manual_seed(2)
    x = torch.randn(4, 4, 8, 8)
    fn, levels = sampler(name), scheduler(scheduler_name)
    reference = fn(gaussian_denoiser, x, levels(200, shift=2.0))
    errors = [(fn(gaussian_denoiser, x, levels(n, shift=2.0)) - reference).abs().max().item() for n in (6, 12, 24, 48)]
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.25 * errors[0], errors


def test_dpmpp_2m_beats_ddim_at_equal_steps():
    torch.manual_seed(3)
    x = torch.randn(4, 4, 8, 8)
    for levels in (scheduler("exponential")(12), scheduler("karras")(12)):
        ref = sample_ddim(gaussian_denoiser, x, torch.linspace(float(levels[0]), float(levels[-1]), 400))
        err_ddim = (sample_ddim(gaussian_denoiser, x, levels) - ref).abs().max()
        err_2m = (sample_dpmpp_2m(gaussian_denoiser, x, levels) - ref).abs().max()
        assert err_2m < 0.5 * err_ddim


def test_euler_is_ddim_and_euler_ancestral_is_ddpm_in_exact_maths():
    torch.manual_seed(4)
    x, levels = torch.randn(2, 4, 6, 5), cosine(10, shift=2.0)
    noise = [torch.randn(2, 4, 6, 5) for _ in range(10)]
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sample_euler(gaussian_denoiser, x, levels),
                               sample_ddim(gaussian_denoiser, x, levels), **tol)
    torch.testing.assert_close(sample_euler_ancestral(gaussian_denoiser, x, levels, noise=replay_noise(noise)),
                               sample_ddpm(gaussian_denoiser, x, levels, noise=replay_noise(noise)), **tol)


@pytest.mark.parametrize(("name", "draws"), [("ddpm", 5), ("ddim", 5), ("lcm", 5), ("euler_ancestral", 5),
                                             ("euler", 0), ("dpmpp_2m", 0)])
def test_noise_draws_per_step(name, draws):
    calls = []

    def noise(like):
        calls.append(like.shape)
        return torch.zeros_like(like)

    sampler(name)(gaussian_denoiser, torch.randn(1, 2, 3, 3), cosine(5), noise=noise)
    assert len(calls) == draws  # one per step like the official DDPM/DDIM (eta 0 too), so replays line up


def test_ddim_ignores_its_noise():
    x, levels = torch.randn(1, 2, 3, 3), cosine(4)
    a = sample_ddim(gaussian_denoiser, x, levels, noise=lambda like: torch.full_like(like, 1e3))
    torch.testing.assert_close(a, sample_ddim(gaussian_denoiser, x, levels))


@pytest.mark.parametrize("name", SAMPLERS)
def test_cancel_stops_between_steps(name):
    seen: list[int] = []
    calls = []

    def denoiser(x, logsnr):
        calls.append(float(logsnr))
        return gaussian_denoiser(x, logsnr)

    with pytest.raises(Cancelled) as info:
        sampler(name)(denoiser, torch.randn(1, 2, 3, 3), cosine(6), callback=lambda e: seen.append(e.step),
                      cancel=lambda: len(seen) == 2)
    assert info.value.step == 2 and seen == [0, 1] and len(calls) == 2
    assert info.value.x0 is not None and info.value.x0.shape == (1, 2, 3, 3)
    with pytest.raises(Cancelled) as info:
        sampler(name)(denoiser, torch.randn(1, 2, 3, 3), cosine(6), cancel=lambda: True)
    assert info.value.step == 0 and info.value.x0 is None


def test_callback_events_carry_levels_and_latents():
    levels = cosine(3, shift=2.0)
    events: list[StepEvent] = []
    sample_ddpm(gaussian_denoiser, torch.randn(1, 2, 3, 3), levels, callback=events.append)
    assert [(e.logsnr, e.logsnr_next) for e in events] == [(float(levels[i]), float(levels[i + 1])) for i in range(3)]
    assert all(e.x.shape == e.x0.shape == (1, 2, 3, 3) for e in events)


def test_levels_need_a_step():
    with pytest.raises(ValueError, match="steps \\+ 1"):
        sample_ddpm(gaussian_denoiser, torch.randn(1, 2, 3, 3), torch.tensor([0.0]))


def test_unknown_extras_are_ignored():
    out = sample_euler(gaussian_denoiser, torch.randn(1, 2, 3, 3), cosine(2), eta=0.5, s_churn=1.0)
    assert torch.isfinite(out).all()
