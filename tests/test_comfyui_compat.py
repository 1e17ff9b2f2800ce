"""compat="comfyui" and the generation API it brought: sizes, seeding, noise injection, prompt lists, CFG pairs,
denoise, and the errors for bad input before any model loads (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_lab import Cascade
from cascade_lab.diffusion import cosine
from cascade_lab.diffusion import guidance as guidance_module
from cascade_lab.diffusion.guidance import step_t_lookup
from cascade_lab.diffusion.noise import ComfyNoise, OfficialNoise, RecordedNoise
from cascade_lab.params import GenerationParams

SMALL = dict(width=128, height=128, steps_c=3, steps_b=2)


@pytest.fixture(scope="module")
def cascade() -> Cascade:
    return Cascade("tiny")


@pytest.mark.parametrize(("size", "official", "comfy"), [
    ((1024, 1024), (24, 24), (24, 24)),
    ((832, 1216), (29, 20), (28, 19)),  # width × height; (h, w) latents
    ((1152, 896), (21, 27), (21, 27)),
    ((1536, 640), (15, 36), (15, 36)),
])  # fmt: skip
def test_latent_sizes_official_ceil_and_comfyui_floor(size, official, comfy) -> None:  # type: ignore[no-untyped-def]
    w, h = size
    assert GenerationParams("x", width=w, height=h).latent_size_c == official
    assert GenerationParams("x", width=w, height=h, compat="comfyui", compression=42).latent_size_c == comfy


def test_comfyui_sizes_differ_for_about_half_of_the_sizes() -> None:
    """The issue's count: 115 of the 225 sizes from 256 to 2048 in steps of 8 get another Stage C side."""
    sizes = range(256, 2049, 8)
    differ = sum(GenerationParams("x", width=s, height=s).latent_size_c[0]
                 != GenerationParams("x", width=s, height=s, compat="comfyui", compression=42).latent_size_c[0]
                 for s in sizes)
    assert (len(sizes), differ) == (225, 115)


def test_comfy_noise_is_comfyuis_seeding() -> None:
    source = ComfyNoise(314307448448003, seed_b=7)
    torch.manual_seed(314307448448003)
    expected = torch.randn(2, 16, 4, 4)  # ComfyUI: global manual_seed, one draw for the whole batch
    assert torch.equal(source.initial("c", (2, 16, 4, 4)), expected)
    torch.manual_seed(7)
    assert torch.equal(source.initial("b", (1, 4, 8, 8)), torch.randn(1, 4, 8, 8))
    steps = source.steps("c")
    g = torch.Generator().manual_seed(314307448448003 + 1)  # k-diffusion's CPU noise sampler: seed + 1
    like = torch.empty(2, 16, 4, 4)
    assert torch.equal(steps(like), torch.randn(2, 16, 4, 4, generator=g))
    assert torch.equal(steps(like), torch.randn(2, 16, 4, 4, generator=g))


def test_compat_comfyui_defaults_and_png_record(cascade) -> None:  # type: ignore[no-untyped-def]
    result = cascade.generate("a red circle", seed=3, compat="comfyui", **SMALL)
    p = result.params
    assert (p.compat, p.sampler_c, p.scheduler_c, p.sampler_b, p.compression, p.cfg_rho) == \
        ("comfyui", "euler_ancestral", "simple", "euler_ancestral", 42.0, 0.0)
    assert result.latent_c.shape == (1, 16, 3, 3)  # 128 // 42
    again = cascade.run(p)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    official = cascade.generate("a red circle", seed=3, **SMALL)
    assert not torch.equal(official.latent_c, result.latent_c)


def test_comfyui_stage_c_is_comfyuis_initial_noise_through_euler_ancestral(monkeypatch, cascade) -> None:  # type: ignore[no-untyped-def]
    seen = []
    original = cascade.pipeline.sample_stage

    def spy(name, model, dtype, plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((name, plan))
        return original(name, model, dtype, plan, *args, **kwargs)

    monkeypatch.setattr(cascade.pipeline, "sample_stage", spy)
    cascade.generate("x", seed=11, seed_b=12, compat="comfyui", **SMALL)
    (c_name, plan_c), (b_name, plan_b) = seen
    assert plan_c.sampler.name == "comfyui.euler_ancestral" and plan_c.sampler.space == "sigma"
    torch.manual_seed(11)
    assert torch.equal(plan_c.z, torch.randn(1, 16, 3, 3))
    torch.manual_seed(12)
    assert torch.equal(plan_b.z, torch.randn(1, 4, 32, 32))
    assert float(plan_c.sigmas[0]) == pytest.approx(99.995, rel=1e-5) and float(plan_c.sigmas[-1]) == 0
    # max denoise: x = noise·√(1 + σ0²)
    torch.testing.assert_close(plan_c.start_ve(), plan_c.z * (1 + plan_c.sigmas[0] ** 2).sqrt())


def test_initial_noise_and_noise_sources_are_used(cascade) -> None:  # type: ignore[no-untyped-def]
    base = cascade.generate("x", seed=5, **SMALL)
    z = torch.randn(1, 16, 3, 3, generator=torch.Generator().manual_seed(99))
    given = cascade.generate("x", seed=5, initial_noise=z, **SMALL)
    assert not torch.equal(given.latent_c, base.latent_c)
    again = cascade.generate("x", seed=5, initial_noise={"c": z}, **SMALL)
    assert torch.equal(again.latent_c, given.latent_c)
    # the official source for the seed reproduces the default stream exactly
    same = cascade.generate("x", seed=5, noise=OfficialNoise(5), **SMALL)
    assert torch.equal(same.latent_c, base.latent_c)
    # recorded per-step noise replays: all-zero step noise is a valid (deterministic) stream
    zero_steps = RecordedNoise(initial={"c": z, "b": torch.zeros(1, 4, 32, 32)},
                               steps={"c": [torch.zeros(1, 16, 3, 3)] * 3, "b": [torch.zeros(1, 4, 32, 32)] * 2})
    a = cascade.generate("x", seed=5, noise=zero_steps, **SMALL)
    assert torch.isfinite(a.latent_c).all()
    with pytest.raises(ValueError, match="initial noise for stage C has shape"):
        cascade.generate("x", seed=5, initial_noise=torch.zeros(1, 16, 4, 4), **SMALL)
    with pytest.raises(TypeError, match="NoiseSource"):
        cascade.generate("x", seed=5, noise="comfyui", **SMALL)


def test_a_list_of_prompts_is_one_prompt_per_image(monkeypatch, cascade) -> None:  # type: ignore[no-untyped-def]
    seen = []
    encoder = cascade.pipeline.stages.text_encoder
    original = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda prompts: seen.append(list(prompts)) or original(prompts))
    result = cascade.generate(["a red circle", "a blue square"], ["ugly", "blurry"], seed=1, **SMALL)
    assert seen == [["a red circle", "a blue square", "ugly", "blurry"]]
    assert len(result.images) == 2 and result.params.batch_size == 2
    assert result.params.prompts == ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match="list of 2 prompts but batch_size=3"):
        cascade.generate(["a", "b"], batch_size=3, **SMALL)


