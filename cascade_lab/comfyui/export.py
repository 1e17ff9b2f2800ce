"""A cascade_lab generation as the ComfyUI graph that makes it (the ``prompt`` / ``workflow`` chunks of every PNG
cascade_lab saves), and a ComfyUI graph read back into `GenerationParams` without running it. No torch here."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from ..params import GenerationParams
from .nodes import NODES, SAMPLERS, SCHEDULERS, widget_names

CHECKPOINTS = {"c": "stable_cascade_stage_c.safetensors", "b": "stable_cascade_stage_b.safetensors"}
LITE = {"c": "stable_cascade_stage_c_lite.safetensors", "b": "stable_cascade_stage_b_lite.safetensors"}
# cascade_lab's official samplers / schedulers → ComfyUI's nearest; on Stable Cascade's model ComfyUI's "simple"
# takes evenly spaced levels of its shifted cosine schedule, the official cosine schedule's closest counterpart
NEAREST_SAMPLER = {"ddpm": "ddpm", "ddim": "ddim", "euler": "euler", "euler_ancestral": "euler_ancestral",
                   "dpmpp_2m": "dpmpp_2m", "lcm": "lcm"}
NEAREST_SCHEDULER = {"cosine": "simple", "linear": "simple"}
Graph = dict[str, dict[str, Any]]


def _name(description: str | None, default: str) -> str:
    """A file name for LoadImage / a loader from cascade_lab's description of an input (a path, or a hash)."""
    if not description:
        return default
    name = PurePath(str(description).split(" ")[0]).name
    return name or default


def _stage_ckpt(params: GenerationParams, stage: str) -> str:
    variant = params.variant
    if variant.startswith("comfyui:") and stage == "c":
        return PurePath(variant.split(":", 1)[1]).name or CHECKPOINTS[stage]
    checkpoints = params.extras.get("comfyui_checkpoints") if isinstance(params.extras, Mapping) else None
    if isinstance(checkpoints, Mapping) and checkpoints.get(stage):
        return str(checkpoints[stage])
    return LITE[stage] if "lite" in variant else CHECKPOINTS[stage]


def _sampling(params: GenerationParams, stage: str, notes: list[str]) -> tuple[str, str, float]:
    """(sampler_name, scheduler, cfg) for one KSampler, with what does not map said in ``notes``."""
    sampler, scheduler = getattr(params, f"sampler_{stage}"), getattr(params, f"scheduler_{stage}")
    cfg = getattr(params, f"cfg_{stage}")
    label = f"Stage {stage.upper()}"
    if sampler not in SAMPLERS:
        near = NEAREST_SAMPLER.get(sampler, "euler_ancestral")
        notes.append(f"{label}: cascade_lab's sampler {sampler!r} is ComfyUI's nearest {near!r} here")
        sampler = near
    elif params.compat != "comfyui" and sampler == "ddpm":
        notes.append(f"{label}: the official DDPM steps on GDF's logSNR levels; ComfyUI's 'ddpm' on its σ schedule "
                     "(the same noise levels, a different noise draw)")
    if scheduler not in SCHEDULERS:
        near = NEAREST_SCHEDULER.get(scheduler, "simple")
        notes.append(f"{label}: cascade_lab's scheduler {scheduler!r} is ComfyUI's nearest {near!r} here")
        scheduler = near
    if isinstance(cfg, (tuple, list)):
        notes.append(f"{label}: CFG interpolated over the steps {tuple(cfg)}; ComfyUI's KSampler has one value "
                     f"(the start, {cfg[0]}, here)")
        cfg = cfg[0]
    return sampler, scheduler, float(cfg)


