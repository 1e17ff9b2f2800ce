"""ComfyUI's other official Stable Cascade examples (comfyanonymous/ComfyUI_examples, stable_cascade/: canny and
inpainting ControlNets, image remixing with one and two images), their API prompt and UI workflow as the PNGs
carry them (tests/comfyui/workflows/), run unchanged but for --set sizes on the tiny models under the examples'
own file names: the reference's checkpoints, tiny random ControlNets, synthetic input images.

There are no ComfyUI numbers for these; the tests check what each workflow's nodes must do: the edge preview,
the ControlNet and the unCLIP images changing Stage C, the inpainting composite keeping the input outside the mask.
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from comfy_models import load  # noqa: E402

from cascade_lab.comfyui import read_workflow, run  # noqa: E402

HERE = Path(__file__).parent / "workflows"
SMALL = {"34.width": 256, "34.height": 256}  # the examples' 1024² → 256²: the same graph, 16× less work
TINY_CNET = {"c_proj": 32, "proj_blocks": [0, 5], "bottleneck_mode": "simple"}  # feeds the tiny Stage C's blocks


def bare(graph: dict[str, Any]) -> dict[str, Any]:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in graph.items()}


@pytest.mark.parametrize("name", ["canny_controlnet", "image_remixing", "image_remixing_multiple"])
def test_the_ui_workflows_give_the_api_prompts_comfyui_queued(name: str) -> None:
    ui, _ = read_workflow(HERE / f"{name}.workflow.json")
    api, _ = read_workflow(HERE / f"{name}.api.json")
    assert bare(ui) == bare(api)


def test_a_group_node_expands_into_the_nodes_comfyui_queued() -> None:
    """The inpainting example's group node (EmptyImage, ThresholdMask, InvertMask, ImageCompositeMasked, a Reroute
    and JoinImageWithAlpha) becomes the nodes of the API prompt, with its widget values and links."""
    ui, _ = read_workflow(HERE / "inpaint_controlnet.workflow.json")
    api, _ = read_workflow(HERE / "inpaint_controlnet.api.json")
    inner = {"68:0": "62", "68:1": "66", "68:2": "64", "68:3": "61", "68:5": "60"}  # the ids ComfyUI gave them

    def renamed(value: Any) -> Any:
        return [inner.get(value[0], value[0]), value[1]] if isinstance(value, list) else value

    expanded = {inner.get(k, k): {"class_type": v["class_type"], "inputs": {name: renamed(x) for name, x in
                                                                            v["inputs"].items()}}
                for k, v in ui.items()}
    assert expanded == bare(api)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI install with the examples' file names: the tiny checkpoints, tiny ControlNets, input images."""
    from safetensors.torch import save_file

    from cascade_lab.models.controlnet import ControlNetConfig

    root = tmp_path_factory.mktemp("comfy") / "ComfyUI"
    models = reference_dir("comfyui", "models")
    for kind, name, target in (("checkpoints", "stable_cascade_stage_c.safetensors", "stable_cascade_stage_c_tiny"),
                               ("checkpoints", "stable_cascade_stage_b.safetensors", "stable_cascade_stage_b_tiny")):
        (root / "models" / kind).mkdir(parents=True, exist_ok=True)
        (root / "models" / kind / name).symlink_to(models / f"{target}.safetensors")
    (root / "models" / "controlnet").mkdir(parents=True)
    torch.manual_seed(0)
    for name, c_in in (("stable_cascade_canny.safetensors", 1), ("stable_cascade_inpainting.safetensors", 4)):
        net = ControlNetConfig(c_in=c_in, **TINY_CNET).build()  # type: ignore[arg-type]
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "models" / "controlnet" / name))
    (root / "input").mkdir()
    (root / "input" / "example.png").symlink_to(reference_dir("comfyui", "workflows", "input") / "example.png")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128]
    for name, colour in (("mountains.png", (40, 90, 200)), ("sunset.png", (230, 120, 30))):
        pixels = (np.array(colour) * (0.5 + 0.5 * np.sin(xx / 9.0 + yy / 13.0))[..., None]).astype(np.uint8)
        Image.fromarray(pixels).save(root / "input" / name)
    rgba = rng.integers(0, 255, (160, 240, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[40:100, 60:160, 3] = 0  # the hole to inpaint (LoadImage's mask = 1 − alpha)
    Image.fromarray(rgba, "RGBA").save(root / "input" / "yosemite_inpaint_example.png")
    return root


def configs(**controlnets: int) -> dict[str, Any]:
    tiny = json.loads((reference_dir("comfyui") / "config.json").read_text())["tiny"]
    out = {part: tiny[part] for part in ("stage_c", "stage_b", "stage_a", "previewer")}
    out["image_encoder"] = tiny["clip_vision"]
    for name, c_in in (("stable_cascade_canny.safetensors", 1), ("stable_cascade_inpainting.safetensors", 4)):
        out[f"controlnet:{name}"] = {"c_in": c_in, **TINY_CNET}
    return out


def texts() -> dict[str, Any]:
    """The examples' prompts are the reference's: ComfyUI's stored CLIPTextEncode outputs stand in for CLIP."""
    stored = load(reference_dir("comfyui", "workflows") / "text_to_image.result.safetensors")
    return {"6": (stored["6.cond"], stored["6.pooled"]), "7": (stored["7.cond"], stored["7.pooled"])}


def example(name: str, comfy: Path, **settings: Any) -> Any:
    return run(HERE / f"{name}.api.json", models=comfy, outputs=texts(), configs=configs(), set={**SMALL, **settings})


@pytest.mark.reference
def test_canny_controlnet_example(comfy: Path) -> None:
    out = example("canny_controlnet", comfy)
    edges = out.images["52"]  # PreviewImage of the Canny node: 224² (ImageScale), one edge map in 3 channels
    assert edges.shape == (1, 224, 224, 3) and set(edges.unique().tolist()) <= {0.0, 1.0} and edges.sum() > 0
    assert torch.equal(edges[..., 0], edges[..., 2])
    result = out["9"]
    assert result.images[0].size == (256, 256) and result.params.seed == 784805947292946
    off = example("canny_controlnet", comfy, **{"49.strength": 0.0})
    assert not torch.allclose(result.latent_c, off["9"].latent_c), "the ControlNet must change Stage C"
    # ControlNetApply instead, on the positive only: ComfyUI's sampler gives its ControlNet to a negative that has
    # none, so it is the ControlNetApplyAdvanced run (ComfyUI's numbers: test_comfyui_conditioning_reference.py)
    graph = json.loads((HERE / "canny_controlnet.api.json").read_text())
    graph["49"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["6", 0], "control_net": ["47", 0],
                                                               "image": ["51", 0], "strength": 1.0}}
    graph["3"]["inputs"]["negative"] = ["7", 0]
    applied = run(graph, models=comfy, outputs=texts(), configs=configs(), set=SMALL)["9"].latent_c
    torch.testing.assert_close(applied, result.latent_c, rtol=1e-5, atol=1e-5 * result.latent_c.abs().max().item())


def test_control_net_apply_fills_a_negative_without_controlnets_only() -> None:
    """ComfyUI's sampler: the k-th positive conditioning marked by ControlNetApply lends its ControlNets to
    negative entry k mod n, unless some negative has ControlNets of its own; ControlNetApplyAdvanced's never."""
    from cascade_lab.comfyui.execute import _controls_to_uncond
    from cascade_lab.comfyui.models import Cond

    plain = Cond(torch.zeros(1, 77, 4), torch.zeros(1, 4))
    a, b = ("net a", None, 1.0, 0.0, 1.0), ("net b", None, 0.5, 0.0, 1.0)
    marked = [plain.with_(controls=(a,), extra={"control_to_uncond": True}),
              plain.with_(controls=(b,), extra={"control_to_uncond": True})]
    filled = _controls_to_uncond(marked, [plain, plain.with_(prompt="n2")])
    assert [c.controls for c in filled] == [(a,), (b,)] and filled[1].prompt == "n2"
    assert [c.controls for c in _controls_to_uncond(marked, [plain])] == [(b,)]  # a later one replaces
    own = [plain.with_(controls=(b,))]
    assert _controls_to_uncond(marked, own) == own
    advanced = [plain.with_(controls=(a,), extra={"control_to_uncond": False})]
    assert _controls_to_uncond(advanced, [plain]) == [plain]


@pytest.mark.reference
def test_inpainting_controlnet_example_from_its_api_prompt(comfy: Path) -> None:
    out = example("inpaint_controlnet", comfy)
    final, generated = out.images["9"], out.images["76"]  # the composite, and Stage A's image before it
    assert final.shape == generated.shape == (1, 256, 256, 3)
    with Image.open(comfy / "input" / "yosemite_inpaint_example.png") as png:
        rgb = torch.from_numpy(np.asarray(png.convert("RGB")).astype(np.float32) / 255)
    # ImageCompositeMasked(resize_source): the input, resized to 256², wherever the inverted mask shrunk by 8 px is 1
    kept = final[0, 8:24, 8:24]
    source = torch.nn.functional.interpolate(rgb.movedim(-1, 0)[None], size=(256, 256), mode="bilinear")[0]
    torch.testing.assert_close(kept, source.movedim(0, -1)[8:24, 8:24], atol=1e-6, rtol=0)
    assert not torch.allclose(kept, generated[0, 8:24, 8:24])
    hole = final[0, 80:140, 100:150]  # well inside the hole (rows 40..100, cols 60..160 of 160×240 → ×1.6 / ×1.07)
    torch.testing.assert_close(hole, generated[0, 80:140, 100:150])
    off = example("inpaint_controlnet", comfy, **{"49.strength": 0.0})
    assert out["76"].latent_c is not None, "the preview of VAEDecode's image is the generation's Result"
    assert not torch.allclose(out["76"].latent_c, off["76"].latent_c), "the ControlNet must change Stage C"


@pytest.mark.reference
@pytest.mark.parametrize("name", ["image_remixing", "image_remixing_multiple"])
def test_image_remixing_examples(name: str, comfy: Path) -> None:
    out = example(name, comfy)
    plain = example(name, comfy, **{"51.strength": 0.0, **({"53.strength": 0.0} if "multiple" in name else {})})
    assert out["9"].images[0].size == (256, 256)
    assert not torch.allclose(out["9"].latent_c, plain["9"].latent_c), "the CLIP vision embedding must count"


def test_sides_run_as_separate_calls_averaging_their_active_conditionings() -> None:
    """Two unCLIP images on the positive side, none on the negative; then two positive conditionings, one per half
    of the steps, and two averaged: the numbers of the separate model calls."""
    from cascade_lab.comfyui.sides import SIDE, STEP, Entry, SeparateSides, check_coverage, needs_separate_calls

    calls: list[int] = []

    def model(x: torch.Tensor, r: torch.Tensor, clip_text: torch.Tensor, clip_img: torch.Tensor,
              cnet: list[torch.Tensor]) -> torch.Tensor:
        calls.append(clip_img.shape[1])
        return x * r.view(-1, 1, 1, 1) + clip_img.sum((1, 2)).view(-1, 1, 1, 1) + clip_text.mean() + cnet[0]

    torch.manual_seed(0)
    a = {"clip_text": torch.randn(2, 77, 4), "clip_img": torch.randn(2, 2, 8)}
    b = {"clip_text": torch.randn(1, 77, 4), "clip_img": torch.randn(1, 1, 8)}
    neg = {"clip_text": torch.randn(2, 77, 4), "clip_img": torch.zeros(2, 1, 8) + 0.5}
    x, r, cnet = torch.randn(4, 3, 5, 5), torch.rand(4), [torch.randn(4, 3, 5, 5)]
    side = torch.tensor([0.0, 0.0, 1.0, 1.0])

    def direct(inputs: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        given = {k: v.expand(2, *v.shape[1:]) for k, v in inputs.items()}
        return model(x[rows], r[rows], cnet=[cnet[0][rows]], **given)

    sides = [[Entry(a)], [Entry(neg)]]
    assert needs_separate_calls(sides) and not needs_separate_calls([[Entry(a)], [Entry(a)]])
    out = SeparateSides(model, sides)(x, r, cnet=cnet, **{SIDE: side, STEP: 0.7})
    assert calls == [2, 1]
    torch.testing.assert_close(out, torch.cat([direct(a, slice(0, 2)), direct(neg, slice(2, 4))]), rtol=0, atol=0)
    halves = [[Entry(a, 0.0, 0.5), Entry(b, 0.5, 1.0)], [Entry(neg)]]
    early = SeparateSides(model, halves)(x, r, cnet=cnet, **{SIDE: side, STEP: 0.9})  # 10 % of the steps done
    late = SeparateSides(model, halves)(x, r, cnet=cnet, **{SIDE: side, STEP: 0.2})
    torch.testing.assert_close(early[:2], direct(a, slice(0, 2)), rtol=0, atol=0)
    torch.testing.assert_close(late[:2], direct(b, slice(0, 2)), rtol=0, atol=0)
    both = SeparateSides(model, [[Entry(a), Entry(b)], [Entry(neg)]])(x, r, cnet=cnet, **{SIDE: side, STEP: 0.5})
    torch.testing.assert_close(both[:2], (direct(a, slice(0, 2)) + direct(b, slice(0, 2))) / 2)
    with pytest.raises(ValueError, match="positive conditioning's timestep ranges \\(0-0.5\\) leave the steps from"):
        check_coverage([[Entry(a, 0.0, 0.5)], [Entry(neg)]], ("positive", "negative"))


@pytest.mark.reference
def test_a_lora_loader_merges_into_stage_c_and_is_recorded(comfy: Path) -> None:
    """LoraLoaderModelOnly between the Stage C checkpoint and its KSampler (a kohya file in models/loras/)."""
    from safetensors.torch import save_file

    (comfy / "models" / "loras").mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_clip_txt_mapper.lora_down.weight": torch.randn(4, 24, generator=g),
               "lora_unet_clip_txt_mapper.lora_up.weight": torch.randn(40, 4, generator=g),
               "lora_unet_clip_txt_mapper.alpha": torch.tensor(4.0)},
              str(comfy / "models" / "loras" / "style.safetensors"))
    graph = json.loads((reference_dir("comfyui", "workflows") / "text_to_image.api.json").read_text())
    graph["60"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["41", 0], "lora_name": "style.safetensors",
                                                                   "strength_model": 0.8}}
    graph["3"]["inputs"]["model"] = ["60", 0]
    for name in ("41", "42"):
        graph[name]["inputs"]["ckpt_name"] = graph[name]["inputs"]["ckpt_name"].replace("_tiny", "")

    def latent_c(strength: float | None) -> Any:
        changed = {"34.width": 256, "34.height": 256} | ({} if strength is None else {"60.strength_model": strength})
        source = graph if strength is not None else {**graph, "3": {**graph["3"], "inputs": {**graph["3"]["inputs"],
                                                                                            "model": ["41", 0]}}}
        return run(source, models=comfy, outputs=texts(), configs=configs(), set=changed)["9"]

    with_lora, without, zero = latent_c(0.8), latent_c(None), latent_c(0.0)
    assert not torch.allclose(with_lora.latent_c, without.latent_c)
    torch.testing.assert_close(zero.latent_c, without.latent_c, rtol=0, atol=0)
    assert with_lora.params.loras == ((str(comfy / "models" / "loras" / "style.safetensors"), 0.8),)


