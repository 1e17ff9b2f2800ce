"""Whole generation: cascade_lab's `Pipeline.run` against diffusers' StableCascadePriorPipeline +
StableCascadeDecoderPipeline, built in this process from the same models (issue 8).

What is compared, on both sides with the same steps and guidance (Stage C 20 steps CFG 4, Stage B 10 steps
CFG 1.1, batch 1 so every model call is the CFG pair):

* one CLIP text model object, shared (2 layers, width 1280, random weights; a byte tokenizer — the
  same token ids and masks on both sides), encoding the prompt and the empty negative;
* Stage C and Stage B: cascade_lab models with random weights; diffusers' UNets are built from their
  original-format state dicts by diffusers' single-file converter (`_twins.diffusers_twin`);
* Stage A is skipped in both: diffusers' decoder returns its latent (``output_type="latent"``) and
  cascade_lab's pipeline decodes with a no-op stand-in, so the times end at the Stage B latent.

The samplers differ by design (cascade_lab: the official GDF DDPM with shift 2 and CFG rescale 0.7;
diffusers: its DDPMWuerstchenScheduler without either), so the latents differ; the number and the
size of the model calls are the same, and the same seed gives the same output on each side run to run.
Default 512² (Stage C latent 12×12, Stage B 128×128).

    .venv/bin/python benchmarks/generation.py [--size 512] [--dtype fp32 bf16] [--repeats 3] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from _common import machine
from _timing import alternate, median, ratio
from _twins import diffusers_twin, randomize
from torch import nn

from cascade_lab.models import StageB, StageC
from cascade_lab.models.clip import TextEncoder
from cascade_lab.models.tiny import CharTokenizer
from cascade_lab.params import GenerationParams
from cascade_lab.pipeline import Pipeline, Stages

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Small stages, so that 30 steps on each side stay within a minute or two on two busy cores.
STAGE_C_SMALL: dict[str, Any] = {"c_cond": 512, "c_hidden": [512, 512], "nhead": [8, 8], "blocks": [[1, 3], [3, 1]],
                                 "dropout": [0.0, 0.0]}
STAGE_B_SMALL: dict[str, Any] = {"c_hidden": [96, 192, 384, 384], "nhead": [-1, -1, 6, 6],
                                 "blocks": [[1, 1, 2, 1], [1, 2, 1, 1]], "block_repeat": [[1, 1, 1, 1], [2, 2, 2, 2]],
                                 "dropout": [0.0, 0.0, 0.0, 0.0]}
PROMPT = "a photograph of a lighthouse on a cliff at dusk"


class HFByteTokenizer(CharTokenizer):
    """The byte tokenizer with the slice of the transformers call diffusers' pipelines make (same ids as ours)."""

    model_max_length = 77

    def __call__(self, prompts: Any, padding: str | bool = False, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None, **kwargs: Any) -> Any:
        if return_tensors is None:
            return super().__call__(prompts, **kwargs)
        from transformers import BatchEncoding

        rows = [[self.bos_token_id, *ids, self.eos_token_id] for ids in super().__call__(prompts)["input_ids"]]
        length = max_length if padding == "max_length" and max_length else max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            row = row[:length]
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})

    def batch_decode(self, ids: Any, **_: Any) -> list[str]:
        return [bytes(int(i) for i in row if int(i) < 256).decode("utf-8", "replace") for row in ids]


class NoStageA(nn.Module):
    """Stage A skipped: `decode` returns black pixels of the right size at no cost."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent.new_zeros(latent.size(0), 3, latent.size(2) * 4, latent.size(3) * 4)


def clip_text_model(dtype: torch.dtype) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = HFByteTokenizer()
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=1280, intermediate_size=5120, num_hidden_layers=2,
                            num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, hidden_act="gelu")
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(config).eval().to(dtype)


def contenders(dtype_name: str, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline

    dtype = DTYPES[dtype_name]
    text_model = clip_text_model(dtype)
    stage_c = randomize(StageC(**STAGE_C_SMALL), seed=1).eval()
    stage_b = randomize(StageB(**STAGE_B_SMALL), seed=2).eval()
    prior = diffusers_twin("c", STAGE_C_SMALL, stage_c).to(dtype)
    decoder = diffusers_twin("b", STAGE_B_SMALL, stage_b).to(dtype)
    tokenizer = HFByteTokenizer()
    prior_pipe: Any = StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=text_model, prior=prior,
                                            scheduler=DDPMWuerstchenScheduler())
    decoder_pipe: Any = StableCascadeDecoderPipeline(decoder=decoder, tokenizer=tokenizer, text_encoder=text_model,
                                                scheduler=DDPMWuerstchenScheduler(), vqgan=None)
    for pipe in (prior_pipe, decoder_pipe):
        pipe.set_progress_bar_config(disable=True)

    def diffusers_run() -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        embeddings = prior_pipe(PROMPT, height=size, width=size, num_inference_steps=20, guidance_scale=4.0,
                                negative_prompt="", generator=g).image_embeddings
        return decoder_pipe(embeddings, PROMPT, num_inference_steps=10, guidance_scale=1.1, negative_prompt="",
                            generator=g, output_type="latent").images

    stages = Stages(stage_c=stage_c, stage_b=stage_b, stage_a=NoStageA(),
                    text_encoder=TextEncoder(text_model, tokenizer))
    pipeline = Pipeline(stages, dtype_c=dtype, dtype_b=dtype)
    params = GenerationParams(PROMPT, width=size, height=size, seed=0)  # official steps and guidance

    split: dict[str, float] = {}

    def ours_run() -> torch.Tensor:
        out = pipeline.run(params)
        split.update(out.timings)
        return out.latent_b

    n_params = tuple(sum(p.numel() for p in m.parameters()) / 1e6 for m in (stage_c, stage_b))
    return {f"diffusers {dtype_name}": diffusers_run, f"cascade_lab {dtype_name}": ours_run}, {
        "latent shapes": (tuple(ours_run().shape), tuple(diffusers_run().shape)), "params": n_params, "split": split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    repeats = 2 if args.quick else args.repeats
    print(f"machine: {machine()}")
    runs: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for name in args.dtype:
        fns, info[name] = contenders(name, args.size)
        runs.update(fns)
    times = alternate(runs, repeats, warmup=0)  # contenders() already ran each once
    c_m, b_m = next(iter(info.values()))["params"]
    print(f"\n### Whole generation {args.size}², Stage C {c_m:.0f}M + Stage B {b_m:.0f}M parameters, "
          f"C 20 steps CFG 4, B 10 steps CFG 1.1, up to the Stage B latent, {repeats} rounds\n")
    print("| contender | dtype | median s | range s | time / diffusers' (median of rounds) |")
    print("|---|---|---|---|---|")
    for name in args.dtype:
        ref = f"diffusers {name}"
        for c in (ref, f"cascade_lab {name}"):
            r = "1" if c == ref else f"**{ratio(times, c, ref):.2f}**"
            lo, hi = min(times[c]), max(times[c])
            print(f"| {c.split()[0]} | {name} | {median(times[c]):.2f} | {lo:.2f}–{hi:.2f} | {r} |")
    for name in args.dtype:
        ours_shape, theirs_shape = info[name]["latent shapes"]
        split = ", ".join(f"{k} {v:.2f} s" for k, v in info[name]["split"].items())
        print(f"- {name}: Stage B latents {ours_shape} (cascade_lab) and {theirs_shape} (diffusers); "
              f"cascade_lab's last run: {split}")


if __name__ == "__main__":
    main()
