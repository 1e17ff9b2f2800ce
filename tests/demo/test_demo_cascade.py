"""The shipped demo cascade: registered, offline, small; its held-out hit rates stay above the floors; the
README's main job (the command line and ``%%cascade``, variant ``auto`` with no weights and no network)
writes an image the checker accepts for its prompt: shape, colour, position and background.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from PIL import Image

from cascade_lab.demo import checker, world
from cascade_lab.demo.models import NATIVE, PARTS, WEIGHTS, build_demo

# measured on the shipped weights (cascade_lab/demo/weights/report.json, 64 held-out prompts): colour 1.0,
# shape and colour 0.91, position 0.95, background 1.0, everything 0.91. Colour and shape and colour: the
# issue's floors; position, background and everything: regression floors below the measured values
FLOORS = {"colour": 0.80, "shape_and_colour": 0.70, "position": 0.85, "background": 0.90, "all": 0.70}


def assert_accepted(image: Any, prompt: str) -> None:
    """The checker reads the prompt's shape, colour, position and background back from the image."""
    check = checker.check(image, prompt)
    assert check.accepted, check.reading


@pytest.fixture
def one_thread() -> Iterator[None]:
    """These models are tiny: on a busy 2-core machine two OpenMP threads mostly wait for each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def offline_empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """No real weights anywhere and no network: an empty HF_HOME, offline, no ComfyUI folder."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "CASCADE_LAB_COMFYUI"):
        monkeypatch.delenv(var, raising=False)

    def no_download(*args: Any, **kwargs: Any) -> None:
        pytest.fail(f"tried to download {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    return env


def test_demo_variant_is_registered_small_and_offline() -> None:
    from cascade_lab.plugins import get_variant
    from cascade_lab.weights.memory import real_variants

    variant = get_variant("demo")
    assert variant.build is not None and not variant.files
    assert "demo" not in [v.name for v in real_variants()]  # `auto` never mistakes it for real weights
    sizes = {part: (WEIGHTS / f"{part}.safetensors").stat().st_size for part in PARTS}
    assert sum(sizes.values()) < 8 * 2**20, sizes  # a few MB, fp16
    stages = build_demo()
    assert stages.variant == "demo" and stages.native == NATIVE
    assert all(not p.requires_grad for p in stages.stage_c.parameters())


def test_missing_weights_name_the_retrain_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="python -m cascade_lab.demo.train --out"):
        build_demo(tmp_path)


def test_shipped_weights_reach_the_hit_rate_floors_on_held_out_prompts(one_thread: None) -> None:
    from cascade_lab.demo.evaluate import evaluate

    start = time.perf_counter()
    rates, checks = evaluate(build_demo(), 64)
    assert len(checks) == 64 and {c.expected for c in checks} <= set(world.split()[1])
    for name, floor in FLOORS.items():
        assert rates[name] >= floor, rates
    shipped = json.loads((WEIGHTS / "report.json").read_text())["hit_rates"]
    assert rates == pytest.approx(shipped, abs=0.05), (rates, shipped)  # the shipped report is these weights'
    assert time.perf_counter() - start < 120


def test_cascade_generate_uses_the_native_size_and_records_it(one_thread: None) -> None:
    from cascade_lab.api import Cascade

    cascade = Cascade("demo")
    result = cascade.generate(world.MAIN_PROMPT, seed=1)  # the official 1024² default becomes 128² quietly
    assert result.images[0].size == (128, 128)
    assert (result.params.width, result.params.compression, result.params.variant) == (128, 16.0, "demo")
    assert_accepted(result.images[0], world.MAIN_PROMPT)
    with pytest.warns(UserWarning, match=r"makes 128x128 images only; generating that size instead of 256x256"):
        cascade.generate(world.MAIN_PROMPT, width=256, height=256, seed=1, steps_c=2, steps_b=2)
    assert cascade.encode_image(result.images[0]).shape == (1, 16, 8, 8)


def test_readme_main_job_offline_writes_an_image_the_checker_accepts(
    tmp_path: Path, offline_empty_hub: dict[str, str]
) -> None:
    out = tmp_path / "cascade.png"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                                                              "CASCADE_LAB_COMFYUI")}
    env.update(offline_empty_hub, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "cascade_lab.cli", "generate", world.MAIN_PROMPT, "-o", str(out),
                           "--seed", "1", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if "demo" in line]
    assert len(notices) == 1 and "hf download stabilityai/stable-cascade" in notices[0], done.stderr
    assert f"wrote {out}" in done.stdout and "variant demo" in done.stdout
    with Image.open(out) as image:
        assert image.size == (128, 128)
        assert_accepted(image, world.MAIN_PROMPT)


def test_cell_magic_main_job_offline(ip: Any, offline_empty_hub: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                     one_thread: None) -> None:
    from IPython.utils.capture import capture_output

    from cascade_lab.notebook import session as session_module
    from cascade_lab.notebook.session import Session

    monkeypatch.setattr(session_module, "_session", Session())
    ip.run_line_magic("load_ext", "cascade_lab")
    with pytest.warns(UserWarning, match="using the built-in 'demo' cascade"), capture_output():
        ip.run_cell_magic("cascade", "--seed 1 --no-preview -o r", world.MAIN_PROMPT + "\n")
    result = ip.user_ns["r"]
    assert result.params.variant == "demo" and result.images[0].size == (128, 128)
    assert_accepted(result.images[0], world.MAIN_PROMPT)
