"""Trainable LoRA for Stage C or Stage B, saved in kohya's layout (``lora_unet_*``) that ComfyUI and kohya load.

Each target computes ``W x + (alpha / rank) · up(down(x))`` — what ComfyUI's merged ``W + (alpha / rank) ·
up @ down`` gives — as a low-rank branch beside the frozen layer (a Linear's forward replaced on the instance
by `_FrozenLinearLora`, the frozen matmul and the branch as one autograd function; a forward hook on a 1x1
Conv2d; for the packed attention ``in_proj_weight`` [3c, c] the attention's ``in_proj_adapter``, three pairs
``to_q``, ``to_k``, ``to_v`` on its row blocks, exactly as ComfyUI splits it when it loads a Stage C
checkpoint, through the same function). Module types and state-dict keys stay as they are. The branch never
forms a [out, in] weight: no merged copy per layer per step and no gradient of the frozen weights (a weight
parametrization costs both: a full fine-tune's weight-gradient matmuls and a saved weight copy per layer).
``down`` starts Kaiming-uniform and ``up`` at zero (kohya), so an attached network leaves the outputs as
they were. Targets: ``attention`` (to_q/k/v and out_proj of every attention) or ``all_linear`` (every
Linear and every non-grouped 1x1 Conv2d, kohya's Stage C set).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..models import gemm
from ..models.common import TimestepBlock, linear_forward
from .lora_dropout import Draws, LoraDropout, dropped_low_rank

Tensor = torch.Tensor


@dataclass(frozen=True)
class LoraTarget:
    """One kohya module: where its delta goes (parameter and row block) and its shape."""

    name: str  # lora_unet_<module path with _>
    module: str  # path of the module owning the parameter
    param: str  # "weight" or "in_proj_weight"
    rows: tuple[int, int] | None  # row block of a packed in_proj_weight (q, k or v)
    n_in: int
    n_out: int
    conv: bool  # a 1x1 Conv2d: stored as [rank, in, 1, 1] / [out, rank, 1, 1]


def lora_targets(model: nn.Module, target: str = "attention") -> list[LoraTarget]:
    """The kohya-named LoRA modules for `model`, in module order."""
    if target not in ("attention", "all_linear"):
        raise ValueError(f"network_target={target!r}: use 'attention' or 'all_linear'")
    found = []
    for path, module in model.named_modules():
        stem = "lora_unet_" + path.replace(".", "_")
        in_proj = getattr(module, "in_proj_weight", None)
        if isinstance(in_proj, Tensor):  # packed MHA: rows q, k, v of [3c, c]
            c = in_proj.shape[0] // 3
            for i, letter in enumerate("qkv"):
                found.append(LoraTarget(f"{stem}_to_{letter}", path, "in_proj_weight", (i * c, (i + 1) * c),
                                        in_proj.shape[1], c, False))
        elif isinstance(module, nn.Linear):
            if target == "all_linear" or path.endswith("attn.out_proj"):
                found.append(LoraTarget(stem, path, "weight", None, module.in_features, module.out_features, False))
        elif isinstance(module, nn.Conv2d) and target == "all_linear":
            if module.groups == 1 and tuple(module.kernel_size) == (1, 1):
                found.append(LoraTarget(stem, path, "weight", None, module.in_channels, module.out_channels, True))
    return found


class LoraPair(nn.Module):
    """lora_down [rank, in] and lora_up [out, rank] of one target."""

    def __init__(self, n_in: int, n_out: int, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        bound = 1 / math.sqrt(n_in)  # kaiming_uniform_(a=√5), the nn.Linear default kohya keeps
        down = (torch.rand(rank, n_in, generator=generator) * 2 - 1) * bound
        self.lora_down = nn.Parameter(down)
        self.lora_up = nn.Parameter(torch.zeros(n_out, rank))


NETWORK_ATTR = "lora_network"  # the attached network's name among the model's submodules


def _low_rank(x: Tensor, pair: LoraPair, scale: float, conv: bool) -> Tensor:
    """scale · up(down(x)) in x's dtype (autocast casts as it does for the layer itself)."""
    down: Tensor = pair.lora_down
    up: Tensor = pair.lora_up
    if not torch.is_autocast_enabled(x.device.type) and down.dtype != x.dtype:
        down, up = down.to(x.dtype), up.to(x.dtype)
    if conv:  # 1x1 conv on [B, C, H, W]
        return F.conv2d(F.conv2d(x, down[:, :, None, None]), up[:, :, None, None] * scale)
    return F.linear(F.linear(x, down), up * scale)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _branch_factor(ups: tuple[Tensor, ...], cols: tuple[int, ...], n_out: int, bias: Tensor | None) -> Tensor:
    """[n_out, K r (+ 1)]: each pair's U_k on its output rows [c_k, c_k + out_k) and columns [k r, (k + 1) r)
    (block diagonal, zeros elsewhere), the bias as one more column when given."""
    if len(ups) == 1 and ups[0].shape[0] == n_out:
        return ups[0] if bias is None else torch.cat([ups[0], bias[:, None]], dim=1)
    r = ups[0].shape[1]
    factor = ups[0].new_zeros(n_out, len(ups) * r + (bias is not None))
    for k, (start, up) in enumerate(zip(cols, ups, strict=True)):
        factor[start:start + up.shape[0], k * r:(k + 1) * r] = up
    if bias is not None:
        factor[:, -1] = bias
    return factor


