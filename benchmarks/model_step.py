"""One denoising step of Stage C and Stage B: cascade_lab against diffusers' StableCascadeUNet (issue 8).

Both hold the same random weights: diffusers' UNet is built with the same architecture and loaded from
cascade_lab's original-format state dict through diffusers' own single-file converter. Batch 2 (the CFG
pair), fp32 and bf16, the same threads, everything under ``torch.inference_mode``:

* Stage C: widths 768, blocks [[2,6],[6,2]] (139M parameters) on a 24×24 latent (1024² output);
* Stage B: widths [160,320,640,640], blocks [[2,2,6,2],[2,6,2,2]], repeats [2,2,2,2] up (115M) on a
  128×128 latent (512² output).

Contenders: diffusers; cascade_lab called plainly (= the first step of a run); cascade_lab inside
``conditioning_cache()`` as the pipeline calls it (= steps 2…N: the text tokens, the attention keys/values
of the conditioning and Stage B's effnet map are reused); with ``--compile`` also ``torch.compile``
of the cached model. Every round runs each contender once, in turn; the tables give medians and the
median of the per-round ratios, so load changes on a shared machine hit all contenders alike.

    .venv/bin/python benchmarks/model_step.py [--stage c b] [--dtype fp32 bf16] [--repeats 5] [--threads N]
                                              [--compile] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import machine
from _timing import alternate, median, ratio, spread
from _twins import STAGE_B_MID, STAGE_C_MID, build, diffusers_twin

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(stage: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if stage == "c":
        return {"x": torch.randn(2, 16, 24, 24, generator=g), "r": torch.rand(2, generator=g),
                "clip_text": torch.randn(2, 77, 1280, generator=g),
                "clip_text_pooled": torch.randn(2, 1, 1280, generator=g),
                "clip_img": torch.randn(2, 1, 768, generator=g)}
    return {"x": torch.randn(2, 4, 128, 128, generator=g), "r": torch.rand(2, generator=g),
            "effnet": torch.randn(2, 16, 24, 24, generator=g), "clip": torch.randn(2, 1, 1280, generator=g)}


def diffusers_call(stage: str, unet: Any, inp: dict[str, torch.Tensor], dtype: torch.dtype) -> Callable[[], Any]:
    d = {k: v.to(dtype) for k, v in inp.items()}  # diffusers computes in its inputs' dtype
    if stage == "c":
        return lambda: unet(d["x"], d["r"], clip_text_pooled=d["clip_text_pooled"], clip_text=d["clip_text"],
                            clip_img=d["clip_img"], return_dict=False)[0]
    return lambda: unet(d["x"], d["r"], clip_text_pooled=d["clip"], effnet=d["effnet"], return_dict=False)[0]


def bf16_note() -> str:
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "native bf16 (avx512_bf16/AMX) in oneDNN" if native else "NO native bf16: oneDNN emulates it"


def run_stage(stage: str, dtypes: list[str], repeats: int, compile_: bool, stack: contextlib.ExitStack) -> None:
    kwargs = STAGE_C_MID if stage == "c" else STAGE_B_MID
    inp = inputs(stage)
    base = build(stage, kwargs)
    n_params = sum(p.numel() for p in base.parameters()) / 1e6
    contenders: dict[str, Callable[[], Any]] = {}
    checks: dict[str, tuple[float, float]] = {}
    reference = base(**inp)  # float32: the yardstick for both implementations in every dtype
    compile_s: dict[str, float] = {}
    for name in dtypes:
        dtype = DTYPES[name]
        ours = build(stage, kwargs).to(dtype)
        theirs = diffusers_twin(stage, kwargs, ours)
        theirs_call = diffusers_call(stage, theirs, inp, dtype)
        cached = build(stage, kwargs).to(dtype)  # its own copy, so the plain one never sees the cache
        stack.enter_context(cached.conditioning_cache())
        contenders[f"diffusers {name}"] = theirs_call
        contenders[f"cascade_lab {name}"] = functools.partial(ours, **inp)
        contenders[f"cascade_lab {name} cached"] = functools.partial(cached, **inp)
        if compile_:
            compiled = build(stage, kwargs).to(dtype)
            compiled.compile_denoiser()
            stack.enter_context(compiled.conditioning_cache())
            t0 = time.perf_counter()
            compiled(**inp)
            compile_s[name] = time.perf_counter() - t0
            contenders[f"cascade_lab {name} compiled"] = functools.partial(compiled, **inp)
        ours_err, theirs_err = (float((out.float() - reference).abs().max() / reference.abs().max())
                                for out in (ours(**inp), theirs_call()))
        checks[name] = (ours_err, theirs_err)
    times = alternate(contenders, repeats)

    label = "Stage C, 24×24 latent" if stage == "c" else "Stage B, 128×128 latent"
    print(f"\n### {label}, batch 2, {n_params:.0f}M parameters, {repeats} rounds\n")
    print("| contender | dtype | median ms | range ms | time / diffusers' (median of rounds) |")
    print("|---|---|---|---|---|")
    for name in dtypes:
        ref = f"diffusers {name}"
        for c in [k for k in contenders if k.split()[1] == name]:
            r = "1" if c == ref else f"**{ratio(times, c, ref):.2f}**"
            who = c.replace(f" {name}", "").replace("cached", "(cached cond.)").replace("compiled", "(compiled)")
            print(f"| {who} | {name} | {median(times[c]) * 1e3:.0f} | {spread(times[c])} | {r} |")
    print()
    for name in dtypes:
        print(f"- {name}: max |output − fp32 reference| / max |reference|: cascade_lab {checks[name][0]:.1e}, "
              f"diffusers {checks[name][1]:.1e}"
              + (f"; torch.compile took {compile_s[name]:.0f} s" if name in compile_s else ""))
    if "fp32" in dtypes and "bf16" in dtypes:
        for impl, variant in sorted({(c.split()[0], " ".join(c.split()[2:])) for c in contenders}):
            a, b = (" ".join([impl, d, variant]).strip() for d in ("bf16", "fp32"))
            print(f"- bf16 time / fp32 time, {impl} {variant}: {ratio(times, a, b):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", nargs="+", default=["c", "b"], choices=["c", "b"])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd cascade_lab (slow to compile)")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    print(f"machine: {machine()}; {bf16_note()}")
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for stage in args.stage:
            run_stage(stage, args.dtype, repeats, args.compile, stack)


if __name__ == "__main__":
    main()
