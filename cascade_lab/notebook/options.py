"""What a ``%%cascade`` cell asks for: its options (IPython's ``magic_arguments`` parser), sizes, the
prompt and negative prompt from the cell body, and images or LoRA files named by path or variable.

Every mistake is a one-line `UsageError` naming the option. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser

NEGATIVE_SEPARATOR = "--- negative ---"  # a body line on its own: what follows is the negative prompt
NEXT_SEPARATOR = "--- next ---"  # a body line on its own: the next image's prompt of the batch follows
AREA = 1024 * 1024  # named sizes keep about the official 1024² pixels
GRID = 128  # ... in multiples of 128 (every latent size divides evenly)
# Named aspect ratios → (width, height), exactly what `fit_ratio` gives for each ratio.
NAMED_SIZES: dict[str, tuple[int, int]] = {
    "square": (1024, 1024),  # 1:1
    "portrait": (768, 1152),  # 2:3
    "landscape": (1152, 768),  # 3:2
    "tall": (768, 1408),  # 9:16
    "wide": (1408, 768),  # 16:9
}
RATIO_ALIASES = {"square": "1:1", "portrait": "2:3", "landscape": "3:2", "tall": "9:16", "wide": "16:9"}


# -- sizes ---------------------------------------------------------------------------------------------
def fit_ratio(ratio_w: float, ratio_h: float) -> tuple[int, int]:
    """(width, height) in multiples of 128 nearest the ratio, then nearest 1024² pixels (within ±30 %)."""
    target = math.log(ratio_w / ratio_h)
    best: tuple[tuple[float, float], int, int] | None = None
    for w in range(4 * GRID, 16 * GRID + 1, GRID):
        for h in range(4 * GRID, 16 * GRID + 1, GRID):
            area_error = abs(math.log(w * h / AREA))
            if area_error > math.log(1.3):
                continue
            key = (round(abs(math.log(w / h) - target), 3), area_error)
            if best is None or key < best[0]:
                best = (key, w, h)
    if best is None or best[0][0] > 0.15:
        raise ValueError(f"the ratio {ratio_w:g}:{ratio_h:g} is too extreme; give the size as WIDTHxHEIGHT")
    return best[1], best[2]


def parse_size(text: str) -> tuple[int, int]:
    """``1024x1536``, ``1024`` (square), a ratio ``16:9`` or a name from `NAMED_SIZES` → (width, height)."""
    spec = text.strip().lower()
    if spec in NAMED_SIZES:
        return NAMED_SIZES[spec]
    if m := re.fullmatch(r"(\d+(?:\.\d+)?):(\d+(?:\.\d+)?)", spec):
        a, b = float(m[1]), float(m[2])
        if a <= 0 or b <= 0:
            raise ValueError(f"{text!r}: a ratio needs two positive numbers, e.g. 16:9")
        return fit_ratio(a, b)
    if m := re.fullmatch(r"(\d+)(?:[x×*](\d+))?", spec):
        width = int(m[1])
        height = int(m[2]) if m[2] else width
        for value in (width, height):
            if value < 128 or value % 8:
                raise ValueError(f"{text!r}: sides must be ≥ 128 and multiples of 8 (multiples of 128 are safest)")
        return width, height
    names = ", ".join(NAMED_SIZES)
    raise ValueError(f"{text!r} is not a size; use WIDTHxHEIGHT (1024x1536), a ratio (16:9) or one of: {names}")


def size_table() -> str:
    """The named sizes, one per line, for the help text."""
    return "\n".join(f"  {name:<10} {RATIO_ALIASES[name]:>5}  {w}x{h}" for name, (w, h) in NAMED_SIZES.items())


# -- argument types (their errors become "argument --NAME: ...") ---------------------------------------
def _typed(convert: Callable[[str], Any], check: Callable[[Any], bool], need: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {need}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r}: use {need}")
        return value

    return parse


positive_int = _typed(int, lambda v: v >= 1, "a whole number ≥ 1")
seed_int = _typed(int, lambda v: 0 <= v < 2**64, "a whole number in [0, 2**64) (2**63 outside --compat comfyui)")
non_negative = _typed(float, lambda v: v >= 0, "a number ≥ 0")
positive = _typed(float, lambda v: v > 0, "a number > 0")
unit_open = _typed(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
unit = _typed(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def cfg_arg(text: str) -> float | tuple[float, float]:
    """``X`` or ``A,B`` (a pair interpolated over the steps, A at the first): finite numbers ≥ 0."""
    parts = text.split(",")
    if len(parts) in (1, 2):
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if values and all(math.isfinite(v) and v >= 0 for v in values):
            return values[0] if len(values) == 1 else (values[0], values[1])
    raise argparse.ArgumentTypeError(f"{text!r}: give a finite number ≥ 0 (1 = no guidance), or A,B for a pair "
                                     "interpolated over the steps")


def size_arg(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _registered(kind: str) -> Callable[[str], str]:
    def check(name: str) -> str:
        from .session import known_name

        try:
            if kind == "variant":
                from .. import plugins

                if name != "auto":
                    plugins.get_variant(name)
            else:
                known_name(kind, name)  # checked again in the cell's compat mode
        except KeyError as exc:
            raise argparse.ArgumentTypeError(str(exc).strip("'\"")) from None
        return name

    return check


def weighted(text: str, what: str = "weight") -> tuple[str, float]:
    """``NAME[:WEIGHT]`` → (name, weight); a tail that is not a number stays part of the name (``C:\\x``)."""
    name, sep, tail = text.rpartition(":")
    if sep and name:
        try:
            weight = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(weight):
            raise argparse.ArgumentTypeError(f"{text!r}: {what} {tail} is not a finite number; use e.g. {name}:0.8")
        return name, weight
    return text, 1.0


def control_arg(text: str) -> tuple[str, str, float]:
    """``KIND:IMAGE[:STRENGTH]`` → (kind, image, strength)."""
    from ..controls import parse_spec

    try:
        return parse_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def upscale_arg(text: str) -> int:
    from ..controls import parse_upscale

    try:
        return parse_upscale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def mask_arg(spec: str, namespace: Mapping[str, Any]) -> Any:
    """``--mask``: boxes ``x0,y0,x1,y1[;...]``, else a notebook variable or a file."""
    from ..controls import parse_boxes

    boxes = parse_boxes(spec)
    return boxes if boxes is not None else resolve_image("--mask", spec, namespace)


def lora_arg(text: str) -> tuple[str, float]:
    path, strength = weighted(text, "strength")
    if not path.lower().endswith(".safetensors"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a .safetensors file, optionally with :STRENGTH")
    return path, strength


def build_parser() -> MagicArgumentParser:
    """The ``%%cascade`` option parser."""
    # prog "%cascade": IPython's usage line puts one more "%" in front
    p = MagicArgumentParser(prog="%cascade", description="Generate images; the cell body is the prompt.")
    p.allow_abbrev = False  # a mistyped option is an error, never a guess
    add = p.add_argument
    add("-n", "--negative", metavar="TEXT", help="negative prompt (or write it in the body after a line "
        f"'{NEGATIVE_SEPARATOR}')")
    add("-s", "--seed", type=seed_int, help="random seed (default: random, recorded in the result)")
    add("--size", type=size_arg, metavar="SIZE", help="WIDTHxHEIGHT, a ratio like 16:9, or a name: "
        + ", ".join(NAMED_SIZES) + " (table in %%cascade help)")
    add("-b", "--batch", type=positive_int, metavar="N", help="images per job")
    add("-v", "--variant", type=_registered("variant"), help="weight variant (auto, full, bf16, lite, ...)")
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add("--dtype", choices=("float32", "bfloat16"), help="compute dtype of Stage C (never float16)")
    for stage, name in (("c", "Stage C"), ("b", "Stage B")):
        add(f"--steps-{stage}", type=positive_int, metavar="N", help=f"{name} steps")
        add(f"--cfg-{stage}", type=cfg_arg, metavar="X", help=f"{name} classifier-free guidance (1 = off; A,B: "
            "from A at the first step to B at the last)")
        add(f"--shift-{stage}", type=positive, metavar="X", help=f"{name} noise-schedule shift")
    add("--cfg-rescale", type=unit, metavar="RHO", help="CFG rescale mix ρ (official 0.7)")
    add("--compat", choices=("official", "comfyui"), help="official (default): the official code's seeding, sizes "
        "and CFG; comfyui: ComfyUI's, for the same image as ComfyUI with the same seed (docs/comfyui.md)")
    add("--denoise", type=unit_open, metavar="X", help="ComfyUI's partial schedule: the last steps of steps/X "
        "(with --image: img2img the ComfyUI way)")
    add("--seed-b", type=seed_int, metavar="N", help="Stage B's own seed under --compat comfyui (default: --seed)")
    add("--compression", type=positive, metavar="X", help="image pixels per Stage C latent pixel (official 42.67, "
        "ComfyUI 42; its img2img example 32)")
    add("--sampler", type=_registered("sampler"), help="sampler for both stages")
    add("--sampler-c", type=_registered("sampler"), metavar="NAME", help="Stage C sampler")
    add("--sampler-b", type=_registered("sampler"), metavar="NAME", help="Stage B sampler")
    add("--scheduler", type=_registered("scheduler"), help="scheduler for both stages")
    add("--scheduler-c", type=_registered("scheduler"), metavar="NAME", help="Stage C scheduler")
    add("--scheduler-b", type=_registered("scheduler"), metavar="NAME", help="Stage B scheduler")
    add("-i", "--image", metavar="IMAGE", help="img2img input: a file, or a variable holding a PIL image/array")
    add("--strength", type=unit_open, help="img2img noise strength (default 0.8 with --image)")
    add("--variation", action="append", type=weighted, default=[], metavar="IMAGE[:WEIGHT]",
        help="image variation input, a file or variable, repeatable")
    add("--control", action="append", type=control_arg, default=[], metavar="KIND:IMAGE[:STRENGTH]",
        help="a Stage C ControlNet, repeatable: canny, inpainting (with --mask) or super_resolution; IMAGE a file "
        "or a notebook variable")
    add("--controlnet", action="append", default=[], metavar="FILE",
        help="the ControlNet file of each --control (then --upscale), in the same order; none given: each is "
        "found like the stages (folders, ComfyUI models/controlnet, Hugging Face cache)")
    add("--upscale", type=upscale_arg, metavar="2x", help="upscale the --image 2x with the super-resolution "
        "ControlNet, at the official settings (Stage C DDPM, 20 steps, CFG 1); other options win")
    add("--mask", metavar="MASK", help="inpainting mask: an image file or variable (white = regenerate), a PIL "
        "image's alpha, an array, or boxes as x0,y0,x1,y1[;...]")
    add("--mask-grow", type=int, default=0, metavar="PX", help="grow the inpainting mask by PX pixels (negative "
        "shrinks it), as ComfyUI's GrowMask")
    add("--mask-feather", type=int, default=0, metavar="PX", help="blur the mask's edge over PX pixels where the "
        "result is composited over the original")
    add("--lora", action="append", type=lora_arg, default=[], metavar="FILE[:STRENGTH]",
        help="LoRA file to apply, repeatable (strength default 1.0)")
    add("--from", dest="from_png", metavar="FILE.png", help="regenerate from the parameters a PNG carries "
        "(cascade_lab's, or a ComfyUI PNG's graph); the cell's options and a non-empty body override them")
    add("-o", "--out", metavar="NAME", help="store the Result in this notebook variable")
    add("--save", metavar="FILE.png", help="also write PNG(s) carrying the parameters (an existing file is kept: "
        "the next free FILE_00001.png is written, as ComfyUI numbers outputs)")
    add("--overwrite", action="store_true", help="with --save: replace an existing file")
    add("--preview", dest="preview", action="store_true", default=None, help="live preview (default: on)")
    add("--no-preview", dest="preview", action="store_false", help="no live preview")
    add("--trajectory", dest="trajectory", action="store_true", default=None,
        help="keep every step's latent (for %%cascade inspect; default: on)")
    add("--no-trajectory", dest="trajectory", action="store_false", help="keep only the final latents")
    add("--expand", action="store_true", help="replace {name} and $name in the body with notebook variables")
    return p


PARSER = build_parser()


# -- the cell ----------------------------------------------------------------------------------------
@dataclass
class CellRequest:
    """A parsed ``%%cascade`` cell: the prompt pair, the job options, and what to do with the result."""

    prompt: str | list[str]  # a list: one prompt per image (sections split by "--- next ---")
    negative_prompt: str | list[str]
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments for `Session.generate`
    out: str | None = None
    save: str | None = None
    preview: bool | None = None
    overwrite: bool = False


def split_body(cell: str) -> tuple[str, str | None]:
    """(prompt, negative or None): the body verbatim, minus the one line break IPython ends every cell with,
    split at the first line that reads ``--- negative ---``."""
    body = cell[:-2] if cell.endswith("\r\n") else cell[:-1] if cell.endswith("\n") else cell
    lines = body.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip().lower() == NEGATIVE_SEPARATOR:
            prompt = "".join(lines[:i])
            prompt = prompt[:-2] if prompt.endswith("\r\n") else prompt[:-1] if prompt.endswith("\n") else prompt
            return prompt, "".join(lines[i + 1:])
    return body, None


def split_prompts(prompt: str) -> str | list[str]:
    """The prompt, or one prompt per image where lines reading ``--- next ---`` separate them (verbatim)."""
    lines = prompt.splitlines(keepends=True)
    if not any(line.strip().lower() == NEXT_SEPARATOR for line in lines):
        return prompt
    parts: list[str] = []
    current: list[str] = []
    for line in lines:
        if line.strip().lower() == NEXT_SEPARATOR:
            parts.append("".join(current))
            current = []
        else:
            current.append(line)
    parts.append("".join(current))
    return [p[:-2] if p.endswith("\r\n") else p[:-1] if p.endswith("\n") else p for p in parts]


_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_EXPAND = re.compile(rf"\{{\{{|\}}\}}|\$\$|\{{({_NAME})\}}|\$\{{({_NAME})\}}|\$({_NAME})")


def expand(text: str, namespace: Mapping[str, Any]) -> str:
    """``{name}``, ``${name}`` and ``$name`` → ``str(namespace[name])``; ``{{``, ``}}``, ``$$`` → literal.

    Only plain names are looked up: no attributes, indexing, format specs or evaluation.
    """

    def one(m: re.Match[str]) -> str:
        name = m[1] or m[2] or m[3]
        if name is None:
            return m[0][0]
        if name not in namespace:
            raise UsageError(f"--expand: {name!r} is not defined in the notebook (write $$ or {{{{ for literals)")
        return str(namespace[name])

    return _EXPAND.sub(one, text)


def resolve_image(option: str, spec: str, namespace: Mapping[str, Any]) -> Any:
    """A notebook variable's value (a PIL image, array or tensor; a str/Path means a file) or a file path."""
    value: Any = namespace[spec] if spec.isidentifier() and spec in namespace else spec
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise UsageError(f"{option} {spec!r}: neither a notebook variable nor an existing file")
        return str(path)
    return value


