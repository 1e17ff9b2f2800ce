"""ComfyUI's model folders as ComfyUI searches them: an install's ``models/<kind>/`` plus ``extra_model_paths.yaml``.

Follows ComfyUI's ``folder_paths`` and ``utils/extra_config.py``: a folder kind (``checkpoints``,
``diffusion_models`` with its legacy name ``unet``, ``text_encoders`` with its legacy name ``clip``, ``vae``,
``controlnet``, ``loras``, ``clip_vision``, ...) is an ordered list of folders, the install's own first; every
section of an ``extra_model_paths.yaml`` (``comfyui:``, ``a111:``, ...) appends its folders, or puts them first
with ``is_default: true``. A model name, as a loader node's widget holds it, is a path relative to one of those
folders (``sub/model.safetensors``); the first folder holding it wins.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_COMFYUI = "CASCADE_LAB_COMFYUI"  # a ComfyUI install (or its models/ folder)
ENV_EXTRA_PATHS = "CASCADE_LAB_COMFYUI_EXTRA_PATHS"  # extra_model_paths.yaml files, os.pathsep-separated
EXTRA_CONFIG = "extra_model_paths.yaml"  # what ComfyUI reads next to its main.py

LEGACY_KINDS = {"unet": "diffusion_models", "clip": "text_encoders"}  # ComfyUI's map_legacy
# models/ sub-folders of a kind when they are not just the kind's own name (folder_paths.py)
DEFAULT_FOLDERS: dict[str, tuple[str, ...]] = {
    "diffusion_models": ("unet", "diffusion_models"),
    "text_encoders": ("text_encoders", "clip"),
    "controlnet": ("controlnet", "t2i_adapter"),
}
# the folder kind each model-loading node of a Stable Cascade workflow reads its name widget from
LOADER_KINDS: dict[str, str] = {
    "CheckpointLoaderSimple": "checkpoints",
    "unCLIPCheckpointLoader": "checkpoints",
    "UNETLoader": "diffusion_models",
    "CLIPLoader": "text_encoders",
    "VAELoader": "vae",
    "ControlNetLoader": "controlnet",
    "LoraLoader": "loras",
    "LoraLoaderModelOnly": "loras",
    "CLIPVisionLoader": "clip_vision",
}


def folder_kind(kind: str) -> str:
    """ComfyUI's current name of a folder kind (``unet`` -> ``diffusion_models``, ``clip`` -> ``text_encoders``)."""
    return LEGACY_KINDS.get(kind, kind)


@dataclass(frozen=True)
class ComfyUIFolders:
    """Where one ComfyUI setup keeps its models: the install's ``models/`` and the extra folders per kind."""

    models_dir: Path | None = None
    configs: tuple[Path, ...] = ()  # the extra_model_paths.yaml files read
    first: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)  # is_default sections, per kind
    last: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)  # the other sections, per kind

    @property
    def empty(self) -> bool:
        return self.models_dir is None and not self.first and not self.last

    def folders(self, kind: str) -> list[Path]:
        """Every folder of ``kind`` in ComfyUI's search order (duplicates dropped)."""
        kind = folder_kind(kind)
        own = [self.models_dir / sub for sub in DEFAULT_FOLDERS.get(kind, (kind,))] if self.models_dir else []
        return list(dict.fromkeys([*self.first.get(kind, ()), *own, *self.last.get(kind, ())]))

    def describe(self) -> str:
        parts = [f"models folder {self.models_dir}" if self.models_dir else "no ComfyUI install"]
        parts += [f"extra paths {p}" for p in self.configs]
        return ", ".join(parts)


def comfyui_root(comfyui: str | os.PathLike[str] | None = None) -> Path | None:
    """The install named by ``comfyui`` or ``$CASCADE_LAB_COMFYUI`` (its root, also when given its models/)."""
    root = comfyui if comfyui is not None else os.environ.get(ENV_COMFYUI)
    if not root:
        return None
    path = Path(root).expanduser()
    return path if (path / "models").is_dir() or path.name != "models" else path.parent


def comfyui_models_dir(comfyui: str | os.PathLike[str] | None = None) -> Path | None:
    """The ``models/`` folder of a ComfyUI install given by ``comfyui`` or ``$CASCADE_LAB_COMFYUI``."""
    root = comfyui if comfyui is not None else os.environ.get(ENV_COMFYUI)
    if not root:
        return None
    path = Path(root).expanduser()
    return path / "models" if (path / "models").is_dir() else path


