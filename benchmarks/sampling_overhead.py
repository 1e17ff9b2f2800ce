"""Share of a Stage C sampling run spent outside model calls (issue 4 goal: ≤ 2 %).

A mid-size Stage C (widths 768, blocks [[2,6],[6,2]]) on a 24×24 latent, CFG 4 (the model sees batch 2),
20 DDPM steps through `GuidedDenoiser` and the registered sampler, exactly as the pipeline runs it.
Run: `.venv/bin/python benchmarks/sampling_overhead.py [--steps 20] [--sampler ddpm]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine

from cascade_lab.diffusion import GuidedDenoiser, generator_noise
from cascade_lab.models import StageC
from cascade_lab.plugins import get_sampler, get_scheduler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="ddpm")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = StageC(c_cond=768, c_hidden=[768, 768], nhead=[12, 12], blocks=[[2, 6], [6, 2]], dropout=[0, 0]).eval()
    cond = {"clip_text": torch.randn(1, 77, 1280), "clip_text_pooled": torch.randn(1, 1, 1280),
            "clip_img": torch.zeros(1, 1, 768)}
    uncond = {k: torch.randn_like(v) if k != "clip_img" else v for k, v in cond.items()}
    in_model = [0.0]

    def timed_model(*a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = model(*a, **k)
        in_model[0] += time.perf_counter() - t0
        return out

    sampler = get_sampler(args.sampler).fn
    levels = get_scheduler("cosine").fn(args.steps, shift=2.0)
    shares, totals = [], []
    for _ in range(args.repeats + 1):  # the first run warms up
        in_model[0] = 0.0
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 24, 24, generator=generator)
        with torch.inference_mode():
            denoiser = GuidedDenoiser(timed_model, cond, uncond, cfg=4.0, cfg_rho=0.7)
            t0 = time.perf_counter()
            sampler(denoiser, x, levels, noise=generator_noise(generator))
            total = time.perf_counter() - t0
        shares.append((total - in_model[0]) / total)
        totals.append(total)
    share, total = statistics.median(shares[1:]), statistics.median(totals[1:])
    print(f"machine: {machine()}")
    print(f"Stage C {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, 24x24, CFG batch 2, "
          f"{args.steps} {args.sampler} steps")
    print("| total per run | per step | outside model calls | share |")
    print(f"| {total:.2f} s | {total / args.steps * 1e3:.0f} ms | {(total * share) * 1e3:.1f} ms | {share:.2%} |")


if __name__ == "__main__":
    main()