class _FrozenLinearLora(torch.autograd.Function):
    """y = x W^T + b + scale · Σ_k (x D_k^T) U_k^T into output columns [c_k, c_k + out_k) for 2-D x [M, in]
    (the pairs in column order); with ``in_cols`` pair k reads x's columns [s_k, s_k + in_k) only (a
    TimestepBlock's mappers side by side: W = [W_1 W_2 W_3] on t's chunks, every pair on all output columns).

    The frozen layer (W [out, in], b) gets no gradient; the pairs (D_k [r, in], U_k [out_k, r]) do. Each pass
    over a large tensor is one GEMM: the branch accumulates into the layer's output in place together with the
    bias (forward) and into x's gradient (backward), one matmul gives all pairs' h = x [D_1; D_2; ...]^T and their down
    gradients, and the thin products are taken in the layouts BLAS runs fastest (a [r, M] @ [M, n] product
    transposed rather than [n, M] @ [M, r]); the scale multiplies the thin [M, r] factors only. Several pairs
    (an in_proj's q, k, v) share each thin product through the block-diagonal `_branch_factor`: one call instead
    of one per pair (the products are bound by reading the large operand, so the zero blocks cost nothing, and
    each call has a fixed cost of ~20 µs in bf16 on CPU). Saves x, scale · h, the stacked D and the factor (W is the
    layer's own tensor).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, scale: float,
                cols: tuple[int, ...], in_cols: tuple[int, ...] | None, *pairs: Tensor) -> Tensor:
        n_rows, n_out = x.shape[0], weight.shape[0]
        # the pairs arrive in their own dtype (fp32 under autocast) and are cast here: no cast nodes in the graph,
        # and their gradients leave in that dtype. With few rows (a per-sample layer) in bf16 / fp16 on CPU the
        # thin products run in fp32 on the fp32 pairs as they are (more precise than the bf16 path: h unrounded,
        # one rounding into y and x's gradient): oneDNN's fixed ~20 µs per bf16 call outweighs such work, an fp32
        # call with its casts costs ~5-15 µs
        small = n_rows <= _FP32_THIN_ROWS and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
        thin = torch.float32 if small else x.dtype  # the thin products' dtype
        downs, ups = [p.to(thin) for p in pairs[0::2]], [p.to(thin) for p in pairs[1::2]]
        if in_cols is None:
            down = downs[0] if len(downs) == 1 else torch.cat(downs)  # [K r, in]
        else:  # each D_k on its input columns: the transpose of a factor with the D_k^T on those rows
            down = _branch_factor(tuple(d.t() for d in downs), in_cols, x.shape[1], None).t()
        x_thin = x.to(thin)
        hs = gemm.thin_nt(x_thin, down).mul_(scale)  # scale · h [M, K r]
        # with many rows the bias rides with the branch ([scale h, 1] @ [U, b]^T): addmm's broadcast of the bias
        # into the output is a pass of its own; with few rows the fewer ops win
        fold = bias is not None and n_rows >= _FOLD_BIAS_ROWS
        y = gemm.linear_nt(x, weight, None if fold else bias)  # [M, out]
        factor = _branch_factor(tuple(ups), cols, n_out, bias if fold else None)  # [out, K r (+ 1)]
        lhs = torch.cat([hs, hs.new_ones(n_rows, 1)], dim=1) if fold else hs
        if small:
            y.add_(torch.mm(lhs, factor.t()))  # one rounding into y, as addmm_'s
        else:
            y.addmm_(lhs, factor.t())
        ctx.save_for_backward(x, weight, hs, down, factor)
        ctx.scale, ctx.cols, ctx.rank, ctx.outs = scale, cols, downs[0].shape[0], tuple(up.shape[0] for up in ups)
        ctx.ins = None if in_cols is None else tuple(zip(in_cols, (d.shape[1] for d in downs), strict=True))
        ctx.dtypes = tuple(p.dtype for p in pairs)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, hs, down, factor = ctx.saved_tensors
        scale, cols, r, outs = ctx.scale, ctx.cols, ctx.rank, ctx.outs
        thin, n_h = hs.dtype, hs.shape[1]
        grad_thin = grad.to(thin)
        g_hs = gemm.thin_nn(grad_thin, factor[:, :n_h]).mul_(scale)  # scale · g U [M, K r], every pair at once
        grad_us = gemm.thin_tn(hs, grad_thin)  # [K r, out]: pair k's up gradient is its diagonal block, transposed
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gemm.mm_nn(grad, weight)  # [M, in]
            if thin == grad_x.dtype:
                grad_x.addmm_(g_hs, down)
            else:
                grad_x.add_(torch.mm(g_hs, down))
        grad_down = gemm.thin_tn(g_hs, x.to(thin))  # [K r, in]
        grads: list[Tensor | None] = [grad_x, None, None, None, None, None]
        for k, (start, n_k) in enumerate(zip(cols, outs, strict=True)):
            g_down = grad_down if len(outs) == 1 else grad_down[k * r:(k + 1) * r]
            if ctx.ins is not None:
                g_down = g_down[:, ctx.ins[k][0]:ctx.ins[k][0] + ctx.ins[k][1]]
            grads += [g_down, grad_us[k * r:(k + 1) * r, start:start + n_k].t()]
        for i, dtype in enumerate(ctx.dtypes, start=6):
            grads[i] = cast(Tensor, grads[i]).to(dtype)
        return tuple(grads)


_FOLD_BIAS_ROWS = 128  # rows from which `_FrozenLinearLora` adds the bias inside the branch's matmul
_FP32_THIN_ROWS = 16  # rows up to which `_FrozenLinearLora` takes a bf16 / fp16 layer's thin products in fp32 (CPU)


def _lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, scale: float,
                 blocks: list[tuple[int, LoraPair]], in_cols: tuple[int, ...] | None = None) -> Tensor | None:
    """x [..., in] through the frozen (weight, bias) plus the pairs on their output columns (and, with
    ``in_cols``, each on its input columns), or None where the fused function does not apply (the weight or bias
    is trained, or an unusual dtype): use the autograd path."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # autocast runs linear in its dtype (float64 it leaves alone)
        dtype = torch.get_autocast_dtype(dev)
        if x.dtype == torch.float64 or weight.dtype == torch.float64:
            return None
    else:
        dtype = x.dtype
        if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
            return None  # the plain path raises linear's own dtype error
    if dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.shape[-1] != weight.shape[1]:
        return None
    pairs: list[Tensor] = []
    for _, pair in blocks:  # in their own dtype: the function casts them to the layer's
        pairs += [pair.lora_down, pair.lora_up]
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = cast(Tensor, _cast(x, dtype)).reshape(-1, n_in)
    args = (x2, _cast(weight, dtype), _cast(bias, dtype), scale, tuple(start for start, _ in blocks), in_cols, *pairs)
    if torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            y = _FrozenLinearLora.apply(*args)
    else:
        y = _FrozenLinearLora.apply(*args)
    return cast(Tensor, y).view(*lead, weight.shape[0])


