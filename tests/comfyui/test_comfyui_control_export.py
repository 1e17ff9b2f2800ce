"""A cascade_lab generation with a canny or inpainting ControlNet exports (PNG ``prompt`` chunk) as a real ComfyUI
graph that builds the official filter's ControlNet input from the files, and that graph, run by the runner on the
tiny models, gives the cascade_lab image.

Inpainting is exact: LoadImage → ImageScale, LoadImageMask → ThresholdMask → GrowMask, EmptyImage +
ImageCompositeMasked (masked pixels white), InvertMask + JoinImageWithAlpha (the mask as the 4th channel), and the
original composited back outside the mask, compute the InpaintFilter's numbers. Canny is exact but for the edge
detector: ComfyUI's Canny node (kornia: Gaussian-blurred luma, L2 gradient) cannot give OpenCV's edge pixels at any
thresholds, so the graph runs once as exported (the same edges on most pixels, a different image) and once with the
Canny node's output given as the official filter's 224² edges, which must give the cascade_lab image."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import reference_dir
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from comfy_models import comfy_pipeline, load, reference_tables  # noqa: E402,F401
from test_comfyui_png_export import NEGATIVE, POSITIVE, chunks, comfy_names_tree  # noqa: E402
from test_comfyui_runner import tiny_configs  # noqa: E402

from cascade_lab import Cascade  # noqa: E402
from cascade_lab.comfyui import check, run  # noqa: E402
from cascade_lab.controls import Control  # noqa: E402
from cascade_lab.models.controlnet import ControlNetConfig  # noqa: E402
from cascade_lab.params import COMFYUI_DEFAULTS  # noqa: E402

pytestmark = [pytest.mark.reference, pytest.mark.usefixtures("reference_tables")]
TINY_CNET = {"c_proj": 32, "proj_blocks": [0, 5], "bottleneck_mode": "simple"}  # the tiny Stage C's blocks 0, 5
FILES = {"canny": ("stable_cascade_canny.safetensors", 1), "inpainting": ("stable_cascade_inpainting.safetensors", 4)}
# compression 32 at 256²: ComfyUI hands the ControlNet its image at latent × 32 = 256², cascade_lab at the size
SETTINGS = dict(width=256, height=256, seed=11, seed_b=12, steps_c=3, steps_b=2, compat="comfyui",
                **{**COMFYUI_DEFAULTS, "compression": 32.0})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Cascade, dict[str, Any], dict[str, Any]]:
    """A ComfyUI tree (the tiny checkpoints under ComfyUI's names, tiny random ControlNets, input images) and a
    Cascade on the same tiny models with ComfyUI's stored text conditioning."""
    from safetensors.torch import save_file

    root = comfy_names_tree(tmp_path_factory.mktemp("export") / "ComfyUI")
    (root / "models" / "controlnet").mkdir()
    (root / "input").mkdir()
    nets = {}
    torch.manual_seed(0)
    for kind, (name, c_in) in FILES.items():
        net = ControlNetConfig(c_in=c_in, **TINY_CNET).build()  # type: ignore[arg-type]
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "models" / "controlnet" / name))
        nets[kind] = net.eval().requires_grad_(False)
    yy, xx = np.mgrid[0:256, 0:256]
    picture = np.stack([128 + 90 * np.sin(xx / 9 + yy / 23), 128 + 80 * np.cos(yy / 7), 110 + 0 * xx], -1)
    picture[60:150, 40:200] = (230, 210, 40)  # flat shapes with clear edges
    picture[(yy - 180) ** 2 + (xx - 120) ** 2 < 45**2] = (20, 160, 230)
    Image.fromarray(picture.astype(np.uint8)).save(root / "input" / "photo.png")
    mask = np.zeros((256, 256), np.uint8)
    mask[90:170, 70:190] = 255
    Image.fromarray(mask, "L").save(root / "input" / "hole.png")
    stored = load(reference_dir("comfyui", "workflows") / "text_to_image.result.safetensors")
    texts = {POSITIVE: (stored["6.cond"], stored["6.pooled"]), NEGATIVE: (stored["7.cond"], stored["7.pooled"])}
    cascade = Cascade("tiny")
    cascade._pipeline, cascade.variant_name = comfy_pipeline(texts), "tiny"  # the stages ComfyUI runs
    return root, cascade, nets, {"6": texts[POSITIVE], "7": texts[NEGATIVE]}


