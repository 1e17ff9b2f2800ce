"""Runs a checked API graph node by node on cascade_lab's stages, with ComfyUI's numbers: each KSampler is one
cascade_lab stage sampling under ``compat="comfyui"`` (its seeding, σ schedules, model call and CFG), and the
Stage C KSampler → StableCascade_StageB_Conditioning → Stage B KSampler → VAEDecode chain comes out as one
cascade_lab generation: a `Result` with its `GenerationParams`, latents and PNG metadata."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..diffusion.sigma_schedules import in_sigma_range, level_to_sigma
from ..pipeline import ControlInput, Pipeline, SigmaRangeControl, Stages, plan_stage
from ..plugins import get_sampler, get_scheduler
from . import image_nodes
from .graph import MODEL_FILES, find_input, is_link
from .models import DEFAULT_SHIFT, Clip, ClipVision, Cond, ControlNet, Latent, Model, ModelFiles, Vae
from .nodes import NODES
from .sampling import STAGE_B_SCALE, stage_b_inputs, stage_c_inputs, step_window
from .sides import SIDE, STEP, Entry, SeparateSides, check_coverage, needs_separate_calls
from .workflow import Graph, WorkflowError, title

Tensor = torch.Tensor


class Executor:
    """Evaluates the nodes of ``order``; ``given`` supplies node outputs instead of running the node."""

    def __init__(self, graph: Graph, order: list[str], *, comfyui: Any, extra_model_paths: Any, input_dir: Any,
                 files: ModelFiles, given: Mapping[str, Any], callback: Callable[[Any], Any] | None = None,
                 cancel: Callable[[], bool] | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.graph, self.order, self.files = graph, order, files
        self.dtype = dtype  # the diffusion models' compute dtype (ComfyUI's --bf16-unet: bfloat16)
        self.comfyui, self.extra_model_paths, self.input_dir = comfyui, extra_model_paths, input_dir
        self.given = given
        self.values: dict[str, tuple[Any, ...]] = {}
        self.images: dict[str, dict[str, Any]] = {}  # IMAGE provenance per node: the generation that made it
        self.callback, self.cancel = callback, cancel
        self.pipeline = Pipeline(Stages(None, None, None, None))
        self.saved: dict[str, tuple[Tensor, dict[str, Any] | None]] = {}

    # -- plumbing ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, tuple[Tensor, dict[str, Any] | None]]:
        for node_id in self.order:
            if node_id in self.given:
                self.values[node_id] = self.given[node_id]
                continue
            node = self.graph[node_id]
            kind = node["class_type"]
            args = {}
            for inp in NODES[kind].inputs:
                value = node["inputs"].get(inp.name, inp.default)
                if is_link(value):
                    source = str(value[0])
                    if source in self.images:  # where an image came from (a file, a generation)
                        self.images.setdefault("in:" + node_id, self.images[source])
                    value = self.values[source][int(value[1])]
                args[inp.name] = value
            try:
                out = getattr(self, "node_" + kind)(node_id, **args)
            except WorkflowError:
                raise
            except (ValueError, FileNotFoundError, NotImplementedError) as e:
                raise WorkflowError(f"node {title(self.graph, node_id)}: {e}") from e
            self.values[node_id] = out if isinstance(out, tuple) else (out,)
        return self.saved

    def model_path(self, kind: str, name: str) -> Path:
        from ..weights import comfyui_model_path

        return comfyui_model_path(MODEL_FILES[kind][1], name, comfyui=self.comfyui,
                                  extra_model_paths=self.extra_model_paths)

    # -- loaders -----------------------------------------------------------------------------------------
    def _checkpoint(self, node_id: str, kind: str, name: str) -> tuple[Any, ...]:
        path = self.model_path(kind, name)
        parts = self.files.parts(path)
        stage = "c" if "stage_c" in parts else "b" if "stage_b" in parts else None
        model = Model(self.files, path, stage, DEFAULT_SHIFT[stage]) if stage else None
        clip = Clip(self.files, path) if "text_encoder" in parts else None
        vae = Vae(self.files, path, "c") if "previewer" in parts or "effnet" in parts else (
            Vae(self.files, path, "b") if "stage_a" in parts else None)
        if model is None:
            raise WorkflowError(f"node {title(self.graph, node_id)}: {path} holds no Stable Cascade Stage C or "
                                f"Stage B ({', '.join(parts) or 'nothing cascade_lab knows'})")
        return model, clip, vae, (ClipVision(self.files, path) if "image_encoder" in parts else None)

    def node_CheckpointLoaderSimple(self, node_id: str, ckpt_name: str) -> tuple[Any, ...]:
        return self._checkpoint(node_id, "CheckpointLoaderSimple", ckpt_name)[:3]

    def node_unCLIPCheckpointLoader(self, node_id: str, ckpt_name: str) -> tuple[Any, ...]:
        return self._checkpoint(node_id, "unCLIPCheckpointLoader", ckpt_name)

    def node_UNETLoader(self, node_id: str, unet_name: str, weight_dtype: str = "default") -> Any:
        return self._checkpoint(node_id, "UNETLoader", unet_name)[0]

    def node_CLIPLoader(self, node_id: str, clip_name: str, type: str = "stable_cascade",
                        device: str = "default") -> Any:
        if type != "stable_cascade":
            raise ValueError(f"type {type!r}: Stable Cascade's text encoder is CLIPLoader type 'stable_cascade'")
        return Clip(self.files, self.model_path("CLIPLoader", clip_name))

    def node_VAELoader(self, node_id: str, vae_name: str) -> Any:
        path = self.model_path("VAELoader", vae_name)
        parts = self.files.parts(path)
        if "stage_a" in parts:
            return Vae(self.files, path, "b")
        if "previewer" in parts or "effnet" in parts:
            return Vae(self.files, path, "c")
        raise ValueError(f"{path} holds no Stage A, EfficientNet encoder or Previewer")

    def node_CLIPVisionLoader(self, node_id: str, clip_name: str) -> Any:
        return ClipVision(self.files, self.model_path("CLIPVisionLoader", clip_name))

    def node_ControlNetLoader(self, node_id: str, control_net_name: str) -> Any:
        return ControlNet(self.files, self.model_path("ControlNetLoader", control_net_name))

    def node_LoraLoader(self, node_id: str, model: Model, clip: Clip, lora_name: str, strength_model: float,
                        strength_clip: float) -> tuple[Any, ...]:
        path = str(self.model_path("LoraLoader", lora_name))
        clip = replace(clip, loras=(*clip.loras, (path, float(strength_clip)))) if strength_clip else clip
        return self.node_LoraLoaderModelOnly(node_id, model, lora_name, strength_model), clip

    def node_LoraLoaderModelOnly(self, node_id: str, model: Model, lora_name: str, strength_model: float) -> Any:
        path = str(self.model_path("LoraLoader", lora_name))
        return replace(model, loras=(*model.loras, (path, float(strength_model))))

    def node_ModelSamplingStableCascade(self, node_id: str, model: Model, shift: float) -> Any:
        return replace(model, shift=float(shift))

    # -- conditioning ------------------------------------------------------------------------------------
    def node_CLIPTextEncode(self, node_id: str, text: str, clip: Clip) -> Any:
        from .prompt import encode

        cond, pooled = encode(clip.encoder(), text)  # [1, 77·windows, C], [1, C], (word:1.2) weights applied
        return [Cond(cond, pooled, prompt=text, source=node_id)]

    def node_ConditioningZeroOut(self, node_id: str, conditioning: list[Cond]) -> Any:
        return [c.with_(cond=torch.zeros_like(c.cond), pooled=torch.zeros_like(c.pooled), prompt="",
                        extra={**c.extra, "zero_out": True}) for c in conditioning]

    def node_ConditioningCombine(self, node_id: str, conditioning_1: list[Cond], conditioning_2: list[Cond]) -> Any:
        return [*conditioning_1, *conditioning_2]

    def node_ConditioningSetTimestepRange(self, node_id: str, conditioning: list[Cond], start: float,
                                          end: float) -> Any:
        if (start, end) == (0.0, 1.0):
            return conditioning
        return [c.with_(extra={**c.extra, "timestep_range": (float(start), float(end))}) for c in conditioning]

    def node_CLIPVisionEncode(self, node_id: str, clip_vision: ClipVision, image: Tensor, crop: str) -> Any:
        encoder = clip_vision.encoder()
        pixels = image_nodes.clip_preprocess(image, encoder.size, crop=crop == "center")
        with torch.inference_mode():
            out = encoder.model(pixel_values=pixels.to(encoder.device, encoder.dtype))
        return out.image_embeds.float().cpu()  # [B, 768]

    def node_unCLIPConditioning(self, node_id: str, conditioning: list[Cond], clip_vision_output: Tensor,
                                strength: float, noise_augmentation: float) -> Any:
        if strength == 0:
            return conditioning
        return [c.with_(image_embeds=(*c.image_embeds, *(clip_vision_output * strength).unbind(0)))
                for c in conditioning]

    def node_ControlNetApply(self, node_id: str, conditioning: list[Cond], control_net: ControlNet, image: Tensor,
                             strength: float) -> Any:
        if strength == 0:
            return conditioning
        return [c.with_(controls=(*c.controls, (control_net, image, float(strength), 0.0, 1.0)),
                        extra={**c.extra, "control_to_uncond": True}) for c in conditioning]

    def node_ControlNetApplyAdvanced(self, node_id: str, positive: list[Cond], negative: list[Cond],
                                     control_net: ControlNet, image: Tensor, strength: float, start_percent: float,
                                     end_percent: float, vae: Any = None) -> Any:
        if strength == 0:
            return positive, negative
        control = (control_net, image, float(strength), float(start_percent), float(end_percent))
        return ([c.with_(controls=(*c.controls, control), extra={**c.extra, "control_to_uncond": False})
                 for c in positive], [c.with_(controls=(*c.controls, control)) for c in negative])

    def node_StableCascade_StageB_Conditioning(self, node_id: str, conditioning: list[Cond], stage_c: Latent) -> Any:
        return [c.with_(prior=stage_c.samples, extra={**c.extra, "stage_c": stage_c}) for c in conditioning]

    # -- latents -----------------------------------------------------------------------------------------
    def node_StableCascade_EmptyLatentImage(self, node_id: str, width: int, height: int, compression: int,
                                            batch_size: int) -> tuple[Any, ...]:
        info = {"width": int(width), "height": int(height), "compression": int(compression),
                "batch_size": int(batch_size)}
        c = torch.zeros(batch_size, 16, height // compression, width // compression)
        b = torch.zeros(batch_size, 4, height // 4, width // 4)
        return Latent(c, "c", info=info), Latent(b, "b", info=info)

    def node_StableCascade_StageC_VAEEncode(self, node_id: str, image: Tensor, vae: Vae,
                                            compression: int) -> tuple[Any, ...]:
        if vae.kind != "c":
            raise ValueError("needs the VAE of a Stage C checkpoint (its EfficientNet encoder)")
        from ..pipeline import comfy_resize

        B, H, W, _ = image.shape
        h, w = H // compression, W // compression
        # centre crop to the latent's aspect, bicubic to 32× it without antialias or clamping, then the encoder
        latent = vae.encode(comfy_resize(image[..., :3].movedim(-1, 1).float(), w * 32, h * 32))
        info = {"width": int(W), "height": int(H), "compression": int(compression), "batch_size": int(B),
                "init_image": self.images.get("in:" + node_id, {}).get("file")}
        return (Latent(latent, "c", info=info),
                Latent(torch.zeros(B, 4, (H // 8) * 2, (W // 8) * 2), "b", info=info))

    def node_StableCascade_SuperResolutionControlnet(self, node_id: str, image: Tensor, vae: Vae) -> tuple[Any, ...]:
        """The super-resolution ControlNet's input (the image's EfficientNet latent, as an IMAGE [B, h, w, 16])
        and empty latents for twice the image's size."""
        if vae.kind != "c":
            raise ValueError("needs the VAE of a Stage C checkpoint (its EfficientNet encoder)")
        B, H, W, _ = image.shape
        x = image[..., :3].movedim(-1, 1).float()
        h, w = H // 32 * 32, W // 32 * 32  # the encoder's input is cropped to a multiple of 32, centred
        features = vae.encode(x[..., (H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w])
        info = {"width": int(W) * 2, "height": int(H) * 2, "compression": 32, "batch_size": int(B)}
        return (features.movedim(1, -1), Latent(torch.zeros(B, 16, H // 16, W // 16), "c", info=info),
                Latent(torch.zeros(B, 4, H // 2, W // 2), "b", info=info))

    # -- sampling ----------------------------------------------------------------------------------------
    def node_KSampler(self, node_id: str, model: Model, seed: int, steps: int, cfg: float, sampler_name: str,
                      scheduler: str, positive: list[Cond], negative: list[Cond], latent_image: Latent,
                      denoise: float) -> Any:
        return self._sample(node_id, model, int(seed), int(steps), float(cfg), sampler_name, scheduler, positive,
                            negative, latent_image, float(denoise), True, 0, None, True)

    def node_KSamplerAdvanced(self, node_id: str, model: Model, add_noise: str, noise_seed: int, steps: int,
                              cfg: float, sampler_name: str, scheduler: str, positive: list[Cond],
                              negative: list[Cond], latent_image: Latent, start_at_step: int, end_at_step: int,
                              return_with_leftover_noise: str) -> Any:
        return self._sample(node_id, model, int(noise_seed), int(steps), float(cfg), sampler_name, scheduler,
                            positive, negative, latent_image, 1.0, add_noise == "enable", int(start_at_step),
                            int(end_at_step), return_with_leftover_noise != "enable")

    def _sample(self, node_id: str, model: Model, seed: int, steps: int, cfg: float, sampler_name: str,
                scheduler_name: str, positive: list[Cond], negative: list[Cond], latent: Latent, denoise: float,
                add_noise: bool, start: int, end: int | None, force_full_denoise: bool) -> Latent:
        from ..diffusion.noise import ComfyNoise

        stage = model.stage
        if latent.stage != stage:
            raise ValueError(f"the latent is a Stage {latent.stage.upper()} latent but the model is Stage "
                             f"{stage.upper()}; connect the {'stage_c' if stage == 'c' else 'stage_b'} output of the "
                             "latent node")
        if not positive or not negative:
            raise ValueError("an empty conditioning (ConditioningCombine of nothing?) cannot guide sampling")
        negative = _controls_to_uncond(positive, negative)
        pos, neg = positive[0], negative[0]
        sampler, scheduler = get_sampler(sampler_name, "comfyui"), get_scheduler(scheduler_name, "comfyui")
        samples = latent.samples.float()
        B = samples.size(0)
        start_latent = None
        if samples.abs().max() > 0:  # ComfyUI adds a non-zero input latent (Stage B's in its 1/0.43 scale)
            start_latent = samples * STAGE_B_SCALE if stage == "b" else samples
        noise = ComfyNoise(seed)
        plan = plan_stage(sampler, scheduler, steps, model.shift, denoise, 1.0, noise, "c", tuple(samples.shape),
                          start_latent, "comfyui")
        if not add_noise:
            plan = replace(plan, z=torch.zeros_like(plan.z))
        if start > 0 or (end is not None and end < plan.steps):
            plan = step_window(plan, start, end, force_full_denoise)
        module = model.module()
        shift = model.shift
        shared = True  # every conditioning has the same ControlNets: they run once, for all rows
        if stage == "c":
            width = int(module.clip_img_mapper.in_features)
            extras: dict[tuple[int, ...], Any] = {}

            def controlled(c: Cond) -> Any:
                """``t -> {"cnet": ...}`` of the conditioning's ControlNets (each run once per set)."""
                key = tuple(id(control) for control in c.controls)
                if key not in extras:
                    inputs = self._controls(c, samples.shape, shift)
                    features = self.pipeline.control_features(inputs, B) if inputs else []
                    extras[key] = self.pipeline.control_inputs(inputs, features)
                return extras[key]

            sides = [[Entry(stage_c_inputs(c, B, width), *c.steps, extra=controlled(c)) for c in side]
                     for side in (positive, negative)]
            extra = controlled(pos)
            shared = len({id(e.extra) for side in sides for e in side}) == 1
        else:
            like = stage_b_inputs(pos, B, samples.shape)["effnet"]  # a side without a prior: zeros of its shape
            sides = [[Entry(stage_b_inputs(c, B, samples.shape, like=like), *c.steps) for c in side]
                     for side in (positive, negative)]
            extra = None
        used = sides if not math.isclose(cfg, 1.0) else sides[:1]  # CFG 1 runs the positive only
        if needs_separate_calls(used) or not shared:  # several conditionings, step ranges, sides of different
            check_coverage(used, ("positive", "negative"))  # shapes, or ControlNets on one side only
            module = SeparateSides(module, sides, active=lambda t, start, end: in_sigma_range(t, start, end, shift))
            cond, uncond = {SIDE: torch.zeros(B)}, {SIDE: torch.ones(B)}
            extra = _with_step(None)
        else:
            cond, uncond = dict(sides[0][0].inputs), dict(sides[1][0].inputs)
        # ranges (ControlNets, ConditioningSetTimestepRange) compare the step's σ with the model's σ at 1 − percent,
        # as ComfyUI: the extra inputs and the separate sides get the σ being evaluated as their "t"
        to_sigma = level_to_sigma(sampler.space)
        out = self.pipeline.sample_stage(stage, module, self.dtype, plan, cond, uncond, cfg=cfg, cfg_rho=0.0,
                                         callback=self._events(node_id), cancel=self.cancel, trajectory=None,
                                         extra_inputs=extra, step_t=to_sigma)
        info = {**latent.info, "node": node_id, "seed": seed, "steps": steps, "cfg": cfg, "sampler": sampler_name,
                "scheduler": scheduler_name, "denoise": denoise, "shift": model.shift, "model": model.path.name,
                "loras": model.loras, "prompt": pos.prompt, "negative": neg.prompt,
                "advanced": end is not None or start > 0 or not add_noise}
        if stage == "b":
            stage_c = pos.extra.get("stage_c")
            info["stage_c"] = dict(stage_c.info) if isinstance(stage_c, Latent) else {}
            info["latent_c"] = stage_c.samples if isinstance(stage_c, Latent) else None
            return Latent(out / STAGE_B_SCALE, "b", raw=out, info=info)
        return Latent(out, "c", info=info)

    def _events(self, node_id: str) -> Callable[[Any], Any] | None:
        """The caller's callback, each `PipelineEvent` labelled with the KSampler node it comes from (``.node``)."""
        callback = self.callback
        if callback is None:
            return None

        def labelled(event: Any) -> Any:
            event.node = node_id
            return callback(event)

        return labelled

    def _controls(self, cond: Cond, shape: Any, shift: float = 2.0) -> list[ControlInput]:
        """The conditioning's ControlNets with their hints as ComfyUI prepares them for Stable Cascade: centre
        crop and resize to the latent × 32 (bilinear; the super-resolution one × 1, nearest-exact), a 1-channel
        ControlNet (canny) gets the channel mean."""
        inputs: list[ControlInput] = []
        h, w = int(shape[-2]), int(shape[-1])
        for net, hint, strength, start, end in cond.controls:
            module = net.module()
            c_in = int(getattr(module, "c_in", hint.shape[-1]))
            ratio, method = (1, "nearest-exact") if getattr(module, "bottleneck_mode", "") == "large" else (
                32, "bilinear")
            image = image_nodes.upscale(hint.movedim(-1, 1).float(), w * ratio, h * ratio, method, "center")
            if c_in == 1 and image.size(1) > 1:
                image = image.mean(1, keepdim=True)
            if image.size(1) != c_in:
                raise ValueError(f"the ControlNet {net.path.name} takes {c_in} channels, its image has "
                                 f"{image.size(1)} (inpainting takes RGB + alpha: JoinImageWithAlpha)")
            inputs.append(SigmaRangeControl(module, image, strength, start, end, shift=shift))
        return inputs

    def node_VAEDecode(self, node_id: str, samples: Latent, vae: Vae) -> Any:
        if vae.kind == "b":
            if samples.stage != "b":
                raise ValueError("a Stage C latent needs the Stage C checkpoint's VAE (the Previewer), or run Stage B "
                                 "first")
            latent = samples.raw if samples.raw is not None else samples.samples * STAGE_B_SCALE
            self.pipeline.stages = Stages(None, None, vae.part("stage_a"), None)
            images = self.pipeline.decode_b(latent, clamp=False)  # [B, 3, H, W], not clamped as ComfyUI
            info = samples.info
            if info.get("node") and info.get("stage_c", {}).get("node"):
                self.images[node_id] = {"latent": samples, "decode": node_id}
        else:
            if samples.stage != "c":
                raise ValueError("a Stage B latent needs the Stage B checkpoint's VAE (Stage A)")
            self.pipeline.stages = Stages(None, None, None, None, previewer=vae.part("previewer"))
            images = self.pipeline.preview_c(samples.samples)
        return images.permute(0, 2, 3, 1).contiguous()

    # -- images and masks --------------------------------------------------------------------------------
    def node_LoadImage(self, node_id: str, image: str, upload: Any = None) -> tuple[Any, ...]:
        path = find_input(image, self.input_dir)
        if path is None:
            raise FileNotFoundError(f"input image {image!r} not found in {self.input_dir}")
        self.images[node_id] = {"file": str(path)}
        return image_nodes.load_image(path)

    def node_LoadImageMask(self, node_id: str, image: str, channel: str, upload: Any = None) -> Any:
        path = find_input(image, self.input_dir)
        if path is None:
            raise FileNotFoundError(f"input image {image!r} not found in {self.input_dir}")
        return image_nodes.load_image_mask(path, channel)

    def node_EmptyImage(self, node_id: str, width: int, height: int, batch_size: int, color: int) -> Any:
        return image_nodes.empty_image(width, height, batch_size, color)

    def node_ImageScale(self, node_id: str, image: Tensor, upscale_method: str, width: int, height: int,
                        crop: str) -> Any:
        return image_nodes.image_scale(image, upscale_method, width, height, crop)

    def node_Canny(self, node_id: str, image: Tensor, low_threshold: float, high_threshold: float) -> Any:
        return image_nodes.canny(image, low_threshold, high_threshold)

    def node_JoinImageWithAlpha(self, node_id: str, image: Tensor, alpha: Tensor) -> Any:
        return image_nodes.join_alpha(image, alpha)

    def node_GrowMask(self, node_id: str, mask: Tensor, expand: int, tapered_corners: bool) -> Any:
        return image_nodes.grow_mask(mask, int(expand), bool(tapered_corners))

    def node_InvertMask(self, node_id: str, mask: Tensor) -> Any:
        return 1.0 - mask

    def node_ThresholdMask(self, node_id: str, mask: Tensor, value: float) -> Any:
        return (mask > value).float()

    def node_MaskToImage(self, node_id: str, mask: Tensor) -> Any:
        return mask.reshape(-1, 1, *mask.shape[-2:]).movedim(1, -1).expand(-1, -1, -1, 3)

    def node_ImageToMask(self, node_id: str, image: Tensor, channel: str) -> Any:
        index = ("red", "green", "blue", "alpha").index(channel)
        if index >= image.shape[-1]:
            raise ValueError(f"channel {channel!r}: the image has {image.shape[-1]} channels (no alpha; "
                             "JoinImageWithAlpha adds one)")
        return image[..., index]

    def node_ImageBlur(self, node_id: str, image: Tensor, blur_radius: int, sigma: float) -> Any:
        return image_nodes.blur(image, int(blur_radius), float(sigma))

    def node_ImageCompositeMasked(self, node_id: str, destination: Tensor, source: Tensor, x: int, y: int,
                                  resize_source: bool, mask: Tensor | None = None) -> Any:
        link = self.graph.get(node_id, {}).get("inputs", {}).get("destination")
        made = self.images.get(str(link[0])) if is_link(link) else None
        if made is not None and "latent" in made:  # a generation pasted over (inpainting): still that generation
            self.images[node_id] = made
        return image_nodes.composite(destination, source, int(x), int(y), bool(resize_source), mask)

    # -- outputs -----------------------------------------------------------------------------------------
    def node_SaveImage(self, node_id: str, images: Tensor, filename_prefix: str = "ComfyUI") -> Any:
        self.saved[node_id] = (images, self._made_by(node_id))
        return ()

    def node_PreviewImage(self, node_id: str, images: Tensor) -> Any:
        self.saved[node_id] = (images, self._made_by(node_id))
        return ()

    def _made_by(self, node_id: str) -> dict[str, Any] | None:
        link = self.graph[node_id]["inputs"].get("images")
        return self.images.get(str(link[0])) if is_link(link) else None


def _controls_to_uncond(positive: list[Cond], negative: list[Cond]) -> list[Cond]:
    """ComfyUI's ControlNetApply (not the Advanced node) marks its ControlNets for the negative side too: when no
    negative conditioning has a ControlNet, the k-th such positive conditioning's ControlNets go to negative entry
    k mod n (a later one replacing an earlier), as ComfyUI's sampler fills them in."""
    if any(c.controls for c in negative) or not negative:
        return negative
    marked = [c for c in positive if c.controls and c.extra.get("control_to_uncond")]
    filled = list(negative)
    for k, c in enumerate(marked):
        filled[k % len(negative)] = negative[k % len(negative)].with_(controls=c.controls)
    return filled


def _with_step(extra: Callable[[float], Any] | None) -> Callable[[float], Any]:
    """The step's extra model inputs plus the step position t, which `SeparateSides` reads step ranges with."""

    def at(t: float) -> dict[str, Any]:
        return {**(extra(t) or {} if extra is not None else {}), STEP: t}

    return at
