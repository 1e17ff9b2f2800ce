"""The pieces of a KSampler on cascade_lab: one conditioning per side as Stage C / Stage B inputs, KSamplerAdvanced's
step window, and the `GenerationParams` a Stage C → Stage B → Stage A chain amounts to."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from ..params import GenerationParams
from .models import Cond

Tensor = torch.Tensor
STAGE_B_SCALE = torch.tensor(1 / 0.43)  # ComfyUI's Stage B latent format: model latent / float32(1/0.43)


def stage_c_inputs(cond: Cond, batch: int, clip_img_width: int) -> dict[str, Tensor]:
    """Stage C's inputs from one conditioning, repeated to the batch: CLIP-G tokens, pooled [B, 1, C] and the
    unCLIP image embeddings [B, n, 768] (ComfyUI's zeros [B, 1, 768] without)."""
    if cond.image_embeds:
        clip_img = torch.stack(list(cond.image_embeds))[None].float()
    else:
        clip_img = torch.zeros(1, 1, clip_img_width)
    return {"clip_text": cond.cond.float().expand(batch, -1, -1), "clip_text_pooled":
            cond.pooled.float().view(1, 1, -1).expand(batch, -1, -1), "clip_img": clip_img.expand(batch, -1, -1)}


def stage_b_inputs(cond: Cond, batch: int, shape: Any, like: Tensor | None = None) -> dict[str, Tensor]:
    """Stage B's inputs: the Stage C prior (ComfyUI's zeros [1, 16, 4·H // 42, 4·W // 42] without; zeros of the
    other side's shape when there is one, the same after Stage B's resize, so both sides run in one batch) and
    pooled."""
    if cond.prior is not None:
        prior = cond.prior.float()
    elif like is not None:
        prior = torch.zeros_like(like)
    else:
        prior = torch.zeros(1, 16, int(shape[-2]) * 4 // 42, int(shape[-1]) * 4 // 42)
    prior = prior.expand(batch, -1, -1, -1) if prior.size(0) == 1 else prior
    return {"effnet": prior, "clip": cond.pooled.float().view(1, 1, -1).expand(batch, -1, -1)}


def step_window(plan: Any, start: int, end: int | None, force_full_denoise: bool) -> Any:
    """KSamplerAdvanced's start_at_step / end_at_step on a plan: a slice of its σ levels (the last set to 0 when
    the sampler does not return leftover noise)."""
    sigmas, levels, ts = plan.sigmas, plan.levels, plan.ts
    if end is not None and end < len(sigmas) - 1:
        sigmas, levels, ts = sigmas[:end + 1].clone(), levels[:end + 1].clone(), ts[:end + 1].clone()
        if force_full_denoise:
            sigmas[-1], levels[-1] = 0.0, math.inf
    if start > 0:
        if start >= len(sigmas) - 1:
            raise ValueError(f"start_at_step {start} leaves no steps of {len(plan.sigmas) - 1}")
        sigmas, levels, ts = sigmas[start:], levels[start:], ts[start:]
    return replace(plan, sigmas=sigmas, levels=levels, ts=ts)


def generation_params(decode: dict[str, Any]) -> GenerationParams:
    """The cascade_lab parameters of a Stage C → Stage B → Stage A chain (what `read_png_params` gives back); the
    variant is ``comfyui:<the Stage C checkpoint or UNET file>``, both stages' files in ``comfyui_checkpoints``."""
    b = decode["latent"].info
    c = b.get("stage_c", {})
    return GenerationParams(
        prompt=c.get("prompt", ""), negative_prompt=c.get("negative", ""), width=int(c.get("width", 1024)),
        height=int(c.get("height", 1024)), batch_size=int(c.get("batch_size", 1)), seed=c.get("seed"),
        steps_c=int(c.get("steps", 20)), steps_b=int(b.get("steps", 10)), cfg_c=float(c.get("cfg", 4.0)),
        cfg_b=float(b.get("cfg", 1.1)), shift_c=float(c.get("shift", 2.0)), shift_b=float(b.get("shift", 1.0)),
        sampler_c=c.get("sampler", "euler_ancestral"), sampler_b=b.get("sampler", "euler_ancestral"),
        scheduler_c=c.get("scheduler", "simple"), scheduler_b=b.get("scheduler", "simple"), cfg_rho=0.0,
        compression=float(c.get("compression", 42)), variant="comfyui:" + str(c.get("model", "")),
        init_image=c.get("init_image"), loras=tuple(c.get("loras", ())), compat="comfyui",
        denoise=float(c.get("denoise", 1.0)), seed_b=b.get("seed"),
        extras={"comfyui_nodes": {"stage_c": c.get("node"), "stage_b": b.get("node"), "decode": decode["decode"]},
                "comfyui_checkpoints": {"c": str(c.get("model", "")), "b": str(b.get("model", ""))}})