def api_prompt(params: GenerationParams, index: int | None = None) -> tuple[Graph, list[str]]:
    """The ComfyUI API graph of a generation, and what ComfyUI has no equivalent for (empty under
    ``compat="comfyui"``, where the graph is exact)."""
    notes: list[str] = []
    g: Graph = {}

    def node(node_id: str, class_type: str, **inputs: Any) -> list[Any]:
        g[node_id] = {"inputs": inputs, "class_type": class_type, "_meta": {"title": class_type}}
        return [node_id, 0]

    comfy = params.compat == "comfyui"
    if not comfy:
        if params.cfg_rho:
            notes.append(f"CFG rescale {params.cfg_rho} (the official GDF's): ComfyUI's CFG has no rescale")
        notes.append("official seeding: Stage C and Stage B noise come from one torch generator; ComfyUI draws each "
                     "KSampler's noise from its own seed on the CPU")
        notes.append(f"official latent size: ceil(size / {params.compression}); ComfyUI's floor(size / compression) "
                     "with an integer compression")
    if int(params.compression) != params.compression:
        notes.append(f"compression {params.compression} is an integer in ComfyUI: {int(params.compression)}")
    unclip = bool(params.variations)
    c_loader = node("41", "unCLIPCheckpointLoader" if unclip else "CheckpointLoaderSimple",
                    ckpt_name=_stage_ckpt(params, "c"))
    node("42", "CheckpointLoaderSimple", ckpt_name=_stage_ckpt(params, "b"))
    model_c, model_b = ["41", 0], ["42", 0]
    from ..models.lora import lora_file_stage

    for i, (lora, strength) in enumerate(params.loras):
        on_b = lora_file_stage(lora) == "b"  # a Stage B LoRA goes on the Stage B model
        loaded = node(str(60 + i), "LoraLoaderModelOnly", model=model_b if on_b else model_c,
                      lora_name=_name(lora, "lora.safetensors"), strength_model=float(strength))
        model_b, model_c = (loaded, model_c) if on_b else (model_b, loaded)
    if params.shift_c != 2.0:
        model_c = node("70", "ModelSamplingStableCascade", model=model_c, shift=float(params.shift_c))
    if params.shift_b != 1.0:
        model_b = node("71", "ModelSamplingStableCascade", model=model_b, shift=float(params.shift_b))
    i = index or 0
    if isinstance(params.prompt, tuple) and index is None and len(set(params.prompts)) > 1:
        notes.append("one prompt per image: ComfyUI's CLIPTextEncode has one; the first image's is here")
    positive = node("6", "CLIPTextEncode", text=params.prompts[i], clip=[c_loader[0], 1])
    negative = node("7", "CLIPTextEncode", text=params.negative_prompts[i], clip=[c_loader[0], 1])
    for k, (image, weight) in enumerate(params.variations):
        load = node(str(80 + 3 * k), "LoadImage", image=_name(image, "image.png"), upload="image")
        seen = node(str(81 + 3 * k), "CLIPVisionEncode", clip_vision=["41", 3], image=load, crop="center")
        positive = node(str(82 + 3 * k), "unCLIPConditioning", conditioning=positive, clip_vision_output=seen,
                        strength=float(weight), noise_augmentation=0.0)
    stage_b_positive = positive
    positive, negative, composites = _controls(params, node, positive, negative, notes)
    compression = int(params.compression)  # floor: 42.67 → 42, the same Stage C latent for sizes up to 1024+
    if params.init_image is not None:
        loaded = node("48", "LoadImage", image=_name(params.init_image, "image.png"), upload="image")
        latent = node("49", "StableCascade_StageC_VAEEncode", image=loaded, vae=["41", 2], compression=compression)
    else:
        latent = node("34", "StableCascade_EmptyLatentImage", width=params.width, height=params.height,
                      compression=compression, batch_size=params.batch_size)
    denoise = float(params.denoise if comfy else params.strength)
    if not comfy and params.strength < 1:
        notes.append(f"img2img strength {params.strength} (the official: the schedule's last part from the noised "
                     "image) is ComfyUI's denoise here")
    seed = int(params.seed or 0)
    sampler, scheduler, cfg = _sampling(params, "c", notes)
    sampled_c = node("3", "KSampler", seed=seed, steps=params.steps_c, cfg=cfg, sampler_name=sampler,
                     scheduler=scheduler, denoise=denoise, model=model_c, positive=positive, negative=negative,
                     latent_image=latent)
    cond_b = node("36", "StableCascade_StageB_Conditioning", conditioning=stage_b_positive, stage_c=sampled_c)
    sampler, scheduler, cfg = _sampling(params, "b", notes)
    seed_b = int(params.seed_b if params.seed_b is not None else seed)
    sampled_b = node("33", "KSampler", seed=seed_b, steps=params.steps_b, cfg=cfg, sampler_name=sampler,
                     scheduler=scheduler, denoise=1.0, model=model_b, positive=cond_b, negative=["7", 0],
                     latent_image=[latent[0], 1])
    decoded = node("8", "VAEDecode", samples=sampled_b, vae=["42", 2])
    for k, (original, keep) in enumerate(composites):  # inpainting: the original back outside the mask
        decoded = node(str(1000 + k), "ImageCompositeMasked", destination=decoded, source=original, x=0, y=0,
                       resize_source=False, mask=keep)
    node("9", "SaveImage", filename_prefix="cascade_lab", images=decoded)
    return g, notes


