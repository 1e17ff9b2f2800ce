"""The nodes that condition Stage C, against ComfyUI's own numbers on the tiny models (data/comfyui_nodes/
conditioning_nodes.safetensors, made once by ComfyUI's code, see its README): ControlNetApplyAdvanced with a step
range and ControlNetApply on Stable Cascade ControlNets (1 and 4 input channels), CLIPVisionEncode (centre crop and
none) + chained unCLIPConditioning, StableCascade_SuperResolutionControlnet. Each graph runs in the runner from a
ComfyUI tree; the ControlNet hints and CLIP vision embeddings must match to 1e-6, the Stage C latents within the
reference tolerance (1e-4 · absmax: this machine's σ tables may differ from the oracle's in the last bit)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import reference_dir
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from comfy_models import assert_rel  # noqa: E402

from cascade_lab.comfyui import run  # noqa: E402
from cascade_lab.comfyui.execute import Executor  # noqa: E402
from cascade_lab.models.effnet import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

DATA = Path(__file__).parent / "data" / "comfyui_nodes"
CNET = {"c_proj": 32, "proj_blocks": [0, 5], "bottleneck_mode": "simple"}
pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(str(DATA / "conditioning_nodes.safetensors")).items()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Stage C checkpoint with the full-size EfficientNet fixture (float16 mean / std, as ComfyUI saves
    them), the tiny ControlNets in models/controlnet/, the input images."""
    root = tmp_path_factory.mktemp("cond") / "ComfyUI"
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "controlnet").mkdir()
    tiny_c = reference_dir("comfyui", "models") / "stable_cascade_stage_c_tiny.safetensors"
    tensors = {k: v for k, v in load_file(str(tiny_c)).items() if not k.startswith("vae.encoder.")}
    effnet = load_file(str(reference_dir("fixtures", "effnet_encoder") / "weights.safetensors"))
    tensors |= {f"vae.encoder.{k}": v for k, v in effnet.items()}
    tensors["vae.encoder.mean"] = torch.tensor(IMAGENET_MEAN).half()
    tensors["vae.encoder.std"] = torch.tensor(IMAGENET_STD).half()
    save_file(tensors, str(root / "models" / "checkpoints" / "c.safetensors"))
    for c_in in (1, 4):
        name = f"controlnet_c{c_in}.safetensors"
        (root / "models" / "controlnet" / name).symlink_to(DATA / name)
    (root / "input").symlink_to(DATA)
    return root


def configs() -> dict[str, Any]:
    tiny = json.loads((reference_dir("comfyui") / "config.json").read_text())["tiny"]
    return {"stage_c": tiny["stage_c"], "previewer": tiny["previewer"], "image_encoder": tiny["clip_vision"],
            **{f"controlnet:controlnet_c{c}.safetensors": {"c_in": c, **CNET} for c in (1, 4)}}


def texts() -> dict[str, Any]:
    stored = load_file(str(reference_dir("comfyui", "sampling") / "conditioning.safetensors"))
    return {"6": (stored["positive"].clone(), stored["positive_pooled"].clone()),
            "7": (stored["negative"].clone(), stored["negative_pooled"].clone())}