class _LayerBranch:
    """Forward hook: the layer's output plus the low-rank branch of its input (1x1 convs, and the fallback of
    `_LoraLinearForward`); with the network's dropouts while it trains."""

    def __init__(self, pair: LoraPair, scale: float, conv: bool, network: LoraNetwork) -> None:
        self.pair, self.scale, self.conv, self.network = pair, scale, conv, network

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
        drop = self.network.dropping()
        if drop is not None:
            branch, _ = dropped_low_rank(x, self.pair, self.scale, self.conv, drop)
            return output if branch is None else output + branch
        if self.conv or not output.is_contiguous():
            return output + _low_rank(x, self.pair, self.scale, self.conv)
        down: Tensor = self.pair.lora_down
        up: Tensor = self.pair.lora_up
        if not torch.is_autocast_enabled(x.device.type) and down.dtype != x.dtype:
            down, up = down.to(x.dtype), up.to(x.dtype)
        h = F.linear(x, down)  # [..., rank]
        # output + scale · h @ up^T as one matmul that accumulates into the layer's output (no separate add pass)
        n_out = output.shape[-1]
        return torch.addmm(output.reshape(-1, n_out), h.reshape(-1, h.shape[-1]), up.t(),
                           alpha=self.scale).view(output.shape)


class _LoraLinearForward:
    """An ``nn.Linear``'s forward while attached (set on the instance; `detach` deletes it): the frozen layer and
    its pair as one `_FrozenLinearLora`, or the layer plus `_LayerBranch` where that does not apply."""

    def __init__(self, module: nn.Linear, pair: LoraPair, scale: float, network: LoraNetwork) -> None:
        self.module, self.pair, self.scale = module, pair, scale
        self.branch = _LayerBranch(pair, scale, False, network)

    def __call__(self, x: Tensor) -> Tensor:
        m = self.module
        dropping = self.branch.network.dropping() is not None  # masks: the plain path
        y = None if dropping else _lora_linear(x, m.weight, m.bias, self.scale, [(0, self.pair)])
        if y is None:
            y = self.branch(m, (x,), type(m).forward(m, x))  # the class forward (`Linear`: oneDNN where it applies)
        return y


