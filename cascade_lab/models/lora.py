"""LoRA for Stage C and its CLIP-G, and for Stage B: read kohya, OneTrainer, ComfyUI and official files; merge,
unmerge exactly.

A file is for Stage B when its header says so (``cascade_lab.stage`` = ``b``, written by cascade_lab's Stage B
training) or when it names layers only Stage B has (``effnet_mapper``, ``pixels_mapper``, ``clip_mapper``);
applying it to the other stage is refused with a message naming both (`LoraWeights.stage`).

Formats (spec/training.md §3, spec/stable-cascade.md §7):

* kohya ``lora_unet_<module path, . -> _>``, OneTrainer ``lora_prior_unet_<...>`` (legacy), ``prior.<path>``
  (its diffusers format and internal backups), ``unet.<path>`` (its 2025 OMI backups), ComfyUI's
  ``diffusion_model.<path>`` and OneTrainer's prefix-free "original" format, each with ``.lora_down.weight`` /
  ``.lora_up.weight`` (or ``lora_A`` / ``lora_B``) and an optional ``.alpha`` (scale alpha / rank; none means
  alpha = rank). Attention may be named split (``attention_attn_to_q/k/v`` or OneTrainer's
  ``attention_attn_in_proj_0/1/2``: rows of the packed ``in_proj_weight``; ``out_proj``, old kohya ``to_out``,
  diffusers ``attention_to_out_0``) or fused (``attention_attn``, the whole ``in_proj_weight``).
* official ``train_c_lora`` files: ``weights.<i>.lora_down`` / ``.lora_up`` in network order, ``out_proj``
  before the fused ``in_proj`` of each AttnBlock, scale 1 / rank; ``embeddings.*`` are CLIP token deltas.
* text encoder: ``lora_te_`` / ``lora_prior_te_<transformers path, . -> _>``, ``text_encoder.<path>``,
  ComfyUI's ``text_encoders.clip_g.transformer.<path>``: merged into CLIP-G when ``apply_lora`` is given it.

Every Linear and Conv2d may be targeted. OneTrainer's all-layers preset also puts a LoRA on each ResBlock's
depthwise conv (groups = channels): its ``lora_down`` is a full [rank, c, 3, 3] conv and its ``lora_up`` a
1x1 conv to ``c / groups`` = 1 channel that broadcasts over all c outputs (OneTrainer's ``LoRAModule``), which
no change of the [c, 1, 3, 3] weight can express; those are applied as that extra conv branch (a forward hook).
(In Stage C that branch adds one value per pixel to all channels, which the ResBlock's channel LayerNorm then
removes: such LoRAs leave the output unchanged up to rounding, as they did during OneTrainer's training.)

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

_SUFFIXES = {  # tensor suffix -> role (kohya, PEFT and ComfyUI spellings)
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",
}  # fmt: skip
_UNET_PREFIXES = {"lora_unet_": "kohya", "lora_prior_unet_": "onetrainer", "prior.": "onetrainer",
                  "unet.": "onetrainer", "diffusion_model.": "comfyui"}
_TE_PREFIXES = ("lora_te_", "lora_prior_te_", "text_encoder.", "text_encoders.clip_g.transformer.", "clip_g.")
_EMBEDDINGS = ("embeddings.embeddings", "embeddings.indices")  # official ReToken; OneTrainer bundles bundle_emb.*
_OFFICIAL = re.compile(r"weights\.(\d+)\.lora_(down|up)")
_STAGE_C_NAME = re.compile(  # every layer name a Stage C LoRA may target, dots already turned into _
    r"(?:down|up)_blocks_\d+_\d+_(?:attention_attn(?:_to_[qkv]|_out_proj|_to_out(?:_0)?|_in_proj(?:_[012])?)?"
    r"|attention_to_(?:[qkv]|out_0)|kv_mapper_1|channelwise_[04]|mapper(?:_[a-z]+)?|depthwise)"
    r"|clip_(?:txt|txt_pooled|img)_mapper|embedding_1|clf_1|(?:down_downscalers|up_upscalers)_\d+_1(?:_blocks_\d+)?"
    r"|(?:down|up)_repeat_mappers_\d+_\d+"
)
_STAGE_B_ONLY = re.compile(r"(?:effnet|pixels)_mapper_[02]|clip_mapper")  # Stage B layers Stage C does not have
_LOOKS_LIKE = (  # key fragments -> what the file is probably for
    (("lora_te1_", "lora_te2_", "conditioner_embedders"), "SDXL"),
    (("input_blocks", "middle_block", "output_blocks"), "Stable Diffusion 1.x/2.x or SDXL (LDM U-Net names)"),
    (("_attentions_", ".attentions.", "transformer_blocks", "mid_block"), "a Stable Diffusion/SDXL diffusers U-Net"),
    (("double_blocks", "single_blocks"), "Flux"),
    (("joint_blocks",), "SD3"),
    (("hada_", "lokr_", "dora_scale", "lora_mid"), "a LyCORIS LoHa/LoKr/DoRA network, which cascade_lab cannot merge"),
)
_EXAMPLE = (
    "Stage C LoRA keys look like 'lora_unet_down_blocks_0_2_attention_attn_to_q.lora_down.weight' (kohya), "
    "'lora_prior_unet_...' or 'prior.down_blocks.0.2...' (OneTrainer), 'diffusion_model.down_blocks.0.2...' "
    "(ComfyUI) or 'weights.0.lora_down' (official train_c_lora)."
)


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit this Stage C (or its text encoder)."""


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
    """A Stage C LoRA read from a file, with its text-encoder part; ``embeddings`` are for the caller to apply."""

    format: str  # "kohya", "onetrainer" (also its prefix-free "original" names), "comfyui" or "official"
    modules: list[LoraModule]
    source: str = "<state dict>"
    metadata: dict[str, str] = field(default_factory=dict)
    text_encoder: dict[str, Tensor] = field(default_factory=dict)  # lora_te_* / lora_prior_te_* ... as stored
    embeddings: dict[str, Tensor] = field(default_factory=dict)  # official ReToken, OneTrainer bundle_emb.*
    text_encoder_modules: list[LoraModule] = field(default_factory=list)  # text_encoder, paired up

    def __repr__(self) -> str:
        ranks = sorted({m.rank for m in self.modules})
        return (
            f"LoraWeights({self.format}, {len(self.modules)} modules, rank {ranks}, from {self.source}; "
            f"{len(self.text_encoder_modules)} text-encoder modules, {len(self.embeddings)} token-embedding tensors)"
        )

    @property
    def stage(self) -> str | None:
        """"b" or "c": the stage this LoRA is for, from the header (``cascade_lab.stage``) or from layers only one
        stage has (official files and text-encoder parts are Stage C's); None when the layers fit both."""
        declared = self.metadata.get("cascade_lab.stage", "").strip().lower()
        if declared in ("b", "c"):
            return declared
        names = [_layer_name(m.name) for m in self.modules]
        if any(_STAGE_B_ONLY.fullmatch(n) for n in names):
            return "b"
        if self.format == "official" or self.text_encoder_modules or self.embeddings or any(
                n.startswith(("clip_txt", "clip_img")) for n in names):
            return "c"
        return None

    def check_stage(self, model: nn.Module) -> None:
        """Raise LoraError when this LoRA is for the other stage than `model` (Stage B or Stage C)."""
        have, want = model_stage(model), self.stage
        if have is not None and want is not None and have != want:
            why = "its header says so" if self.metadata.get("cascade_lab.stage") else "its layers say so"
            raise LoraError(
                f"{self.source} is a Stage {want.upper()} LoRA ({why}) but was applied to Stage {have.upper()}. "
                f"Load it on Stage {want.upper()}: Cascade.load_lora routes it by itself; in ComfyUI connect the "
                f"LoraLoader to the Stage {want.upper()} model."
            )

    def patches(self, model: nn.Module) -> list[_Patch]:
        """Resolve every module to a parameter (and row range) of model; raise LoraError on misfits."""
        self.check_stage(model)
        if self.format == "official":
            return _official_patches(self, model)
        table = stage_c_lora_targets(model)
        missing = [m.name for m in self.modules if _layer_name(m.name) not in table]
        what = f"Stage {(model_stage(model) or 'c').upper()}"
        if missing:
            sizes = ("the full 3.6B model has 8+24 blocks per level, the lite 1B 4+12" if what == "Stage C" else
                     "the full 1.5B Stage B has 2+6+28+6 blocks down, the lite 700M 2+4+14+4")
            raise LoraError(
                f"{self.source}: {len(missing)} of {len(self.modules)} LoRA modules name layers this {what} does "
                f"not have, e.g. {missing[:4]}. The file was probably made for a bigger {what} ({sizes}) or "
                "another model."
            )
        return [_fit(m, *table[_layer_name(m.name)], model, self.source, what) for m in self.modules]

    def text_encoder_patches(self, text_model: nn.Module) -> list[_Patch]:
        """Resolve the text-encoder modules to parameters of a transformers CLIP text model (CLIP-G)."""
        table = text_encoder_lora_targets(text_model)
        missing = [m.name for m in self.text_encoder_modules if _te_layer_name(m.name) not in table]
        if missing:
            raise LoraError(
                f"{self.source}: {len(missing)} of {len(self.text_encoder_modules)} text-encoder LoRA modules name "
                f"layers this text encoder does not have, e.g. {missing[:4]}. Stable Cascade's text encoder is "
                f"CLIP-G ({len(table)} Linear layers here, e.g. 'text_model_encoder_layers_0_self_attn_q_proj')."
            )
        return [_fit(m, table[_te_layer_name(m.name)], None, text_model, self.source, "the text encoder")
                for m in self.text_encoder_modules]