# the `GenerationParams` fields `--from` hands to `Session.generate` as they are
FROM_FIELDS = ("width", "height", "seed", "steps_c", "steps_b", "cfg_c", "cfg_b", "shift_c", "shift_b", "sampler_c",
               "sampler_b", "scheduler_c", "scheduler_b", "cfg_rho", "compression", "compat", "denoise", "seed_b")


def read_from(path: str) -> Any:
    """``--from FILE.png``: the `GenerationParams` the PNG carries (cascade_lab's chunk or a ComfyUI graph)."""
    from ..params import read_png_params

    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"--from {path!r}: file not found")
    try:
        return read_png_params(file)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--from {exc}") from None


def _sections(value: str | tuple[str, ...]) -> str:
    return value if isinstance(value, str) else f"\n{NEXT_SEPARATOR}\n".join(value)


def _input_file(description: str, png: Path, what: str) -> str:
    """A recorded input image or LoRA as a file on this machine: its path, else its name next to the PNG."""
    for candidate in (Path(description).expanduser(), png.parent / Path(description).name):
        if description and candidate.is_file():
            return str(candidate)
    raise UsageError(f"--from {png}: its generation used {what} {description!r}, which is not on this machine; "
                     f"give it in the cell ({'--lora FILE' if what == 'the LoRA' else '--image FILE'}) or put it "
                     "next to the PNG")


