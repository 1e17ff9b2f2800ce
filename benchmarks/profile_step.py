"""Where a step's time goes: torch.profiler over one Stage C / Stage B step of cascade_lab and of diffusers'
StableCascadeUNet (same weights and inputs as benchmarks/model_step.py), grouped into matmuls (addmm/mm/bmm and
the oneDNN linear), attention (SDPA), convolutions, and everything else (norms, GELU, GRN, adds, copies).

    .venv/bin/python benchmarks/profile_step.py [--stage c b] [--dtype fp32 bf16] [--threads 1] [--top 0]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections import defaultdict
from typing import Any

import torch
from _common import machine
from _twins import STAGE_B_MID, STAGE_C_MID, build, diffusers_twin
from model_step import DTYPES, diffusers_call, inputs
from torch.profiler import ProfilerActivity, profile

GROUPS = {"matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm",
                     "mkldnn::_linear_pointwise"),  # cascade_lab's Linear+GELU: the matmul with GELU fused
          "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                        "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention",
                        "aten::_scaled_dot_product_cudnn_attention"),
          "convolution": ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::convolution_overrideable",
                          "aten::_convolution")}


def self_times(fn: Any) -> dict[str, float]:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}


def grouped(times: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for key, seconds in times.items():
        group = next((g for g, names in GROUPS.items() if key in names), "other")
        out[group] += seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", nargs="+", default=["c", "b"], choices=["c", "b"])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=0, help="also list the N ops with the most self time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}\n")
    print("| stage | dtype | implementation | total s | matmul | attention | convolution | other |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for stage in args.stage:
            kwargs = STAGE_C_MID if stage == "c" else STAGE_B_MID
            inp = inputs(stage)
            for name in args.dtype:
                dtype = DTYPES[name]
                ours = build(stage, kwargs).to(dtype)
                theirs = diffusers_twin(stage, kwargs, ours)
                stack.enter_context(ours.conditioning_cache())
                for label, fn in (("diffusers", diffusers_call(stage, theirs, inp, dtype)),
                                  ("cascade_lab (cached cond.)", functools.partial(ours, **inp))):
                    times = self_times(fn)
                    total, groups = sum(times.values()), grouped(times)
                    shares = " | ".join(f"{groups[g] / total:.0%} ({groups[g]:.2f} s)"
                                        for g in ("matmul", "attention", "convolution", "other"))
                    print(f"| {stage.upper()} | {name} | {label} | {total:.2f} | {shares} |")
                    if args.top:
                        for key, seconds in sorted(times.items(), key=lambda kv: -kv[1])[: args.top]:
                            print(f"|  |  |  | {key} | {seconds:.3f} s |  |  |  |")


if __name__ == "__main__":
    main()
