"""Stage C ControlNet files: where they are (found like the stages) and whether one fits a Stage C, from the
safetensors header alone.

The official files are ``controlnet/<kind>.safetensors`` in stabilityai/stable-cascade (float32, spec §9);
ComfyUI keeps them in ``models/controlnet/`` as ``stable_cascade_<kind>.safetensors`` (peers §2). A ControlNet
adds its c_proj-channel features right before the Stage C ResBlock calls listed in its ``proj_blocks``, so
c_proj must equal the Stage C width there and every block must exist (official ``ControlNetDeliverer``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..registry import Variant, VariantFile
from .detect import CONTROLNETS, STAGE_C_WIDTH, detect
from .locate import Located, find_files, hub_path
from .safetensors_io import Header, read_header

# the public ControlNets, with the element counts of their state dicts (reference manifests/summary.json)
CONTROLNET_FILES: dict[str, VariantFile] = {
    "canny": VariantFile("canny.safetensors", subfolder="controlnet", params=54_409_758),
    "inpainting": VariantFile("inpainting.safetensors", subfolder="controlnet", params=54_410_406),
    "super_resolution": VariantFile("super_resolution.safetensors", subfolder="controlnet", params=203_491_584),
}
KINDS = tuple(CONTROLNET_FILES)
C_IN = {kind: c_in for (_, c_in), kind in CONTROLNETS.items() if kind in KINDS}  # canny 1, inpainting 4, SR 16
STAGE_C_SIZES = {"full": "the 3.6B Stage C", "lite": "the 1B Stage C"}


def _check_kind(kind: str) -> None:
    if kind not in CONTROLNET_FILES:
        raise ValueError(f"ControlNet kind {kind!r}: use one of {', '.join(KINDS)}")


def locate_controlnet(
    kind: str,
    *,
    path: str | os.PathLike[str] | None = None,
    folders: Sequence[str | os.PathLike[str]] = (),
    comfyui: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> Located:
    """Find (or fetch) the ``kind`` ControlNet as :func:`~cascade_lab.weights.locate.locate` finds a stage:
    ``path``, then ``folders`` (``controlnet/<kind>.safetensors`` or ``<kind>.safetensors``), then ComfyUI's
    ``models/controlnet/stable_cascade_<kind>.safetensors``, the Hub cache, and a download of that file only."""
    _check_kind(kind)
    comp = f"controlnet_{kind}"
    f = CONTROLNET_FILES[kind]
    v = Variant(comp, f"the {kind} ControlNet", files={comp: f})
    found = find_files(v, [comp], files={comp: path} if path is not None else None, folders=folders,
                       comfyui=comfyui, download=download, title=f"Stable Cascade {kind} ControlNet",
                       fix=f"or pass path='/path/to/{f.filename}'")
    return found[comp]


@dataclass(frozen=True)
class ControlNetShape:
    """What decides whether a ControlNet fits a Stage C: input channels, output width, the blocks it feeds."""

    name: str  # for messages: "ControlNet '<file>'" or "the ControlNet module"
    c_in: int
    c_proj: int
    proj_blocks: tuple[int, ...]
    demo: bool = False  # the demo variant's own ControlNet (cascade_lab.demo), which fits only the demo Stage C


def controlnet_shape(source: Any, kind: str, proj_blocks: Sequence[int] | None = None) -> ControlNetShape:
    """The shape of a ControlNet module, or of a file read from its header only (``proj_blocks`` is not
    stored in a file: the shipped blocks are assumed when the number of projections matches them)."""
    if hasattr(source, "c_proj") and hasattr(source, "proj_blocks"):  # a ControlNet module
        demo = type(source).__name__ == "DemoControlNet"
        return ControlNetShape("the demo ControlNet module" if demo else "the ControlNet module", int(source.c_in),
                               int(source.c_proj), tuple(int(b) for b in source.proj_blocks), demo)
    from .convert import plan_official
    from .loader import WrongStageError

    header = source if isinstance(source, Header) else read_header(source)
    name = f"ControlNet {str(header.path)!r}"
    comp = detect(header).components.get("controlnet")
    if comp is None:
        f = CONTROLNET_FILES[kind]
        raise WrongStageError(f"{header.path} is not a ControlNet: it holds {detect(header).describe()}; "
                              f"give the {kind} file ({hub_path(f)} of {f.repo_id})")
    plan = plan_official(header.keys(), "controlnet", comp.prefix)
    # projections.<i>.2.weight: (c_proj, c_embed, 1, 1), one per block fed
    outs = sorted((int(k.split(".")[1]), r.shape(header)[0]) for k, r in plan.items()
                  if k.startswith("projections.") and k.endswith(".2.weight"))
    if proj_blocks is None:
        from ..models.controlnet import ControlNetConfig

        shipped = ControlNetConfig().proj_blocks
        if len(outs) != len(shipped):
            raise ValueError(f"{name} has {len(outs)} projections, not the {len(shipped)} of the shipped "
                             "ControlNets; pass proj_blocks= (the Stage C ResBlock calls it feeds)")
        proj_blocks = shipped
    demo = header.metadata.get("cascade_lab.demo", "").startswith("controlnet_")
    return ControlNetShape(name, comp.width or 0, outs[0][1] if outs else 0, tuple(proj_blocks), demo)


def stage_c_widths(stage_c: Any) -> tuple[str, list[int]]:
    """A Stage C's size name and its width at each ControlNet injection point (ResBlock calls in order).

    ``stage_c``: a Stage C module, a ``StageCConfig`` (or a `Lazy` holding one), or a preset name."""
    if isinstance(stage_c, str):
        from ..models.stage_c import StageCConfig

        if stage_c not in STAGE_C_SIZES and stage_c != "tiny":
            raise ValueError(f"Stage C preset {stage_c!r}: use one of full, lite, tiny")
        stage_c = getattr(StageCConfig, stage_c)()
    if hasattr(stage_c, "control_widths"):
        widths = list(stage_c.control_widths())
    else:
        cfg = getattr(stage_c, "config", None) or stage_c
        if not hasattr(cfg, "c_hidden"):
            raise TypeError(f"cannot read the Stage C widths of {type(stage_c).__name__}; give the Stage C "
                            "module, its StageCConfig or a preset name ('full', 'lite')")
        widths = _config_widths(cfg)
    return STAGE_C_WIDTH.get(widths[0], f"custom, {widths[0]} wide") if widths else "empty", widths


def _config_widths(cfg: Any) -> list[int]:
    """`LevelUNet.control_widths` from a config: ResBlocks ('C') per level, down path then up path (reversed
    levels), each level run block_repeat times."""
    n = len(cfg.c_hidden)
    repeat = cfg.block_repeat or [[1] * n, [1] * n]
    widths: list[int] = []
    for i in range(n):
        widths += [cfg.c_hidden[i]] * (cfg.blocks[0][i] * cfg.level_config[i].count("C") * repeat[0][i])
    for i in reversed(range(n)):
        widths += [cfg.c_hidden[i]] * (cfg.blocks[1][::-1][i] * cfg.level_config[i].count("C") * repeat[1][::-1][i])
    return widths


def check_controlnet(source: Any, kind: str, stage_c: Any, *,
                     proj_blocks: Sequence[int] | None = None) -> ControlNetShape:
    """Refuse a ControlNet (file or module) that is not of ``kind`` or does not fit ``stage_c``, before anything
    loads or runs: its c_in against the kind, its c_proj against the Stage C width at each block it feeds,
    and each block against the Stage C's ResBlock calls. Returns what it checked."""
    _check_kind(kind)
    net = controlnet_shape(source, kind, proj_blocks)
    if net.c_in != C_IN[kind]:
        other = {c: k for k, c in C_IN.items()}.get(net.c_in)
        what = f"{'an' if other[0] in 'aeiou' else 'a'} {other} ControlNet" if other else \
            "a ControlNet of none of the shipped kinds"
        raise ValueError(f"{net.name} is {what} ({net.c_in} input channel(s)), not {kind} (which takes "
                         f"{C_IN[kind]}); " + (f"use it as kind={other!r} or " if other else "")
                         + f"give the {kind} file ({hub_path(CONTROLNET_FILES[kind])})")
    size, widths = stage_c_widths(stage_c)
    built_for = STAGE_C_WIDTH.get(net.c_proj)
    if net.demo:
        fix = "; it is the demo variant's own ControlNet: use it with variant 'demo' (Cascade('demo'))"
    elif built_for and built_for != size:
        fix = f"; use variant {_variants_of(built_for)} ({STAGE_C_SIZES[built_for]}) with it"
    else:
        fix = "; give a ControlNet trained for this Stage C"
    wrong = sorted({widths[b] for b in net.proj_blocks if b < len(widths) and widths[b] != net.c_proj})
    if wrong:
        target = f"{STAGE_C_SIZES[built_for]} (c_proj {net.c_proj})" if built_for else \
            f"a Stage C {net.c_proj} wide"
        raise ValueError(f"{net.name} was built for {target} but the loaded Stage C ({size}) is "
                         f"{'/'.join(map(str, wrong))} wide{fix}")
    beyond = [b for b in net.proj_blocks if b >= len(widths)]
    if beyond:
        raise ValueError(f"{net.name} feeds Stage C ResBlock calls {beyond}, but the loaded Stage C ({size}) has "
                         f"only {len(widths)}{fix}")
    return net


def _variants_of(size: str) -> str:
    """The registered variants whose Stage C is ``size`` ("full/bf16" for the 3.6B one)."""
    from .memory import PRIORITY, real_variants

    names = sorted((v.name for v in real_variants() if v.stage_c == size),
                   key=lambda n: PRIORITY.index(n) if n in PRIORITY else len(PRIORITY))
    return "/".join(names) or size
