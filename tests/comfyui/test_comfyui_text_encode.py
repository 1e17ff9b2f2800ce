"""With CLIP's tokenizer made offline from OpenAI's BPE file (`cascade_lab.comfyui.tokenizer`), the workflows'
CLIPTextEncode nodes run on the tiny CLIP-G of the ComfyUI checkpoint and give ComfyUI's stored conditioning; the
text-to-image example then runs from the workflow alone, also from the command line.

The BPE file comes from the open_clip_torch wheel: an installed ``open_clip``, ``$CASCADE_LAB_CLIP_BPE`` (the
.txt.gz or the wheel; `.ci/run` downloads the wheel once into .ci-cache/ and sets it), or ``pip download --no-deps
open_clip_torch`` into the pytest cache (else the temp folder); without any of them these tests fail, saying how
to provide the file (they never skip: CI always runs them).
"""

from __future__ import annotations

import importlib.util
import json
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
from comfy_models import assert_rel, load, reference_tables  # noqa: E402,F401
from test_comfyui_runner import comfyui_tree, tiny_configs  # noqa: E402

from cascade_lab import cli, read_png_params  # noqa: E402
from cascade_lab.comfyui import run  # noqa: E402
from cascade_lab.comfyui.tokenizer import write_clip_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("reference_tables")  # the reference σ tables for every test here

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
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "0",
                            "--timeout", "15", "open_clip_torch==3.3.0", "-d", str(cache)], check=True, timeout=120,
                           capture_output=True)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.fail(f"no CLIP BPE file: open_clip_torch is not installed and could not be downloaded ({e}); "
                        "run `pip download --no-deps open_clip_torch==3.3.0 -d DIR` where there is a network and "
                        "set CASCADE_LAB_CLIP_BPE=DIR/open_clip_torch-3.3.0-py3-none-any.whl (as .ci/run does)")
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


def test_weighted_pieces_follow_comfyuis_syntax() -> None:
    from cascade_lab.comfyui.prompt import weighted_pieces

    assert weighted_pieces("a (red:1.3) fox") == [("a ", 1.0), ("red", 1.3), (" fox", 1.0)]
    nested = weighted_pieces("((big)) cat")
    assert [p for p, _ in nested] == ["big", " cat"] and nested[0][1] == pytest.approx(1.21)
    assert weighted_pieces("(a (b:0.5) c:2)") == [("a ", 2.0), ("b", 0.5), (" c", 2.0)]
    assert weighted_pieces(r"a \(literal\) bracket") == [("a (literal) bracket", 1.0)]
    assert weighted_pieces("ratio (16:9 is wide:x)")[0] == ("ratio ", 1.0)  # not a number: the 1.1 stays
    assert weighted_pieces("ratio (16:9 is wide:x)")[1][1] == pytest.approx(1.1)