CONTROLNET_FILES = {"canny": "stable_cascade_canny.safetensors", "inpainting": "stable_cascade_inpainting.safetensors",
                    "super_resolution": "stable_cascade_super_resolution.safetensors"}  # ComfyUI examples' names
# the official CannyFilter's cv2.Canny(uint8, 100, 200) thresholds in the Canny node's units. OpenCV's magnitude is
# the L1 norm of the unnormalised 3×3 Sobel on the 0-255 image: a step of height d (in [0, 1]) gives 1020·d. The
# node's (kornia's) is the L2 norm of the unnormalised Sobel on the [0, 1] image after its 5×5 σ 1 Gaussian blur:
# the same step gives 2.59·d. So 100 → 100 · 2.59 / 1020 = 0.254 and 200 → 0.508 (on the node's 0.01 grid).
CANNY_LOW, CANNY_HIGH = 0.25, 0.51
CANNY_SIZE = 224  # the official filter finds the edges at 224×224


def _file_facts(path: str) -> tuple[tuple[int, int], bool] | None:
    """(size, has transparent pixels) of an image file, None when it is not there to look at."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            transparent = alpha and img.convert("RGBA").getchannel("A").getextrema()[0] < 255
            return img.size, bool(transparent)
    except (OSError, ValueError):
        return None


def _controls(params: GenerationParams, node: Any, positive: list[Any], negative: list[Any],
              notes: list[str]) -> tuple[list[Any], list[Any], list[tuple[list[Any], list[Any]]]]:
    """Each ControlNet as ControlNetLoader + its input image as the official filter makes it + ControlNetApplyAdvanced
    on both sides; for inpainting also the (original image, mask) to composite the result over."""
    size = (params.width, params.height)
    latent = (params.width // int(params.compression), params.height // int(params.compression))
    composites: list[tuple[list[Any], list[Any]]] = []
    if params.controls and (latent[0] * 32, latent[1] * 32) != size:
        notes.append(f"ControlNet input size: cascade_lab gives the ControlNet the {size[0]}x{size[1]} image, "
                     f"ComfyUI resizes it to the latent × 32 ({latent[0] * 32}x{latent[1] * 32}); compression 32 "
                     "with sizes that are multiples of 32 make them the same")
    for k, (kind, image, strength, start, end, mask, model, grow, feather) in enumerate(params.controls):
        base = 100 + 20 * k
        loader = node(str(base), "ControlNetLoader",
                      control_net_name=_name(model, CONTROLNET_FILES.get(kind, f"{kind}.safetensors")))
        picture = node(str(base + 1), "LoadImage", image=_name(image, "control.png"), upload="image")
        facts = _file_facts(image) if image and not image.startswith("sha256:") else None
        if kind == "canny":
            small = node(str(base + 4), "ImageScale", image=picture, upscale_method="bilinear", width=CANNY_SIZE,
                         height=CANNY_SIZE, crop="disabled")
            picture = node(str(base + 2), "Canny", image=small, low_threshold=CANNY_LOW, high_threshold=CANNY_HIGH)
            notes.append("canny: the official CannyFilter is OpenCV's Canny (100 / 200 on the 224×224 image: no "
                         "blur, the strongest colour channel's L1 gradient); ComfyUI's Canny node is kornia's "
                         f"(Gaussian-blurred luma, L2 gradient), here at the thresholds that pass the same step edges "
                         f"({CANNY_LOW} / {CANNY_HIGH}): its edges lie on or next to the official ones, and it misses "
                         "some (colour edges of near-equal luma, weak ramps), so the image differs")
            if facts is not None and facts[0] != size:
                notes.append(f"canny: the control image is {facts[0][0]}x{facts[0][1]}; cascade_lab first resizes "
                             f"it to {size[0]}x{size[1]} (antialiased), this graph goes to 224×224 directly")
        elif kind == "inpainting":
            picture, original, keep = _inpainting(params, node, base, picture, image, mask, int(grow),
                                                  int(feather), facts, notes)
            composites.append((original, keep))
        elif kind == "super_resolution":  # the half-size image's EfficientNet latent, as ComfyUI's SR node makes it
            half = (params.width // 2, params.height // 2)
            small = node(str(base + 4), "ImageScale", image=picture, upscale_method="bilinear", width=half[0],
                         height=half[1], crop="disabled")
            picture = [node(str(base + 5), "StableCascade_SuperResolutionControlnet", image=small,
                            vae=["41", 2])[0], 0]
            if int(params.compression) != 32:
                notes.append("super_resolution: ComfyUI's StableCascade_SuperResolutionControlnet also makes the "
                             "latents of its examples at compression 32; this graph keeps compression "
                             f"{int(params.compression)} (StableCascade_EmptyLatentImage)")
            if facts is not None and facts[0] != half:
                notes.append(f"super_resolution: the image is {facts[0][0]}x{facts[0][1]}; cascade_lab resizes it "
                             f"to {half[0]}x{half[1]} antialiased, ImageScale without antialiasing")
        else:
            notes.append(f"ControlNet {kind!r}: its input image is given as it is")
        out = node(str(base + 3), "ControlNetApplyAdvanced", positive=positive, negative=negative,
                   control_net=loader, image=picture, strength=float(strength), start_percent=float(start),
                   end_percent=float(end))
        positive, negative = [out[0], 0], [out[0], 1]
    return positive, negative, composites


def _inpainting(params: GenerationParams, node: Any, base: int, loaded: list[Any], image: str, mask: str,
                grow: int, feather: int, facts: tuple[tuple[int, int], bool] | None,
                notes: list[str]) -> tuple[list[Any], list[Any], list[Any]]:
    """The official InpaintFilter as ComfyUI nodes, as ComfyUI's inpainting example builds it: the image at the
    generation size (ImageScale), the mask cut at 0.5 (ThresholdMask) and grown (GrowMask, square), the masked
    pixels white (EmptyImage + ImageCompositeMasked), the mask as the fourth channel (InvertMask +
    JoinImageWithAlpha); a feather for the composite over the original as MaskToImage → ImageBlur (radius
    feather, σ half of it) → ImageToMask. Returns the ControlNet's image, the scaled original and where to keep
    it (1 − mask)."""
    width, height = params.width, params.height
    scaled = node(str(base + 4), "ImageScale", image=loaded, upscale_method="bilinear", width=width, height=height,
                  crop="disabled")
    if facts is not None and facts[0] != (width, height):
        notes.append(f"inpainting: the image is {facts[0][0]}x{facts[0][1]}; cascade_lab resizes it to "
                     f"{width}x{height} antialiased, ImageScale without antialiasing")
    if not mask or mask.startswith(("sha256:", "[")):
        what = "boxes" if mask.startswith("[") else "an in-memory mask" if mask else "no mask"
        notes.append(f"inpainting: the mask was {what}; this graph takes the LoadImage's mask (its transparent "
                     "pixels): paint it in ComfyUI's mask editor")
        source = [loaded[0], 1]
    elif mask == image:
        source = [loaded[0], 1]  # an RGBA image's own transparency, as ComfyUI's example
    else:
        mask_facts = _file_facts(mask)
        channel = "alpha" if mask_facts is not None and mask_facts[1] else "red"
        if channel == "red":
            notes.append("inpainting: cascade_lab reads a mask image's luma (white = regenerate); ComfyUI's "
                         "LoadImageMask has no luma, its red channel is the same for a grey mask")
        if mask_facts is not None and mask_facts[0] != (width, height):
            notes.append(f"inpainting: the mask is {mask_facts[0][0]}x{mask_facts[0][1]}; cascade_lab resizes it "
                         "to the image with nearest neighbours, ComfyUI's nodes bilinearly")
        source = node(str(base + 5), "LoadImageMask", image=_name(mask, "mask.png"), channel=channel,
                      upload="image")
    hard = node(str(base + 6), "ThresholdMask", mask=source, value=0.5)
    if grow:
        hard = node(str(base + 7), "GrowMask", mask=hard, expand=grow, tapered_corners=False)
    white = node(str(base + 8), "EmptyImage", width=width, height=height, batch_size=1, color=0xFFFFFF)
    painted = node(str(base + 9), "ImageCompositeMasked", destination=scaled, source=white, x=0, y=0,
                   resize_source=False, mask=hard)
    inverted = node(str(base + 10), "InvertMask", mask=hard)
    joined = node(str(base + 2), "JoinImageWithAlpha", image=painted, alpha=inverted)
    if not feather:
        return joined, scaled, inverted
    radius = min(feather, 31)  # ImageBlur's largest radius
    if radius != feather:
        notes.append(f"inpainting: a {feather}-pixel feather; ImageBlur blurs 31 pixels at most")
    notes.append("inpainting: where the feathered mask reaches the image border it differs a little (ImageBlur "
                 "reflects the border, cascade_lab repeats it)")
    as_image = node(str(base + 11), "MaskToImage", mask=hard)
    blurred = node(str(base + 12), "ImageBlur", image=as_image, blur_radius=radius, sigma=0.5 * feather / radius)
    soft = node(str(base + 13), "ImageToMask", image=blurred, channel="red")
    return joined, scaled, node(str(base + 14), "InvertMask", mask=soft)


def ui_workflow(graph: Graph, notes: Sequence[str] = ()) -> dict[str, Any]:
    """ComfyUI's UI form of an API graph: nodes with ``widgets_values`` in the widget order (seeds followed by the
    hidden control_after_generate), links, positions in columns left to right by depth; ``notes`` as a Note."""
    ids = {node_id: i + 1 for i, node_id in enumerate(graph)}
    ids = {node_id: int(node_id) if node_id.isdigit() else n for node_id, n in ids.items()}
    depth: dict[str, int] = {}

    def level(node_id: str) -> int:
        if node_id not in depth:
            depth[node_id] = 0
            sources = [v[0] for v in graph[node_id]["inputs"].values() if _is_link(v)]
            depth[node_id] = 1 + max((level(s) for s in sources), default=-1)
        return depth[node_id]

    links: list[list[Any]] = []
    nodes: list[dict[str, Any]] = []
    rows: dict[int, int] = {}
    outputs: dict[tuple[str, int], list[int]] = {}
    for node_id, entry in graph.items():
        spec = NODES[entry["class_type"]]
        inputs = []
        for slot, inp in enumerate(i for i in spec.inputs if not i.widget):
            value = entry["inputs"].get(inp.name)
            link = None
            if _is_link(value):
                link = len(links) + 1
                links.append([link, ids[value[0]], int(value[1]), ids[node_id], slot, inp.type])
                outputs.setdefault((value[0], int(value[1])), []).append(link)
            inputs.append({"name": inp.name, "type": inp.type, "link": link})
        widgets = [("fixed" if name is None else entry["inputs"].get(name, _default(entry["class_type"], name)))
                   for name in widget_names(entry["class_type"])]
        column = level(node_id)
        row = rows.get(column, 0)
        rows[column] = row + 1
        nodes.append({"id": ids[node_id], "type": entry["class_type"], "pos": [60 + 380 * column, 60 + 260 * row],
                      "size": [320, 58 + 26 * (len(inputs) + len(widgets))], "flags": {}, "order": 0, "mode": 0,
                      "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": entry["class_type"]},
                      "widgets_values": widgets, "_key": node_id})
    for n in nodes:
        key = n.pop("_key")
        n["outputs"] = [{"name": name, "type": kind, "links": outputs.get((key, slot), []), "slot_index": slot}
                        for slot, (name, kind) in enumerate(NODES[n["type"]].outputs)]
    for order, n in enumerate(sorted(nodes, key=lambda n: (n["pos"][0], n["pos"][1]))):
        n["order"] = order
    last = max(n["id"] for n in nodes)
    if notes:
        last += 1
        nodes.append({"id": last, "type": "Note", "pos": [60, 60 + 260 * max(rows.values(), default=0)],
                      "size": [520, 40 + 22 * len(notes)], "flags": {}, "order": len(nodes), "mode": 0,
                      "inputs": [], "outputs": [], "properties": {"text": ""},
                      "widgets_values": ["What ComfyUI has no equivalent for (cascade_lab's generation differs "
                                         "here):\n" + "\n".join(f"- {n}" for n in notes)]})
    return {"last_node_id": last, "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"cascade_lab": True}, "version": 0.4}


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def _default(class_type: str, name: str) -> Any:
    inp = NODES[class_type].input(name)
    return inp.default if inp is not None else "image"  # LoadImage's "upload"


def png_chunks(params: GenerationParams, index: int | None = None) -> dict[str, str]:
    """The ``prompt`` (API form) and ``workflow`` (UI form) text chunks ComfyUI reads from a PNG."""
    graph, notes = api_prompt(params, index)
    return {"prompt": json.dumps(graph), "workflow": json.dumps(ui_workflow(graph, notes))}


# -- reading a ComfyUI graph back --------------------------------------------------------------------------------
def params_from_graph(graph: Mapping[str, Any], size: tuple[int, int] | None = None) -> GenerationParams:
    """The `GenerationParams` of a ComfyUI API graph's Stage C → Stage B chain, read statically (no model, no
    image); ``size`` (width, height) is the saved image's, the only size an img2img graph does not state."""
    from .workflow import WorkflowError

    def source(value: Any) -> dict[str, Any] | None:
        return graph.get(str(value[0])) if _is_link(value) else None

    def upstream(value: Any, kinds: tuple[str, ...], via: tuple[str, ...]) -> dict[str, Any] | None:
        """The first node of ``kinds`` found following the ``via`` inputs back from a link."""
        seen = 0
        node = source(value)
        while node is not None and seen < 100:
            if node["class_type"] in kinds:
                return node
            node = next((source(node["inputs"][k]) for k in via if _is_link(node["inputs"].get(k))), None)
            seen += 1
        return None

    samplers = ("KSampler", "KSamplerAdvanced")
    outs = [n for n in graph.values() if n.get("class_type") in ("SaveImage", "PreviewImage")]
    decode = next((upstream(n["inputs"].get("images"), ("VAEDecode",), ("images", "image", "destination"))
                   for n in outs), None)
    ksampler_b = upstream(decode["inputs"].get("samples"), samplers, ()) if decode else None
    cond_b = upstream(ksampler_b["inputs"].get("positive"), ("StableCascade_StageB_Conditioning",),
                      ("conditioning",)) if ksampler_b else None
    ksampler_c = upstream(cond_b["inputs"].get("stage_c"), samplers, ()) if cond_b else None
    if ksampler_b is None or ksampler_c is None:
        raise WorkflowError("the graph has no Stage C KSampler → StableCascade_StageB_Conditioning → Stage B "
                            "KSampler → VAEDecode → SaveImage chain to read parameters from")
    c, b = ksampler_c["inputs"], ksampler_b["inputs"]

    def text(value: Any) -> str:
        node = upstream(value, ("CLIPTextEncode",), ("conditioning", "positive", "conditioning_1", "conditioning_to"))
        return str(node["inputs"].get("text", "")) if node and not _is_link(node["inputs"].get("text")) else ""

    def model_chain(value: Any) -> tuple[str, float | None, list[tuple[str, float]]]:
        shift, node = None, source(value)
        loras: list[tuple[str, float]] = []
        while node is not None:
            inputs = node["inputs"]
            if node["class_type"] == "ModelSamplingStableCascade" and shift is None:
                shift = float(inputs["shift"])
            elif node["class_type"] in ("LoraLoader", "LoraLoaderModelOnly"):
                loras.insert(0, (str(inputs["lora_name"]), float(inputs["strength_model"])))
            elif "ckpt_name" in inputs or "unet_name" in inputs:
                return str(inputs.get("ckpt_name", inputs.get("unet_name"))), shift, loras
            node = source(inputs.get("model"))
        return "", shift, loras

    latent = upstream(c.get("latent_image"), ("StableCascade_EmptyLatentImage", "StableCascade_StageC_VAEEncode"),
                      ("samples",))
    width, height = size or (1024, 1024)
    batch, compression, init_image = 1, 42.0, None
    if latent is not None:
        li = latent["inputs"]
        compression = float(li.get("compression", 42))
        if latent["class_type"] == "StableCascade_EmptyLatentImage":
            width, height, batch = int(li["width"]), int(li["height"]), int(li.get("batch_size", 1))
        else:
            load = upstream(li.get("image"), ("LoadImage",), ("image",))
            init_image = str(load["inputs"]["image"]) if load else "image"
    ckpt_c, shift_c, loras = model_chain(c.get("model"))
    ckpt_b, shift_b, loras_b = model_chain(b.get("model"))
    loras += loras_b  # Stage B LoRAs: Cascade.load_lora puts each on its stage by the file's header

    def seed(inputs: Mapping[str, Any]) -> int | None:
        value = inputs.get("seed", inputs.get("noise_seed"))
        return int(value) if isinstance(value, (int, float)) else None

    variant = "lite" if "lite" in ckpt_c else "auto"
    return GenerationParams(
        prompt=text(c.get("positive")), negative_prompt=text(c.get("negative")), width=width, height=height,
        batch_size=batch, seed=seed(c), seed_b=seed(b), steps_c=int(c.get("steps", 20)),
        steps_b=int(b.get("steps", 10)), cfg_c=float(c.get("cfg", 4.0)), cfg_b=float(b.get("cfg", 1.1)),
        shift_c=2.0 if shift_c is None else shift_c, shift_b=1.0 if shift_b is None else shift_b,
        sampler_c=str(c.get("sampler_name", "euler_ancestral")), sampler_b=str(b.get("sampler_name",
                                                                                     "euler_ancestral")),
        scheduler_c=str(c.get("scheduler", "simple")), scheduler_b=str(b.get("scheduler", "simple")), cfg_rho=0.0,
        compression=compression, variant=variant, init_image=init_image, loras=tuple(loras), compat="comfyui",
        denoise=float(c.get("denoise", 1.0)),
        extras={"comfyui_checkpoints": {"c": ckpt_c, "b": ckpt_b}})
