"""TrainingPanel without a browser (ipywidgets on a dummy comm): Start/Stop with `Button.click()`, runs of a few
steps of the tiny model on four 128 px images, and the pure `loss_figure`."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cascade_lab.notebook.session import Session
from cascade_lab.notebook.train_panel import TrainingPanel, ema, figure_png, loss_figure

TIMEOUT = 180  # seconds for one tiny run on a busy 2-core machine
LABELS = ["raw loss", "weighted loss", "EMA (weighted, β=0.9)", "validation (raw)"]


def make_dataset(folder: Path) -> Path:
    """Four 128 px images, a coloured square or disc on grey, captioned "a red square" etc."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for colour in ("red", "blue"):
        for shape in ("square", "disc"):
            image = Image.new("RGB", (128, 128), (230, 230, 230))
            (ImageDraw.Draw(image).rectangle if shape == "square" else ImageDraw.Draw(image).ellipse)(
                (24, 24, 104, 104), fill=colour)
            image.save(folder / f"{colour}_{shape}.png")
            (folder / f"{colour}_{shape}.txt").write_text(f"a {colour} {shape}")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One latent/text cache for the module: the random EfficientNet encodes each image once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps are fastest single-threaded on the shared machines
    yield
    torch.set_num_threads(before)


@pytest.fixture
def session() -> Session:
    return Session()


def make_panel(session: Session, dataset: Path, cache: Path, out: Path, **changes: Any) -> TrainingPanel:
    """A panel on the tiny model: 128 px at the kohya scale (4x4 latents), batch 4, validation every 2 steps."""
    settings: dict[str, Any] = {"train_data_dir": str(dataset), "cache_dir": str(cache), "output_dir": str(out),
                                "resolution": 128, "training_scale": "kohya", "train_batch_size": 4,
                                "learning_rate": 1e-3, "max_train_steps": 4, "val_every_n_steps": 2,
                                "val_items": 2, "log_every_n_steps": 0} | changes
    return TrainingPanel(session=session, plot_interval=0.0, **settings)


# -- the pure plot -------------------------------------------------------------------------------------------
def test_ema_is_bias_corrected_and_skips_non_finite_steps() -> None:
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    smoothed = ema([math.nan, 1.0, math.nan, 3.0], beta=0.5)
    assert math.isnan(smoothed[0]) and smoothed[1:3] == [1.0, 1.0]
    assert smoothed[3] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)


def test_loss_figure_draws_every_curve_without_pyplot() -> None:
    losses = [{"step": s, "loss": 0.5 / s, "raw_loss": 1.0 / s} for s in (1, 2, 3)]
    losses.append({"step": 4, "loss": math.nan, "raw_loss": math.nan})  # a skipped step: a gap
    run = SimpleNamespace(losses=losses, val_losses=[{"step": 0, "val_loss": 1.1}, {"step": 4, "val_loss": 0.7}],
                          step=4, total_steps=10, status="running", config=SimpleNamespace(name="my_lora"))
    fig = loss_figure(run)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == LABELS
    assert list(lines["raw loss"].get_ydata()[:3]) == [1.0, 0.5, pytest.approx(1 / 3)]
    assert list(lines["validation (raw)"].get_xdata()) == [0, 4]
    assert list(lines["validation (raw)"].get_ydata()) == [1.1, 0.7]
    ema_line = lines["EMA (weighted, β=0.9)"].get_ydata()
    assert ema_line[3] == ema_line[2]  # the EMA carries over the skipped step
    assert ax.get_xlim() == (0, 10) and "my_lora: step 4/10 (running)" in ax.get_title()
    assert figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []  # no global figure state was touched