def _stage_c_only(sampler_nodes: dict[str, Any]) -> dict[str, Any]:
    """Stage C from the tiny checkpoint, sampled by the given nodes, previewed through its Previewer."""
    return {
        "41": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "stable_cascade_stage_c.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["41", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "b", "clip": ["41", 1]}},
        "34": {"class_type": "StableCascade_EmptyLatentImage", "inputs": {"width": 256, "height": 256,
                                                                          "compression": 42, "batch_size": 2}},
        **sampler_nodes,
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["90", 0], "vae": ["41", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def _advanced(latent: list[Any], start: int, end: int, noise: str, leftover: str) -> dict[str, Any]:
    return {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["41", 0], "add_noise": noise, "noise_seed": 5, "steps": 12, "cfg": 4.0, "sampler_name": "euler",
        "scheduler": "simple", "positive": ["6", 0], "negative": ["7", 0], "latent_image": latent,
        "start_at_step": start, "end_at_step": end, "return_with_leftover_noise": leftover}}


@pytest.mark.reference
def test_ksampler_advanced_in_two_passes_equals_one_ksampler(comfy: Path) -> None:
    """A deterministic sampler split at step 5 (leftover noise kept, the second pass adds none) is the same run
    as one KSampler; the Stage C latent previews through the checkpoint's Previewer."""
    whole = _stage_c_only({"90": {"class_type": "KSampler", "inputs": {
        "model": ["41", 0], "seed": 5, "steps": 12, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["34", 0], "denoise": 1.0}}})
    split = _stage_c_only({"89": _advanced(["34", 0], 0, 5, "enable", "enable"),
                           "90": _advanced(["89", 0], 5, 10000, "disable", "disable")})
    one = run(whole, models=comfy, outputs=texts(), configs=configs())
    two = run(split, models=comfy, outputs=texts(), configs=configs())
    assert one.images["9"].shape == (2, 48, 48, 3)  # 6×6 latents, the Previewer's 8×
    assert one["9"].params.variant == "comfyui:stable_cascade_stage_c.safetensors"  # the model that made it
    torch.testing.assert_close(two.images["9"], one.images["9"], rtol=1e-6, atol=1e-6)
    stopped = run(_stage_c_only({"90": _advanced(["34", 0], 0, 5, "enable", "disable")}), models=comfy,
                  outputs=texts(), configs=configs())  # ends at step 5 denoised (σ → 0), unlike the first pass
    assert not torch.allclose(stopped.images["9"], one.images["9"])


@pytest.mark.reference
def test_a_unet_loader_and_a_vae_loader_run_the_separate_files(comfy: Path) -> None:
    """UNETLoader (models/diffusion_models/) with the Stage C alone in the official layout and VAELoader with the
    Previewer alone give the checkpoint's latents and preview; the Result's variant names the UNET file."""
    official = reference_dir("comfyui", "models", "official")
    for folder, name, file in (("diffusion_models", "sc_c.safetensors", "stage_c.safetensors"),
                               ("vae", "sc_previewer.safetensors", "previewer.safetensors")):
        (comfy / "models" / folder).mkdir(exist_ok=True)
        if not (comfy / "models" / folder / name).exists():
            (comfy / "models" / folder / name).symlink_to(official / file)
    ksampler = {"90": {"class_type": "KSampler", "inputs": {
        "model": ["41", 0], "seed": 5, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["34", 0], "denoise": 1.0}}}
    whole = run(_stage_c_only(ksampler), models=comfy, outputs=texts(), configs=configs())
    graph = _stage_c_only(ksampler)
    graph["41"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "sc_c.safetensors", "weight_dtype": "default"}}
    graph["43"] = {"class_type": "VAELoader", "inputs": {"vae_name": "sc_previewer.safetensors"}}
    graph["8"]["inputs"]["vae"] = ["43", 0]
    for node in ("6", "7"):
        graph[node]["inputs"].pop("clip")  # given: no text encoder file needed
    parts = run(graph, models=comfy, outputs=texts(), configs=configs())
    torch.testing.assert_close(parts.images["9"], whole.images["9"], rtol=1e-5, atol=1e-5)
    assert parts["9"].params.variant == "comfyui:sc_c.safetensors"


