"""The three-stage pipeline and the Cascade API on the tiny variant: every sampler x scheduler, seeds,
PNG metadata, img2img, variations, cancel, and input checks before any model loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_lab import plugins
from cascade_lab.api import Cascade
from cascade_lab.params import GenerationParams, read_png_params
from cascade_lab.pipeline import Cancelled, CancelToken, Pipeline

SMALL = {"width": 128, "height": 128, "steps_c": 2, "steps_b": 2}


@pytest.fixture(scope="module")
def cascade() -> Cascade:
    c = Cascade("tiny")
    c.pipeline  # build once for the module  # noqa: B018
    return c


def pixels(result) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([np.asarray(im) for im in result.images])


SAMPLERS, SCHEDULERS = plugins.registries()["sampler"].names(), plugins.registries()["scheduler"].names()
# every sampler with one scheduler of each family (logSNR "cosine", σ "simple"), and every scheduler with one
# sampler of each family: the pipeline converts latents and levels between the two conventions
PAIRS = sorted({(s, k) for s in SAMPLERS for k in ("cosine", "simple")}
               | {(s, k) for s in ("ddpm", "comfyui.euler_ancestral") for k in SCHEDULERS})


def test_all_builtin_samplers_and_schedulers_are_registered() -> None:
    samplers, schedulers = set(SAMPLERS), set(SCHEDULERS)
    assert {"ddpm", "ddim", "lcm", "euler", "euler_ancestral", "dpmpp_2m"} <= samplers
    assert {"cosine", "karras", "exponential"} <= schedulers


@pytest.mark.parametrize(("sampler", "scheduler"), PAIRS)
def test_every_sampler_with_every_scheduler_makes_finite_images(cascade, sampler, scheduler) -> None:  # type: ignore[no-untyped-def]
    result = cascade.generate("a red circle", width=128, height=192, seed=0, steps_c=3, steps_b=2,
                              sampler_c=sampler, sampler_b=sampler, scheduler_c=scheduler, scheduler_b=scheduler)
    image = pixels(result)
    assert image.shape == (1, 192, 128, 3)
    assert result.latent_c.shape == (1, 16, 5, 3) and result.latent_b.shape == (1, 4, 48, 32)
    assert torch.isfinite(result.latent_c).all() and torch.isfinite(result.latent_b).all()


def test_same_seed_same_pixels_other_seed_other_pixels(cascade) -> None:  # type: ignore[no-untyped-def]
    a = cascade.generate("a blue square", seed=11, batch_size=2, **SMALL)
    b = cascade.generate("a blue square", seed=11, batch_size=2, **SMALL)
    c = cascade.generate("a blue square", seed=12, batch_size=2, **SMALL)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    assert torch.equal(a.latent_c, b.latent_c) and not torch.equal(a.latent_c[0], a.latent_c[1])


def test_seed_is_recorded_when_not_given(cascade) -> None:  # type: ignore[no-untyped-def]
    a = cascade.generate("x", **SMALL)
    assert isinstance(a.params.seed, int)
    assert np.array_equal(pixels(cascade.run(a.params)), pixels(a))


def test_initial_noise_is_drawn_on_the_cpu_from_the_seed(monkeypatch, cascade) -> None:  # type: ignore[no-untyped-def]
    seen = []
    original = cascade.pipeline.sample_stage

    def spy(name, model, dtype, plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((name, plan.start_vp().clone()))
        return original(name, model, dtype, plan, *args, **kwargs)

    monkeypatch.setattr(cascade.pipeline, "sample_stage", spy)
    cascade.generate("x", seed=5, **SMALL)
    expected = torch.randn((1, 16, 3, 3), generator=torch.Generator().manual_seed(5))
    assert seen[0][0] == "c" and torch.equal(seen[0][1], expected)
    assert seen[1][0] == "b" and seen[1][1].shape == (1, 4, 32, 32)


def test_stage_b_gets_the_stage_c_result_and_zeros_for_uncond(monkeypatch, cascade) -> None:  # type: ignore[no-untyped-def]
    calls = []
    original = cascade.pipeline.sample_stage

    def spy(name, model, dtype, plan, cond, uncond, **kwargs):  # type: ignore[no-untyped-def]
        out = original(name, model, dtype, plan, cond, uncond, **kwargs)
        calls.append((name, cond, uncond, out, kwargs["cfg"]))
        return out

    monkeypatch.setattr(cascade.pipeline, "sample_stage", spy)
    cascade.generate("x", "ugly", seed=1, **SMALL)
    (_, cond_c, uncond_c, latent_c, cfg_c), (_, cond_b, uncond_b, _, cfg_b) = calls
    assert (cfg_c, cfg_b) == (4.0, 1.1)
    assert torch.equal(cond_b["effnet"], latent_c) and not uncond_b["effnet"].any()
    assert torch.equal(cond_b["clip"], cond_c["clip_text_pooled"])
    assert torch.equal(uncond_b["clip"], uncond_c["clip_text_pooled"])
    assert not cond_c["clip_img"].any() and cond_c["clip_img"].shape == (1, 1, 12)


def test_png_carries_parameters_and_regenerates_the_same_pixels(cascade, tmp_path) -> None:  # type: ignore[no-untyped-def]
    prompt = 'a "quoted" {braced} $dollar prompt — non-ASCII ✓'
    result = cascade.generate(prompt, "neg", seed=3, sampler_c="euler", **SMALL)
    [path] = result.save(tmp_path / "out.png")
    params = read_png_params(path)
    assert params == result.params and params.prompt == prompt and params.variant == "tiny"
    again = cascade.run(params)
    assert np.array_equal(pixels(again), pixels(result))
    batch = cascade.generate("x", seed=3, batch_size=2, **SMALL).save(tmp_path / "b.png")
    assert [p.name for p in batch] == ["b_0.png", "b_1.png"] and read_png_params(batch[1]).batch_size == 2


def test_rich_display_is_png_with_metadata(cascade) -> None:  # type: ignore[no-untyped-def]
    bundle = cascade.generate("x", seed=1, **SMALL)._repr_mimebundle_()
    assert bundle["image/png"].startswith(b"\x89PNG") and b"cascade_lab" in bundle["image/png"]
    assert "seed 1" in bundle["text/plain"]


def test_img2img_starts_from_the_image(cascade) -> None:  # type: ignore[no-untyped-def]
    source = cascade.generate("x", seed=1, **SMALL)
    low = cascade.img2img(source.image, "x", strength=0.3, seed=2, width=128, height=128, steps_c=4, steps_b=2)
    assert low.params.init_image.startswith("sha256:") and low.params.strength == 0.3
    encoded = cascade.encode_image(source.image)
    assert encoded.shape == (1, 16, 3, 3)
    # low strength stays nearer the encoded image than high strength (same noise seed)
    high = cascade.img2img(source.image, "x", strength=1.0 - 1e-6, seed=2, width=128, height=128, steps_c=4,
                           steps_b=2)
    assert (low.latent_c - encoded).abs().mean() < (high.latent_c - encoded).abs().mean()


def test_img2img_follows_the_official_step_count(monkeypatch, cascade) -> None:  # type: ignore[no-untyped-def]
    levels_seen = []
    original = cascade.pipeline.sample_stage

    def spy(name, model, dtype, plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        levels_seen.append(plan.levels)
        return original(name, model, dtype, plan, *args, **kwargs)

    monkeypatch.setattr(cascade.pipeline, "sample_stage", spy)
    cascade.img2img(torch.rand(1, 3, 128, 128), "x", strength=0.8, seed=1, width=128, height=128, steps_c=20,
                    steps_b=1)
    from cascade_lab.diffusion import cosine

    assert len(levels_seen[0]) == 17  # int(20 * 0.8) = 16 steps from t_start 0.8 at shift 2
    assert torch.allclose(levels_seen[0], cosine(16, shift=2.0, t_start=0.8))


def test_variations_feed_weighted_clip_img(monkeypatch, cascade) -> None:  # type: ignore[no-untyped-def]
    seen = {}
    original = cascade.pipeline.sample_stage

    def spy(name, model, dtype, plan, cond, uncond, **kwargs):  # type: ignore[no-untyped-def]
        seen.setdefault(name, (cond, uncond))
        return original(name, model, dtype, plan, cond, uncond, **kwargs)

    monkeypatch.setattr(cascade.pipeline, "sample_stage", spy)
    images = [torch.rand(1, 3, 64, 80), torch.rand(1, 3, 96, 96)]
    result = cascade.generate("x", seed=1, variations=images, variation_weights=[1.0, 0.5], batch_size=2, **SMALL)
    cond, uncond = seen["c"]
    assert cond["clip_img"].shape == (2, 2, 12) and not uncond["clip_img"].any()
    embeds = cascade.pipeline.stages.image_encoder.encode(images).float()  # [2, 1, 12]
    torch.testing.assert_close(cond["clip_img"][0, 1], embeds[1, 0] * 0.5)
    assert [w for _, w in result.params.variations] == [1.0, 0.5]


def test_cancel_stops_within_one_step(cascade) -> None:  # type: ignore[no-untyped-def]
    token = CancelToken()
    steps = []

    def on_step(event):  # type: ignore[no-untyped-def]
        steps.append((event.stage, event.step))
        if event.step == 1:
            token.cancel()

    with pytest.raises(Cancelled):
        cascade.generate("x", seed=1, width=128, height=128, steps_c=6, steps_b=2, callback=on_step, cancel=token)
    assert steps == [("c", 0), ("c", 1)]


def test_events_and_trajectory(cascade) -> None:  # type: ignore[no-untyped-def]
    events = []
    result = cascade.generate("x", seed=1, keep_trajectory=True, callback=events.append, **SMALL)
    assert [(e.stage, e.step, e.steps) for e in events] == [("c", 0, 2), ("c", 1, 2), ("b", 0, 2), ("b", 1, 2)]
    assert len(result.trajectory_c) == 2 and torch.equal(result.trajectory_c[-1], result.latent_c)
    assert cascade.preview(result.latent_c).shape == (1, 3, 24, 24)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"width": 100}, "width=100"),
    ({"steps_c": 0}, "steps_c=0"),
    ({"cfg_c": -1}, "cfg_c=-1"),
    ({"sampler_c": "nope"}, "unknown sampler 'nope'; available: .*ddim, ddpm"),
    ({"scheduler_b": "nope"}, "unknown scheduler 'nope'; available: .*cosine"),
    ({"variations": [torch.rand(1, 3, 8, 8)], "variation_weights": [1, 2]}, "1 variation image"),
    ({"image": "/no/such.png", "strength": 0.5}, "does not exist"),
])  # fmt: skip
def test_bad_input_fails_before_any_model_loads(monkeypatch, kwargs, words) -> None:  # type: ignore[no-untyped-def]
    c = Cascade("tiny")
    monkeypatch.setattr(Cascade, "_load", lambda self: pytest.fail("models loaded before the input check"))
    with pytest.raises((ValueError, KeyError, FileNotFoundError), match=words):
        c.generate("x", **kwargs)


def test_unknown_variant_lists_available() -> None:
    with pytest.raises(KeyError, match=r"unknown variant 'huge'; available: bf16, .*full, lite, lite_bf16, tiny"):
        Cascade("huge")


def test_stage_c_never_runs_in_fp16() -> None:
    with pytest.raises(ValueError, match="float16"):
        Cascade("tiny", dtype="float16")
    with pytest.raises(ValueError, match="bfloat16"):
        Pipeline(None, dtype_c=torch.float16)  # type: ignore[arg-type]


def test_negative_prompt_without_cfg_warns(cascade) -> None:  # type: ignore[no-untyped-def]
    with pytest.warns(UserWarning, match="negative prompt has no effect"):
        cascade.generate("x", "neg", seed=1, cfg_c=1.0, cfg_b=1.0, **SMALL)


def test_bf16_pipeline_runs(cascade) -> None:  # type: ignore[no-untyped-def]
    pipe = Pipeline(cascade.pipeline.stages, dtype_c=torch.bfloat16, dtype_b=torch.bfloat16)
    try:
        out = pipe.run(GenerationParams("x", seed=1, **SMALL))
        assert torch.isfinite(out.images).all()
    finally:
        for m in (cascade.pipeline.stages.stage_c, cascade.pipeline.stages.stage_b):
            m.float()


def test_lora_load_changes_the_image_and_unload_restores_it(cascade, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    rank, c = 4, 32  # tiny Stage C level 0 width
    tensors = {}
    for name in ("lora_unet_down_blocks_0_2_attention_attn_out_proj", "lora_unet_up_blocks_1_2_kv_mapper_1"):
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, c, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(c, rank, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    tensors["lora_unet_up_blocks_1_2_kv_mapper_1.lora_down.weight"] = torch.randn(rank, 40, generator=g)  # c_cond
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path))

    base_state = {k: v.clone() for k, v in cascade.pipeline.stages.stage_c.state_dict().items()}
    base = cascade.generate("x", seed=4, **SMALL)
    cascade.load_lora(path, 0.8)
    try:
        with pytest.raises(ValueError, match="already loaded"):
            cascade.load_lora(path)
        styled = cascade.generate("x", seed=4, **SMALL)
        assert styled.params.loras == ((str(path), 0.8),)
        assert not torch.equal(styled.latent_c, base.latent_c)
    finally:
        cascade.unload_lora(path)
    after = cascade.generate("x", seed=4, **SMALL)
    assert np.array_equal(pixels(after), pixels(base)) and after.params.loras == ()
    assert all(torch.equal(v, base_state[k]) for k, v in cascade.pipeline.stages.stage_c.state_dict().items())
    with pytest.raises(ValueError, match="is not loaded"):
        cascade.unload_lora(path)


def test_compile_option_reaches_both_networks_and_keeps_the_pixels(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`Cascade(compile=True)` / `cascade-lab generate --compile`: Stage C and B run compiled, same image."""
    from cascade_lab import cli
    from cascade_lab.models.common import LevelUNet

    compiled: list[str] = []
    original = LevelUNet.compile_denoiser

    def eager_compile(self, **options):  # type: ignore[no-untyped-def]
        compiled.append(type(self).__name__)
        original(self, backend="eager")  # the dynamo trace without a C++ toolchain: fast

    monkeypatch.setattr(LevelUNet, "compile_denoiser", eager_compile)
    kwargs = dict(seed=5, width=128, height=128, steps_c=2, steps_b=2)
    expected = Cascade("tiny").generate("a red circle", **kwargs)  # fresh: other tests use the shared one
    got = Cascade("tiny", compile=True).generate("a red circle", **kwargs)
    # the traced graph may order float sums differently: equal to float32 rounding, not bit for bit
    torch.testing.assert_close(got.latent_c, expected.latent_c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.latent_b, expected.latent_b, atol=1e-3, rtol=1e-3)
    assert compiled == ["StageC", "StageB"]
    seen: dict[str, object] = {}

    class Built(Exception):
        pass

    def record(variant: str, **options: object) -> None:
        seen.update(options, variant=variant)
        raise Built

    monkeypatch.setattr("cascade_lab.api.Cascade", record)
    with pytest.raises(Built):
        cli.generate(cli.build_parser().parse_args(["generate", "x", "-o", "x.png", "--variant", "tiny", "--compile"]))
    assert seen["compile"] is True and seen["variant"] == "tiny"


