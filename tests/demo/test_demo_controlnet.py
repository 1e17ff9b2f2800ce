"""The demo's canny ControlNet: found without naming a file, checked against the demo Stage C, beating the prompt's
position on held-out scenes (the issue's 80 %), and its training recipe learning in a few dozen steps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade_lab.demo import world
from cascade_lab.demo.evaluate import control_cases, evaluate_control
from cascade_lab.demo.models import (
    WEIGHTS,
    DemoControlNetConfig,
    build_demo,
    controlnet_file,
    load_controlnet,
    save_controlnet,
)
from cascade_lab.demo.train_controlnet import mislead

# measured on the shipped file with the user's defaults (Stage C 20 steps, CFG 4): position and shape 94 % over
# these 32 held-out cases (91 % over 64, controlnet_report.json), 0 % without the control
CASES = 32
FLOOR = 0.80  # the requirement: position and shape follow the outline


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small models on a busy 2-core machine: two OpenMP threads mostly wait for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shipped_controlnet_is_found_and_checked() -> None:
    from cascade_lab.weights.controlnets import check_controlnet

    stages = build_demo()
    assert set(stages.controlnets) == {"canny"}  # Cascade("demo") uses these when a Control names no model
    net = stages.controlnets["canny"]()
    assert check_controlnet(net, "canny", stages.stage_c).proj_blocks == tuple(range(8))
    with pytest.raises(ValueError, match="built for a Stage C 64 wide .* the loaded Stage C \\(full\\) is 2048 wide"):
        check_controlnet(net, "canny", "full")
    with pytest.raises(ValueError, match="is a canny ControlNet .* not inpainting"):
        check_controlnet(net, "inpainting", stages.stage_c)
    assert stages.load_controlnet("canny", controlnet_file("canny")).c_in == 1  # a control naming the file
    report = json.loads((WEIGHTS / "controlnet_report.json").read_text())["canny"]
    assert report["hit_rates"]["with_control"]["position_and_shape"] >= FLOOR


def test_controlnet_file_round_trip_and_refusals(tmp_path: Path) -> None:
    import torch

    net = DemoControlNetConfig.of("canny").build()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    path = save_controlnet(net, "canny", tmp_path)
    loaded = load_controlnet("canny", path)
    stored = loaded.state_dict()
    for key, value in net.state_dict().items():  # fp16 on disk, float32 loaded
        assert torch.equal(stored[key], value.half().float()), key
    assert (loaded.c_in, loaded.c_hidden, loaded.proj_blocks) == (net.c_in, net.c_hidden, net.proj_blocks)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="not a demo inpainting ControlNet"):
        load_controlnet("inpainting", path)
    with pytest.raises(FileNotFoundError, match="train_controlnet --kind canny"):
        load_controlnet("canny", controlnet_file("canny", tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="use one of canny, inpainting"):
        DemoControlNetConfig.of("depth")


def test_mislead_replaces_the_position_only() -> None:
    caption = "a red circle at the top left on a blue background"
    assert mislead(caption, 0.9, 0, 0.5) == caption  # above the rate: as drawn
    assert mislead("", 0.0, 0, 0.5) == ""  # caption dropout stays empty
    changed = {mislead(caption, 0.1, k, 0.5) for k in range(8)}
    scenes = {world.parse_caption(c) for c in changed}
    assert len(changed) == 8 and all(s is not None and s.position != "top left" for s in scenes)
    assert {(s.shape, s.colour, s.background) for s in scenes if s} == {("circle", "red", "blue")}


def test_control_cases_are_held_out_with_another_position() -> None:
    held = set(world.split()[1])
    for scene, image, prompt in control_cases(16):
        asked = world.parse_caption(prompt)
        assert scene in held and asked is not None and asked.position != scene.position
        assert image.shape == (world.SIZE, world.SIZE, 3)


def test_control_beats_the_prompt_on_held_out_scenes(one_thread: None) -> None:
    """The outline of a held-out scene at P, a prompt naming Q != P: the shape is drawn at P (and without the
    control at Q, so it is the control doing it)."""
    from cascade_lab.api import Cascade

    cascade = Cascade("demo", device="cpu")
    rates, checks = evaluate_control(CASES, cascade=cascade)
    assert rates["position_and_shape"] >= FLOOR, [c.reading for c in checks if not (c.position and c.shape)]
    baseline, _ = evaluate_control(CASES // 2, cascade=cascade, control=False)
    assert baseline["position"] <= 0.25, baseline


def test_quick_training_learns(tmp_path: Path, one_thread: None) -> None:
    """A few dozen steps of the recipe lower the loss on fixed batches (fixed t and ε, misleading captions)."""
    import torch

    from cascade_lab.demo.train import part_config
    from cascade_lab.demo.train_controlnet import ControlPlan, make_trainer, training_data

    plan = ControlPlan.quick()
    world.write_dataset(tmp_path / "data", 64, seed=1)
    config = part_config(tmp_path, "controlnet", plan.steps, plan.batch, plan.lr, 0, cache_latents=True,
                         cache_text_encoder_outputs=True, noise_shift=4.0)
    net = DemoControlNetConfig.of("canny").build()
    trainer = make_trainer(config, net, training_data(config, plan.misleading), build_demo(), "canny")
    trainer.prepare_caches(list(range(64)))
    batches = [trainer.inputs(c) for c in range(4)]
    t = torch.linspace(0.4, 0.95, plan.batch)

    def held_loss() -> float:
        with torch.no_grad():
            return sum(float(trainer.forward(net, b, t=t)[0].mean()) for b in batches) / len(batches)

    before = held_loss()
    history = trainer.run()
    after = held_loss()
    assert len(history) == plan.steps and all(h["grad_norm"] > 0 for h in history[1:])
    assert after < 0.8 * before, (before, after)  # measured: 0.0175 -> 0.0074


def test_quick_command_writes_a_loadable_controlnet_and_its_report(tmp_path: Path, one_thread: None) -> None:
    from cascade_lab.demo.train_controlnet import main

    out = tmp_path / "weights"
    assert main(["--out", str(out), "--quick", "--work", str(tmp_path / "work")]) == 0
    report = json.loads((out / "controlnet_report.json").read_text())["canny"]
    assert report["plan"]["steps"] == 40 and report["train_seconds"] > 0
    assert set(report["hit_rates"]) == {"with_control", "without_control"}
    assert report["hit_rates"]["without_control"]["position"] <= 0.25  # the prompt names another position
    load_controlnet("canny", out / "controlnet_canny.safetensors")


def test_inpainting_training_input_and_cases() -> None:
    import random

    import numpy as np
    import torch

    from cascade_lab.demo.evaluate import foreground, inpainting_cases
    from cascade_lab.demo.train_controlnet import control_input

    image = torch.rand(2, 3, 128, 128)
    x = control_input("inpainting", image, random.Random(0))  # (B, 4, H, W): white where the mask is 1
    mask = x[:, 3:]
    assert x.shape == (2, 4, 128, 128) and 0 < float(mask.mean()) < 1
    assert torch.equal(x[:, :3], torch.where(mask > 0.5, torch.ones_like(image), image))
    with pytest.raises(ValueError, match="canny and inpainting"):
        control_input("depth", image, random.Random(0))
    for _, picture, (x0, y0, x1, y1) in inpainting_cases(16):
        shape = foreground(picture)
        hidden = shape[y0:y1, x0:x1].sum() / shape.sum()
        assert 0.2 < hidden < 0.8, hidden  # half the box: a triangle keeps 3/4 of its area below its middle
        assert np.asarray(picture).dtype == np.uint8
