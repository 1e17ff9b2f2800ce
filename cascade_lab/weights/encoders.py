"""Stable Cascade's CLIP encoders from single safetensors files, and the tokenizer they need (spec §5.3).

ComfyUI keeps the text and image encoders as bare files (``models/text_encoders``, ``models/clip``,
``models/clip_vision``) or as the ``text_encoder.`` / ``clip_l_vision.`` sections of its all-in-one Stage C
checkpoint, with no config.json. The model is built on the meta device from a built-in config
(:func:`~cascade_lab.models.clip.clip_g_text_config`, :func:`~cascade_lab.models.clip.clip_l_vision_config`),
checked against the header and filled like a stage (:mod:`.loader`). The CLIP BPE tokenizer is looked for
locally: an explicit folder, a ``tokenizer/`` next to the file, the Hub cache, a ComfyUI install.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .convert import plan_official
from .detect import LABELS, Component, Detection, classify, detect_shapes
from .loader import WrongStageError
from .safetensors_io import Header, Recipe, read_header

if TYPE_CHECKING:
    import torch
    from torch import nn

TOKENIZER_REPOS = ("stabilityai/stable-cascade", "stabilityai/stable-cascade-prior")
COMFYUI_TOKENIZER = Path("comfy") / "sd1_tokenizer"  # ComfyUI's bundled CLIP BPE (the vocab CLIP-G shares)

# kind -> (class name, the keys that give the tower's width, its layer-key pattern, the other tower's keys)
TOWERS: dict[str, tuple[str, tuple[str, ...], re.Pattern[str], tuple[str, ...]]] = {
    "text_encoder": ("TextEncoder", ("text_model.final_layer_norm.weight",),
                     re.compile(r"^text_model\.encoder\.layers\.(\d+)\."), ("vision_model.", "visual_projection.")),
    "image_encoder": ("ImageEncoder", ("vision_model.post_layernorm.weight", "vision_model.pre_layrnorm.weight"),
                      re.compile(r"^vision_model\.encoder\.layers\.(\d+)\."), ("text_model.", "text_projection.")),
}
# width -> which CLIP that is, for errors that say what a wrong file holds
KNOWN_WIDTHS: dict[str, dict[int, str]] = {
    "text_encoder": {512: "CLIP ViT-B", 768: "CLIP ViT-L/14 (CLIP-L, the clip_l of SD 1.x/SDXL/SD3)",
                     1024: "OpenCLIP ViT-H/14 (SD 2.x)", 1280: "CLIP ViT-bigG/14 (CLIP-G)"},
    "image_encoder": {768: "CLIP ViT-B", 1024: "CLIP ViT-L/14", 1280: "OpenCLIP ViT-H/14 (ComfyUI clip_vision_h)",
                      1664: "OpenCLIP ViT-bigG/14 (ComfyUI clip_vision_g)"},
}


class TokenizerNotFoundError(FileNotFoundError):
    """No local CLIP tokenizer for a text encoder file; the message lists every place looked."""

    def __str__(self) -> str:
        return str(self.args[0])


# ------------------------------------------------------------------------------------------- weights


def transformers_folder(path: str | os.PathLike[str]) -> Path | None:
    """The transformers export behind ``path`` (a folder, or a file next to config.json), else None."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path
    return path.parent if (path.parent / "config.json").is_file() else None


def load_clip_file(
    kind: str,
    path: str | os.PathLike[str],
    config: Any,
    *,
    prefix: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    mmap: bool = True,
) -> nn.Module:
    """A ``CLIPTextModelWithProjection`` (``kind="text_encoder"``) or ``CLIPVisionModelWithProjection``
    (``"image_encoder"``) for ``config``, built on meta and filled from ``path`` (keys under ``prefix``,
    None: the section detection finds). ``dtype=None`` keeps the stored dtype. Never returns random weights."""
    import torch
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from .loader import Source, _main_dtype, check_keys, skip_init
    from .safetensors_io import read_tensors

    if kind not in TOWERS:
        raise ValueError(f"unknown encoder {kind!r}; choose 'text_encoder' or 'image_encoder'")
    header = read_header(path)
    component = _component(kind, header, prefix)
    plan = {k: r for k, r in plan_official(header.keys(), kind, component.prefix).items()
            if not k.startswith(TOWERS[kind][3]) and k != "logit_scale"}  # a full CLIPModel holds both towers
    _check_tower(kind, header, component, plan, config)
    stored = _main_dtype(header, plan)
    target = dtype if dtype is not None else (getattr(torch, stored) if stored else None)
    cls = CLIPTextModelWithProjection if kind == "text_encoder" else CLIPVisionModelWithProjection
    with torch.device("meta"), skip_init():
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source = Source(header.path, header, Detection(header.path, {kind: component}), component)
    check_keys(source, plan, expected, built=f"{cls.__name__} from {type(config).__name__}(hidden_size="
               f"{config.hidden_size}, num_hidden_layers={config.num_hidden_layers})")
    state = dict(read_tensors(header, plan, dtype=target, device=device, mmap=mmap))
    model.load_state_dict(state, strict=True, assign=True)
    _rebuild_position_ids(model, device)
    return model.eval()


