"""With CLIP's tokenizer made offline from OpenAI's BPE file (`cascade_lab.comfyui.tokenizer`), the workflows'
CLIPTextEncode nodes run on the tiny CLIP-G of the ComfyUI checkpoint and give ComfyUI's stored conditioning; the
text-to-image example then runs from the workflow alone, also from the command line.

The BPE file comes from the open_clip_torch wheel: an installed ``open_clip``, ``$CASCADE_LAB_CLIP_BPE`` (the
.txt.gz or the wheel), or ``pip download --no-deps open_clip_torch`` into the pytest cache (else the temp
folder); without any of them these tests skip (the tokenizer is an optional extra).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import reference_dir

sys.path.insert(0, str(Path(__file__).parent))
from comfy_models import load  # noqa: E402
from test_comfyui_runner import assert_rel, comfyui_tree, reference_tables, tiny_configs  # noqa: E402,F401

from cascade_lab import cli, read_png_params  # noqa: E402
from cascade_lab.comfyui import run  # noqa: E402
from cascade_lab.comfyui.tokenizer import write_clip_tokenizer  # noqa: E402

PROMPT = "evening sunset scenery blue sky nature, glass bottle with a fizzy ice cold freezing rainbow liquid in it"


@pytest.fixture(scope="module")
def bpe(request: pytest.FixtureRequest) -> Any:
    if os.environ.get("CASCADE_LAB_CLIP_BPE"):
        return os.environ["CASCADE_LAB_CLIP_BPE"]
    if importlib.util.find_spec("open_clip") is not None:
        return None  # write_clip_tokenizer finds the installed package's file
    store = getattr(request.config, "cache", None)  # pytest's cache folder, or the temp folder without it
    cache = Path(str(store.mkdir("open_clip_wheel"))) if store else Path(tempfile.gettempdir()) / "open_clip_wheel"
    wheels = sorted(cache.glob("open_clip_torch-*.whl"))
    if not wheels:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "open_clip_torch==3.3.0",
                            "-d", str(cache)], check=True, timeout=120, capture_output=True)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"no CLIP BPE file: open_clip_torch is not installed and could not be downloaded ({e})")
        wheels = sorted(cache.glob("open_clip_torch-*.whl"))
    return wheels[-1]


@pytest.fixture
def comfy(tmp_path: Path, bpe: Any) -> Path:
    """A ComfyUI install whose comfy/sd1_tokenizer is CLIP's tokenizer, as in a real one."""
    root = comfyui_tree(tmp_path / "ComfyUI")
    write_clip_tokenizer(root / "comfy" / "sd1_tokenizer", bpe)
    return root


def configs() -> dict[str, Any]:
    import json

    tiny = json.loads((reference_dir("comfyui") / "config.json").read_text())["tiny"]
    return {**tiny_configs(), "text_encoder": tiny["clip_g_model_config"]}


def test_the_tokenizer_is_clips(tmp_path: Path, bpe: Any) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path / "tok", bpe)), local_files_only=True)
    assert len(tokenizer) == 49408 and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.reference
def test_clip_text_encode_gives_comfyuis_conditioning(comfy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade_lab.comfyui.execute import Executor

    expected = load(reference_dir("comfyui", "workflows") / "image_to_image.result.safetensors")
    encoded: dict[str, Any] = {}
    encode = Executor.node_CLIPTextEncode

    def keep(self: Any, node_id: str, text: str, clip: Any) -> Any:
        encoded[node_id] = encode(self, node_id, text, clip)[0]
        return [encoded[node_id]]

    monkeypatch.setattr(Executor, "node_CLIPTextEncode", keep)
    out = run(reference_dir("comfyui", "workflows") / "image_to_image.api.json", models=comfy, configs=configs(),
              outputs={"49": expected["49.stage_c"]})  # ComfyUI's tiny EfficientNet is not the official one
    for node in ("6", "7"):
        assert_rel(encoded[node].cond, expected[f"{node}.cond"], f"CLIPTextEncode {node} cond")
        assert_rel(encoded[node].pooled, expected[f"{node}.pooled"], f"CLIPTextEncode {node} pooled")
    assert_rel(out["9"].latent_c, expected["3.samples"], "Stage C latent (node 3)")
    assert_rel(out.images["9"], expected["8.image"], "pixels (node 8)")


@pytest.mark.reference
def test_text_to_image_runs_from_the_workflow_alone_on_the_command_line(comfy: Path, tmp_path: Path) -> None:
    """Nothing given: `cascade-lab comfyui run` on the UI workflow (--configs: the tiny models' sizes)."""
    import json

    expected = load(reference_dir("comfyui", "workflows") / "text_to_image.result.safetensors")
    (tmp_path / "tiny.json").write_text(json.dumps(configs()))
    out = tmp_path / "out"
    workflow = reference_dir("comfyui", "workflows") / "text_to_image.workflow.json"
    assert cli.main(["comfyui", "run", str(workflow), "-o", str(out), "--models", str(comfy), "--quiet",
                     "--configs", str(tmp_path / "tiny.json")]) == 0
    png = out / "ComfyUI_00001_.png"
    from PIL import Image

    with Image.open(png) as image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB")).astype(np.int64))
    for window, (rows, cols) in {"top_left": (slice(0, 64), slice(0, 64)),
                                 "center": (slice(480, 544), slice(480, 544))}.items():
        comfy_u8 = (expected[f"8.image.crop_{window}"][0] * 255).clamp(0, 255).to(torch.uint8).long()  # truncation
        assert (pixels[rows, cols] - comfy_u8).abs().max() <= 1, window
    params = read_png_params(png)
    assert (params.prompt, params.seed, params.seed_b) == (PROMPT, 314307448448003, 183495397600639)
