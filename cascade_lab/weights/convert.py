"""Key maps from ComfyUI and diffusers layouts back to the official Stable Cascade names.

The official files use the module names of github.com/Stability-AI/StableCascade (spec §2-§5). Two other
layouts carry the same tensors under other names:

* ComfyUI splits every ``nn.MultiheadAttention`` input projection ``….attn.in_proj_weight [3c, c]`` into
  ``….attn.to_q/to_k/to_v.weight [c, c]`` (bias alike) and keeps ``….attn.out_proj``; its all-in-one
  checkpoints add prefixes (``model.diffusion_model.``, ``text_encoder.``, ``vae.``, ``clip_l_vision.``).
* diffusers' ``StableCascadeUNet`` drops the ``attn.`` level: ``….attention.to_q/to_k/to_v`` and
  ``….attention.to_out.0``; Stage B's ``clip_mapper`` is called ``clip_txt_pooled_mapper``. Its
  ``PaellaVQModel`` (Stage A) names the codebook ``vquantizer.embedding.weight``.

A conversion is a *plan*: official name -> ``Recipe`` (source names concatenated on dim 0, optionally
transposed), so the loader can read split projections straight into one packed buffer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from .safetensors_io import Recipe

if TYPE_CHECKING:
    import torch

# Stage / component names used everywhere in weights/.
STAGES = ("stage_c", "stage_b", "stage_a", "effnet", "previewer", "controlnet")
ENCODERS = ("text_encoder", "image_encoder")
KINDS = STAGES + ENCODERS

# ComfyUI's Stage C checkpoint adds ``vae.encoder.mean`` / ``vae.encoder.std`` [3] next to the EfficientNet:
# the ImageNet normalisation that cascade_lab applies itself (``models.effnet.imagenet_normalize``).
EFFNET_CONSTANTS = ("mean", "std")

_SPLIT = re.compile(r"^(?P<stem>.*)\.to_(?P<part>[qkv])\.(?P<what>weight|bias)$")
_OUT = re.compile(r"^(?P<stem>.*)\.to_out\.0\.(?P<what>weight|bias)$")


class ConversionError(ValueError):
    """Keys that cannot be mapped to the official layout (e.g. ``to_q`` without ``to_k``)."""


def _attention_stem(stem: str) -> str:
    """``x.attention`` (diffusers) and ``x.attention.attn`` (ComfyUI) both mean ``x.attention.attn``."""
    return stem if stem.endswith(".attn") else f"{stem}.attn"


def plan_official(keys: Iterable[str], kind: str, prefix: str = "") -> dict[str, Recipe]:
    """Map every key under ``prefix`` to its official name for component ``kind``.

    Keys outside ``prefix`` are ignored; official names pass through unchanged, so an official file gets
    the identity plan.
    """
    names = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    plan: dict[str, Recipe] = {}
    packed: dict[tuple[str, str], dict[str, str]] = {}  # (stem, weight|bias) -> {q|k|v: source}
    for name in names:
        source = prefix + name
        if kind in ("stage_c", "stage_b", "controlnet"):
            m = _SPLIT.match(name)
            if m:
                packed.setdefault((_attention_stem(m["stem"]), m["what"]), {})[m["part"]] = source
                continue
            m = _OUT.match(name)
            if m:
                plan[f"{_attention_stem(m['stem'])}.out_proj.{m['what']}"] = Recipe((source,))
                continue
            if kind == "stage_b" and name.startswith("clip_txt_pooled_mapper."):
                plan["clip_mapper." + name.removeprefix("clip_txt_pooled_mapper.")] = Recipe((source,))
                continue
        elif kind == "stage_a" and name == "vquantizer.embedding.weight":
            plan["vquantizer.codebook.weight"] = Recipe((source,))
            continue
        elif kind == "effnet" and name in EFFNET_CONSTANTS:
            continue  # ComfyUI's StageC_coder buffers: the ImageNet constants, checked by the loader
        elif kind == "text_encoder":
            plan_name = _clip_text_name(name)
            if plan_name is None:
                continue
            if name.endswith("text_projection") and not name.endswith(".weight"):
                plan[plan_name] = Recipe((source,), transpose=True)  # open_clip stores [in, out]
                continue
            name = plan_name
        elif kind == "image_encoder":
            if name.endswith("embeddings.position_ids"):
                continue  # a non-persistent buffer in current transformers; old exports still carry it
        plan[name] = Recipe((source,))
    for (stem, what), parts in packed.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            have = ", ".join(parts[p] for p in sorted(parts))
            raise ConversionError(
                f"attention projection {stem}: found {have} but not to_{'/to_'.join(missing)}; "
                f"the file is incomplete")
        plan[f"{stem}.in_proj_{what}"] = Recipe((parts["q"], parts["k"], parts["v"]))
    return plan


def _clip_text_name(name: str) -> str | None:
    """ComfyUI's ``clip_g.transformer.text_model.*`` / ``clip_g.text_projection`` -> transformers names."""
    name = name.removeprefix("clip_g.")
    if name == "text_projection":
        return "text_projection.weight"
    if name == "logit_scale" or name.endswith("embeddings.position_ids"):
        return None  # not part of CLIPTextModelWithProjection's state dict
    return name.removeprefix("transformer.")


def to_official(
    state_dict: Mapping[str, torch.Tensor], kind: str, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Apply :func:`plan_official` to an in-memory state dict (tests, small files)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, recipe in plan_official(state_dict.keys(), kind, prefix).items():
        parts = [state_dict[s] for s in recipe.sources]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        out[name] = t.t().contiguous() if recipe.transpose else t
    return out


def layout_of(keys: Iterable[str]) -> str:
    """``official``, ``comfyui`` or ``diffusers``, from the key names alone (after prefix removal)."""
    keys = list(keys)
    if any(_SPLIT.match(k) and ".attn.to_" in k for k in keys):
        return "comfyui"
    if any(_SPLIT.match(k) or _OUT.match(k) for k in keys) or "vquantizer.embedding.weight" in keys:
        return "diffusers"
    if "clip_txt_pooled_mapper.weight" in keys and "effnet_mapper.0.weight" in keys:
        return "diffusers"
    return "official"