@dataclass(frozen=True)
class _Patch:
    param: str
    rows: slice | None
    module: LoraModule
    branch: bool = False  # a grouped conv's LoRA (OneTrainer): an extra conv added to the output, not merged


def lora_file_stage(path: str | Path) -> str:
    """"b" for a Stage B LoRA file, else "c", from its header alone (metadata or Stage B-only layer names); a file
    that cannot be read counts as Stage C (the loader reports it when it is used)."""
    try:
        from ..weights.safetensors_io import read_header

        header = read_header(path)
    except Exception:
        return "c"
    declared = str(header.metadata.get("cascade_lab.stage", "")).strip().lower()
    if declared in ("b", "c"):
        return declared
    names = (_split_key(k) for k in header.tensors)
    return "b" if any(n and _STAGE_B_ONLY.fullmatch(_layer_name(n[0])) for n in names) else "c"


def model_stage(model: nn.Module) -> str | None:
    """"b" for a Stage B, "c" for a Stage C (by their conditioning mappers), else None."""
    if hasattr(model, "effnet_mapper"):
        return "b"
    if hasattr(model, "clip_txt_mapper"):
        return "c"
    return None


def _layer_name(name: str) -> str:
    for prefix in _UNET_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :].replace(".", "_")
    return name.replace(".", "_")


