"""float32 matrix products on the CPU through oneDNN where it runs them faster than torch's default, MKL.

torch computes a float32 ``x @ W^T`` on the CPU with MKL's sgemm. On x86 CPUs that are not Intel's, MKL does not
run its best code: on an AMD EPYC (Zen 4), one thread, it reaches 74-93 GFLOP/s on the transposed-weight
products every Linear computes and 93-99 on a backward's ``g @ W``, where oneDNN (also in torch's CPU build) reaches
101-108 on the same shapes (benchmarks/RESULTS.md, "CPU GEMM kernel"). Both are IEEE float32 with float32
accumulation; only the order of the sums differs, as between any two BLAS libraries.

The kernel is chosen once per process from the CPU's vendor, never from a timing (a timing can flip between two
runs and give one seed two results): oneDNN on x86 CPUs other than Intel's, MKL elsewhere. The environment
variable ``CASCADE_LAB_CPU_GEMM`` (``mkl``, ``onednn`` or ``auto``) overrides it. Small products stay on MKL in any
case: oneDNN's fixed cost per call (~15 µs) outweighs its speed below ~16 M multiply-adds.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Any, cast

import torch

Tensor = torch.Tensor

ENV = "CASCADE_LAB_CPU_GEMM"
MIN_MACS = 1 << 24  # multiply-adds from which a product goes to oneDNN (its fixed cost per call is ~15 µs)

_choice: bool | None = None  # oneDNN for large float32 CPU products; None: not decided yet


def _cpu_vendor() -> str:
    """x86 vendor string ("GenuineIntel", "AuthenticAMD", ...) or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def _available() -> bool:
    """oneDNN's linear op is in this torch build and runs here."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    # the probe runs on real tensors outside any dispatch mode the first caller may be under (fake tensors, or
    # selective checkpointing, which would take it for one of the model's products)
    from torch.utils._python_dispatch import _disable_current_modes

    try:
        with _disable_current_modes():
            torch.ops.mkldnn._linear_pointwise(torch.ones(2, 2), torch.ones(2, 2), None, "none", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    return True


def cpu_gemm() -> str:
    """The float32 CPU kernel this process uses for large products: "onednn" or "mkl" (see the module's doc)."""
    global _choice
    if _choice is None:
        wanted = os.environ.get(ENV, "auto").strip().lower() or "auto"
        if wanted not in ("auto", "mkl", "onednn"):
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: use mkl, onednn or auto (the default: oneDNN on x86 CPUs "
                             "other than Intel's)")
        if wanted == "auto":
            x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
            vendor = _cpu_vendor()
            _choice = x86 and vendor not in ("", "GenuineIntel") and _available()
        else:
            _choice = wanted == "onednn" and _available()
    return "onednn" if _choice else "mkl"


def set_cpu_gemm(kernel: str | None) -> None:
    """Choose the kernel for this process ("mkl", "onednn"), or None to decide again from the environment."""
    global _choice
    if kernel not in (None, "mkl", "onednn"):
        raise ValueError(f"cpu gemm kernel {kernel!r}: use 'mkl' or 'onednn' (or None for the default)")
    _choice = None if kernel is None else (kernel == "onednn" and _available())


def _large(x: Tensor, weight: Tensor) -> bool:
    """A float32 CPU product x [..., in] @ weight^T big enough for oneDNN, with oneDNN chosen."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() * weight.shape[0] >= MIN_MACS and cpu_gemm() == "onednn"
            and not torch.compiler.is_compiling())


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return cast(Tensor, torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""))


def linear_nt(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, in] @ weight[out, in]^T (+ bias) without autograd: oneDNN for large float32 CPU products."""
    if _large(x, weight):
        return _onednn(x, weight, bias)
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def mm_nn(g: Tensor, weight: Tensor) -> Tensor:
    """g [M, out] @ weight [out, in] without autograd (a linear's input gradient); oneDNN reads the transposed
    view as it is, no copy."""
    if _large(g, weight.t()):
        return _onednn(g, weight.t(), None)
    return torch.mm(g, weight)


# -- a LoRA's thin products (one side r ≤ ~16 wide) -------------------------------------------------------------
# Measured on the AMD EPYC (one thread, caches cold as inside a step): MKL takes x [512, 3072] @ D^T (r = 4) in
# 0.94 ms against oneDNN's 0.63, h^T @ x in 0.74 against 0.52, and g [512, 3072] @ U [3072, 4] in 2.0 ms against
# 0.72 (oneDNN with U^T as the weight); with a 768-wide big operand or ~170 rows MKL is the faster for the first two.
THIN_MIN_ROWS, THIN_MIN_DEPTH = 256, 2048


def _thin(big: Tensor, depth: int) -> bool:
    return (big.device.type == "cpu" and big.dtype == torch.float32 and big.shape[0] >= THIN_MIN_ROWS
            and depth >= THIN_MIN_DEPTH and cpu_gemm() == "onednn" and not torch.compiler.is_compiling())


def thin_nt(x: Tensor, down: Tensor) -> Tensor:
    """x [M, K] @ down [r, K]^T -> [M, r] without autograd."""
    return _onednn(x, down, None) if _thin(x, x.shape[1]) else torch.mm(x, down.t())


def thin_tn(h: Tensor, x: Tensor) -> Tensor:
    """h [M, r]^T @ x [M, K] -> [r, K] without autograd."""
    return _onednn(h.t(), x.t(), None) if _thin(x, x.shape[1]) else torch.mm(h.t(), x)


def thin_nn(g: Tensor, up: Tensor) -> Tensor:
    """g [M, N] @ up [N, r] -> [M, r] without autograd (oneDNN with up^T copied contiguous: r × N floats)."""
    if _thin(g, THIN_MIN_DEPTH) and g.numel() >= 1 << 16:
        return _onednn(g, up.t().contiguous(), None)
    return torch.mm(g, up)


def matvec(weight: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """bias + weight [n, k] @ v [k] without autograd, the same bits wherever the operands lie in memory.

    MKL's gemv (``addmv``, and any one-row product) sums in an order that depends on the weight's 16-byte
    alignment: weights mapped from a safetensors file sit at 8-byte offsets, so a lean-loaded model gave other
    bits than a copied one (measured on the AMD EPYC). oneDNN's product does not; MKL's gemm with more rows neither.
    """
    if (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and v.dtype == weight.dtype
            and bias.dtype == weight.dtype and _available()
            and not (torch.is_grad_enabled() and (weight.requires_grad or v.requires_grad or bias.requires_grad))
            and not torch.compiler.is_compiling()):
        return _onednn(v.view(1, -1), weight, bias).view(-1)
    return torch.addmv(bias, weight, v)


class _Linear(torch.autograd.Function):
    """x [M, in] @ W^T + b with oneDNN products forward (y) and backward (x's gradient); the weight's gradient
    g^T x stays on MKL (oneDNN is no faster there)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = mm_nn(grad, weight) if need_x else None
        grad_w = torch.mm(grad.t(), x) if need_w else None
        grad_b = grad.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor | None:
    """``F.linear(x, weight, bias)`` through oneDNN where it applies (a large float32 CPU product, oneDNN chosen,
    no autocast), else None: use ``F.linear``. Differentiable."""
    if (not _large(x, weight) or (bias is not None and bias.dtype != torch.float32)
            or torch.is_autocast_enabled("cpu") or x.shape[-1] != weight.shape[1]):
        return None
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])  # 2-D as the LoRA layer's: the same kernel, the same bits
    y = _Linear.apply(x2, weight, bias) if grad else _onednn(x2, weight, bias)
    return cast(Tensor, y).view(*lead, weight.shape[0])
