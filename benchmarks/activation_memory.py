"""Calibrate the training memory planner's activation term: measured CPU peak vs the counted saved tensors.

Each case runs in a fresh process: a Stage C or Stage B (fp32, dropout off) with its gradients allocated up front, one
warm-up forward+backward, then the peak resident memory (VmHWM, reset through /proc/self/clear_refs) of a second
forward+backward over the resident memory before it. Large blocks go straight to mmap and freed memory is
trimmed first, so the peak is the step's own. Linux only.

    .venv/bin/python benchmarks/activation_memory.py            # the 50 M "mid" Stage C, batch 1 and 2
    .venv/bin/python benchmarks/activation_memory.py --lite     # also the 1.03 B lite at batch 1 (minutes)
    .venv/bin/python benchmarks/activation_memory.py --stage-b  # a 15 M Stage B (the real level layout and
                                                                # repeats) at 512 px: 128x128 Stage A latents
    .venv/bin/python benchmarks/activation_memory.py --stage-b --bf16  # the same under bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MID = {"c_cond": 512, "c_hidden": [512, 512], "nhead": [8, 8], "blocks": [[2, 4], [4, 2]], "dropout": [0.0, 0.0]}
# Stage B: the real layout (4 levels CT CT CTA CTA, up-path repeats) at a fifth of the widths
MID_B = {"c_cond": 256, "c_hidden": [64, 128, 256, 256], "nhead": [-1, -1, 4, 4],
         "blocks": [[1, 2, 4, 2], [2, 4, 2, 1]], "block_repeat": [[1, 1, 1, 1], [3, 3, 2, 2]], "c_clip": 1280,
         "dropout": [0.0, 0.0, 0.0, 0.0]}


def _build(config: dict) -> object:
    from cascade_lab.models.stage_b import StageBConfig
    from cascade_lab.models.stage_c import StageCConfig

    return (StageBConfig if "block_repeat" in config else StageCConfig)(**config)


def _inputs(config: dict, batch: int, side: int) -> tuple:
    import torch

    if "block_repeat" in config:  # Stage B: Stage A latent, EfficientNet latent of the image, pooled text
        return (torch.randn(batch, 4, side, side), torch.rand(batch), torch.randn(batch, 16, side // 8, side // 8),
                torch.randn(batch, 1, config["c_clip"]))
    return (torch.randn(batch, 16, side, side), torch.rand(batch), torch.randn(batch, 77, 1280),
            torch.randn(batch, 1, 1280), torch.zeros(batch, 1, 768))


def measure(config: dict, batch: int, checkpointing: bool | str, side: int, bf16: bool = False,
            full_bf16: bool = False) -> float:
    """Peak bytes above the resident set of one forward+backward (runs in this process); `bf16`: the forward under
    CPU autocast with the planner's CUDA rule for the norms, as the trainer runs it (fp32 weights; bf16 weights and
    gradients with `full_bf16`); `checkpointing` "selective": the blocks' product outputs kept."""
    import ctypes
    import gc
    import re

    import torch

    def forward_backward() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(*args).float().pow(2).mean()
        loss.backward()

    if bf16:  # CUDA's autocast rule for the norms (float32), as the planner counts; patched for the whole process
        # so that checkpointing's recomputation in backward follows it too
        functional = torch.nn.functional
        layer_norm = functional.layer_norm

        def float_layer_norm(x: torch.Tensor, *rest: object, **kwargs: object) -> torch.Tensor:
            if torch.is_autocast_enabled("cpu"):
                x = x.float()
                rest = tuple(r.float() if isinstance(r, torch.Tensor) else r for r in rest)
            return layer_norm(x, *rest, **kwargs)  # type: ignore[arg-type]

        functional.layer_norm = float_layer_norm  # type: ignore[assignment]

    def status(key: str) -> int:
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    model = _build(config).build()  # type: ignore[attr-defined]
    if full_bf16:
        model.to(torch.bfloat16)
    model.train()
    model.enable_gradient_checkpointing(bool(checkpointing), keep_products=checkpointing == "selective")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    args = _inputs(config, batch, side)
    forward_backward()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    forward_backward()
    return float(status("VmHWM") - before)


def counted(config: dict, batch: int, checkpointing: bool | str, side: int, bf16: bool = False,
            full_bf16: bool = False) -> float:
    """The planner's count; with `bf16` plus autocast's bf16 weight copies (2 bytes a parameter: the planner's
    "transient" of a bf16 DDP run), which the measured peak holds too (none with `full_bf16`: bf16 weights)."""
    from cascade_lab.training.memory_plan import saved_activation_bytes

    stage = "b" if "block_repeat" in config else "c"
    model = _build(config)
    copies = 2 * sum(p.numel() for p in model.build().parameters()) if bf16 and not full_bf16 else 0  # type: ignore
    mode = "selective" if checkpointing == "selective" else "full"
    return copies + batch * saved_activation_bytes(model, stage=stage, mixed_precision="bf16" if bf16 else "no",
                                                   latent=(side, side), gradient_checkpointing=bool(checkpointing),
                                                   gradient_checkpointing_mode=mode, full_bf16=full_bf16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lite", action="store_true")
    parser.add_argument("--stage-b", action="store_true", help="the Stage B cases only")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights; the counted side adds "
                        "autocast's weight copies)")
    parser.add_argument("--full-bf16", action="store_true", help="the weights and gradients in bf16 (full_bf16; "
                        "implies --bf16)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.bf16 = args.bf16 or args.full_bf16
    if args.child:
        case = json.loads(args.child)
        print(measure(case["config"], case["batch"], case["ckpt"], case["side"], case.get("bf16", False),
                      case.get("full_bf16", False)))
        return
    modes: list[bool | str] = [False, True, "selective"]
    cases = [("mid", MID, b, c, 24) for c in modes for b in (1, 2)]
    if args.stage_b:
        cases = [("mid B", MID_B, b, c, 128) for c in modes for b in (1, 2)]
    if args.lite:
        lite = {"c_cond": 1536, "c_hidden": [1536, 1536], "nhead": [24, 24], "blocks": [[4, 12], [12, 4]],
                "dropout": [0.0, 0.0]}
        cases += [("lite", lite, 1, False, 24), ("lite", lite, 1, True, 24)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    print("| model | latent | checkpointing | batch | counted GiB | measured peak GiB | measured / counted |")
    print("|---|---|---|---|---|---|---|")
    for name, config, batch, ckpt, side in cases:
        case = {"config": config, "batch": batch, "ckpt": ckpt, "side": side, "bf16": args.bf16,
                "full_bf16": args.full_bf16}
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], env=env, check=True,
                             capture_output=True, text=True).stdout
        peak, count = float(out.strip().splitlines()[-1]), counted(config, batch, ckpt, side, args.bf16,
                                                                              args.full_bf16)
        label = {False: "off", True: "on"}.get(ckpt, ckpt)  # type: ignore[call-overload]
        print(f"| {name} | {side}x{side} | {label} | {batch} | {count / 2**30:.3f} | "
              f"{peak / 2**30:.3f} | {peak / count:.2f} |", flush=True)


if __name__ == "__main__":
    main()