def _te_layer_name(name: str) -> str:
    for prefix in _TE_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :].removeprefix("transformer.").replace(".", "_")
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
                rows = (f"{path}.in_proj_weight", slice(i * c, (i + 1) * c))
                table[f"{name}_to_{letter}"] = table[f"{block}_to_{letter}"] = table[f"{name}_in_proj_{i}"] = rows
            table[name] = table[f"{name}_in_proj"] = (f"{path}.in_proj_weight", None)
            for alias in (f"{name}_to_out", f"{name}_to_out_0", f"{block}_to_out_0"):
                table[alias] = (f"{path}.out_proj.weight", None)
    return table


def text_encoder_lora_targets(text_model: nn.Module) -> dict[str, str]:
    """LoRA layer name (transformers module path with _, e.g. ``text_model_encoder_layers_0_mlp_fc1``,
    ``text_projection``) -> parameter name, for every Linear of a CLIP text model."""
    return {path.replace(".", "_"): f"{path}.weight" for path, module in text_model.named_modules()
            if isinstance(module, nn.Linear)}


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


def _fit(m: LoraModule, param: str, rows: slice | None, model: nn.Module, source: str,
         what: str = "Stage C") -> _Patch:
    shape = list(model.get_parameter(param).shape)
    n_out = shape[0] if rows is None else rows.stop - rows.start
    n_in = int(torch.Size(shape[1:]).numel())
    target = param if rows is None else f"{param}[{rows.start}:{rows.stop}]"
    down, up = m.down.flatten(1), m.up.flatten(1)
    if down.shape[1] == n_in and up.shape[0] == n_out and up.shape[1] == down.shape[0]:
        return _Patch(param, rows, m)
    conv = model.get_submodule(param.removesuffix(".weight")) if param.endswith(".weight") else None
    if isinstance(conv, nn.Conv2d) and conv.groups > 1 and _is_branch(m, conv):
        return _Patch(param, rows, m, branch=True)
    hint = ("The LoRA was made for a Stage C of another width (lite 1536 channels, full 2048) or another model."
            if what == "Stage C" else "The LoRA was made for a Stage B of another width (lite 1152 channels at the "
            "deep levels, full 1280) or another model." if what == "Stage B" else
            "The LoRA was made for another text encoder (SDXL's CLIP-L is 768 wide).")
    raise LoraError(
        f"{source}: {m.name} has lora_down {list(m.down.shape)} and lora_up {list(m.up.shape)}, but {what}'s "
        f"{target} is {[n_out, *shape[1:]]} (it needs lora_down [rank, {n_in}] and lora_up [{n_out}, rank]). {hint}"
    )


