"""Replay the official GDF.sample trajectories (reference/gdf/sampling_stage_c_tiny.*) with recorded noise.

A fake model hands back the recorded raw output of each step, so this checks the schedule, CFG batching,
lerp + rescale, x0 recovery and the sampler steps. The end-to-end test runs the real tiny Stage C instead.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_fixture, reference_dir

from cascade_lab.diffusion import (
    GuidedDenoiser,
    cfg_combine,
    cosine,
    diffuse,
    replay_noise,
    sample_ddim,
    sample_ddpm,
)

KEYS = ("clip_text", "clip_text_pooled", "clip_img")
SAMPLERS = {"DDPMSampler(gdf)": sample_ddpm, "DDIMSampler(gdf)": sample_ddim}
RUNS = ("ddpm_cfg4", "ddpm_nocfg", "ddim_cfg4", "img2img")


@pytest.fixture(scope="module")
def ref() -> tuple[dict, dict]:
    from safetensors.torch import load_file

    d = reference_dir("gdf")
    meta = json.loads((d / "sampling_stage_c_tiny.json").read_text())
    tensors = {k: v.clone() for k, v in load_file(str(d / "sampling_stage_c_tiny.safetensors")).items()}
    return {r["name"]: r for r in meta["runs"]}, tensors


def assert_rel(actual, expected, what):
    """reference/README.md: atol = 1e-4 · absmax(T), rtol 1e-4."""
    torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4, msg=what)


def setup_run(run, meta, d):
    """(sampler, denoiser kwargs, starting x, levels, step noise) of one recorded run."""
    kw = meta[run]["gdf_sample_kwargs"]
    levels = cosine(kw["timesteps"], shift=kw["shift"], t_start=kw["t_start"], t_end=kw["t_end"])
    assert_rel(levels, d[f"{run}.logSNR_range"], "levels")
    cond = {k: d[f"cond.{k}"] for k in KEYS}
    uncond = {k: d[f"uncond.{k}"] for k in KEYS} if kw["unconditional_inputs"] else None
    guidance = dict(cond=cond, uncond=uncond, cfg=kw["cfg"], cfg_rho=kw["cfg_rho"])
    noises = [d[n["name"]] for n in meta[run]["noise_in_call_order"]]
    if kw["x_init"] is None:
        x, step_noise = noises[0], noises[1:]
    else:  # img2img: noise_00 is diffuse's epsilon at t = 0.8, shift 1 (as the notebook)
        x = diffuse(d["img2img.x0_given"], t=d["img2img.diffuse_t"], shift=1, epsilon=noises[0]).noised
        assert_rel(x, d["img2img.x_init"], "x_init")
        step_noise = noises[1:]
    assert len(step_noise) == kw["timesteps"]  # one draw per step, even for DDIM (eta 0)
    return SAMPLERS[kw["sampler"]], guidance, x, levels, step_noise


@pytest.mark.parametrize("run", RUNS)
def test_replay_with_recorded_model_outputs(ref, run):
    meta, d = ref
    sampler, guidance, x, levels, step_noise = setup_run(run, meta, d)
    calls: list[int] = []

    def fake_model(x_in, r, **inputs):
        i = len(calls)
        calls.append(i)
        torch.testing.assert_close(r, d[f"{run}.step{i}.model_r"], atol=1e-6, rtol=0)
        out = d[f"{run}.step{i}.model_out"]
        assert x_in.shape[0] == out.shape[0] == r.shape[0]
        for k in KEYS:
            assert inputs[k].shape[0] == out.shape[0], k  # cond (+ uncond) batched in one call
        return out

    events = []
    final = sampler(GuidedDenoiser(fake_model, **guidance), x, levels, noise=replay_noise(step_noise),
                    callback=events.append)
    steps = len(levels) - 1
    assert len(calls) == len(events) == steps
    for i, ev in enumerate(events):
        assert (ev.step, ev.steps) == (i, steps)
        assert_rel(ev.x0, d[f"{run}.step{i}.x0"], f"step{i}.x0")
        assert_rel(ev.x, d[f"{run}.step{i}.x"], f"step{i}.x")
    assert_rel(final, d[f"{run}.final_x0"], "final_x0")


@pytest.mark.parametrize("run", RUNS)
def test_guided_prediction_per_step(ref, run):
    meta, d = ref
    kw = meta[run]["gdf_sample_kwargs"]
    for i in range(kw["timesteps"]):
        out = d[f"{run}.step{i}.model_out"]
        pred = cfg_combine(*out.chunk(2), kw["cfg"], kw["cfg_rho"]) if kw["cfg"] is not None else out
        assert_rel(pred, d[f"{run}.step{i}.pred"], f"step{i}.pred")


@pytest.mark.parametrize("run", RUNS)
def test_end_to_end_with_tiny_stage_c(ref, run):
    """The same runs with the real stage_c_tiny fixture model instead of recorded outputs."""
    from cascade_lab.models.stage_c import StageC

    cfg, weights, _ = load_fixture("stage_c_tiny")
    model = StageC(**cfg["kwargs"])
    model.load_state_dict(weights, strict=True)
    model.eval()
    meta, d = ref
    sampler, guidance, x, levels, step_noise = setup_run(run, meta, d)
    events = []
    final = sampler(GuidedDenoiser(model, **guidance), x, levels, noise=replay_noise(step_noise),
                    callback=events.append)
    for i, ev in enumerate(events):
        assert_rel(ev.x0, d[f"{run}.step{i}.x0"], f"step{i}.x0")
        assert_rel(ev.x, d[f"{run}.step{i}.x"], f"step{i}.x")
    assert_rel(final, d[f"{run}.final_x0"], "final_x0")