def test_cfg_pair_follows_the_steps_linspace_t(monkeypatch, cascade) -> None:  # type: ignore[no-untyped-def]
    """GDF.sample: cfg = a·t_i + b·(1 − t_i) with t_i = linspace(1, 0, steps + 1)[i], not the model's r."""
    ts = []
    original = guidance_module.guidance_scale
    monkeypatch.setattr(guidance_module, "guidance_scale", lambda cfg, t: ts.append(t) or original(cfg, t))
    cascade.generate("x", seed=1, cfg_c=(8.0, 2.0), cfg_b=1.0, width=128, height=128, steps_c=4, steps_b=1)
    assert ts == pytest.approx([1.0, 0.75, 0.5, 0.25])
    levels = cosine(20, shift=2.0)
    lookup = step_t_lookup(levels, torch.linspace(1, 0, 21, dtype=torch.float64))
    assert [lookup(v) for v in levels] == pytest.approx(torch.linspace(1, 0, 21).tolist(), abs=1e-7)


def test_denoise_is_comfyuis_partial_schedule(monkeypatch, cascade) -> None:  # type: ignore[no-untyped-def]
    seen = []
    original = cascade.pipeline.sample_stage

    def spy(name, model, dtype, plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(plan)
        return original(name, model, dtype, plan, *args, **kwargs)

    monkeypatch.setattr(cascade.pipeline, "sample_stage", spy)
    image = torch.rand(1, 3, 128, 128)
    cascade.generate("x", image=image, denoise=0.6, seed=1, compat="comfyui", width=128, height=128, steps_c=20,
                     steps_b=1)
    from cascade_lab.diffusion.sigma_schedules import simple

    assert torch.equal(seen[0].sigmas, simple(33, shift=2.0)[-21:])  # int(20 / 0.6) = 33, last 21 values
    assert seen[0].latent is not None and not seen[0].max_denoise()


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"compat": "comfyui", "sampler_c": "nope"}, "unknown sampler 'nope'; available under compat='comfyui': .*heun"),
    ({"compat": "comfyui", "scheduler_b": "nope"}, "unknown scheduler 'nope'; available under .*simple"),
    ({"denoise": 0}, "denoise=0: use a value in \\(0, 1\\]"),
    ({"denoise": 1.5}, "denoise=1.5"),
    ({"denoise": float("nan")}, "denoise=nan"),
    ({"compat": "comfyui", "compression": 200}, "compression=200 makes the Stage C latent"),
    ({"compression": 0}, "compression=0"),
    ({"compat": "comfy"}, "compat='comfy'"),
    ({"cfg_c": (4.0, float("inf"))}, "cfg_c=\\(4.0, inf\\)"),
    ({"strength": 0.5, "denoise": 0.5, "image": torch.rand(1, 3, 8, 8)}, "give one of the two"),
    ({"scheduler_c": "simple", "strength": 0.5, "image": torch.rand(1, 3, 8, 8)}, "needs a logSNR scheduler"),
])  # fmt: skip
def test_bad_input_fails_before_any_model_loads(monkeypatch, kwargs, words) -> None:  # type: ignore[no-untyped-def]
    c = Cascade("tiny")
    if "needs a logSNR" not in words:  # that one is decided when the stage is planned, still before sampling
        monkeypatch.setattr(Cascade, "_load", lambda self: pytest.fail("models loaded before the input check"))
    with pytest.raises((ValueError, KeyError), match=words):
        c.generate("x", width=128, height=128, seed=1, **kwargs)


def test_comfyui_img2img_takes_its_sizes_from_the_image(cascade) -> None:  # type: ignore[no-untyped-def]
    """StableCascade_StageC_VAEEncode: Stage C (H // c, W // c), Stage B (H // 8)·2 — a 200×150 input gives 200×144."""
    image = torch.rand(1, 3, 150, 200)
    result = cascade.generate("x", image=image, denoise=0.6, seed=2, compat="comfyui", compression=32, steps_c=4,
                              steps_b=1)
    assert (result.params.width, result.params.height) == (200, 150)
    assert result.latent_c.shape == (1, 16, 4, 6) and result.latent_b.shape == (1, 4, 36, 50)
    assert result.images[0].size == (200, 144)
