"""Every PNG cascade_lab saves carries ComfyUI's ``prompt`` / ``workflow`` chunks of an equivalent graph
(`cascade_lab.comfyui.export`): the graph passes the runner's checks, the UI form converts back to it, a
compat="comfyui" generation run again from it gives the same pixels; a ComfyUI PNG reads back into parameters."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import reference_dir
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from comfy_models import comfy_pipeline, load  # noqa: E402
from test_comfyui_runner import CHECKPOINTS, tiny_configs  # noqa: E402

from cascade_lab import read_png_params  # noqa: E402
from cascade_lab.comfyui import check, run, ui_to_api  # noqa: E402
from cascade_lab.comfyui.export import api_prompt, ui_workflow  # noqa: E402
from cascade_lab.params import COMFYUI_DEFAULTS, GenerationParams  # noqa: E402
from cascade_lab.results import Result, to_pil  # noqa: E402

POSITIVE = "evening sunset scenery blue sky nature, glass bottle with a fizzy ice cold freezing rainbow liquid in it"
NEGATIVE = "text, watermark"


def comfy_names_tree(root: Path) -> Path:
    """The tiny reference checkpoints under ComfyUI's own file names (what an exported graph asks for)."""
    (root / "models" / "checkpoints").mkdir(parents=True)
    for stage, name in zip("cb", CHECKPOINTS, strict=True):
        (root / "models" / "checkpoints" / f"stable_cascade_stage_{stage}.safetensors").symlink_to(
            reference_dir("comfyui", "models") / name)
    return root


def strip(graph: dict[str, Any]) -> dict[str, Any]:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in graph.items()}


def chunks(path: Path) -> dict[str, Any]:
    with Image.open(path) as image:
        return {k: json.loads(v) for k, v in image.text.items() if k in ("prompt", "workflow")}


@pytest.mark.reference
def test_a_comfyui_generation_runs_again_from_its_png(tmp_path: Path) -> None:
    result = load(reference_dir("comfyui", "workflows") / "text_to_image.result.safetensors")
    texts = {POSITIVE: (result["6.cond"], result["6.pooled"]), NEGATIVE: (result["7.cond"], result["7.pooled"])}
    params = GenerationParams(POSITIVE, NEGATIVE, width=256, height=256, seed=11, seed_b=12, steps_c=3, steps_b=2,
                              compat="comfyui", **COMFYUI_DEFAULTS)
    out = comfy_pipeline(texts).run(params)
    original = Result(to_pil(out.images, rounding="truncate"), params)
    [png] = original.save(tmp_path / "gen.png")
    saved = chunks(png)
    _, notes = api_prompt(params)
    assert notes == []  # compat="comfyui": nothing ComfyUI lacks
    assert strip(ui_to_api(saved["workflow"])) == strip(saved["prompt"])
    assert not any(n["type"] == "Note" for n in saved["workflow"]["nodes"])
    comfy = comfy_names_tree(tmp_path / "ComfyUI")
    given = {"6": texts[POSITIVE], "7": texts[NEGATIVE]}  # no CLIP tokenizer here: the stored encodings
    check(saved["prompt"], models=comfy, outputs=given)
    again = run(saved["prompt"], models=comfy, configs=tiny_configs(), outputs=given)["9"]
    official = api_prompt(GenerationParams(POSITIVE, NEGATIVE, seed=11, loras=(), shift_b=1.5))[0]
    check(official, models=comfy, outputs=given)  # the nearest nodes of the official sampler are valid too
    torch.testing.assert_close(again.latent_c, out.latent_c, rtol=0, atol=0)
    with Image.open(png) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(again.image))
    original.images[0].save(tmp_path / "pil.png")  # PIL's own save of a result image carries the graph too
    assert chunks(tmp_path / "pil.png") == saved
    back = read_png_params(png)  # cascade_lab's own chunk wins over the graph
    assert back == params


