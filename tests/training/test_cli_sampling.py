"""`cascade-lab train CONFIG` and sample prompts during training (Previewer always, Stage B/A when present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_helpers import tiny_run

from cascade_lab.cli import main
from cascade_lab.training import train
from cascade_lab.training.sampling import SamplePrompt, render_samples

pytest_plugins = ["training_fixtures"]  # fixtures: shapes_dir, shared_cache, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def _toml(path: Path, values: dict) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def test_cli_trains_from_a_toml_file(shapes_dir, shared_cache, tmp_path, capsys) -> None:
    config = _toml(tmp_path / "lora.toml", tiny_run(shapes_dir, shared_cache, tmp_path / "out", max_train_steps=50,
                                                  log_every_n_steps=2))
    assert main(["train", str(config), "--set", "max_train_steps=4", "--set", "network_dim=2"]) == 0
    out = capsys.readouterr().out
    assert "step 4/4" in out and "finished: step 4/4" in out
    assert (tmp_path / "out" / "cascade_lora.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["step"] == 4


def test_cli_reports_bad_configs_in_one_line(tmp_path, capsys) -> None:
    config = _toml(tmp_path / "bad.toml", {"train_data_dir": str(tmp_path), "learning_rat": 1e-4})
    with pytest.raises(SystemExit) as info:
        main(["train", str(config)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "cascade-lab train: error:" in err and "learning_rate" in err


def test_samples_during_training(shapes_dir, shared_cache, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# previews\na red circle --w 128 --h 128 --s 3 --d 5\n"
                       "a blue square --n red --w 256 --h 128 --s 2 --l 2\n")
    events = []
    run = train(**tiny_run(shapes_dir, shared_cache, tmp_path, max_train_steps=4, sample_prompts=str(prompts),
                           sample_every_n_steps=2, sample_at_first=True), callback=events.append)
    assert [s.step for s in run.samples] == [0, 0, 2, 2, 4, 4]
    first = run.samples[0]
    assert first.seed == 5 and first.preview.size == (24, 24)  # 128 px → 3x3 latent → Previewer 8x
    assert run.samples[1].preview.size == (48, 24) and run.samples[1].image.size == (256, 128)  # tiny Stage B/A
    files = sorted(p.name for p in (tmp_path / "sample").iterdir())
    assert len(files) == 12 and "cascade_lora_000002_00_5_preview.png" in files
    assert Image.open(tmp_path / "sample" / "cascade_lora_000002_00_5.png").size == (128, 128)
    assert [e.kind for e in events].count("sample") == 3


def test_sampling_leaves_the_rng_and_modes_alone(shapes_dir) -> None:
    from cascade_lab.training.config import TrainConfig
    from cascade_lab.training.models import build_models

    models = build_models(TrainConfig(train_data_dir=str(shapes_dir), sample_full_images=False))
    stage_c = models.stage_c.train()
    state = torch.get_rng_state()
    images = render_samples([SamplePrompt("a green triangle", width=128, height=128, steps=2)], stage_c, models,
                            step=0, seed=0, device="cpu", autocast_bf16=False, full=False, out_dir=None, name="x")
    assert torch.equal(torch.get_rng_state(), state) and stage_c.training and images[0].image is None
    again = render_samples([SamplePrompt("a green triangle", width=128, height=128, steps=2)], stage_c, models,
                           step=0, seed=0, device="cpu", autocast_bf16=False, full=False, out_dir=None, name="x")
    assert images[0].preview.tobytes() == again[0].preview.tobytes()  # seeded: the same preview every time


def test_background_run_stops_on_request(shapes_dir, shared_cache, tmp_path) -> None:
    """What the notebook panel does: start in a thread, watch `losses`, press stop."""
    import time

    run = train(**tiny_run(shapes_dir, shared_cache, tmp_path, max_train_steps=100_000), background=True)
    deadline = time.monotonic() + 60
    while len(run.losses) < 3 and run.running and time.monotonic() < deadline:
        time.sleep(0.05)
    run.stop()
    run.wait(timeout=60)
    assert run.status == "stopped" and run.error is None and 3 <= run.step < 100_000
    assert run.last_checkpoint_step == run.step and run.output_file.is_file()


def test_lora_on_a_bf16_base_under_bf16_autocast(shapes_dir, shared_cache, tmp_path) -> None:
    """kohya's LoRA set-up: the frozen base held in bf16, the LoRA pairs in fp32."""
    from cascade_lab.models.stage_c import StageCConfig

    base = StageCConfig.tiny().build().to(torch.bfloat16)
    with torch.no_grad():
        base.clf[1].weight.normal_(0, 0.05)
    run = train(**tiny_run(shapes_dir, shared_cache, tmp_path, max_train_steps=5, mixed_precision="bf16",
                           learning_rate=1e-2), stage_c=base)
    assert run.status == "finished" and all(p.dtype == torch.float32 for p in run.network.parameters())
    assert all(p.dtype == torch.bfloat16 for p in base.parameters())
    assert run.losses[-1]["raw_loss"] == run.losses[-1]["raw_loss"]  # finite, not NaN


def test_sample_models_come_to_the_device_only_while_they_render(shapes_dir, monkeypatch) -> None:
    """The samples' frozen models are lent to the device one at a time (``Pipeline(offload=True)``; once per
    sampling event: test_stagewise_sampling.py) and go back to the CPU; the trained Stage C is used where it is,
    never moved or copied."""
    from training_helpers import Moves

    from cascade_lab.pipeline import Pipeline, Stages
    from cascade_lab.training.config import TrainConfig
    from cascade_lab.training.models import build_models
    from cascade_lab.training.sampling import _Placed

    made = []
    init = Pipeline.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Pipeline, "__init__", record)
    models = build_models(TrainConfig(train_data_dir=str(shapes_dir)))
    prompt = [SamplePrompt("a red circle", width=128, height=128, steps=1)]
    render_samples(prompt, models.stage_c, models, step=0, seed=0, device="cpu", autocast_bf16=False, full=True,
                   out_dir=None, name="x")
    assert [p.offload for p in made] == [True]
    # what offload does on a GPU (the pipeline's device is only compared here, nothing runs on it)
    cuda = torch.device("cuda")
    pipeline = Pipeline(Stages(None, None, None, None), device=cuda, offload=True)
    helper = Moves(torch.nn.Linear(2, 2))
    with pipeline.use(helper):
        assert helper.device == cuda
    assert helper.moves == [cuda, torch.device("cpu")]
    trained = models.stage_c
    weight = next(trained.parameters())
    with pipeline.use(_Placed(trained), torch.bfloat16):
        pass
    assert next(trained.parameters()) is weight and weight.dtype == torch.float32 and weight.device.type == "cpu"