# -- running from the panel ---------------------------------------------------------------------------------
def test_start_trains_to_the_end_with_plot_samples_and_checkpoint(session, dataset, cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    panel = make_panel(session, dataset, cache, tmp_path / "out", sample_prompts=["a red disc --w 128 --h 128 --s 2"],
                       sample_every_n_steps=2)
    assert type(panel.start_button.comm).__name__ == "DummyComm"
    assert panel.dataset.value == str(dataset) and panel.steps.value == 4 and panel.sample_every.value == 2
    panel.start_button.click()
    assert panel.running and panel.start_button.disabled and not panel.stop_button.disabled
    run = panel.wait(TIMEOUT)
    assert panel.error is None and panel.display_error is None, panel.error_box.value
    assert run.status == "finished" and run.step == 4 and [r["step"] for r in run.losses] == [1, 2, 3, 4]
    assert [v["step"] for v in run.val_losses] == [0, 2, 4]
    assert not session.busy and session.training is None  # the session is free once the panel says finished
    assert panel.progress.value == panel.progress.max == 4 and panel.progress.bar_style == "success"
    assert "finished at step 4/4" in panel.status.value and str(run.output_file) in panel.status.value
    assert run.output_file.is_file() and str(run.last_checkpoint) in panel.checkpoint.value
    assert not panel.start_button.disabled and panel.stop_button.disabled

    lines = {line.get_label(): line for line in panel.figure().axes[0].get_lines()}
    assert list(lines) == LABELS
    assert list(lines["weighted loss"].get_ydata()) == [r["loss"] for r in run.losses]
    assert list(lines["raw loss"].get_ydata()) == [r["raw_loss"] for r in run.losses]
    assert list(lines["validation (raw)"].get_xdata()) == [0, 2, 4]
    assert panel.plot.value[:8] == b"\x89PNG\r\n\x1a\n"

    assert [s.step for s in run.samples] == [2, 4] and len(panel.gallery.children) == 2
    newest = panel.gallery.children[0]
    assert "step 4: a red disc" in newest.children[1].value and newest.children[0].value[:4] == b"\x89PNG"


def test_stop_ends_after_the_current_step_and_start_resumes(session, dataset, cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    panel = make_panel(session, dataset, cache, tmp_path / "out", max_train_steps=1000, val_every_n_steps=0)
    seen: list[int] = []

    def on_progress(change: dict[str, Any]) -> None:  # the run's thread, inside the step-2 callback
        seen.append(change["new"])
        if change["new"] == 2:
            panel.stop_button.click()

    panel.progress.observe(on_progress, "value")
    panel.start()
    first = panel.wait(TIMEOUT)
    assert first.status == "stopped" and first.step == 2 and max(seen) == 2  # no step after the one under way
    assert first.last_checkpoint_step == 2 and (first.last_checkpoint / "state.pt").is_file()
    assert "stopped at step 2/1000" in panel.status.value and str(first.last_checkpoint) in panel.status.value
    assert str(first.last_checkpoint) in panel.checkpoint.value
    assert panel.progress.bar_style == "warning" and panel.resume.value and panel.error is None

    panel.steps.value = 4  # resume="auto" (ticked by Stop) continues from step 2 to the new end
    panel.start_button.click()
    second = panel.wait(TIMEOUT)
    assert panel.error is None, panel.error_box.value
    assert second is not first and second.status == "finished" and second.step == 4
    assert [r["step"] for r in second.losses] == [1, 2, 3, 4]
    assert second.losses[:2] == first.losses  # the first two steps come from the checkpoint
    assert "finished at step 4/4" in panel.status.value


def test_a_missing_dataset_folder_is_reported_in_the_panel(session, dataset, cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    panel = make_panel(session, dataset, cache, tmp_path / "out")
    panel.dataset.value = str(tmp_path / "no_such_folder")
    assert panel.start() is False
    assert "does not exist" in panel.error_box.value and "no_such_folder" in panel.error_box.value
    assert isinstance(panel.error, ValueError) and panel.run is None and not panel.running
    assert not session.busy and not panel.start_button.disabled and panel.status.value == "not started"
    panel.dataset.value, panel.learning_rate.value = str(dataset), -1.0
    assert panel.start() is False and "learning_rate=-1.0: use a positive number" in panel.error_box.value


def test_a_failure_inside_the_run_lands_in_the_panel(session, cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "empty"
    empty.mkdir()
    panel = make_panel(session, empty, cache, tmp_path / "out")
    assert panel.start() is True  # the folder exists; the run finds it has no images
    run = panel.wait(TIMEOUT)
    assert run.status == "error" and panel.progress.bar_style == "danger"
    assert "no images" in panel.error_box.value and "<details>" in panel.error_box.value  # with its traceback
    assert "error at set-up (before the first step)" in panel.status.value and not session.busy
    assert not panel.start_button.disabled and panel.stop_button.disabled


def test_a_stage_b_run_from_the_panel_hides_stage_c_settings_and_samples_through_stage_b(session, dataset, cache,  # type: ignore[no-untyped-def]
                                                                                       tmp_path) -> None:
    panel = make_panel(session, dataset, cache, tmp_path / "out", max_train_steps=2, val_every_n_steps=0,
                       sample_prompts=["a red disc --w 128 --h 128 --s 1"], sample_every_n_steps=2)
    assert panel.stage.value == "c" and panel.training_scale.layout.display is None
    assert panel.stage_note.layout.display == "none"
    panel.stage.value = "b"  # Stage B: no training scale (it trains on the image itself), the recipe shown
    assert panel.training_scale.layout.display == "none" and panel.stage_note.layout.display is None
    assert panel.config().stage == "b"
    panel.start_button.click()
    run = panel.wait(TIMEOUT)
    assert panel.error is None and panel.display_error is None, panel.error_box.value
    assert run.status == "finished" and run.step == 2 and run.stage_b is run.model and run.stage_c is None
    assert run.output_file.name == "stage_b_lora.safetensors" and run.metadata["cascade_lab.stage"] == "b"
    [sample] = run.samples  # C (frozen) -> the trained B -> A, at the prompt's size
    assert sample.image is not None and sample.image.size == (128, 128) and len(panel.gallery.children) == 1
    assert any(p.name.endswith("_00_" + str(sample.seed) + ".png") for p in sample.paths)
    assert "finished at step 2/2" in panel.status.value


def test_a_generation_holding_the_session_refuses_a_training(session, dataset, cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    panel = make_panel(session, dataset, cache, tmp_path / "out")
    with session.job("generate 'a cat'"):
        assert panel.start() is False
    assert "a cascade_lab job is already running: generate &#x27;a cat&#x27;" in panel.error_box.value
    assert type(panel.error).__name__ == "JobRunning" and panel.run is None and not panel.running
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_training_holds_the_session_until_it_ends(session, dataset, cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cascade_lab.notebook.session import JobRunning

    panel = make_panel(session, dataset, cache, tmp_path / "out", max_train_steps=1000, val_every_n_steps=0)
    panel.start()
    try:
        assert session.busy and session.running.label.startswith("training 'cascade_lora'")
        with pytest.raises(JobRunning, match="already running: training 'cascade_lora'"):
            session.generate("a cat")
        assert session.cancel() is True  # %cascade cancel: the run stops after its step, with a checkpoint
    finally:
        run = panel.wait(TIMEOUT)
    # stopped after a step: its checkpoint; stopped during set-up: none (no empty step-0 checkpoint)
    assert run.status == "stopped" and run.last_checkpoint_step == (run.step or None) and not session.busy
    if run.step == 0:
        assert "no checkpoint was written" in panel.status.value


# -- Cascade.train: the API the notebook calls --------------------------------------------------------------
def test_cascade_train_lora_keeps_stage_c_and_full_changes_it_in_place(dataset, cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cascade_lab.api import Cascade

    cascade = Cascade("tiny", device="cpu")
    stage_c = cascade.pipeline.stages.stage_c
    before = {k: v.clone() for k, v in stage_c.state_dict().items()}
    settings: dict[str, Any] = {"train_data_dir": str(dataset), "cache_dir": str(cache), "resolution": 128,
                                "training_scale": "kohya", "train_batch_size": 4, "learning_rate": 1e-2,
                                "max_train_steps": 2, "val_every_n_steps": 0, "val_items": 2}
    lora = cascade.train(output_dir=str(tmp_path / "lora"), **settings)
    assert lora.status == "finished" and lora.stage_c is stage_c and lora.metadata["cascade_lab.model"] == "tiny"
    assert all(torch.equal(before[k], v) for k, v in stage_c.state_dict().items())  # the LoRA is in the file only
    assert not stage_c.training and not any(p.requires_grad for p in stage_c.parameters())
    cascade.load_lora(lora.output_file)
    with pytest.raises(ValueError, match="unload_lora\\(\\) before training"):
        cascade.train(output_dir=str(tmp_path / "no"), **settings)
    cascade.unload_lora()

    full = cascade.train(output_dir=str(tmp_path / "full"), mode="full", dropout=True, background=True, **settings)
    with pytest.raises(RuntimeError, match="Stage C is being trained"):
        cascade.generate("a red disc", width=128, height=128, steps_c=1, steps_b=1)
    full.wait(TIMEOUT)
    assert full.status == "finished" and full.stage_c is stage_c
    assert not all(torch.equal(before[k], v) for k, v in stage_c.state_dict().items())  # trained in place
    assert not stage_c.training and not any(p.requires_grad for p in stage_c.parameters())  # dropout off again
    images = [cascade.generate("a red disc", width=128, height=128, steps_c=1, steps_b=1, seed=1).images[0]
              for _ in range(2)]
    assert images[0].tobytes() == images[1].tobytes()  # generating works again after the run, reproducibly
