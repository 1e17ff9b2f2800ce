"""Reading ComfyUI's three workflow forms, and the checks that stop a bad workflow before any model loads: one
message naming every problem, nothing written."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import reference_dir

from cascade_lab.comfyui import WorkflowError, apply_settings, parse_setting, read_workflow, run, ui_to_api
from cascade_lab.comfyui.nodes import NODES, widget_names


def workflows() -> Path:
    return reference_dir("comfyui", "workflows")


def bare(graph: dict[str, Any]) -> dict[str, Any]:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in graph.items()}


@pytest.mark.reference
@pytest.mark.parametrize("name", ["text_to_image", "image_to_image"])
def test_the_ui_workflow_gives_comfyuis_api_prompt(name: str) -> None:
    api, _ = read_workflow(workflows() / f"{name}.api.json")
    ui_graph, ui = read_workflow(workflows() / f"{name}.workflow.json")
    assert bare(ui_graph) == bare(api) and ui is not None
    assert ui_graph["6"]["_meta"]["title"] == "CLIP Text Encode (Positive Prompt)"
    assert api["3"]["inputs"]["seed"] == 321653652654528 or name == "text_to_image"


@pytest.mark.reference
def test_a_comfyui_png_gives_its_prompt_and_workflow() -> None:
    graph, ui = read_workflow(workflows() / "image_to_image.output.png")
    api, _ = read_workflow(workflows() / "image_to_image.api.json")
    assert bare(graph) == bare(api)
    assert ui is not None and {n["id"] for n in ui["nodes"]} >= {3, 8, 9, 33, 48, 49}


def test_widgets_values_follow_comfyuis_widget_order() -> None:
    assert widget_names("KSampler") == ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert widget_names("KSamplerAdvanced")[:3] == ["add_noise", "noise_seed", None]
    assert widget_names("LoadImage") == ["image", "upload"]
    assert widget_names("StableCascade_EmptyLatentImage") == ["width", "height", "compression", "batch_size"]


def _ui(nodes: list[dict[str, Any]], links: list[list[Any]]) -> dict[str, Any]:
    return {"last_node_id": 99, "last_link_id": 99, "nodes": nodes, "links": links, "version": 0.4}


def _node(node_id: int, kind: str, widgets: list[Any] | None = None, inputs: list[dict[str, Any]] | None = None,
          outputs: list[dict[str, Any]] | None = None, mode: int = 0) -> dict[str, Any]:
    return {"id": node_id, "type": kind, "mode": mode, "inputs": inputs or [], "outputs": outputs or [],
            "widgets_values": widgets if widgets is not None else []}


def test_reroutes_primitives_muted_and_bypassed_nodes_as_the_frontend_sends_them() -> None:
    nodes = [
        _node(1, "LoadImage", ["a.png", "image"], outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]},
                                                           {"name": "MASK", "type": "MASK", "links": [5]}]),
        _node(2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}], outputs=[{"type": "IMAGE", "links": [2]}]),
        # bypassed: its IMAGE input goes straight through to what its IMAGE output fed
        _node(3, "ImageScale", ["bilinear", 64, 64, "disabled"], inputs=[{"name": "image", "type": "IMAGE", "link": 2}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [3]}], mode=4),
        _node(4, "PrimitiveNode", [7], outputs=[{"name": "INT", "type": "INT", "links": [4],
                                                  "widget": {"name": "expand"}}]),
        _node(5, "GrowMask", [0, True], inputs=[{"name": "mask", "type": "MASK", "link": 5},
                                                {"name": "expand", "type": "INT", "link": 4,
                                                 "widget": {"name": "expand"}}],
              outputs=[{"name": "MASK", "type": "MASK", "links": [6]}]),
        _node(6, "JoinImageWithAlpha", inputs=[{"name": "image", "type": "IMAGE", "link": 3},
                                               {"name": "alpha", "type": "MASK", "link": 6}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [7]}]),
        _node(7, "SaveImage", ["out"], inputs=[{"name": "images", "type": "IMAGE", "link": 7}]),
        _node(8, "PreviewImage", inputs=[{"name": "images", "type": "IMAGE", "link": None}], mode=2),  # muted
        _node(9, "Note", ["a note"]),
    ]
    links = [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 6, 0, "IMAGE"], [4, 4, 0, 5, 1, "INT"],
             [5, 1, 1, 5, 0, "MASK"], [6, 5, 0, 6, 1, "MASK"], [7, 6, 0, 7, 0, "IMAGE"]]
    graph = ui_to_api(_ui(nodes, links))
    assert sorted(graph, key=int) == ["1", "5", "6", "7"]
    assert graph["6"]["inputs"] == {"image": ["1", 0], "alpha": ["5", 0]}
    assert graph["5"]["inputs"] == {"mask": ["1", 1], "expand": 7, "tapered_corners": True}
    assert graph["1"]["inputs"] == {"image": "a.png", "upload": "image"}
    # the newer link format (objects) reads the same
    objects = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link, strict=True))
               for link in links]
    assert ui_to_api(_ui(nodes, objects)) == graph  # type: ignore[arg-type]


def test_a_group_node_the_workflow_does_not_define_is_named() -> None:
    ui = _ui([_node(5, "workflow/my sampler")], [])
    ui["extra"] = {"groupNodes": {"other": {"nodes": [], "links": []}}}
    with pytest.raises(WorkflowError, match="node 5 is the group node 'my sampler', which the workflow does not"):
        ui_to_api(ui)


def test_set_changes_inputs_and_names_what_is_not_there() -> None:
    graph = {"3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}, "_meta": {}}}
    assert apply_settings(graph, {"3.seed": 5})["3"]["inputs"]["seed"] == 5 and graph["3"]["inputs"]["seed"] == 1
    with pytest.raises(WorkflowError) as e:
        apply_settings(graph, {"4.seed": 5, "3.sed": 2, "seed": 1})
    text = str(e.value)
    assert "no node 4" in text and "no input 'sed'" in text and "write NODE.INPUT" in text
    assert parse_setting("3.seed=5") == ("3.seed", 5) and parse_setting("6.text=a fox") == ("6.text", "a fox")
    assert parse_setting("3.cfg=4.5") == ("3.cfg", 4.5)


# -- bad workflows: one message, before any model loads, nothing written -----------------------------------
@pytest.fixture
def comfy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ComfyUI install with the tiny checkpoints; loading any model fails the test."""
    models = reference_dir("comfyui", "models")
    root = tmp_path / "ComfyUI"
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "input").mkdir()
    for name in ("stable_cascade_stage_c_tiny.safetensors", "stable_cascade_stage_b_tiny.safetensors"):
        (root / "models" / "checkpoints" / name).symlink_to(models / name)
    (root / "input" / "example.png").symlink_to(workflows() / "input" / "example.png")

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded before the workflow was checked")

    from cascade_lab.comfyui.models import ModelFiles

    monkeypatch.setattr(ModelFiles, "load", no_loading)
    return root