class _InProjBranch:
    """``MultiheadAttention.in_proj_adapter``: rows [start, stop) of the packed in_proj with their pairs' branches."""

    def __init__(self, blocks: list[tuple[int, int, LoraPair]], scale: float, network: LoraNetwork) -> None:
        self.blocks, self.scale = sorted(blocks, key=lambda b: b[0]), scale  # (first row, last row + 1, pair)
        self.network = network
        # dropout draws of the keys' and values' pairs made for the conditioning tokens (rows from c on), which the
        # same attention's projection of x (rows from 0) takes next: one draw per pair and forward, as kohya's
        # to_k / to_v see the tokens of x and the conditioning as one input
        self.pending: dict[int, Draws] = {}

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int) -> Tensor:
        inside = []
        for first, end, pair in self.blocks:
            if end <= start or first >= stop:
                continue
            if first < start or end > stop:
                raise ValueError(f"LoRA rows {first}:{end} straddle the projection rows {start}:{stop}")
            inside.append((first, end, pair))
        w, b = weight[start:stop], None if bias is None else bias[start:stop]
        if not inside:
            return F.linear(x, w, b)
        drop = self.network.dropping()
        if drop is None:  # one fused function: h of all pairs in one matmul, each branch into its rows' columns
            fused = _lora_linear(x, w, b, self.scale, [(first - start, pair) for first, _, pair in inside])
            if fused is not None:
                return fused
        parts: list[Tensor] = []
        pos = start
        for first, end, pair in inside:  # rows without a pair get zeros (an in_proj with only some of q, k, v)
            if drop is None:
                part: Tensor | None = _low_rank(x, pair, self.scale, False)
            else:
                draws = self.pending.pop(id(pair), None) if start == 0 else None
                part, draws = dropped_low_rank(x, pair, self.scale, False, drop, draws)
                if start > 0:
                    self.pending[id(pair)] = draws
            if part is None:  # skipped by module dropout
                continue
            if first > pos:
                parts.append(part.new_zeros(*part.shape[:-1], first - pos))
            parts.append(part)
            pos = end
        y = F.linear(x, w, b)
        if not parts:
            return y
        if pos < stop:
            parts.append(parts[-1].new_zeros(*parts[-1].shape[:-1], stop - pos))
        return y + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))


