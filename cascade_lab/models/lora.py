"""LoRA for Stage C: read kohya, OneTrainer, ComfyUI and official files; merge into the weights, unmerge exactly.

Formats (spec/training.md §3, spec/stable-cascade.md §7):

* kohya ``lora_unet_<module path, . -> _>``, OneTrainer ``lora_prior_unet_<...>`` and ComfyUI's raw
  ``diffusion_model.<path>``, each with ``.lora_down.weight`` / ``.lora_up.weight`` / optional ``.alpha``
  (scale alpha / rank; no alpha means alpha = rank). Attention may be named split (``attention_attn_to_q/k/v``,
  rows of the packed ``in_proj_weight``; ``out_proj``, old kohya ``to_out``, diffusers ``attention_to_out_0``)
  or fused (``attention_attn``, the whole ``in_proj_weight``). Every Linear and Conv2d may be targeted.
* official ``train_c_lora`` files: ``weights.<i>.lora_down`` / ``.lora_up`` in network order, ``out_proj``
  before the fused ``in_proj`` of each AttnBlock, scale 1 / rank; ``embeddings.*`` are CLIP token deltas.

Merging keeps a CPU copy of each touched parameter; removing a LoRA restores those copies and re-merges the
remaining LoRAs in their order, so the weights equal bit for bit what applying only those would give.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

Tensor = torch.Tensor

_SUFFIXES = {  # tensor suffix -> role (kohya, PEFT and ComfyUI spellings)
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",
}  # fmt: skip
_UNET_PREFIXES = {"lora_unet_": "kohya", "lora_prior_unet_": "onetrainer", "diffusion_model.": "comfyui"}
_TE_PREFIXES = ("lora_te_", "lora_prior_te_", "text_encoder.")
_OFFICIAL = re.compile(r"weights\.(\d+)\.lora_(down|up)")
_STAGE_C_NAME = re.compile(  # every layer name a Stage C LoRA may target, dots already turned into _
    r"(?:down|up)_blocks_\d+_\d+_(?:attention_attn(?:_to_[qkv]|_out_proj|_to_out(?:_0)?|_in_proj)?"
    r"|attention_to_(?:[qkv]|out_0)|kv_mapper_1|channelwise_[04]|mapper(?:_[a-z]+)?|depthwise)"
    r"|clip_(?:txt|txt_pooled|img)_mapper|embedding_1|clf_1|(?:down_downscalers|up_upscalers)_\d+_1(?:_blocks_\d+)?"
    r"|(?:down|up)_repeat_mappers_\d+_\d+"
)
_LOOKS_LIKE = (  # key fragments -> what the file is probably for
    (("lora_te1_", "lora_te2_", "conditioner_embedders"), "SDXL"),
    (("input_blocks", "middle_block", "output_blocks"), "Stable Diffusion 1.x/2.x or SDXL (LDM U-Net names)"),
    (("_attentions_", ".attentions.", "transformer_blocks", "mid_block"), "a Stable Diffusion/SDXL diffusers U-Net"),
    (("double_blocks", "single_blocks"), "Flux"),
    (("joint_blocks",), "SD3"),
    (("effnet_mapper", "pixels_mapper", "clip_mapper"), "Stable Cascade Stage B (apply it to the Stage B model)"),
    (("hada_", "lokr_", "dora_scale", "lora_mid"), "a LyCORIS LoHa/LoKr/DoRA network, which cascade_lab cannot merge"),
)
_EXAMPLE = (
    "Stage C LoRA keys look like 'lora_unet_down_blocks_0_2_attention_attn_to_q.lora_down.weight' (kohya), "
    "'lora_prior_unet_...' (OneTrainer), 'diffusion_model.down_blocks.0.2...' (ComfyUI) or 'weights.0.lora_down' "
    "(official train_c_lora)."
)


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit this Stage C."""


@dataclass(frozen=True)
class LoraModule:
    """One low-rank pair as stored: down [rank, in(, kh, kw)], up [out, rank(, 1, 1)], alpha None = rank."""

    name: str
    down: Tensor
    up: Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank  # kohya: alpha 0 or missing means alpha = rank