def comfyui_folders(
    comfyui: str | os.PathLike[str] | None = None,
    extra_model_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
) -> ComfyUIFolders:
    """The folders of the install ``comfyui`` (or ``$CASCADE_LAB_COMFYUI``) with its own extra_model_paths.yaml,
    plus the yaml files ``extra_model_paths`` (or ``$CASCADE_LAB_COMFYUI_EXTRA_PATHS``) names, in that order."""
    models = comfyui_models_dir(comfyui)
    root = comfyui_root(comfyui)
    configs: list[Path] = []
    if root is not None and (root / EXTRA_CONFIG).is_file():
        configs.append(root / EXTRA_CONFIG)
    if extra_model_paths is None:
        extra_model_paths = [p for p in os.environ.get(ENV_EXTRA_PATHS, "").split(os.pathsep) if p]
    elif isinstance(extra_model_paths, (str, os.PathLike)):
        extra_model_paths = [extra_model_paths]
    for given in extra_model_paths:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"extra_model_paths file not found: {path}")
        configs.append(path)
    first: dict[str, list[Path]] = {}
    last: dict[str, list[Path]] = {}
    for config in dict.fromkeys(configs):
        for kind, folder, is_default in read_extra_model_paths(config):
            side = first if is_default else last
            if is_default:  # ComfyUI inserts each is_default folder at the front, so later ones end up first
                side.setdefault(kind, []).insert(0, folder)
            else:
                side.setdefault(kind, []).append(folder)
    return ComfyUIFolders(models, tuple(dict.fromkeys(configs)), {k: tuple(v) for k, v in first.items()},
                          {k: tuple(v) for k, v in last.items()})


def read_extra_model_paths(path: str | os.PathLike[str]) -> list[tuple[str, Path, bool]]:
    """``(kind, folder, is_default)`` for every folder an extra_model_paths.yaml adds, in file order.

    Each top-level section may set ``base_path`` (``~`` and ``$VARS`` expanded; relative to the yaml's folder)
    and ``is_default``; every other key is a folder kind whose value holds one folder per line (a ``|`` block
    for several) or a list, relative to ``base_path`` (else to the yaml's folder).
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e}); ComfyUI's extra_model_paths.yaml format is "
                         f"'<section>:' then 'base_path: ...' and '<kind>: <folder>' lines") from None
    if doc is None:
        return []
    if not isinstance(doc, Mapping):
        raise ValueError(f"{path}: expected sections such as 'comfyui:' with 'base_path:' and folder kinds, "
                         f"got a {type(doc).__name__}")
    here = path.resolve().parent
    out: list[tuple[str, Path, bool]] = []
    for section in doc.values():
        if not isinstance(section, Mapping):
            continue
        conf = dict(section)
        base = conf.pop("base_path", None)
        base_path = None
        if base:
            base_path = Path(os.path.expandvars(os.path.expanduser(str(base))))
            base_path = base_path if base_path.is_absolute() else here / base_path
        is_default = bool(conf.pop("is_default", False))
        for kind, value in conf.items():
            for line in _lines(value):
                folder = Path(os.path.expandvars(os.path.expanduser(line)))
                if not folder.is_absolute():
                    folder = (base_path or here) / folder
                out.append((folder_kind(str(kind)), Path(os.path.normpath(folder)), is_default))
    return out


def _lines(value: Any) -> Iterable[str]:
    items = value if isinstance(value, list) else str(value).split("\n") if value is not None else []
    return [str(item).strip() for item in items if str(item).strip()]


def safe_model_name(name: str) -> str:
    """A workflow's model name as a safe relative path: Windows separators accepted, no way out of the folder."""
    return os.path.relpath(os.path.join("/", name.replace("\\", "/")), "/")


def comfyui_model_path(
    kind: str,
    name: str,
    *,
    comfyui: str | os.PathLike[str] | None = None,
    extra_model_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
) -> Path:
    """The file a ComfyUI loader node's model ``name`` of folder ``kind`` means (``"checkpoints"``, ``"unet"``, a
    node's class name such as ``"UNETLoader"``, ...), searched as ComfyUI does; one error lists every place looked."""
    from .locate import WeightsNotFoundError

    kind = folder_kind(LOADER_KINDS.get(kind, kind))
    setup = comfyui_folders(comfyui, extra_model_paths)
    relative = safe_model_name(name)
    looked = []
    for folder in setup.folders(kind):
        path = folder / relative
        if path.is_file():
            return path
        looked.append(path)
    lines = [f"ComfyUI model {name!r} ({kind}) not found."]
    if setup.empty:
        lines.append(f"  No ComfyUI folders to look in: point ${ENV_COMFYUI} (or comfyui=) at a ComfyUI install "
                     f"or pass extra_model_paths= (an extra_model_paths.yaml).")
    for path in looked:
        lines.append(f"  looked in {path}")
    present = sorted({str(p.relative_to(f)) for f in setup.folders(kind) if f.is_dir()
                      for p in f.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".sft")})
    if present:
        lines.append(f"  {kind} files there: " + ", ".join(present[:12]) + (" ..." if len(present) > 12 else ""))
    lines.append(f"  To fix: put {relative} in one of these folders, or add its folder to an {EXTRA_CONFIG} "
                 f"({setup.describe()}).")
    raise WeightsNotFoundError("\n".join(lines))
