"""The runner's image and mask nodes against ComfyUI's own outputs on the same inputs (data/comfyui_nodes/: made
once by ComfyUI's node classes, see its README), float32 at 1e-6."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cascade_lab.comfyui.execute import Executor

DATA = Path(__file__).parent / "data" / "comfyui_nodes"
FILES = ("rgba.png", "rgb.png", "gray.png", "palette.png", "gray16.png", "exif.png", "anim.png")


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(str(DATA / "image_nodes.safetensors")).items()}


@pytest.fixture(scope="module")
def nodes() -> Executor:
    return Executor({}, [], comfyui=None, extra_model_paths=None, input_dir=DATA, files=None,  # type: ignore[arg-type]
                    given={})


def same(actual: Any, wanted: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, wanted, rtol=0, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", FILES)
def test_load_image_mask_and_load_image_as_comfyui(name: str, nodes: Executor,
                                                   expected: dict[str, torch.Tensor]) -> None:
    """Every channel of RGBA, RGB, grayscale, palette-with-transparency, 16-bit, EXIF-rotated and animated PNGs
    (LoadImage: every frame, a batch; LoadImageMask: the first)."""
    for channel in ("alpha", "red", "green", "blue"):
        same(nodes.node_LoadImageMask("1", name, channel), expected[f"LoadImageMask.{name}.{channel}"],
             f"LoadImageMask {name} {channel}")
    image, mask = nodes.node_LoadImage("1", name)
    same(image, expected[f"LoadImage.{name}.image"], f"LoadImage {name} IMAGE")
    same(mask, expected[f"LoadImage.{name}.mask"], f"LoadImage {name} MASK")


def test_load_image_mask_refuses_an_unknown_channel(nodes: Executor) -> None:
    with pytest.raises(ValueError, match="channel 'luma': use one of alpha, red, green, blue"):
        nodes.node_LoadImageMask("1", "rgb.png", "luma")


def test_mask_nodes_as_comfyui(nodes: Executor, expected: dict[str, torch.Tensor]) -> None:
    mask = expected["mask"]
    for expand, tapered in ((2, True), (-1, True), (1, False), (-2, False)):
        same(nodes.node_GrowMask("1", mask, expand, tapered), expected[f"GrowMask.{expand}.{int(tapered)}"],
             f"GrowMask {expand} tapered={tapered}")
    same(nodes.node_ThresholdMask("1", mask, 0.3), expected["ThresholdMask.0.3"], "ThresholdMask")
    same(nodes.node_InvertMask("1", mask), expected["InvertMask"], "InvertMask")
    as_image = nodes.node_MaskToImage("1", mask)
    same(as_image, expected["MaskToImage"], "MaskToImage")
    for radius, sigma in ((3, 0.5), (2, 1.0)):
        same(nodes.node_ImageBlur("1", as_image, radius, sigma), expected[f"ImageBlur.{radius}.{sigma}"],
             f"ImageBlur {radius} {sigma}")
    same(nodes.node_ImageToMask("1", expected["picture"], "green"), expected["ImageToMask.green"], "ImageToMask")


def test_image_nodes_as_comfyui(nodes: Executor, expected: dict[str, torch.Tensor]) -> None:
    destination, source, small = expected["destination"], expected["source"], expected["small_mask"]
    for key, (x, y, resize, m) in (("masked", (3, 2, False, small)), ("plain", (9, 7, False, None)),
                                   ("resized", (0, 0, True, small))):
        same(nodes.node_ImageCompositeMasked("1", destination, source, x, y, resize, m),
             expected[f"ImageCompositeMasked.{key}"], f"ImageCompositeMasked {key}")
    same(nodes.node_ImageCompositeMasked("1", destination, expected["source_rgba"], 2, 1, False, small),
         expected["ImageCompositeMasked.rgba_source"], "ImageCompositeMasked RGBA source")
    same(nodes.node_JoinImageWithAlpha("1", destination, small), expected["JoinImageWithAlpha"], "JoinImageWithAlpha")
    picture = expected["picture"]
    for method in ("nearest-exact", "bilinear", "area", "bicubic", "lanczos", "bislerp"):
        for w, h, crop in ((20, 12, "disabled"), (8, 8, "center"), (0, 5, "disabled")):
            same(nodes.node_ImageScale("1", picture, method, w, h, crop),
                 expected[f"ImageScale.{method}.{w}x{h}.{crop}"],
                 f"ImageScale {method} {w}x{h} {crop}")
    same(nodes.node_EmptyImage("1", 6, 4, 2, 0x3A7FC0), expected["EmptyImage"], "EmptyImage")


def test_a_load_image_mask_workflow_runs_and_a_missing_file_stops_it_first(tmp_path: Path,
                                                                             expected: dict[str, torch.Tensor]) -> None:
    """LoadImageMask in a graph (UI widgets image, channel, upload), and its file checked before anything runs."""
    from cascade_lab.comfyui import WorkflowError, run
    from cascade_lab.comfyui.nodes import widget_names

    assert widget_names("LoadImageMask") == ["image", "channel", "upload"]
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "rgb.png", "upload": "image"}},
             "2": {"class_type": "LoadImageMask", "inputs": {"image": "rgba.png", "channel": "alpha"}},
             "3": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["1", 0], "alpha": ["2", 0]}},
             "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "m"}}}
    out = run(graph, input_dir=DATA, output_dir=tmp_path)
    rgba = out.images["4"]
    same(rgba[..., :3], expected["LoadImage.rgb.png.image"], "the image")
    same(rgba[..., 3], 1 - expected["LoadImageMask.rgba.png.alpha"], "the alpha")
    assert out["4"].params.variant == "comfyui"  # no model made it
    graph["2"]["inputs"]["image"] = "gone.png"
    with pytest.raises(WorkflowError, match="node 2 .*input image 'gone.png' not found") as err:
        run(graph, input_dir=DATA, output_dir=tmp_path / "none")
    assert "nothing was loaded or written" in str(err.value) and not (tmp_path / "none").exists()