def test_tiny_effnet_is_built_on_first_use_and_kept() -> None:
    """Building the random EfficientNet is most of `build_tiny`'s time; generation never needs it."""
    from cascade_lab.models.tiny import build_tiny
    from cascade_lab.pipeline import Lazy

    stages = build_tiny()
    assert isinstance(stages.effnet, Lazy)
    first = stages.effnet.load()
    assert stages.effnet.load() is first and build_tiny().effnet.load() is not first  # kept, per build


def test_resident_keeps_a_stage_on_the_device_across_uses(monkeypatch, cascade) -> None:  # type: ignore[no-untyped-def]
    """`Pipeline.resident`: one trip to the device and back for many uses, a `Lazy` stage loaded once, back on
    the CPU after an exception too; the parts of `run` give run's images when called stage by stage."""
    from cascade_lab.pipeline import Lazy, Stages

    monkeypatch.setattr(Pipeline, "offloading", property(lambda self: self.offload))  # offload as on a GPU
    fake, cpu = torch.device("cpu", 0), torch.device("cpu")  # a pretend accelerator: the CPU under another name
    moves, loads = [], []

    class Recorded(torch.nn.Linear):
        def to(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            moves.append(torch.device(args[0]))
            return self

    def load() -> Recorded:
        loads.append(1)
        return Recorded(2, 2)

    pipeline = Pipeline(Stages(None, Lazy(load), None, None), device=fake, offload=True)
    with pipeline.resident("stage_b") as held:
        for _ in range(3):
            with pipeline.use(pipeline.stages.stage_b, torch.float32) as model:
                assert model is held
        with pipeline.resident("stage_b") as again:  # nested: the same model, no move
            assert again is held
        assert moves == [fake] and loads == [1]
    assert moves == [fake, cpu] and loads == [1]
    with pipeline.use(pipeline.stages.stage_b):  # outside: loaded and moved per use again
        pass
    assert moves == [fake, cpu, fake, cpu] and len(loads) == 2
    with pytest.raises(KeyError), pipeline.resident("stage_b"):
        raise KeyError("midway")
    assert moves[-2:] == [fake, cpu]
    with pipeline.resident("stage_a") as missing:
        assert missing is None
    with pytest.raises(ValueError, match="previewer"), pipeline.resident("previewer"):
        pass

    # the parts of `run`, stage by stage for two prompts, inside `resident`: run's pixels
    real = cascade.pipeline
    params = [GenerationParams(p, seed=s, **SMALL) for p, s in (("a cat", 1), ("a dog", 2))]
    jobs = [real.run_text(p) for p in params]
    with pytest.raises(ValueError, match="run_c"):
        real.run_b(jobs[0])
    with real.resident("stage_c"):
        for job in jobs:
            real.run_c(job)
    with real.resident("stage_b"):
        for job in jobs:
            real.run_b(job)
    with real.resident("stage_a"):
        outputs = [real.run_a(job) for job in jobs]
    for p, out in zip(params, outputs, strict=True):
        whole = real.run(p)
        assert torch.equal(out.images, whole.images) and torch.equal(out.latent_b, whole.latent_b)
        assert list(out.timings) == list(whole.timings) == ["text", "stage_c", "stage_b", "stage_a"]