def api(name: str = "image_to_image") -> dict[str, Any]:
    return json.loads((workflows() / f"{name}.api.json").read_text())


def fails(graph: dict[str, Any], comfy: Path, tmp_path: Path, **kwargs: Any) -> str:
    out = tmp_path / "output"
    with pytest.raises(WorkflowError) as e:
        run(graph, models=comfy, output_dir=out, **kwargs)
    assert not out.exists(), "nothing may be written for a workflow that cannot run"
    return str(e.value)


@pytest.mark.reference
def test_unknown_nodes_are_all_named_with_advice(comfy: Path, tmp_path: Path) -> None:
    graph = api()
    graph["50"] = {"class_type": "CannyEdgePreprocessor", "inputs": {"image": ["48", 0]},
                   "_meta": {"title": "Canny edges"}}
    graph["51"] = {"class_type": "MyFancySampler", "inputs": {}}
    graph["9"]["inputs"]["images"] = ["50", 0]
    text = fails(graph, comfy, tmp_path)
    assert "2 node type(s)" in text
    assert "node 50 CannyEdgePreprocessor \"Canny edges\": replace it by the built-in Canny" in text
    assert "node 51 MyFancySampler: a custom node" in text and text.count("\n") >= 3


@pytest.mark.reference
def test_a_missing_model_file_lists_where_it_looked(comfy: Path, tmp_path: Path) -> None:
    graph = api()
    graph["42"]["inputs"]["ckpt_name"] = "stable_cascade_stage_b.safetensors"
    text = fails(graph, comfy, tmp_path)
    assert "node 42 CheckpointLoaderSimple" in text and "'stable_cascade_stage_b.safetensors'" in text
    assert f"looked in {comfy / 'models' / 'checkpoints' / 'stable_cascade_stage_b.safetensors'}" in text
    assert "stable_cascade_stage_b_tiny.safetensors" in text  # what is there instead