def base(sampler: dict[str, Any], width: int, height: int, compression: int, loader: str = "CheckpointLoaderSimple"
         ) -> dict[str, Any]:
    return {
        "41": {"class_type": loader, "inputs": {"ckpt_name": "c.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "p", "clip": ["41", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "n", "clip": ["41", 1]}},
        "50": {"class_type": "LoadImage", "inputs": {"image": "control.png", "upload": "image"}},
        "34": {"class_type": "StableCascade_EmptyLatentImage", "inputs": {"width": width, "height": height,
                                                                          "compression": compression, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["41", 0], "latent_image": ["34", 0], "denoise": 1.0,
                                                   **sampler}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["41", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def sampler(seed: int, steps: int, cfg: float, name: str, scheduler: str, positive: list[Any],
            negative: list[Any]) -> dict[str, Any]:
    return {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": name, "scheduler": scheduler,
            "positive": positive, "negative": negative}


def add_control_advanced(graph: dict, strength: float, start: float, end: float) -> None:
    """The 1-channel ControlNet (node 47) on both sides through ControlNetApplyAdvanced (node 49), image node 50."""
    graph["47"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "controlnet_c1.safetensors"}}
    graph["49"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": ["47", 0], "image": ["50", 0], "strength": strength,
        "start_percent": start, "end_percent": end}}


def traced(monkeypatch: pytest.MonkeyPatch, graph: dict[str, Any], root: Path) -> dict[str, Any]:
    """Run the graph; every node's outputs and the ControlNet hints as the runner prepared them."""
    seen: dict[str, Any] = {"hints": []}
    for kind in ("KSampler", "CLIPVisionEncode", "StableCascade_SuperResolutionControlnet"):
        method = getattr(Executor, f"node_{kind}")

        def keep(self: Any, node_id: str, _method: Any = method, **kwargs: Any) -> Any:
            seen[node_id] = _method(self, node_id, **kwargs)
            return seen[node_id]

        monkeypatch.setattr(Executor, f"node_{kind}", keep)
    controls = Executor._controls

    def hints(self: Any, cond: Any, shape: Any, shift: float) -> Any:
        made = controls(self, cond, shape, shift)
        seen["hints"] += [c.image for c in made]
        return made

    monkeypatch.setattr(Executor, "_controls", hints)
    run(graph, models=root, outputs=texts(), configs=configs())
    return seen


def test_controlnet_apply_advanced_with_a_step_range(monkeypatch: pytest.MonkeyPatch, tree: Path,
                                                     expected: dict[str, torch.Tensor]) -> None:
    """A 1-channel ControlNet (canny's kind): the image centre-cropped and resized to the latent × 32 (120×80 →
    320×256, bilinear), its channel mean; strength 0.8 on the 10 %..70 % of the steps, on both sides."""
    graph = base(sampler(5, 4, 4.0, "euler_ancestral", "simple", ["49", 0], ["49", 1]), 320, 256, 32)
    add_control_advanced(graph, 0.8, 0.1, 0.7)
    seen = traced(monkeypatch, graph, tree)
    torch.testing.assert_close(seen["hints"][0][..., ::3, ::3], expected["cnet1.hint"], rtol=0, atol=1e-6)
    assert_rel(seen["3"].samples, expected["cnet1.latent"], "Stage C latent")


def test_controlnet_apply_on_the_positive_side_with_an_rgba_image(monkeypatch: pytest.MonkeyPatch, tree: Path,
                                                                  expected: dict[str, torch.Tensor]) -> None:
    """A 4-channel ControlNet (inpainting's kind) fed JoinImageWithAlpha of the image and a LoadImageMask of
    another size, at compression 42 (256² → a 6×6 latent, the hint 192²)."""
    graph = base(sampler(6, 3, 3.0, "euler", "normal", ["49", 0], ["7", 0]), 256, 256, 42)
    graph["47"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "controlnet_c4.safetensors"}}
    graph["51"] = {"class_type": "LoadImageMask", "inputs": {"image": "rgba.png", "channel": "alpha"}}
    graph["52"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["50", 0], "alpha": ["51", 0]}}
    graph["49"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["6", 0], "control_net": ["47", 0],
                                                               "image": ["52", 0], "strength": 1.0}}
    seen = traced(monkeypatch, graph, tree)
    torch.testing.assert_close(seen["hints"][0][..., ::3, ::3], expected["cnet4.hint"], rtol=0, atol=1e-6)
    assert_rel(seen["3"].samples, expected["cnet4.latent"], "Stage C latent")