def test_the_official_sampler_maps_to_the_nearest_nodes_with_a_note() -> None:
    params = GenerationParams("a fox", seed=5, loras=(("/l/style.safetensors", 0.5),), shift_c=3.0,
                              cfg_c=(4.0, 2.0))
    graph, notes = api_prompt(params)
    assert (graph["3"]["inputs"]["sampler_name"], graph["3"]["inputs"]["scheduler"]) == ("ddpm", "simple")
    assert graph["33"]["inputs"]["seed"] == 5 and graph["34"]["inputs"]["compression"] == 42
    assert graph["60"]["class_type"] == "LoraLoaderModelOnly"
    assert graph["60"]["inputs"]["lora_name"] == "style.safetensors"
    assert graph["70"]["inputs"]["shift"] == 3.0 and graph["3"]["inputs"]["model"] == ["70", 0]
    assert any("CFG rescale 0.7" in n for n in notes) and any("interpolated" in n for n in notes)
    ui = ui_workflow(graph, notes)
    [note] = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert "CFG rescale" in note["widgets_values"][0]
    sampler = next(n for n in ui["nodes"] if n["id"] == 3)
    assert sampler["widgets_values"] == [5, "fixed", 20, 4.0, "ddpm", "simple", 1.0]  # control_after_generate
    xs = {n["id"]: n["pos"][0] for n in ui["nodes"]}
    assert xs[41] < xs[60] < xs[70] < xs[3] < xs[36] < xs[33] < xs[8] < xs[9]  # left to right along the links
    assert strip(ui_to_api(ui)) == strip(graph)
    lite = api_prompt(params.replace(variant="lite"))[0]
    assert lite["41"]["inputs"]["ckpt_name"] == "stable_cascade_stage_c_lite.safetensors"


def test_img2img_and_a_canny_controlnet_map_to_their_nodes() -> None:
    params = GenerationParams("a fox", seed=1, init_image="/in/photo.png", strength=0.6,
                              controls=(("canny", "/in/edges.png", 0.8, 0.0, 0.9, "", "/m/canny.safetensors", 0, 0),))
    graph, notes = api_prompt(params)
    assert graph["49"]["class_type"] == "StableCascade_StageC_VAEEncode" and graph["3"]["inputs"]["denoise"] == 0.6
    assert graph["48"]["inputs"]["image"] == "photo.png" and graph["33"]["inputs"]["latent_image"] == ["49", 1]
    assert graph["102"]["class_type"] == "Canny" and graph["103"]["inputs"]["image"] == ["102", 0]
    assert graph["3"]["inputs"]["positive"] == ["103", 0] and graph["3"]["inputs"]["negative"] == ["103", 1]
    assert graph["36"]["inputs"]["conditioning"] == ["6", 0]  # Stage B sees the text, not the ControlNet
    assert strip(ui_to_api(ui_workflow(graph, notes))) == strip(graph)
    remix = api_prompt(GenerationParams("", seed=1, variations=(("/in/a.png", 1.0), ("/in/b.png", 0.5))))[0]
    assert remix["41"]["class_type"] == "unCLIPCheckpointLoader" and remix["6"]["inputs"]["text"] == ""
    assert remix["85"]["inputs"] == {"conditioning": ["82", 0], "clip_vision_output": ["84", 0], "strength": 0.5,
                                     "noise_augmentation": 0.0}
    assert remix["84"]["inputs"]["clip_vision"] == ["41", 3] and remix["3"]["inputs"]["positive"] == ["85", 0]
    assert strip(ui_to_api(ui_workflow(remix))) == strip(remix)


def test_a_comfyui_png_reads_back_into_parameters() -> None:
    png = reference_dir("comfyui", "workflows") / "image_to_image.output.png"
    params = read_png_params(png)
    assert (params.prompt, params.negative_prompt) == (POSITIVE, NEGATIVE)
    assert (params.seed, params.seed_b, params.steps_c, params.steps_b) == (321653652654528, 980291192346449, 20, 10)
    assert (params.cfg_c, params.cfg_b, params.denoise, params.compression) == (4.0, 1.1, 0.6, 32.0)
    assert (params.sampler_c, params.scheduler_c, params.compat) == ("euler_ancestral", "simple", "comfyui")
    assert params.init_image == "example.png" and (params.width, params.height) == Image.open(png).size
    params.validate()


def test_the_workflow_chunk_alone_reads_back_the_same(tmp_path: Path) -> None:
    """A PNG with only the UI form (the prompt chunk stripped) gives the parameters the API form gives."""
    from PIL.PngImagePlugin import PngInfo

    ui = (reference_dir("comfyui", "workflows") / "text_to_image.workflow.json").read_text()
    api = (reference_dir("comfyui", "workflows") / "text_to_image.api.json").read_text()
    for name, key, text in (("ui.png", "workflow", ui), ("api.png", "prompt", api)):
        info = PngInfo()
        info.add_text(key, text)
        Image.new("RGB", (1024, 1024)).save(tmp_path / name, pnginfo=info)
    from_ui, from_api = read_png_params(tmp_path / "ui.png"), read_png_params(tmp_path / "api.png")
    assert from_ui == from_api
    assert (from_api.width, from_api.height, from_api.seed, from_api.seed_b) == (1024, 1024, 314307448448003,
                                                                                 183495397600639)
    assert from_api.prompt == POSITIVE and from_api.compression == 42.0 and from_api.denoise == 1.0


def test_a_png_with_neither_chunk_says_so(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no 'cascade_lab' text chunk and no ComfyUI"):
        read_png_params(tmp_path / "plain.png")