def _rebuild_position_ids(model: nn.Module, device: Any) -> None:
    """CLIP's non-persistent ``position_ids`` buffers were made on meta and are in no file: make them here."""
    import torch

    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        owner, _, leaf = name.rpartition(".")
        if leaf != "position_ids":
            raise RuntimeError(f"{type(model).__name__} buffer {name} is not in the file and cannot be rebuilt")
        value = torch.arange(buf.shape[-1], device=device).expand(buf.shape)  # (1, positions)
        model.get_submodule(owner).register_buffer(leaf, value, persistent=False)


def _component(kind: str, header: Header, prefix: str | None) -> Component:
    """The section of ``header`` holding ``kind``: the one detection finds, or the keys under ``prefix``."""
    shapes = {k: t.shape for k, t in header.tensors.items()}
    if prefix is None:
        found = detect_shapes(shapes)
        if kind in found:
            return found[kind]
        if kind == "image_encoder" and any(k.startswith("vision_model.") for k in shapes):
            return Component(kind)  # a full CLIPModel: detection reports its text tower first
        what = "; ".join(c.describe() for c in found.values()) or "no Stable Cascade model or CLIP tower"
        other = next((c for c in found.values() if c.kind in TOWERS), None)
        hint = f"; load it with {TOWERS[other.kind][0]}.from_file" if other is not None else ""
        raise WrongStageError(f"{header.path} holds no {LABELS[kind]}: it holds {what}{hint}")
    sub = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    if not sub:
        prefixes = sorted({k.split(".", 1)[0] + "." for k in shapes})
        raise WrongStageError(f"{header.path}: no key starts with prefix {prefix!r}; the file's top-level "
                              f"prefixes are {', '.join(prefixes[:10])}")
    comp = classify(sub, prefix)
    if comp is not None and comp.kind == kind:
        return comp
    if kind == "image_encoder" and any(k.startswith("vision_model.") for k in sub):
        return Component(kind, prefix=prefix)
    what = comp.describe() if comp is not None else "no Stable Cascade model or CLIP tower"
    raise WrongStageError(f"{header.path}: the keys under {prefix!r} are not a {LABELS[kind]}: they hold {what}")


def _check_tower(kind: str, header: Header, component: Component, plan: Mapping[str, Recipe], config: Any) -> None:
    """Refuse another CLIP (e.g. CLIP-L text given for CLIP-G) by width and depth, from the header alone."""
    name, width_keys, layer_key, _ = TOWERS[kind]
    width = next((plan[k].shape(header)[0] for k in width_keys if k in plan), None)
    layers = len({m[1] for k in plan if (m := layer_key.match(k))})
    if width is None or (width, layers) == (config.hidden_size, config.num_hidden_layers):
        return  # no width key: check_keys lists what is missing
    where = f"{header.path}" + (f" (keys under {component.prefix!r})" if component.prefix else "")
    wanted = _tower_name(kind, config.hidden_size, config.num_hidden_layers)
    repo = "stable-cascade/text_encoder" if kind == "text_encoder" else "stable-cascade-prior/image_encoder"
    raise WrongStageError(
        f"{where} holds {_tower_name(kind, width, layers)}, not {wanted} as {name} needs (Stable Cascade "
        f"uses the CLIP ViT-bigG/14 text tower and the CLIP ViT-L/14 vision tower). Pass the right file, e.g. "
        f"stabilityai/{repo}/model.safetensors, or config= for another size")


