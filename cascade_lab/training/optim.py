"""Optimizers, configured with kohya's names and ``key=value`` arguments (schedules: schedules.py).

`Adafactor` follows Shazeer & Stern (2018) with the switches kohya passes through (``scale_parameter``,
``relative_step``, ``warmup_init``); ``torch.optim.Adafactor`` always scales by the parameter RMS and uses
a relative step, so it cannot run the README's ``scale_parameter=False relative_step=False
warmup_init=False`` configuration.
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError, parse_value
from .fsdp import full, is_sharded, like


def _rms(x: Tensor) -> Tensor:
    return x.norm(2) / math.sqrt(x.numel())


def _blocked_update(p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], lr: float,
                    beta2: float, write: Any) -> bool:
    """Adafactor's step of a CPU matrix in two passes over cache-sized row blocks; False where it does not apply
    (other shapes, a GPU, FSDP shards: `Adafactor.step`'s whole-tensor arithmetic).

    Pass 1 takes, per block, grad², its row sums (the new row moments), its column sums and Σ_i g_ij² / row_i,
    which gives the clip's RMS without forming the update: with r_i = √(mean row / row_i) and c_j = 1/√col_j,
    Σ_ij (r_i c_j g_ij)² = mean(row) · Σ_j colw_j / col_j. Pass 2 forms each block's update scaled by the learning
    rate and clip, and applies it (first moment, weight decay) while the block is in cache; a bf16 block's new
    value is computed in fp32 and stored by `write` (`Rounding.write`).
    """
    if grad.dim() != 2 or grad.device.type != "cpu":
        return False
    rows, cols = grad.shape
    block = max(1, 2**19 // max(1, cols * grad.element_size()))
    eps1, beta1, wd = group["eps"][0], group["beta1"], group["weight_decay"]
    row, col = state["row"], state["col"]
    col_sums, colw = grad.new_zeros(cols), grad.new_zeros(cols)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        sq = grad[start:stop].square()
        row_now = row[start:stop]
        row_now.mul_(beta2).add_(sq.sum(dim=-1).div_(cols).add_(eps1), alpha=1 - beta2)
        col_sums += sq.sum(dim=0)
        colw.addmv_(sq.t(), row_now.reciprocal())
    col.mul_(beta2).add_(col_sums.div_(rows).add_(eps1), alpha=1 - beta2)
    mean_row = float(row.mean())
    rms = math.sqrt(mean_row * float(colw.div_(col).sum()) / grad.numel())
    scale = lr / max(1.0, rms / group["clip_threshold"])
    r = row.rsqrt().mul_(math.sqrt(mean_row) * scale)  # r_i · lr / clip
    c = col.rsqrt()
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        update = torch.mul(grad[start:stop], r[start:stop, None]).mul_(c)
        if beta1 is not None:
            avg = state["avg"][start:stop]
            update = avg.mul_(beta1).add_(update, alpha=1 - beta1)
        target = p[start:stop]
        if p.dtype != update.dtype:
            value = target.float()
            write(target, value.mul_(1 - wd * lr).sub_(update) if wd else value.sub_(update))
            continue
        if wd:
            target.mul_(1 - wd * lr)
        target.sub_(update)
    return True


class Adafactor(torch.optim.Optimizer):
    """Adafactor: factored second moments (row and column means) for matrices, full ones for vectors.

    With ``relative_step`` the step size is min(1e-2, 1/√t) (1e-6·t with ``warmup_init``) and ``lr`` is
    ignored; with ``scale_parameter`` it is multiplied by max(eps2, RMS(p)). Updates are clipped to RMS
    ``clip_threshold``; ``beta1`` adds a first moment; weight decay is decoupled (p ← p − lr·wd·p).
    FSDP shards (DTensor parameters): each update is computed from the whole gradient (all-gathered, one
    parameter at a time), so the factored moments are those of the whole matrix; they are small and kept
    whole on every process, while the first moment is sharded like the parameter.
    bf16 parameters (``full_bf16``): moments in fp32, each new weight computed in fp32 and rounded once by
    ``rounding`` (`bf16_weights.Rounding`; none: to the nearest, as transformers' Adafactor that kohya uses).
    """

    def __init__(self, params: Iterable[Any], lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, *, rounding: Any = None) -> None:
        if lr is not None and relative_step:
            raise ValueError("Adafactor: lr is ignored with relative_step=True; pass relative_step=False to use it")
        if lr is None and not relative_step:
            raise ValueError("Adafactor: relative_step=False needs a learning rate")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init=True needs relative_step=True")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init)
        super().__init__(params, defaults)
        self.rounding = rounding

    def _write(self, p: Tensor, value: Tensor) -> None:
        if self.rounding is None:
            p.copy_(value)
        else:
            self.rounding.write(p, value)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return state if self.rounding is None else {**state, "rounding": self.rounding.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from .bf16_weights import load_state_in_saved_dtypes

        load_state_in_saved_dtypes(self, state_dict)

    def _step_size(self, group: dict[str, Any], state: dict[str, Any], p: Tensor) -> float:
        step = state["step"]
        lr = group["lr"]
        if group["relative_step"]:
            lr = min(1e-6 * step if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr = lr * max(group["eps"][1], float(_rms(full(p.detach()).float())))
        return float(lr)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                sharded = is_sharded(p)
                grad = full(p.grad).float()
                state = self.state[p]
                factored = grad.dim() >= 2
                if not state:
                    state["step"] = 0
                    if factored:
                        state["row"] = torch.zeros(grad.shape[:-1], device=grad.device)  # mean over last dim
                        state["col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:], device=grad.device)
                    else:
                        state["sq"] = torch.zeros_like(grad)
                    if group["beta1"] is not None:  # shaped (and sharded) like the parameter
                        state["avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                lr = self._step_size(group, state, p)
                beta2 = 1.0 - state["step"] ** group["decay_rate"]
                eps1 = group["eps"][0]
                # mean(g² + eps1) = mean(g²) + eps1; the update g · r · c without the [rows, cols] outer product,
                # the clip and learning rate riding in the final subtraction
                if factored and not sharded and _blocked_update(p, grad, state, group, lr, beta2, self._write):
                    continue
                if factored:
                    row, col = state["row"], state["col"]
                    sq = grad * grad
                    row_sq, col_sq = sq.mean(dim=-1).add_(eps1), sq.mean(dim=-2).add_(eps1)
                    row.mul_(beta2).add_(row_sq, alpha=1 - beta2)  # [..., rows]
                    col.mul_(beta2).add_(col_sq, alpha=1 - beta2)  # [..., cols]
                    r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)  # [..., rows, 1]
                    update = torch.mul(grad, r).mul_(col.rsqrt().unsqueeze(-2))  # [..., rows, cols]
                else:
                    sq = state["sq"]
                    sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2).add_(eps1 * (1 - beta2))
                    update = sq.rsqrt().mul_(grad)
                scale = lr / max(1.0, float(_rms(update)) / group["clip_threshold"])
                if sharded:
                    update = like(update, p)
                if group["beta1"] is not None:
                    state["avg"].mul_(group["beta1"]).add_(update, alpha=(1 - group["beta1"]) * scale)
                    update, scale = state["avg"], 1.0
                if p.dtype != update.dtype and not sharded:  # bf16 weights: the new value in fp32, rounded once
                    value = p.float().mul_(1 - group["weight_decay"] * lr)
                    self._write(p, value.sub_(update, alpha=scale))
                    continue
                if group["weight_decay"]:
                    p.mul_(1 - group["weight_decay"] * lr)
                if p.dtype == update.dtype:
                    p.sub_(update, alpha=scale)
                else:  # a low-precision parameter: the scaled update rounded once
                    p.sub_(update.mul(scale).to(p.dtype))
        return loss


def parse_optimizer_args(args: Sequence[str] | dict[str, Any], flag: str = "optimizer_args") -> dict[str, Any]:
    """kohya's ``--optimizer_args key=value ...`` → keyword arguments: each value read as a Python literal as kohya
    reads it (``betas=0.9,0.99`` is a tuple, ``True``, ``None``, ``'text'``), else in TOML syntax (``true``), else
    as text (kohya stops there); lists become tuples."""
    if isinstance(args, dict):
        return dict(args)
    out: dict[str, Any] = {}
    for item in args:
        if "=" not in item:
            raise ConfigError(f"{flag} entry {item!r}: write key=value, e.g. weight_decay=0.01")
        key, value = item.split("=", 1)
        text = value.strip()
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            lowered = {"true": "true", "false": "false", "none": None}.get(text.lower(), text)
            parsed = None if lowered is None else parse_value(lowered)
            if isinstance(parsed, str) and parsed.startswith("(") and parsed.endswith(")"):
                parsed = [parse_value(v.strip()) for v in parsed[1:-1].split(",") if v.strip()]
        out[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def _all_on_cpu(params: Sequence[Any]) -> bool:
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return bool(tensors) and all(isinstance(t, Tensor) and t.device.type == "cpu" and t.is_floating_point()
                                 for t in tensors)


def build_optimizer(name: str, params: Sequence[Any], lr: float, args: Sequence[str] | dict[str, Any],
                    rounding: Any = None) -> Any:
    """AdamW (official: torch defaults, weight decay 0.01), Adafactor, or any other of kohya's optimizer names
    (`optimizers`: Lion, SGDNesterov, Prodigy, DAdapt*, bitsandbytes' 8-bit and paged ones, a torch.optim class or
    'package.module.Class'), with kohya's arguments.

    `rounding` (`bf16_weights.Rounding`, with bf16 parameters): how the new weights are written. "nearest" with
    AdamW is kohya's torch AdamW as it is (moments in bf16, every operation rounded to the nearest); "stochastic"
    is `BF16AdamW` (fp32 moments). Adafactor computes in fp32 either way. Other optimizers update the bf16 weights
    themselves, rounding to the nearest as in kohya."""
    from . import optimizers

    kwargs = parse_optimizer_args(args)
    kind = name.lower()
    if kind not in optimizers.OWN:
        if rounding is not None and rounding.mode == "stochastic":
            warnings.warn(f"full_bf16 with optimizer_type={name!r}: that optimizer writes the bf16 weights itself, "
                          "rounding to the nearest as in kohya; bf16_rounding='stochastic' applies to AdamW and "
                          "Adafactor only (set bf16_rounding='nearest' to silence this)", stacklevel=2)
        return optimizers.build(name, params, lr, kwargs)
    try:
        if kind == "adamw":
            kwargs.setdefault("weight_decay", 0.01)
            if rounding is not None and rounding.mode == "stochastic":
                from .bf16_weights import BF16AdamW

                return BF16AdamW(params, lr=lr, rounding=rounding, **kwargs)
            if "fused" not in kwargs and "foreach" not in kwargs and _all_on_cpu(params):
                # torch's CPU default is one parameter at a time through ~10 ops with temporaries; the fused
                # kernel does the same update in one pass (the step took ~15 % of a full fine-tune step)
                kwargs["fused"] = True
            return torch.optim.AdamW(params, lr=lr, **kwargs)
        if kind == "adafactor":
            if kwargs.get("warmup_init") and kwargs.get("relative_step") is False:
                warnings.warn("Adafactor with warmup_init=True and relative_step=False: warm-up init only exists for "
                              "the relative step, so relative_step is turned on, as kohya does", stacklevel=2)
            kwargs = optimizers.with_kohya_defaults(name, kwargs)  # what ss_optimizer records (optimizers.label)
            relative = kwargs["relative_step"]
            if relative:
                warnings.warn("Adafactor with relative_step=True ignores learning_rate (kohya does the same); "
                              "pass optimizer_args=['scale_parameter=False', 'relative_step=False', "
                              "'warmup_init=False'] to use it", stacklevel=2)
            return Adafactor(params, lr=None if relative else lr, rounding=rounding, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"optimizer_args {args!r} do not fit {name}: {exc}") from None
    raise AssertionError(kind)  # optimizers.OWN


def clip_grad_norm(optimizer: Any, params: Sequence[Tensor], max_norm: float) -> Tensor:
    """The gradients' total L2 norm, clipping them to `max_norm` (inf: no clipping) for the next optimizer step.

    torch's ``clip_grad_norm_`` multiplies every gradient by min(1, max_norm / (norm + 1e-6)): a pass over all
    of them (~1.5 % of a full fine-tune step on the CPU). A fused Adam/AdamW divides each gradient by its
    ``grad_scale`` inside its own pass, so there the factor rides along for free: the same update up to the
    last bit of float32 rounding. The scale is taken off again by `optimizer_step`.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not (isinstance(optimizer, torch.optim.Adam) and optimizer.defaults.get("fused") and grads
            and not any(is_sharded(g) for g in grads)):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.get_total_norm(grads)
    scale = None
    if math.isfinite(max_norm):
        scale = torch.clamp(max_norm / (norm.float() + 1e-6), max=1.0).reciprocal()
    optimizer.grad_scale = scale  # type: ignore[attr-defined]  # a skipped step's is replaced here
    return norm


def optimizer_step(optimizer: Any) -> None:
    """optimizer.step(), then drop a clipping scale `clip_grad_norm` left on it."""
    try:
        optimizer.step()
    finally:
        if getattr(optimizer, "grad_scale", None) is not None:
            optimizer.grad_scale = None


__all__ = ["Adafactor", "build_optimizer", "clip_grad_norm", "optimizer_step", "parse_optimizer_args"]
