"""Building blocks shared by Stage B and Stage C (official ``modules/common.py``) and their level U-Net.

Attribute names follow the official modules exactly, because they are the checkpoint format
(``down_blocks.0.2.attention.attn.in_proj_weight``, ``down_blocks.0.0.channelwise.2.gamma``, ...).
Everything computes in the parameters' dtype: fp32 and bf16 run without autocast.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.checkpoint import checkpoint

from . import gemm

Tensor = torch.Tensor


@functools.cache
def products() -> frozenset[Any]:
    """The ops whose outputs selective checkpointing keeps: matrix products (every Linear, attention's projections,
    the LoRA products; oneDNN's on the CPU) and fused attention kernels. Their recomputation is most of a block's
    forward time; what is left to recompute (norms, activations, depthwise convolutions, residual adds) is cheap.
    Batched products are left out: in training they are only attention's unfused path (with dropout on a CPU),
    whose query-key product is the whole attention map."""
    aten = torch.ops.aten
    ops = [aten.mm, aten.addmm]
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        if hasattr(aten, name):
            ops.append(getattr(aten, name))
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        ops.append(torch.ops.mkldnn._linear_pointwise)
    return frozenset(ops)


class KeepBudget:
    """The bytes of product outputs selective checkpointing may keep over one forward pass (`limit`; None: no
    limit), and what the last pass kept and left to recompute. Products past the limit are recomputed in the
    backward, as with full checkpointing."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.kept = self.recomputed = 0

    def reset(self) -> None:
        self.kept = self.recomputed = 0

    def take(self, nbytes: int) -> bool:
        if self.limit is not None and self.kept + nbytes > self.limit:
            self.recomputed += nbytes
            return False
        self.kept += nbytes
        return True


# (op, its tensor inputs' shapes, its outputs or None: recomputed, their versions)
_Kept = deque[tuple[Any, list[torch.Size], Any, list[int]]]


class _ProductCache(TorchDispatchMode):
    """One side of selective checkpointing, below autograd: in the forward pass (``replay`` False) it keeps the
    outputs of the product ops (within `budget`); in the recomputation (True) it hands them back in the same order
    instead of running the products, and runs every other op. Only the products are matched one to one: the other
    ops may differ between the two runs (autocast's cache of its weight casts, for one, lives for one autocast
    region, so a block called twice casts again in its recomputation), which torch's own selective checkpointing
    refuses."""

    def __init__(self, kept: _Kept, replay: bool, budget: KeepBudget) -> None:
        super().__init__()
        self.kept, self.replay, self.budget, self.products = kept, replay, budget, products()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket not in self.products:  # every op of the block passes here
            return func(*args, **kwargs)
        shapes = [a.shape for a in args if isinstance(a, Tensor)]
        if not self.replay:
            out = func(*args, **kwargs)
            kept = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
            tensors = [t for t in tree_leaves(kept) if isinstance(t, Tensor)]
            if self.budget.take(sum(t.numel() * t.element_size() for t in tensors)):
                self.kept.append((func, shapes, kept, [t._version for t in tensors]))
            else:
                self.kept.append((func, shapes, None, []))
            return out
        if not self.kept:
            raise RuntimeError(f"selective checkpointing: the recomputed block ran {func} beyond the products its "
                               "forward pass ran; the block must run the same products in the same order")
        op, op_shapes, kept, versions = self.kept.popleft()
        if op is not func or op_shapes != shapes:
            raise RuntimeError(f"selective checkpointing: the recomputed block ran {func} on {shapes} where its "
                               f"forward pass ran {op} on {op_shapes}; the block must run the same products in the "
                               "same order")
        if kept is None:  # past the budget: recomputed
            return func(*args, **kwargs)
        if versions != [t._version for t in tree_leaves(kept) if isinstance(t, Tensor)]:
            raise RuntimeError(f"selective checkpointing: the kept output of {func} was changed in place after the "
                               "forward pass; a block must leave its products' outputs as they are")
        return kept


def keep_products_context(budget: KeepBudget | None = None) -> tuple[_ProductCache, _ProductCache]:
    """``context_fn`` of ``torch.utils.checkpoint.checkpoint`` for selective checkpointing (see `products`)."""
    kept: _Kept = deque()
    budget = budget or KeepBudget()
    return _ProductCache(kept, False, budget), _ProductCache(kept, True, budget)


class Linear(nn.Linear):
    """``nn.Linear`` that leaves its parameters uninitialised: the model's init or a checkpoint fills them."""

    def reset_parameters(self) -> None:
        return None

    def forward(self, x: Tensor) -> Tensor:
        y = gemm.linear(x, self.weight, self.bias)  # oneDNN for large float32 CPU products where it is faster
        return F.linear(x, self.weight, self.bias) if y is None else y


def linear_forward(module: nn.Module) -> TypeGuard[nn.Linear]:
    """The module computes a plain linear: ``nn.Linear``'s own forward or `Linear`'s (the same values)."""
    return isinstance(module, nn.Linear) and type(module).forward in (nn.Linear.forward, Linear.forward)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that leaves its parameters uninitialised (official ``common.Conv2d``)."""

    def reset_parameters(self) -> None:
        return None


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, H, W, C) -> LN over C -> (B, C, H, W)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC input (Woo et al. 2023): x + gamma * (x * Nx) + beta."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        # gamma * (x * nx) + beta + x, as one pass over x: beta + x * (1 + gamma * nx)
        B, _, _, C = x.shape
        return torch.addcmul(self.beta, x, self.channel_scale(x).view(B, 1, 1, C))

    def channel_scale(self, x: Tensor) -> Tensor:
        """1 + gamma * Nx for NHWC x [B, H, W, C]: the per-sample channel scale, (B, C)."""
        B, H, W, C = x.shape
        if x.requires_grad:  # torch.norm's backward is safe where a channel's norm is 0
            gx = torch.norm(x, p=2, dim=(1, 2))  # (B, C): L2 over H, W
        else:  # one reduction over the flattened H*W: 4-6x faster on CPU than torch.norm over the middle
            # dims, ~1.5x faster in bf16 than summing over dims (1, 2)
            gx = _sum_of_squares(x.reshape(B, H * W, C)).sqrt()  # (B, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)  # (B, C)
        return self.gamma.view(1, C) * nx + 1  # (B, C)


def _sum_of_squares(x: Tensor) -> Tensor:
    """Sum of x² over dim 1 of x [B, N, C] -> (B, C) in x's dtype (see `_sum_of_products`)."""
    return _sum_of_products(x, x).to(x.dtype)


def _sum_of_products(a: Tensor, b: Tensor) -> Tensor:
    """Sum of a * b over dim 1 of [B, N, C] tensors -> (B, C) in float32 (float64 for float64), in row chunks of
    ~256 KB where the maps are large.

    Multiplying whole [B, N, C] maps allocates and writes a copy as large as them (Stage B's widest level:
    40 MB, ~6x the time of the reduction); chunk by chunk the products stay in cache (CPU only).
    """
    B, N, C = a.shape
    acc = torch.promote_types(a.dtype, torch.float32)
    rows = max(16, 2**16 // max(C, 1))
    if N <= 4 * rows or a.device.type != "cpu":  # on a GPU the chunks would cost a launch each
        return torch.mul(a, b).sum(dim=1, dtype=acc)
    out = a.new_zeros(B, C, dtype=acc)
    for a_chunk, b_chunk in zip(a.split(rows, dim=1), b.split(rows, dim=1), strict=True):
        out += torch.mul(a_chunk, b_chunk).sum(dim=1, dtype=acc)
    return out


def _map_dot(a: Tensor, b: Tensor) -> Tensor:
    """`_sum_of_products` for training's maps; bf16 / fp16 ones are summed whole in their dtype (float32 inside
    the sum, rounded once): a float32 sum of low-precision chunks copies each chunk first (~2 % of a bf16 step)."""
    if a.dtype in (torch.bfloat16, torch.float16):
        return torch.mul(a, b).sum(dim=1).float()
    return _sum_of_products(a, b)


class _GeluGRN(torch.autograd.Function):
    """GRN(GELU(u)) for NHWC u [B, H, W, C] with a hand-written backward (training).

    Autograd's graph of the two takes ~10 passes over the 4c-wide activations in its backward (norm, div,
    masked_fill, three products, sums, GELU's); the gradient written out takes four. With x = GELU(u),
    G = ‖x‖ over H, W, m = mean_c G + 1e-6, N = G / m, a = 1 + γ N and y = β + x a:
      ∂L/∂x = g a + x t,  t = ∂L/∂G / G (0 where G = 0, as torch.norm's gradient),
      ∂L/∂G_k = γ_k s_k / m - Σ_c γ_c s_c G_c / (C m²),  s = Σ_hw g x,
      ∂L/∂γ = Σ_b N s,  ∂L/∂β = Σ_b,hw g.
    Per-channel sums and scales are float32; y and the gradients are computed in u's dtype.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        B, H, W, C = u.shape
        x = F.gelu(u)
        x3 = x.reshape(B, H * W, C)
        gx = _map_dot(x3, x3).sqrt()  # (B, C) float32
        m = gx.mean(dim=-1, keepdim=True) + 1e-6  # (B, 1)
        a = gamma.to(gx.dtype).view(1, C) * (gx / m) + 1  # (B, C)
        # in x's dtype: mixing a float32 scale into bf16 maps makes ATen copy them to float32 and back (3x slower)
        y = torch.addcmul(beta.to(x.dtype).view(1, 1, 1, C), x, a.to(x.dtype).view(B, 1, 1, C))
        ctx.save_for_backward(u, x, gamma, gx, m, a)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        u, x, gamma, gx, m, a = ctx.saved_tensors
        B, H, W, C = u.shape
        need_u, need_gamma, need_beta = ctx.needs_input_grad
        g = g.contiguous()
        g3, x3 = g.view(B, H * W, C), x.reshape(B, H * W, C)
        s = _map_dot(g3, x3)  # (B, C) float32
        grad_gamma = grad_beta = grad_u = None
        if need_gamma:
            grad_gamma = (s * (gx / m)).sum(dim=0).to(gamma.dtype).view(gamma.shape)
        if need_beta:
            grad_beta = g3.sum(dim=(0, 1), dtype=s.dtype).to(gamma.dtype).view(gamma.shape)
        if need_u:
            dn = gamma.to(s.dtype).view(1, C) * s  # ∂L/∂N (B, C)
            dg = dn / m - (dn * gx).sum(dim=-1, keepdim=True) / (C * m * m)  # ∂L/∂G
            t = torch.where(gx > 0, dg / gx.clamp_min(torch.finfo(gx.dtype).tiny), 0.0)
            dx = torch.mul(g, a.to(g.dtype).view(B, 1, 1, C))
            dx.addcmul_(x, t.to(g.dtype).view(B, 1, 1, C))
            grad_u = torch.ops.aten.gelu_backward(dx, u)
        return grad_u, grad_gamma, grad_beta


def gelu_grn(u: Tensor, grn: GlobalResponseNorm) -> Tensor:
    """GRN(GELU(u)) for NHWC u with the hand-written backward of `_GeluGRN` (same values as the two modules)."""
    return cast(Tensor, _GeluGRN.apply(u, grn.gamma, grn.beta))


def _channel_mlp(c_in: int, c: int, dropout: float) -> nn.Sequential:
    # keys channelwise.{0, 2, 4}: Linear -> GELU -> GRN -> Dropout -> Linear
    return nn.Sequential(
        Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout), Linear(c * 4, c)
    )


_onednn_linear_gelu: bool | None = None  # None: not tried yet; False: unavailable on this build


def _fused_linear_gelu(h: Tensor, linear: nn.Linear) -> Tensor | None:
    """GELU(linear(h)) as one oneDNN op (bias and GELU fused into the matmul) for CPU inference, else None.

    ATen's fp32 addmm first copies the broadcast bias into the output and GELU is another pass over the
    4c-wide activations; fused, a step is ~6 % faster in fp32, ~3 % in bf16 (benchmarks/RESULTS.md).
    """
    global _onednn_linear_gelu
    if (_onednn_linear_gelu is False or h.device.type != "cpu" or torch.is_grad_enabled()
            or h.dtype not in (torch.float32, torch.bfloat16) or linear.weight.dtype != h.dtype
            or torch.compiler.is_compiling()):  # inductor lowers this op only with frozen weights
        return None
    try:
        out: Tensor = torch.ops.mkldnn._linear_pointwise(h, linear.weight, linear.bias, "gelu", [], "none")
    except (AttributeError, RuntimeError, NotImplementedError):  # no oneDNN, or it refuses this dtype/CPU
        _onednn_linear_gelu = False
        return None
    _onednn_linear_gelu = True
    return out


def _plain(layer: nn.Module) -> bool:
    """No forward hooks and no forward set on the instance (a training LoRA's): its class forward computes it."""
    return not layer._forward_hooks and not layer._forward_pre_hooks and "forward" not in layer.__dict__


def channel_mlp(mlp: nn.Sequential, h: Tensor) -> Tensor:
    """Run a `_channel_mlp` on NHWC h [..., c_in] -> [..., c]; the first Linear + GELU fused where it can be."""
    first, gelu = mlp[0], mlp[1]
    fused = None
    if type(first) is Linear and type(gelu) is nn.GELU and gelu.approximate == "none" and _plain(first):
        fused = _fused_linear_gelu(h, first)
    if fused is None:
        grn = mlp[2]
        if (torch.is_grad_enabled() and type(gelu) is nn.GELU and gelu.approximate == "none"
                and type(grn) is GlobalResponseNorm and _plain(gelu) and _plain(grn) and h.dim() == 4):
            out = gelu_grn(first(h), grn)
            for layer in list(mlp)[3:]:
                out = layer(out)
            return out
        return mlp(h)  # type: ignore[no-any-return]
    grn, dropout, last = mlp[2], mlp[3], mlp[4]
    if (type(grn) is GlobalResponseNorm and type(last) is Linear and _plain(last)
            and _plain(grn) and (not dropout.training or dropout.p == 0)
            and fused.dim() == 4 and fused.shape[1] * fused.shape[2] > 2 * last.out_features):
        return _grn_into_linear(grn, last, fused)
    for layer in list(mlp)[2:]:
        fused = layer(fused)
    return fused


def _grn_into_linear(grn: GlobalResponseNorm, last: nn.Linear, y: Tensor) -> Tensor:
    """last(grn(y)) for NHWC y [B, H, W, 4c] with GRN's per-sample channel scale folded into last's weight.

    GRN is beta + y * s_b with s_b = 1 + gamma * Nx_b per sample and channel, so
    last(grn(y)) = y @ (W * s_b)^T + (W @ beta + bias): scaling the [c, 4c] weight per sample instead of
    the [H*W, 4c] activations saves GRN's full pass over them where H*W exceeds c (Stage B's wide levels).
    """
    B, H, W, c4 = y.shape
    weight = last.weight * grn.channel_scale(y)[:, None, :]  # (B, c, 4c)
    bias = gemm.matvec(last.weight, grn.beta.view(c4), last.bias)  # (c,), the same bits for a mapped weight
    return torch.baddbmm(bias, y.view(B, H * W, c4), weight.transpose(1, 2)).view(B, H, W, -1)  # (B, H, W, c)


class ResBlock(nn.Module):
    """Depthwise conv -> LN -> [concat skip] -> channel MLP, plus the residual (official ``ResBlock``)."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)  # applied in NHWC, no keys
        self.channelwise = _channel_mlp(c + c_skip, c, dropout)

    def forward(self, x: Tensor, x_skip: Tensor | None = None) -> Tensor:
        h = self.norm(self.depthwise(x).permute(0, 2, 3, 1))  # (B, H, W, c)
        if x_skip is not None:
            h = torch.cat([h, x_skip.permute(0, 2, 3, 1)], dim=-1)  # (B, H, W, c + c_skip)
        return channel_mlp(self.channelwise, h).permute(0, 3, 1, 2) + x  # (B, c, H, W)


class FeedForwardBlock(nn.Module):
    """x + channel MLP(LN(x)) (official block type 'F'; no shipped config uses it)."""

    def __init__(self, c: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = _channel_mlp(c, c, dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = channel_mlp(self.channelwise, self.norm(x.permute(0, 2, 3, 1)))  # (B, H, W, c)
        return x + h.permute(0, 3, 1, 2)


def _stack_rows(top: Tensor, kv: Tensor, c: int, dtype: torch.dtype) -> Tensor:
    """The packed [3c, ...] gradient in ``dtype`` from the query side's rows [0, len(top)) and the conditioning
    side's rows [c, 3c), added where they overlap."""
    if top.shape[0] == c:  # queries only: the sides do not overlap
        return torch.cat([top, kv]).to(dtype)
    out = top.to(dtype)
    out[c:] += kv
    return out


class _JointInProj(torch.autograd.Function):
    """The packed in_proj of the query tokens x [M, c] (rows [0, stop) of the [3c, c] weight) and of the
    conditioning tokens m [S, c] (rows [c, 3c): keys and values) as one autograd node (training).

    Two linears on the weight and on its slice give it two gradients: the slice's backward zero-fills a [3c, c]
    copy and autograd adds the two out of place (~3-4 ms a block and step for the mid-size Stage C in fp32, two
    passes over a weight-sized gradient). Here the conditioning side's weight gradient is added into the rows
    it touches. Same values as the two linears: in fp32 the sum is the same, with low-precision inputs (autocast)
    both products are rounded to that dtype and summed in float32 as before; the weight and bias arrive and their
    gradients leave in float32 then (the master weights), cast once here.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, m: Tensor, weight: Tensor, bias: Tensor, stop: int) -> tuple[Tensor, Tensor]:
        c = weight.shape[1]
        w, b = weight.to(x.dtype), bias.to(x.dtype)
        y_x = gemm.linear_nt(x, w[:stop], b[:stop])
        y_m = gemm.linear_nt(m, w[c:], b[c:])
        ctx.save_for_backward(x, m, w)
        ctx.stop, ctx.dtypes = stop, (weight.dtype, bias.dtype)
        return y_x, y_m

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_x: Tensor, g_m: Tensor) -> tuple[Tensor | None, ...]:
        x, m, w = ctx.saved_tensors
        stop, (w_dtype, b_dtype) = ctx.stop, ctx.dtypes
        c = w.shape[1]
        need_x, need_m, need_w, need_b = ctx.needs_input_grad[:4]
        grad_x = gemm.mm_nn(g_x, w[:stop]) if need_x else None
        grad_m = gemm.mm_nn(g_m, w[c:]) if need_m else None
        grad_w = grad_b = None
        if need_w:
            grad_w = _stack_rows(torch.mm(g_x.t(), x), torch.mm(g_m.t(), m), c, w_dtype)
        if need_b:
            grad_b = _stack_rows(g_x.sum(0), g_m.sum(0), c, b_dtype)
        return grad_x, grad_m, grad_w, grad_b, None


class MultiheadAttention(nn.Module):
    """Packed-projection multi-head attention computed with ``F.scaled_dot_product_attention``.

    Same parameters and keys as ``nn.MultiheadAttention(c, nhead, bias=True, batch_first=True)``:
    ``in_proj_weight`` [3c, c] (q, k, v stacked), ``in_proj_bias`` [3c], ``out_proj.{weight, bias}``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        assert embed_dim % num_heads == 0, f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}"
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = Linear(embed_dim, embed_dim)

    # training LoRA (cascade_lab.training.lora_train): fn(x, in_proj_weight, in_proj_bias, start, stop) -> the
    # projection of rows [start, stop) with the LoRA's branch; not a module, so the state dict keeps the official keys
    in_proj_adapter: Any = None

    def in_proj(self, x: Tensor, start: int, stop: int) -> Tensor:
        """x @ in_proj rows [start, stop) + bias (through the adapter when one is set)."""
        if self.in_proj_adapter is not None:
            out: Tensor = self.in_proj_adapter(x, self.in_proj_weight, self.in_proj_bias, start, stop)
            return out
        weight: Tensor = self.in_proj_weight
        bias: Tensor = self.in_proj_bias
        if not (start == 0 and stop == weight.shape[0]):  # whole: a slice's backward zero-fills a copy
            weight, bias = weight[start:stop], bias[start:stop]
        y = gemm.linear(x, weight, bias)
        return F.linear(x, weight, bias) if y is None else y

    def cond_kv(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the conditioning tokens cond [B, S, c]: 2 x (B, S, c)."""
        c = self.embed_dim
        k_c, v_c = self.in_proj(cond, c, 3 * c).chunk(2, dim=-1)
        return k_c, v_c

    def _joint(self, x: Tensor, cond: Tensor, stop: int) -> tuple[Tensor, tuple[Tensor, Tensor]] | None:
        """(x @ rows [0, stop) + bias, cond's keys and values) through `_JointInProj` where it applies (the packed
        weight trained, no LoRA adapter), else None."""
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if (self.in_proj_adapter is not None or not torch.is_grad_enabled() or not weight.requires_grad
                or not bias.requires_grad or x.dtype != cond.dtype or bias.dtype != weight.dtype):
            return None
        dtype = x.dtype
        autocast = torch.is_autocast_enabled(x.device.type) and dtype != torch.float64  # it leaves float64 alone
        if autocast:  # the linears would run in autocast's dtype, an fp32 weight cast to it
            dtype = torch.get_autocast_dtype(x.device.type)
        if weight.dtype != dtype and not (autocast and weight.dtype == torch.float32):
            return None
        (B, N, c), (_, S, _) = x.shape, cond.shape
        y_x, y_m = _JointInProj.apply(x.reshape(B * N, c).to(dtype), cond.reshape(B * S, c).to(dtype), weight,
                                      bias, stop)
        k_c, v_c = y_m.view(B, S, 2 * c).chunk(2, dim=-1)
        return y_x.view(B, N, stop), (k_c, v_c)

    def forward(self, x: Tensor, cond: Tensor | None, self_attn: bool = True,
                cond_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Queries from x [B, N, c]; keys/values from cat[x, cond] (self_attn) or cond [B, S, c].

        cond_kv: ``self.cond_kv(cond)`` computed beforehand (it depends on the conditioning only).
        """
        (B, N, c), nh = x.shape, self.num_heads
        stop = 3 * c if self_attn else c  # the rows x is projected with
        proj = None
        if cond_kv is None:
            assert cond is not None, "MultiheadAttention needs cond or cond_kv"
            joint = self._joint(x, cond, stop)  # training: both sides as one node
            proj, cond_kv = joint if joint is not None else (None, self.cond_kv(cond))
        k_c, v_c = cond_kv  # 2 x (B, S, c)
        if proj is None:
            proj = self.in_proj(x, 0, stop)
        if self_attn:
            q, k_x, v_x = proj.chunk(3, dim=-1)  # 3 x (B, N, c)
            k, v = torch.cat([k_x, k_c], dim=1), torch.cat([v_x, v_c], dim=1)  # (B, N+S, c)
        else:
            q, k, v = proj, k_c, v_c  # (B, N, c), 2 x (B, S, c)
        q = q.view(B, N, nh, c // nh).transpose(1, 2)  # (B, nh, N, hs)
        k = k.reshape(B, -1, nh, c // nh).transpose(1, 2)  # (B, nh, L, hs)
        v = v.reshape(B, -1, nh, c // nh).transpose(1, 2)  # (B, nh, L, hs)
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, nh, N, hs)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, c))  # (B, N, c)


class Attention2D(nn.Module):
    """Holds ``attn`` so the keys read ``attention.attn.*`` as in the official checkpoints."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.attn = MultiheadAttention(c, nhead, dropout=dropout)

    def forward(self, x: Tensor, kv: Tensor | None, self_attn: bool = False,
                cond_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.attn(x, kv, self_attn=self_attn, cond_kv=cond_kv)  # type: ignore[no-any-return]


class AttnBlock(nn.Module):
    """x + attention(LN(x) tokens, [LN(x) tokens,] Linear(SiLU(cond))) (official ``AttnBlock``, no mask)."""

    kv_slot: int = -1  # its place in the model's list of conditioning keys/values (`LevelUNet.cond_kvs`)

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)  # applied in NHWC, no keys
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), Linear(c_cond, c))

    def cond_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Attention keys and values of the conditioning tokens kv [B, S, c_cond]: 2 x (B, S, c)."""
        return self.attention.attn.cond_kv(self.kv_mapper(kv))  # type: ignore[no-any-return]

    def forward(self, x: Tensor, kv: Tensor | None, cond_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """kv: conditioning tokens [B, S, c_cond]; or cond_kv = ``self.cond_kv(kv)`` computed beforehand."""
        B, c, H, W = x.shape
        mapped = None
        if cond_kv is None:
            assert kv is not None, "AttnBlock needs kv or cond_kv"
            mapped = self.kv_mapper(kv)  # (B, S, c): the attention projects it (`self.cond_kv` is the same)
        tokens = self.norm(x.permute(0, 2, 3, 1)).reshape(B, H * W, c)  # (B, HW, c)
        h = self.attention(tokens, mapped, self_attn=self.self_attn, cond_kv=cond_kv)  # (B, HW, c)
        return x + h.view(B, H, W, c).permute(0, 3, 1, 2)  # (B, c, H, W)


class TimestepBlock(nn.Module):
    """x * (1 + a) + b with (a, b) summed over ``mapper`` and one ``mapper_<cond>`` per extra condition."""

    def __init__(self, c: int, c_timestep: int, conds: Sequence[str] = ("sca",)):
        super().__init__()
        self.mapper = Linear(c_timestep, c * 2)
        self.conds = list(conds)
        for name in self.conds:
            setattr(self, f"mapper_{name}", Linear(c_timestep, c * 2))

    # training LoRA (cascade_lab.training.lora_train): fn(t, mappers) -> Σ_i mappers[i](chunk i of t) (B, 2c) with
    # the LoRA's branches, all mappers in one call, or None where it does not apply (each mapper then runs its own
    # forward); not a module, so the state dict keeps the official keys
    mapper_adapter: Any = None

    def mappers(self) -> list[nn.Linear]:
        """``mapper`` and the ``mapper_<cond>`` in the order of t's chunks."""
        return [self.mapper] + [getattr(self, f"mapper_{name}") for name in self.conds]

    def modulation(self, t: Tensor) -> Tensor:
        """Σ_i mapper_i(t_i) over t's 1 + n chunks of c_r (B, c_r (1 + n)) -> (B, 2c): a's and b's halves."""
        mappers = self.mappers()
        fused: Tensor | None = None if self.mapper_adapter is None else self.mapper_adapter(t, mappers)
        if fused is not None:
            return fused
        t_chunks = t.chunk(len(mappers), dim=1)  # (1 + n) x (B, c_r)
        out: Tensor = mappers[0](t_chunks[0])
        for mapper, chunk in zip(mappers[1:], t_chunks[1:], strict=True):
            out = out + mapper(chunk)
        return out

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        a, b = self.modulation(t)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, c, 1, 1)
        return torch.addcmul(b, x, 1 + a)  # x * (1 + a) + b in one pass


class UpDownBlock2d(nn.Module):
    """1x1 conv plus optional bilinear x2 / x0.5 resample (disabled in Stage C: ``switch_level=[False]``).

    The official forward casts every input to float32 and relies on autocast; this one keeps the dtype.
    """

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool = True):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"UpDownBlock2d mode must be 'up' or 'down', got {mode!r}")
        interpolation: nn.Module = (
            nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
            if enabled
            else nn.Identity()
        )
        mapping = Conv2d(c_in, c_out, kernel_size=1)
        self.blocks = nn.ModuleList([interpolation, mapping] if mode == "up" else [mapping, interpolation])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def gen_r_embedding(r: Tensor, c_r: int = 64, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding [B] -> [B, c_r] (sin half first), in float32 and the official operation order.

    The argument reaches 1e4 where one fp32 ulp is ~1e-3, so the order below is part of the format.
    """
    r = r.float().reshape(-1) * max_positions  # (B,)
    half_dim = c_r // 2
    step = math.log(max_positions) / (half_dim - 1)
    freqs = torch.arange(half_dim, device=r.device).float().mul(-step).exp()  # (half_dim,)
    arg = r[:, None] * freqs[None, :]  # (B, half_dim)
    emb = torch.cat([arg.sin(), arg.cos()], dim=1)  # (B, 2 * half_dim)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1), mode="constant")
    return emb


def resize_to(x: Tensor, size: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Bilinear (align_corners=True) resize to ``size`` computed in float32, returned in ``dtype``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.to(dtype)
    return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=True).to(dtype)


def _levels(
    blocks: nn.ModuleList, scalers: nn.ModuleList, repeat_mappers: nn.ModuleList
) -> Iterator[tuple[nn.ModuleList, nn.Module, nn.ModuleList]]:
    for level, scaler, repmap in zip(blocks, scalers, repeat_mappers, strict=True):
        yield cast(nn.ModuleList, level), scaler, cast(nn.ModuleList, repmap)


class LevelUNet(nn.Module):
    """The level structure shared by Stage B and Stage C: down levels, up levels with skips, repeat mappers.

    ``down_blocks.L`` holds blocks[0][L] units of level_config[L] ('C' ResBlock, 'T' TimestepBlock,
    'A' AttnBlock, 'F' FeedForwardBlock), flattened; ``up_blocks.u`` counts from the deepest level.
    """

    gradient_checkpointing: bool = False
    checkpoint_keeps_products: bool = False
    checkpoint_budget: KeepBudget | None = None
    _cond_cache: dict[tuple[Any, ...], tuple[tuple[Any, ...], dict[str, Any]]] | None = None
    _compiled_denoise: Callable[..., Tensor] | None = None
    _compile_options: dict[str, Any] | None = None
    _denoise: Callable[..., Tensor]  # the network after the conditioning: Stage C / Stage B define it
    c_r: int
    t_conds: list[str]
    embedding: nn.Sequential
    clf: nn.Sequential

    def _build_levels(
        self,
        *,
        c_hidden: Sequence[int],
        nhead: Sequence[int],
        blocks: Sequence[Sequence[int]],
        block_repeat: Sequence[Sequence[int]] | None,
        level_config: Sequence[str],
        c_cond: int,
        kernel_size: int,
        dropout: float | Sequence[float],
        self_attn: bool | Sequence[bool],
        switch_level: Sequence[bool] | None,
    ) -> None:
        """Register the six level ModuleLists in the official order (uses self.c_r and self.t_conds)."""
        n = len(c_hidden)
        dropouts = [float(dropout)] * n if isinstance(dropout, (int, float)) else list(dropout)
        self_attns = [self_attn] * n if isinstance(self_attn, bool) else list(self_attn)

        def block(kind: str, i: int, c_skip: int = 0) -> nn.Module:
            c = c_hidden[i]
            if kind == "C":
                return ResBlock(c, c_skip, kernel_size=kernel_size, dropout=dropouts[i])
            if kind == "T":
                return TimestepBlock(c, self.c_r, conds=self.t_conds)
            if kind == "A":
                return AttnBlock(c, c_cond, nhead[i], self_attn=self_attns[i], dropout=dropouts[i])
            if kind == "F":
                return FeedForwardBlock(c, dropout=dropouts[i])
            raise ValueError(f"unknown block type {kind!r} in level_config; use 'C', 'T', 'A' or 'F'")

        def scaler(c_a: int, c_b: int, mode: str, i: int) -> nn.Module:
            # LN2d + level change: UpDownBlock2d (Stage C) or a stride-2 conv / transposed conv (Stage B)
            mapping: nn.Module
            if switch_level is not None:
                mapping = UpDownBlock2d(c_a, c_b, mode, enabled=switch_level[i - 1])
            elif mode == "down":
                mapping = Conv2d(c_a, c_b, kernel_size=2, stride=2)
            else:
                mapping = nn.ConvTranspose2d(c_a, c_b, kernel_size=2, stride=2)
            return nn.Sequential(LayerNorm2d(c_a, elementwise_affine=False, eps=1e-6), mapping)

        self.down_blocks = nn.ModuleList()
        self.down_downscalers = nn.ModuleList()
        self.down_repeat_mappers = nn.ModuleList()
        for i in range(n):
            self.down_downscalers.append(scaler(c_hidden[i - 1], c_hidden[i], "down", i) if i > 0 else nn.Identity())
            self.down_blocks.append(nn.ModuleList([block(t, i) for _ in range(blocks[0][i]) for t in level_config[i]]))
            repeat = 1 if block_repeat is None else block_repeat[0][i]
            self.down_repeat_mappers.append(self._repeat_mappers(c_hidden[i], repeat))
        self.up_blocks = nn.ModuleList()
        self.up_upscalers = nn.ModuleList()
        self.up_repeat_mappers = nn.ModuleList()
        for i in reversed(range(n)):
            self.up_upscalers.append(scaler(c_hidden[i], c_hidden[i - 1], "up", i) if i > 0 else nn.Identity())
            level = nn.ModuleList()
            for j in range(blocks[1][::-1][i]):
                for k, t in enumerate(level_config[i]):
                    # Only the very first block of a non-deepest up level takes the skip.
                    level.append(block(t, i, c_hidden[i] if i < n - 1 and j == k == 0 else 0))
            self.up_blocks.append(level)
            repeat = 1 if block_repeat is None else block_repeat[1][::-1][i]
            self.up_repeat_mappers.append(self._repeat_mappers(c_hidden[i], repeat))
        for slot, attn in enumerate(m for m in self.modules() if isinstance(m, AttnBlock)):
            attn.kv_slot = slot

    @staticmethod
    def _repeat_mappers(c: int, repeat: int) -> nn.ModuleList:
        return nn.ModuleList([Conv2d(c, c, kernel_size=1) for _ in range(repeat - 1)])

    def enable_gradient_checkpointing(self, enabled: bool = True, *, keep_products: bool = False,
                                      keep_bytes: int | None = None) -> None:
        """Recompute each block in the backward pass (non-reentrant); only used in training mode.

        keep_products: selective checkpointing. The outputs of each block's matrix products and attention kernel
        are kept from the forward pass and only the rest of the block is recomputed: the backward's extra work
        drops from a whole forward pass to its elementwise part (the mid-size Stage C's bf16 step on a CPU:
        -12 %), for more memory than plain checkpointing (those outputs: 40-60 % of what the blocks save without
        checkpointing, benchmarks/RESULTS.md). Gradients are the same bits either way. keep_bytes: the most bytes
        of those outputs one forward pass keeps (None: all); the products past it are recomputed
        (`checkpoint_budget` says how many bytes the last pass kept and left)."""
        self.gradient_checkpointing = enabled
        self.checkpoint_keeps_products = enabled and keep_products
        self.checkpoint_budget = KeepBudget(keep_bytes) if self.checkpoint_keeps_products else None

    @contextmanager
    def conditioning_cache(self) -> Iterator[None]:
        """Inside the block, work that depends on the conditioning alone is done once per conditioning.

        The token mappers (``gen_c_embeddings``), every AttnBlock's keys and values of those tokens and
        Stage B's effnet and pixels maps are kept, keyed on the identity of the conditioning tensors, and
        reused by later calls with the same tensors: a sampling run maps its conditioning once, not once
        per step. Inference only (no effect while autograd records); the conditioning tensors and the
        weights must not change in place inside the block.
        """
        previous, self._cond_cache = self._cond_cache, {}
        try:
            yield
        finally:
            self._cond_cache = previous

    def _cond_memo(self, *inputs: Any) -> dict[str, Any] | None:
        """The memo of these conditioning inputs inside `conditioning_cache` (None outside it or under autograd)."""
        cache = self._cond_cache
        if cache is None or torch.is_grad_enabled():
            return None
        key = (self._param_dtype(), *(id(t) if isinstance(t, Tensor) else t for t in inputs))
        entry = cache.get(key)
        if entry is None:
            if len(cache) >= 4:  # CFG batch and cond-only calls of one run; drop the oldest beyond that
                del cache[next(iter(cache))]
            entry = cache[key] = (inputs, {})  # holding the inputs keeps their ids from being reused
        return entry[1]

    @staticmethod
    def _memoized(memo: dict[str, Any] | None, name: str, compute: Callable[[], Any]) -> Any:
        if memo is None:
            return compute()
        if name not in memo:
            memo[name] = compute()
        return memo[name]

    def cond_kvs(self, clip: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every AttnBlock's keys and values of the conditioning tokens clip, indexed by ``kv_slot``."""
        blocks = [m for m in self.modules() if isinstance(m, AttnBlock)]
        return [block.cond_kv(clip) for block in sorted(blocks, key=lambda b: b.kv_slot)]

    def compile_denoiser(self, **options: Any) -> None:
        """Run the network after the conditioning through ``torch.compile(**options)`` (again: no-op).

        The conditioning logic (mappers, `conditioning_cache`) stays eager; the first call compiles.
        """
        if self._compiled_denoise is None or options != self._compile_options:
            self._compiled_denoise, self._compile_options = torch.compile(self._denoise, **options), options

    def _run_denoise(self, *args: Any) -> Tensor:
        if self.checkpoint_budget is not None and self.training and torch.is_grad_enabled():
            self.checkpoint_budget.reset()  # a budget per checkpointed forward pass
        return (self._compiled_denoise or self._denoise)(*args)

    def _run(self, block: nn.Module, x: Tensor, r_embed: Tensor, clip: Tensor, skip: Tensor | None,
             kvs: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        if isinstance(block, ResBlock):
            args: tuple[Any, ...] = (x, skip)
        elif isinstance(block, AttnBlock):
            args = (x, clip) if kvs is None else (x, None, kvs[block.kv_slot])
        elif isinstance(block, TimestepBlock):
            args = (x, r_embed)
        else:
            args = (x,)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if self.checkpoint_keeps_products:
                return checkpoint(block, *args, use_reentrant=False,  # type: ignore[no-any-return]
                                  context_fn=functools.partial(keep_products_context, self.checkpoint_budget))
            return checkpoint(block, *args, use_reentrant=False)  # type: ignore[no-any-return]
        return block(*args)  # type: ignore[no-any-return]

    @staticmethod
    def _inject(x: Tensor, cnet: Iterator[Tensor | None] | None) -> Tensor:
        """Add the next ControlNet entry (official ``ControlNetDeliverer``: one per ResBlock call)."""
        if cnet is None:
            return x
        extra = next(cnet, None)
        return x if extra is None else x + resize_to(extra, x.shape[-2:], x.dtype)

    def control_widths(self) -> list[int]:
        """The channel count at each ControlNet injection point, in call order (down path, then up path, repeats
        included): entry i of a ControlNet's list is added there, so a ControlNet's c_proj must equal it."""
        widths: list[int] = []
        for blocks, scalers, repmaps in ((self.down_blocks, self.down_downscalers, self.down_repeat_mappers),
                                         (self.up_blocks, self.up_upscalers, self.up_repeat_mappers)):
            for level, _, repmap in _levels(blocks, scalers, repmaps):
                calls = [b.depthwise.in_channels for b in level if isinstance(b, ResBlock)]
                widths += calls * (len(repmap) + 1)
        return widths

    def _down_encode(
        self, x: Tensor, r_embed: Tensor, clip: Tensor, cnet: Iterator[Tensor | None] | None = None,
        kvs: list[tuple[Tensor, Tensor]] | None = None,
    ) -> list[Tensor]:
        level_outputs: list[Tensor] = []
        levels = _levels(self.down_blocks, self.down_downscalers, self.down_repeat_mappers)
        for down_block, downscaler, repmap in levels:
            x = downscaler(x)
            for i in range(len(repmap) + 1):
                for block in down_block:
                    if isinstance(block, ResBlock):
                        x = self._inject(x, cnet)
                    x = self._run(block, x, r_embed, clip, None, kvs)
                if i < len(repmap):
                    x = repmap[i](x)
            level_outputs.insert(0, x)  # deepest first
        return level_outputs

    def _up_decode(
        self, level_outputs: list[Tensor], r_embed: Tensor, clip: Tensor, cnet: Iterator[Tensor | None] | None = None,
        kvs: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        x = level_outputs[0]
        levels = _levels(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)
        for i, (up_block, upscaler, repmap) in enumerate(levels):
            for j in range(len(repmap) + 1):
                for k, block in enumerate(up_block):
                    skip = None
                    if isinstance(block, ResBlock):
                        skip = level_outputs[i] if k == 0 and i > 0 else None
                        if skip is not None and x.shape[-2:] != skip.shape[-2:]:
                            x = resize_to(x, skip.shape[-2:], x.dtype)  # odd sizes: ConvT gave 2h != skip
                        x = self._inject(x, cnet)
                    x = self._run(block, x, r_embed, clip, skip, kvs)
                if j < len(repmap):
                    x = repmap[j](x)
            x = upscaler(x)
        return x

    def gen_r_embedding(self, r: Tensor, max_positions: int = 10000) -> Tensor:
        """Sinusoidal embedding of the noise level r [B] -> [B, c_r], float32 (official order)."""
        return gen_r_embedding(r, self.c_r, max_positions)

    def _r_embed(self, r: Tensor, values: dict[str, Any]) -> Tensor:
        """cat[emb(r), emb(values[c] or 0) for c in t_conds] -> [B, c_r * (1 + n)], float32."""
        embs = [gen_r_embedding(r, self.c_r)]
        for name in self.t_conds:
            value = values.get(name)
            embs.append(gen_r_embedding(torch.zeros_like(r) if value is None else value, self.c_r))
        return torch.cat(embs, dim=1)

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _init_level_weights(self, n_blocks: int) -> None:
        """Official init: xavier-uniform weights, zero biases; residual outputs scaled, time mappers zero."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, MultiheadAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
        embedding, clf = self.embedding[1], self.clf[1]
        assert isinstance(embedding, nn.Conv2d) and isinstance(clf, nn.Conv2d)
        nn.init.xavier_uniform_(embedding.weight, 0.02)  # inputs
        nn.init.zeros_(clf.weight)  # outputs start at zero
        scale = math.sqrt(1 / n_blocks)
        for level in list(self.down_blocks) + list(self.up_blocks):
            assert isinstance(level, nn.ModuleList)
            for block in level:
                if isinstance(block, (ResBlock, FeedForwardBlock)):
                    out_linear = cast(nn.Linear, block.channelwise[-1])
                    with torch.no_grad():
                        out_linear.weight.mul_(scale)
                elif isinstance(block, TimestepBlock):
                    for layer in block.modules():
                        if isinstance(layer, nn.Linear):
                            nn.init.zeros_(layer.weight)