@pytest.mark.reference
def test_a_missing_input_image_is_named(comfy: Path, tmp_path: Path) -> None:
    graph = api()
    graph["48"]["inputs"]["image"] = "missing.png"
    assert "input image 'missing.png' not found" in fails(graph, comfy, tmp_path)


@pytest.mark.reference
def test_broken_links_and_wrong_input_types_are_reported_together(comfy: Path, tmp_path: Path) -> None:
    graph = api()
    graph["3"]["inputs"]["positive"] = ["99", 0]  # no node 99
    graph["33"]["inputs"]["latent_image"] = ["6", 0]  # CONDITIONING into a LATENT input
    graph["8"]["inputs"]["vae"] = ["42", 5]  # CheckpointLoaderSimple has 3 outputs
    graph["3"]["inputs"]["steps"] = "twenty"
    graph["3"]["inputs"]["sampler_name"] = "euler_a"
    text = fails(graph, comfy, tmp_path)
    assert "5 problem(s)" in text
    assert "node 3 KSampler input 'positive': broken link, node 99 does not exist" in text
    assert "node 33 KSampler input 'latent_image': wrong input type, needs LATENT but gets CONDITIONING (output " \
           "'CONDITIONING' of node 6 CLIPTextEncode)" in text
    assert "input 'vae': broken link to output 5 of node 42 CheckpointLoaderSimple, which has 3 output(s)" in text
    assert "input 'steps': wrong input type, needs INT but got 'twenty'" in text
    assert "'euler_a' is not one of" in text


@pytest.mark.reference
def test_a_broken_link_in_the_ui_form_and_a_muted_input(comfy: Path, tmp_path: Path) -> None:
    ui = json.loads((workflows() / "image_to_image.workflow.json").read_text())
    broken = copy.deepcopy(ui)
    broken["links"] = [link for link in broken["links"] if link[0] != 98]  # samples of VAEDecode 8
    assert "node 8 VAEDecode input 'samples': broken link (link 98)" in fails(broken, comfy, tmp_path)
    muted = copy.deepcopy(ui)
    next(n for n in muted["nodes"] if n["id"] == 48)["mode"] = 2  # LoadImage muted
    assert "input 'image': missing (connect it, or check that the node feeding it is not muted)" in fails(
        muted, comfy, tmp_path)


@pytest.mark.reference
def test_text_encoding_without_a_tokenizer_stops_before_loading(comfy: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    text = fails(api(), comfy, tmp_path)
    assert "node 6 CLIPTextEncode" in text and "no CLIP tokenizer" in text and "outputs=" in text


def test_a_workflow_without_an_output_node(tmp_path: Path) -> None:
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}}
    with pytest.raises(WorkflowError, match="no SaveImage or PreviewImage"):
        run(graph, models=tmp_path)