class _MapperBranch:
    """``TimestepBlock.mapper_adapter``: Σ_i mapper_i(t_i) over t's chunks with the pairs of the targeted mappers,
    as one `_FrozenLinearLora` over the whole t (the frozen weights side by side, the biases summed, each pair on
    its chunk's input columns): one call instead of one per mapper plus the sums of their outputs."""

    def __init__(self, pairs: list[LoraPair | None], scale: float, network: LoraNetwork) -> None:
        self.pairs, self.scale = pairs, scale  # one entry per mapper, None where it has no pair
        self.network = network

    def __call__(self, t: Tensor, mappers: list[nn.Linear]) -> Tensor | None:
        """The fused sum, or None where it does not apply (the block then runs each mapper's own forward; with
        dropouts, each mapper's pair draws its own as kohya's modules do)."""
        widths = [m.in_features for m in mappers]
        if self.network.dropping() is not None or (
                len(mappers) != len(self.pairs) or t.shape[-1] != sum(widths)
                or not all(linear_forward(m) and m.bias is not None for m in mappers)):
            return None
        starts = [sum(widths[:i]) for i in range(len(widths))]
        bias = cast(Tensor, mappers[0].bias)
        for m in mappers[1:]:
            bias = bias + cast(Tensor, m.bias)
        blocks = [(0, pair) for pair in self.pairs if pair is not None]
        in_cols = tuple(start for start, pair in zip(starts, self.pairs, strict=True) if pair is not None)
        return _lora_linear(t, torch.cat([m.weight for m in mappers], dim=1), bias, self.scale, blocks, in_cols)


def _restore_forward(module: nn.Module, previous: Any) -> None:
    if previous is None:
        del module.forward
    else:
        module.forward = previous


