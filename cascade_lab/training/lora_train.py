"""Trainable LoRA for Stage C or Stage B, saved in kohya's layout (``lora_unet_*``) that ComfyUI and kohya load.

Each target computes ``W x + (alpha / rank) · up(down(x))`` — what ComfyUI's merged ``W + (alpha / rank) ·
up @ down`` gives — as a low-rank branch beside the frozen layer (a forward hook on a Linear or 1x1 Conv2d;
for the packed attention ``in_proj_weight`` [3c, c] the attention's ``in_proj_adapter``, three pairs
``to_q``, ``to_k``, ``to_v`` on its row blocks, exactly as ComfyUI splits it when it loads a Stage C
checkpoint). The branch never forms a [out, in] weight: no merged copy per layer per step and no gradient of
the frozen weights (a weight parametrization costs both: a full fine-tune's weight-gradient matmuls and a
saved weight copy per layer).
``down`` starts Kaiming-uniform and ``up`` at zero (kohya), so an attached network leaves the outputs as
they were. Targets: ``attention`` (to_q/k/v and out_proj of every attention) or ``all_linear`` (every
Linear and every non-grouped 1x1 Conv2d, kohya's Stage C set).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

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


class _LayerBranch:
    """Forward hook: the layer's output plus the low-rank branch of its input."""

    def __init__(self, pair: LoraPair, scale: float, conv: bool) -> None:
        self.pair, self.scale, self.conv = pair, scale, conv

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
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


class _InProjBranch:
    """``MultiheadAttention.in_proj_adapter``: the low-rank output of rows [start, stop) of the packed in_proj."""

    def __init__(self, blocks: list[tuple[int, int, LoraPair]], scale: float) -> None:
        self.blocks, self.scale = sorted(blocks, key=lambda b: b[0]), scale  # (first row, last row + 1, pair)

    def __call__(self, x: Tensor, start: int, stop: int) -> Tensor | None:
        parts = []
        for first, end, pair in self.blocks:
            if end <= start or first >= stop:
                continue
            if first < start or end > stop:
                raise ValueError(f"LoRA rows {first}:{end} straddle the projection rows {start}:{stop}")
            parts.append((first, end, _low_rank(x, pair, self.scale, False)))
        if not parts:
            return None
        pos, out = start, []
        for first, end, part in parts:  # rows without a pair get zeros (an in_proj with only some of q, k, v)
            if first > pos:
                out.append(part.new_zeros(*part.shape[:-1], first - pos))
            out.append(part)
            pos = end
        if pos < stop:
            out.append(out[-1].new_zeros(*out[-1].shape[:-1], stop - pos))
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


class LoraNetwork(nn.Module):
    """The LoRA pairs of one run, by kohya name; `attach` puts them on a Stage C or B, `detach` takes them off."""

    def __init__(self, targets: list[LoraTarget], rank: int, alpha: float | None, *, seed: int = 0) -> None:
        super().__init__()
        self.targets = {t.name: t for t in targets}
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha else float(rank)  # kohya: 0 or None means alpha = rank
        generator = torch.Generator().manual_seed(seed)
        self.pairs = nn.ModuleDict({t.name: LoraPair(t.n_in, t.n_out, rank, generator) for t in targets})
        self._attached: list[Callable[[], Any]] = []

    @classmethod
    def for_model(cls, model: nn.Module, *, rank: int = 4, alpha: float | None = 1.0, target: str = "attention",
                  seed: int = 0) -> LoraNetwork:
        return cls(lora_targets(model, target), rank, alpha, seed=seed)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

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
            else:
                handle = module.register_forward_hook(_LayerBranch(pair, self.scale, t.conv))
                self._attached.append(handle.remove)
        for path, blocks in in_proj.items():
            module = model.get_submodule(path)
            if not hasattr(module, "in_proj_adapter"):
                raise TypeError(f"{path}: {type(module).__name__} has no in_proj_adapter; LoRA on a packed "
                                "in_proj needs cascade_lab's MultiheadAttention")
            setattr(module, "in_proj_adapter", _InProjBranch(blocks, self.scale))  # noqa: B010 (not a module attr)
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
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(network.rank),
        "ss_network_alpha": f"{network.alpha:g}", "ss_base_model_version": "stable_cascade",
        "ss_network_args": f'{{"target": "{config.network_target}"}}', "ss_learning_rate": str(config.learning_rate),
        "ss_optimizer": config.optimizer_type, "ss_lr_scheduler": config.lr_scheduler, "ss_seed": str(config.seed),
        "ss_mixed_precision": config.mixed_precision, "ss_caption_dropout_rate": str(config.caption_dropout_rate),
        "ss_resolution": f"({res[0]}, {res[1]})", "ss_output_name": config.name,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-cascade/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/StableCascade",
        "modelspec.title": config.name, "modelspec.resolution": f"{res[0]}x{res[1]}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    meta.update(extra)
    return meta


__all__ = ["NETWORK_ATTR", "LoraNetwork", "LoraPair", "LoraTarget", "lora_metadata", "lora_targets"]