def test_image_nodes_run_without_models(tmp_path: Path) -> None:
    """A graph of image and mask nodes only: LoadImage (with alpha), GrowMask, InvertMask, ThresholdMask,
    JoinImageWithAlpha, ImageScale, EmptyImage, ImageCompositeMasked, PreviewImage."""
    import numpy as np
    from PIL import Image

    (tmp_path / "input").mkdir()
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[10:20, 10:20, 3] = 0  # transparent square → mask 1 there
    Image.fromarray(rgba, "RGBA").save(tmp_path / "input" / "a.png")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png", "upload": "image"}},
        "2": {"class_type": "GrowMask", "inputs": {"mask": ["1", 1], "expand": 2, "tapered_corners": False}},
        "3": {"class_type": "InvertMask", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "ThresholdMask", "inputs": {"mask": ["3", 0], "value": 0.5}},
        "5": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["1", 0], "alpha": ["4", 0]}},
        "6": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                      "width": 24, "height": 0, "crop": "disabled"}},
        "7": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 32, "batch_size": 1, "color": 0x0000FF}},
        "8": {"class_type": "ImageCompositeMasked", "inputs": {"destination": ["7", 0], "source": ["1", 0], "x": 0,
                                                               "y": 0, "resize_source": False, "mask": ["2", 0]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    out = run(graph, models=tmp_path, input_dir=tmp_path / "input")
    joined = out.images["9"]
    assert joined.shape == (1, 32, 48, 4)
    # the mask (1 where transparent) grown by 2 px with a square kernel is 14×14; inverted and thresholded it is 0
    # there, and JoinImageWithAlpha's alpha is 1 − its mask input: opaque on those 14×14 pixels only
    assert joined[0, 8:22, 8:22, 3].sum() == 196 and joined[..., 3].sum() == 196
    assert out.images["10"].shape == (1, 16, 24, 3)
    composite = out.images["11"]
    assert composite[0, 15, 15].tolist() == pytest.approx([200 / 255, 0, 0])  # the source inside the mask
    assert composite[0, 0, 0].tolist() == [0.0, 0.0, 1.0]  # the blue destination outside
    assert out["9"].images[0].mode == "RGB" and out["10"].images[0].size == (24, 16)


def test_every_node_has_a_runner() -> None:
    from cascade_lab.comfyui.execute import Executor

    assert [kind for kind in NODES if not hasattr(Executor, "node_" + kind)] == []


@pytest.mark.reference
def test_a_png_with_only_the_workflow_chunk_and_one_with_none(tmp_path: Path) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    ui = (workflows() / "image_to_image.workflow.json").read_text()
    info = PngInfo()
    info.add_text("workflow", ui)
    Image.new("RGB", (8, 8)).save(tmp_path / "ui_only.png", pnginfo=info)
    graph, kept = read_workflow(tmp_path / "ui_only.png")
    assert bare(graph) == bare(read_workflow(workflows() / "image_to_image.api.json")[0]) and kept is not None
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(WorkflowError, match="no ComfyUI workflow in this PNG"):
        read_workflow(tmp_path / "plain.png")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(WorkflowError, match="not valid JSON"):
        read_workflow(tmp_path / "broken.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(WorkflowError, match="neither ComfyUI's UI form"):
        read_workflow(tmp_path / "other.json")


@pytest.mark.reference
def test_reading_and_checking_a_workflow_imports_no_torch(tmp_path: Path) -> None:
    """The checks run before any model loads, and cheaply: no torch, no transformers."""
    import subprocess
    import sys

    code = ("import sys\nfrom cascade_lab.comfyui import WorkflowError, check\n"
            f"try:\n    check({str(workflows() / 'image_to_image.workflow.json')!r}, models={str(tmp_path)!r})\n"
            "except WorkflowError as e:\n    print('not found' in str(e))\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "False", "False"], out.stdout + out.stderr


def test_canny_is_kornias_when_installed_else_opencvs_with_a_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import torch

    from cascade_lab.comfyui.image_nodes import canny

    image = torch.zeros(1, 40, 40, 3)
    image[:, 10:30, 10:30] = 1.0  # a white square: edges along its border
    monkeypatch.setitem(sys.modules, "kornia", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "kornia.filters", None)
    with pytest.warns(UserWarning, match="OpenCV's Canny"):
        edges = canny(image, 0.4, 0.8)
    assert edges.shape == (1, 40, 40, 3) and set(edges.unique().tolist()) == {0.0, 1.0}
    assert edges[0, 20, 20, 0] == 0 and edges[0, 10:30, 8:12].max() == 1
