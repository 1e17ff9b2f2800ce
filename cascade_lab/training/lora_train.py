"""Trainable LoRA for Stage C or Stage B, saved in kohya's layout (``lora_unet_*``) that ComfyUI and kohya load.

Each target weight W gets ``W + (alpha / rank) · up @ down`` through a torch parametrization, as the
official trainer does, so the packed attention ``in_proj_weight`` [3c, c] takes three pairs (``to_q``,
``to_k``, ``to_v``, its row blocks) exactly as ComfyUI splits it when it loads a Stage C checkpoint.
``down`` starts Kaiming-uniform and ``up`` at zero (kohya), so an attached network leaves the outputs as
they were. Targets: ``attention`` (to_q/k/v and out_proj of every attention) or ``all_linear`` (every
Linear and every non-grouped 1x1 Conv2d, kohya's Stage C set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

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


class _AddDelta(nn.Module):
    """The parametrization W → W + scale · cat(up_i @ down_i) (row blocks for a packed in_proj)."""

    def __init__(self, pairs: list[LoraPair], scale: float) -> None:
        super().__init__()
        self.pairs, self.scale = nn.ModuleList(pairs), scale
        self._pairs = pairs

    def forward(self, weight: Tensor) -> Tensor:
        delta = torch.cat([p.lora_up @ p.lora_down for p in self._pairs]) * self.scale  # [out, in]
        return weight + delta.reshape(weight.shape).to(weight.dtype)


class LoraNetwork(nn.Module):
    """The LoRA pairs of one run, by kohya name; `attach` puts them on a Stage C or B, `detach` takes them off."""

    def __init__(self, targets: list[LoraTarget], rank: int, alpha: float | None, *, seed: int = 0) -> None:
        super().__init__()
        self.targets = {t.name: t for t in targets}
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha else float(rank)  # kohya: 0 or None means alpha = rank
        generator = torch.Generator().manual_seed(seed)
        self.pairs = nn.ModuleDict({t.name: LoraPair(t.n_in, t.n_out, rank, generator) for t in targets})
        self._attached: list[tuple[nn.Module, str, list[str]]] = []

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
        """Register the parametrizations on `model` (its base weights stay untouched underneath)."""
        if self._attached:
            raise RuntimeError("this LoRA network is already attached; detach it first")
        groups: dict[tuple[str, str], list[LoraPair]] = {}
        for name, t in self.targets.items():
            groups.setdefault((t.module, t.param), []).append(self.pair(name))
        for (path, param), pairs in groups.items():
            module = model.get_submodule(path)
            weight = getattr(module, param)
            for pair in pairs:
                pair.to(weight.device)
            order = list(module._parameters)
            parametrize.register_parametrization(module, param, _AddDelta(pairs, self.scale))
            self._attached.append((module, param, order))
        return self

    def detach(self) -> None:
        """Remove the parametrizations: the model's weights are its original tensors again, bit for bit."""
        for module, param, order in reversed(self._attached):
            parametrize.remove_parametrizations(module, param, leave_parametrized=False)
            if set(order) == set(module._parameters):  # put the parameter back in its place: same key order
                module._parameters = type(module._parameters)((k, module._parameters[k]) for k in order)
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


__all__ = ["LoraNetwork", "LoraPair", "LoraTarget", "lora_metadata", "lora_targets"]
