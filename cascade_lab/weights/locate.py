"""Where each file of a variant comes from, in order: explicit paths and folders, a ComfyUI ``models/``
tree, the Hugging Face Hub cache, and finally a download of just the missing files.

Nothing is downloaded when ``HF_HUB_OFFLINE`` is set or ``download=False``; then every missing file is
reported at once, with every place looked and the command that fetches it. Environment variables are
read at call time (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``CASCADE_LAB_COMFYUI``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..registry import Variant, VariantFile
from .comfyui_paths import ENV_COMFYUI, ComfyUIFolders, comfyui_folders, comfyui_models_dir

__all__ = ["ENV_COMFYUI", "Located", "WeightsNotFoundError", "comfyui_models_dir", "find_files", "locate"]

# ComfyUI folder kind searched per component (see comfyui_paths: unet/diffusion_models, text_encoders/clip, ...)
COMFYUI_KINDS: dict[str, str] = {
    "stage_c": "diffusion_models",
    "stage_b": "diffusion_models",
    "stage_a": "vae",
    "effnet": "vae",
    "previewer": "vae",
    "text_encoder": "text_encoders",
    "image_encoder": "clip_vision",
    "controlnet_canny": "controlnet",
    "controlnet_inpainting": "controlnet",
    "controlnet_super_resolution": "controlnet",
}
# names a file may carry in a ComfyUI folder besides its Hub name (checked by header before use)
COMFYUI_NAMES: dict[str, tuple[str, ...]] = {
    "stage_a": ("stable_cascade_stage_a.safetensors",),
    "effnet": ("stable_cascade_effnet_encoder.safetensors",),
    "previewer": ("stable_cascade_previewer.safetensors",),
    "text_encoder": ("stable_cascade_text_encoder.safetensors", "stable_cascade_clip_g.safetensors",
                     "text_encoder.safetensors", "model.safetensors"),
    "image_encoder": ("stable_cascade_image_encoder.safetensors", "clip_vision_l.safetensors",
                      "image_encoder.safetensors", "model.safetensors"),
    "controlnet_canny": ("stable_cascade_canny.safetensors",),
    "controlnet_inpainting": ("stable_cascade_inpainting.safetensors",),
    "controlnet_super_resolution": ("stable_cascade_super_resolution.safetensors",),
}
# ComfyUI's all-in-one checkpoints (models/checkpoints/, comfyui_checkpoints/ on the Hub) and what they bundle:
# stable_cascade_stage_c = Stage C + CLIP-G + EfficientNet + previewer + CLIP vision, _stage_b = Stage B + Stage A
CHECKPOINT_OF = {"stage_c": "stage_c", "text_encoder": "stage_c", "effnet": "stage_c", "previewer": "stage_c",
                 "image_encoder": "stage_c", "stage_b": "stage_b", "stage_a": "stage_b"}
# what detect() must find in a ComfyUI file of a component, when it is not the component's own name:
# (detected kind, its variant)
DETECTED_AS: dict[str, tuple[str, str]] = {
    "controlnet_canny": ("controlnet", "canny"),
    "controlnet_inpainting": ("controlnet", "inpainting"),
    "controlnet_super_resolution": ("controlnet", "super_resolution"),
}
# small files a transformers-format component needs next to its weights (config, tokenizer)
COMPANIONS: dict[str, tuple[str, ...]] = {
    "text_encoder": ("text_encoder/config.json", "tokenizer/*"),
    "image_encoder": ("image_encoder/config.json",),
}


class WeightsNotFoundError(FileNotFoundError):
    """Some files of a variant are nowhere to be found; the message lists each with what to do."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Located:
    """One resolved file: the component, its path and where it was found."""

    component: str
    path: Path
    origin: str  # "explicit", "folder", "comfyui", "hf_cache", "download"

    @property
    def folder(self) -> Path:
        """The folder to hand to a transformers-style loader (holds config.json for encoders)."""
        return self.path.parent


@dataclass
class _Search:
    """What was tried for one file, for the error message."""

    component: str
    file: VariantFile
    looked: list[str] = field(default_factory=list)


