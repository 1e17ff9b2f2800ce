"""Every KSampler run of ../shared/reference/comfyui/sampling/, replayed with cascade_lab's ComfyUI family.

Each case runs the real tiny Stage C (or B) through `Pipeline.sample_stage` with a `plan_stage` made exactly as
`Pipeline.run` makes it under ``compat="comfyui"``: ComfyUI's seeding (the initial noise and the per-step stream
of the seed, the Brownian tree of the SDE sampler), its σ schedules and denoise, and its model call. The recorded
per-step noise is NOT fed in: our noise source must draw it. Tolerance: the README's, relative to each tensor's
absmax.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import reference_dir

sys.path.insert(0, str(Path(__file__).parent))
from comfy_models import assert_rel, comfy_pipeline, load, reference_tables  # noqa: E402,F401

from cascade_lab.diffusion.noise import ComfyNoise  # noqa: E402
from cascade_lab.pipeline import plan_stage  # noqa: E402
from cascade_lab.plugins import get_sampler, get_scheduler  # noqa: E402

CASES = ("c_euler_ancestral_simple_1024", "c_euler_ancestral_simple_832x1216_b2", "c_euler_normal",
         "c_dpmpp_2m_karras", "c_dpmpp_2m_sde_exponential", "c_lcm_sgm_uniform", "c_ddim_ddim_uniform",
         "c_heun_beta", "c_uni_pc_simple", "c_img2img_denoise0.6", "b_euler_ancestral_simple")



@pytest.fixture(scope="module")
def cases() -> dict:
    return json.loads((reference_dir("comfyui", "sampling") / "cases.json").read_text())["cases"]  # type: ignore


@pytest.fixture(scope="module")
def conditioning() -> dict[str, torch.Tensor]:
    return load(reference_dir("comfyui", "sampling") / "conditioning.safetensors")


pytestmark = pytest.mark.usefixtures("reference_tables")  # the reference σ tables for every test here


@pytest.fixture(scope="module")
def pipeline(conditioning):  # type: ignore[no-untyped-def]
    return comfy_pipeline({"pos": (conditioning["positive"], conditioning["positive_pooled"]),
                           "neg": (conditioning["negative"], conditioning["negative_pooled"])})


def window(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The stored per-step window [..., :4, :4] of a large latent, or the tensor itself."""
    return t[..., : like.shape[-2], : like.shape[-1]] if t.shape != like.shape else t


@pytest.mark.reference
@pytest.mark.parametrize("name", CASES)
def test_ksampler_case_replays(name, cases, conditioning, pipeline) -> None:  # type: ignore[no-untyped-def]
    case = cases[name]
    s = case["settings"]
    ref = load(reference_dir("comfyui", "sampling") / f"{name}.safetensors")
    stage = s["stage"]
    shape = tuple(ref["noise_initial"].shape)
    B = shape[0]
    sampler, scheduler = get_sampler(s["sampler"], "comfyui"), get_scheduler(s["scheduler"], "comfyui")
    latent = ref.get("latent_image")
    plan = plan_stage(sampler, scheduler, s["steps"], 2.0 if stage == "c" else 1.0, s["denoise"], 1.0,
                      ComfyNoise(s["seed"]), stage, shape, latent, "comfyui")
    # the seed's initial noise and the KSampler's schedule
    assert torch.equal(plan.z, ref["noise_initial"]), "initial noise differs from ComfyUI's for the seed"
    torch.testing.assert_close(plan.sigmas, ref["sigmas"], atol=0, rtol=1e-6)
    # schedules computed from σ(t) rather than table entries (normal, sgm_uniform) carry the same last-bit
    # libm differences as the table (see use_reference_sigma_tables): replay from the KSampler's exact σ
    plan = dataclasses.replace(plan, sigmas=ref["sigmas"].clone())

    if stage == "c":
        cond = {"clip_text": conditioning["positive"].expand(B, -1, -1),
                "clip_text_pooled": conditioning["positive_pooled"].view(1, 1, -1).expand(B, -1, -1),
                "clip_img": torch.zeros(B, 1, 768)}
        uncond = {"clip_text": conditioning["negative"].expand(B, -1, -1),
                  "clip_text_pooled": conditioning["negative_pooled"].view(1, 1, -1).expand(B, -1, -1),
                  "clip_img": torch.zeros(B, 1, 768)}
        model, cfg_rho = pipeline.stages.stage_c, 0.0
    else:
        prior = ref["stage_c_prior"]
        cond = {"effnet": prior, "clip": conditioning["positive_pooled"].view(1, 1, -1)}
        uncond = {"effnet": torch.zeros_like(prior), "clip": conditioning["negative_pooled"].view(1, 1, -1)}
        model, cfg_rho = pipeline.stages.stage_b, 0.0
    events = []
    final = pipeline.sample_stage(stage, model, torch.float32, plan, cond, uncond, cfg=s["cfg"], cfg_rho=cfg_rho,
                                  callback=events.append, cancel=None, trajectory=None)
    assert len(events) == case["meta"]["n_callbacks"] == s["steps"]
    for i, event in enumerate(events):
        expected = ref[f"step{i:02d}.denoised"]
        assert_rel(window(event.x0, expected), expected, f"step {i} denoised")
        if s["sampler"] != "uni_pc" and f"step{i + 1:02d}.x" in ref:  # x at the start of the next step
            expected = ref[f"step{i + 1:02d}.x"]
            assert_rel(window(event.x, expected), expected, f"step {i + 1} x")
    expected_final = ref["final"] if stage == "c" else ref["final"] * torch.tensor(1 / 0.43)
    assert_rel(final, expected_final, "final latent")
