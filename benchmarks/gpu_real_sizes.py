"""Real sizes on a CUDA GPU: Stage C / Stage B steps and a whole generation, cascade_lab against diffusers,
for the full and lite configs at 1024² in bf16, with random weights (issue 8).

No weights are downloaded and no CPU RAM is spent on them: every cascade_lab stage is built on the meta
device, materialised on the GPU with ``to_empty`` and filled with random values there; diffusers'
StableCascadeUNet is built on meta too and handed the same GPU tensors, converted by diffusers'
single-file converter (``load_state_dict(assign=True)``: both sides share the weight memory). The CLIP
text tower (CLIP-G size: 32 layers, width 1280) and Stage A are built directly on the GPU.

* steps: Stage C on a 24×24 latent, Stage B on a 256×256 latent, batch 2 (the CFG pair); cascade_lab
  plain and inside ``conditioning_cache()`` as its pipeline runs it (``--compile``: compiled too);
* whole generation: `Pipeline.run` against StableCascadePriorPipeline + StableCascadeDecoderPipeline with
  the shared text tower (C 20 steps CFG 4, B 10 steps CFG 1.1, up to the Stage B latent: Stage A is
  skipped in both, as in benchmarks/generation.py).

Every round runs each contender once, in turn (CUDA-synchronised wall time); medians and the median of
per-round ratios. One command, a few minutes on an H100 (≈2 without ``--compile``):

    python benchmarks/gpu_real_sizes.py [--configs full lite] [--repeats 5] [--compile] [--skip-generation]

``--check-on-cpu`` runs the same code on the CPU with tiny configs, to test the script itself.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _timing import alternate, median, ratio
from torch import nn

from cascade_lab.models import StageB, StageC
from cascade_lab.models.stage_b import StageBConfig
from cascade_lab.models.stage_c import StageCConfig

CONFIGS: dict[str, tuple[StageCConfig, StageBConfig]] = {
    "full": (StageCConfig.full(), StageBConfig.full()),
    "lite": (StageCConfig.lite(), StageBConfig.lite()),
}


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A meta-built model on `device` in `dtype`, every parameter ~ N(0, 0.02²) drawn there (no CPU copy)."""
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def build_stage(stage: str, config: Any, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    from cascade_lab.weights.loader import skip_init

    with torch.device("meta"), skip_init():
        model = StageC(**config.kwargs()) if stage == "c" else StageB(**config.kwargs())
    return materialize(model, device, dtype, seed)


def twin_on(stage: str, config: Any, model: nn.Module) -> nn.Module:
    """diffusers' StableCascadeUNet for `model`, built on meta and given model's (converted) tensors."""
    from _twins import diffusers_twin

    return diffusers_twin(stage, config.kwargs(), model, share=True)


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    def call() -> Any:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return call


def step_inputs(stage: str, config: Any, device: torch.device, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    if stage == "c":
        h = -(-size * 3 // 128)  # ceil(size / 42.67): 24 for 1024
        return {"x": torch.randn(2, 16, h, h, device=device, generator=g), "r": torch.rand(2, device=device),
                "clip_text": torch.randn(2, 77, config.c_clip_text, device=device, generator=g),
                "clip_text_pooled": torch.randn(2, 1, config.c_clip_text_pooled, device=device, generator=g),
                "clip_img": torch.randn(2, 1, config.c_clip_img, device=device, generator=g)}
    return {"x": torch.randn(2, 4, size // 4, size // 4, device=device, generator=g),
            "r": torch.rand(2, device=device),
            "effnet": torch.randn(2, 16, -(-size * 3 // 128), -(-size * 3 // 128), device=device, generator=g),
            "clip": torch.randn(2, 1, config.c_clip, device=device, generator=g)}


def bench_steps(name: str, device: torch.device, dtype: torch.dtype, size: int, repeats: int, compile_: bool) -> None:
    from model_step import diffusers_call

    for stage, config in zip("cb", CONFIGS[name], strict=True):
        model = build_stage(stage, config, device, dtype, seed=1)
        twin = twin_on(stage, config, model)
        inp = step_inputs(stage, config, device, size)
        runs = {"diffusers": synced(diffusers_call(stage, twin, inp, dtype), device),
                "cascade_lab": synced(functools.partial(model, **inp), device)}
        cached = functools.partial(model, **inp)
        compile_s = None
        with torch.inference_mode(), model.conditioning_cache():
            runs["cascade_lab cached"] = synced(cached, device)
            if compile_:
                model.compile_denoiser()
                t0 = time.perf_counter()
                runs["cascade_lab cached"]()  # the first call compiles
                compile_s = time.perf_counter() - t0
            expected = runs["diffusers"]().float()
            check = float((runs["cascade_lab"]().float() - expected).abs().max() / expected.abs().max())
            times = alternate(runs, repeats, warmup=2)
        n = sum(p.numel() for p in model.parameters()) / 1e9
        latent = tuple(inp["x"].shape[-2:])
        print(f"\n#### {name} Stage {stage.upper()} ({n:.2f}B), latent {latent[0]}×{latent[1]}, batch 2, {dtype}\n")
        print("| contender | median ms | time / diffusers' |\n|---|---|---|")
        for c in runs:
            r = "1" if c == "diffusers" else f"**{ratio(times, c, 'diffusers'):.2f}**"
            print(f"| {c} | {median(times[c]) * 1e3:.1f} | {r} |")
        compiled = f"; 'cached' is torch.compile'd (compile {compile_s:.0f} s)" if compile_s is not None else ""
        print(f"\nmax |cascade_lab − diffusers| / max |diffusers| = {check:.1e} ({dtype}){compiled}")
        del model, twin, runs, cached
        free(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def text_tower(device: torch.device, dtype: torch.dtype, layers: int) -> Any:
    from generation import HFByteTokenizer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = HFByteTokenizer()
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=1280, intermediate_size=5120, num_hidden_layers=layers,
                            num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, hidden_act="gelu")
    with torch.device(device):  # initialised on the device: no CPU copy
        return CLIPTextModelWithProjection(config).eval().to(dtype)


def bench_generation(name: str, device: torch.device, dtype: torch.dtype, size: int, repeats: int,
                     text_layers: int) -> None:
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline
    from generation import PROMPT, HFByteTokenizer, NoStageA

    from cascade_lab.models.clip import TextEncoder
    from cascade_lab.params import GenerationParams
    from cascade_lab.pipeline import Pipeline, Stages

    config_c, config_b = CONFIGS[name]
    stage_c = build_stage("c", config_c, device, dtype, seed=1)
    stage_b = build_stage("b", config_b, device, dtype, seed=2)
    text = text_tower(device, dtype, text_layers)
    tokenizer = HFByteTokenizer()
    prior: Any = StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=text, scheduler=DDPMWuerstchenScheduler(),
                                            prior=twin_on("c", config_c, stage_c))
    decoder: Any = StableCascadeDecoderPipeline(decoder=twin_on("b", config_b, stage_b), tokenizer=tokenizer,
                                                text_encoder=text, scheduler=DDPMWuerstchenScheduler(), vqgan=None)
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)

    def diffusers_run() -> Any:
        g = torch.Generator(device=device).manual_seed(0)
        emb = prior(PROMPT, height=size, width=size, num_inference_steps=20, guidance_scale=4.0, negative_prompt="",
                    generator=g).image_embeddings
        return decoder(emb, PROMPT, num_inference_steps=10, guidance_scale=1.1, negative_prompt="", generator=g,
                       output_type="latent").images

    stages = Stages(stage_c=stage_c, stage_b=stage_b, stage_a=NoStageA().to(device),
                    text_encoder=TextEncoder(text, tokenizer))
    pipeline = Pipeline(stages, device=device, dtype_c=dtype, dtype_b=dtype)
    params = GenerationParams(PROMPT, width=size, height=size, seed=0)
    runs = {"diffusers": synced(diffusers_run, device),
            "cascade_lab": synced(lambda: pipeline.run(params).latent_b, device)}
    times = alternate(runs, repeats, warmup=1)
    print(f"\n#### {name}: whole generation {size}², C 20 steps CFG 4 + B 10 steps CFG 1.1, to the Stage B latent, "
          f"bf16, text tower {text_layers} layers\n")
    print("| contender | median s | time / diffusers' |\n|---|---|---|")
    for c in runs:
        r = "1" if c == "diffusers" else f"**{ratio(times, c, 'diffusers'):.2f}**"
        print(f"| {c} | {median(times[c]):.2f} | {r} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["full", "lite"], choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--compile", action="store_true", help="run the cached cascade_lab compiled (torch.compile)")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--check-on-cpu", action="store_true", help="tiny configs on the CPU (tests this script)")
    args = parser.parse_args()
    text_layers = 32
    if args.check_on_cpu:
        device, dtype = torch.device("cpu"), torch.float32
        CONFIGS.clear()
        CONFIGS["tiny"] = (StageCConfig(c_cond=64, c_hidden=[64, 64], nhead=[2, 2], blocks=[[1, 1], [1, 1]]),
                           StageBConfig(c_hidden=[16, 32, 64, 64], nhead=[-1, -1, 2, 2], c_cond=64,
                                        blocks=[[1, 1, 1, 1], [1, 1, 1, 1]], block_repeat=[[1, 1, 1, 1], [2, 2, 1, 1]]))
        args.configs, args.size, args.repeats, text_layers = ["tiny"], 256, 2, 2
    elif not torch.cuda.is_available():
        sys.exit("gpu_real_sizes.py needs a CUDA GPU (torch.cuda.is_available() is False on this machine); "
                 "for CPU figures run benchmarks/model_step.py and benchmarks/generation.py instead")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (script check)"
    print(f"device: {name}, torch {torch.__version__}")
    t0 = time.perf_counter()
    for config in args.configs:
        print(f"\n### {config}")
        bench_steps(config, device, dtype, args.size, args.repeats, args.compile)
        if not args.skip_generation:
            bench_generation(config, device, dtype, args.size, max(2, args.repeats // 2), text_layers)
            free(device)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