def hf_cache_dir() -> Path:
    """The Hub cache folder as huggingface_hub computes it, read from the environment now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


_HUB_PROBE: dict[str, str | None] = {}  # endpoint -> why it cannot be reached (None: reachable), once per process


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached from here (one TCP connection to its endpoint, ``timeout``
    seconds, remembered for the process), or None when it can. Without this a download retries for minutes."""
    from urllib.parse import urlsplit

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if endpoint not in _HUB_PROBE:
        import socket

        parts = urlsplit(endpoint)
        host, port = parts.hostname or "huggingface.co", parts.port or (443 if parts.scheme != "http" else 80)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                _HUB_PROBE[endpoint] = None
        except OSError as exc:
            _HUB_PROBE[endpoint] = (f"{host}:{port} cannot be reached ({exc.strerror or exc}); no network? Set "
                                    "HF_HUB_OFFLINE=1 to skip this check")
    return _HUB_PROBE[endpoint]


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def hub_path(f: VariantFile) -> str:
    """The file's path inside its Hub repository."""
    return f"{f.subfolder}/{f.filename}" if f.subfolder else f.filename


def fetch_command(f: VariantFile) -> str:
    """The shell command that downloads ``f`` into the Hub cache."""
    try:
        import huggingface_hub

        major = int(huggingface_hub.__version__.split(".")[0])
    except Exception:  # pragma: no cover - huggingface_hub is a dependency
        major = 1
    cli = "hf" if major >= 1 else "huggingface-cli"  # huggingface-cli was removed in huggingface_hub 1.0
    if "*" in f.filename:
        return f"{cli} download {f.repo_id} --include '{hub_path(f)}'"
    return f"{cli} download {f.repo_id} {hub_path(f)}"


def resolve_variant(variant: str | Variant) -> Variant:
    if isinstance(variant, Variant):
        return variant
    from ..plugins import get_variant

    return get_variant(variant)


def locate(
    variant: str | Variant,
    *,
    components: Iterable[str] | None = None,
    files: Mapping[str, str | os.PathLike[str]] | None = None,
    folders: Sequence[str | os.PathLike[str]] = (),
    comfyui: str | os.PathLike[str] | None = None,
    extra_model_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    download: bool = True,
) -> dict[str, Located]:
    """Find (or fetch) every file of ``variant`` that ``components`` names (default: all of them).

    ``files`` maps a component to an explicit file; ``folders`` are searched for the Hub names (a local
    clone of the repositories works); ``comfyui`` (or ``$CASCADE_LAB_COMFYUI``) is a ComfyUI install or
    its ``models/`` folder, searched with its ``extra_model_paths.yaml`` and the ones ``extra_model_paths``
    names: single files under their Hub or ComfyUI names first, then ComfyUI's all-in-one
    ``checkpoints/stable_cascade_stage_{c,b}*.safetensors`` for what they bundle. Raises
    :class:`WeightsNotFoundError` naming everything still missing.
    """
    v = resolve_variant(variant)
    wanted = list(v.files) if components is None else list(components)
    unknown = [c for c in wanted if c not in v.files]
    if unknown:
        raise KeyError(f"variant {v.name!r} has no component {', '.join(map(repr, unknown))}; "
                       f"it has {', '.join(v.files) or 'no files (it builds its models)'}")
    return find_files(v, wanted, files=files, folders=folders, comfyui=comfyui,
                      extra_model_paths=extra_model_paths, download=download,
                      title=f"Stable Cascade variant {v.name!r}",
                      fix="or pass files={'stage_c': '/path/to/file.safetensors', ...}")


