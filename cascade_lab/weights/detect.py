"""What a weights file holds, decided from its safetensors header alone (no tensor is read).

Rules follow the official key layout (spec §2-§5, §9) and how ComfyUI/diffusers recognise the same files
(peers §2): Stage C by ``clip_txt_mapper.weight`` shape[0] (2048 full, 1536 lite), Stage B by
``down_blocks.1.0.channelwise.0.weight`` last dim (640 full, 576 lite), Stage A by its codebook, the
EfficientNet encoder by ``backbone.*`` + ``mapper.*``, the previewer by ``blocks.*``, ControlNets by
``projections.*``. Fine-tunes that dropped the conditioning mappers are still told apart by other keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .convert import layout_of
from .safetensors_io import Header, read_header

Shapes = Mapping[str, tuple[int, ...]]

# ComfyUI all-in-one checkpoints: key prefix -> the component(s) under it
COMFYUI_PREFIXES = ("model.diffusion_model.", "text_encoder.", "clip_l_vision.", "vae.")

LABELS = {
    "stage_c": "Stage C (text-conditional prior)",
    "stage_b": "Stage B (diffusion decoder)",
    "stage_a": "Stage A (VQGAN)",
    "effnet": "EfficientNet encoder",
    "previewer": "latent previewer",
    "controlnet": "ControlNet",
    "text_encoder": "CLIP-G text encoder",
    "image_encoder": "CLIP ViT-L/14 image encoder",
}
STAGE_C_WIDTH = {2048: "full", 1536: "lite"}  # c_cond == c_hidden
STAGE_B_WIDTH = {640: "full", 576: "lite"}  # c_hidden[1]
CONTROLNETS = {("effnet", 1): "canny", ("effnet", 4): "inpainting", ("large", 16): "super_resolution",
               ("simple", 512): "identity"}


@dataclass(frozen=True)
class Component:
    """One model inside a file: its kind, size variant, key layout and key prefix."""

    kind: str  # stage_c, stage_b, stage_a, effnet, previewer, controlnet, text_encoder, image_encoder
    variant: str | None = None  # full / lite (stages B, C), canny / ... (ControlNet); None: not a shipped size
    layout: str = "official"  # official, comfyui, diffusers
    prefix: str = ""
    width: int | None = None  # the channel count the variant was read from

    def describe(self) -> str:
        size = self.variant or (f"custom width {self.width}" if self.width else "")
        text = LABELS[self.kind] + (f", {size}" if size else "")
        if self.layout != "official":
            text += f", {self.layout} layout"
        return text + (f", keys under {self.prefix!r}" if self.prefix else "")


@dataclass(frozen=True)
class Detection:
    """Everything found in one file (or a sharded set), by component kind."""

    path: Path
    components: Mapping[str, Component] = field(default_factory=dict)
    dtype: str | None = None  # storage dtype holding most values

    def describe(self) -> str:
        if not self.components:
            return "no Stable Cascade model"
        what = "; ".join(c.describe() for c in self.components.values())
        return what + (f" [{self.dtype}]" if self.dtype else "")


def detect(source: str | os.PathLike[str] | Header) -> Detection:
    """Read the header of ``source`` (a file path or a parsed header) and say what it holds."""
    header = source if isinstance(source, Header) else read_header(source)
    shapes = {k: t.shape for k, t in header.tensors.items()}
    return Detection(header.path, detect_shapes(shapes), header.main_dtype)


def detect_shapes(shapes: Shapes) -> dict[str, Component]:
    """Components in a key -> shape mapping, all-in-one prefixes included."""
    found: dict[str, Component] = {}
    prefixed = [p for p in COMFYUI_PREFIXES if any(k.startswith(p) for k in shapes)]
    rest = {k: s for k, s in shapes.items() if not k.startswith(tuple(prefixed))}
    groups: list[tuple[str, Shapes]] = [(p, _strip(shapes, p)) for p in prefixed]
    if rest:
        groups.append(("", rest))
    for prefix, sub in groups:
        if prefix == "vae." and any(k.startswith(("encoder.", "previewer.")) for k in sub):
            # ComfyUI's StageC_coder: effnet under vae.encoder., previewer under vae.previewer.
            for inner in ("encoder.", "previewer."):
                part = _strip(sub, inner)
                comp = classify(part, prefix + inner) if part else None
                if comp:
                    found.setdefault(comp.kind, comp)
            continue
        comp = classify(sub, prefix)
        if comp:
            found.setdefault(comp.kind, comp)
    return found


def _strip(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


def _has_prefix(shapes: Shapes, *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in shapes)


def classify(shapes: Shapes, prefix: str = "") -> Component | None:
    """The single component that a prefix-free key -> shape mapping holds, or None."""
    layout = layout_of(shapes)
    # --- the two diffusion UNets share embedding/clf/down_blocks; conditioning keys set them apart
    b_only = ("effnet_mapper.0.weight", "pixels_mapper.0.weight", "clip_mapper.weight", "down_downscalers.1.1.weight")
    c_only = ("clip_txt_mapper.weight", "clip_img_mapper.weight", "down_downscalers.1.1.blocks.0.weight",
              "up_upscalers.0.1.blocks.1.weight")
    if any(k in shapes for k in b_only):
        width = _dim(shapes, "down_blocks.1.0.channelwise.0.weight", -1) or _dim(
            shapes, "down_downscalers.1.1.weight", 0)
        return Component("stage_b", STAGE_B_WIDTH.get(width or 0), layout, prefix, width)
    if any(k in shapes for k in c_only) or ("clf.1.weight" in shapes and "embedding.1.weight" in shapes):
        width = _dim(shapes, "clip_txt_mapper.weight", 0) or _dim(shapes, "embedding.1.weight", 0)
        return Component("stage_c", STAGE_C_WIDTH.get(width or 0), layout, prefix, width)
    if "vquantizer.codebook.weight" in shapes or "vquantizer.embedding.weight" in shapes:
        return Component("stage_a", None, layout, prefix)
    if _has_prefix(shapes, "projections.") and _has_prefix(shapes, "backbone."):
        c_in = _dim(shapes, "backbone.0.0.weight", 1) or _dim(shapes, "backbone.0.weight", 1)
        mode = ("effnet" if _has_prefix(shapes, "backbone.1.0.block.") else
                "large" if _has_prefix(shapes, "backbone.3.blocks.") else "simple")
        return Component("controlnet", CONTROLNETS.get((mode, c_in or 0)), layout, prefix, c_in)
    if "backbone.1.0.block.0.1.num_batches_tracked" in shapes or (
            _has_prefix(shapes, "backbone.") and _has_prefix(shapes, "mapper.")):
        return Component("effnet", None, layout, prefix)
    if "blocks.0.weight" in shapes and _has_prefix(shapes, "blocks.") and len(shapes[
            "blocks.0.weight"]) == 4:
        return Component("previewer", None, layout, prefix)
    if _has_prefix(shapes, "text_model.", "clip_g.", "transformer.text_model."):
        return Component("text_encoder", None, layout, prefix)
    if _has_prefix(shapes, "vision_model."):
        return Component("image_encoder", None, layout, prefix)
    return None


def _dim(shapes: Shapes, key: str, index: int) -> int | None:
    shape = shapes.get(key)
    return shape[index] if shape else None