def _is_branch(m: LoraModule, conv: nn.Conv2d) -> bool:
    """OneTrainer's LoRA on a grouped conv: lora_down a full conv [rank, c_in, kh, kw], lora_up [c_out / groups,
    rank, 1, 1]; its output broadcasts over the c_out channels, which needs c_out / groups to be 1 or c_out."""
    per_group = conv.out_channels // conv.groups
    return (tuple(m.down.shape) == (m.rank, conv.in_channels, *conv.kernel_size)
            and tuple(m.up.flatten(1).shape) == (per_group, m.rank) and per_group == 1)


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
    """Read a Stage C or Stage B LoRA .safetensors file (kohya, OneTrainer, ComfyUI or official; detected from the
    keys; `LoraWeights.stage` says which stage it is for)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    _refuse_pickle(path)
    from ..weights.safetensors_io import read_header

    read_header(path)  # an empty, truncated or corrupt file: one sentence naming it (WeightsFileError), as stages
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
        f"{source}: {len(unknown)} of {n_total} tensors are not part of a Stage C or Stage B LoRA, e.g. "
        f"{unknown[:5]}.{looks} "
        + _EXAMPLE
    )


def lora_from_state_dict(
    tensors: Mapping[str, Tensor], *, source: str = "<state dict>", metadata: Mapping[str, str] | None = None
) -> LoraWeights:
    """Sort a LoRA state dict into Stage C modules, text-encoder modules and token embeddings (see module doc)."""
    groups: dict[str, dict[str, Tensor]] = {}
    te_groups: dict[str, dict[str, Tensor]] = {}
    official: dict[int, dict[str, Tensor]] = {}
    text_encoder, embeddings, unknown, formats = {}, {}, [], []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if match := _OFFICIAL.fullmatch(key):
            official.setdefault(int(match[1]), {})[match[2]] = tensor
        elif key in _EMBEDDINGS or key.startswith("bundle_emb."):
            embeddings[key] = tensor
        elif key.startswith(_TE_PREFIXES) and split:
            text_encoder[key] = tensor
            te_groups.setdefault(split[0], {})[split[1]] = tensor
        elif split and (_STAGE_C_NAME.fullmatch(_layer_name(split[0])) or _STAGE_B_ONLY.fullmatch(
                _layer_name(split[0]))):
            groups.setdefault(split[0], {})[split[1]] = tensor
            formats.append(next((f for p, f in _UNET_PREFIXES.items() if key.startswith(p)), "onetrainer"))
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
    fmt = "official" if official else max(set(formats), key=formats.count) if formats else "kohya"
    return LoraWeights(fmt, _pair(named, source), source, dict(metadata or {}), text_encoder, embeddings,
                       _pair(te_groups, source))


def _pair(named: Mapping[str, Mapping[str, Tensor]], source: str) -> list[LoraModule]:
    modules = []
    for name, parts in named.items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"{source}: {name} has {sorted(parts)} but needs both lora_down and lora_up.")
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        modules.append(LoraModule(name, parts["down"], parts["up"], alpha))
    return modules


# ----------------------------------------------------------------------------------- merging and unmerging


@dataclass
class _ModelLoras:
    originals: dict[str, Tensor] = field(default_factory=dict)  # parameter name -> CPU copy of the base weight
    handles: list[LoraHandle] = field(default_factory=list)  # in application order


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, _ModelLoras] = weakref.WeakKeyDictionary()


class LoraHandle:
    """A LoRA merged into a model; ``remove()`` takes it out again bit-exactly, ``set_strength`` re-merges.

    The text-encoder part, when applied, is a second handle on the text model (``text_encoder``): removing the
    Stage C LoRA removes it, and ``set_strength`` re-weights it too unless it was given its own strength.
    """

    def __init__(self, model: nn.Module, lora: LoraWeights, strength: float, patches: list[_Patch]):
        self._model = weakref.ref(model)
        self.lora, self.strength, self._patches = lora, float(strength), patches
        self.params = sorted({p.param for p in patches if not p.branch})
        self.text_encoder: LoraHandle | None = None
        self._text_encoder_follows = True  # set_strength also re-weights the text encoder
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._kernels: dict[int, Tensor] = {}  # branch patch index -> conv kernel at the current strength

    @property
    def active(self) -> bool:
        model = self._model()
        return model is not None and self in _ACTIVE.get(model, _ModelLoras()).handles

    def remove(self) -> None:
        """Restore the base weights of this LoRA's parameters and re-merge the other LoRAs on them."""
        if self.text_encoder is not None:
            self.text_encoder.remove()
        model = self._model()
        if model is None or not self.active:
            return
        self._unhook()
        state = _ACTIVE[model]
        state.handles.remove(self)
        _rebuild(model, state, self.params)

    def set_strength(self, strength: float) -> None:
        """Change the strength in place (re-merges the touched parameters from their base copies)."""
        model = self._model()
        if model is None or not self.active:
            raise LoraError("this LoRA is no longer applied; call apply_lora again")
        self.strength = float(strength)
        self._kernels.clear()
        _rebuild(model, _ACTIVE[model], self.params)
        if self.text_encoder is not None and self.text_encoder.active and self._text_encoder_follows:
            self.text_encoder.set_strength(strength)

    def _hook(self, model: nn.Module) -> None:
        """Add each grouped-conv LoRA as OneTrainer runs it: y = conv(x) + s * up(down(x)), broadcast over c_out."""
        me = weakref.ref(self)
        for i, patch in enumerate(self._patches):
            if not patch.branch:
                continue
            conv = model.get_submodule(patch.param.removesuffix(".weight"))
            assert isinstance(conv, nn.Conv2d), patch.param
            geometry = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}

            def hook(_: nn.Module, args: tuple[Tensor, ...], out: Tensor, i: int = i, geometry: Any = geometry
                     ) -> Tensor:
                handle = me()
                if handle is None or handle.strength == 0:
                    return out
                x = args[0]
                return out + F.conv2d(x, handle._kernel(i, x), None, **geometry)  # (B, 1, H', W') broadcasts

            self._hooks.append(conv.register_forward_hook(hook))

    def _kernel(self, i: int, x: Tensor) -> Tensor:
        """lora_up @ lora_down as one conv [c_out / groups, c_in, kh, kw], times strength * alpha / rank."""
        kernel = self._kernels.get(i)
        if kernel is None or kernel.device != x.device or kernel.dtype != x.dtype:
            m = self._patches[i].module
            up, down = m.up.flatten(1).float(), m.down.flatten(1).float()  # (out/g, rank), (rank, c_in*kh*kw)
            kernel = (up @ down).mul_(self.strength * m.scale).reshape(up.shape[0], *m.down.shape[1:])
            kernel = self._kernels[i] = kernel.to(x.device, x.dtype)
        return kernel

    def _unhook(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._kernels.clear()

    def __repr__(self) -> str:
        te = f", text encoder {len(self.text_encoder.params)} params" if self.text_encoder is not None else ""
        return f"LoraHandle({self.lora.source}, strength={self.strength}, {len(self.params)} params{te})"


@torch.no_grad()
def _merge(model: nn.Module, handle: LoraHandle, only: set[str] | None = None) -> None:
    if handle.strength == 0:
        return
    for patch in handle._patches:
        if patch.branch or (only is not None and patch.param not in only):
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


def _attach(model: nn.Module, lora: LoraWeights, strength: float, patches: list[_Patch]) -> LoraHandle:
    state = _ACTIVE.setdefault(model, _ModelLoras())
    handle = LoraHandle(model, lora, strength, patches)
    for name in handle.params:
        if name not in state.originals:
            state.originals[name] = model.get_parameter(name).detach().to("cpu", copy=True)
    state.handles.append(handle)
    try:
        _merge(model, handle)
        handle._hook(model)
    except BaseException:
        handle._unhook()
        state.handles.remove(handle)
        _rebuild(model, state, handle.params)
        raise
    return handle


def apply_lora(model: nn.Module, lora: LoraWeights | str | Path, strength: float = 1.0, *,
               text_encoder: Any = None, text_encoder_strength: float | None = None) -> LoraHandle:
    """Merge ``W += strength * scale * up @ down`` into model's weights; stacks with LoRAs already applied.

    ``text_encoder`` (a `cascade_lab.models.clip.TextEncoder` or its transformers CLIP-G model) receives the
    file's text-encoder LoRA the same way, at ``text_encoder_strength`` (default ``strength``; ComfyUI's
    LoraLoader ``strength_clip``); without it that part is set aside with a warning (``text_encoder=False``:
    the caller applies it with :func:`apply_text_encoder_lora`). Every part is checked before anything changes.
    """
    if not isinstance(lora, LoraWeights):
        lora = load_lora_file(lora)
    patches = lora.patches(model)  # raises before anything changes
    given = text_encoder is not None and text_encoder is not False
    text_model = getattr(text_encoder, "model", text_encoder) if given else None
    te_patches = lora.text_encoder_patches(text_model) if text_model is not None else []
    _warn_set_aside(lora, text_encoder is not None)
    handle = _attach(model, lora, strength, patches)
    handle._text_encoder_follows = text_encoder_strength is None
    if te_patches and text_model is not None:
        te_strength = strength if text_encoder_strength is None else text_encoder_strength
        try:
            handle.text_encoder = _attach(text_model, lora, te_strength, te_patches)
        except BaseException:
            handle.remove()
            raise
    return handle


def apply_text_encoder_lora(text_encoder: Any, lora: LoraWeights | str | Path, strength: float = 1.0) -> LoraHandle:
    """Merge only the text-encoder part of ``lora`` into CLIP-G (a `TextEncoder` or its transformers model), as
    ComfyUI's LoraLoader patches its CLIP output apart from its MODEL output."""
    if not isinstance(lora, LoraWeights):
        lora = load_lora_file(lora)
    text_model = getattr(text_encoder, "model", text_encoder)
    return _attach(text_model, lora, strength, lora.text_encoder_patches(text_model))


def _warn_set_aside(lora: LoraWeights, with_text_encoder: bool) -> None:
    """One warning naming every part of the file that is not applied."""
    parts = []
    if lora.text_encoder_modules and not with_text_encoder:
        parts.append(f"{len(lora.text_encoder_modules)} text-encoder LoRA modules (pass text_encoder= to "
                     "apply_lora to merge them into CLIP-G)")
    if lora.embeddings:
        names = sorted({k.split(".")[1] if k.startswith("bundle_emb.") else "embeddings" for k in lora.embeddings})
        parts.append(f"{len(lora.embeddings)} token-embedding tensors ({', '.join(names)}: new tokens for CLIP-G's "
                     "vocabulary, official ReToken 'embeddings.indices' or OneTrainer 'bundle_emb.<placeholder>')")
    if parts:
        warnings.warn(
            f"{lora.source}: {' and '.join(parts)} were not applied; prompts using what they trained will not "
            "match the training.",
            stacklevel=3,
        )


def active_loras(model: nn.Module) -> list[LoraHandle]:
    """The LoRAs merged into model, in application order."""
    return list(_ACTIVE.get(model, _ModelLoras()).handles)


def unload_all(model: nn.Module) -> None:
    """Remove every LoRA: all touched parameters get their base weights back, bit for bit."""
    state = _ACTIVE.get(model)
    if state is not None:
        for handle in state.handles:
            handle._unhook()
        state.handles.clear()
        _rebuild(model, state, list(state.originals))