class LoraNetwork(nn.Module):
    """The LoRA pairs of one run, by kohya name; `attach` puts them on a Stage C or B, `detach` takes them off."""

    def __init__(self, targets: list[LoraTarget], rank: int, alpha: float | None, *, seed: int = 0,
                 dropout: LoraDropout | None = None) -> None:
        super().__init__()
        self.targets = {t.name: t for t in targets}
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha else float(rank)  # kohya: 0 or None means alpha = rank
        self.dropout = dropout or LoraDropout()
        generator = torch.Generator().manual_seed(seed)
        self.pairs = nn.ModuleDict({t.name: LoraPair(t.n_in, t.n_out, rank, generator) for t in targets})
        self._attached: list[Callable[[], Any]] = []

    @classmethod
    def for_model(cls, model: nn.Module, *, rank: int = 4, alpha: float | None = 1.0, target: str = "attention",
                  seed: int = 0, dropout: LoraDropout | None = None) -> LoraNetwork:
        return cls(lora_targets(model, target), rank, alpha, seed=seed, dropout=dropout)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def dropping(self) -> LoraDropout | None:
        """The dropouts to apply now: set, and the network training with gradients on (never at validation,
        sampling or export; kohya's ``LoRAModule`` checks ``self.training`` only)."""
        return self.dropout if self.dropout and self.training and torch.is_grad_enabled() else None

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """kohya's ``apply_max_norm_regularization`` (``--scale_weight_norms``), after an optimizer step: a module
        whose delta scale · up @ down has a Frobenius norm above `max_norm` gets both factors multiplied by
        sqrt(max_norm / norm), which brings that norm to max_norm. Returns kohya's logged figures: the modules
        scaled, the mean and the largest norm after scaling.

        The norm comes from the r x r Gram matrices, ||U D||² = Σ (UᵀU) ∘ (D Dᵀ), in float64: no [out, in]
        product per module and step (kohya forms one in float32), and no rounding of it to speak of.
        """
        pairs = [self.pair(name) for name in self.targets]
        norms = torch.stack([((p.lora_up.double().t() @ p.lora_up.double())
                              * (p.lora_down.double() @ p.lora_down.double().t())).sum() for p in pairs])
        norms = norms.clamp_min(0).sqrt() * self.scale  # [modules]
        over = norms > max_norm
        ratios = torch.where(over, max_norm / norms, torch.ones_like(norms))
        roots = ratios.sqrt().float()
        for pair, root in zip(pairs, roots, strict=True):  # 1 where nothing is scaled: the same bits
            pair.lora_up.mul_(root)
            pair.lora_down.mul_(root)
        scaled = (norms * ratios).tolist()
        return int(over.sum()), sum(scaled) / len(scaled), max(scaled)

    def pair(self, name: str) -> LoraPair:
        return cast(LoraPair, self.pairs[name])

    def attach(self, model: nn.Module) -> LoraNetwork:
        """Add the low-rank branches to `model` (its weights stay untouched).

        While attached, the network is also `model`'s submodule ``lora_network``, so whatever wraps the model
        (DistributedDataParallel) sees the pairs among its parameters and synchronises their gradients.
        """
        if self._attached:
            raise RuntimeError("this LoRA network is already attached; detach it first")
        if NETWORK_ATTR in model._modules:
            raise RuntimeError("the model already carries a LoRA network; detach that one first")
        model.add_module(NETWORK_ATTR, self)
        self._attached.append(functools.partial(delattr, model, NETWORK_ATTR))
        in_proj: dict[str, list[tuple[int, int, LoraPair]]] = {}
        for name, t in self.targets.items():
            module = model.get_submodule(t.module)
            pair = self.pair(name)
            pair.to(getattr(module, t.param).device)
            if t.param == "in_proj_weight":
                assert t.rows is not None
                in_proj.setdefault(t.module, []).append((t.rows[0], t.rows[1], pair))
            elif not t.conv and linear_forward(module):
                previous = module.__dict__.get("forward")
                module.forward = _LoraLinearForward(module, pair, self.scale, self)  # type: ignore[method-assign, assignment]
                self._attached.append(functools.partial(_restore_forward, module, previous))
            else:
                handle = module.register_forward_hook(_LayerBranch(pair, self.scale, t.conv, self))
                self._attached.append(handle.remove)
        by_module = {t.module: self.pair(n) for n, t in self.targets.items() if t.param == "weight" and not t.conv}
        path_of = {id(m): path for path, m in model.named_modules()}
        for module in model.modules():  # TimestepBlocks: their mappers' pairs in one call
            if not isinstance(module, TimestepBlock):
                continue
            pairs = [by_module.get(path_of[id(m)]) for m in module.mappers()]
            if any(p is not None for p in pairs):
                module.mapper_adapter = _MapperBranch(pairs, self.scale, self)
                self._attached.append(functools.partial(setattr, module, "mapper_adapter", None))
        for path, blocks in in_proj.items():
            module = model.get_submodule(path)
            if not hasattr(module, "in_proj_adapter"):
                raise TypeError(f"{path}: {type(module).__name__} has no in_proj_adapter; LoRA on a packed "
                                "in_proj needs cascade_lab's MultiheadAttention")
            setattr(module, "in_proj_adapter", _InProjBranch(blocks, self.scale, self))  # noqa: B010 (not a module attr)
            self._attached.append(functools.partial(setattr, module, "in_proj_adapter", None))
        return self

    def detach(self) -> None:
        """Remove the branches: the model computes exactly as before `attach`."""
        for undo in reversed(self._attached):
            undo()
        self._attached = []

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and ``<name>.alpha`` (always stored)."""
        out = {}
        for name, t in self.targets.items():
            pair = self.pair(name)
            down, up = pair.lora_down.detach(), pair.lora_up.detach()
            if t.conv:
                down, up = down[:, :, None, None], up[:, :, None, None]  # 1x1 conv: [r, in, 1, 1], [out, r, 1, 1]
            out[f"{name}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(self.alpha, dtype=dtype)
        return out

    def load_kohya_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Set the pairs from `kohya_state_dict` output (a saved file); names and shapes must match."""
        missing = [n for n in self.targets if f"{n}.lora_down.weight" not in tensors]
        if missing:
            raise ValueError(f"LoRA state lacks {len(missing)} modules of this network, e.g. {missing[:3]}")
        with torch.no_grad():
            for name in self.targets:
                self.pair(name).lora_down.copy_(tensors[f"{name}.lora_down.weight"].flatten(1))
                self.pair(name).lora_up.copy_(tensors[f"{name}.lora_up.weight"].flatten(1))

    def describe(self) -> dict[str, Any]:
        return {"modules": len(self.targets), "rank": self.rank, "alpha": self.alpha,
                "parameters": sum(p.numel() for p in self.parameters())}


