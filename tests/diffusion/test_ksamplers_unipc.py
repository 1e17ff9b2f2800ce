"""UniPC (uni_pc, uni_pc_bh2) against ComfyUI's own sample_unipc, step by step, on the analytic toy denoiser
(data: tools/comfyui_sampler_oracle.py). ComfyUI's callback k holds the VP latent x/√(1 + σ_k²) at σ_k and the x0
estimate at σ_k; our event j is the move σ_j → σ_{j+1} (see cascade_lab/diffusion/ksamplers/unipc.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cascade_lab.diffusion import ksamplers
from cascade_lab.diffusion.samplers import Cancelled, StepEvent

sys.path.insert(0, str(Path(__file__).parent))
from ksampler_toy import ToyDenoiser, close, load_oracle  # noqa: E402

DATA = Path(__file__).parent / "data" / "ksamplers_unipc.safetensors"
NAMES = ["uni_pc", "uni_pc_bh2"]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_oracle(DATA)


def schedule(reference: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the schedule a caller passes, ending at 0; the σ UniPC ran at). ComfyUI's sample_unipc writes its 10⁻³
    into the schedule it was given, so the recorded `sigmas` already end at 10⁻³."""
    ran = reference[f"{name}.sigmas"]
    assert ran[-1].item() == pytest.approx(1e-3)
    given = ran.clone()
    given[-1] = 0.0
    return given, ran



@pytest.mark.parametrize("name", NAMES)
def test_matches_comfyui_step_by_step(name: str, reference: dict[str, torch.Tensor]) -> None:
    sigmas, ran = schedule(reference, name)
    n = len(sigmas) - 1
    denoiser, events = ToyDenoiser(), []
    given = sigmas.clone()
    final = getattr(ksamplers, f"sample_{name}")(denoiser, reference[f"{name}.x_init"].clone(), given,
                                                 callback=events.append)
    assert torch.equal(given, sigmas), "the caller's schedule was written into"
    assert denoiser.calls == n
    assert [e.step for e in events] == list(range(n))
    assert [(e.sigma, e.sigma_next) for e in events] == [(float(sigmas[j]), float(sigmas[j + 1])) for j in range(n)]
    for e in events:
        # x0: the estimate at σ_j the move started from, which ComfyUI's callback j reports
        close(e.x0, reference[f"{name}.step{e.step:02d}.denoised"], f"{name} step {e.step} x0")
        # x: after the move, in VE scale; ComfyUI shows it (VP) as callback j + 1, except that its last callback
        # makes the last two moves at once and shows only the result
        k = e.step + 1 if e.step + 1 < n - 1 else n - 1 if e.step == n - 1 else None
        if k is not None:
            expected = reference[f"{name}.step{k:02d}.x"] * (1 + ran[e.step + 1] ** 2) ** 0.5
            close(e.x, expected, f"{name} x after step {e.step}")
    assert torch.equal(events[-1].x, final)
    close(final, reference[f"{name}.final"], f"{name} final")


@pytest.mark.parametrize("name", NAMES)
def test_a_final_sigma_of_zero_runs_as_a_thousandth(name: str, reference: dict[str, torch.Tensor]) -> None:
    sigmas, ran = schedule(reference, name)
    fn, x = getattr(ksamplers, f"sample_{name}"), reference[f"{name}.x_init"]
    assert torch.equal(fn(ToyDenoiser(), x.clone(), sigmas), fn(ToyDenoiser(), x.clone(), ran))


def test_the_two_variants_differ(reference: dict[str, torch.Tensor]) -> None:
    sigmas, _ = schedule(reference, "uni_pc")
    x = reference["uni_pc.x_init"]
    a = ksamplers.sample_uni_pc(ToyDenoiser(), x.clone(), sigmas)
    b = ksamplers.sample_uni_pc_bh2(ToyDenoiser(), x.clone(), sigmas)
    assert not torch.allclose(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_one_step_is_a_first_order_move(name: str, reference: dict[str, torch.Tensor]) -> None:
    """ComfyUI takes no step on a one-step schedule (order min(3, n − 1) = 0); we take the DDIM move to 10⁻³."""
    x, sigma = reference[f"{name}.x_init"], reference[f"{name}.sigmas"][0]
    denoiser, events = ToyDenoiser(), []
    out = getattr(ksamplers, f"sample_{name}")(denoiser, x.clone(), torch.stack([sigma, sigma * 0]),
                                               callback=events.append)
    x0 = ToyDenoiser()(x, sigma.expand(x.shape[0]))
    assert denoiser.calls == 1 and [e.step for e in events] == [0]
    torch.testing.assert_close(out, x0 + 1e-3 / sigma * (x - x0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_cancel_between_steps_keeps_the_newest_x0(name: str, reference: dict[str, torch.Tensor]) -> None:
    denoiser, seen = ToyDenoiser(), []

    def note(event: StepEvent) -> None:
        seen.append(event.step)

    with pytest.raises(Cancelled) as info:
        getattr(ksamplers, f"sample_{name}")(denoiser, reference[f"{name}.x_init"].clone(),
                                             reference[f"{name}.sigmas"], callback=note, cancel=lambda: len(seen) == 3)
    assert info.value.step == 3 and seen == [0, 1, 2] and denoiser.calls == 4
    close(info.value.x0, reference[f"{name}.step03.denoised"], "x0 at cancel")