def from_options(params: Any, png: Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """`Session.generate` options that regenerate ``params``; inputs the cell ``given`` replaces are not looked
    for."""
    opts: dict[str, Any] = {name: getattr(params, name) for name in FROM_FIELDS}
    if isinstance(params.prompt, str):
        opts["batch_size"] = params.batch_size
    if not params.variant.startswith("comfyui"):  # a runner result names its file, not a variant
        opts["variant"] = params.variant
    if params.init_image is not None:
        if "image" not in given:
            opts["image"] = _input_file(params.init_image, png, "the input image")
        if params.compat != "comfyui" or params.strength < 1:  # ComfyUI's partial schedule is its denoise
            opts["strength"] = params.strength
    if params.variations and "variations" not in given:
        opts["variations"] = [_input_file(image, png, "the variation image") for image, _ in params.variations]
        opts["variation_weights"] = [weight for _, weight in params.variations]
    if params.controls and "controls" not in given:
        kinds = ", ".join(c[0] for c in params.controls)
        raise UsageError(f"--from {png}: its generation used ControlNets ({kinds}); give them in the cell with "
                         "--control KIND:IMAGE[:STRENGTH] (and --mask for inpainting)")
    opts["loras"] = [(_input_file(file, png, "the LoRA"), strength) for file, strength in params.loras]
    return opts


def parse_cell(line: str, cell: str, namespace: Mapping[str, Any]) -> CellRequest:
    """Options from the magic line, prompt (and negative) from the body → a `CellRequest`."""
    try:
        argv = shlex.split(line)  # POSIX quoting: "a b" and 'a b' are one value without their quotes
    except ValueError as exc:  # unbalanced quotes in the line
        raise UsageError(f"%%cascade options: {exc}") from None
    args = PARSER.parse_args(argv)
    prompt, negative = split_body(cell)
    source = read_from(args.from_png) if args.from_png else None
    if source is not None:  # an empty body regenerates the PNG's prompt (and negative, unless one is given)
        if not prompt.strip():
            prompt = _sections(source.prompt)
        if negative is None and args.negative is None:
            negative = _sections(source.negative_prompt)
    if args.expand:
        prompt = expand(prompt, namespace)
        negative = None if negative is None else expand(negative, namespace)
    if not prompt.strip():
        raise UsageError("%%cascade: the cell body is the prompt and it is empty; write the prompt below the "
                         "%%cascade line")
    prompts = split_prompts(prompt)
    if isinstance(prompts, list):
        empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
        if empty:
            raise UsageError(f"%%cascade: prompt {empty[0]} of the batch is empty; write one prompt between each "
                             f"'{NEXT_SEPARATOR}' line")
        if args.batch is not None and args.batch != len(prompts):
            raise UsageError(f"-b/--batch {args.batch}: the body has {len(prompts)} prompts separated by "
                             f"'{NEXT_SEPARATOR}'; leave --batch out (one image per prompt)")
    if negative is not None and args.negative is not None:
        raise UsageError(f"--negative: the body already has a negative prompt after '{NEGATIVE_SEPARATOR}'; "
                         "give one or the other")
    if args.strength is not None and args.image is None:
        raise UsageError("--strength needs --image (img2img); without an input image every job starts from noise")
    if args.strength is not None and args.denoise is not None:
        raise UsageError(f"--strength {args.strength} and --denoise {args.denoise}: give one of the two partial "
                         "schedules (--strength: the official one, --denoise: ComfyUI's)")
    compat = args.compat or "official"
    for kind in ("sampler", "scheduler"):
        for attr in (kind, f"{kind}_c", f"{kind}_b"):
            name = getattr(args, attr)
            if name is not None:
                from .session import known_name

                try:
                    known_name(kind, name, compat if args.compat else None)
                except KeyError as exc:
                    raise UsageError(f"--{attr.replace('_', '-')} {name}: {str(exc).strip(chr(39))}") from None
    if args.out is not None and not args.out.isidentifier():
        raise UsageError(f"-o/--out {args.out!r}: not a valid Python variable name")
    if args.save is not None:  # before any work: a path that cannot be written would lose the image
        from ..results import check_output_path

        try:
            check_output_path(args.save)
        except ValueError as exc:
            raise UsageError(f"--save {exc}") from None
    elif args.overwrite:
        raise UsageError("--overwrite is for --save FILE.png")

    opts: dict[str, Any] = {}
    if args.size is not None:
        opts["width"], opts["height"] = args.size
    simple = {"seed": "seed", "batch": "batch_size", "variant": "variant", "device": "device", "dtype": "dtype",
              "steps_c": "steps_c", "steps_b": "steps_b", "cfg_c": "cfg_c", "cfg_b": "cfg_b",
              "shift_c": "shift_c", "shift_b": "shift_b", "cfg_rescale": "cfg_rho", "trajectory": "keep_trajectory",
              "compat": "compat", "denoise": "denoise", "seed_b": "seed_b", "compression": "compression"}
    for attr, key in simple.items():
        if getattr(args, attr) is not None:
            opts[key] = getattr(args, attr)
    for kind in ("sampler", "scheduler"):
        for stage in ("c", "b"):
            value = getattr(args, f"{kind}_{stage}") or getattr(args, kind)
            if value is not None:
                opts[f"{kind}_{stage}"] = value
    if args.image is not None:
        opts["image"] = resolve_image("--image", args.image, namespace)
        if args.denoise is None:
            opts["strength"] = args.strength if args.strength is not None else 0.8
    if args.variation:
        opts["variations"] = [resolve_image("--variation", spec, namespace) for spec, _ in args.variation]
        opts["variation_weights"] = [weight for _, weight in args.variation]
    n_controls = len(args.control) + (args.upscale is not None)
    if args.controlnet and len(args.controlnet) != n_controls:
        raise UsageError(f"{n_controls} control(s) (--control, --upscale) but {len(args.controlnet)} --controlnet: "
                         "give the ControlNet file of each, in the same order, or none to have them found")
    files: list[str | None] = [str(Path(f).expanduser()) for f in args.controlnet] or [None] * n_controls
    for file in args.controlnet:
        if not Path(file).expanduser().is_file():
            raise UsageError(f"--controlnet {file!r}: file not found")
    if (args.mask is not None or args.mask_grow or args.mask_feather) and not any(
            kind == "inpainting" for kind, _, _ in args.control):
        raise UsageError("--mask / --mask-grow / --mask-feather are for an inpainting control: add --control "
                         "inpainting:IMAGE")
    if n_controls:
        from ..controls import Control

        controls = []
        for (kind, spec, strength), file in zip(args.control, files, strict=False):
            if kind == "inpainting" and args.mask is None:
                raise UsageError("--control inpainting needs --mask (white = regenerate, or boxes x0,y0,x1,y1)")
            inpaint = kind == "inpainting"
            mask = mask_arg(args.mask, namespace) if inpaint and args.mask is not None else None
            try:
                controls.append(Control(kind, resolve_image("--control", spec, namespace), strength, mask=mask,
                                        model=file, grow=args.mask_grow if inpaint else 0,
                                        feather=args.mask_feather if inpaint else 0).validate())
            except ValueError as exc:
                raise UsageError(f"--control {kind}:{spec}: {exc}") from None
        if args.upscale is not None:
            from ..controls import upscale_options
            from ..images import image_size

            if args.image is None:
                raise UsageError("--upscale 2x needs --image IMAGE: the picture to upscale")
            if args.strength is not None or args.denoise is not None:
                raise UsageError("--upscale starts from noise with the image as its control: drop --strength/"
                                 "--denoise (img2img)")
            image = opts.pop("image")
            opts.pop("strength", None)
            controls.append(Control("super_resolution", image, 1.0, model=files[-1]).validate())
            try:
                opts = upscale_options(image_size(image, "--image"), opts)
            except ValueError as exc:
                raise UsageError(f"--upscale: {exc}") from None
        opts["controls"] = controls
    for path, _ in args.lora:
        if not Path(path).expanduser().is_file():
            raise UsageError(f"--lora {path!r}: file not found")
    opts["loras"] = list(args.lora)  # per cell: a cell without --lora runs without any
    if source is not None:
        base = from_options(source, Path(args.from_png), given=opts)
        if not args.lora:
            opts.pop("loras")
        if args.image is not None and args.strength is None and source.init_image is not None:
            opts.pop("strength", None)  # the PNG's img2img schedule, not the cell's default 0.8
        opts = {**base, **opts}
    negative = negative if negative is not None else args.negative or ""
    negatives = split_prompts(negative)  # one per image, or one for all
    if isinstance(negatives, list) and (not isinstance(prompts, list) or len(negatives) != len(prompts)):
        count = len(prompts) if isinstance(prompts, list) else 1
        raise UsageError(f"%%cascade: {len(negatives)} negative prompts for {count} prompt(s); give one negative "
                         f"prompt for all, or one per prompt separated by '{NEXT_SEPARATOR}'")
    return CellRequest(prompts, negatives, opts, args.out, args.save, args.preview, args.overwrite)