@pytest.mark.reference
def test_stage_c_vae_encode_uses_the_checkpoints_float16_normalisation(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A ComfyUI Stage C checkpoint with a full-size EfficientNet (the reference fixture's) and the float16
    ImageNet mean/std ComfyUI saves: StableCascade_StageC_VAEEncode normalises with those stored values, as
    ComfyUI does (the float32 constants move a latent by up to ~0.04)."""
    from safetensors.torch import load_file, save_file

    from cascade_lab.comfyui.execute import Executor
    from cascade_lab.models.effnet import IMAGENET_MEAN, IMAGENET_STD
    from cascade_lab.pipeline import comfy_resize
    from cascade_lab.weights import load_stage

    root = tmp_path / "ComfyUI"
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "input").mkdir()
    (root / "input" / "example.png").symlink_to(reference_dir("comfyui", "workflows", "input") / "example.png")
    effnet_file = reference_dir("fixtures", "effnet_encoder") / "weights.safetensors"
    tiny_c = reference_dir("comfyui", "models") / "stable_cascade_stage_c_tiny.safetensors"
    tensors = {k: v for k, v in load_file(str(tiny_c)).items() if not k.startswith("vae.encoder.")}
    tensors |= {f"vae.encoder.{k}": v for k, v in load_file(str(effnet_file)).items()}
    mean16, std16 = torch.tensor(IMAGENET_MEAN).half(), torch.tensor(IMAGENET_STD).half()
    tensors["vae.encoder.mean"], tensors["vae.encoder.std"] = mean16, std16
    save_file(tensors, str(root / "models" / "checkpoints" / "c.safetensors"))
    graph = {
        "41": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "c.safetensors"}},
        "48": {"class_type": "LoadImage", "inputs": {"image": "example.png", "upload": "image"}},
        "49": {"class_type": "StableCascade_StageC_VAEEncode", "inputs": {"image": ["48", 0], "vae": ["41", 2],
                                                                          "compression": 32}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["49", 0], "vae": ["41", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    encoded: dict[str, Any] = {}
    encode = Executor.node_StableCascade_StageC_VAEEncode

    def keep(self: Any, node_id: str, **kwargs: Any) -> Any:
        encoded[node_id] = encode(self, node_id, **kwargs)
        return encoded[node_id]

    monkeypatch.setattr(Executor, "node_StableCascade_StageC_VAEEncode", keep)
    out = run(graph, models=root, configs=configs())
    latent = encoded["49"][0].samples
    assert latent.shape == (1, 16, 4, 6) and encoded["49"][1].samples.shape == (1, 4, 36, 50)
    assert out.images["9"].shape == (1, 32, 48, 3)  # the Previewer's 8× of the 4×6 latent
    with Image.open(reference_dir("comfyui", "workflows", "input") / "example.png") as png:
        image = torch.from_numpy(np.asarray(png.convert("RGB")).astype(np.float32) / 255).movedim(-1, 0)[None]
    x = comfy_resize(image, 192, 128)
    effnet = load_stage("effnet", effnet_file, dtype=torch.float32)
    x = (x * 2 - 1) * 0.5 + 0.5  # ComfyUI's VAE maps the image to [-1, 1] and its encoder maps it back
    with torch.inference_mode():  # (this random encoder magnifies the last bit of its input, even its memory layout)
        stored = effnet((x - mean16.float().view(1, 3, 1, 1)) / std16.float().view(1, 3, 1, 1))
        imagenet = effnet.encode_image(x)
    torch.testing.assert_close(latent, stored, rtol=1e-5, atol=1e-5 * stored.abs().max().item())
    assert (latent - imagenet).abs().max() > 0.01 * stored.abs().max()  # float32 ImageNet constants: another latent


@pytest.mark.reference
def test_combined_and_step_ranged_conditionings(comfy: Path) -> None:
    """ConditioningCombine averages its conditionings' predictions (the same one twice: the plain run), and
    ConditioningSetTimestepRange gives each its fraction of the steps."""
    graph = json.loads((reference_dir("comfyui", "workflows") / "text_to_image.api.json").read_text())
    for name in ("41", "42"):
        graph[name]["inputs"]["ckpt_name"] = graph[name]["inputs"]["ckpt_name"].replace("_tiny", "")
    small = {"34.width": 256, "34.height": 256}

    def stage_c(positive: dict[str, Any]) -> torch.Tensor:
        nodes = {**graph, **positive, "3": {**graph["3"], "inputs": {**graph["3"]["inputs"], "positive": ["70", 0]}}}
        return run(nodes, models=comfy, outputs=texts(), configs=configs(), set=small)["9"].latent_c

    plain = run(graph, models=comfy, outputs=texts(), configs=configs(), set=small)["9"].latent_c
    twice = stage_c({"70": {"class_type": "ConditioningCombine",
                            "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["6", 0]}}})
    torch.testing.assert_close(twice, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())
    ranged = {"71": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["6", 0], "start": 0.0,
                                                                              "end": 0.5}},
              "72": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["7", 0], "start": 0.5,
                                                                              "end": 1.0}},
              "70": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["71", 0],
                                                                     "conditioning_2": ["72", 0]}}}
    scheduled = stage_c(ranged)
    assert not torch.allclose(scheduled, plain, rtol=1e-3, atol=1e-3 * plain.abs().max().item())
    with pytest.raises(Exception, match="leave the steps from 0.5 on without a conditioning"):
        stage_c({**ranged, "70": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["71", 0]}}})