def lora_metadata(config: Any, network: LoraNetwork, extra: dict[str, str]) -> dict[str, str]:
    """kohya ``ss_*`` and modelspec header entries (strings) for a LoRA file."""
    from datetime import datetime, timezone

    res = config.resolution if isinstance(config.resolution, list) else [config.resolution] * 2
    output_name, title = config.name, config.name
    # kohya without --output_name: ss_output_name str(None), title <kind>@<time>. kohya's Stable Cascade LoRA script
    # builds its modelspec without the LoRA flag (architecture "stable-cascade", "Checkpoint@<time>"), so its
    # LoRAs claim to be whole models; ours say what they are (docs/training.md)
    if config.kohya_default_names:
        output_name, title = "None", f"LoRA@{time.time()}"
    # kohya: the --network_args as given (values as text), json.dumps'd; its --network_dropout and
    # --scale_weight_norms as str() of the flag (None when not given)
    network_args = {"target": config.network_target}
    network_args |= {k: str(getattr(config, k)) for k in ("rank_dropout", "module_dropout") if getattr(config, k)}
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(network.rank),
        "ss_network_alpha": f"{network.alpha:g}", "ss_base_model_version": "stable_cascade",
        "ss_network_args": json.dumps(network_args), "ss_learning_rate": str(config.learning_rate),
        "ss_network_dropout": str(config.network_dropout), "ss_scale_weight_norms": str(config.scale_weight_norms),
        "ss_unet_lr": str(config.learning_rate), "ss_text_encoder_lr": "None",  # kohya: no text-encoder LoRA
        "ss_seed": str(config.seed),  # ss_optimizer, ss_lr_scheduler: metadata.export_metadata (the built ones)
        "ss_mixed_precision": config.mixed_precision, "ss_caption_dropout_rate": str(config.caption_dropout_rate),
        "ss_resolution": f"({res[0]}, {res[1]})", "ss_output_name": output_name,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-cascade/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/StableCascade",
        "modelspec.title": title, "modelspec.resolution": f"{res[0]}x{res[1]}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    meta.update(extra)
    return meta


__all__ = ["NETWORK_ATTR", "LoraDropout", "LoraNetwork", "LoraPair", "LoraTarget", "lora_metadata", "lora_targets"]
