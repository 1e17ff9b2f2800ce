"""``run(..., dtype="bfloat16")`` samples Stage C and Stage B in bfloat16, as ComfyUI's --bf16-unet."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import reference_dir

sys.path.insert(0, str(Path(__file__).parent))
from test_comfyui_runner import comfyui_tree, given, tiny_configs  # noqa: E402

from cascade_lab.comfyui import WorkflowError, run  # noqa: E402


@pytest.mark.reference
def test_bfloat16_samples_close_to_float32(tmp_path: Path) -> None:
    _, outputs = given("text_to_image")
    source = reference_dir("comfyui", "workflows") / "text_to_image.api.json"
    root = comfyui_tree(tmp_path / "ComfyUI")
    small = {"34.width": 256, "34.height": 256}
    full = run(source, models=root, outputs=outputs, configs=tiny_configs(), set=small)["9"]
    half = run(source, models=root, outputs=outputs, configs=tiny_configs(), set=small, dtype="bf16")["9"]
    assert not torch.equal(full.latent_c, half.latent_c)  # it did run in another dtype
    torch.testing.assert_close(half.latent_c, full.latent_c, rtol=0, atol=0.05 * full.latent_c.abs().max().item())
    with pytest.raises(WorkflowError, match="dtype='float16': use 'float32' or 'bfloat16'"):
        run(source, models=root, outputs=outputs, configs=tiny_configs(), dtype="float16")
