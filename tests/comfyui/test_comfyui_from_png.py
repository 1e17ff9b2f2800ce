"""``%%cascade --from FILE.png`` regenerates from the parameters a PNG carries, cascade_lab's or a ComfyUI PNG's
graph, the cell's options and a non-empty body overriding them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import reference_dir
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from PIL import Image

from cascade_lab.notebook import session as session_module
from cascade_lab.notebook.options import parse_cell
from cascade_lab.notebook.session import Session
from cascade_lab.params import GenerationParams, read_png_params
from cascade_lab.results import Result

COMFY_PNG = reference_dir("comfyui", "workflows") / "image_to_image.output.png"


def test_the_cells_options_and_body_override_the_pngs(tmp_path: Path) -> None:
    params = GenerationParams("a red fox", "blurry", width=256, height=384, seed=42, steps_c=7, cfg_c=3.0,
                              sampler_c="euler", variant="tiny")
    [png] = Result([Image.new("RGB", (256, 384))], params).save(tmp_path / "fox.png")
    request = parse_cell(f"--from {png} --steps-c 3", "", {})
    assert (request.prompt, request.negative_prompt) == ("a red fox", "blurry")
    opts = request.options
    assert (opts["seed"], opts["steps_c"], opts["cfg_c"], opts["sampler_c"], opts["variant"]) == (42, 3, 3.0, "euler",
                                                                                                 "tiny")
    assert (opts["width"], opts["height"], opts["loras"]) == (256, 384, [])
    request = parse_cell(f"--from {png} --seed 5 --size 128x128", "a blue fox\n--- negative ---\nugly", {})
    assert (request.prompt, request.negative_prompt) == ("a blue fox", "ugly")
    assert (request.options["seed"], request.options["width"], request.options["steps_c"]) == (5, 128, 7)


def test_a_comfyui_png_needs_its_input_image_and_gives_comfyuis_settings() -> None:
    with pytest.raises(UsageError, match="used the input image 'example.png', which is not on this machine; give "
                                         "it in the cell \\(--image FILE\\)"):
        parse_cell(f"--from {COMFY_PNG}", "", {})
    image = reference_dir("comfyui", "workflows", "input") / "example.png"
    request = parse_cell(f"--from {COMFY_PNG} --image {image}", "", {})
    opts = request.options
    assert request.prompt.startswith("evening sunset scenery") and request.negative_prompt == "text, watermark"
    assert (opts["compat"], opts["denoise"], opts["seed"], opts["seed_b"]) == ("comfyui", 0.6, 321653652654528,
                                                                               980291192346449)
    assert opts["image"] == str(image) and "strength" not in opts and opts["compression"] == 32.0
    assert (opts["sampler_c"], opts["scheduler_b"], opts["cfg_rho"]) == ("euler_ancestral", "simple", 0.0)


def test_from_a_file_that_is_not_there_or_carries_nothing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--from 'nope.png': file not found"):
        parse_cell("--from nope.png", "x", {})
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(UsageError, match="no ComfyUI 'prompt' / 'workflow' chunk"):
        parse_cell(f"--from {tmp_path / 'plain.png'}", "x", {})


def test_the_magic_regenerates_the_same_image(ip: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Session()
    s.configure(variant="tiny", width=128, height=128, steps_c=2, steps_b=2, preview_interval=0.0)
    monkeypatch.setattr(session_module, "_session", s)
    ip.run_line_magic("load_ext", "cascade_lab")
    with capture_output():
        ip.run_cell_magic("cascade", f"--seed 3 --no-preview --save {tmp_path / 'first.png'}", "a small cube")
        ip.run_line_magic("cascade", f"--from {tmp_path / 'first.png'} --no-preview -o again")  # no body: a line
    again = ip.user_ns["again"]
    assert again.params == read_png_params(tmp_path / "first.png")
    with Image.open(tmp_path / "first.png") as first:
        assert np.array_equal(np.asarray(first.convert("RGB")), np.asarray(again.image))
