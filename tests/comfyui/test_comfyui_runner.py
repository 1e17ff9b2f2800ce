"""`cascade_lab.comfyui.run` on ComfyUI's official Stable Cascade example workflows, read from their own files (UI
form, API form, the PNG ComfyUI wrote) with the tiny models laid out as a ComfyUI install, gives ComfyUI's
latents and pixels (../shared/reference/comfyui/workflows/).

The CLIPTextEncode outputs are given (``outputs={"6": ..., "7": ...}``: the tiny CLIP-G needs the real CLIP
tokenizer, which this machine cannot fetch); image to image also gets ComfyUI's StableCascade_StageC_VAEEncode
latent (its tiny EfficientNet is not the official architecture). Everything else is read off the workflow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import reference_dir

sys.path.insert(0, str(Path(__file__).parent))
from comfy_models import assert_rel, load, reference_tables  # noqa: E402,F401

from cascade_lab.comfyui import read_workflow, run  # noqa: E402
from cascade_lab.params import read_png_params  # noqa: E402

STAGE_B_OUT = torch.tensor(1 / 0.43)  # ComfyUI's Stage B latent = the model's / float32(1/0.43)
CHECKPOINTS = ("stable_cascade_stage_c_tiny.safetensors", "stable_cascade_stage_b_tiny.safetensors")



pytestmark = pytest.mark.usefixtures("reference_tables")  # the reference σ tables for every test here


def comfyui_tree(root: Path) -> Path:
    """A ComfyUI install holding the reference's tiny checkpoints in models/checkpoints/ and its input image."""
    models = reference_dir("comfyui", "models")
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "input").mkdir()
    for name in CHECKPOINTS:
        (root / "models" / "checkpoints" / name).symlink_to(models / name)
    (root / "input" / "example.png").symlink_to(reference_dir("comfyui", "workflows", "input") / "example.png")
    return root


def tiny_configs() -> dict[str, Any]:
    """The tiny models' sizes, which their headers cannot name (config.json → tiny)."""
    tiny = json.loads((reference_dir("comfyui") / "config.json").read_text())["tiny"]
    return {part: tiny[part] for part in ("stage_c", "stage_b", "stage_a", "previewer")}


def given(name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    result = load(reference_dir("comfyui", "workflows") / f"{name}.result.safetensors")
    outputs: dict[str, Any] = {"6": (result["6.cond"], result["6.pooled"]), "7": (result["7.cond"], result["7.pooled"])}
    if name == "image_to_image":
        outputs["49"] = result["49.stage_c"]
    return result, outputs


def run_reference(name: str, source: Path, tmp_path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    result, outputs = given(name)
    out = run(source, models=comfyui_tree(tmp_path / "ComfyUI"), outputs=outputs, configs=tiny_configs(),
              output_dir=tmp_path / "output")
    assert list(out) == ["9"] and out.files["9"] == [tmp_path / "output" / "ComfyUI_00001_.png"]
    return result, out


@pytest.mark.reference
def test_text_to_image_from_the_ui_workflow(tmp_path: Path) -> None:
    source = reference_dir("comfyui", "workflows") / "text_to_image.workflow.json"
    expected, out = run_reference("text_to_image", source, tmp_path)
    result = out["9"]
    assert_rel(result.latent_c, expected["3.samples"], "Stage C latent (node 3)")
    latent_b = result.latent_b / STAGE_B_OUT
    assert_rel(latent_b[..., :64, :64], expected["33.samples.crop_top_left"], "Stage B latent, top left (node 33)")
    assert_rel(latent_b[..., 96:160, 96:160], expected["33.samples.crop_center"], "Stage B latent, centre")
    image = out.images["9"]
    assert image.shape == (1, 1024, 1024, 3)
    assert_rel(image[:, :64, :64], expected["8.image.crop_top_left"], "pixels, top left (node 8)")
    assert_rel(image[:, 480:544, 480:544], expected["8.image.crop_center"], "pixels, centre")
    # the Result is a cascade_lab generation with the workflow's settings, and its PNG says so
    params = read_png_params(out.files["9"][0])
    assert params == result.params
    assert (params.seed, params.seed_b, params.steps_c, params.steps_b, params.cfg_c, params.cfg_b) == (
        314307448448003, 183495397600639, 20, 10, 4.0, 1.1)
    assert (params.width, params.height, params.compression, params.compat) == (1024, 1024, 42.0, "comfyui")
    assert params.negative_prompt == "text, watermark"
    # which ComfyUI files made it: the variant (inspector, gallery, PNG) and the graph a save of it exports
    assert params.variant == "comfyui:stable_cascade_stage_c_tiny.safetensors"
    assert params.extras["comfyui_checkpoints"] == dict(zip("cb", CHECKPOINTS, strict=True))
    from cascade_lab.comfyui.export import api_prompt

    exported = api_prompt(result.params)[0]
    assert (exported["41"]["inputs"]["ckpt_name"], exported["42"]["inputs"]["ckpt_name"]) == CHECKPOINTS


@pytest.mark.reference
@pytest.mark.parametrize("form", ["api.json", "output.png"])
def test_image_to_image_from_the_api_prompt_and_from_comfyuis_png(form: str, tmp_path: Path) -> None:
    source = reference_dir("comfyui", "workflows") / f"image_to_image.{form}"
    expected, out = run_reference("image_to_image", source, tmp_path)
    result = out["9"]
    assert_rel(result.latent_c, expected["3.samples"], "Stage C latent (node 3)")
    assert_rel(result.latent_b / STAGE_B_OUT, expected["33.samples"], "Stage B latent (node 33)")
    assert_rel(out.images["9"], expected["8.image"], "pixels (node 8)")
    from PIL import Image

    with Image.open(reference_dir("comfyui", "workflows") / "image_to_image.output.png") as png:
        comfy = np.asarray(png.convert("RGB")).astype(int)
    with Image.open(out.files["9"][0]) as png:
        ours = np.asarray(png.convert("RGB")).astype(int)
        chunks = dict(png.text)  # type: ignore[attr-defined]
    assert ours.shape == comfy.shape == (144, 200, 3)
    assert np.abs(ours - comfy).max() <= 1 and (ours != comfy).mean() < 0.01  # SaveImage truncation flips
    # the written PNG carries the workflow as ComfyUI's SaveImage does, so it runs again from there
    graph, ui = read_workflow(out.files["9"][0])
    assert graph["3"]["inputs"]["denoise"] == 0.6 and json.loads(chunks["prompt"])["49"]["inputs"]["compression"] == 32
    assert (ui is not None) == (form == "output.png")
    params = read_png_params(out.files["9"][0])
    assert (params.width, params.height, params.denoise, params.compression) == (200, 150, 0.6, 32.0)
    assert params.init_image is not None and params.init_image.endswith("example.png")


@pytest.mark.reference
def test_nothing_is_written_without_an_output_folder(tmp_path: Path) -> None:
    result, outputs = given("image_to_image")
    root = comfyui_tree(tmp_path / "ComfyUI")
    before = sorted(p for p in tmp_path.rglob("*"))
    out = run(reference_dir("comfyui", "workflows") / "image_to_image.api.json", models=root, outputs=outputs,
              configs=tiny_configs(), set={"33.seed": 1})
    assert sorted(p for p in tmp_path.rglob("*")) == before and out.files == {}
    assert out["9"].params.seed_b == 1  # --set reached the Stage B KSampler
    assert not torch.allclose(out["9"].latent_b / STAGE_B_OUT, result["33.samples"])
    assert_rel(out["9"].latent_c, result["3.samples"], "Stage C is untouched by Stage B's seed")
