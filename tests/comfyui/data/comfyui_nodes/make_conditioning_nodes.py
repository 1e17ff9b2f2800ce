"""One-off: ComfyUI's numbers for the nodes that condition Stage C, on the tiny models of
../shared/reference/comfyui, written to conditioning_nodes.safetensors next to this file (with the tiny ControlNets
and the input image it made). Run in the oracle venv with torchvision importable (see README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
REFERENCE = Path("/work/shared/reference")
CNET = {"c_proj": 32, "proj_blocks": [0, 5], "bottleneck_mode": "simple"}  # feeds the tiny Stage C's blocks 0, 5


def main() -> None:
    import torch
    from comfy_oracle import boot_comfyui
    from PIL import Image
    from safetensors.torch import load_file, save_file

    boot_comfyui()
    import comfy.clip_vision
    import comfy.controlnet
    import comfy.ldm.cascade.controlnet
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import folder_paths
    import nodes
    from comfy_extras import nodes_compositing, nodes_stable_cascade

    tiny = json.loads((REFERENCE / "comfyui" / "config.json").read_text())["tiny"]
    cpu = torch.device("cpu")
    yy, xx = np.mgrid[0:80, 0:120]
    picture = np.stack([128 + 100 * np.sin(xx / 5 + yy / 9), 128 + 90 * np.cos(yy / 4), 60 + xx], -1)
    picture[20:50, 30:90] = (230, 210, 40)
    Image.fromarray(picture.astype(np.uint8)).save(HERE / "control.png")
    folder_paths.set_input_directory(str(HERE))

    # Stage C: ComfyUI's model class with the tiny kwargs and the reference's official-layout weights
    config = comfy.supported_models.Stable_Cascade_C({"stable_cascade_stage": "c", **tiny["stage_c"]})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    official = load_file(str(REFERENCE / "comfyui/models/official/stage_c.safetensors"))
    weights = {k: v.float() for k, v in official.items()}
    missing, unexpected = model.diffusion_model.load_state_dict(config.process_unet_state_dict(weights), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    stage_c = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    texts = load_file(str(REFERENCE / "comfyui/sampling/conditioning.safetensors"))
    positive = [[texts["positive"], {"pooled_output": texts["positive_pooled"]}]]
    negative = [[texts["negative"], {"pooled_output": texts["negative_pooled"]}]]

    def sample(pos, neg, seed, steps, cfg, sampler, scheduler, width, height, compression):  # type: ignore[no-untyped-def]
        latent = nodes_stable_cascade.StableCascade_EmptyLatentImage.execute(width, height, compression, 1)[0]
        return nodes.common_ksampler(stage_c, seed, steps, cfg, sampler, scheduler, pos, neg, latent)[0]["samples"]

    # ControlNets: ComfyUI's Stable Cascade ControlNet class with the tiny kwargs (its ControlNetLoader only knows
    # the shipped sizes: c_proj 2048 into Stage C blocks 0..63), in ComfyUI's T2IAdapter wrapper as the loader
    # makes it for an EfficientNet-bottleneck file (latent × 32, bilinear)
    out: dict[str, torch.Tensor] = {}
    cnets = {}
    for c_in, seed in ((1, 11), (4, 12)):
        torch.manual_seed(seed)
        net = comfy.ldm.cascade.controlnet.ControlNet(c_in=c_in, **CNET)
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                  str(HERE / f"controlnet_c{c_in}.safetensors"))
        cnets[c_in] = comfy.controlnet.T2IAdapter(net.eval(), c_in, 32, "bilinear")
    hints: dict[int, torch.Tensor] = {}
    get_control = comfy.controlnet.T2IAdapter.get_control

    def recorded(self, x_noisy, t, cond, batched_number, transformer_options):  # type: ignore[no-untyped-def]
        result = get_control(self, x_noisy, t, cond, batched_number, transformer_options)
        if self.cond_hint is not None:  # the hint as prepared for the model (None outside the step range)
            hints[self.channels_in] = self.cond_hint.float().clone()
        return result

    comfy.controlnet.T2IAdapter.get_control = recorded
    image = nodes.LoadImage().load_image("control.png")[0]
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, cnets[1], image, 0.8, 0.1, 0.7)
    out["cnet1.latent"] = sample(pos, neg, 5, 4, 4.0, "euler_ancestral", "simple", 320, 256, 32)
    out["cnet1.hint"] = hints[1][..., ::3, ::3]  # every third pixel: enough to check the crop and resize
    # the step range on a schedule whose σ are not evenly spaced in the model's timesteps: ComfyUI compares each
    # σ with the model's σ at 1 − percent, which is not the fraction of the steps
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, cnets[1], image, 1.0, 0.2, 0.6)
    out["cnet1.karras.latent"] = sample(pos, neg, 8, 6, 4.0, "euler", "karras", 320, 256, 32)
    early = nodes.ConditioningSetTimestepRange().set_range(positive, 0.0, 0.3)[0]
    late = nodes.ConditioningSetTimestepRange().set_range(negative, 0.3, 1.0)[0]
    both = nodes.ConditioningCombine().combine(early, late)[0]
    out["range.karras.latent"] = sample(both, negative, 9, 6, 4.0, "euler", "karras", 256, 256, 42)
    mask = nodes.LoadImageMask().load_image("rgba.png", "alpha")[0]
    rgba = nodes_compositing.JoinImageWithAlpha.execute(image, mask)[0]
    pos = nodes.ControlNetApply().apply_controlnet(positive, cnets[4], rgba, 1.0)[0]
    out["cnet4.latent"] = sample(pos, negative, 6, 3, 3.0, "euler", "normal", 256, 256, 42)
    out["cnet4.hint"] = hints[4][..., ::3, ::3]

    # CLIP vision: ComfyUI's ClipVisionModel from a json of the tiny config (its loader detects ViT-L/H/G, SigLIP
    # and DINOv2 by their layer counts and returns None for a 2-layer model), the tiny checkpoint's weights
    vision = {**tiny["clip_vision"]}
    (HERE / "clip_vision_tiny.json").write_text(json.dumps(vision))
    encoder = comfy.clip_vision.ClipVisionModel(str(HERE / "clip_vision_tiny.json"))
    ckpt = load_file(str(REFERENCE / "comfyui/models/stable_cascade_stage_c_tiny.safetensors"))
    sd = {k.removeprefix("clip_l_vision."): v.float() for k, v in ckpt.items() if k.startswith("clip_l_vision.")}
    missing, unexpected = encoder.load_sd(sd)
    assert not missing, missing
    (HERE / "clip_vision_tiny.json").unlink()
    seen = nodes.CLIPVisionEncode().encode(encoder, image, "center")[0]
    seen2 = nodes.CLIPVisionEncode().encode(encoder, nodes.LoadImage().load_image("rgb.png")[0], "none")[0]
    out["clip_vision.center"], out["clip_vision.none"] = seen["image_embeds"], seen2["image_embeds"]
    pos = nodes.unCLIPConditioning().apply_adm(positive, seen, 0.7, 0.0)[0]
    pos = nodes.unCLIPConditioning().apply_adm(pos, seen2, 0.5, 0.0)[0]
    out["unclip.latent"] = sample(pos, negative, 7, 3, 4.0, "euler_ancestral", "simple", 256, 256, 42)

    # StableCascade_SuperResolutionControlnet: ComfyUI's VAE on the full-size EfficientNet fixture, with the
    # float16 ImageNet mean / std a ComfyUI checkpoint stores
    effnet = load_file(str(REFERENCE / "fixtures/effnet_encoder/weights.safetensors"))
    effnet["mean"] = torch.tensor([0.485, 0.456, 0.406]).half()
    effnet["std"] = torch.tensor([0.229, 0.224, 0.225]).half()
    vae = comfy.sd.VAE(sd={k: v.float() if v.is_floating_point() else v for k, v in effnet.items()})
    sr = nodes_stable_cascade.StableCascade_SuperResolutionControlnet.execute(image, vae)
    out["sr.controlnet_input"] = sr[0]
    out["sr.stage_c"], out["sr.stage_b"] = sr[1]["samples"], sr[2]["samples"]
    save_file({k: v.contiguous().float() for k, v in out.items()}, str(HERE / "conditioning_nodes.safetensors"))
    print({k: tuple(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    main()