@dataclass
class LoraWeights:
    """A Stage C LoRA read from a file; ``text_encoder`` and ``embeddings`` are for the caller to apply."""

    format: str  # "kohya", "onetrainer", "comfyui" or "official"
    modules: list[LoraModule]
    source: str = "<state dict>"
    metadata: dict[str, str] = field(default_factory=dict)
    text_encoder: dict[str, Tensor] = field(default_factory=dict)  # lora_te_* / lora_prior_te_*: CLIP-G LoRA
    embeddings: dict[str, Tensor] = field(default_factory=dict)  # official ReToken: embeddings [n, 1280], indices

    def __repr__(self) -> str:
        ranks = sorted({m.rank for m in self.modules})
        return (
            f"LoraWeights({self.format}, {len(self.modules)} modules, rank {ranks}, from {self.source}; "
            f"{len(self.text_encoder)} text-encoder tensors, {len(self.embeddings)} token-embedding tensors)"
        )

    def patches(self, model: nn.Module) -> list[_Patch]:
        """Resolve every module to a parameter (and row range) of model; raise LoraError on misfits."""
        if self.format == "official":
            return _official_patches(self, model)
        table = stage_c_lora_targets(model)
        missing = [m.name for m in self.modules if _layer_name(m.name) not in table]
        if missing:
            raise LoraError(
                f"{self.source}: {len(missing)} of {len(self.modules)} LoRA modules name layers this Stage C does "
                f"not have, e.g. {missing[:4]}. The file was probably made for a bigger Stage C (the full 3.6B model "
                "has 8+24 blocks per level, the lite 1B 4+12) or another model."
            )
        return [_fit(m, *table[_layer_name(m.name)], model, self.source) for m in self.modules]


@dataclass(frozen=True)
class _Patch:
    param: str
    rows: slice | None
    module: LoraModule


def _layer_name(name: str) -> str:
    for prefix in _UNET_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :].replace(".", "_")
    return name.replace(".", "_")


def stage_c_lora_targets(model: nn.Module) -> dict[str, tuple[str, slice | None]]:
    """LoRA layer name (module path with _) -> (parameter name, rows or None) for every name kohya, OneTrainer,
    ComfyUI or diffusers may use on this model."""
    table: dict[str, tuple[str, slice | None]] = {}
    for path, module in model.named_modules():
        name = path.replace(".", "_")
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            table[name] = (f"{path}.weight", None)
        in_proj = getattr(module, "in_proj_weight", None)
        if isinstance(in_proj, Tensor):  # packed MHA: in_proj_weight [3c, c] = q, k, v rows
            c = in_proj.shape[0] // 3
            block = name.removesuffix("_attn")
            for i, letter in enumerate("qkv"):
                table[f"{name}_to_{letter}"] = table[f"{block}_to_{letter}"] = (f"{path}.in_proj_weight",
                                                                                slice(i * c, (i + 1) * c))  # fmt: skip
            table[name] = table[f"{name}_in_proj"] = (f"{path}.in_proj_weight", None)
            for alias in (f"{name}_to_out", f"{name}_to_out_0", f"{block}_to_out_0"):
                table[alias] = (f"{path}.out_proj.weight", None)
    return table


def official_lora_targets(model: nn.Module) -> list[str]:
    """Parameter of each ``weights.<i>`` entry of an official file: per attention, in module order,
    out_proj first, then the fused in_proj (the order torch parametrizations put them in ``modules()``)."""
    targets = []
    for path, module in model.named_modules():
        if isinstance(getattr(module, "in_proj_weight", None), Tensor):
            targets += [f"{path}.out_proj.weight", f"{path}.in_proj_weight"]
    return targets


def _official_patches(lora: LoraWeights, model: nn.Module) -> list[_Patch]:
    targets = official_lora_targets(model)
    if len(lora.modules) != len(targets):
        raise LoraError(
            f"{lora.source}: the official LoRA has {len(lora.modules)} entries (weights.0 ... "
            f"weights.{len(lora.modules) - 1}, two per attention block) but this Stage C has {len(targets) // 2} "
            f"attention blocks ({len(targets)} entries). It was made for another Stage C size: the full 3.6B model "
            "takes 128 entries, the lite 1B model 64."
        )
    return [_fit(m, param, None, model, lora.source) for m, param in zip(lora.modules, targets, strict=True)]


