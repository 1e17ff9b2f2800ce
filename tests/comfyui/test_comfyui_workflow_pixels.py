"""ComfyUI's official Stable Cascade example workflows, run as `Pipeline.run` with ``compat="comfyui"`` and the
example's settings, give ComfyUI's latents and pixels (../shared/reference/comfyui/workflows/).

Text encoding is ComfyUI's stored CLIPTextEncode output (a tiny CLIP-G with the real tokenizer, which this
machine cannot fetch); image to image starts from ComfyUI's stored StageC_VAEEncode latent (its tiny
EfficientNet is not the official architecture), and the resize that feeds the encoder is checked on its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_dir

sys.path.insert(0, str(Path(__file__).parent))
from comfy_models import assert_rel, comfy_pipeline, load, reference_tables  # noqa: E402,F401

from cascade_lab.params import COMFYUI_DEFAULTS, GenerationParams  # noqa: E402
from cascade_lab.pipeline import comfy_resize  # noqa: E402
from cascade_lab.results import to_pil  # noqa: E402

POSITIVE = "evening sunset scenery blue sky nature, glass bottle with a fizzy ice cold freezing rainbow liquid in it"
NEGATIVE = "text, watermark"
STAGE_B_OUT = torch.tensor(1 / 0.43)  # ComfyUI's Stage B latent format divides the model's latent by this



pytestmark = pytest.mark.usefixtures("reference_tables")  # the reference σ tables for every test here


def workflow(name: str):  # type: ignore[no-untyped-def]
    result = load(reference_dir("comfyui", "workflows") / f"{name}.result.safetensors")
    pipeline = comfy_pipeline({POSITIVE: (result["6.cond"], result["6.pooled"]),
                               NEGATIVE: (result["7.cond"], result["7.pooled"])})
    return result, pipeline


def hwc(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 2, 3, 1)  # [B, 3, H, W] → ComfyUI's IMAGE [B, H, W, 3]


@pytest.mark.reference
def test_text_to_image_example_workflow() -> None:
    result, pipeline = workflow("text_to_image")
    params = GenerationParams(POSITIVE, NEGATIVE, width=1024, height=1024, seed=314307448448003,
                              seed_b=183495397600639, steps_c=20, steps_b=10, cfg_c=4.0, cfg_b=1.1, compat="comfyui",
                              **COMFYUI_DEFAULTS)
    assert params.latent_size_c == (24, 24) and params.latent_size_b == (256, 256)
    out = pipeline.run(params)
    assert_rel(out.latent_c, result["3.samples"], "Stage C latent (node 3)")
    latent_b = out.latent_b / STAGE_B_OUT
    assert_rel(latent_b[..., :64, :64], result["33.samples.crop_top_left"], "Stage B latent, top left (node 33)")
    assert_rel(latent_b[..., 96:160, 96:160], result["33.samples.crop_center"], "Stage B latent, centre")
    image = hwc(out.images)
    assert image.shape == (1, 1024, 1024, 3)
    assert_rel(image[:, :64, :64], result["8.image.crop_top_left"], "pixels, top left (node 8)")
    assert_rel(image[:, 480:544, 480:544], result["8.image.crop_center"], "pixels, centre")
    assert float((image < 0).float().mean() + (image > 1).float().mean()) == pytest.approx(0.1205, abs=2e-3)


@pytest.mark.reference
def test_image_to_image_example_workflow() -> None:
    result, pipeline = workflow("image_to_image")
    params = GenerationParams(POSITIVE, NEGATIVE, width=200, height=150, seed=321653652654528,
                              seed_b=980291192346449, steps_c=20, steps_b=10, cfg_c=4.0, cfg_b=1.1, denoise=0.6,
                              compat="comfyui", init_image="example.png", **{**COMFYUI_DEFAULTS, "compression": 32})
    assert params.latent_size_c == (4, 6) and params.latent_size_b == (36, 50)
    out = pipeline.run(params, init_latent=result["49.stage_c"])
    assert_rel(out.latent_c, result["3.samples"], "Stage C latent (node 3)")
    assert_rel(out.latent_b / STAGE_B_OUT, result["33.samples"], "Stage B latent (node 33)")
    assert_rel(hwc(out.images), result["8.image"], "pixels (node 8)")
    # the PNG ComfyUI's SaveImage wrote: truncated uint8, as cascade_lab writes under compat="comfyui"
    from PIL import Image

    with Image.open(reference_dir("comfyui", "workflows") / "image_to_image.output.png") as png:
        saved = np.asarray(png.convert("RGB")).astype(int)
    ours = np.asarray(to_pil(out.images, rounding="truncate")[0]).astype(int)
    assert ours.shape == saved.shape == (144, 200, 3)
    assert np.abs(ours - saved).max() <= 1 and (ours != saved).mean() < 0.01


@pytest.mark.reference
def test_stage_c_vae_encode_resize_is_comfyuis() -> None:
    """StableCascade_StageC_VAEEncode(compression 32) on the 200×150 example: crop rows 8..141, bicubic to
    192×128 without antialias or clamping; the stored window is the first 32×32 pixels of the encoder input."""
    from PIL import Image

    result = load(reference_dir("comfyui", "workflows") / "image_to_image.result.safetensors")
    expected = result["vae_encode_input.crop"]
    with Image.open(reference_dir("comfyui", "workflows", "input") / "example.png") as png:
        image = torch.from_numpy(np.asarray(png.convert("RGB")).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    resized = comfy_resize(image, 192, 128)
    assert resized.shape == (1, 3, 128, 192)
    torch.testing.assert_close(hwc(resized)[:, :32, :32], expected, atol=1e-6, rtol=1e-5)
