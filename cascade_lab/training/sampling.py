"""Sample prompts during training: kohya's prompt-file grammar, images through `cascade_lab.pipeline`.

A ``.txt`` prompt file has one prompt per line (``#`` lines and blank lines skipped) with inline options,
each after a space and two dashes, matched case-insensitively: ``--n`` negative prompt (up to the next
option), ``--w``/``--h`` size, ``--d`` seed, ``--l`` CFG scale, ``--s`` steps (1…1000). ``.toml`` files
hold a ``[prompt]`` table of defaults with ``[[prompt.subset]]`` entries; ``.json`` files a list of objects
(keys ``prompt``, ``negative_prompt``, ``width``, ``height``, ``seed``, ``scale``, ``sample_steps``).
Stage C samples with the official settings (DDPM, shift 2, CFG rescale 0.7); the Previewer image is always
made, and the full Stage B → A image when those stages exist. In a Stage B run the run's frozen Stage C makes
the latent and the trained Stage B decodes it (C → B → A, always the full image).

The frozen models of the samples (text encoder, the other diffusion stage, Stage A) live on the CPU between
sampling events, so training steps never share the GPU with them. An event renders stage by stage: the text of
every prompt with the text encoder held on the device, then Stage C for every prompt, then Stage B, then Stage A,
each frozen model moved to the device once and back to the CPU once (``Pipeline(offload=True)`` and
`Pipeline.resident`), one at a time, also when a render fails; the trained model stays where training holds it
and the Previewer runs where it was loaded. Each prompt keeps its own seed and noise stream, so the images are
those `Pipeline.run` makes prompt by prompt.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_OPTION = re.compile(r"^(ss|cn|[nwhdlstf])(?:\s+(.*))?$", re.IGNORECASE | re.DOTALL)
_UNUSED = {"ss": "sampler names", "cn": "ControlNet images", "t": "t_start", "f": "shift"}


@dataclass(frozen=True)
class SamplePrompt:
    """One preview: the kohya dict keys (``scale`` is the CFG, ``steps`` the Stage C steps)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    seed: int | None = None
    scale: float = 4.0
    steps: int = 20


def _size(value: Any, where: str) -> int:
    size = int(value) // 8 * 8  # kohya floors to a multiple of 8
    if size < 128:
        raise ConfigError(f"{where}: a sample size of {value} px is too small; use at least 128")
    return size