def _fit(m: LoraModule, param: str, rows: slice | None, model: nn.Module, source: str) -> _Patch:
    shape = list(model.get_parameter(param).shape)
    n_out = shape[0] if rows is None else rows.stop - rows.start
    n_in = int(torch.Size(shape[1:]).numel())
    target = param if rows is None else f"{param}[{rows.start}:{rows.stop}]"
    down, up = m.down.flatten(1), m.up.flatten(1)
    if down.shape[1] != n_in or up.shape[0] != n_out or up.shape[1] != down.shape[0]:
        raise LoraError(
            f"{source}: {m.name} has lora_down {list(m.down.shape)} and lora_up {list(m.up.shape)}, but Stage C's "
            f"{target} is {[n_out, *shape[1:]]} (it needs lora_down [rank, {n_in}] and lora_up [{n_out}, rank]). "
            "The LoRA was made for a Stage C of another width (lite 1536 channels, full 2048) or another model."
        )
    return _Patch(param, rows, m)


def _refuse_pickle(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then the JSON header
        return
    pickled = head[:2] == b"PK" or head[:1] == b"\x80"  # torch.save zip, or a bare pickle
    kind = "a pickle (torch.save / .ckpt / .pt / .bin) file" if pickled else "not a safetensors file"
    raise LoraError(
        f"{path} is {kind}. cascade_lab reads LoRA files only as .safetensors, because loading a pickle can run "
        "arbitrary code. Convert it once where you trust it: "
        "safetensors.torch.save_file(torch.load(f), 'x.safetensors')."
    )


def load_lora_file(path: str | Path) -> LoraWeights:
    """Read a Stage C LoRA .safetensors file (kohya, OneTrainer, ComfyUI or official; detected from the keys)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    _refuse_pickle(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return lora_from_state_dict(tensors, source=str(path), metadata=metadata)


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _unknown_keys_error(source: str, unknown: list[str], n_total: int) -> LoraError:
    guess = next((what for frags, what in _LOOKS_LIKE if any(f in k for k in unknown for f in frags)), None)
    looks = f" They look like a LoRA for {guess}." if guess else ""
    if not guess and not any("lora" in k.lower() or "alpha" in k for k in unknown):
        looks = " They look like plain model weights (a checkpoint), not a LoRA."
    return LoraError(
        f"{source}: {len(unknown)} of {n_total} tensors are not part of a Stage C LoRA, e.g. {unknown[:5]}.{looks} "
        + _EXAMPLE
    )


def lora_from_state_dict(
    tensors: Mapping[str, Tensor], *, source: str = "<state dict>", metadata: Mapping[str, str] | None = None
) -> LoraWeights:
    """Sort a LoRA state dict into Stage C modules, text-encoder tensors and token embeddings (see module doc)."""
    groups: dict[str, dict[str, Tensor]] = {}
    official: dict[int, dict[str, Tensor]] = {}
    text_encoder, embeddings, unknown, formats = {}, {}, [], []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if match := _OFFICIAL.fullmatch(key):
            official.setdefault(int(match[1]), {})[match[2]] = tensor
        elif key in ("embeddings.embeddings", "embeddings.indices"):
            embeddings[key] = tensor
        elif key.startswith(_TE_PREFIXES):
            text_encoder[key] = tensor
        elif split and _STAGE_C_NAME.fullmatch(_layer_name(split[0])):
            groups.setdefault(split[0], {})[split[1]] = tensor
            formats.append(next((f for p, f in _UNET_PREFIXES.items() if key.startswith(p)), "comfyui"))
        else:
            unknown.append(key)
    if unknown:
        raise _unknown_keys_error(source, unknown, len(tensors))
    if official and groups:
        raise LoraError(f"{source} mixes official 'weights.N' entries with named ones; it cannot be both.")
    if not (official or groups or text_encoder or embeddings):
        raise LoraError(f"{source} holds no LoRA tensors. {_EXAMPLE}")
    if official:
        if sorted(official) != list(range(len(official))):
            raise LoraError(f"{source}: official entries must be weights.0 ... weights.N without gaps, got "
                            f"{sorted(official)[:8]}...")  # fmt: skip
        named = {f"weights.{i}": official[i] | {"alpha": torch.tensor(1.0)} for i in range(len(official))}
    else:
        named = groups
    modules = []
    for name, parts in named.items():
        if "down" not in parts or "up" not in parts:
            have = sorted(parts)
            raise LoraError(f"{source}: {name} has {have} but needs both lora_down and lora_up.")
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        modules.append(LoraModule(name, parts["down"], parts["up"], alpha))
    fmt = "official" if official else max(set(formats), key=formats.count) if formats else "kohya"
    return LoraWeights(fmt, modules, source, dict(metadata or {}), text_encoder, embeddings)


# ----------------------------------------------------------------------------------- merging and unmerging


@dataclass
class _ModelLoras:
    originals: dict[str, Tensor] = field(default_factory=dict)  # parameter name -> CPU copy of the base weight
    handles: list[LoraHandle] = field(default_factory=list)  # in application order


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, _ModelLoras] = weakref.WeakKeyDictionary()


class LoraHandle:
    """A LoRA merged into a model; ``remove()`` takes it out again bit-exactly, ``set_strength`` re-merges."""

    def __init__(self, model: nn.Module, lora: LoraWeights, strength: float, patches: list[_Patch]):
        self._model = weakref.ref(model)
        self.lora, self.strength, self._patches = lora, float(strength), patches
        self.params = sorted({p.param for p in patches})

    @property
    def active(self) -> bool:
        model = self._model()
        return model is not None and self in _ACTIVE.get(model, _ModelLoras()).handles

    def remove(self) -> None:
        """Restore the base weights of this LoRA's parameters and re-merge the other LoRAs on them."""
        model = self._model()
        if model is None or not self.active:
            return
        state = _ACTIVE[model]
        state.handles.remove(self)
        _rebuild(model, state, self.params)

    def set_strength(self, strength: float) -> None:
        """Change the strength in place (re-merges the touched parameters from their base copies)."""
        model = self._model()
        if model is None or not self.active:
            raise LoraError("this LoRA is no longer applied; call apply_lora again")
        self.strength = float(strength)
        _rebuild(model, _ACTIVE[model], self.params)

    def __repr__(self) -> str:
        return f"LoraHandle({self.lora.source}, strength={self.strength}, {len(self.params)} params)"


@torch.no_grad()
def _merge(model: nn.Module, handle: LoraHandle, only: set[str] | None = None) -> None:
    if handle.strength == 0:
        return
    for patch in handle._patches:
        if only is not None and patch.param not in only:
            continue
        param = model.get_parameter(patch.param)
        target = param if patch.rows is None else param[patch.rows]  # a view: writes land in param
        m = patch.module
        up = m.up.flatten(1).to(param.device, torch.float32)  # (out, rank)
        down = m.down.flatten(1).to(param.device, torch.float32)  # (rank, in * kh * kw)
        delta = (up @ down).mul_(handle.strength * m.scale).reshape(target.shape)
        target.copy_(target.float() + delta)  # added in fp32, rounded once to the parameter dtype


@torch.no_grad()
def _rebuild(model: nn.Module, state: _ModelLoras, params: Iterable[str]) -> None:
    params = set(params)
    for name in params:
        model.get_parameter(name).copy_(state.originals[name])
    for handle in state.handles:
        _merge(model, handle, params)
    still_used = {p for h in state.handles for p in h.params}
    for name in params - still_used:
        del state.originals[name]
    if not state.handles:
        _ACTIVE.pop(model, None)


def apply_lora(model: nn.Module, lora: LoraWeights | str | Path, strength: float = 1.0) -> LoraHandle:
    """Merge ``W += strength * scale * up @ down`` into model's weights; stacks with LoRAs already applied."""
    if not isinstance(lora, LoraWeights):
        lora = load_lora_file(lora)
    patches = lora.patches(model)  # raises before anything changes
    if lora.text_encoder or lora.embeddings:
        warnings.warn(
            f"{lora.source}: {len(lora.text_encoder)} text-encoder LoRA tensors and {len(lora.embeddings)} "
            "token-embedding tensors (official ReToken: rows 'embeddings.indices' of CLIP-G's token embedding) "
            "are not part of Stage C and were not applied; apply lora.text_encoder / lora.embeddings to the text "
            "encoder, or prompts using the trained tokens will not match the training.",
            stacklevel=2,
        )
    state = _ACTIVE.setdefault(model, _ModelLoras())
    handle = LoraHandle(model, lora, strength, patches)
    for name in handle.params:
        if name not in state.originals:
            state.originals[name] = model.get_parameter(name).detach().to("cpu", copy=True)
    state.handles.append(handle)
    try:
        _merge(model, handle)
    except BaseException:
        state.handles.remove(handle)
        _rebuild(model, state, handle.params)
        raise
    return handle


def active_loras(model: nn.Module) -> list[LoraHandle]:
    """The LoRAs merged into model, in application order."""
    return list(_ACTIVE.get(model, _ModelLoras()).handles)


def unload_all(model: nn.Module) -> None:
    """Remove every LoRA: all touched parameters get their base weights back, bit for bit."""
    state = _ACTIVE.get(model)
    if state is not None:
        state.handles.clear()
        _rebuild(model, state, list(state.originals))
