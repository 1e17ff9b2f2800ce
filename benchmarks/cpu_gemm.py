"""float32 CPU products: MKL (torch's default) against oneDNN (`cascade_lab.models.gemm`), on this machine.

Two tables, every contender once per round in turn (`_timing.alternate`), one thread unless ``--threads``:

* the products of the mid-size Stage C's training step at batch 2, 16×16 latents (512 rows; the
  `training_vs_kohya.py` model): a Linear's ``x @ W^T``, its input gradient ``g @ W``, its weight gradient
  ``g^T @ x``, and a LoRA's thin products, with caches cold (a 64 MB buffer touched before each call), in GFLOP/s;
* one fp32 Stage C inference step (the mid-size model of `model_step.py`, 24×24 latent, batch 2) with each kernel
  (`set_cpu_gemm`), and the largest output difference between the two.

    .venv/bin/python benchmarks/cpu_gemm.py [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from _common import machine
from _timing import alternate, median, ratio
from _twins import STAGE_C_MID, build

from cascade_lab.models import gemm

ROWS = 512  # batch 2 at 16×16 tokens


def _onednn_nn(g: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """g @ up as `gemm.thin_nn` runs it on oneDNN (up^T copied contiguous, the copy counted)."""
    return gemm._onednn(g, up.t().contiguous(), None)


def products() -> dict[str, tuple[float, dict[str, Callable[[], object]]]]:
    """name -> (flops, {kernel: call}) for the step's products, MKL as torch runs it, oneDNN as gemm runs it."""
    lin = torch.ops.mkldnn._linear_pointwise
    out: dict[str, tuple[float, dict[str, Callable[[], object]]]] = {}
    for k, n in ((768, 3072), (3072, 768), (768, 2304), (768, 768)):
        x, w, g = torch.randn(ROWS, k), torch.randn(n, k), torch.randn(ROWS, n)
        flops = 2.0 * ROWS * k * n
        out[f"x @ W^T {ROWS}×{k}→{n}"] = (flops, {"mkl": functools.partial(torch.mm, x, w.t()),
                                                  "onednn": functools.partial(lin, x, w, None, "none", [], "")})
        out[f"g @ W {ROWS}×{n}→{k}"] = (flops, {"mkl": functools.partial(torch.mm, g, w),
                                                "onednn": functools.partial(lin, g, w.t(), None, "none", [], "")})
        out[f"g^T @ x {n}×{ROWS}→{k}"] = (flops, {"mkl": functools.partial(torch.mm, g.t(), x),
                                                  "onednn": functools.partial(lin, g.t(), x.t(), None, "none", [],
                                                                              "")})
    for k, r in ((3072, 4), (2304, 12)):
        x, d, up = torch.randn(ROWS, k), torch.randn(r, k), torch.randn(k, r)
        flops = 2.0 * ROWS * k * r
        out[f"thin x @ D^T {ROWS}×{k}→{r}"] = (flops, {"mkl": functools.partial(torch.mm, x, d.t()),
                                                       "onednn": functools.partial(gemm._onednn, x, d, None)})
        out[f"thin g @ U {ROWS}×{k}→{r}"] = (flops, {"mkl": functools.partial(torch.mm, x, up),
                                                     "onednn": functools.partial(_onednn_nn, x, up)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{machine()}; threads {torch.get_num_threads()}; cascade_lab's choice here: {gemm.cpu_gemm()}\n")

    flush = torch.zeros(16 << 20)  # 64 MB: evicts the caches before each call, as inside a step

    def cold(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            flush.add_(1.0)
            return fn()
        return call

    print("| product | MKL GFLOP/s | oneDNN GFLOP/s | oneDNN time / MKL's |")
    print("|---|---|---|---|")
    base = median(alternate({"flush": lambda: flush.add_(1.0)}, args.repeats * 3)["flush"])
    for name, (flops, calls) in products().items():
        times = alternate({k: cold(fn) for k, fn in calls.items()}, args.repeats * 3)
        rate = {k: flops / max(median(v) - base, 1e-9) / 1e9 for k, v in times.items()}
        print(f"| {name} | {rate['mkl']:.0f} | {rate['onednn']:.0f} | **{rate['mkl'] / rate['onednn']:.2f}** |")

    model = build("c", STAGE_C_MID).eval()
    g = torch.Generator().manual_seed(0)
    inp = {"x": torch.randn(2, 16, 24, 24, generator=g), "r": torch.rand(2, generator=g),
           "clip_text": torch.randn(2, 77, 1280, generator=g), "clip_text_pooled": torch.randn(2, 1, 1280, generator=g),
           "clip_img": torch.randn(2, 1, 768, generator=g)}

    def step(kernel: str) -> torch.Tensor:
        gemm.set_cpu_gemm(kernel)
        with torch.inference_mode():
            return model(**inp)

    outs = {k: step(k) for k in ("mkl", "onednn")}
    diff = float((outs["mkl"] - outs["onednn"]).abs().max() / outs["mkl"].abs().max())
    times = alternate({k: functools.partial(step, k) for k in ("mkl", "onednn")}, args.repeats)
    gemm.set_cpu_gemm(None)
    print(f"\nStage C fp32 inference step (24×24, batch 2, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters, {args.repeats} rounds): MKL {median(times['mkl']) * 1e3:.0f} ms, oneDNN "
          f"{median(times['onednn']) * 1e3:.0f} ms, **{ratio(times, 'onednn', 'mkl'):.2f}** (median of the rounds' "
          f"ratios); max |difference| / max |output| {diff:.1e}")


if __name__ == "__main__":
    main()
