"""Load one stage from a file, a diffusers/transformers folder or a variant name, memory-lean.

The model is built on the meta device (no memory, no init), the file's keys and shapes are checked
against it from the header alone, then every tensor is read straight into its final storage in the
target dtype and handed over with ``load_state_dict(assign=True)``. A key that is missing or unexpected
raises, listing them: a half-loaded model with random weights is never returned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .convert import EFFNET_CONSTANTS, STAGES, plan_official
from .detect import LABELS, Component, Detection, detect
from .safetensors_io import Header, Recipe, WeightsFileError, read_headers, read_tensors, refuse_pickle

if TYPE_CHECKING:
    import torch
    from torch import nn

# stage -> (module, config class) in cascade_lab.models; imported on first use
CONFIGS: dict[str, tuple[str, str]] = {
    "stage_c": ("cascade_lab.models.stage_c", "StageCConfig"),
    "stage_b": ("cascade_lab.models.stage_b", "StageBConfig"),
    "stage_a": ("cascade_lab.models.stage_a", "StageAConfig"),
    "effnet": ("cascade_lab.models.effnet", "EfficientNetEncoderConfig"),
    "previewer": ("cascade_lab.models.previewer", "PreviewerConfig"),
    "controlnet": ("cascade_lab.models.controlnet", "ControlNetConfig"),
}
# diffusers repo sub-folders holding each stage (stabilityai/stable-cascade and -prior)
DIFFUSERS_FOLDERS: dict[str, tuple[str, ...]] = {
    "stage_c": ("prior", "prior_lite"),
    "stage_b": ("decoder", "decoder_lite"),
    "stage_a": ("vqgan",),
    "text_encoder": ("text_encoder",),
    "image_encoder": ("image_encoder",),
}
IGNORABLE_MISSING = ("num_batches_tracked",)  # BatchNorm counters: absent in some exports, zero-filled


class WrongStageError(WeightsFileError):
    """The file holds another stage than the one asked for."""


class StateDictMismatchError(WeightsFileError):
    """The file's keys or shapes do not match the model; the message lists them."""


@dataclass(frozen=True)
class Source:
    """The files to read for one stage and what detection found in them."""

    path: Path  # what the user gave (file or folder)
    header: Header
    detection: Detection
    component: Component


def load_stage(
    stage: str,
    source: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    config: Any = None,
    comfyui: str | os.PathLike[str] | None = None,
    mmap: bool = True,
) -> nn.Module:
    """Load ``stage`` (``stage_c``, ``stage_b``, ``stage_a``, ``effnet``, ``previewer``, ``controlnet``).

    ``source``: a ``.safetensors`` file (official, ComfyUI all-in-one or single-model, diffusers), a
    diffusers folder (or repo root), or a variant name such as ``"lite_bf16"`` (located with
    :func:`~cascade_lab.weights.locate.locate`). ``dtype`` casts floating-point weights (None keeps the
    stored dtype); ``config`` is a config object or preset name (``"tiny"``) for sizes the header cannot
    name. With ``mmap`` (CPU), weights already stored in ``dtype`` are views of a private copy-on-write map
    of the file: no copy, paged in on first use — do not overwrite the file in place while the model lives.
    Returns the model in eval mode.
    """
    import torch

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    resolved = _resolve(stage, source, comfyui, dtype)
    if stage == "controlnet" and config is None:
        demo = _demo_controlnet(resolved, dtype, device)
        if demo is not None:
            return demo
    src = open_source(stage, resolved, dtype=dtype)
    cfg = _config(stage, src, config)
    plan = plan_official(src.header.keys(), stage, src.component.prefix)
    stored = _main_dtype(src.header, plan)
    if dtype is None and stored is not None and stored not in ("float32", "bfloat16", "float16"):
        import warnings

        warnings.warn(f"{src.path} stores its {stage} weights as {stored}; loading them as float32 (pass dtype= "
                      "to choose another)", stacklevel=2)
        dtype = torch.float32
    target = dtype if dtype is not None else (getattr(torch, stored) if stored else None)
    if stage == "stage_c" and target == torch.float16:
        from ..models.stage_c import FP16_ERROR

        raise TypeError(f"{src.path}: {FP16_ERROR}" + (
            "" if dtype is not None else " (this file stores float16: pass dtype=torch.bfloat16)"))
    with torch.device("meta"), skip_init():
        model = cfg.build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(src, plan, expected, built=f"{type(model).__name__} from {cfg!r}")
    floats = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    ints = sorted(k for k, r in plan.items() if k in floats
                  and not src.header.tensors[r.sources[0]].torch_dtype_name.startswith(("float", "bfloat")))
    if ints:
        kinds = sorted({src.header.tensors[plan[k].sources[0]].torch_dtype_name for k in ints})
        raise TypeError(f"{src.path}: {len(ints)} {stage} weights are stored as {'/'.join(kinds)} (e.g. {ints[0]}), "
                        "a quantized file without the scales to undo it; cascade_lab loads float32, bfloat16 or "
                        "float16 files: use the official file or dequantize this one first")
    if stage == "effnet":
        check_effnet_constants(src.header, src.component.prefix)
    state = dict(read_tensors(src.header, plan, dtype=dtype, device=device, mmap=mmap))
    for key in expected.keys() - state.keys():  # only ignorable counters are left by check_keys
        state[key] = torch.zeros((), dtype=torch.long, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__} kept tensors on the meta device after loading "
                           f"{src.path}: {', '.join(left[:10])}; non-persistent buffers must be created "
                           f"in a way that survives meta construction")
    return model.eval()


