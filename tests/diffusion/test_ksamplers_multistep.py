"""DDPM, LCM, ddim, iPNDM, DEIS, RES multistep, gradient estimation and SA-Solver against ComfyUI's own functions,
step by step, on the analytic toy denoiser (data: tools/comfyui_sampler_oracle.py), with ComfyUI's noise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cascade_lab.diffusion import ksamplers
from cascade_lab.diffusion.noise import ComfyNoise
from cascade_lab.diffusion.samplers import StepEvent

sys.path.insert(0, str(Path(__file__).parent))
from ksampler_toy import SEED, SHIFT, ToyDenoiser, assert_plain_noise_works, close, load_oracle  # noqa: E402

DATA = Path(__file__).parent / "data" / "ksamplers_multistep.safetensors"
NAMES = ["ddpm", "lcm", "ddim", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
         "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
         "gradient_estimation_cfg_pp", "sa_solver", "sa_solver_pece"]
# ComfyUI's ipndm, ipndm_v and deis hand their callback the starting x at every step (the name x is never
# updated in their loops), so their recorded x says nothing after step 0; their x0s still follow the trajectory
STALE_X = {"ipndm", "ipndm_v", "deis"}
STOCHASTIC = ["ddpm", "lcm", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "sa_solver"]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_oracle(DATA)



def run(name: str, reference: dict[str, torch.Tensor], **options: object) -> tuple[torch.Tensor, list[StepEvent]]:
    events: list[StepEvent] = []
    final = getattr(ksamplers, f"sample_{name}")(ToyDenoiser(), reference[f"{name}.x_init"].clone(),
                                                 reference[f"{name}.sigmas"], noise=ComfyNoise(SEED).steps("c"),
                                                 callback=events.append, **options)
    return final, events


@pytest.mark.parametrize("name", NAMES)
def test_matches_comfyui_step_by_step(name: str, reference: dict[str, torch.Tensor]) -> None:
    options = {"shift": SHIFT} if name.startswith("sa_solver") else {}  # the model's shift sets SA-Solver's τ range
    final, events = run(name, reference, **options)
    assert [e.step for e in events] == list(range(len(reference[f"{name}.sigmas"]) - 1))
    for e in events:
        close(e.x0, reference[f"{name}.step{e.step:02d}.denoised"], f"{name} step {e.step} denoised")
        if e.step + 1 < len(events) and name not in STALE_X:
            close(e.x, reference[f"{name}.step{e.step + 1:02d}.x"], f"{name} x after step {e.step}")
    close(events[-1].x, final, f"{name} last event's x")
    close(final, reference[f"{name}.final"], f"{name} final")


@pytest.mark.parametrize("name", sorted(STALE_X))
def test_comfyui_reports_stale_x_for_the_ipndm_family(name: str, reference: dict[str, torch.Tensor]) -> None:
    # why STALE_X skips x: every recorded step x is the start, though the trajectory moves (x0 changes)
    for step in range(1, len(reference[f"{name}.sigmas"]) - 1):
        assert torch.equal(reference[f"{name}.step{step:02d}.x"], reference[f"{name}.x_init"])
    assert not torch.equal(reference[f"{name}.step01.denoised"], reference[f"{name}.step00.denoised"])


@pytest.mark.parametrize("name", STOCHASTIC)
def test_plain_noise_sources_work(name: str, reference: dict[str, torch.Tensor]) -> None:
    assert_plain_noise_works(getattr(ksamplers, f"sample_{name}"), reference[f"{name}.x_init"],
                             reference[f"{name}.sigmas"])


def test_ddim_is_comfyuis_euler(reference: dict[str, torch.Tensor]) -> None:
    x, sigmas = reference["ddim.x_init"], reference["ddim.sigmas"]
    assert torch.equal(ksamplers.sample_ddim(ToyDenoiser(), x.clone(), sigmas),
                       ksamplers.sample_euler(ToyDenoiser(), x.clone(), sigmas))


def test_pece_evaluates_twice_per_corrected_step(reference: dict[str, torch.Tensor]) -> None:
    x, sigmas = reference["sa_solver.x_init"], reference["sa_solver.sigmas"]
    plain, pece = ToyDenoiser(), ToyDenoiser()
    ksamplers.sample_sa_solver(plain, x.clone(), sigmas, noise=torch.zeros_like)
    ksamplers.sample_sa_solver_pece(pece, x.clone(), sigmas, noise=torch.zeros_like)
    steps = len(sigmas) - 1
    assert plain.calls == steps and pece.calls == 2 * steps - 1  # every step but the first is corrected


@pytest.mark.parametrize("name, options", [("ipndm", {"max_order": 5}), ("deis", {"max_order": 0}),
                                           ("deis", {"deis_mode": "ab"}), ("sa_solver", {"predictor_order": 0})])
def test_bad_options_are_named(name: str, options: dict[str, object], reference: dict[str, torch.Tensor]) -> None:
    key = next(iter(options))
    with pytest.raises(ValueError, match=key):
        getattr(ksamplers, f"sample_{name}")(ToyDenoiser(), reference[f"{name}.x_init"].clone(),
                                             reference[f"{name}.sigmas"], **options)


def test_deis_weights_integrate_the_interpolant(reference: dict[str, torch.Tensor]) -> None:
    from cascade_lab.diffusion.ksamplers.deis import EDM_VP, _EdmVpTime, _rhoab_weights, _tab_weights

    sigmas = reference["deis.sigmas"]
    time = _EdmVpTime(*EDM_VP)
    ts = time.t(sigmas)
    for i in range(1, len(sigmas) - 2):
        # "rhoab" (polynomial in σ) integrates σ^k exactly for k < order
        exact = sigmas.double()
        weights = _rhoab_weights(exact, i, min(4, i + 1))
        for k in range(len(weights)):
            moment = sum(w * exact[i - j] ** k for j, w in enumerate(weights))
            assert float(moment) == pytest.approx(float((exact[i + 1] ** (k + 1) - exact[i] ** (k + 1)) / (k + 1)),
                                                  rel=1e-12, abs=1e-12)
        # "tab" weights of the Lagrange basis sum to ∫ dσ, up to the N-point quadrature
        total = sum(_tab_weights(time, ts, i, min(3, i + 1)))
        assert float(total) == pytest.approx(float(sigmas[i + 1] - sigmas[i]), rel=1e-4)


def test_deis_rhoab_runs_the_whole_schedule(reference: dict[str, torch.Tensor]) -> None:
    # ComfyUI's rhoab table has one weight too many from step max_order on (its sampler raises there)
    x, sigmas = reference["deis.x_init"], reference["deis.sigmas"]
    tab = ksamplers.sample_deis(ToyDenoiser(), x.clone(), sigmas)
    rhoab = ksamplers.sample_deis(ToyDenoiser(), x.clone(), sigmas, deis_mode="rhoab")
    assert torch.isfinite(rhoab).all() and 0 < (rhoab - tab).abs().max() < 0.2
