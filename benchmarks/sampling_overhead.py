"""Share of a Stage C sampling run spent outside model calls (issue 4 goal, and issue 15's for the ComfyUI family:
≤ 2 %).

A mid-size Stage C (widths 768, blocks [[2,6],[6,2]]) on a 24×24 latent, CFG 4 (the model sees batch 2),
through the denoiser and stage plan the pipeline builds (`plan_stage`, `GuidedDenoiser` / `SigmaDenoiser`):
the official family on the cosine grid with the official noise, the ComfyUI family on `simple` with
ComfyUI's seeding (Brownian trees included). Model time is measured around every model call.
Run: `.venv/bin/python benchmarks/sampling_overhead.py [--steps 20] [--sampler ddpm | --family comfyui]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine

from cascade_lab.diffusion import GuidedDenoiser
from cascade_lab.diffusion.guidance import SigmaDenoiser, step_t_lookup
from cascade_lab.diffusion.noise import ComfyNoise, OfficialNoise
from cascade_lab.models import StageC
from cascade_lab.pipeline import plan_stage
from cascade_lab.plugins import get_scheduler, registries


def run_once(model, sampler, cond, uncond, steps):  # type: ignore[no-untyped-def]
    """(total seconds, seconds inside the model) of one Stage C sampling run."""
    in_model = [0.0]

    def timed_model(*a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = model(*a, **k)
        in_model[0] += time.perf_counter() - t0
        return out

    comfy = sampler.space == "sigma"
    scheduler = get_scheduler("simple" if comfy else "cosine", "comfyui" if comfy else "official")
    source = ComfyNoise(0) if comfy else OfficialNoise(0)
    plan = plan_stage(sampler, scheduler, steps, 2.0, 1.0, 1.0, source, "c", (1, 16, 24, 24), None,
                      "comfyui" if comfy else "official")
    with torch.inference_mode():
        if comfy:
            denoiser = SigmaDenoiser(timed_model, cond, uncond, cfg=4.0, cfg_rho=0.0,
                                     step_t=step_t_lookup(plan.sigmas, plan.ts))
            x, levels = plan.start_ve(), plan.sigmas
        else:
            denoiser = GuidedDenoiser(timed_model, cond, uncond, cfg=4.0, cfg_rho=0.7,
                                      step_t=step_t_lookup(plan.levels, plan.ts))
            x, levels = plan.start_vp(), plan.levels
        t0 = time.perf_counter()
        sampler.fn(denoiser, x, levels, noise=plan.noise)
        total = time.perf_counter() - t0
    return total, in_model[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="ddpm", help="a registered name (ComfyUI's as comfyui.NAME if it clashes)")
    parser.add_argument("--family", help="every sampler of this family instead (official, comfyui)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = StageC(c_cond=768, c_hidden=[768, 768], nhead=[12, 12], blocks=[[2, 6], [6, 2]], dropout=[0, 0]).eval()
    cond = {"clip_text": torch.randn(1, 77, 1280), "clip_text_pooled": torch.randn(1, 1, 1280),
            "clip_img": torch.zeros(1, 1, 768)}
    uncond = {k: torch.randn_like(v) if k != "clip_img" else v for k, v in cond.items()}
    reg = registries()["sampler"]
    names = [s.name for s in reg if s.family == args.family] if args.family else [args.sampler]
    run_once(model, reg.get(names[0]), cond, uncond, 2)  # warm-up
    print(f"machine: {machine()}")
    print(f"Stage C {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, 24x24, CFG batch 2, "
          f"{args.steps} steps, median of {args.repeats}")
    print("| sampler | total per run | per step | outside model calls | share |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for name in names:
        runs = [run_once(model, reg.get(name), cond, uncond, args.steps) for _ in range(args.repeats)]
        total = statistics.median(t for t, _ in runs)
        share = statistics.median((t - m) / t for t, m in runs)
        worst = max(worst, share)
        print(f"| {name} | {total:.2f} s | {total / args.steps * 1e3:.0f} ms | {total * share * 1e3:.1f} ms | "
              f"{share:.2%} |", flush=True)
    print(f"worst share: {worst:.2%}")


if __name__ == "__main__":
    main()