def find_files(
    v: Variant,
    wanted: Sequence[str],
    *,
    files: Mapping[str, str | os.PathLike[str]] | None,
    folders: Sequence[str | os.PathLike[str]],
    comfyui: str | os.PathLike[str] | None,
    download: bool,
    title: str,
    fix: str,
    extra_model_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
) -> dict[str, Located]:
    """The search behind :func:`locate` for the files of ``v`` that ``wanted`` names; ``title`` opens the
    error message and ``fix`` ends it (how to give the file explicitly)."""
    files = dict(files or {})
    comfy = comfyui_folders(comfyui, extra_model_paths)
    cache = hf_cache_dir()
    found: dict[str, Located] = {}
    missing: list[_Search] = []
    for comp in wanted:
        f = v.files[comp]
        search = _Search(comp, f)
        hit = (_explicit(comp, files) or _in_folders(comp, f, folders, search)
               or _in_comfyui(comp, f, v, comfy, search) or _in_hf_cache(comp, f, cache, search))
        if hit is not None:
            found[comp] = hit
        else:
            missing.append(search)
    offline = hf_offline()
    unreachable = None
    if missing and download and not offline:
        unreachable = hub_unreachable()
    if unreachable is not None:  # one quick probe instead of minutes of retries per file
        for search in missing:
            search.looked.append(f"the Hub (not tried: {unreachable})")
    elif missing and download and not offline:
        still = []
        for search in missing:
            try:
                found[search.component] = _download(search.component, search.file, cache)
            except Exception as exc:  # network or auth errors are reported with the rest
                search.looked.append(f"download failed: {type(exc).__name__}: {exc}")
                still.append(search)
        missing = still
    missing += _missing_companions(list(wanted), v, found, cache, download and not offline and unreachable is None)
    if missing:
        raise WeightsNotFoundError(_message(title, fix, missing, offline, download, comfy))
    return {c: found[c] for c in wanted}


def _explicit(comp: str, files: Mapping[str, str | os.PathLike[str]]) -> Located | None:
    if comp not in files:
        return None
    path = Path(files[comp]).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"{comp}: the file given for it does not exist: {path}")
    return Located(comp, path, "explicit")


def _in_folders(comp: str, f: VariantFile, folders: Sequence[str | os.PathLike[str]],
                search: _Search) -> Located | None:
    for folder in folders:
        base = Path(folder).expanduser()
        candidates = [base / hub_path(f)] + ([base / f.filename] if f.subfolder else [])
        for path in candidates:
            if path.is_file():
                return Located(comp, path, "folder")
            search.looked.append(str(path))
    return None


def _in_comfyui(comp: str, f: VariantFile, v: Variant, comfy: ComfyUIFolders, search: _Search) -> Located | None:
    if comfy.empty:
        return None
    size = _size_of(comp, v)
    for kind, name in comfyui_candidates(comp, f, size):
        for folder in comfy.folders(kind):
            path = folder / name
            if not path.is_file():
                search.looked.append(str(path))
                continue
            holds = _holds(path, comp, size)
            if holds is True:
                return Located(comp, path, "comfyui")
            search.looked.append(f"{path} (skipped: it holds {holds})")
    return None


def _size_of(comp: str, v: Variant) -> str | None:
    """``full`` / ``lite`` when the variant fixes the size of the stage ``comp`` is or is bundled with."""
    stage = CHECKPOINT_OF.get(comp)
    size = getattr(v, comp, None) if comp in ("stage_c", "stage_b") else None
    if stage is not None and size is None:
        size = getattr(v, stage, None)
    return size if size in ("full", "lite") else None


def comfyui_candidates(comp: str, f: VariantFile, size: str | None = None) -> list[tuple[str, str]]:
    """``(folder kind, file name)`` pairs to try for ``comp`` in a ComfyUI tree, best first: the Hub name and
    ComfyUI's names as single files, then the all-in-one checkpoints that bundle it (``size`` first)."""
    kind = COMFYUI_KINDS.get(comp)
    if kind is None:
        return []
    sizes = ["_lite", ""] if size == "lite" else ["", "_lite"]
    dtypes = ["_bf16", ""] if "_bf16" in f.filename else ["", "_bf16"]  # the file's own dtype first
    suffixes = [s + d for s in sizes for d in dtypes]
    if comp in ("stage_c", "stage_b"):  # a stage file of the other size is another model
        suffixes = [x for x in suffixes if x.startswith("_lite") == (size == "lite")]
    names = [f.filename] if not f.subfolder else []
    if comp in ("stage_c", "stage_b"):
        names += [f"{comp}{x}.safetensors" for x in suffixes] + [f"stable_cascade_{comp}{x}.safetensors"
                                                                 for x in suffixes]
    names += COMFYUI_NAMES.get(comp, ())
    pairs = [(kind, n) for n in dict.fromkeys(names)]
    stage = CHECKPOINT_OF.get(comp)
    if stage is not None:
        pairs += [("checkpoints", f"stable_cascade_{stage}{x}.safetensors") for x in suffixes]
    return pairs


