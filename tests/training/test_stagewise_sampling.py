"""Sample images stage by stage: in one sampling event each frozen model makes one trip to the device and back,
one at a time, also when the event fails midway, and the images are the ones `Pipeline.run` makes per prompt."""

from __future__ import annotations

import pytest
import torch
from training_helpers import Moves

from cascade_lab.models.tiny import build_tiny
from cascade_lab.params import GenerationParams
from cascade_lab.pipeline import Pipeline, Stages
from cascade_lab.results import to_pil
from cascade_lab.training.config import TrainConfig
from cascade_lab.training.data import derive_seed
from cascade_lab.training.models import build_models
from cascade_lab.training.sampling import SamplePrompt, _Placed, render_samples

pytest_plugins = ["training_fixtures"]  # fixtures: one_thread
pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
FAKE = torch.device("cpu", 0)  # a pretend accelerator: the CPU under another name, so the models run where they are
PROMPTS = [SamplePrompt("a red circle", width=128, height=128, steps=2, seed=5),
           SamplePrompt("a blue square", "red", width=256, height=128, steps=1, scale=2.0),
           SamplePrompt("a green triangle", width=128, height=192, steps=2, scale=1.0)]
FROZEN = {"c": ("text_encoder", "stage_b", "stage_a"), "b": ("text_encoder", "stage_c", "stage_a")}


def _models(stage: str, log: list | None = None):  # type: ignore[no-untyped-def]
    """The tiny models of a `stage` run; with `log`, its frozen sample models are `Moves` recorders at home on
    the CPU, writing their moves to `log`."""
    with torch.random.fork_rng(devices=[]):  # build_tiny seeds the global RNG
        stages = build_tiny(0)
    if log is not None:
        for name in FROZEN[stage]:
            setattr(stages, name, Moves(getattr(stages, name), home="cpu", log=log, name=name))
    return build_models(TrainConfig(train_data_dir="d", stage=stage), stages=stages)


@pytest.fixture
def fake_gpu(monkeypatch):  # type: ignore[no-untyped-def]
    """The pipeline offloads on FAKE as it does on a GPU (the condition reads the device type, which is cpu)."""
    monkeypatch.setattr(Pipeline, "offloading", property(lambda self: self.offload))


def _on_device_at_most_one(log: list) -> None:
    where: dict[str, torch.device] = {}
    for name, device in log:
        where[name] = device
        assert sum(d == FAKE for d in where.values()) <= 1, f"two frozen models on the device at once: {where}"


@pytest.mark.parametrize("stage", ["c", "b"])
def test_each_frozen_model_makes_one_trip_per_event(fake_gpu, stage) -> None:  # type: ignore[no-untyped-def]
    log: list = []
    models = _models(stage, log)
    weight = next(models.model.parameters())
    images = render_samples(PROMPTS, models.model, models, step=3, seed=0, device=FAKE, autocast_bf16=False,
                            full=True, out_dir=None, name="x", stage=stage)
    assert len(images) == 3 and all(s.image is not None for s in images)
    for name in FROZEN[stage]:
        assert models.get(name).moves == [FAKE, CPU], name
    # text encoder for every prompt, then the frozen stage, then Stage A: one frozen model on the device at a time
    assert log == [(n, d) for n in FROZEN[stage] for d in (FAKE, CPU)]
    _on_device_at_most_one(log)
    # the trained model is used where it is, never moved or copied
    assert next(models.model.parameters()) is weight and weight.device == CPU


def test_a_failure_midway_puts_every_model_back(fake_gpu, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    log: list = []
    models = _models("c", log)
    trained = models.model.train()
    real, calls = Pipeline.run_b, []

    def failing(self, job, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(job)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (pretend)")
        return real(self, job, **kwargs)

    monkeypatch.setattr(Pipeline, "run_b", failing)
    with pytest.raises(RuntimeError, match="pretend"):
        render_samples(PROMPTS, trained, models, step=3, seed=0, device=FAKE, autocast_bf16=False, full=True,
                       out_dir=None, name="x")
    assert len(calls) == 2  # Stage B was held for the prompts when the second one failed
    assert all(models.get(name).where == CPU for name in FROZEN["c"])
    assert log == [("text_encoder", FAKE), ("text_encoder", CPU), ("stage_b", FAKE), ("stage_b", CPU)]
    assert trained.training  # the modes restored too


def _per_prompt(prompts, trained, models, *, stage, seed, full):  # type: ignore[no-untyped-def]
    """The reference: each prompt through `Pipeline(offload=True).run` on its own (what sampling did before);
    previews alone (``full=False``) from the latent of the whole run (Stage C comes first and does not depend on B)."""
    if stage == "b":
        stage_c, stage_b, full = models.stage_c, _Placed(trained), True
    else:
        stage_c, stage_b = _Placed(trained), models.get("stage_b")
    pipeline = Pipeline(Stages(stage_c, stage_b, models.get("stage_a"), models.get("text_encoder"),
                               models.get("previewer"), variant="training"), offload=True)
    out = []
    trained.eval()
    for index, prompt in enumerate(prompts):
        sample_seed = prompt.seed if prompt.seed is not None else derive_seed(seed, "preview", index) % 2**32
        result = pipeline.run(GenerationParams(prompt.prompt, prompt.negative_prompt, width=prompt.width,
                                               height=prompt.height, seed=sample_seed, steps_c=prompt.steps,
                                               cfg_c=prompt.scale, variant="training"))
        out.append((sample_seed, to_pil(pipeline.preview_c(result.latent_c))[0],
                    to_pil(result.images)[0] if full else None))
    return out


@pytest.mark.parametrize(("stage", "full", "bf16"), [("c", True, False), ("c", False, True), ("b", True, True)])
def test_stage_by_stage_images_equal_the_per_prompt_ones(tmp_path, stage, full, bf16) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    models = _models(stage)
    samples = render_samples(PROMPTS, models.model, models, step=12, seed=7, device="cpu", autocast_bf16=bf16,
                             full=full, out_dir=tmp_path, name="run", stage=stage)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        reference = _per_prompt(PROMPTS, models.model, models, stage=stage, seed=7, full=full)
    assert len(samples) == len(reference) == 3
    for sample, (sample_seed, preview, image) in zip(samples, reference, strict=True):
        assert sample.seed == sample_seed
        assert sample.preview.tobytes() == preview.tobytes()
        assert Image.open(sample.paths[0]).tobytes() == preview.tobytes()  # the PNG's pixels
        assert sample.paths[0].name == f"run_000012_{sample.index:02d}_{sample_seed}_preview.png"
        if full:
            assert sample.image.tobytes() == image.tobytes()
            assert Image.open(sample.paths[1]).tobytes() == image.tobytes()
            assert sample.paths[1].name == f"run_000012_{sample.index:02d}_{sample_seed}.png"
        else:
            assert sample.image is None and image is None and len(sample.paths) == 1
    assert len({s.preview.tobytes() for s in samples}) == 3  # three different prompts, three different previews