class _Words:
    """A tokenizer stand-in: one id per character, with start/end as a CLIP tokenizer adds them."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [1, *[ord(c) for c in text], 2]}


def test_windows_keep_short_pieces_whole_and_split_long_ones() -> None:
    from cascade_lab.comfyui.prompt import windows

    assert len(windows(_Words(), "x" * 70 + "(abcde:2)", 1, 2)) == 1  # 70 + 5 tokens: one window
    rows = windows(_Words(), "x" * 72 + "(abcde:2)", 1, 2)  # 72 + 5 > 75: the short piece starts window 2
    assert [len(r) for r in rows] == [77, 77]
    assert rows[0][:2] == [(1, 1.0), (ord("x"), 1.0)] and rows[0][73:] == [(2, 1.0)] * 4
    assert rows[1][:7] == [(1, 1.0)] + [(ord(c), 2.0) for c in "abcde"] + [(2, 1.0)]
    long = windows(_Words(), "y" * 100, 1, 2)  # a long piece fills window 1 (75 tokens), then goes on
    assert [t for t, _ in long[0]].count(ord("y")) == 75 and [t for t, _ in long[1]].count(ord("y")) == 25
    with pytest.raises(NotImplementedError, match="embedding:NAME"):
        windows(_Words(), "a cat, embedding:easynegative", 1, 2)


@pytest.mark.reference
def test_weights_move_tokens_away_from_the_empty_prompt(tmp_path: Path, bpe: Any) -> None:
    from cascade_lab.comfyui.prompt import encode
    from cascade_lab.models.clip import TextEncoder

    tiny = json.loads((reference_dir("comfyui") / "config.json").read_text())["tiny"]
    from cascade_lab.comfyui.models import ModelFiles

    files = ModelFiles({"text_encoder": tiny["clip_g_model_config"]}, write_clip_tokenizer(tmp_path / "tok", bpe))
    encoder = files.load(reference_dir("comfyui", "models") / "stable_cascade_stage_c_tiny.safetensors",
                         "text_encoder")
    assert isinstance(encoder, TextEncoder)
    plain, pooled = encode(encoder, "a red fox")
    same, _ = encoder.encode(["a red fox"])
    torch.testing.assert_close(plain, same.float(), rtol=1e-6, atol=1e-6)  # unweighted: the plain encoding
    weighted, weighted_pooled = encode(encoder, "a (red:1.5) fox")
    empty, _ = encode(encoder, "")
    assert torch.equal(weighted_pooled, pooled)  # weights act on the tokens only
    torch.testing.assert_close(weighted[0, 2], (plain[0, 2] - empty[0, 2]) * 1.5 + empty[0, 2])  # "red"
    torch.testing.assert_close(weighted[0, [0, 1, 3, 4]], plain[0, [0, 1, 3, 4]])


@pytest.mark.reference
def test_lora_loader_strength_clip_merges_the_text_encoder_part(comfy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LoraLoader: strength_clip puts a kohya file's lora_te_* part into CLIP-G (0: the plain encoding)."""
    from safetensors.torch import save_file

    from cascade_lab.comfyui.execute import Executor
    from cascade_lab.comfyui.models import ModelFiles
    from cascade_lab.comfyui.prompt import encode
    from cascade_lab.models.lora import apply_text_encoder_lora

    tiny = json.loads((reference_dir("comfyui") / "config.json").read_text())["tiny"]["clip_g_model_config"]
    (comfy / "models" / "loras").mkdir(exist_ok=True)
    lora = comfy / "models" / "loras" / "te.safetensors"
    g = torch.Generator().manual_seed(0)
    width = int(tiny["hidden_size"])
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, width, generator=g),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
                   torch.randn(int(tiny["intermediate_size"]), 4, generator=g)}, str(lora))
    graph = json.loads((reference_dir("comfyui", "workflows") / "text_to_image.api.json").read_text())
    graph["60"] = {"class_type": "LoraLoader", "inputs": {"model": ["41", 0], "clip": ["41", 1], "lora_name":
                                                          "te.safetensors", "strength_model": 0.0,
                                                          "strength_clip": 0.7}}
    graph["6"]["inputs"]["clip"] = ["60", 1]
    encoded: dict[str, Any] = {}
    monkeypatch.setattr(Executor, "node_CLIPTextEncode", lambda self, node_id, text, clip: encoded.setdefault(
        node_id, encode(clip.encoder(), text)) and [])
    from cascade_lab.comfyui import check as check_graph

    check_graph(graph, models=comfy)
    files = ModelFiles(configs(), None, comfy)
    Executor(graph, ["41", "60", "6", "7"], comfyui=comfy, extra_model_paths=None, input_dir=None, files=files,
             given={}).run()
    plain = ModelFiles(configs(), None, comfy).load(comfy / "models" / "checkpoints" /
                                                    graph["41"]["inputs"]["ckpt_name"], "text_encoder")
    assert torch.equal(encoded["7"][0], encode(plain, graph["7"]["inputs"]["text"])[0])  # the plain CLIP
    assert not torch.allclose(encoded["6"][0], encode(plain, graph["6"]["inputs"]["text"])[0])
    apply_text_encoder_lora(plain, lora, 0.7)
    torch.testing.assert_close(encoded["6"][0], encode(plain, graph["6"]["inputs"]["text"])[0], rtol=0, atol=0)


@pytest.mark.reference
def test_the_magic_runs_the_example_with_progress_and_keeps_the_result(ip: Any, comfy: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade_lab.notebook.display import StageBars
    from cascade_lab.notebook.session import get_session

    rows: dict[str, int] = {}
    step = StageBars.step

    def count(self: Any, stage: str, total: int) -> None:
        rows[stage] = rows.get(stage, 0) + 1
        step(self, stage, total)

    monkeypatch.setattr(StageBars, "step", count)

    (tmp_path / "tiny.json").write_text(json.dumps(configs()))
    workflow = reference_dir("comfyui", "workflows") / "text_to_image.api.json"
    ip.run_line_magic("load_ext", "cascade_lab")
    ip.run_line_magic("cascade", f"comfyui run {workflow} --models {comfy} --configs {tmp_path / 'tiny.json'} "
                                 "--set 34.width=256 34.height=256")
    result = ip.user_ns["_comfyui"]["9"]
    assert result.params.seed == 314307448448003 and result.images[0].size == (256, 256)
    assert get_session().last_result is result  # what %cascade inspect opens
    assert rows == {"node 3 · Stage C": 20, "node 33 · Stage B": 10}  # a progress row per KSampler, every step