def generate(setup: Any, control: Control, tmp_path: Path, **settings: Any) -> tuple[Any, dict[str, Any]]:
    root, cascade, _, _ = setup
    result = cascade.generate(POSITIVE, NEGATIVE, controls=[control], **{**SETTINGS, **settings})
    [png] = result.save(tmp_path / "gen.png")
    return result, chunks(png)


def test_an_inpainting_generation_runs_again_from_its_png(setup: Any, tmp_path: Path) -> None:
    root, _, nets, texts = setup
    control = Control("inpainting", str(root / "input" / "photo.png"), strength=0.9, end=0.8,
                      mask=str(root / "input" / "hole.png"), model=nets["inpainting"], grow=3, feather=4)
    result, saved = generate(setup, control, tmp_path)
    graph = saved["prompt"]
    kinds = {v["class_type"] for v in graph.values()}
    assert {"LoadImageMask", "ThresholdMask", "GrowMask", "EmptyImage", "ImageCompositeMasked", "InvertMask",
            "JoinImageWithAlpha", "ControlNetLoader", "ControlNetApplyAdvanced"} <= kinds
    apply = graph["103"]["inputs"]
    assert (apply["strength"], apply["start_percent"], apply["end_percent"]) == (0.9, 0.0, 0.8)
    assert graph["100"]["inputs"]["control_net_name"] == "stable_cascade_inpainting.safetensors"
    assert graph["105"]["inputs"] == {"image": "hole.png", "channel": "red", "upload": "image"}
    assert graph["107"]["inputs"]["expand"] == 3 and graph["9"]["inputs"]["images"] == ["1000", 0]
    assert graph["112"]["inputs"] | {"image": None} == {"image": None, "blur_radius": 4, "sigma": 0.5}  # feather
    assert graph["1000"]["inputs"]["mask"] == ["114", 0] and graph["103"]["inputs"]["image"] == ["102", 0]
    notes = next(n for n in saved["workflow"]["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "luma" in notes and "ControlNet input size" not in notes
    check(graph, models=root, outputs=texts)  # the runner's pre-load check
    again = run(graph, models=root, outputs=texts, configs={**tiny_configs(), **configs()})
    torch.testing.assert_close(again["9"].latent_c, result.latent_c, rtol=0, atol=0)  # the composite's Result
    with Image.open(tmp_path / "gen.png") as png:
        mine = np.asarray(png.convert("RGB")).astype(int)
    theirs = np.asarray(again["9"].image).astype(int)
    assert np.array_equal(mine, theirs)  # measured: the same pixels (and the same float32 Stage C latent)
    # outside the mask (grown by 3) the photo itself, as cascade_lab composites it
    photo = np.asarray(Image.open(root / "input" / "photo.png").convert("RGB")).astype(int)
    assert np.array_equal(theirs[:80], photo[:80]) and not np.array_equal(theirs[100:160, 80:180],
                                                                          photo[100:160, 80:180])


def configs() -> dict[str, Any]:
    return {f"controlnet:{name}": {"c_in": c_in, **TINY_CNET} for name, c_in in FILES.values()}


def test_a_canny_generation_runs_again_from_its_png(setup: Any, tmp_path: Path) -> None:
    import cv2

    from cascade_lab.comfyui.image_nodes import canny as comfy_canny

    root, _, nets, texts = setup
    control = Control("canny", str(root / "input" / "photo.png"), strength=0.8, start=0.2, end=0.6,
                      model=nets["canny"])
    # on 5 karras steps ComfyUI's σ range (its start / end percent) is not the fraction of the steps: under
    # compat="comfyui" cascade_lab applies the range as ComfyUI does
    result, saved = generate(setup, control, tmp_path, scheduler_c="karras", steps_c=5)
    graph = saved["prompt"]
    assert graph["104"]["inputs"]["width"] == 224 and graph["104"]["inputs"]["upscale_method"] == "bilinear"
    assert (graph["102"]["inputs"]["low_threshold"], graph["102"]["inputs"]["high_threshold"]) == (0.25, 0.51)
    notes = next(n for n in saved["workflow"]["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "kornia" in notes and "(0.25 / 0.51)" in notes
    check(graph, models=root, outputs=texts)
    full = {**tiny_configs(), **configs()}
    exported = run(graph, models=root, outputs=texts, configs=full)
    # the official filter's edges at 224² (before its resize back), given as the Canny node's output
    photo = torch.from_numpy(np.asarray(Image.open(root / "input" / "photo.png").convert("RGB")).copy())
    x = photo.float().div(255).movedim(-1, 0)[None]
    small = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear")
    edges = torch.from_numpy(cv2.Canny(small.mul(255)[0].permute(1, 2, 0).numpy().astype(np.uint8), 100, 200))
    edges = edges.float().div(255)
    official = run(graph, models=root, outputs={**texts, "102": edges[None, :, :, None].expand(1, -1, -1, 3)},
                   configs=full)
    torch.testing.assert_close(official["9"].latent_c, result.latent_c, rtol=0, atol=0)
    assert np.array_equal(np.asarray(official["9"].image), np.asarray(result.image))
    theirs = comfy_canny(small.movedim(1, -1), 0.25, 0.51)[0, ..., 0]  # the Canny node's edges, as exported

    def near(e: torch.Tensor) -> torch.Tensor:  # within one pixel of an edge of e
        return torch.nn.functional.max_pool2d(e[None, None], 3, 1, 1)[0, 0]

    assert (theirs * near(edges)).sum() / theirs.sum() > 0.9, "ComfyUI's edges lie on or next to the official ones"
    assert (edges * near(theirs)).sum() / edges.sum() > 0.75, "and find most of them"
    assert not torch.allclose(exported["9"].latent_c, result.latent_c), "kornia's edges: another image"


def test_what_the_inpainting_graph_cannot_hold_is_noted() -> None:
    """Boxes as the mask, a feather at the border and ComfyUI's own ControlNet input size: a Note each; the graph
    takes the LoadImage's mask (paint it in ComfyUI) and converts to the UI form and back."""
    from cascade_lab.comfyui import ui_to_api
    from cascade_lab.comfyui.export import api_prompt, ui_workflow
    from cascade_lab.params import GenerationParams

    params = GenerationParams("a fox", seed=1, compat="comfyui", controls=(
        ("inpainting", "/in/photo.png", 1.0, 0.0, 1.0, "[(10, 10, 50, 60)]", "", 0, 4),))
    graph, notes = api_prompt(params)
    assert graph["106"]["inputs"]["mask"] == ["101", 1] and "107" not in graph  # no grow: no GrowMask
    assert graph["1000"]["inputs"]["mask"] == ["114", 0] and graph["114"]["class_type"] == "InvertMask"
    assert graph["102"]["inputs"]["alpha"] == ["110", 0]  # the ControlNet sees the hard mask, not the feather
    text = "\n".join(notes)
    assert "the mask was boxes" in text and "reflects the border" in text and "latent × 32 (768x768)" in text
    strip = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in graph.items()}
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
            for k, v in ui_to_api(ui_workflow(graph, notes)).items()} == strip


def test_a_super_resolution_control_exports_comfyuis_sr_node() -> None:
    """The SR ControlNet's input is the half-size image's EfficientNet latent: ImageScale to half the size, then
    StableCascade_SuperResolutionControlnet's controlnet_input (on the Stage C checkpoint's VAE), not the picture."""
    from cascade_lab.comfyui.export import api_prompt
    from cascade_lab.comfyui.graph import check as check_graph
    from cascade_lab.params import GenerationParams

    params = GenerationParams("a fox", width=512, height=384, seed=1, compat="comfyui", compression=32.0,
                              controls=(("super_resolution", "/in/low.png", 1.0, 0.0, 1.0, "", "", 0, 0),))
    graph, notes = api_prompt(params)
    assert graph["100"]["inputs"]["control_net_name"] == "stable_cascade_super_resolution.safetensors"
    assert graph["104"]["inputs"]["width"] == 256 and graph["104"]["inputs"]["height"] == 192
    assert graph["105"]["class_type"] == "StableCascade_SuperResolutionControlnet"
    assert graph["105"]["inputs"] == {"image": ["104", 0], "vae": ["41", 2]}
    assert graph["103"]["inputs"]["image"] == ["105", 0] and not any("super_resolution" in n for n in notes)
    with pytest.raises(Exception, match="not found") as err:  # only the files are missing: links and types check
        check_graph(graph)
    assert "wrong input type" not in str(err.value) and "broken link" not in str(err.value)
    assert any("compression 42" in n for n in api_prompt(params.replace(compression=42.0))[1])


def test_a_super_resolution_generation_runs_again_from_its_png(setup: Any, tmp_path: Path) -> None:
    """Run end to end: the Stage C checkpoint's VAE holds a real-size (random, calibrated) EfficientNet, the SR
    ControlNet is the 'large' bottleneck kind ComfyUI recognises. With the low image at half the size (no
    downscale in either) the exported graph gives the cascade_lab Stage C latent to the rounding of the
    ImageNet mean / std that ComfyUI's VAE file stores in float16 (measured 9e-5 of the largest value)."""
    from safetensors.torch import load_file, save_file

    from cascade_lab.models.tiny import calibrated_random_effnet
    from cascade_lab.weights import load_stage

    shared_root, _, nets, texts = setup
    root = comfy_names_tree(tmp_path / "ComfyUI")
    (root / "models" / "controlnet").mkdir()
    ckpt = root / "models" / "checkpoints" / "stable_cascade_stage_c.safetensors"
    state = {k: v for k, v in load_file(str(ckpt.resolve())).items()
             if not k.startswith("vae.encoder.") or k in ("vae.encoder.mean", "vae.encoder.std")}
    state |= {f"vae.encoder.{k}": v.half() if v.is_floating_point() else v
              for k, v in calibrated_random_effnet().state_dict().items()}
    ckpt.unlink()
    save_file(state, str(ckpt))
    sr = {"c_in": 16, **TINY_CNET, "bottleneck_mode": "large"}
    torch.manual_seed(1)
    net = ControlNetConfig(**sr).build()  # type: ignore[arg-type]
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(root / "models" / "controlnet" / "stable_cascade_super_resolution.safetensors"))
    cascade = Cascade("tiny")
    cascade._pipeline, cascade.variant_name = comfy_pipeline({POSITIVE: texts["6"], NEGATIVE: texts["7"]}), "tiny"
    cascade.pipeline.stages.effnet = load_stage("effnet", ckpt, dtype=torch.float32)
    low = shared_root / "input" / "photo.png"  # 256², half of the 512² generated
    control = Control("super_resolution", str(low), model=net.eval().requires_grad_(False))
    result = cascade.generate(POSITIVE, NEGATIVE, controls=[control], **{**SETTINGS, "width": 512, "height": 512})
    [png] = result.save(tmp_path / "gen.png")
    graph = chunks(png)["prompt"]
    assert graph["105"]["class_type"] == "StableCascade_SuperResolutionControlnet"
    (root / "input").mkdir()
    (root / "input" / "photo.png").symlink_to(low)
    check(graph, models=root, outputs=texts)
    full = {**tiny_configs(), **configs(), "controlnet:stable_cascade_super_resolution.safetensors": sr}
    again = run(graph, models=root, outputs=texts, configs=full)
    expected = result.latent_c
    torch.testing.assert_close(again["9"].latent_c, expected, rtol=0, atol=3e-4 * expected.abs().max().item())
