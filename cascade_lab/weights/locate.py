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

ENV_COMFYUI = "CASCADE_LAB_COMFYUI"

# ComfyUI models/ sub-folders searched per component (diffusion_models is the newer name of unet)
COMFYUI_FOLDERS: dict[str, tuple[str, ...]] = {
    "stage_c": ("unet", "diffusion_models"),
    "stage_b": ("unet", "diffusion_models"),
    "stage_a": ("vae",),
    "effnet": ("vae",),
    "previewer": ("vae",),
    "text_encoder": ("text_encoders", "clip"),
    "image_encoder": ("clip_vision",),
    "controlnet_canny": ("controlnet",),
    "controlnet_inpainting": ("controlnet",),
    "controlnet_super_resolution": ("controlnet",),
}
# names a file may carry in a ComfyUI folder besides its Hub name (checked by header before use)
COMFYUI_NAMES: dict[str, tuple[str, ...]] = {
    "text_encoder": ("stable_cascade_text_encoder.safetensors", "stable_cascade_clip_g.safetensors",
                     "text_encoder.safetensors", "model.safetensors"),
    "image_encoder": ("stable_cascade_image_encoder.safetensors", "clip_vision_l.safetensors",
                      "image_encoder.safetensors", "model.safetensors"),
    "controlnet_canny": ("stable_cascade_canny.safetensors",),
    "controlnet_inpainting": ("stable_cascade_inpainting.safetensors",),
    "controlnet_super_resolution": ("stable_cascade_super_resolution.safetensors",),
}
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


def comfyui_models_dir(comfyui: str | os.PathLike[str] | None = None) -> Path | None:
    """The ``models/`` folder of a ComfyUI install given by ``comfyui`` or ``$CASCADE_LAB_COMFYUI``."""
    root = comfyui if comfyui is not None else os.environ.get(ENV_COMFYUI)
    if not root:
        return None
    path = Path(root).expanduser()
    return path / "models" if (path / "models").is_dir() else path


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
    download: bool = True,
) -> dict[str, Located]:
    """Find (or fetch) every file of ``variant`` that ``components`` names (default: all of them).

    ``files`` maps a component to an explicit file; ``folders`` are searched for the Hub names (a local
    clone of the repositories works); ``comfyui`` (or ``$CASCADE_LAB_COMFYUI``) is a ComfyUI install or
    its ``models/`` folder. Raises :class:`WeightsNotFoundError` naming everything still missing.
    """
    v = resolve_variant(variant)
    wanted = list(v.files) if components is None else list(components)
    unknown = [c for c in wanted if c not in v.files]
    if unknown:
        raise KeyError(f"variant {v.name!r} has no component {', '.join(map(repr, unknown))}; "
                       f"it has {', '.join(v.files) or 'no files (it builds its models)'}")
    return find_files(v, wanted, files=files, folders=folders, comfyui=comfyui, download=download,
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
) -> dict[str, Located]:
    """The search behind :func:`locate` for the files of ``v`` that ``wanted`` names; ``title`` opens the
    error message and ``fix`` ends it (how to give the file explicitly)."""
    files = dict(files or {})
    models_dir = comfyui_models_dir(comfyui)
    cache = hf_cache_dir()
    found: dict[str, Located] = {}
    missing: list[_Search] = []
    for comp in wanted:
        f = v.files[comp]
        search = _Search(comp, f)
        hit = (_explicit(comp, files) or _in_folders(comp, f, folders, search)
               or _in_comfyui(comp, f, models_dir, search) or _in_hf_cache(comp, f, cache, search))
        if hit is not None:
            found[comp] = hit
        else:
            missing.append(search)
    offline = hf_offline()
    if missing and download and not offline:
        still = []
        for search in missing:
            try:
                found[search.component] = _download(search.component, search.file, cache)
            except Exception as exc:  # network or auth errors are reported with the rest
                search.looked.append(f"download failed: {type(exc).__name__}: {exc}")
                still.append(search)
        missing = still
    missing += _missing_companions(list(wanted), v, found, cache, download and not offline)
    if missing:
        raise WeightsNotFoundError(_message(title, fix, missing, offline, download, models_dir))
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


def _in_comfyui(comp: str, f: VariantFile, models_dir: Path | None, search: _Search) -> Located | None:
    if models_dir is None:
        return None
    names: tuple[str, ...] = (f.filename,) if not f.subfolder else ()
    names += COMFYUI_NAMES.get(comp, ())
    for sub in COMFYUI_FOLDERS.get(comp, ()):
        for name in names:
            path = models_dir / sub / name
            if not path.is_file():
                search.looked.append(str(path))
                continue
            holds = _holds(path, comp)
            if holds is True:
                return Located(comp, path, "comfyui")
            search.looked.append(f"{path} (skipped: it holds {holds})")
    return None


def _holds(path: Path, comp: str) -> bool | str:
    """True when the file's header shows component ``comp``, else a description of what it holds."""
    from .detect import detect
    from .safetensors_io import WeightsFileError

    try:
        d = detect(path)
    except WeightsFileError as exc:
        return f"an unreadable file: {exc}"
    kind, variant = DETECTED_AS.get(comp, (comp, None))
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
             models_dir: Path | None) -> str:
    why = ("HF_HUB_OFFLINE is set, so nothing was downloaded" if offline else
           "downloading was turned off" if not download else "the download failed")
    lines = [f"{title}: {len(missing)} file(s) not found ({why})."]
    for s in missing:
        lines.append(f"  {s.component}: {hub_path(s.file)} from {s.file.repo_id}")
        for place in s.looked:
            lines.append(f"      looked in {place}")
        lines.append(f"      fetch it with: {fetch_command(s.file)}")
    hints = []
    if models_dir is None:
        hints.append(f"point ${ENV_COMFYUI} (or comfyui=) at a ComfyUI install that has them")
    if offline:
        hints.append("unset HF_HUB_OFFLINE to let cascade_lab download them")
    hints.append(fix)
    lines.append("  To fix: run the commands above, " + ", ".join(hints) + ".")
    return "\n".join(lines)