def _demo_controlnet(path: Path, dtype: torch.dtype | None, device: torch.device | str) -> nn.Module | None:
    """The demo variant's ControlNet when `path` is one of its files (its metadata names it), else None."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            kind = (f.metadata() or {}).get("cascade_lab.demo", "")
    except Exception:  # not safetensors: open_source reports it
        return None
    if not kind.startswith("controlnet_"):
        return None
    from ..demo.models import load_controlnet

    net = load_controlnet(kind.removeprefix("controlnet_"), path)
    return net.to(device=device, dtype=dtype) if dtype is not None else net.to(device)


def effnet_normalization(header: Header, prefix: str = "") -> dict[str, tuple[float, ...]]:
    """The ``mean`` / ``std`` a ComfyUI VAE file stores next to its EfficientNet (``vae.encoder.mean``: prefix
    ``vae.encoder.``), as floats; empty for an official file, which has none (ComfyUI then uses ImageNet's)."""
    names = {k: prefix + k for k in EFFNET_CONSTANTS if prefix + k in header}
    if not names:
        return {}
    plan = {k: Recipe((source,)) for k, source in names.items()}
    return {k: tuple(float(v) for v in t.flatten().tolist()) for k, t in read_tensors(header, plan, mmap=False)}


def check_effnet_constants(header: Header, prefix: str = "", atol: float = 2e-3) -> None:
    """Refuse an EfficientNet whose stored normalisation is not ImageNet's (float16/bfloat16 rounding allowed):
    cascade_lab's encoder always normalises with ImageNet's constants, so another pair would be silently lost."""
    from ..models.effnet import IMAGENET_MEAN, IMAGENET_STD

    stored = effnet_normalization(header, prefix)
    for name, imagenet in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        got = stored.get(name)
        if got is not None and (len(got) != 3 or max(abs(a - b) for a, b in zip(got, imagenet, strict=True)) > atol):
            raise WeightsFileError(
                f"{header.path}: {prefix}{name} = {[round(v, 6) for v in got]} is not ImageNet's {list(imagenet)}; "
                f"cascade_lab's EfficientNet encoder always normalises with ImageNet's constants, so this "
                f"encoder would give other latents. Re-export it with ImageNet's {name}, or load the "
                f"official effnet_encoder.safetensors.")


@contextmanager
def skip_init() -> Iterator[None]:
    """Make ``torch.nn.init`` functions no-ops while a model is built on meta (every value is replaced).

    Initialising meta tensors does no work, but ``normal_`` & co. on meta go through torch's Python
    references and import ``torch._dynamo`` on first use: ~1.5 s of a first load. Not thread-safe (the
    functions are swapped module-wide for the duration of the build), like transformers' no_init_weights.
    """
    from torch.nn import init

    names = [n for n in vars(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}

    def keep(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    for n in names:
        setattr(init, n, keep)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)


def _resolve(stage: str, source: str | os.PathLike[str], comfyui: str | os.PathLike[str] | None,
             dtype: torch.dtype | None) -> Path:
    path = Path(source).expanduser()
    if path.exists() or not isinstance(source, str) or os.sep in source or source.endswith(".safetensors"):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        return path
    from ..registry import UnknownNameError
    from .locate import locate

    try:
        hit = locate(source, components=[stage], comfyui=comfyui)
    except UnknownNameError:
        raise FileNotFoundError(f"{source!r} is neither a file or folder nor a variant name") from None
    except KeyError as e:  # the variant has no file for this stage
        raise ValueError(str(e.args[0])) from None
    return hit[stage].path


def weight_files(path: Path, stage: str, dtype: torch.dtype | None = None) -> list[Path]:
    """The safetensors file(s) behind ``path``: the file itself, or a diffusers/transformers folder's
    weights (sharded ones through their ``.index.json``; the ``.bf16``/``.fp16`` variant when asked for)."""
    if path.is_file():
        refuse_pickle(path)
        return [path]
    subs = [path / s for s in DIFFUSERS_FOLDERS.get(stage, ()) if (path / s).is_dir()]
    if subs and not _weights_in(path):
        if len(subs) > 1:
            raise WeightsFileError(
                f"{path} holds several {LABELS[stage]} folders ({', '.join(s.name for s in subs)}); "
                f"pass the one you want, e.g. {subs[0]}")
        path = subs[0]
    found = _weights_in(path)
    if not found:
        pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            refuse_pickle(path / pickles[0])
        raise WeightsFileError(f"{path}: no .safetensors weights in this folder")
    wanted = {"bfloat16": "bf16", "float16": "fp16"}.get(str(dtype).removeprefix("torch."), "")
    stems = sorted(found)
    stem = next((s for s in stems if s.endswith("." + wanted)), None) if wanted else None
    stem = stem or next((s for s in stems if "." not in s), stems[0])
    return found[stem]


def _weights_in(folder: Path) -> dict[str, list[Path]]:
    """stem (``diffusion_pytorch_model``, ``diffusion_pytorch_model.bf16``, ``model``) -> its files."""
    out: dict[str, list[Path]] = {}
    for index in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise WeightsFileError(f"{index}: not a valid shard index ({e})") from None
        out[index.name.removesuffix(".safetensors.index.json")] = [
            folder / name for name in sorted(set(weight_map.values()))]
    for f in folder.glob("*.safetensors"):
        stem = f.name.removesuffix(".safetensors")
        if "-of-" not in stem:
            out.setdefault(stem, [f])
    return out


def open_source(stage: str, path: Path, *, dtype: torch.dtype | None = None) -> Source:
    """Read the header(s) behind ``path`` and check that they hold ``stage``."""
    files = weight_files(path, stage, dtype)
    header = read_headers(files)
    det = detect(header)
    comp = det.components.get(stage)
    if comp is None:
        what = det.describe()
        hint = ""
        others = [k for k in det.components if k in STAGES]
        if others:
            hint = f"; load it as {others[0]!r}" + (
                f" (the file holds {', '.join(map(repr, others))})" if len(others) > 1 else "")
        raise WrongStageError(
            f"{path} is not a {LABELS[stage]} checkpoint: it holds {what}{hint}")
    return Source(path, header, det, comp)


def _config(stage: str, src: Source, config: Any) -> Any:
    import importlib

    module, name = CONFIGS[stage]
    cls = getattr(importlib.import_module(module), name)
    if config is None:
        preset = src.component.variant or ("full" if stage in ("stage_a", "effnet", "previewer") else None)
        if preset is None or not hasattr(cls, preset):
            width = f" (width {src.component.width})" if src.component.width else ""
            raise WeightsFileError(
                f"{src.path}: holds a {LABELS[stage]} of a size that is not a shipped variant{width}; "
                f"pass config= (a {name} or a preset name such as 'tiny')")
        return getattr(cls, preset)()
    if isinstance(config, str):
        if not hasattr(cls, config):
            raise ValueError(f"{name} has no preset {config!r}")
        return getattr(cls, config)()
    if isinstance(config, Mapping):
        return cls(**config)
    return config


def _main_dtype(header: Header, plan: Mapping[str, Recipe]) -> str | None:
    """The floating-point dtype holding most of this component's values (all-in-one files mix dtypes)."""
    counts: dict[str, int] = {}
    for recipe in plan.values():
        for s in recipe.sources:
            t = header.tensors[s]
            if t.torch_dtype_name.startswith(("float", "bfloat")):
                counts[t.torch_dtype_name] = counts.get(t.torch_dtype_name, 0) + t.numel
    return max(counts, key=lambda k: counts[k]) if counts else None


def check_keys(src: Source, plan: Mapping[str, Recipe], expected: Mapping[str, tuple[int, ...]],
               built: str = "the model") -> None:
    """Raise :class:`StateDictMismatchError` listing missing and unexpected keys and wrong shapes."""
    missing = sorted(k for k in expected.keys() - plan.keys() if not k.endswith(IGNORABLE_MISSING))
    unexpected = sorted(plan.keys() - expected.keys())
    wrong = [(k, plan[k].shape(src.header), expected[k]) for k in sorted(plan.keys() & expected.keys())
             if plan[k].shape(src.header) != expected[k]]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{src.path} ({src.component.describe()}) does not fit {built}: "
             f"refusing to load a partly random model."]
    for title, items in (("missing from the file", missing), ("unexpected in the file", unexpected)):
        if items:
            lines.append(f"  {len(items)} key(s) {title}: " + ", ".join(_key(src, k, plan) for k in items[:20])
                         + (f", ... ({len(items) - 20} more)" if len(items) > 20 else ""))
    if wrong:
        lines.append(f"  {len(wrong)} shape mismatch(es): " + ", ".join(
            f"{k} file {list(got)} vs model {list(want)}" for k, got, want in wrong[:20])
            + (f", ... ({len(wrong) - 20} more)" if len(wrong) > 20 else ""))
    lines.append("  Is it a different size of model? Pass config= with the matching preset.")
    raise StateDictMismatchError("\n".join(lines))


def _key(src: Source, key: str, plan: Mapping[str, Recipe]) -> str:
    recipe = plan.get(key)
    if recipe is None or recipe.sources == (key,):
        return key
    return f"{key} (from {' + '.join(recipe.sources)})"