def parse_prompt_line(line: str, where: str = "prompt") -> SamplePrompt | None:
    """One line of a .txt prompt file; None for comments and blank lines."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    pieces = text.split(" --")
    values: dict[str, Any] = {"prompt": pieces[0].strip()}
    for piece in pieces[1:]:
        match = _OPTION.match(piece.strip())
        if match is None:
            warnings.warn(f"{where}: unknown option '--{piece.strip()}' ignored (known: --n --w --h --d --l --s)",
                          stacklevel=3)
            continue
        key, value = match[1].lower(), (match[2] or "").strip()
        try:
            if key == "n":
                values["negative_prompt"] = value
            elif key == "w":
                values["width"] = _size(value, where)
            elif key == "h":
                values["height"] = _size(value, where)
            elif key == "d":
                values["seed"] = int(value)
            elif key == "l":
                values["scale"] = float(value)
            elif key == "s":
                values["steps"] = min(1000, max(1, int(value)))
            else:
                warnings.warn(f"{where}: --{key} ({_UNUSED[key]}) has no effect on training previews", stacklevel=3)
        except ConfigError:
            raise
        except ValueError:
            raise ConfigError(f"{where}: --{key} {value!r} is not a number") from None
    return SamplePrompt(**values)


def _from_dict(data: dict[str, Any], where: str) -> SamplePrompt:
    known = {"prompt", "negative_prompt", "width", "height", "seed", "scale", "sample_steps"}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{where}: unknown keys {unknown} ignored (known: {sorted(known)})", stacklevel=3)
    if "prompt" not in data:
        raise ConfigError(f"{where}: an entry needs a 'prompt'")
    out = SamplePrompt(str(data["prompt"]), str(data.get("negative_prompt", "")))
    if "width" in data:
        out = replace(out, width=_size(data["width"], where))
    if "height" in data:
        out = replace(out, height=_size(data["height"], where))
    if data.get("seed") is not None:
        out = replace(out, seed=int(data["seed"]))
    if "scale" in data:
        out = replace(out, scale=float(data["scale"]))
    if "sample_steps" in data:
        out = replace(out, steps=min(1000, max(1, int(data["sample_steps"]))))
    return out


def load_prompts(source: str | Path | list[str]) -> list[SamplePrompt]:
    """Prompts from a .txt / .toml / .json file, or from a list of .txt-style lines."""
    if isinstance(source, list):
        return [p for i, line in enumerate(source) if (p := parse_prompt_line(line, f"prompt {i + 1}")) is not None]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"sample prompt file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        table = tomllib.loads(text).get("prompt", {})
        defaults = {k: v for k, v in table.items() if k != "subset"}
        subsets = table.get("subset", [])
        return [_from_dict(defaults | entry, f"{path} subset {i + 1}") for i, entry in enumerate(subsets)]
    if path.suffix.lower() == ".json":
        entries = json.loads(text)
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: a JSON prompt file holds a list of objects")
        return [_from_dict(e, f"{path} entry {i + 1}") for i, e in enumerate(entries)]
    out = []
    for i, line in enumerate(text.splitlines()):
        prompt = parse_prompt_line(line, f"{path}:{i + 1}")
        if prompt is not None:
            out.append(prompt)
    return out


# ---------------------------------------------------------------------------------------------- rendering


@dataclass
class SampleImage:
    """The images made for one prompt at one step."""

    step: int
    index: int
    prompt: SamplePrompt
    seed: int
    preview: Any  # PIL image from the Previewer (8× the latent)
    image: Any = None  # PIL image through Stage B and A, when available
    paths: list[Path] = field(default_factory=list)


class _Placed:
    """The training Stage C as the pipeline sees it: already placed, so `.to()` must not move or cast it."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def to(self, *args: Any, **kwargs: Any) -> _Placed:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def render_samples(prompts: list[SamplePrompt], trained: Any, models: Any, *, step: int, seed: int,
                   device: Any, autocast_bf16: bool, full: bool, out_dir: Path | None, name: str,
                   epoch: int | None = None, stage: str = "c") -> list[SampleImage]:
    """Sample every prompt with the trained model as it is now (eval mode, global RNG untouched), save PNGs.

    ``stage="c"``: `trained` is Stage C; ``"b"``: `trained` is Stage B, after the run's frozen Stage C.

    Files are named as kohya names them: ``<name>_<e000001 at an epoch end | 000123>_<index:02d>_<seed>.png``
    (kohya without an output name: `name` "", no ``<name>_``)."""
    import torch

    from ..params import GenerationParams
    from ..pipeline import Pipeline, Stages
    from ..results import to_pil
    from .data import derive_seed

    stage_c: Any
    stage_b: Any
    if stage == "b":
        full = True
        stage_c, stage_b = models.stage_c, _Placed(trained)
    else:
        full = full and models.has("stage_b") and models.has("stage_a")
        stage_c, stage_b = _Placed(trained), models.get("stage_b") if full else None
    stages = Stages(stage_c=stage_c, stage_b=stage_b, stage_a=models.get("stage_a") if full else None,
                    text_encoder=models.get("text_encoder"), previewer=models.get("previewer"), variant="training")
    # offload: a frozen model comes to the device only while the pipeline uses it and goes back to the CPU after;
    # `resident` holds each one there for all the prompts of this event (one at a time), the trained model is
    # `_Placed`, so it stays where training holds it, never copied
    pipeline = Pipeline(stages, device=device, offload=True)
    modes = [(m, m.training) for m in trained.modules()]
    trained.eval()
    seeds = [p.seed if p.seed is not None else derive_seed(seed, "preview", i) % 2**32 for i, p in enumerate(prompts)]
    jobs = []
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast_bf16)
    try:
        cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), autocast:
            # stage by stage: each prompt keeps its own job (its own noise stream), so the images are the ones
            # `pipeline.run(params)` makes prompt by prompt
            with pipeline.resident("text_encoder"):
                for prompt, sample_seed in zip(prompts, seeds, strict=True):
                    params = GenerationParams(prompt.prompt, prompt.negative_prompt, width=prompt.width,
                                              height=prompt.height, seed=sample_seed, steps_c=prompt.steps,
                                              cfg_c=prompt.scale, variant="training")
                    jobs.append(pipeline.run_text(params))
            with pipeline.resident("stage_c"):
                previews = [to_pil(pipeline.preview_c(pipeline.run_c(job)))[0] for job in jobs]
            images: list[Any] = [None] * len(jobs)
            if full:
                with pipeline.resident("stage_b"):
                    for job in jobs:
                        pipeline.run_b(job)
                with pipeline.resident("stage_a"):
                    images = [to_pil(pipeline.run_a(job).images)[0] for job in jobs]
    finally:
        for module, mode in modes:
            module.training = mode
    results = [SampleImage(step, index, prompt, sample_seed, preview, image) for index, (prompt, sample_seed,
               preview, image) in enumerate(zip(prompts, seeds, previews, images, strict=True))]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for sample in results:
            when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
            stem = out_dir / f"{name + '_' if name else ''}{when}_{sample.index:02d}_{sample.seed}"
            sample.preview.save(stem.with_name(stem.name + "_preview.png"))
            sample.paths.append(stem.with_name(stem.name + "_preview.png"))
            if sample.image is not None:
                sample.image.save(stem.with_name(stem.name + ".png"))
                sample.paths.append(stem.with_name(stem.name + ".png"))
    return results


__all__ = ["SampleImage", "SamplePrompt", "load_prompts", "parse_prompt_line", "render_samples"]