def _holds(path: Path, comp: str, size: str | None = None) -> bool | str:
    """True when the file's header shows component ``comp`` (of ``size``, when given), else what it holds."""
    from .detect import detect
    from .safetensors_io import WeightsFileError

    try:
        d = detect(path)
    except WeightsFileError as exc:
        return f"an unreadable file: {exc}"
    kind, variant = DETECTED_AS.get(comp, (comp, None))
    if comp in ("stage_c", "stage_b"):
        variant = size
    hit = d.components.get(kind)
    return True if hit is not None and variant in (None, hit.variant) else d.describe()


def _in_hf_cache(comp: str, f: VariantFile, cache: Path, search: _Search) -> Located | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(f.repo_id, hub_path(f), cache_dir=cache)
    if isinstance(hit, str) and os.path.isfile(hit):
        return Located(comp, Path(hit), "hf_cache")
    repo_dir = cache / f"models--{f.repo_id.replace('/', '--')}"
    search.looked.append(f"Hugging Face cache {repo_dir} (snapshot of refs/main)")
    return None


def _download(comp: str, f: VariantFile, cache: Path) -> Located:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(f.repo_id, f.filename, subfolder=f.subfolder or None, cache_dir=cache)
    return Located(comp, Path(path), "download")


def _missing_companions(wanted: list[str], v: Variant, found: dict[str, Located], cache: Path,
                        may_download: bool) -> list[_Search]:
    """Config and tokenizer files of transformers-format encoders found in a Hub snapshot or clone."""
    out = []
    for comp in wanted:
        hit = found.get(comp)
        if hit is None or comp not in COMPANIONS or not v.files[comp].subfolder:
            continue
        root = hit.path.parent.parent  # <snapshot or clone>/<subfolder>/<file>
        if hit.path.parent.name != v.files[comp].subfolder:
            continue  # a single file (ComfyUI, explicit): its loader brings its own config
        absent = [p for p in COMPANIONS[comp] if not _companion_present(root, p)]
        if absent and may_download and hit.origin in ("hf_cache", "download"):
            try:
                _download_companions(v.files[comp], absent, cache)
            except Exception as exc:
                absent = [f"{p} (download failed: {type(exc).__name__}: {exc})" for p in absent]
            else:
                absent = [p for p in absent if not _companion_present(root, p)]
        for pattern in absent:
            f = v.files[comp]
            name = pattern.split(" ")[0]
            search = _Search(f"{comp} ({name})", VariantFile(name.rsplit("/", 1)[-1], f.repo_id,
                                                              name.rsplit("/", 1)[0]))
            search.looked.append(str(root / pattern))
            out.append(search)
    return out


def _companion_present(root: Path, pattern: str) -> bool:
    if pattern.endswith("/*"):
        d = root / pattern[:-2]
        return d.is_dir() and any(d.iterdir())
    return (root / pattern).is_file()


def _download_companions(f: VariantFile, patterns: list[str], cache: Path) -> Any:
    from huggingface_hub import snapshot_download

    return snapshot_download(f.repo_id, allow_patterns=patterns, cache_dir=cache)


def _message(title: str, fix: str, missing: list[_Search], offline: bool, download: bool,
             comfy: ComfyUIFolders) -> str:
    why = ("HF_HUB_OFFLINE is set, so nothing was downloaded" if offline else
           "downloading was turned off" if not download else
           "the Hugging Face Hub cannot be reached" if any(p.startswith("the Hub (not tried") for s in missing
                                                          for p in s.looked) else "the download failed")
    lines = [f"{title}: {len(missing)} file(s) not found ({why})."]
    for s in missing:
        lines.append(f"  {s.component}: {hub_path(s.file)} from {s.file.repo_id}")
        for place in s.looked:
            lines.append(f"      looked in {place}")
        lines.append(f"      fetch it with: {fetch_command(s.file)}")
    hints = []
    if comfy.empty:
        hints.append(f"point ${ENV_COMFYUI} (or comfyui=) at a ComfyUI install that has them")
    if offline:
        hints.append("unset HF_HUB_OFFLINE to let cascade_lab download them")
    hints.append(fix)
    lines.append("  To fix: run the commands above, " + ", ".join(hints) + ".")
    return "\n".join(lines)