def test_clip_vision_encode_and_chained_unclip_conditioning(monkeypatch: pytest.MonkeyPatch, tree: Path,
                                                            expected: dict[str, torch.Tensor]) -> None:
    graph = base(sampler(7, 3, 4.0, "euler_ancestral", "simple", ["62", 0], ["7", 0]), 256, 256, 42,
                 loader="unCLIPCheckpointLoader")
    graph["53"] = {"class_type": "LoadImage", "inputs": {"image": "rgb.png", "upload": "image"}}
    graph["55"] = {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["41", 3], "image": ["50", 0],
                                                                "crop": "center"}}
    graph["56"] = {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["41", 3], "image": ["53", 0],
                                                                "crop": "none"}}
    graph["61"] = {"class_type": "unCLIPConditioning", "inputs": {"conditioning": ["6", 0],
                                                                  "clip_vision_output": ["55", 0], "strength": 0.7,
                                                                  "noise_augmentation": 0.0}}
    graph["62"] = {"class_type": "unCLIPConditioning", "inputs": {"conditioning": ["61", 0],
                                                                  "clip_vision_output": ["56", 0], "strength": 0.5,
                                                                  "noise_augmentation": 0.0}}
    seen = traced(monkeypatch, graph, tree)
    torch.testing.assert_close(seen["55"], expected["clip_vision.center"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["56"], expected["clip_vision.none"], rtol=1e-5, atol=1e-6)
    assert_rel(seen["3"].samples, expected["unclip.latent"], "Stage C latent")


def test_super_resolution_controlnet_node(monkeypatch: pytest.MonkeyPatch, tree: Path,
                                          expected: dict[str, torch.Tensor]) -> None:
    """The image's EfficientNet latent as an IMAGE [B, h, w, 16] (a 120×80 image: its centred 96×64) and empty
    latents for twice its size."""
    graph = base(sampler(1, 1, 1.0, "euler", "simple", ["6", 0], ["7", 0]), 256, 256, 42)
    graph["60"] = {"class_type": "StableCascade_SuperResolutionControlnet", "inputs": {"image": ["50", 0],
                                                                                       "vae": ["41", 2]}}
    graph["3"]["inputs"]["latent_image"] = ["60", 1]
    seen = traced(monkeypatch, graph, tree)
    features, stage_c, stage_b = seen["60"]
    assert_rel(features, expected["sr.controlnet_input"], "controlnet_input")
    torch.testing.assert_close(stage_c.samples, expected["sr.stage_c"], rtol=0, atol=0)
    torch.testing.assert_close(stage_b.samples, expected["sr.stage_b"], rtol=0, atol=0)


def test_step_ranges_are_comfyuis_sigma_thresholds(monkeypatch: pytest.MonkeyPatch, tree: Path,
                                                   expected: dict[str, torch.Tensor]) -> None:
    """ControlNetApplyAdvanced 20 %..60 % and ConditioningSetTimestepRange 0..30 % / 30 %..100 % on 6 karras steps:
    ComfyUI applies a range where the step's σ lies between the model's σ at 1 − start and 1 − end, which on
    karras' σ is not the fraction of the steps."""
    graph = base(sampler(8, 6, 4.0, "euler", "karras", ["49", 0], ["49", 1]), 320, 256, 32)
    add_control_advanced(graph, 1.0, 0.2, 0.6)
    seen = traced(monkeypatch, graph, tree)
    assert_rel(seen["3"].samples, expected["cnet1.karras.latent"], "Stage C latent, ControlNet range")
    graph = base(sampler(9, 6, 4.0, "euler", "karras", ["72", 0], ["7", 0]), 256, 256, 42)
    graph["70"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["6", 0], "start": 0.0,
                                                                            "end": 0.3}}
    graph["71"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["7", 0], "start": 0.3,
                                                                            "end": 1.0}}
    graph["72"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["70", 0],
                                                                   "conditioning_2": ["71", 0]}}
    seen = traced(monkeypatch, graph, tree)
    assert_rel(seen["3"].samples, expected["range.karras.latent"], "Stage C latent, conditioning ranges")
