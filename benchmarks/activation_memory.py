"""Calibrate the training memory planner's activation term: measured CPU peak vs the counted saved tensors.

Each case runs in a fresh process: a Stage C (fp32, dropout off) with its gradients allocated up front, one
warm-up forward+backward, then the peak resident memory (VmHWM, reset through /proc/self/clear_refs) of a second
forward+backward over the resident memory before it. Large blocks go straight to mmap and freed memory is
trimmed first, so the peak is the step's own. Linux only.

    .venv/bin/python benchmarks/activation_memory.py            # the 50 M "mid" Stage C, batch 1 and 2
    .venv/bin/python benchmarks/activation_memory.py --lite     # also the 1.03 B lite at batch 1 (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MID = {"c_cond": 512, "c_hidden": [512, 512], "nhead": [8, 8], "blocks": [[2, 4], [4, 2]], "dropout": [0.0, 0.0]}


def measure(config: dict, batch: int, checkpointing: bool, side: int) -> float:
    """Peak bytes above the resident set of one forward+backward (runs in this process)."""
    import ctypes
    import gc
    import re

    import torch

    from cascade_lab.models.stage_c import StageCConfig

    def status(key: str) -> int:
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    model = StageCConfig(**config).build()
    model.train()
    model.enable_gradient_checkpointing(checkpointing)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x = torch.randn(batch, 16, side, side)
    args = (x, torch.rand(batch), torch.randn(batch, 77, 1280), torch.randn(batch, 1, 1280),
            torch.zeros(batch, 1, 768))
    model(*args).pow(2).mean().backward()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    model(*args).pow(2).mean().backward()
    return float(status("VmHWM") - before)


def counted(config: dict, batch: int, checkpointing: bool, side: int) -> float:
    from cascade_lab.models.stage_c import StageCConfig
    from cascade_lab.training.memory_plan import saved_activation_bytes

    return batch * saved_activation_bytes(StageCConfig(**config), mixed_precision="no", latent=(side, side),
                                          gradient_checkpointing=checkpointing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lite", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case = json.loads(args.child)
        print(measure(case["config"], case["batch"], case["ckpt"], case["side"]))
        return
    cases = [("mid", MID, b, c) for c in (False, True) for b in (1, 2)]
    if args.lite:
        lite = {"c_cond": 1536, "c_hidden": [1536, 1536], "nhead": [24, 24], "blocks": [[4, 12], [12, 4]],
                "dropout": [0.0, 0.0]}
        cases += [("lite", lite, 1, False), ("lite", lite, 1, True)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    print("| model | checkpointing | batch | counted GiB | measured peak GiB | measured / counted |")
    print("|---|---|---|---|---|---|")
    for name, config, batch, ckpt in cases:
        case = {"config": config, "batch": batch, "ckpt": ckpt, "side": 24}
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], env=env, check=True,
                             capture_output=True, text=True).stdout
        peak, count = float(out.strip().splitlines()[-1]), counted(config, batch, ckpt, 24)
        print(f"| {name} | {'on' if ckpt else 'off'} | {batch} | {count / 2**30:.3f} | {peak / 2**30:.3f} | "
              f"{peak / count:.2f} |", flush=True)


if __name__ == "__main__":
    main()