def _tower_name(kind: str, width: int, layers: int) -> str:
    label = KNOWN_WIDTHS[kind].get(width, "CLIP")
    tower = "text encoder" if kind == "text_encoder" else "vision encoder"
    return f"a {label} {tower} (width {width}, {layers} layers)"


# ----------------------------------------------------------------------------------------- tokenizer


def find_tokenizer(
    path: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    *,
    comfyui: str | os.PathLike[str] | None = None,
) -> Path:
    """The CLIP tokenizer folder for the text encoder file ``path``, looked for in this order:

    ``tokenizer_path``; a ``tokenizer/`` folder next to the file (or next to its ``text_encoder/`` folder);
    ``tokenizer/`` in the Hub cache snapshot of ``stabilityai/stable-cascade`` or ``-prior`` (local files
    only; ``HF_HOME``/``HF_HUB_CACHE`` honoured); ComfyUI's ``comfy/sd1_tokenizer`` (the install that
    ``comfyui``/``$CASCADE_LAB_COMFYUI`` names, or the one whose ``models/`` holds the file). Raises
    :class:`TokenizerNotFoundError` naming every place and the command that fetches it.
    """
    from huggingface_hub import try_to_load_from_cache

    from ..registry import VariantFile
    from .locate import ENV_COMFYUI, fetch_command, hf_cache_dir

    if tokenizer_path is not None:
        given = Path(tokenizer_path).expanduser()
        if _is_tokenizer(given):
            return given
        raise TokenizerNotFoundError(f"tokenizer_path {given}: no CLIP tokenizer there (it needs vocab.json and "
                                     f"merges.txt, or tokenizer.json)")
    path = Path(path).expanduser().resolve()
    looked: list[str] = []
    hub_layout = path.parent.name == "text_encoder"  # <repo>/text_encoder/<file> next to <repo>/tokenizer/
    for folder in [path.parent / "tokenizer"] + ([path.parent.parent / "tokenizer"] if hub_layout else []):
        if _is_tokenizer(folder):
            return folder
        looked.append(str(folder))
    cache = hf_cache_dir()
    for repo in TOKENIZER_REPOS:
        for name in ("tokenizer/vocab.json", "tokenizer/tokenizer.json"):
            hit = try_to_load_from_cache(repo, name, cache_dir=cache)
            if isinstance(hit, str) and _is_tokenizer(Path(hit).parent):
                return Path(hit).parent
        looked.append(f"Hugging Face cache {cache / ('models--' + repo.replace('/', '--'))} (tokenizer/ of the "
                      f"refs/main snapshot)")
    for folder in _comfyui_tokenizers(path, comfyui):
        if _is_tokenizer(folder):
            return folder
        looked.append(str(folder))
    fetch = fetch_command(VariantFile("*", TOKENIZER_REPOS[0], "tokenizer"))
    hint = "" if comfyui or os.environ.get(ENV_COMFYUI) else f", or point ${ENV_COMFYUI} at a ComfyUI install"
    raise TokenizerNotFoundError("\n".join([
        f"no CLIP tokenizer found for the text encoder {path} (a single file brings none). Looked in:",
        *(f"  {place}" for place in looked),
        f"Fetch it with: {fetch}",
        f"or pass tokenizer_path= (a folder with vocab.json and merges.txt, e.g. ComfyUI's comfy/sd1_tokenizer)"
        f"{hint}.",
    ]))


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """A CLIP tokenizer from local files: its own class when tokenizer_config.json names one, else CLIPTokenizer."""
    from transformers import AutoTokenizer, CLIPTokenizer

    folder = Path(folder)
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _is_tokenizer(folder: Path) -> bool:
    return ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or (
        folder / "tokenizer.json").is_file()


def _comfyui_tokenizers(path: Path, comfyui: str | os.PathLike[str] | None) -> list[Path]:
    """``comfy/sd1_tokenizer`` of the named ComfyUI install (root or its models/) and of the file's own."""
    from .locate import ENV_COMFYUI, comfyui_models_dir

    places = []
    models = comfyui_models_dir(comfyui)
    if models is not None:
        root = Path(comfyui if comfyui is not None else os.environ.get(ENV_COMFYUI, "")).expanduser()
        places += [root / COMFYUI_TOKENIZER, models.parent / COMFYUI_TOKENIZER]
    places += [p.parent / COMFYUI_TOKENIZER for p in path.parents if p.name == "models"]
    return _unique(places)


def _unique(paths: list[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))
